"""Hard cross-entropy to the teacher's mode (docs/objectives.md): the teacher's most likely action
at each of the student's own states is the label, as in DAgger ("A Reduction of Imitation Learning
and Structured Prediction to No-Regret Online Learning", arXiv 1011.0686); mode-collapsing by design.

    L = -sum_t m_t * log pi_S(argmax_a pi_T(a | s_t) | s_t) / normalizer

    objective: {type: hard_ce}
"""

from __future__ import annotations

import random

from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest, Source
from mmdistill.registry import OBJECTIVES

__all__ = ["HardCE"]


@OBJECTIVES.register("hard_ce")
class HardCE:
    """DAgger-style hard cross-entropy: -sum_t log pi_S(mode of pi_T(.|s_t)) on the student's own
    states (the teacher's most likely action as the label; mode-collapsing by design)."""

    temperature = 1.0

    def __init__(self, source: Source = "student"):
        self.source = source
        self.needs = Needs(teacher=True, teacher_scores=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source=self.source)

    def prepare(self, rollout: Rollout) -> Rollout:
        return rollout

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        mask_B_T = b.rollout.mask_B_T
        nll_B_T = -b.student.log_prob(b.teacher.mode().detach())
        loss = (nll_B_T * mask_B_T).sum() / b.normalizer
        n = mask_B_T.sum().clamp(min=1)
        return loss, {"nll": float((nll_B_T.detach() * mask_B_T).sum() / n)}
