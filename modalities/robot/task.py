"""Robot tasks for training loops: an environment factory plus fixed initial states split into
training and evaluation sets (a "problem" is an initial-state index).

    task: {type: reach, num_states: 200, num_eval: 50, max_steps: 30}
"""
from __future__ import annotations

import random

from mmdistill.modalities.robot.envs import PointMassEnv, point_mass_initial_states
from mmdistill.registry import TASKS


@TASKS.register("reach")
class ReachTask:
    """The built-in point-mass reaching task (2-D point, goal disc); the first `num_eval` initial
    states are for evaluation only."""

    obs_dim = PointMassEnv.obs_dim
    action_dim = PointMassEnv.action_dim

    def __init__(self, num_states: int = 200, num_eval: int = 50, max_steps: int = 30, radius: float = 0.1, seed: int = 1234,
                 num_workers: int = 0):
        if max_steps < 1 or radius <= 0:
            raise ValueError(f"task.max_steps must be >= 1 and task.radius > 0; got {max_steps}, {radius}")
        if num_workers < 0:
            raise ValueError(f"task.num_workers must be >= 0 (0: environments in the training process); got {num_workers}")
        self.num_workers = num_workers  # > 0: environments in worker processes (modalities/robot/vec.py)
        self.initial_states = point_mass_initial_states(num_states, num_eval, seed)
        self.max_steps, self.radius = max_steps, radius

    def make_env(self) -> PointMassEnv:
        return PointMassEnv(self.initial_states, self.max_steps, self.radius)

    def summary(self) -> str:
        s = self.initial_states
        return f"reach: point mass, {len(s.train_ids)} training / {len(s.eval_ids)} evaluation initial states, {self.max_steps} steps"

    def sample_train(self, rng: random.Random) -> int:
        return rng.choice(self.initial_states.train_ids)

    def render_episodes(self, obs_B_T_O, mask_B_T, success_B, path) -> None:
        """An animated GIF of up to 16 episodes side by side: the point (blue, green once it
        succeeded), its trail and the goal disc (red)."""
        import math
        from pathlib import Path

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from PIL import Image

        B = min(len(obs_B_T_O), 16)
        cols = min(4, B)
        rows = math.ceil(B / cols)
        lengths = mask_B_T[:B].sum(1).astype(int)
        frames = []
        for t in range(int(lengths.max()) if B else 0):
            fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
            for b, ax in enumerate(axes.flat):
                ax.set_xlim(-1.5, 1.5), ax.set_ylim(-1.5, 1.5), ax.set_xticks([]), ax.set_yticks([])
                if b >= B:
                    ax.axis("off")
                    continue
                k = min(t, lengths[b] - 1)
                ax.add_patch(plt.Circle(obs_B_T_O[b, 0, 2:4], self.radius, color="tab:red", alpha=0.5))
                ax.plot(obs_B_T_O[b, : k + 1, 0], obs_B_T_O[b, : k + 1, 1], lw=0.8, color="gray")
                done = t >= lengths[b] - 1 and success_B[b] > 0
                ax.plot(*obs_B_T_O[b, k, :2], "o", color="tab:green" if done else "tab:blue", ms=4)
            fig.tight_layout(pad=0.2)
            fig.canvas.draw()
            frames.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]))
            plt.close(fig)
        if frames:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path).with_suffix(".tmp.gif")
            frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=120, loop=0)
            tmp.replace(path)

    def problems(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[int]:
        pool = self.initial_states.eval_ids if split == "test" else self.initial_states.train_ids
        n = len(pool) if n is None else n
        return [pool[i % len(pool)] for i in range(n)]
