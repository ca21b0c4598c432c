"""The `teacher_shards` task: training problems are a teacher's stored completions (Lightning OPD's
precomputed shards, `modalities/text/shards.py`); evaluation, rewards and vocabulary come from the
underlying task.

    task: {type: teacher_shards, shards: runs/lightning_opd/teacher_logprobs/shards, task: {type: arith, difficulty: 2}}

With `objective: {source: dataset}` the rollout is the stored completions themselves (token ids as
the teacher wrote them); a `kind: stored_logits` teacher over the same shards scores them.  The
shards are read (and checked against the manifest) on first use, so a precompute stage earlier in
the same run may write them.

Damage (`task.damaged`): with `error` (the default) a damaged sample (truncated or missing shard,
changed bytes, a manifest that does not match) stops the run with one line naming the shard, the
sample and the fix (re-run the precompute stage: it rewrites only the damaged shards); with `skip`
the run trains on every intact sample and prints how many it skipped (`TeacherShardsTask.skipped`).

    python -m pytest tests/test_lightning.py tests/test_corrupt_shards.py -q
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmdistill.errors import ConfigError
from mmdistill.modalities.text import shards as shards_mod
from mmdistill.modalities.text.tasks import check_split, draw
from mmdistill.registry import TASKS
from mmdistill.train import build_task


@dataclass(frozen=True, eq=False)
class ShardProblem:
    """A training problem read from the shards: the prompt and the teacher's completion token ids."""

    question: str
    answer: str
    solution: str
    completion_ids: np.ndarray  # [T] int32, ends with the end token unless cut at max_new_tokens
    meta: dict = field(default_factory=dict)  # "key" (the sample's key in the shards), "teacher_reward"

    def dataset_ids(self, tokenizer: Any) -> np.ndarray:
        """The stored completion as written by the teacher (a `source: dataset` rollout)."""
        return self.completion_ids


@TASKS.register("teacher_shards")
class TeacherShardsTask:
    """Training problems from precomputed teacher shards; evaluation, rewards and vocabulary from
    the underlying `task`."""

    def __init__(self, shards: str, task: dict[str, Any], damaged: str = "error"):
        if not isinstance(task, dict) or "type" not in task:
            raise ConfigError("task.task: give the underlying task's spec, e.g. {type: arith, difficulty: 2}")
        if task["type"] == "teacher_shards":
            raise ConfigError("task.task.type: the underlying task of teacher_shards cannot itself be teacher_shards")
        if damaged not in shards_mod.DAMAGED_POLICIES:
            raise ConfigError(
                f"task.damaged: {damaged!r} is not one of {', '.join(shards_mod.DAMAGED_POLICIES)} (error stops at a "
                "damaged teacher sample, skip trains without it)"
            )
        self.shards_dir = Path(shards)
        self.damaged = damaged
        self.skipped: list[shards_mod.Damage] = []  # the damaged samples left out (damaged: skip)
        self.spec = dict(task)
        self.base = build_task(task)
        self._manifest: dict | None = None
        self._train: list[ShardProblem] | None = None

    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = shards_mod.read_manifest(self.shards_dir, "task.shards")
        return self._manifest

    def _load(self) -> list[ShardProblem]:
        if self._train is None:
            good, self.skipped = shards_mod.read_samples(self.shards_dir, self.manifest(), self.damaged, "task.damaged")
            if self.skipped:
                hit = sorted({d.shard for d in self.skipped})
                print(
                    f"warning: task.damaged: skip: left out {len(self.skipped)} damaged teacher samples of "
                    f"{', '.join(hit)} in {self.shards_dir}; training on the {len(good)} intact ones",
                    file=sys.stderr,
                )
            self._train = [
                ShardProblem(
                    meta["question"],
                    meta.get("answer", ""),
                    meta.get("solution", ""),
                    arrays["completion_ids"],
                    meta={"key": key, "teacher_reward": meta.get("teacher_reward")},
                )
                for key, meta, arrays in good
            ]
        return self._train

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list:
        check_split(split)
        if split != "train":
            return self.base.problems(split, n, seed=seed)
        pool = self._load()
        what = f"the teacher shards in {self.shards_dir}"
        return list(pool) if n is None else draw(pool, n, random.Random(f"teacher_shards:{seed}"), what)

    def sample_train(self, rng: random.Random) -> ShardProblem:
        return rng.choice(self._load())

    def reward(self, problem: Any, completion: str) -> float:
        return self.base.reward(problem, completion)

    def vocabulary(self) -> list[str]:
        return self.base.vocabulary()

    def texts(self, n: int = 2000) -> list[str]:
        """The underlying task's texts (the shards hold token ids of the same tokenizer)."""
        return self.base.texts(n)

    def summary(self) -> str:
        return f"teacher shards in {self.shards_dir} over {self.base.summary() or repr(self.base)}"

    def __repr__(self) -> str:
        return f"TeacherShardsTask(shards={str(self.shards_dir)!r}, task={self.spec!r}, damaged={self.damaged!r})"
