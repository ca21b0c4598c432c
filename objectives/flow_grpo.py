"""Flow-GRPO (2505.05470; docs/objectives.md section 6.5): GRPO on the SDE denoising steps of a flow model.

Each rollout is T denoising steps sampled from the SDE (`mmdistill/sde.py`); one
scalar reward per image.  With `A_i = clip((R_i - mean_g) / std_g, +-adv_clip_max)`
(`grpo.group_advantages`) broadcast over the steps and `rho_t = pi_theta / pi_old` of the
sampled x_{t-dt}::

    L = sum_t m_t [-min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + kl_beta KL_t] / normalizer

KL to the frozen reference at the same state is closed-form between two step Gaussians of
equal std; in velocities (`step_velocity_kl`, w(t) from `sde.sde_step_kl_weight`):

    "paper": KL_t = ||mu_theta - mu_ref||^2 / (2 sigma_t^2 |dt|) = w(t) ||v_theta - v_ref||^2   (exact, summed over D)
    "code":  Flow-GRPO's train_sd3.py, mean_D (mu_theta - mu_ref)^2 / (2 sigma_t^2)
             = |dt| w(t) mean_D (v_theta - v_ref)^2

The two differ by |dt| / D (checked against the reference code in tests/test_flow_objectives.py):
on SD3.5-Medium latents at 512 px (D = 16 x 64 x 64) with 10 shift-3 steps "paper" is 2.4e5 to
7.3e6 times "code".  Flow-GRPO's published kl_beta = 0.04 was tuned for "code", the default here.
Other defaults follow Flow-GRPO too: clip 1e-4 (tuned there for per-dimension mean log-probs,
`logprob_reduce="mean"`), adv_clip_max 5, and `int(timestep_fraction * T)` trained steps (the
first ones).  Flow-GRPO's advantages use the population std + 1e-4; `group_advantages` the
sample std + 1e-6.

`train_timesteps` and `check_fraction` are shared with Flow-OPD (`flow_opd.py`).

    python -m pytest tests/test_flow_objectives.py -q -o addopts=""
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.objectives.grpo import group_advantages
from mmdistill.objectives.policy_gradient import add_kl_penalty, check_same_shape, policy_gradient_loss
from mmdistill.registry import OBJECTIVES

__all__ = ["step_velocity_kl", "flow_grpo_kl", "flow_grpo_loss", "check_fraction", "train_timesteps", "FlowGRPO"]

KLForm = Literal["paper", "code"]
Selection = Literal["first", "random"]


def step_velocity_kl(v_B_T_D: Tensor, v_other_B_T_D: Tensor, kl_weight_B_T: Tensor) -> Tensor:
    """`[B, T]` exact KL between the SDE step Gaussians of two velocities at the same states:
    `w(t) * sum_D (v - v_other)^2` (gradient flows through both arguments)."""
    if v_B_T_D.shape != v_other_B_T_D.shape or v_B_T_D.shape[:2] != kl_weight_B_T.shape:
        raise ValueError(
            f"expected velocities [B, T, D] of one shape and w(t) [B, T]; got {tuple(v_B_T_D.shape)}, "
            f"{tuple(v_other_B_T_D.shape)} and {tuple(kl_weight_B_T.shape)}"
        )
    return kl_weight_B_T * (v_B_T_D - v_other_B_T_D).square().sum(-1)


def _check_kl_form(kl_form: str) -> None:
    if kl_form not in ("paper", "code"):
        raise ValueError(f"kl_form must be 'paper' (exact KL) or 'code' (Flow-GRPO's |dt|/D scaling); got {kl_form!r}")


def flow_grpo_kl(
    v_B_T_D: Tensor, v_ref_B_T_D: Tensor, kl_weight_B_T: Tensor, dt_B_T: Tensor, kl_form: KLForm = "code"
) -> Tensor:
    """`[B, T]` KL of each step to the reference policy, "code" (Flow-GRPO's `kl_loss`) or "paper" (exact)."""
    _check_kl_form(kl_form)
    kl_B_T = step_velocity_kl(v_B_T_D, v_ref_B_T_D.detach(), kl_weight_B_T)
    if kl_form == "paper":
        return kl_B_T
    return kl_B_T * dt_B_T.abs() / v_B_T_D.shape[-1]


def flow_grpo_loss(
    logp_B_T: Tensor,
    behavior_logp_B_T: Tensor,
    advantage_B: Tensor,
    mask_B_T: Tensor,
    kl_B_T: Tensor | None = None,
    clip_eps: float | None = 1e-4,
    adv_clip_max: float | None = 5.0,
    kl_beta: float = 0.04,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
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
        logp_B_T,
        behavior_logp_B_T,
        advantage_B[:, None].expand_as(logp_B_T),
        mask_B_T,
        clip_eps=clip_eps,
        normalizer=normalizer,
    )
    if kl_B_T is not None:
        loss = add_kl_penalty(loss, metrics, kl_B_T, mask_B_T, kl_beta, normalizer, logp_B_T)
    return loss, metrics


# ----------------------------------------------------------------------------- trained timesteps (shared with Flow-OPD)


def check_fraction(timestep_fraction: float) -> None:
    if not 0.0 < timestep_fraction <= 1.0:
        raise ValueError(f"objective.timestep_fraction must lie in (0, 1], got {timestep_fraction}")


def check_selection(timestep_selection: str) -> None:
    if timestep_selection not in ("first", "random"):
        raise ValueError(f"objective.timestep_selection must be 'first' or 'random', got {timestep_selection!r}")


def train_timesteps(rollout: Rollout, fraction: float, selection: Selection = "first") -> Rollout:
    """The rollout trained on `max(1, int(fraction * T))` of its T denoising steps, the same ones for
    the whole batch (the others are never evaluated): the first, high-noise steps ("first", where
    layout is decided; Flow-GRPO's and Flow-OPD's `int(num_steps * timestep_fraction)` first steps)
    or a random subset drawn from `rollout.extras["seed"]` ("random")."""
    check_selection(selection)
    if fraction >= 1.0:
        return rollout
    T = rollout.mask_B_T.shape[1]
    k = max(1, int(fraction * T))
    if selection == "first":
        keep_K = torch.arange(k)
    else:
        g = torch.Generator().manual_seed(int(rollout.extras.get("seed", 0)))
        keep_K = torch.randperm(T, generator=g)[:k]
    m_T = torch.zeros(T, device=rollout.mask_B_T.device)
    m_T[keep_K.to(m_T.device)] = 1.0
    return replace(rollout, mask_B_T=rollout.mask_B_T * m_T)


# ----------------------------------------------------------------------------- the objective


@OBJECTIVES.register("flow_grpo")
class FlowGRPO:
    """Flow-GRPO (Flow-GRPO: Training Flow Matching Models via Online RL, 2505.05470): group-normalised
    image reward as the advantage of every denoising step, clipped ratio of step log-probs, closed-form
    step KL to the frozen initial model (docs/objectives.md section 6.5)."""

    temperature = 1.0

    def __init__(
        self,
        clip_eps: float | None = 1e-4,
        kl_beta: float = 0.04,
        kl_form: KLForm = "code",
        adv_clip_max: float | None = 5.0,
        timestep_fraction: float = 1.0,
        timestep_selection: Selection = "first",
        scale_by_std: bool = True,
    ):
        if clip_eps is not None and not 0.0 < clip_eps < 1.0:
            raise ValueError(f"objective.clip_eps must lie in (0, 1) or be null, got {clip_eps}")
        if kl_beta < 0:
            raise ValueError(f"objective.kl_beta must be >= 0, got {kl_beta}")
        try:
            _check_kl_form(kl_form)
        except ValueError as e:
            raise ValueError(f"objective.{e}") from None
        if adv_clip_max is not None and adv_clip_max <= 0:
            raise ValueError(f"objective.adv_clip_max must be > 0 or null (no clamp), got {adv_clip_max}")
        check_fraction(timestep_fraction)
        check_selection(timestep_selection)
        self.clip_eps, self.kl_beta, self.kl_form, self.adv_clip_max = clip_eps, kl_beta, kl_form, adv_clip_max
        self.timestep_fraction, self.timestep_selection = timestep_fraction, timestep_selection
        self.scale_by_std = scale_by_std
        self.needs = Needs(rewards=True, reference=kl_beta > 0, sampled_actions=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source="student")

    def prepare(self, rollout: Rollout) -> Rollout:
        """Group advantages over the whole batch, then the trained timesteps."""
        if rollout.rewards_B is None or rollout.group_ids_B is None:
            raise ValueError("flow_grpo needs rewards and group ids on the rollout; use a task with rewards")
        advantage_B = group_advantages(rollout.rewards_B, rollout.group_ids_B, scale_by_std=self.scale_by_std)
        rollout = replace(rollout, extras={**rollout.extras, "advantage_B": advantage_B})
        return train_timesteps(rollout, self.timestep_fraction, self.timestep_selection)

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        if "advantage_B" not in r.extras:
            raise ValueError("flow_grpo: the rollout has no advantages; call objective.prepare(rollout) first")
        logp_B_T = b.student.log_prob(r.actions)
        kl_B_T = None
        if b.reference is not None and self.kl_beta > 0:
            s = b.student
            kl_B_T = flow_grpo_kl(s.velocity_B_T_D, b.reference.velocity_B_T_D, s.kl_weight_B_T, s.dt_B_T, self.kl_form)
        loss, metrics = flow_grpo_loss(
            logp_B_T,
            r.behavior_logp_B_T,
            r.extras["advantage_B"],
            r.mask_B_T,
            kl_B_T=kl_B_T,
            clip_eps=self.clip_eps,
            adv_clip_max=self.adv_clip_max,
            kl_beta=self.kl_beta,
            normalizer=b.normalizer,
        )
        metrics["reward"] = float(r.rewards_B.mean())
        return loss, metrics
