"""A mixture of text tasks whose problems carry a routing tag (multi-teacher distillation by task).

    task: {type: mixture, tasks: {add: {type: arith, ops: "+"}, sub: {type: arith, ops: "-"}}}

Every problem's `meta["tag"]` names the task it came from; a stage with
`teachers: {add: teacher_add, sub: teacher_sub}` routes each problem to its tag's teacher.
Training problems are drawn task by task with probability `weights` (default equal); test
problems are the tasks' own, `n` split evenly, so every task is measured on its held-out side.

    python -c "from mmdistill.modalities.text.tasks.mixture import MixtureTask; t = MixtureTask({'a': {'type': 'arith'}}); print(t.problems('test', 2))"
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from mmdistill.errors import ConfigError
from mmdistill.registry import TASKS
from mmdistill.train import build_task

from . import Problem, check_n, check_split


@TASKS.register("mixture")
class MixtureTask:
    """Problems from several tasks, each tagged with its task's name."""

    def __init__(self, tasks: dict[str, dict[str, Any]], weights: dict[str, float] | None = None):
        if not isinstance(tasks, dict) or not tasks:
            raise ConfigError("task.tasks is empty; give {tag: task spec}, e.g. {add: {type: arith, ops: '+'}}")
        for tag, spec in tasks.items():
            if not isinstance(spec, dict) or "type" not in spec:
                raise ConfigError(
                    f"task.tasks.{tag}={spec!r} is not a task spec; give {{type: NAME, ...}}, e.g. {{type: arith}}"
                )
        self.tasks = {tag: build_task(spec) for tag, spec in tasks.items()}
        weights = weights or {tag: 1.0 for tag in tasks}
        if (
            not isinstance(weights, dict)
            or set(weights) != set(tasks)
            or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf")
                for w in weights.values()
            )
            or sum(weights.values()) <= 0
        ):
            raise ConfigError(
                f"task.weights={weights!r} must give a finite non-negative weight to each of {sorted(tasks)} (not all 0)"
            )
        total = sum(weights.values())
        self.weights = {tag: w / total for tag, w in weights.items()}

    @staticmethod
    def _tagged(p: Problem, tag: str) -> Problem:
        return dataclasses.replace(p, meta={**p.meta, "tag": tag})

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        """`n` problems split evenly over the tasks (each task caps its share at its split, with a note)."""
        check_split(split)
        check_n(n)
        tags = list(self.tasks)
        out: list[Problem] = []
        for i, tag in enumerate(tags):
            k = None if n is None else n // len(tags) + (1 if i < n % len(tags) else 0)
            out += [self._tagged(p, tag) for p in self.tasks[tag].problems(split, k, seed=seed)]
        return out

    def sample_train(self, rng: random.Random) -> Problem:
        tag = rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        task = self.tasks[tag]
        return self._tagged(task.sample_train(rng), tag)

    def reward(self, problem: Problem, completion: str) -> float:
        tag = problem.meta.get("tag")
        if tag not in self.tasks:
            raise ValueError(f"problem has tag {tag!r}, not one of this mixture's tasks {sorted(self.tasks)}")
        return self.tasks[tag].reward(problem, completion)

    def vocabulary(self) -> list[str]:
        return sorted(set().union(*(t.vocabulary() for t in self.tasks.values())))

    def texts(self, n: int = 2000) -> list[str]:
        """Each task's `texts`, `n` problems split evenly over the tasks."""
        return [t for task in self.tasks.values() for t in task.texts(max(1, n // len(self.tasks)))]

    def summary(self) -> str:
        return "mixture of " + ", ".join(f"{tag} ({w:.2f})" for tag, w in self.weights.items())
