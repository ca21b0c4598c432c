"""GRPO (docs/objectives.md section 8, [std]): group-normalised sequence advantages, a
PPO-clipped token surrogate and a k3 KL penalty to a reference policy.

    A_i  = (r_i - mean_group) / (std_group + eps)      (sample std, Bessel-corrected)
    L    = sum_t m_t * [-min(rho_t A_i, clip(rho_t, 1-eps, 1+eps_high) A_i) + kl_beta * k3_t] / normalizer
    k3_t = pi_ref/pi - log(pi_ref/pi) - 1

Token-level normalisation (sum over all kept tokens / normalizer, default the kept-token
count) rather than the original per-sequence mean, so long answers are not down-weighted.

The registered `grpo` objective ("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
Open Language Models", arXiv 2402.03300) computes the group advantages once over the whole step's
rollout (`prepare`), before it is cut into micro-batches, and scores a frozen copy of the initial
student as the reference when kl_beta > 0.

    objective: {type: grpo, clip_eps: 0.2, kl_beta: 0.04}
    Run its tests: ``pytest tests/test_objectives_grpo.py -q``
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch
from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.objectives.policy_gradient import (
    add_kl_penalty,
    check_same_shape,
    policy_gradient_loss,
)
from mmdistill.registry import OBJECTIVES

__all__ = ["group_advantages", "k3_kl", "grpo_loss", "with_group_advantages", "GRPO"]


@torch.no_grad()
def group_advantages(
    rewards_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """Per-group normalised advantages `[B]`: `(r - mean_g) / (std_g + eps)`, or `r - mean_g`
    when scale_by_std is False.

    Groups may have any sizes and any integer ids (not necessarily contiguous or sorted).
    std is the sample standard deviation (divisor n - 1, like `torch.std`, TRL's
    GRPOTrainer and verl); a group of one gets std 0, hence advantage 0.
    """
    if rewards_B.dim() != 1 or tuple(group_ids_B.shape) != tuple(rewards_B.shape):
        raise ValueError(
            f"rewards and group_ids must both be 1-D [B]; got rewards {tuple(rewards_B.shape)} "
            f"and group_ids {tuple(group_ids_B.shape)}"
        )
    if group_ids_B.dtype.is_floating_point:
        raise TypeError(f"group_ids must be integers (one id per prompt group); got dtype {group_ids_B.dtype}")
    rewards_B = rewards_B.to(torch.promote_types(rewards_B.dtype, torch.float32))
    _, group_B = torch.unique(group_ids_B, return_inverse=True)
    n_groups = int(group_B.max()) + 1 if group_B.numel() else 0
    count_G = torch.zeros(n_groups, dtype=rewards_B.dtype, device=rewards_B.device).index_add_(
        0, group_B, torch.ones_like(rewards_B)
    )
    sum_G = torch.zeros_like(count_G).index_add_(0, group_B, rewards_B)
    centred_B = rewards_B - (sum_G / count_G)[group_B]
    if not scale_by_std:
        return centred_B
    sq_G = torch.zeros_like(count_G).index_add_(0, group_B, centred_B.square())
    std_G = (sq_G / (count_G - 1).clamp(min=1)).sqrt()
    return centred_B / (std_G[group_B] + eps)


def k3_kl(logp_B_T: torch.Tensor, ref_logp_B_T: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: `exp(d) - d - 1`, `d = ref_logp - logp`.

    Always >= 0, and 0 exactly where the log-probs agree; computed as `expm1(d) - d` for
    precision near 0.
    """
    check_same_shape(logp=logp_B_T, ref_logp=ref_logp_B_T)
    log_ratio = ref_logp_B_T.to(logp_B_T.dtype) - logp_B_T
    return torch.expm1(log_ratio) - log_ratio


