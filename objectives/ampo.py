"""AMPO-style guidance on demand (Adaptive Multi-Guidance Policy Optimization).

GRPO on the student's groups; only for prompts where *every* student rollout failed does the
teacher add rollouts (selected by the student's own likelihood of them: "comprehension-based"
selection, done by the adapter, see `mmdistill.interfaces.TeacherGuidance`).  Advantages are normalised
over the mixed group, so a correct teacher rollout lifts the group's baseline and earns a
positive advantage while the failed student rollouts get negative ones.  Teacher rows are
off-policy: their ratio is taken as 1 (behaviour log-prob := the current log-prob, detached),
so they contribute `-A * grad log pi_theta(y)` without clipping.

The teacher only writes guidance rollouts (`Needs.teacher_scores` False); the request carries the
`TeacherGuidance` (when: all_failed, only_correct) that the adapter serves.

    objective: {type: ampo, n: 2, keep: 1}
    python -m pytest tests/test_objectives_guided.py -k ampo
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest, TeacherGuidance
from mmdistill.objectives.grpo import grpo_loss, with_group_advantages
from mmdistill.registry import OBJECTIVES

__all__ = ["ampo_loss", "AMPO"]


def ampo_loss(
    logp_B_T: Tensor,
    behavior_logp_B_T: Tensor,
    adv_B: Tensor,
    mask_B_T: Tensor,
    from_teacher_B: Tensor,
    clip_eps: float = 0.2,
    normalizer: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO's clipped loss with teacher rows treated on-policy (ratio 1)."""
    behavior_B_T = torch.where(from_teacher_B[:, None], logp_B_T.detach(), behavior_logp_B_T)
    loss, metrics = grpo_loss(
        logp_B_T, behavior_B_T, adv_B, mask_B_T, clip_eps=clip_eps, kl_beta=0.0, normalizer=normalizer
    )
    metrics["teacher_rows"] = float(from_teacher_B.float().sum())
    return loss, metrics


@OBJECTIVES.register("ampo")
class AMPO:
    """AMPO-style guidance on demand: GRPO on the student's groups; for prompts where every student
    rollout failed, up to `keep` of `n` teacher rollouts (correct first, then the ones the student
    finds most likely) join the group and its advantages (teacher rows on-policy, ratio 1)."""

    temperature = 1.0  # unused: scored at the rollout temperature, so ratios compare like with like

    def __init__(
        self, n: int = 2, keep: int = 1, clip_eps: float = 0.2, reward_threshold: float = 0.5, scale_by_std: bool = True
    ):
        if not 0.0 < clip_eps < 1.0:
            raise ValueError(f"objective.clip_eps must lie in (0, 1), got {clip_eps}")
        self.clip_eps, self.scale_by_std = clip_eps, scale_by_std
        self.guidance = TeacherGuidance(
            n=n, keep=keep, when="all_failed", threshold=reward_threshold, only_correct=True
        )
        self.needs = Needs(teacher=True, teacher_scores=False, rewards=True, sampled_actions=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source="student", guidance=self.guidance)

    def prepare(self, rollout: Rollout) -> Rollout:
        return with_group_advantages(rollout, self.scale_by_std)

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        if "advantage_B" not in r.extras:
            r = self.prepare(r)
        from_teacher_B = r.extras.get(
            "from_teacher_B", torch.zeros(r.batch_size, dtype=torch.bool, device=r.actions.device)
        )
        logp_B_T = b.student.log_prob(r.actions)
        loss, metrics = ampo_loss(
            logp_B_T,
            r.behavior_logp_B_T,
            r.extras["advantage_B"],
            r.mask_B_T,
            from_teacher_B,
            clip_eps=self.clip_eps,
            normalizer=b.normalizer,
        )
        student_B = ~from_teacher_B
        metrics["reward"] = float(r.rewards_B[student_B].float().mean()) if student_B.any() else 0.0
        return loss, metrics
