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

    def __init__(self, num_states: int = 200, num_eval: int = 50, max_steps: int = 30, radius: float = 0.1, seed: int = 1234):
        if max_steps < 1 or radius <= 0:
            raise ValueError(f"task.max_steps must be >= 1 and task.radius > 0; got {max_steps}, {radius}")
        self.initial_states = point_mass_initial_states(num_states, num_eval, seed)
        self.max_steps, self.radius = max_steps, radius

    def make_env(self) -> PointMassEnv:
        return PointMassEnv(self.initial_states, self.max_steps, self.radius)

    def summary(self) -> str:
        s = self.initial_states
        return f"reach: point mass, {len(s.train_ids)} training / {len(s.eval_ids)} evaluation initial states, {self.max_steps} steps"

    def sample_train(self, rng: random.Random) -> int:
        return rng.choice(self.initial_states.train_ids)

    def problems(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[int]:
        pool = self.initial_states.eval_ids if split == "test" else self.initial_states.train_ids
        n = len(pool) if n is None else n
        return [pool[i % len(pool)] for i in range(n)]
