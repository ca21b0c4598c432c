"""Verifiable text tasks: problems with a gold answer, a target solution and a 0/1 reward.

Every task has the same small surface (no base class; duck typing as in a Protocol):

    problems(split, n=None, seed=0) -> list[Problem]   # "train" / "test", deterministic per seed
    reward(problem, completion) -> float               # 1.0 correct, 0.0 wrong (via verify.is_correct)
    vocabulary() -> list[str]                          # tokens the task's texts can contain
    texts(n=2000) -> list[str]                         # questions and solutions a tokenizer must cover

`problems` never repeats a problem: asking for more than a split holds returns the whole split
(each problem once) and prints one `note:` line saying how many were used. A bad value the user
can give (a split name, a task key) raises a `ConfigError` naming the key, the value and the fix.

Tasks are built from plain keyword arguments, so a YAML block such as
`task: {type: arith, difficulty: 2, max_value: 20}` maps straight onto them.

    python -c "from mmdistill.modalities.text.tasks import ArithTask; print(ArithTask(difficulty=2).problems('test', 2))"
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from mmdistill.errors import ConfigError

SPLITS = ("train", "test")
_NOTED: set[str] = set()


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

    def texts(self, n: int = 2000) -> list[str]: ...


def check_split(split: str, key: str = "split") -> None:
    """Raise a ConfigError naming the allowed splits when `split` is not one of them."""
    if split not in SPLITS:
        raise ConfigError(f"{key}={split!r} is not a split; use one of {list(SPLITS)}")


def note(message: str) -> None:
    """Print `note: message` on stderr, once per process for each message."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"note: {message}", file=sys.stderr)


def check_n(n: Any) -> None:
    """Refuse a problem count that is not an integer >= 0 (None means the whole split)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ConfigError(f"n={n!r} must be an integer >= 0 (or None for the whole split)")


def capped(n: int, size: int, what: str) -> int:
    """`n`, or `size` with a one-line note when `n` asks for more problems than `what` holds."""
    if n > size:
        note(f"{what} has {size} problems; asked for {n}, using each once ({size})")
        return size
    return n


T = TypeVar("T")


def draw(items: Sequence[T], n: int | None, rng: random.Random, what: str = "the split") -> list[T]:
    """`n` distinct items of `items` in random order (every item, shuffled, when n is None).

    An item never repeats: n larger than len(items) returns every item once, with a one-line
    note naming `what` and how many were used; n > 0 of an empty sequence raises a ConfigError.
    """
    check_n(n)
    if n is None:
        n = len(items)
    if n > 0 and not items:
        raise ConfigError(f"{what} is empty; there is no problem to draw")
    return rng.sample(list(items), capped(n, len(items), what))


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
    "capped",
    "check_n",
    "check_split",
    "note",
    "SPLITS",
]
