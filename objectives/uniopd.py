"""Uni-OPD's outcome-guided margin calibration of OPD advantages
(arXiv 2605.03677; docs/objectives.md section 8).

Token-level teacher guidance should rank a group's correct rollouts above its wrong
ones; when it does not by a margin delta, shift the advantages so that it does:

    a_i = mean_{t kept} A_{i,t}                         (A: the OPD advantage of opd.py)
    g   = mean_{i correct} a_i - mean_{i wrong} a_i      (per prompt group)
    if g < delta:  A_{i,t} += (delta - g) / 2  for correct i,   A_{i,t} -= (delta - g) / 2  for wrong i
    L   = -sum_t rho_t * A_t * m_t / normalizer          (importance-sampled, or PPO-clipped)

A shift added to every kept token of a rollout moves its mean a_i by the same
amount, so after calibration g = delta exactly (and a group with g >= delta is left
untouched): the invariant is gap >= delta.  A group without both a correct and a
wrong rollout has no gap and is left untouched.

Choice: `mean_adv(correct)` is the mean over correct rollouts of each rollout's
token-mean advantage (every rollout counts once, whatever its length), reading the
paper's "aggregated token-level guidance" as a per-trajectory aggregate.  A pooled
token mean would give another g but the same invariant.  The shift is applied after
discounting (gamma), to the advantages the loss uses.  The paper's student-side data
balancing is a sampling strategy, not part of this loss.

The registered `uniopd` objective: student rollouts, teacher-scored, verifier-rewarded (correct
when `reward >= reward_threshold`); it normalises over whole prompt groups, so
`train.micro_batch_size` must be a multiple of `rollout.group_size` (checked at each call).

    objective: {type: uniopd, delta: 0.4}
    Run its tests: ``pytest tests/test_objectives_text_methods.py -q -k uniopd``
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.objectives.groups import whole_group_loss, with_group_sizes
from mmdistill.objectives.opd import check_clip_eps, check_gamma, opd_advantages
from mmdistill.objectives.policy_gradient import check_same_shape, masked_sum, policy_gradient_loss
from mmdistill.registry import OBJECTIVES

__all__ = ["group_gap", "margin_calibrate", "uniopd_loss", "UniOPD"]


def _check_groups(correct_B: torch.Tensor, group_ids_B: torch.Tensor, B: int) -> torch.Tensor:
    """The 0-based group index of every rollout `[B]`."""
    if correct_B.dtype != torch.bool:
        raise TypeError(f"correct_B must be a bool tensor (reward >= threshold); got dtype {correct_B.dtype}")
    if group_ids_B.dtype.is_floating_point:
        raise TypeError(f"group_ids must be integers (one id per prompt group); got dtype {group_ids_B.dtype}")
    if correct_B.shape != (B,) or group_ids_B.shape != (B,):
        raise ValueError(
            f"expected correct and group_ids of shape [B={B}]; got {tuple(correct_B.shape)} and {tuple(group_ids_B.shape)}"
        )
    _, group_B = torch.unique(group_ids_B, return_inverse=True)
    return group_B


@torch.no_grad()
def group_gap(
    advantage_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    correct_B: torch.Tensor,
    group_ids_B: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(gap_G, has_both_G, group_B)`: per group (in sorted-id order) the gap
    `mean_correct(a_i) - mean_wrong(a_i)` of per-rollout token-mean advantages (0 where
    undefined), whether the group has both a correct and a wrong rollout, and each
    rollout's group index."""
    check_same_shape(advantage=advantage_B_T, mask=mask_B_T)
    group_B = _check_groups(correct_B, group_ids_B, advantage_B_T.shape[0])
    keep_B_T = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
    dtype = torch.promote_types(advantage_B_T.dtype, torch.float32)
    seq_mean_B = torch.where(keep_B_T, advantage_B_T.to(dtype), torch.zeros((), dtype=dtype)).sum(-1)
    seq_mean_B = seq_mean_B / keep_B_T.sum(-1).clamp(min=1).to(dtype)
    G = int(group_B.max()) + 1 if group_B.numel() else 0
    is_c_B = correct_B.to(dtype)
    zeros_G = torch.zeros(G, dtype=dtype, device=seq_mean_B.device)
    n_correct_G = zeros_G.index_add(0, group_B, is_c_B)
    n_wrong_G = zeros_G.index_add(0, group_B, 1 - is_c_B)
    mean_correct_G = zeros_G.index_add(0, group_B, seq_mean_B * is_c_B) / n_correct_G.clamp(min=1)
    mean_wrong_G = zeros_G.index_add(0, group_B, seq_mean_B * (1 - is_c_B)) / n_wrong_G.clamp(min=1)
    has_both_G = (n_correct_G > 0) & (n_wrong_G > 0)
    gap_G = torch.where(has_both_G, mean_correct_G - mean_wrong_G, zeros_G)
    return gap_G, has_both_G, group_B


