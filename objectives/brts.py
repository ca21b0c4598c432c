"""BRTS (2605.09725): best-of-N teacher rollout selection for on-policy distillation.

Student-context OPD on the student's own rollouts, plus an auxiliary distillation term on
one teacher trajectory per prompt, picked from `n` teacher samples by priority: correct
first, then the one the student finds most likely (best aligned with its current
behaviour).  The adapter does the sampling and selection (`rollout.TeacherGuidance`); this
file is the loss:

    L = sum_{student rows, t} d_t / N_student + kappa * sum_{teacher rows, t} d_t / N_teacher

with `d_t` the per-token divergence (top-16 reverse KL by default) and N the token counts of
each branch over the whole optimizer step (so micro-batching does not change the gradient).

    python -m pytest tests/test_objectives_text_methods.py -k brts
"""
from __future__ import annotations

from torch import Tensor


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

