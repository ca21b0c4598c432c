"""Flow-OPD (2605.08063; docs/objectives.md section 6): on-policy distillation for flow models.

The student samples SDE trajectories (`modalities/flow/sde.py`); teachers give their
velocity on the student's own states.  Pieces, all on `[B, T, D]` velocities:

- routing: `v_tgt = sum_k alpha_k(c) v_k` (`route_velocity`), alpha one-hot by the
  prompt's task (`one_hot_alpha`);
- dense reward: `r_t = -d_t(sg(v_theta), v_tgt)` (`dense_reward`) where the per-step
  distance (`velocity_distance`, switch `reward_scale` [verify]) is
      "paper": d_t = w(t) ||v - v_tgt||^2  -- the exact KL between the two step Gaussians
      "code":  d_t = (w(t) / |dt|) mean_D (v - v_tgt)^2  -- the reference code drops |dt| and averages over D;
      "flat":  d_t = mean_D (v - v_tgt)^2  -- plain velocity matching, every step weighted alike (ours: w(t)
               grows like 1 / sigma_t^2 at low noise, so the last steps dominate the exact KL while layout
               is decided at the high-noise steps);
- variant "clipped": the reward is the advantage of a PPO-clipped ratio update over the
  denoising steps (`gamma` > 0: discounted reward-to-go, as in text OPD);
- variant "gkd": the direct loss `sum_t d_t(v_theta, v_tgt)`, gradient through v_theta
  (the per-step reverse KL at the visited states);
- Manifold Anchor Regularization: `+ mar_coef * sum_t d_t(v_theta, v_anchor)` against a frozen
  task-agnostic teacher, gradient through v_theta (lambda = 0.04); `reward_scale` applies to it too.

Note [verify]: d_t depends on the state x_t only, not on the sampled x_{t-dt}, so with
gamma = 0 the clipped update's expected gradient is zero (E[grad log pi] = 0 at a fixed
state); the signal comes from gamma > 0 (credit to the steps that led to x_t) or from the
"gkd" variant.  The sampled form `r_t = log pi_tgt(x_{t-dt}) - log pi_old(x_{t-dt})` is text
OPD on the step Gaussians: `mmdistill.objectives.opd.opd_loss` with teacher step log-probs.

    python -m pytest tests/test_flow_objectives.py -q -o addopts=""
"""
from __future__ import annotations

from typing import Literal

import torch

from mmdistill.objectives.flow_grpo import step_velocity_kl
from mmdistill.objectives.policy_gradient import (
    check_same_shape,
    discounted_cumsum,
    masked_sum,
    policy_gradient_loss,
    resolve_normalizer,
)

__all__ = [
    "route_velocity",
    "one_hot_alpha",
    "velocity_distance",
    "dense_reward",
    "manifold_anchor_loss",
    "flow_opd_loss",
]

RewardScale = Literal["paper", "code", "flat"]
Variant = Literal["clipped", "gkd"]


def route_velocity(v_teachers_K_B_T_D: torch.Tensor, alpha_B_K: torch.Tensor) -> torch.Tensor:
    """`v_tgt[b] = sum_k alpha[b, k] v_k[b]` (`[B, T, D]`); v_teachers stacked on a leading K axis."""
    K, B = v_teachers_K_B_T_D.shape[:2]
    if tuple(alpha_B_K.shape) != (B, K):
        raise ValueError(f"alpha must be [B, K] = [{B}, {K}] (one weight per teacher per prompt); got {tuple(alpha_B_K.shape)}")
    return torch.einsum("bk,kbtd->btd", alpha_B_K.to(v_teachers_K_B_T_D.dtype), v_teachers_K_B_T_D)


def one_hot_alpha(task_ids_B: torch.Tensor, num_teachers: int) -> torch.Tensor:
    """Routing weights `[B, K]`: 1 for the teacher of each prompt's task, 0 elsewhere."""
    if task_ids_B.dtype.is_floating_point or task_ids_B.dim() != 1:
        raise ValueError(f"task_ids must be a 1-D integer tensor [B]; got {task_ids_B.dtype} {tuple(task_ids_B.shape)}")
    if task_ids_B.numel() and (int(task_ids_B.min()) < 0 or int(task_ids_B.max()) >= num_teachers):
        raise ValueError(f"task ids must lie in [0, {num_teachers}) (one per teacher); got {task_ids_B.tolist()}")
    return torch.nn.functional.one_hot(task_ids_B.long(), num_teachers).float()


def velocity_distance(
    v_B_T_D: torch.Tensor,
    v_target_B_T_D: torch.Tensor,
    kl_weight_B_T: torch.Tensor,
    dt_B_T: torch.Tensor,
    reward_scale: RewardScale = "paper",
) -> torch.Tensor:
    """Per-step distance `[B, T]`: "paper" `w ||dv||^2` (the step KL), "code" `(w / |dt|) mean_D dv^2`,
    or "flat" `mean_D dv^2`."""
    if reward_scale == "flat":
        return (v_B_T_D - v_target_B_T_D).square().mean(-1)
    d_B_T = step_velocity_kl(v_B_T_D, v_target_B_T_D, kl_weight_B_T)
    if reward_scale == "paper":
        return d_B_T
    if reward_scale == "code":
        return d_B_T / (dt_B_T.abs() * v_B_T_D.shape[-1])
    raise ValueError(f"reward_scale must be 'paper' (exact step KL), 'code' (no |dt|, mean over dims) or 'flat' (mean squared velocity difference); got {reward_scale!r}")


