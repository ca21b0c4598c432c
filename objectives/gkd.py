"""GKD (Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes", arXiv 2306.13649; docs/objectives.md): generalized JSD(beta) of jsd.py on the student's
own samples with probability `lmbda`, else on the dataset's sequences.  The draw is one
`rng.random()` per optimizer step, from the step's data rng.

    objective: {type: gkd, beta: 0.5, lmbda: 0.5}
"""

from __future__ import annotations

import random

from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.objectives.jsd import check_divergence_args, divergence_loss
from mmdistill.registry import OBJECTIVES

__all__ = ["GKD"]


@OBJECTIVES.register("gkd")
class GKD:
    """GKD (Agarwal et al.): generalized JSD on student samples with probability `lmbda`, else on dataset sequences."""

    def __init__(self, beta: float = 0.5, lmbda: float = 0.5, topk: int | None = None, temperature: float = 1.0):
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"objective.lmbda must lie in [0, 1], got {lmbda}")
        check_divergence_args(beta, topk, temperature)
        self.beta, self.lmbda, self.topk, self.temperature = beta, lmbda, topk, temperature
        self.needs = Needs(teacher=True, teacher_scores=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source="student" if rng.random() < self.lmbda else "dataset")

    def prepare(self, rollout: Rollout) -> Rollout:
        return rollout

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        return divergence_loss(b, self.beta, self.topk)
