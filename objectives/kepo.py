"""KEPO's quality-gated on-policy distillation (Yang et al., arXiv 2602.00400;
docs/objectives.md section 8, marked [std]: the gate below is our reading of the abstract).

Dense teacher supervision only on rollouts good enough to be worth correcting; a
rollout that went wrong early is scored by the teacher under a flawed prefix,
so it gets no distillation signal at all:

    gate_i = reward_i >= threshold                      (0/1 verifier: threshold 0.5 keeps the correct ones)
    A_t    = -coef * (log pi_old(y_t) - log pi_T(y_t)), discounted with gamma   (OPD, opd.py)
    L      = -sum_{i: gate_i} sum_t rho_t * A_t * m_t / normalizer

normalizer defaults to the kept-token count of the whole batch, gated-out rollouts
included, so gating removes terms instead of up-weighting the survivors; above the
gate each token's contribution is exactly that of plain OPD with the same normalizer.
KEPO's second half (teacher hints for rejection-sampled exploration) is a rollout
strategy, not part of this loss.

The registered `kepo` objective: student rollouts, teacher-scored, verifier-rewarded.

    objective: {type: kepo, reward_threshold: 0.5}
    Run its tests: ``pytest tests/test_objectives_text_methods.py -q -k kepo``
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.objectives.groups import rewards_of
from mmdistill.objectives.opd import check_clip_eps, check_gamma, opd_loss, sampled_logps
from mmdistill.objectives.policy_gradient import check_same_shape, resolve_normalizer
from mmdistill.registry import OBJECTIVES

__all__ = ["kepo_gate", "kepo_loss", "KEPO"]


def kepo_gate(rewards_B: torch.Tensor, threshold: float) -> torch.Tensor:
    """`[B]` bool: which rollouts receive distillation (`reward >= threshold`)."""
    if rewards_B.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D [B] (one verifier score per rollout); got shape {tuple(rewards_B.shape)}"
        )
    return rewards_B >= float(threshold)


def kepo_loss(
    logp_B_T: torch.Tensor,
    behavior_logp_B_T: torch.Tensor,
    teacher_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    rewards_B: torch.Tensor,
    threshold: float = 0.5,
    coef: float = 1.0,
    gamma: float = 0.0,
    clip_eps: float | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reward-gated OPD (module docstring).  Metrics: those of `opd_loss` over the
    gated-in tokens, plus `gate_pass_fraction` (share of rollouts passing the gate)."""
    check_same_shape(logp=logp_B_T, behavior_logp=behavior_logp_B_T, teacher_logp=teacher_logp_B_T, mask=mask_B_T)
    if rewards_B.shape != (logp_B_T.shape[0],):
        raise ValueError(
            f"expected one reward per rollout [B={logp_B_T.shape[0]}]; got rewards {tuple(rewards_B.shape)}"
        )
    passed_B = kepo_gate(rewards_B, threshold)
    gated_mask_B_T = torch.where(passed_B[:, None], mask_B_T, torch.zeros_like(mask_B_T))
    denominator = resolve_normalizer(normalizer, mask_B_T, logp_B_T)  # the whole batch, not only the gated rows
    loss, metrics = opd_loss(
        logp_B_T,
        behavior_logp_B_T,
        teacher_logp_B_T,
        gated_mask_B_T,
        coef=coef,
        gamma=gamma,
        clip_eps=clip_eps,
        normalizer=denominator,
    )
    metrics["gate_pass_fraction"] = float(passed_B.float().mean()) if passed_B.numel() else 0.0
    return loss, metrics


@OBJECTIVES.register("kepo")
class KEPO:
    """KEPO's quality-gated OPD: the OPD loss only on rollouts with reward >= reward_threshold."""

    temperature = 1.0  # unused: scored at the rollout temperature, so ratios compare like with like

    def __init__(
        self, reward_threshold: float = 0.5, coef: float = 1.0, gamma: float = 0.0, clip_eps: float | None = None
    ):
        check_gamma(gamma)
        check_clip_eps(clip_eps)
        self.reward_threshold, self.coef, self.gamma, self.clip_eps = reward_threshold, coef, gamma, clip_eps
        self.needs = Needs(teacher=True, teacher_scores=True, rewards=True, sampled_actions=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source="student")

    def prepare(self, rollout: Rollout) -> Rollout:
        return rollout

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        logp_B_T, teacher_logp_B_T = sampled_logps(b)
        loss, metrics = kepo_loss(
            logp_B_T,
            r.behavior_logp_B_T,
            teacher_logp_B_T,
            r.mask_B_T,
            rewards_of(r, "kepo"),
            threshold=self.reward_threshold,
            coef=self.coef,
            gamma=self.gamma,
            clip_eps=self.clip_eps,
            normalizer=b.normalizer,
        )
        metrics["reward"] = float(r.rewards_B.float().mean())
        return loss, metrics
