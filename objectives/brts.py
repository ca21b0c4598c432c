"""BRTS (2605.09725): best-of-N teacher rollout selection for on-policy distillation.

Student-context OPD on the student's own rollouts, plus an auxiliary distillation term on
one teacher trajectory per prompt, picked from `n` teacher samples by priority: correct
first, then the one the student finds most likely (best aligned with its current
behaviour).  The adapter does the sampling and selection (the request's
`mmdistill.interfaces.TeacherGuidance`); this file is the loss:

    L = sum_{student rows, t} d_t / N_student + kappa * sum_{teacher rows, t} d_t / N_teacher

with `d_t` the per-token divergence (top-16 reverse KL by default) and N the token counts of
each branch over the whole optimizer step (so micro-batching does not change the gradient).

    objective: {type: brts, kappa: 0.05, n: 2, topk: 16}
    python -m pytest tests/test_objectives_guided.py -k brts
"""

from __future__ import annotations

import random
from dataclasses import replace

from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest, TeacherGuidance
from mmdistill.objectives.jsd import check_divergence_args, token_divergence
from mmdistill.registry import OBJECTIVES

__all__ = ["branch_token_counts", "brts_loss", "BRTS"]


def branch_token_counts(mask_B_T: Tensor, from_teacher_B: Tensor) -> tuple[float, float]:
    """Trained tokens on student rows and on teacher rows (computed once per step, before micro-batches)."""
    per_row_B = mask_B_T.sum(1)
    return float(per_row_B[~from_teacher_B].sum()), float(per_row_B[from_teacher_B].sum())


def brts_loss(
    d_B_T: Tensor, mask_B_T: Tensor, from_teacher_B: Tensor, kappa: float, n_student: float, n_teacher: float
) -> tuple[Tensor, dict[str, float]]:
    """Student-context divergence plus kappa x teacher-context divergence, each a per-token mean."""
    student_B_T = mask_B_T * (~from_teacher_B).float()[:, None]
    teacher_B_T = mask_B_T * from_teacher_B.float()[:, None]
    student_term = (d_B_T * student_B_T).sum() / max(n_student, 1.0)
    teacher_term = (d_B_T * teacher_B_T).sum() / max(n_teacher, 1.0)
    loss = student_term + kappa * teacher_term
    return loss, {
        "divergence_student_ctx": float((d_B_T.detach() * student_B_T).sum() / student_B_T.sum().clamp(min=1)),
        "divergence_teacher_ctx": float((d_B_T.detach() * teacher_B_T).sum() / teacher_B_T.sum().clamp(min=1)),
    }


@OBJECTIVES.register("brts")
class BRTS:
    """BRTS: student-context OPD (top-k reverse KL) plus kappa x the same divergence on the best of
    n teacher rollouts per prompt (correct first, then the one the student finds most likely)."""

    def __init__(
        self,
        kappa: float = 0.05,
        n: int = 2,
        topk: int | None = 16,
        beta: float = 1.0,
        reward_threshold: float = 0.5,
        temperature: float = 1.0,
    ):
        if kappa < 0:
            raise ValueError(f"objective.kappa must be >= 0 (0.05 in the paper), got {kappa}")
        if n < 1:
            raise ValueError(f"objective.n must be >= 1 teacher samples per prompt, got {n}")
        check_divergence_args(beta, topk, temperature)
        self.beta, self.topk, self.temperature, self.kappa = beta, topk, temperature, kappa
        self.guidance = TeacherGuidance(n=n, keep=1, when="always", threshold=reward_threshold)
        self.needs = Needs(teacher=True, teacher_scores=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source="student", guidance=self.guidance)

    def prepare(self, rollout: Rollout) -> Rollout:
        """Both branches' token counts over the whole step, before it is cut into micro-batches."""
        counts = branch_token_counts(rollout.mask_B_T, rollout.extras["from_teacher_B"])
        return replace(rollout, extras={**rollout.extras, "branch_tokens": counts})

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        d_B_T = token_divergence(b, self.beta, self.topk)
        n_student, n_teacher = r.extras.get("branch_tokens") or branch_token_counts(
            r.mask_B_T, r.extras["from_teacher_B"]
        )
        loss, metrics = brts_loss(d_B_T, r.mask_B_T, r.extras["from_teacher_B"], self.kappa, n_student, n_teacher)
        student_B = ~r.extras["from_teacher_B"]
        if r.rewards_B is not None:
            metrics["teacher_ctx_reward"] = float(r.rewards_B[~student_B].float().mean()) if (~student_B).any() else 0.0
        return loss, metrics