@torch.no_grad()
def dense_reward(
    v_student_B_T_D: torch.Tensor,
    v_target_B_T_D: torch.Tensor,
    kl_weight_B_T: torch.Tensor,
    dt_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    reward_scale: RewardScale = "paper",
) -> torch.Tensor:
    """`r_t = -d_t(sg(v_student), v_target)` per step `[B, T]`, 0 where the mask is 0 (no gradient)."""
    d_B_T = velocity_distance(v_student_B_T_D, v_target_B_T_D, kl_weight_B_T, dt_B_T, reward_scale)
    keep = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
    return torch.where(keep, -d_B_T, torch.zeros_like(d_B_T))


def manifold_anchor_loss(
    v_student_B_T_D: torch.Tensor,
    v_anchor_B_T_D: torch.Tensor,
    kl_weight_B_T: torch.Tensor,
    dt_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    reward_scale: RewardScale = "paper",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """MAR: `sum_t m_t d_t(v_student, sg(v_anchor)) / normalizer`, gradient through the student's velocity."""
    d_B_T = velocity_distance(v_student_B_T_D, v_anchor_B_T_D.detach(), kl_weight_B_T, dt_B_T, reward_scale)
    return masked_sum(d_B_T, mask_B_T) / resolve_normalizer(normalizer, mask_B_T, d_B_T)


def flow_opd_loss(
    logp_B_T: torch.Tensor | None,
    behavior_logp_B_T: torch.Tensor | None,
    v_student_B_T_D: torch.Tensor,
    v_target_B_T_D: torch.Tensor,
    kl_weight_B_T: torch.Tensor,
    dt_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    variant: Variant = "clipped",
    reward_scale: RewardScale = "paper",
    coef: float = 1.0,
    gamma: float = 0.0,
    clip_eps: float | None = 1e-4,
    v_anchor_B_T_D: torch.Tensor | None = None,
    mar_coef: float = 0.04,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-OPD loss (see the module docstring).  v_target (routed teachers) and v_anchor are
    treated as constants; v_student carries the gradient for "gkd" and MAR.  "clipped" needs
    `logp_B_T` / `behavior_logp_B_T` on one convention (`sde.step_logp`).  Metrics: `reward`
    (mean dense reward over kept steps), `velocity_mse`, `mar` when an anchor is given, and
    the policy-gradient metrics for "clipped"."""
    check_same_shape(kl_weight=kl_weight_B_T, dt=dt_B_T, mask=mask_B_T, logp=logp_B_T, behavior_logp=behavior_logp_B_T)
    v_target_B_T_D = v_target_B_T_D.detach()
    reward_B_T = dense_reward(v_student_B_T_D, v_target_B_T_D, kl_weight_B_T, dt_B_T, mask_B_T, reward_scale)
    metrics: dict[str, float] = {}
    if variant == "clipped":
        if logp_B_T is None or behavior_logp_B_T is None:
            raise ValueError("variant 'clipped' needs the student's and the behaviour policy's step log-probs")
        advantage_B_T = discounted_cumsum(float(coef) * reward_B_T, gamma, mask_B_T)
        loss, metrics = policy_gradient_loss(
            logp_B_T, behavior_logp_B_T, advantage_B_T, mask_B_T, clip_eps=clip_eps, normalizer=normalizer
        )
    elif variant == "gkd":
        d_B_T = velocity_distance(v_student_B_T_D, v_target_B_T_D, kl_weight_B_T, dt_B_T, reward_scale)
        loss = float(coef) * masked_sum(d_B_T, mask_B_T) / resolve_normalizer(normalizer, mask_B_T, d_B_T)
    else:
        raise ValueError(f"variant must be 'clipped' (dense reward in a clipped update) or 'gkd' (direct loss); got {variant!r}")
    if v_anchor_B_T_D is not None:
        mar = manifold_anchor_loss(v_student_B_T_D, v_anchor_B_T_D, kl_weight_B_T, dt_B_T, mask_B_T, reward_scale, normalizer)
        if mar_coef:
            loss = loss + float(mar_coef) * mar
        metrics["mar"] = float(mar.detach())
    with torch.no_grad():
        keep = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
        count = keep.sum().clamp(min=1)
        metrics["reward"] = float(masked_sum(reward_B_T, keep) / count)
        mse_B_T = (v_student_B_T_D.detach() - v_target_B_T_D).square().mean(-1)
        metrics["velocity_mse"] = float(masked_sum(mse_B_T, keep) / count)
    return loss, metrics
