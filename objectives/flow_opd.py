"""Flow-OPD (2605.08063; docs/objectives.md sections 6.6 and 6.7): on-policy distillation for flow models.

The student samples SDE trajectories (`mmdistill/sde.py`); teachers give their velocity on
the student's own states (a dict of teachers is routed by the adapter: each prompt's target is
the velocity of its tag's teacher).  Pieces, all on `[B, T, D]` velocities:

- dense reward: `r_t = -d_t(sg(v_theta), v_tgt)` (`dense_reward`) where the per-step
  distance (`velocity_distance`, switch `reward_scale`) is
      "paper": d_t = w(t) ||v - v_tgt||^2  -- the exact KL between the two step Gaussians,
               ||mu - mu_tgt||^2 / (2 sigma_t^2 |dt|), summed over the D latent dimensions;
      "code":  d_t = |dt| w(t) mean_D (v - v_tgt)^2  -- the authors' train_sd3_opd_mix.py,
               mean_D (mu - mu_tgt)^2 / (2 sigma_t^2) with sigma_t WITHOUT sqrt(|dt|): the
               paper's KL times |dt| / D, the same expression as Flow-GRPO's kl_loss
               (`flow_grpo.flow_grpo_kl(..., "code")`);
      "flat":  d_t = mean_D (v - v_tgt)^2  -- plain velocity matching, every step weighted alike (ours:
               w(t) grows like 1 / sigma_t^2 at low noise, so the last steps dominate the exact KL while
               layout is decided at the high-noise steps);
- variant "clipped": the reward is the advantage of a PPO-clipped ratio update over the
  denoising steps (`gamma` > 0: discounted reward-to-go, as in text OPD; the reference uses
  gamma = 0), clamped to +-`adv_clip_max` when set (the reference clamps at 5);
- variant "gkd": the direct loss `sum_t d_t(v_theta, v_tgt)`, gradient through v_theta
  (the per-step reverse KL at the visited states);
- Manifold Anchor Regularization: `+ mar_coef * sum_t d_t(v_theta, v_anchor)` against a frozen
  task-agnostic teacher, gradient through v_theta (lambda = 0.04); `reward_scale` applies to it too.

Note: d_t depends on the state x_t only, not on the sampled x_{t-dt}, so with gamma = 0 and a
detached reward the clipped update's expected gradient is zero (E[grad log pi] = 0 at a fixed
state); the signal comes from gamma > 0 (credit to the steps that led to x_t) or from the
"gkd" variant.  (The reference code builds its advantage from the student's mean without detaching
it, so its clipped loss also carries the gradient of `-A_t` through v_theta, i.e. the "gkd" gradient on
the steps inside the clamp; here the reward is `sg(.)` as the paper writes it.)  The sampled form
`r_t = log pi_tgt(x_{t-dt}) - log pi_old(x_{t-dt})` is text OPD on the step Gaussians:
`mmdistill.objectives.opd.opd_loss` with teacher step log-probs.

    python -m pytest tests/test_flow_objectives.py -q -o addopts=""
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.objectives.flow_grpo import check_fraction, check_selection, step_velocity_kl, train_timesteps
from mmdistill.objectives.policy_gradient import (
    check_same_shape,
    discounted_cumsum,
    masked_sum,
    policy_gradient_loss,
    resolve_normalizer,
)
from mmdistill.registry import OBJECTIVES

__all__ = ["velocity_distance", "dense_reward", "manifold_anchor_loss", "flow_opd_loss", "FlowOPD"]

RewardScale = Literal["paper", "code", "flat"]
Variant = Literal["clipped", "gkd"]
Selection = Literal["first", "random"]


def _check_reward_scale(reward_scale: str) -> None:
    if reward_scale not in ("paper", "code", "flat"):
        raise ValueError(
            "reward_scale must be 'paper' (exact step KL), 'code' (the reference code: |dt| w(t) mean over dims) "
            f"or 'flat' (mean squared velocity difference); got {reward_scale!r}"
        )


def velocity_distance(
    v_B_T_D: Tensor, v_target_B_T_D: Tensor, kl_weight_B_T: Tensor, dt_B_T: Tensor, reward_scale: RewardScale = "paper"
) -> Tensor:
    """Per-step distance `[B, T]`: "paper" `w ||dv||^2` (the step KL), "code" `|dt| w mean_D dv^2`
    (the reference code's `mean_D ||dmu||^2 / (2 sigma_t^2)`), or "flat" `mean_D dv^2`."""
    _check_reward_scale(reward_scale)
    if reward_scale == "flat":
        return (v_B_T_D - v_target_B_T_D).square().mean(-1)
    d_B_T = step_velocity_kl(v_B_T_D, v_target_B_T_D, kl_weight_B_T)
    if reward_scale == "paper":
        return d_B_T
    return d_B_T * dt_B_T.abs() / v_B_T_D.shape[-1]


@torch.no_grad()
def dense_reward(
    v_student_B_T_D: Tensor,
    v_target_B_T_D: Tensor,
    kl_weight_B_T: Tensor,
    dt_B_T: Tensor,
    mask_B_T: Tensor,
    reward_scale: RewardScale = "paper",
) -> Tensor:
    """`r_t = -d_t(sg(v_student), v_target)` per step `[B, T]`, 0 where the mask is 0 (no gradient)."""
    d_B_T = velocity_distance(v_student_B_T_D, v_target_B_T_D, kl_weight_B_T, dt_B_T, reward_scale)
    keep = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
    return torch.where(keep, -d_B_T, torch.zeros_like(d_B_T))


def manifold_anchor_loss(
    v_student_B_T_D: Tensor,
    v_anchor_B_T_D: Tensor,
    kl_weight_B_T: Tensor,
    dt_B_T: Tensor,
    mask_B_T: Tensor,
    reward_scale: RewardScale = "paper",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """MAR: `sum_t m_t d_t(v_student, sg(v_anchor)) / normalizer`, gradient through the student's velocity."""
    d_B_T = velocity_distance(v_student_B_T_D, v_anchor_B_T_D.detach(), kl_weight_B_T, dt_B_T, reward_scale)
    return masked_sum(d_B_T, mask_B_T) / resolve_normalizer(normalizer, mask_B_T, d_B_T)


def flow_opd_loss(
    logp_B_T: Tensor | None,
    behavior_logp_B_T: Tensor | None,
    v_student_B_T_D: Tensor,
    v_target_B_T_D: Tensor,
    kl_weight_B_T: Tensor,
    dt_B_T: Tensor,
    mask_B_T: Tensor,
    variant: Variant = "clipped",
    reward_scale: RewardScale = "paper",
    coef: float = 1.0,
    gamma: float = 0.0,
    clip_eps: float | None = 1e-4,
    v_anchor_B_T_D: Tensor | None = None,
    mar_coef: float = 0.04,
    normalizer: float | Tensor | None = None,
    adv_clip_max: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Flow-OPD loss (see the module docstring).  v_target (routed teachers) and v_anchor are
    treated as constants; v_student carries the gradient for "gkd" and MAR.  "clipped" needs
    `logp_B_T` / `behavior_logp_B_T` on one convention (`sde.step_logp`) and clamps its
    advantages to +-`adv_clip_max` when given.  Metrics: `reward` (mean dense reward over kept
    steps), `velocity_mse`, `mar` when an anchor is given, and the policy-gradient metrics for
    "clipped"."""
    check_same_shape(kl_weight=kl_weight_B_T, dt=dt_B_T, mask=mask_B_T, logp=logp_B_T, behavior_logp=behavior_logp_B_T)
    v_target_B_T_D = v_target_B_T_D.detach()
    reward_B_T = dense_reward(v_student_B_T_D, v_target_B_T_D, kl_weight_B_T, dt_B_T, mask_B_T, reward_scale)
    metrics: dict[str, float] = {}
    if variant == "clipped":
        if logp_B_T is None or behavior_logp_B_T is None:
            raise ValueError("variant 'clipped' needs the student's and the behaviour policy's step log-probs")
        advantage_B_T = discounted_cumsum(float(coef) * reward_B_T, gamma, mask_B_T)
        if adv_clip_max is not None:
            advantage_B_T = advantage_B_T.clamp(-adv_clip_max, adv_clip_max)
        loss, metrics = policy_gradient_loss(
            logp_B_T, behavior_logp_B_T, advantage_B_T, mask_B_T, clip_eps=clip_eps, normalizer=normalizer
        )
    elif variant == "gkd":
        if adv_clip_max is not None:
            raise ValueError(
                "adv_clip_max clamps the advantages of variant 'clipped'; variant 'gkd' has none (set it to null)"
            )
        d_B_T = velocity_distance(v_student_B_T_D, v_target_B_T_D, kl_weight_B_T, dt_B_T, reward_scale)
        loss = float(coef) * masked_sum(d_B_T, mask_B_T) / resolve_normalizer(normalizer, mask_B_T, d_B_T)
    else:
        raise ValueError(
            f"variant must be 'clipped' (dense reward in a clipped update) or 'gkd' (direct loss); got {variant!r}"
        )
    if v_anchor_B_T_D is not None:
        mar = manifold_anchor_loss(
            v_student_B_T_D, v_anchor_B_T_D, kl_weight_B_T, dt_B_T, mask_B_T, reward_scale, normalizer
        )
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


@OBJECTIVES.register("flow_opd")
class FlowOPD:
    """Flow-OPD (Flow-OPD: On-Policy Distillation for Flow Matching Models, 2605.08063): the (routed)
    teachers' velocities on the student's own SDE states; dense reward `-d_t(sg(v_theta), v_tgt)` in a
    clipped update ("clipped") or the direct per-step KL ("gkd"); plus Manifold Anchor Regularization
    against the stage's `anchor` (mar_coef > 0).  docs/objectives.md section 6.6."""

    temperature = 1.0

    def __init__(
        self,
        variant: Variant = "gkd",
        reward_scale: RewardScale = "paper",
        coef: float = 1.0,
        gamma: float = 1.0,
        clip_eps: float | None = 1e-4,
        mar_coef: float = 0.04,
        timestep_fraction: float = 1.0,
        timestep_selection: Selection = "first",
        adv_clip_max: float | None = None,
    ):
        if variant not in ("clipped", "gkd"):
            raise ValueError(f"objective.variant must be 'clipped' or 'gkd', got {variant!r}")
        try:
            _check_reward_scale(reward_scale)
        except ValueError as e:
            raise ValueError(f"objective.{e}") from None
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"objective.gamma must lie in [0, 1], got {gamma}")
        if mar_coef < 0:
            raise ValueError(f"objective.mar_coef must be >= 0, got {mar_coef}")
        if clip_eps is not None and not 0.0 < clip_eps < 1.0:
            raise ValueError(f"objective.clip_eps must lie in (0, 1) or be null, got {clip_eps}")
        if adv_clip_max is not None and adv_clip_max <= 0:
            raise ValueError(f"objective.adv_clip_max must be > 0 or null (no clamp), got {adv_clip_max}")
        if adv_clip_max is not None and variant != "clipped":
            raise ValueError(
                f"objective.adv_clip_max clamps the advantages of variant 'clipped'; variant {variant!r} has none "
                "(set variant: clipped or adv_clip_max: null)"
            )
        check_fraction(timestep_fraction)
        check_selection(timestep_selection)
        self.variant, self.reward_scale, self.coef, self.gamma = variant, reward_scale, coef, gamma
        self.clip_eps, self.mar_coef, self.timestep_fraction = clip_eps, mar_coef, timestep_fraction
        self.timestep_selection, self.adv_clip_max = timestep_selection, adv_clip_max
        self.needs = Needs(teacher=True, teacher_scores=True, anchor=mar_coef > 0, sampled_actions=variant == "clipped")

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source="student")

    def prepare(self, rollout: Rollout) -> Rollout:
        return train_timesteps(rollout, self.timestep_fraction, self.timestep_selection)

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r, s = b.rollout, b.student
        clipped = self.variant == "clipped"
        loss, metrics = flow_opd_loss(
            s.log_prob(r.actions) if clipped else None,
            r.behavior_logp_B_T if clipped else None,
            s.velocity_B_T_D,
            b.teacher.velocity_B_T_D,
            s.kl_weight_B_T,
            s.dt_B_T,
            r.mask_B_T,
            variant=self.variant,
            reward_scale=self.reward_scale,
            coef=self.coef,
            gamma=self.gamma,
            clip_eps=self.clip_eps,
            v_anchor_B_T_D=b.anchor.velocity_B_T_D if (b.anchor is not None and self.mar_coef > 0) else None,
            mar_coef=self.mar_coef,
            normalizer=b.normalizer,
            adv_clip_max=self.adv_clip_max,
        )
        if r.rewards_B is not None:
            metrics["image_reward"] = float(r.rewards_B.mean())
        return loss, metrics
