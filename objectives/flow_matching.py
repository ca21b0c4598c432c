"""Rectified-flow matching (docs/objectives.md section 6.4): base training and the Flow-OPD cold start.

The adapter draws a forward-process rollout (`RolloutRequest.kind = "forward_process"`): one
noise level s per clean image x0 (rendered by the task, `source: dataset`, or sampled by the
routed teachers, `source: teacher`), the state `x_s = (1 - s) x0 + s eps` and the target
velocity `eps - x0` in `rollout.extras["target_v_B_T_D"]`.  The loss is

    L = sum_b m_b mean_D (v_theta(x_s, s, c) - (eps - x0))^2 / normalizer

with a fraction `cond_dropout` of the conditions replaced by the empty prompt (so classifier-free
guidance has an unconditional velocity to use) and s drawn logit-normal (SD3's default) or uniform.

    objective: {type: flow_matching, source: dataset, cond_dropout: 0.1}
"""

from __future__ import annotations

import random
from typing import Literal

from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.objectives.policy_gradient import masked_sum
from mmdistill.registry import OBJECTIVES

__all__ = ["flow_matching_loss", "FlowMatching"]


def flow_matching_loss(
    v_B_T_D: Tensor, target_v_B_T_D: Tensor, mask_B_T: Tensor, normalizer: float | Tensor = 1.0
) -> tuple[Tensor, dict[str, float]]:
    """`sum_{b,t} m mean_D (v - target)^2 / normalizer`; metric `fm_loss`, the mean over kept steps."""
    if v_B_T_D.shape != target_v_B_T_D.shape or v_B_T_D.shape[:2] != mask_B_T.shape:
        raise ValueError(
            f"expected velocities and targets [B, T, D] of one shape and a mask [B, T]; got {tuple(v_B_T_D.shape)}, "
            f"{tuple(target_v_B_T_D.shape)} and {tuple(mask_B_T.shape)}"
        )
    mse_B_T = (v_B_T_D - target_v_B_T_D).square().mean(-1)
    loss = masked_sum(mse_B_T, mask_B_T) / normalizer
    n = mask_B_T.sum().clamp(min=1)
    return loss, {"fm_loss": float(masked_sum(mse_B_T.detach(), mask_B_T) / n)}


@OBJECTIVES.register("flow_matching")
class FlowMatching:
    """Rectified-flow matching `E ||v_theta(x_s, s, c) - (eps - x0)||^2` (mean over dims) on clean
    images: rendered by the task (`source: dataset`, base training) or sampled by the routed
    teachers (`source: teacher`, the Flow-OPD cold start by SFT on teacher samples; 2605.08063)."""

    temperature = 1.0

    def __init__(
        self,
        source: Literal["dataset", "teacher"] = "dataset",
        cond_dropout: float = 0.1,
        sigma_sampling: Literal["logit_normal", "uniform"] = "logit_normal",
    ):
        if source not in ("dataset", "teacher"):
            raise ValueError(
                f"objective.source must be 'dataset' (the task's images) or 'teacher' (teacher samples); got {source!r}"
            )
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"objective.cond_dropout must lie in [0, 1), got {cond_dropout}")
        if sigma_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"objective.sigma_sampling must be 'logit_normal' or 'uniform'; got {sigma_sampling!r}")
        self.source, self.cond_dropout, self.sigma_sampling = source, cond_dropout, sigma_sampling
        self.needs = Needs(teacher=source == "teacher")  # the teacher only draws the images

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(
            source=self.source,
            kind="forward_process",
            cond_dropout=self.cond_dropout,
            sigma_sampling=self.sigma_sampling,
        )

    def prepare(self, rollout: Rollout) -> Rollout:
        return rollout

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        target_B_T_D = b.rollout.extras["target_v_B_T_D"]
        return flow_matching_loss(b.student.velocity_B_T_D, target_B_T_D, b.rollout.mask_B_T, b.normalizer)
