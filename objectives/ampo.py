"""AMPO-style guidance on demand (Adaptive Multi-Guidance Policy Optimization).

GRPO on the student's groups; only for prompts where *every* student rollout failed does the
teacher add rollouts (selected by the student's own likelihood of them: "comprehension-based"
selection, done by the adapter, see `rollout.TeacherGuidance`).  Advantages are normalised
over the mixed group, so a correct teacher rollout lifts the group's baseline and earns a
positive advantage while the failed student rollouts get negative ones.  Teacher rows are
off-policy: their ratio is taken as 1 (behaviour log-prob := the current log-prob, detached),
so they contribute `-A * grad log pi_theta(y)` without clipping.

    python -m pytest tests/test_objectives_text_methods.py -k ampo
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmdistill.objectives.grpo import grpo_loss


def ampo_loss(
    logp_B_T: Tensor, behavior_logp_B_T: Tensor, adv_B: Tensor, mask_B_T: Tensor, from_teacher_B: Tensor,
    clip_eps: float = 0.2, normalizer: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO's clipped loss with teacher rows treated on-policy (ratio 1)."""
    behavior_B_T = torch.where(from_teacher_B[:, None], logp_B_T.detach(), behavior_logp_B_T)
    loss, metrics = grpo_loss(logp_B_T, behavior_B_T, adv_B, mask_B_T, clip_eps=clip_eps, kl_beta=0.0, normalizer=normalizer)
    metrics["teacher_rows"] = float(from_teacher_B.float().sum())
    return loss, metrics
