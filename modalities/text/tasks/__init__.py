"""Verifiable text tasks: problems with a gold answer, a target solution and a 0/1 reward.

Every task has the same small surface (no base class; duck typing as in a Protocol):

    problems(split, n=None, seed=0) -> list[Problem]   # "train" / "test", deterministic per seed
    reward(problem, completion) -> float               # 1.0 correct, 0.0 wrong (via verify.is_correct)
    vocabulary() -> list[str]                          # tokens the task's texts can contain

Tasks are built from plain keyword arguments, so a YAML block such as
`task: {type: arith, difficulty: 2, max_value: 20}` maps straight onto them.

    python -c "from mmdistill.modalities.text.tasks import ArithTask; print(ArithTask(difficulty=2).problems('test', 2))"
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Problem:
    """One problem: what the model sees, the gold answer, and the completion it should write."""

    question: str  # the prompt text shown to the model (no answer)
    answer: str  # canonical final answer, e.g. "42", "-3", "3/4"
    solution: str  # full target completion, ending with the line "#### <answer>"
    meta: dict = field(default_factory=dict, hash=False)  # difficulty, split, source line, ...

    def dataset_ids(self, tokenizer: Any) -> list[int]:
        """The gold completion as token ids, then the end token (a `source: dataset` rollout)."""
        return tokenizer(self.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@runtime_checkable
class TextTask(Protocol):
    """What a text task can do: the core's `Task` (problems, sample_train, summary) plus a verifier
    and a vocabulary; any object with these methods is a text task."""

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]: ...

    def sample_train(self, rng: random.Random) -> Problem: ...

    def summary(self) -> str: ...

    def reward(self, problem: Problem, completion: str) -> float: ...

    def vocabulary(self) -> list[str]: ...


def check_split(split: str, key: str = "split") -> None:
    """Raise a ValueError naming the allowed splits when `split` is not one of them."""
    if split not in SPLITS:
        raise ValueError(f"{key}={split!r} is not a split; use one of {list(SPLITS)}")


T = TypeVar("T")


def draw(items: Sequence[T], n: int | None, rng: random.Random) -> list[T]:
    """`n` items of `items` in random order: without replacement while n <= len(items).

    n=None returns every item (shuffled). When n exceeds len(items), whole shuffled
    passes over `items` are concatenated, so each item appears floor or ceil(n/len) times.
    """
    if n is None:
        n = len(items)
    if n < 0:
        raise ValueError(f"n={n} must be >= 0 (or None for the whole split)")
    if n > 0 and not items:
        raise ValueError(f"asked for n={n} items from an empty split")
    out: list[T] = []
    while len(out) < n:
        take = min(n - len(out), len(items))
        out.extend(rng.sample(list(items), take))
    return out


# The task modules import Problem / draw from this package, so they are imported last.
from .arith import ArithTask  # noqa: E402
from .jsonl_math import JsonlMathTask  # noqa: E402
from .verify import answers_match, extract_answer, is_correct  # noqa: E402

__all__ = [
    "Problem",
    "TextTask",
    "ArithTask",
    "JsonlMathTask",
    "extract_answer",
    "answers_match",
    "is_correct",
    "draw",
    "check_split",
    "SPLITS",
]
