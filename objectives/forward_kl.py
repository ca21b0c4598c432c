"""Forward KL: sum_t KL(pi_T(. | s_t) || pi_S(. | s_t)), i.e. JSD(beta=0) of jsd.py (docs/objectives.md).
With `source: teacher` it is the forward-KL warm-up on the teacher's own rollouts (word-level KD).

    objective: {type: forward_kl, source: teacher}
"""

from __future__ import annotations

import random

from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest, Source
from mmdistill.objectives.jsd import check_divergence_args, divergence_loss
from mmdistill.registry import OBJECTIVES

__all__ = ["ForwardKL"]


@OBJECTIVES.register("forward_kl")
class ForwardKL:
    """sum_t KL(pi_T || pi_S); with source=teacher it is the forward-KL warm-up on teacher rollouts."""

    beta = 0.0

    def __init__(self, source: Source = "teacher", topk: int | None = None, temperature: float = 1.0):
        check_divergence_args(self.beta, topk, temperature)
        self.source, self.topk, self.temperature = source, topk, temperature
        self.needs = Needs(teacher=True, teacher_scores=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source=self.source)

    def prepare(self, rollout: Rollout) -> Rollout:
        return rollout

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        return divergence_loss(b, self.beta, self.topk)
