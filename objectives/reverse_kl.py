"""Reverse KL, the full-distribution form of on-policy distillation (docs/objectives.md):
sum_t KL(pi_S(. | s_t) || pi_T(. | s_t)) on the student's own prefixes, i.e. JSD(beta=1) of jsd.py.

    objective: {type: reverse_kl, topk: 64}
"""

from __future__ import annotations

import random

from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest, Source
from mmdistill.objectives.jsd import check_divergence_args, divergence_loss
from mmdistill.registry import OBJECTIVES

__all__ = ["ReverseKL"]


@OBJECTIVES.register("reverse_kl")
class ReverseKL:
    """On-policy distillation, full-distribution form: sum_t KL(pi_S || pi_T) on the student's prefixes."""

    beta = 1.0

    def __init__(self, source: Source = "student", topk: int | None = None, temperature: float = 1.0):
        check_divergence_args(self.beta, topk, temperature)
        self.source, self.topk, self.temperature = source, topk, temperature
        self.needs = Needs(teacher=True, teacher_scores=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source=self.source)

    def prepare(self, rollout: Rollout) -> Rollout:
        return rollout

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        return divergence_loss(b, self.beta, self.topk)
