"""A tiny deterministic robot task with a camera and a language instruction, for tests of
policies that need images or text (flow heads, tokenised actions) without a simulator."""

from __future__ import annotations

import numpy as np


class CameraEnv:
    """A tiny deterministic environment with a camera: the image and state drift with the actions."""

    action_dim = 7

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def _obs(self):
        img = (np.arange(3 * 32 * 32).reshape(3, 32, 32) * (3 + self.state[0]) % 255).astype(np.uint8)
        return {"observation.state": self.state.astype(np.float32), "observation.images.image": img}

    def reset(self, problem):
        self.state, self.t = np.full(8, 0.1 * problem, np.float32), 0
        return self._obs()

    def step(self, chunk):
        a = np.asarray(chunk).reshape(-1, 7)
        self.state = self.state + 0.01 * np.resize(a.sum(0), 8)
        self.t += len(a)
        done = self.t >= self.max_steps
        return self._obs(), 0.0, done, {"success": False}


class CameraTask:
    obs_dim, action_dim, max_steps, num_workers = 8, 7, 6, 0
    languages = {0: "reach the goal"}

    def make_env(self):
        return CameraEnv(self.max_steps)

    def language(self, problem):
        return "reach the goal"

    def problems(self, split="test", n=None, seed=0):
        return list(range(n or 2))
