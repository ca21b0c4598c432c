"""Generalized Jensen-Shannon divergence JSD(beta) between student and teacher on a rollout's states
(docs/objectives.md; GKD: "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes", arXiv 2306.13649).

    L = sum_t m_t * JSD_beta(pi_S(. | s_t), pi_T(. | s_t)) / normalizer
    beta 0 = forward KL(T || S), beta 1 = reverse KL(S || T)

The full-distribution divergence comes from the step distributions (`StepDist.divergence`,
chunked in `mmdistill.kernels`); `topk` compares on the teacher's top-k actions plus one tail
bucket instead.  `divergence_loss` is the loss that `reverse_kl`, `forward_kl`, `jsd`, `gkd` and
`opsd` share (plain functions, no base class).

    objective: {type: jsd, beta: 0.5, source: student}
"""

from __future__ import annotations

import random

from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest, Source
from mmdistill.registry import OBJECTIVES

__all__ = ["check_divergence_args", "token_divergence", "divergence_loss", "JSD"]


def check_divergence_args(beta: float, topk: int | None, temperature: float) -> None:
    """The hyper-parameter checks every divergence objective shares."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"objective.beta must lie in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"objective.temperature must be > 0, got {temperature}")
    if topk is not None and topk < 1:
        raise ValueError(f"objective.topk must be >= 1 (or null for the full vocabulary), got {topk}")


def token_divergence(b: ObjectiveBatch, beta: float, topk: int | None) -> Tensor:
    """Per-step JSD(beta) `[B, T]` of the student to the teacher (kept as its top-k plus a tail bucket when `topk`)."""
    teacher = b.teacher.topk(topk) if topk else b.teacher
    return b.student.divergence(teacher, beta=beta)


def divergence_loss(b: ObjectiveBatch, beta: float, topk: int | None) -> tuple[Tensor, dict[str, float]]:
    """`sum_t m_t d_t / normalizer` with metric `divergence` (the mean d_t over trained steps)."""
    d_B_T = token_divergence(b, beta, topk)
    mask_B_T = b.rollout.mask_B_T
    loss = (d_B_T * mask_B_T).sum() / b.normalizer
    n = mask_B_T.sum().clamp(min=1)
    return loss, {"divergence": float((d_B_T.detach() * mask_B_T).sum() / n)}


@OBJECTIVES.register("jsd")
class JSD:
    """Generalized JSD(beta) (GKD, arXiv 2306.13649) on the chosen rollout source."""

    def __init__(
        self, beta: float = 0.5, source: Source = "student", topk: int | None = None, temperature: float = 1.0
    ):
        check_divergence_args(beta, topk, temperature)
        self.beta, self.source, self.topk, self.temperature = beta, source, topk, temperature
        self.needs = Needs(teacher=True, teacher_scores=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source=self.source)

    def prepare(self, rollout: Rollout) -> Rollout:
        return rollout

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        return divergence_loss(b, self.beta, self.topk)