def grpo_loss(
    logp_B_T: torch.Tensor,
    behavior_logp_B_T: torch.Tensor,
    advantage_B: torch.Tensor,
    mask_B_T: torch.Tensor,
    ref_logp_B_T: torch.Tensor | None = None,
    clip_eps: float | None = 0.2,
    clip_eps_high: float | None = None,
    kl_beta: float = 0.04,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss: the clipped surrogate with each sequence's advantage broadcast over its
    tokens, plus `kl_beta * k3` to the reference when `ref_logp_B_T` is given; token sums
    divided by `normalizer` (default: kept-token count).  Metrics: those of
    `policy_gradient_loss`, plus `kl` (mean k3 over kept tokens) when a reference is given."""
    if logp_B_T.dim() != 2 or tuple(advantage_B.shape) != (logp_B_T.shape[0],):
        raise ValueError(
            f"expected logp [B, T] and one advantage per sequence [B]; got logp {tuple(logp_B_T.shape)} "
            f"and advantage {tuple(advantage_B.shape)}"
        )
    advantage_B_T = advantage_B.detach()[:, None].expand_as(logp_B_T)
    loss, metrics = policy_gradient_loss(
        logp_B_T,
        behavior_logp_B_T,
        advantage_B_T,
        mask_B_T,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        normalizer=normalizer,
    )
    if ref_logp_B_T is not None:
        kl_B_T = k3_kl(logp_B_T, ref_logp_B_T.detach())
        loss = add_kl_penalty(loss, metrics, kl_B_T, mask_B_T, kl_beta, normalizer, logp_B_T)
    return loss, metrics


def with_group_advantages(rollout: Rollout, scale_by_std: bool = True) -> Rollout:
    """The rollout with `extras["advantage_B"]`: `group_advantages` over the whole step (GRPO, AMPO)."""
    advantage_B = group_advantages(rollout.rewards_B, rollout.group_ids_B, scale_by_std=scale_by_std)
    return replace(rollout, extras={**rollout.extras, "advantage_B": advantage_B})


@OBJECTIVES.register("grpo")
class GRPO:
    """GRPO: group-normalised verifier reward, clipped ratio, k3 KL to the frozen initial policy."""

    temperature = 1.0  # unused: scored at the rollout temperature, so ratios compare like with like

    def __init__(
        self,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        kl_beta: float = 0.04,
        scale_by_std: bool = True,
    ):
        if not 0.0 < clip_eps < 1.0:
            raise ValueError(f"objective.clip_eps must lie in (0, 1), got {clip_eps}")
        if kl_beta < 0:
            raise ValueError(f"objective.kl_beta must be >= 0, got {kl_beta}")
        self.clip_eps = clip_eps
        self.clip_eps_high = clip_eps_high
        self.kl_beta = kl_beta
        self.scale_by_std = scale_by_std
        self.needs = Needs(reference=kl_beta > 0, rewards=True, sampled_actions=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source="student")

    def prepare(self, rollout: Rollout) -> Rollout:
        """Group advantages over the whole step's rollout, before it is cut into micro-batches."""
        assert rollout.rewards_B is not None and rollout.group_ids_B is not None, "GRPO needs rewards and group ids"
        return with_group_advantages(rollout, self.scale_by_std)

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        if "advantage_B" not in r.extras:
            r = self.prepare(r)
        adv_B = r.extras["advantage_B"]
        logp_B_T = b.student.log_prob(r.actions)
        ref_B_T = None
        if b.reference is not None:
            with torch.no_grad():
                ref_B_T = b.reference.log_prob(r.actions)
        loss, metrics = grpo_loss(
            logp_B_T,
            r.behavior_logp_B_T,
            adv_B,
            r.mask_B_T,
            ref_logp_B_T=ref_B_T,
            clip_eps=self.clip_eps,
            clip_eps_high=self.clip_eps_high,
            kl_beta=self.kl_beta,
            normalizer=b.normalizer,
        )
        metrics["reward"] = float(r.rewards_B.mean())
        return loss, metrics
