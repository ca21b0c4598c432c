"""The flow objectives by their YAML names: flow matching, Flow-GRPO and Flow-OPD.

They see a flow rollout through `VelocityStepDist`s (velocities, step Gaussians, w(t), dt)
and the rollout's `extras`; the math lives in `flow_grpo.py` and `flow_opd.py`.

    objective: {type: flow_opd, variant: gkd, mar_coef: 0.04}
"""
from __future__ import annotations

import random
from typing import Literal

import torch
from torch import Tensor

from mmdistill.objectives.flow_grpo import flow_grpo_kl, flow_grpo_loss
from mmdistill.objectives.flow_opd import flow_opd_loss
from mmdistill.objectives.grpo import group_advantages
from mmdistill.objectives.policy_gradient import masked_sum
from mmdistill.objectives.registered import ObjectiveBatch
from mmdistill.registry import OBJECTIVES
from mmdistill.rollout import Rollout


def _check_fraction(timestep_fraction: float) -> None:
    if not 0.0 < timestep_fraction <= 1.0:
        raise ValueError(f"objective.timestep_fraction must lie in (0, 1], got {timestep_fraction}")


Selection = Literal["first", "random"]


def _train_timesteps(rollout: Rollout, fraction: float, selection: Selection = "first") -> None:
    """Train on `fraction` of the denoising steps, the same ones for the whole batch (the others are
    never evaluated): the first, high-noise steps ("first", where layout is decided; Flow-GRPO's
    training loop runs over the first `timestep_fraction` of the steps) or a random subset."""
    if fraction >= 1.0:
        return
    T = rollout.mask_B_T.shape[1]
    k = max(1, round(fraction * T))
    if selection == "first":
        keep = torch.arange(k)
    elif selection == "random":
        g = torch.Generator().manual_seed(int(rollout.extras.get("seed", 0)))
        keep = torch.randperm(T, generator=g)[:k]
    else:
        raise ValueError(f"objective.timestep_selection must be 'first' or 'random', got {selection!r}")
    m = torch.zeros(T, device=rollout.mask_B_T.device)
    m[keep.to(m.device)] = 1.0
    rollout.mask_B_T = rollout.mask_B_T * m


@OBJECTIVES.register("flow_matching")
class FlowMatching:
    """Rectified-flow matching `E ||v_theta(x_s, s, c) - (eps - x0)||^2` (mean over dims) on clean
    images: rendered by the task (`source: dataset`, base training) or sampled by the routed
    teachers (`source: teacher`, the Flow-OPD cold start by SFT on teacher samples)."""

    needs_reference = False
    needs_rewards = False
    scores_with_teacher = False  # the teacher only draws the images
    rollout_kind = "flow_matching"
    temperature = 1.0

    def __init__(
        self,
        source: Literal["dataset", "teacher"] = "dataset",
        cond_dropout: float = 0.1,
        sigma_sampling: Literal["logit_normal", "uniform"] = "logit_normal",
    ):
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"objective.cond_dropout must lie in [0, 1), got {cond_dropout}")
        self.source, self.cond_dropout, self.sigma_sampling = source, cond_dropout, sigma_sampling
        self.needs_teacher = source == "teacher"

    def pick_source(self, rng: random.Random) -> str:
        return self.source

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        target_B_T_D = b.rollout.extras["target_v_B_T_D"]
        mse_B_T = (b.student.velocity_B_T_D - target_B_T_D).square().mean(-1)
        loss = masked_sum(mse_B_T, b.rollout.mask_B_T) / b.normalizer
        n = b.rollout.mask_B_T.sum().clamp(min=1)
        return loss, {"fm_loss": float(masked_sum(mse_B_T.detach(), b.rollout.mask_B_T) / n)}