@torch.no_grad()
def margin_calibrate(
    advantage_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    correct_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    delta: float = 0.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(calibrated_B_T, shift_B)`: `+s` on the kept tokens of correct rollouts and `-s` on
    wrong ones, `s = max(delta - g, 0) / 2` for groups with both kinds (else 0).
    `shift_B` is the signed shift each rollout received.  Masked positions stay as given."""
    if not delta >= 0:
        raise ValueError(f"delta (the margin) must be >= 0; got {delta}")
    gap_G, has_both_G, group_B = group_gap(advantage_B_T, mask_B_T, correct_B, group_ids_B)
    half_G = torch.where(has_both_G, (float(delta) - gap_G).clamp(min=0) / 2, torch.zeros_like(gap_G))
    shift_B = torch.where(correct_B, half_G[group_B], -half_G[group_B]).to(advantage_B_T.dtype)
    keep_B_T = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
    calibrated_B_T = torch.where(keep_B_T, advantage_B_T + shift_B[:, None], advantage_B_T)
    return calibrated_B_T, shift_B


def uniopd_loss(
    logp_B_T: torch.Tensor,
    behavior_logp_B_T: torch.Tensor,
    teacher_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    correct_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    delta: float = 0.4,
    coef: float = 1.0,
    gamma: float = 0.0,
    clip_eps: float | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """OPD with margin-calibrated advantages (module docstring).  Metrics: those of
    `policy_gradient_loss`, plus `gap_before` (mean gap over groups with both kinds; 0
    if none), `calibrated_fraction` (share of such groups that were shifted) and
    `reverse_kl` (mean `log pi_old - log pi_T` over kept tokens)."""
    check_same_shape(logp=logp_B_T, behavior_logp=behavior_logp_B_T, teacher_logp=teacher_logp_B_T, mask=mask_B_T)
    advantage_B_T = opd_advantages(behavior_logp_B_T, teacher_logp_B_T, mask_B_T, coef=coef, gamma=gamma)
    gap_G, has_both_G, _ = group_gap(advantage_B_T, mask_B_T, correct_B, group_ids_B)
    calibrated_B_T, _ = margin_calibrate(advantage_B_T, mask_B_T, correct_B, group_ids_B, delta)
    loss, metrics = policy_gradient_loss(
        logp_B_T, behavior_logp_B_T, calibrated_B_T, mask_B_T, clip_eps=clip_eps, normalizer=normalizer
    )
    with torch.no_grad():
        n_both = has_both_G.sum()
        keep_B_T = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
        rkl_B_T = behavior_logp_B_T - teacher_logp_B_T.to(behavior_logp_B_T.dtype)
        metrics["gap_before"] = float(gap_G[has_both_G].sum() / n_both.clamp(min=1))
        metrics["calibrated_fraction"] = float((has_both_G & (gap_G < delta)).sum() / n_both.clamp(min=1))
        metrics["reverse_kl"] = float(masked_sum(rkl_B_T, keep_B_T) / keep_B_T.sum().clamp(min=1))
    return loss, metrics


@OBJECTIVES.register("uniopd")
class UniOPD:
    """Uni-OPD margin calibration: OPD advantages shifted per group so that correct rollouts'
    mean advantage exceeds wrong ones' by at least delta."""

    temperature = 1.0  # unused: scored at the rollout temperature, so ratios compare like with like

    def __init__(
        self,
        delta: float = 0.4,
        coef: float = 1.0,
        gamma: float = 0.0,
        reward_threshold: float = 0.5,
        clip_eps: float | None = None,
    ):
        if delta < 0:
            raise ValueError(f"objective.delta must be >= 0 (0.4 in the paper), got {delta}")
        check_gamma(gamma)
        check_clip_eps(clip_eps)
        self.delta = delta
        self.coef = coef
        self.gamma = gamma
        self.reward_threshold = reward_threshold
        self.clip_eps = clip_eps
        self.needs = Needs(teacher=True, teacher_scores=True, rewards=True, sampled_actions=True, whole_groups=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source="student")

    def prepare(self, rollout: Rollout) -> Rollout:
        return with_group_sizes(rollout, "uniopd")

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        return whole_group_loss(
            b,
            "uniopd",
            self.reward_threshold,
            uniopd_loss,
            delta=self.delta,
            coef=self.coef,
            gamma=self.gamma,
            clip_eps=self.clip_eps,
        )
