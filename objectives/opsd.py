"""On-policy self-distillation (OPSD; docs/objectives.md): the student, shown the reference solution
before the question, teaches itself without it.  The teacher side is the student's own current
weights (no gradient) on `rollout.teacher_view()`, whose context the adapter builds from
`privileged_template`; the loss is the per-token generalized JSD(beta) of jsd.py on the student's
own rollouts (beta 1 = reverse KL).

    objective: {type: opsd, beta: 1.0, privileged_template: "{solution}\\n{question}"}
"""

from __future__ import annotations

import random

from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.objectives.jsd import check_divergence_args, divergence_loss
from mmdistill.registry import OBJECTIVES

__all__ = ["OPSD"]


@OBJECTIVES.register("opsd")
class OPSD:
    """On-policy self-distillation: the student, shown the reference solution, teaches itself
    without it; per-token generalized JSD(beta) on the student's own rollouts (beta=1 reverse KL)."""

    def __init__(
        self,
        beta: float = 1.0,
        topk: int | None = None,
        temperature: float = 1.0,
        privileged_template: str = "{solution}\n{question}",
    ):
        check_divergence_args(beta, topk, temperature)
        if (
            "{question}" not in privileged_template
            or "{solution}" not in privileged_template
            and "{answer}" not in privileged_template
        ):
            raise ValueError(
                "objective.privileged_template must contain {question} and {solution} (or {answer}), "
                "e.g. 'Reference solution: {solution}\nNow solve: {question}'"
            )
        self.beta, self.topk, self.temperature = beta, topk, temperature
        self.privileged_template = privileged_template
        self.needs = Needs(self_teacher=True, teacher_scores=False)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source="student", privileged_template=self.privileged_template)

    def prepare(self, rollout: Rollout) -> Rollout:
        return rollout

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        return divergence_loss(b, self.beta, self.topk)