@OBJECTIVES.register("flow_grpo")
class FlowGRPO:
    """Flow-GRPO: group-normalised image reward as the advantage of every denoising step,
    clipped ratio of step log-probs, closed-form step KL to the frozen initial model."""

    needs_teacher = False
    needs_rewards = True
    scores_with_teacher = False
    policy_gradient = True
    temperature = 1.0

    def __init__(
        self,
        clip_eps: float | None = 1e-4,
        kl_beta: float = 0.04,
        kl_form: Literal["paper", "code"] = "paper",
        adv_clip_max: float | None = 5.0,
        timestep_fraction: float = 1.0,
        timestep_selection: Selection = "first",
        scale_by_std: bool = True,
    ):
        if clip_eps is not None and not 0.0 < clip_eps < 1.0:
            raise ValueError(f"objective.clip_eps must lie in (0, 1) or be null, got {clip_eps}")
        if kl_beta < 0:
            raise ValueError(f"objective.kl_beta must be >= 0, got {kl_beta}")
        _check_fraction(timestep_fraction)
        self.clip_eps, self.kl_beta, self.kl_form, self.adv_clip_max = clip_eps, kl_beta, kl_form, adv_clip_max
        self.timestep_fraction, self.timestep_selection, self.scale_by_std = timestep_fraction, timestep_selection, scale_by_std
        self.needs_reference = kl_beta > 0

    def pick_source(self, rng: random.Random) -> str:
        return "student"

    def prepare(self, rollout: Rollout) -> None:
        assert rollout.rewards_B is not None and rollout.group_ids_B is not None, "Flow-GRPO needs rewards and group ids"
        rollout.extras["advantage_B"] = group_advantages(rollout.rewards_B, rollout.group_ids_B, scale_by_std=self.scale_by_std)
        _train_timesteps(rollout, self.timestep_fraction, self.timestep_selection)

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        if "advantage_B" not in r.extras:
            self.prepare(r)
        logp_B_T = b.student.log_prob(r.actions)
        kl_B_T = None
        if b.reference is not None and self.kl_beta > 0:
            kl_B_T = flow_grpo_kl(b.student.velocity_B_T_D, b.reference.velocity_B_T_D, b.student.kl_weight_B_T, b.student.dt_B_T, self.kl_form)
        loss, metrics = flow_grpo_loss(
            logp_B_T, r.behavior_logp_B_T, r.extras["advantage_B"], r.mask_B_T, kl_B_T=kl_B_T,
            clip_eps=self.clip_eps, adv_clip_max=self.adv_clip_max, kl_beta=self.kl_beta, normalizer=b.normalizer,
        )
        metrics["reward"] = float(r.rewards_B.mean())
        return loss, metrics


@OBJECTIVES.register("flow_opd")
class FlowOPD:
    """Flow-OPD: the (routed) teachers' velocities on the student's own SDE states; dense reward
    `-d_t(sg(v_theta), v_tgt)` in a clipped update ("clipped") or the direct per-step KL ("gkd");
    plus Manifold Anchor Regularization against the stage's `anchor` (mar_coef > 0)."""

    needs_teacher = True
    needs_reference = False
    needs_rewards = False
    scores_with_teacher = True
    temperature = 1.0

    def __init__(
        self,
        variant: Literal["clipped", "gkd"] = "gkd",
        reward_scale: Literal["paper", "code", "flat"] = "paper",
        coef: float = 1.0,
        gamma: float = 1.0,
        clip_eps: float | None = 1e-4,
        mar_coef: float = 0.04,
        timestep_fraction: float = 1.0,
        timestep_selection: Selection = "first",
    ):
        if variant not in ("clipped", "gkd"):
            raise ValueError(f"objective.variant must be 'clipped' or 'gkd', got {variant!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"objective.gamma must lie in [0, 1], got {gamma}")
        if mar_coef < 0:
            raise ValueError(f"objective.mar_coef must be >= 0, got {mar_coef}")
        if clip_eps is not None and not 0.0 < clip_eps < 1.0:
            raise ValueError(f"objective.clip_eps must lie in (0, 1) or be null, got {clip_eps}")
        _check_fraction(timestep_fraction)
        self.variant, self.reward_scale, self.coef, self.gamma = variant, reward_scale, coef, gamma
        self.clip_eps, self.mar_coef, self.timestep_fraction = clip_eps, mar_coef, timestep_fraction
        self.timestep_selection = timestep_selection
        self.needs_anchor = mar_coef > 0
        self.policy_gradient = variant == "clipped"

    def pick_source(self, rng: random.Random) -> str:
        return "student"

    def prepare(self, rollout: Rollout) -> None:
        _train_timesteps(rollout, self.timestep_fraction, self.timestep_selection)

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r, s = b.rollout, b.student
        clipped = self.variant == "clipped"
        loss, metrics = flow_opd_loss(
            s.log_prob(r.actions) if clipped else None, r.behavior_logp_B_T if clipped else None,
            s.velocity_B_T_D, b.teacher.velocity_B_T_D, s.kl_weight_B_T, s.dt_B_T, r.mask_B_T,
            variant=self.variant, reward_scale=self.reward_scale, coef=self.coef, gamma=self.gamma, clip_eps=self.clip_eps,
            v_anchor_B_T_D=b.anchor.velocity_B_T_D if (b.anchor is not None and self.mar_coef > 0) else None,
            mar_coef=self.mar_coef, normalizer=b.normalizer,
        )
        if r.rewards_B is not None:
            metrics["image_reward"] = float(r.rewards_B.mean())
        return loss, metrics
