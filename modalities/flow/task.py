"""The `shapes` text-to-image task for training loops: prompts with routing tags, rendered
training images, and pixel rewards (a miniature GenEval; see `shapes`).

Every training prompt carries a tag, the name of the reward it is trained for ("color" or
"position"): GRPO-mix scores a prompt by its tag's reward, Flow-OPD routes it to the teacher
of its tag.  `reward` picks the training reward: one of the rewards, their mean ("avg"),
or each prompt's own tag ("tag").

    task: {type: shapes, reward: color}
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mmdistill.modalities.flow import shapes as S
from mmdistill.registry import TASKS

REWARDS = ("color", "position")


@dataclass(frozen=True)
class ShapesProblem:
    scene: S.ShapesPrompt
    tag: str  # the reward / teacher this prompt is routed to

    @property
    def prompt(self) -> str:
        return self.scene.text


@TASKS.register("shapes")
class ShapesTask:
    """Two coloured shapes and a spatial relation; held-out scenes are never trained on."""

    def __init__(
        self,
        reward: Literal["color", "position", "avg", "tag"] = "tag",
        tags: list[str] | None = None,
        test_fraction: float = 0.25,
    ):
        self.tags = list(tags) if tags is not None else list(REWARDS)
        bad = [t for t in self.tags if t not in REWARDS]
        if bad or not self.tags:
            raise ValueError(f"task.tags must be a non-empty subset of {list(REWARDS)}; got {self.tags}")
        if reward not in (*REWARDS, "avg", "tag"):
            raise ValueError(f"task.reward must be one of {[*REWARDS, 'avg', 'tag']}; got {reward!r}")
        if not 0 < test_fraction < 1:
            raise ValueError(f"task.test_fraction must lie in (0, 1); got {test_fraction}")
        self.reward, self.test_fraction = reward, test_fraction
        self._train = S.split_prompts("train", test_fraction)
        self._test = S.split_prompts("test", test_fraction)
        random.Random(0).shuffle(self._test)  # a fixed order that mixes colours and relations (grids, small n)

    def vocabulary(self) -> list[str]:
        return list(S.VOCABULARY)

    def summary(self) -> str:
        return (f"shapes: {len(self._train)} train / {len(self._test)} held-out prompts, tags {self.tags}, "
                f"training reward '{self.reward}'")

    def sample_train(self, rng: random.Random) -> ShapesProblem:
        return ShapesProblem(rng.choice(self._train), rng.choice(self.tags))

    def problems(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[ShapesProblem]:
        """Every prompt of the split in a fixed order, cycled up to `n` (each repeat gets other noise)."""
        pool = self._test if split == "test" else self._train
        n = len(pool) if n is None else n
        return [ShapesProblem(pool[i % len(pool)], self.tags[i % len(self.tags)]) for i in range(n)]

    def render(self, problems: list[ShapesProblem], seed: int = 0, size: int = 16) -> np.ndarray:
        """Training images `[B, 3, size, size]` in [0, 1] that satisfy each prompt."""
        return S.render_batch([p.scene for p in problems], seed=seed, size=size)

    def rewards(self, problems: list[ShapesProblem], images) -> dict[str, np.ndarray]:
        scenes = [p.scene for p in problems]
        return {"color": S.color_reward(images, scenes), "position": S.position_reward(images, scenes)}

    def train_reward(self, problems: list[ShapesProblem], rewards: dict[str, np.ndarray]) -> np.ndarray:
        if self.reward == "avg":
            return (rewards["color"] + rewards["position"]) / 2
        if self.reward == "tag":
            return np.array([rewards[p.tag][i] for i, p in enumerate(problems)], dtype=np.float32)
        return rewards[self.reward]
