"""The `shapes` text-to-image task for training loops: prompts with routing tags, rendered
training images, and pixel rewards (a miniature GenEval; see `shapes`).

Every training prompt carries a tag, the name of the reward it is trained for ("color" or
"position"): GRPO-mix scores a prompt by its tag's reward, Flow-OPD routes it to the teacher
of its tag.  `reward` picks the training reward: one of the rewards, their mean ("avg"),
or each prompt's own tag ("tag").

    task: {type: shapes, reward: color}
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mmdistill.modalities.flow import shapes as S
from mmdistill.modalities.flow.rewards import ClipScore
from mmdistill.registry import TASKS

REWARDS = ("color", "position")  # trainable by tag; "count" is also reported at evaluation


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
        random.Random(1).shuffle(self._train)

    def vocabulary(self) -> list[str]:
        return list(S.VOCABULARY)

    def summary(self) -> str:
        return (
            f"shapes: {len(self._train)} train / {len(self._test)} held-out prompts, tags {self.tags}, "
            f"training reward '{self.reward}'"
        )

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
        return {
            "color": S.color_reward(images, scenes),
            "position": S.position_reward(images, scenes),
            "count": S.count_reward(images, scenes),
        }

    def train_reward(self, problems: list[ShapesProblem], rewards: dict[str, np.ndarray]) -> np.ndarray:
        if self.reward == "avg":
            return (rewards["color"] + rewards["position"]) / 2
        if self.reward == "tag":
            return np.array([rewards[p.tag][i] for i, p in enumerate(problems)], dtype=np.float32)
        return rewards[self.reward]


# ----------------------------------------------------------------------------- prompt files + CLIP


@dataclass(frozen=True)
class PromptProblem:
    prompt: str
    tag: str


@TASKS.register("t2i_prompts")
class PromptsTask:
    """Text-to-image prompts from a file (.txt: one per line; .jsonl: {"prompt": ..., "tag": ...}),
    scored by named rewards (`rewards: {clip: {arch: ViT-B-32, weights: /path/open_clip.bin}}`).
    Without `test_path`, a stable hash of the prompt holds out `test_fraction` of them."""

    def __init__(
        self,
        path: str,
        rewards: dict[str, dict] | None = None,
        reward: str = "tag",
        test_path: str | None = None,
        test_fraction: float = 0.1,
        default_tag: str = "clip",
    ):
        def read(p: str) -> list[PromptProblem]:
            out = []
            for i, line in enumerate(Path(p).read_text().splitlines(), 1):
                line = line.strip()
                if not line:
                    continue
                if p.endswith(".jsonl"):
                    try:
                        row = json.loads(line)
                        out.append(PromptProblem(str(row["prompt"]), str(row.get("tag", default_tag))))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(
                            f"{p}:{i}: expected a JSON object with a 'prompt' key; fix or remove the line"
                        ) from None
                else:
                    out.append(PromptProblem(line, default_tag))
            if not out:
                raise ValueError(f"{p}: no prompts found")
            return out

        rows = read(path)
        if test_path is not None:
            self._train, self._test = rows, read(test_path)
        else:

            def held_out(p: PromptProblem) -> bool:
                return int.from_bytes(hashlib.sha256(p.prompt.encode()).digest()[:8], "big") / 2**64 < test_fraction

            self._train = [p for p in rows if not held_out(p)]
            self._test = [p for p in rows if held_out(p)] or rows[:1]
        self.reward_specs = rewards if rewards is not None else {"clip": {}}
        for name, spec in self.reward_specs.items():
            if spec.get("type", "clip") != "clip":
                raise ValueError(
                    f"task.rewards.{name}.type: only 'clip' (open_clip CLIP score) is built in; got {spec.get('type')!r}"
                )
        tags = {p.tag for p in self._train}
        if reward == "tag" and not tags <= set(self.reward_specs):
            raise ValueError(
                f"task.reward 'tag': prompts are tagged {sorted(tags)} but the rewards are {sorted(self.reward_specs)}; name one reward per tag"
            )
        if reward not in ("tag", "avg", *self.reward_specs):
            raise ValueError(f"task.reward must be 'tag', 'avg' or one of {sorted(self.reward_specs)}; got {reward!r}")
        self.reward = reward
        self._models: dict[str, object] = {}

    def vocabulary(self) -> list[str]:
        words = {w for p in self._train + self._test for w in p.prompt.lower().split()}
        return sorted(w for w in words if w.isalnum() and w.isascii())

    def summary(self) -> str:
        return f"t2i_prompts: {len(self._train)} train / {len(self._test)} held-out prompts, rewards {sorted(self.reward_specs)}"

    def sample_train(self, rng: random.Random) -> PromptProblem:
        return rng.choice(self._train)

    def problems(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[PromptProblem]:
        pool = self._test if split == "test" else self._train
        n = len(pool) if n is None else n
        return [pool[i % len(pool)] for i in range(n)]

    def render(self, problems, seed: int = 0, size: int = 16):
        raise ValueError(
            "t2i_prompts has no images to train on; use flow_matching with source: teacher, or start from a trained pipeline"
        )

    def rewards(self, problems: list[PromptProblem], images) -> dict[str, np.ndarray]:
        out = {}
        for name, spec in self.reward_specs.items():
            if name not in self._models:
                args = {k: v for k, v in spec.items() if k != "type"}
                self._models[name] = ClipScore(**args, device=images.device, name=name)
            out[name] = self._models[name](images, [p.prompt for p in problems])
        return out

    def train_reward(self, problems: list[PromptProblem], rewards: dict[str, np.ndarray]) -> np.ndarray:
        if self.reward == "avg":
            return np.mean(list(rewards.values()), axis=0)
        if self.reward == "tag":
            return np.array([rewards[p.tag][i] for i, p in enumerate(problems)], dtype=np.float32)
        return rewards[self.reward]
