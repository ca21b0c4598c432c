"""Environments for on-policy robot distillation: a gymnasium-style protocol, fixed initial
states split into training and evaluation sets, and the built-in point-mass reaching task.

Point mass: a 2-D point must reach a goal disc.  Observation `[x, y, gx, gy]`, action a 2-D
velocity clipped to [-1, 1], position += 0.1 * action; success when within `radius` of the goal;
episodes end on success or after `max_steps`.  Initial states (start, goal) are drawn once from
a fixed seed; the first `num_eval` are the evaluation states and training never uses them.

    python -c "from mmdistill.modalities.robot.envs import PointMassEnv; e = PointMassEnv(); print(e.reset(init_state=0))"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Env(Protocol):
    """One environment.  `reset(init_state)` -> obs; `step(action)` -> (obs, reward, done, info)
    with `info["success"]`.  Observations and actions are float32 numpy vectors."""

    obs_dim: int
    action_dim: int
    max_steps: int

    def reset(self, init_state: int) -> np.ndarray: ...

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict[str, Any]]: ...

    def state(self) -> dict[str, np.ndarray]:
        """Privileged simulator state for scripted experts."""
        ...


@dataclass(frozen=True)
class InitialStates:
    """Fixed initial states `[N, ...]`, indices `< num_eval` reserved for evaluation."""

    starts_N_2: np.ndarray
    goals_N_2: np.ndarray
    num_eval: int

    @property
    def train_ids(self) -> list[int]:
        return list(range(self.num_eval, len(self.starts_N_2)))

    @property
    def eval_ids(self) -> list[int]:
        return list(range(self.num_eval))


def point_mass_initial_states(n: int = 200, num_eval: int = 50, seed: int = 1234) -> InitialStates:
    if not 0 < num_eval < n:
        raise ValueError(f"need 0 < num_eval < n initial states; got num_eval={num_eval}, n={n}")
    rng = np.random.default_rng(seed)
    starts = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    goals = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    far = np.linalg.norm(goals - starts, axis=1) < 0.5  # every task needs a few steps
    goals[far] = -starts[far] * 0.9
    return InitialStates(starts, goals, num_eval)


class PointMassEnv:
    obs_dim = 4
    action_dim = 2

    def __init__(
        self,
        initial_states: InitialStates | None = None,
        max_steps: int = 30,
        radius: float = 0.1,
        step_size: float = 0.1,
    ):
        self.initial_states = initial_states if initial_states is not None else point_mass_initial_states()
        self.max_steps, self.radius, self.step_size = max_steps, radius, step_size
        self.pos = np.zeros(2, np.float32)
        self.goal = np.zeros(2, np.float32)
        self.t = 0

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.pos, self.goal]).astype(np.float32)

    def reset(self, init_state: int) -> np.ndarray:
        s = self.initial_states
        if not 0 <= init_state < len(s.starts_N_2):
            raise ValueError(f"init_state {init_state} out of range [0, {len(s.starts_N_2)})")
        self.pos, self.goal, self.t = s.starts_N_2[init_state].copy(), s.goals_N_2[init_state].copy(), 0
        return self._obs()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict[str, Any]]:
        a = np.clip(np.asarray(action, np.float32).reshape(2), -1, 1)
        self.pos = np.clip(self.pos + self.step_size * a, -1.5, 1.5).astype(np.float32)
        self.t += 1
        success = bool(np.linalg.norm(self.pos - self.goal) < self.radius)
        done = success or self.t >= self.max_steps
        return self._obs(), float(success), done, {"success": success}

    def state(self) -> dict[str, np.ndarray]:
        return {"pos": self.pos.copy(), "goal": self.goal.copy()}
