"""Flow-GRPO (docs/objectives.md section 6): GRPO on the SDE denoising steps of a flow model.

Each rollout is T denoising steps sampled from the SDE (`modalities/flow/sde.py`); one
scalar reward per image.  With `A_i = clip((R_i - mean_g) / std_g, +-adv_clip_max)`
(`grpo.group_advantages`) broadcast over the steps and `rho_t = pi_theta / pi_old` of the
sampled x_{t-dt}::

    L = sum_t m_t [-min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + kl_beta KL_t] / normalizer

KL to the frozen reference at the same state is closed-form between two step Gaussians of
equal std; in velocities (`step_velocity_kl`, w(t) from `sde.sde_step_kl_weight`):

    "paper": KL_t = ||mu_theta - mu_ref||^2 / (2 sigma_t^2 |dt|) = w(t) ||v_theta - v_ref||^2   (exact, summed over D)
    "code":  Flow-GRPO's train_sd3.py, mean_D (mu_theta - mu_ref)^2 / (2 sigma_t^2) = |dt| w(t) mean_D (v_theta - v_ref)^2

[verify] the two differ by |dt| / D.  Defaults follow Flow-GRPO: clip 1e-4 (tuned there for
per-dimension mean log-probs, `logprob_reduce="mean"`), kl_beta 0.04, adv_clip_max 5.
Flow-GRPO's advantages use the population std + 1e-4; `group_advantages` the sample std + 1e-6.

    python -m pytest tests/test_flow_objectives.py -q -o addopts=""
"""
from __future__ import annotations

from typing import Literal

import torch

from mmdistill.objectives.policy_gradient import add_kl_penalty, check_same_shape, policy_gradient_loss

__all__ = ["step_velocity_kl", "flow_grpo_kl", "flow_grpo_loss"]

KLForm = Literal["paper", "code"]


def step_velocity_kl(v_B_T_D: torch.Tensor, v_other_B_T_D: torch.Tensor, kl_weight_B_T: torch.Tensor) -> torch.Tensor:
    """`[B, T]` exact KL between the SDE step Gaussians of two velocities at the same states:
    `w(t) * sum_D (v - v_other)^2` (gradient flows through both arguments)."""
    if v_B_T_D.shape != v_other_B_T_D.shape or v_B_T_D.shape[:2] != kl_weight_B_T.shape:
        raise ValueError(
            f"expected velocities [B, T, D] of one shape and w(t) [B, T]; got {tuple(v_B_T_D.shape)}, "
            f"{tuple(v_other_B_T_D.shape)} and {tuple(kl_weight_B_T.shape)}"
        )
    return kl_weight_B_T * (v_B_T_D - v_other_B_T_D).square().sum(-1)


def flow_grpo_kl(
    v_B_T_D: torch.Tensor,
    v_ref_B_T_D: torch.Tensor,
    kl_weight_B_T: torch.Tensor,
    dt_B_T: torch.Tensor,
    kl_form: KLForm = "paper",
) -> torch.Tensor:
    """`[B, T]` KL of each step to the reference policy, "paper" (exact) or "code" (Flow-GRPO's scaling)."""
    kl_B_T = step_velocity_kl(v_B_T_D, v_ref_B_T_D.detach(), kl_weight_B_T)
    if kl_form == "paper":
        return kl_B_T
    if kl_form == "code":
        return kl_B_T * dt_B_T.abs() / v_B_T_D.shape[-1]
    raise ValueError(f"kl_form must be 'paper' (exact KL) or 'code' (Flow-GRPO's |dt|/D scaling); got {kl_form!r}")


def flow_grpo_loss(
    logp_B_T: torch.Tensor,
    behavior_logp_B_T: torch.Tensor,
    advantage_B: torch.Tensor,
    mask_B_T: torch.Tensor,
    kl_B_T: torch.Tensor | None = None,
    clip_eps: float | None = 1e-4,
    adv_clip_max: float | None = 5.0,
    kl_beta: float = 0.04,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-GRPO loss on denoising steps.  `logp_B_T` / `behavior_logp_B_T` must share one
    convention (`sde.step_logp` with the rollout's `logprob_reduce`); `kl_B_T` from
    `flow_grpo_kl` (with gradient).  Metrics: those of `policy_gradient_loss`, plus `kl`."""
    if logp_B_T.dim() != 2 or tuple(advantage_B.shape) != (logp_B_T.shape[0],):
        raise ValueError(
            f"expected logp [B, T] and one advantage per image [B]; got logp {tuple(logp_B_T.shape)} "
            f"and advantage {tuple(advantage_B.shape)}"
        )
    check_same_shape(logp=logp_B_T, kl=kl_B_T)
    advantage_B = advantage_B.detach()
    if adv_clip_max is not None:
        advantage_B = advantage_B.clamp(-adv_clip_max, adv_clip_max)
    loss, metrics = policy_gradient_loss(
        logp_B_T, behavior_logp_B_T, advantage_B[:, None].expand_as(logp_B_T), mask_B_T,
        clip_eps=clip_eps, normalizer=normalizer,
    )
    if kl_B_T is not None:
        loss = add_kl_penalty(loss, metrics, kl_B_T, mask_B_T, kl_beta, normalizer, logp_B_T)
    return loss, metrics
