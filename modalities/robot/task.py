"""Robot tasks for training loops: an environment factory plus fixed initial states split into
training and evaluation sets (a "problem" is an initial-state index).

    task: {type: reach, num_states: 200, num_eval: 50, max_steps: 30}
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmdistill.errors import ConfigError
from mmdistill.modalities.robot.envs import PointMassEnv, point_mass_initial_states
from mmdistill.modalities.robot.libero import (
    OBSERVATION_MODES,
    LiberoEnv,
    check_disjoint,
    observation_spec,
    official_init_states,
    sample_train_states,
    suite_tasks,
)
from mmdistill.modalities.robot.protocols import (
    DEFAULT_PROTOCOL,
    NUM_INIT_STATES,
    get_protocol,
    state_dim,
    success_summary,
    unnormalize_action,
)
from mmdistill.registry import TASKS

# the arm's 7 joint angles in a flattened LIBERO sim state (entry 0 is the time, then the Panda's qpos first)
ARM_QPOS = slice(1, 8)


def load_action_stats(stats: dict[str, Any] | str | None, suite: str) -> dict[str, Any] | None:
    """Action statistics for un-normalisation: a mapping as given, or a JSON file read here (OpenVLA's
    dataset_statistics.json `{suite: {action: {...}}}`, or `{action: {...}}`, or the mapping itself)."""
    if stats is None:
        return None
    if isinstance(stats, dict):
        data = stats
    else:
        path = Path(stats)
        if not path.is_file():
            raise ConfigError(f"task.action_stats: {path} is not a file; give a JSON of q01/q99, min/max or mean/std")
        data = json.loads(path.read_text())
        for key in (suite, f"{suite}_no_noops"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
        data = data.get("action", data)
    try:  # checked now, not at the first step of the first episode
        shape = unnormalize_action(np.zeros(LiberoTask.action_dim), data).shape
    except ValueError:
        shape = None
    if shape != (LiberoTask.action_dim,):
        raise ConfigError(
            f"task.action_stats: statistics of {LiberoTask.action_dim} action dimensions needed (q01/q99, min/max "
            f"or mean/std); got { ({k: np.shape(v) for k, v in data.items()}) }"
        )
    return data


@TASKS.register("reach")
class ReachTask:
    """The built-in point-mass reaching task (2-D point, goal disc); the first `num_eval` initial
    states are for evaluation only."""

    obs_dim = PointMassEnv.obs_dim
    action_dim = PointMassEnv.action_dim

    def __init__(
        self,
        num_states: int = 200,
        num_eval: int = 50,
        max_steps: int = 30,
        radius: float = 0.1,
        seed: int = 1234,
        num_workers: int = 0,
    ):
        if max_steps < 1 or radius <= 0:
            raise ValueError(f"task.max_steps must be >= 1 and task.radius > 0; got {max_steps}, {radius}")
        if num_workers < 0:
            raise ValueError(
                f"task.num_workers must be >= 0 (0: environments in the training process); got {num_workers}"
            )
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

    def render_episodes(self, rollout, path) -> None:
        """An animated GIF of up to 16 episodes side by side: the point (blue, green once it
        succeeded), its trail and the goal disc (red)."""
        obs_B_T_O = rollout.steps["obs"]["observation.state"].cpu().numpy()
        mask_B_T, success_B = rollout.mask_B_T.cpu().numpy(), rollout.rewards_B.cpu().numpy()
        # lazy, as in the core's plots: pyplot is slow to import and only videos of the point mass need it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

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
        """The initial states of one split (`test`: the evaluation states, else the training ones): all
        of them, or the first `n`.  More than the split holds is a ConfigError, never a wrap-around."""
        pool = self.initial_states.eval_ids if split == "test" else self.initial_states.train_ids
        if n is not None and n > len(pool):
            fix = "task.num_eval" if split == "test" else "task.num_states"
            raise ConfigError(
                f"eval.n: {n} episodes asked of split {split!r}, which has {len(pool)} initial states; "
                f"set eval.n <= {len(pool)} or raise {fix}"
            )
        return pool if n is None else pool[:n]


@TASKS.register("libero")
class LiberoTask:
    """LIBERO simulations (modalities/robot/libero.py): one suite, some or all of its tasks.

    A problem is `(task_id, state)`.  Splits (`eval.split`):
    - `official` (alias `test`): LIBERO's official initial states, the first `num_eval` of the 50
      per task (default all 50), each used once: asking for more episodes than states is an error;
    - `heldout_layouts`: `num_heldout` layouts per task sampled from the task's placement sampler
      (seeds from `heldout_seed`), never official and never used for training: our own split;
    - `train`: `num_train` sampled layouts per task (seeds from `train_seed`), never official.
    Sampled layouts start the arm at one pose unless `start_noise` (radians, e.g. 0.02 as in the official
    states) perturbs its joint angles.
    `protocol` (modalities/robot/protocols.py) sets the step limit, the settle steps and action
    and the environment seed; `max_steps` / `settle_steps` override it.

    Observation (`observation`): `native` (default) is one agentview camera rendered at `image_size`
    (default 64) and the 8-D state; `protocol` is what the protocol's published checkpoints saw
    (libero.py `observation_spec`: its cameras at its resolution, its flip, resized to `image_size`,
    default the protocol's policy size, its state layout), with LeRobot's keys
    (`observation.images.image`, `observation.images.image2`; `camera_keys` renames one, e.g.
    `{robot0_eye_in_hand: observation.images.wrist_image}`).  Actions (`postprocess`): `clip` (default)
    clips to [-1, 1]; `protocol` applies the protocol's post-processing (gripper binarise / invert,
    un-normalisation with `action_stats` when given: `{q01, q99[, mask]}`, `{min, max}` or
    `{mean, std}`, or the path of a JSON file holding them, e.g. OpenVLA's dataset_statistics.json).

        task: {type: libero, suite: libero_object, tasks: [0], protocol: openvla, num_train: 100, num_workers: 2}
        task: {type: libero, suite: libero_object, protocol: lerobot, observation: protocol, image_size: 256}
    """

    obs_dim = 8  # observation.state (native; an instance's own under `observation: protocol`)
    action_dim = 7
    always_group = True
    control_freq = 20  # Hz, robosuite's default in LIBERO
    robot_type = "panda"
    SPLITS = ("official", "test", "heldout_layouts", "train")

    def __init__(
        self,
        suite: str = "libero_object",
        tasks: list[int] | str = "all",
        num_eval: int = NUM_INIT_STATES,
        num_train: int = 100,
        train_seed: int = 10_000,
        image_size: int | None = None,
        render: str = "decision",
        max_steps: int | None = None,
        settle_steps: int | None = None,
        num_workers: int = 0,
        protocol: str = DEFAULT_PROTOCOL,
        num_heldout: int = 0,
        heldout_seed: int = 900_000,
        observation: str = "native",
        postprocess: str = "clip",
        action_stats: dict[str, Any] | str | None = None,
        camera_keys: dict[str, str] | None = None,
        start_noise: float = 0.0,
    ):
        self.protocol = get_protocol(protocol)
        if not 0.0 <= start_noise <= 0.2:
            raise ConfigError(
                f"task.start_noise: {start_noise}; give the std in radians of the arm joints' start noise in [0, 0.2] "
                "(0.02 matches LIBERO's official states; 0: every sampled layout starts the arm at one pose)"
            )
        self.start_noise = float(start_noise)
        if observation not in OBSERVATION_MODES:
            raise ConfigError(
                f"task.observation: {observation!r}; choose native (one 64 px agentview camera, 8-D state) or "
                f"protocol (the cameras, sizes and state of protocol {self.protocol.name}'s checkpoints)"
            )
        if postprocess not in ("clip", "protocol"):
            raise ConfigError(
                f"task.postprocess: {postprocess!r}; choose clip (actions clipped to [-1, 1]) or protocol "
                f"(protocol {self.protocol.name}'s un-normalisation and gripper binarise / invert)"
            )
        if action_stats is not None and postprocess != "protocol":
            raise ConfigError("task.action_stats: un-normalises actions only with task.postprocess=protocol; set both")
        self.observation, self.postprocess = observation, postprocess
        self.spec = observation_spec(self.protocol if observation == "protocol" else None, image_size, camera_keys)
        self.obs_dim = state_dim(self.spec.state_layout)
        self.action_stats = load_action_stats(action_stats, suite)
        all_tasks = suite_tasks(suite)
        ids = list(range(len(all_tasks))) if tasks == "all" else [int(t) for t in tasks]
        bad = [t for t in ids if not 0 <= t < len(all_tasks)]
        if bad or not ids:
            raise ValueError(f"task.tasks: {suite} has tasks 0..{len(all_tasks) - 1}; got {tasks}")
        if not 0 < num_eval <= NUM_INIT_STATES or num_train < 1 or num_heldout < 0:
            raise ValueError(
                f"task.num_eval must be in 1..{NUM_INIT_STATES} (LIBERO's fixed initial states), task.num_train >= 1 "
                f"and task.num_heldout >= 0; got {num_eval}, {num_train}, {num_heldout}"
            )
        if num_workers < 0:
            raise ValueError(
                f"task.num_workers must be >= 0 (0: environments in the training process); got {num_workers}"
            )
        self.suite, self.task_ids, self.num_workers = suite, ids, num_workers
        self.image_size, self.render = self.spec.image_size, render
        self.max_steps = int(max_steps or self.protocol.steps_for(suite))
        self.settle_steps = self.protocol.settle_steps if settle_steps is None else int(settle_steps)
        self.languages = {t: all_tasks[t].language for t in ids}
        self.num_eval, self.num_train, self.train_seed = num_eval, num_train, train_seed
        self.num_heldout, self.heldout_seed = num_heldout, heldout_seed
        self._states: dict[int, tuple] | None = None

    @property
    def states(self) -> dict[int, tuple]:
        """Per task `(eval_states [num_eval, S], train_states [num_train, S][, heldout [num_heldout, S]])`;
        sampled layouts are made (and cached on disk) on first use, so building the task is cheap."""
        if self._states is None:
            self._states = {}
            for t in self.task_ids:
                ev = official_init_states(self.suite, t)[: self.num_eval]
                train = sample_train_states(self.suite, t, self.num_train, self.train_seed + 1000 * t, ev)
                train = self._perturb_arm(train, self.train_seed + 1000 * t)
                self._states[t] = (ev, train)
                if self.num_heldout:
                    held = sample_train_states(self.suite, t, self.num_heldout, self.heldout_seed + 1000 * t, ev)
                    held = self._perturb_arm(held, self.heldout_seed + 1000 * t)
                    check_disjoint(train, held, what="held-out", other="training")
                    self._states[t] = (ev, train, held)
        return self._states

    def _perturb_arm(self, states: np.ndarray, seed: int) -> np.ndarray:
        """Sampled layouts with Gaussian noise of std `start_noise` (radians) on the arm's 7 joint angles, as
        robosuite's `initialization_noise` gave LIBERO's official states (std 0.018-0.021 rad per joint across
        the 50 states of LIBERO-Object task 0; the hand starts up to ~3.5 cm apart); the placement sampler
        alone starts every layout at one pose.  Drawn from `seed`, so a layout is the same in every run."""
        if not self.start_noise:
            return states
        out = states.copy()
        noise = np.random.default_rng(seed).normal(0.0, self.start_noise, (len(states), ARM_QPOS.stop - ARM_QPOS.start))
        out[:, ARM_QPOS] += noise
        return out

    def make_env(self) -> Any:
        return LiberoEnv(
            self.suite,
            self.states,
            self.image_size,
            self.render,
            self.max_steps,
            self.settle_steps,
            settle_action=self.protocol.settle_action,
            env_seed=self.protocol.env_seed,
            observation=self.spec,
            postprocess=self.protocol if self.postprocess == "protocol" else None,
            action_stats=self.action_stats,
        )

    def summary(self) -> str:
        held = f" / {self.num_heldout} held-out layouts" if self.num_heldout else ""
        return (
            f"libero: {self.suite} tasks {self.task_ids}, protocol {self.protocol.name}, {self.num_train} training / "
            f"{self.num_eval} official{held} initial states per task, {self.max_steps} steps, "
            f"render={self.render} at {self.image_size}px" + self._io_summary()
        )

    def _io_summary(self) -> str:
        """The non-default observation and action post-processing, for the summary line."""
        out = ""
        if self.observation == "protocol":
            s = self.spec
            out += f", observation {s.keys} rendered at {s.render_size}px, state {self.obs_dim}-D"
        if self.postprocess == "protocol":
            p = self.protocol
            unnorm = "un-normalised, " if self.action_stats is not None else ""
            out += f", actions {unnorm}gripper binarise={p.gripper_binarize} invert={p.gripper_invert}"
        return out

    def language(self, problem: Any) -> str:
        return self.languages[int(problem[0])]

    def group_of(self, problem: Any) -> str:
        return f"{self.suite}/{int(problem[0])}"

    def sample_train(self, rng: random.Random) -> tuple[int, int]:
        """A training problem: never an official (evaluation) or held-out state index."""
        return (rng.choice(self.task_ids), self.num_eval + rng.randrange(self.num_train))

    def _pool(self, split: str) -> tuple[list[tuple[int, int]], str]:
        if split in ("official", "test"):
            first, count, fix = 0, self.num_eval, f"task.num_eval (at most {NUM_INIT_STATES} official states per task)"
        elif split == "heldout_layouts":
            first, count, fix = self.num_eval + self.num_train, self.num_heldout, "task.num_heldout"
        elif split == "train":
            first, count, fix = self.num_eval, self.num_train, "task.num_train"
        else:
            raise ConfigError(f"eval.split: {split!r} is not a LIBERO split; choose one of {', '.join(self.SPLITS)}")
        return [(t, first + s) for s in range(count) for t in self.task_ids], fix

    def problems(self, split: str = "official", n: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
        """The problems of one split (see the class docstring), interleaved over tasks: all of them,
        or the first `n`.  More than the split holds is a ConfigError, never a wrap-around."""
        pool, fix = self._pool(split)
        if n is None:
            return pool
        if n > len(pool):
            raise ConfigError(
                f"eval.n: {n} episodes asked of split {split!r}, which has {len(pool)} initial states "
                f"({len(self.task_ids)} tasks x {len(pool) // len(self.task_ids)}); set eval.n <= {len(pool)} or raise {fix}"
            )
        return pool[:n]

    def success_report(self, problems: list, successes: list[float], split: str = "official") -> dict[str, Any]:
        """Success per task and per suite with Wilson 95% intervals, and the split and protocol
        they were measured under (for report.json)."""
        by_task: dict[str, list[float]] = {}
        for p, ok in zip(problems, successes):
            by_task.setdefault(self.group_of(p), []).append(float(ok))
        return {
            "split": "official" if split == "test" else split,
            "protocol": self.protocol.name,
            "observation": self.observation,  # native: one 64 px camera; protocol: the checkpoints' cameras and state
            "postprocess": self.postprocess,
            "max_steps": self.max_steps,
            "success_by_task_ci": {g: success_summary(v) for g, v in sorted(by_task.items())},
            "success_by_suite_ci": {self.suite: success_summary([float(x) for x in successes])},
        }

    def render_episodes(self, rollout: Any, path: Any) -> None:
        """An animated GIF of up to 8 episodes side by side, one frame per decision (the camera
        images the policy saw), the border green once an episode succeeded."""
        imgs = rollout.steps["obs"].get("observation.images.image")
        if imgs is None:
            return
        B = min(len(imgs), 8)
        imgs = imgs[:B].cpu().numpy()
        lengths = rollout.mask_B_T[:B].sum(1).long().tolist()
        ok = rollout.rewards_B[:B].tolist()
        H, W = imgs.shape[-2:]
        frames = []
        for t in range(max(lengths) if B else 0):
            canvas = np.full((H + 4, B * (W + 4), 3), 255, np.uint8)
            for b in range(B):
                k = min(t, lengths[b] - 1)
                if t >= lengths[b] - 1:
                    canvas[:, b * (W + 4) : (b + 1) * (W + 4)] = (40, 160, 60) if ok[b] else (200, 50, 50)
                canvas[2 : 2 + H, b * (W + 4) + 2 : b * (W + 4) + 2 + W] = imgs[b, k].transpose(1, 2, 0)
            frames.append(Image.fromarray(canvas).resize((canvas.shape[1] * 2, canvas.shape[0] * 2), Image.NEAREST))
        if frames:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path).with_suffix(".tmp.gif")
            frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=150, loop=0)
            tmp.replace(path)
