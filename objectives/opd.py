"""Sampled-token on-policy distillation (OPD; docs/objectives.md section 1).

The student samples `y ~ pi_old`; the teacher scores the sampled tokens; the negative
per-token reverse-KL estimate is a reward (stop-gradient)::

    A_t = A_env,t - coef * m_t * (log pi_old(y_t) - log pi_T(y_t)),  then discounted with gamma
    L   = -sum_t rho_t * A_t * m_t / normalizer       (rho = pi_theta / pi_old; or PPO-clipped)

In expectation over `y ~ pi_theta` (rho = 1) the gradient of L is the gradient of
`KL(pi_theta || pi_T)` at each visited state (tests/test_objectives_pg.py checks it by
exact enumeration).

The registered `opd` objective feeds it the student's log-probs of its own sampled tokens and
the teacher's, both scored at the rollout's sampling temperature (`Needs.sampled_actions`).

    objective: {type: opd, coef: 1.0, gamma: 0.0, clip_eps: null}
    objective: {type: opd, clip_eps: 0.2, baseline: per_state}     # continuous actions: a per-state baseline
    Run its tests: ``pytest tests/test_objectives_pg.py -q``
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.objectives.policy_gradient import (
    check_same_shape,
    discounted_cumsum,
    masked_sum,
    policy_gradient_loss,
)
from mmdistill.registry import OBJECTIVES

__all__ = ["opd_advantages", "opd_loss", "check_gamma", "check_clip_eps", "sampled_logps", "OPD"]


@torch.no_grad()
def opd_advantages(
    behavior_logp_B_T: torch.Tensor,
    teacher_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    coef: float = 1.0,
    gamma: float = 0.0,
    env_advantage_B_T: torch.Tensor | None = None,
    baseline_B_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token OPD advantage `[B, T]` (no gradient): `A_env - coef * m * (behavior_logp - teacher_logp - b)`,
    discounted with gamma (gamma 0 = next token only).  Masked positions are 0.  `baseline_B_T` (b, default
    none) is a per-state baseline of the log-ratio, e.g. its closed-form expectation KL(pi || pi_T)(s_t)."""
    check_same_shape(
        behavior_logp=behavior_logp_B_T,
        teacher_logp=teacher_logp_B_T,
        mask=mask_B_T,
        env_advantage=env_advantage_B_T,
        baseline=baseline_B_T,
    )
    keep = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
    reverse_kl_B_T = behavior_logp_B_T - teacher_logp_B_T.to(behavior_logp_B_T.dtype)
    if baseline_B_T is not None:
        reverse_kl_B_T = reverse_kl_B_T - baseline_B_T.to(reverse_kl_B_T.dtype)
    advantage_B_T = torch.where(keep, -float(coef) * reverse_kl_B_T, torch.zeros_like(reverse_kl_B_T))
    if mask_B_T.dtype != torch.bool:
        advantage_B_T = advantage_B_T * mask_B_T.to(advantage_B_T.dtype)
    if env_advantage_B_T is not None:
        advantage_B_T = advantage_B_T + env_advantage_B_T.to(advantage_B_T.dtype)
    return discounted_cumsum(advantage_B_T, gamma, keep)


def opd_loss(
    logp_B_T: torch.Tensor,
    behavior_logp_B_T: torch.Tensor,
    teacher_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    coef: float = 1.0,
    gamma: float = 0.0,
    clip_eps: float | None = None,
    normalizer: float | torch.Tensor | None = None,
    env_advantage_B_T: torch.Tensor | None = None,
    baseline_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """OPD loss: `opd_advantages` fed to `policy_gradient_loss` (importance sampling, or
    PPO-clipped when clip_eps is set).  Metrics add `reverse_kl`, the mean of
    `behavior_logp - teacher_logp` over kept tokens (a sampled estimate of KL(pi_old || pi_T)), and
    `advantage_std`, the standard deviation of the advantage over kept tokens."""
    advantage_B_T = opd_advantages(
        behavior_logp_B_T, teacher_logp_B_T, mask_B_T, coef, gamma, env_advantage_B_T, baseline_B_T
    )
    loss, metrics = policy_gradient_loss(
        logp_B_T, behavior_logp_B_T, advantage_B_T, mask_B_T, clip_eps=clip_eps, normalizer=normalizer
    )
    with torch.no_grad():
        keep = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
        count = keep.sum().clamp(min=1)
        reverse_kl = masked_sum(behavior_logp_B_T - teacher_logp_B_T.to(behavior_logp_B_T.dtype), keep) / count
        adv_mean = masked_sum(advantage_B_T, keep) / count
        adv_var = masked_sum((advantage_B_T - adv_mean) ** 2, keep) / count
    metrics["reverse_kl"] = float(reverse_kl)
    metrics["advantage_std"] = float(adv_var.sqrt())
    return loss, metrics


def check_gamma(gamma: float) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"objective.gamma must lie in [0, 1], got {gamma}")


def check_clip_eps(clip_eps: float | None) -> None:
    if clip_eps is not None and not 0.0 < clip_eps < 1.0:
        raise ValueError(f"objective.clip_eps must lie in (0, 1) or be null, got {clip_eps}")


def sampled_logps(b: ObjectiveBatch) -> tuple[Tensor, Tensor]:
    """`(logp_B_T, teacher_logp_B_T)`: the student's (with gradient) and the teacher's (without) log-probs
    of the rollout's own actions; shared by OPD and its reward-aware variants (SCOPE, KEPO, SOD, Uni-OPD)."""
    actions = b.rollout.actions
    logp_B_T = b.student.log_prob(actions)
    with torch.no_grad():
        teacher_logp_B_T = b.teacher.log_prob(actions)
    return logp_B_T, teacher_logp_B_T


@OBJECTIVES.register("opd")
class OPD:
    """Sampled-token on-policy distillation: advantage -coef (log pi_old - log pi_T), discounted by gamma,
    in an importance-sampling (clip_eps null) or PPO-clipped policy-gradient update.

    baseline `none` (default): the raw log-ratio is the reward (the paper's form).  `per_state`: the
    closed-form KL(pi_theta || pi_T) at each visited state (no gradient) is subtracted from the log-ratio,
    so each state's advantage has mean zero under the sampling policy on the first pass.  A baseline that
    depends on the state only leaves the expected gradient unchanged and removes the per-state offset
    that dominates the variance of continuous actions (a Gaussian's log-ratio is hundreds of nats);
    it needs gamma 0 (a discounted sum would carry later states' baselines, which depend on the action)
    and a step distribution with a closed-form `kl` (Gaussian, GaussianBernoulli, categorical).
    """

    temperature = 1.0  # unused: scored at the rollout temperature, so ratios compare like with like

    def __init__(
        self,
        coef: float = 1.0,
        gamma: float = 0.0,
        clip_eps: float | None = None,
        baseline: Literal["none", "per_state"] = "none",
    ):
        check_gamma(gamma)
        check_clip_eps(clip_eps)
        if baseline not in ("none", "per_state"):
            raise ValueError(f"objective.baseline must be 'none' or 'per_state', got {baseline!r}")
        if baseline == "per_state" and gamma != 0.0:
            raise ValueError(
                f"objective.baseline per_state needs gamma 0 (got {gamma}): a discounted return would carry later "
                "states' baselines, which depend on the action; set gamma: 0"
            )
        self.coef, self.gamma, self.clip_eps, self.baseline = coef, gamma, clip_eps, baseline
        self.needs = Needs(teacher=True, teacher_scores=True, sampled_actions=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source="student")

    def prepare(self, rollout: Rollout) -> Rollout:
        return rollout

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        logp_B_T, teacher_logp_B_T = sampled_logps(b)
        baseline_B_T = None
        if self.baseline == "per_state":
            with torch.no_grad():
                baseline_B_T = b.student.kl(b.teacher)
        loss, metrics = opd_loss(
            logp_B_T,
            r.behavior_logp_B_T,
            teacher_logp_B_T,
            r.mask_B_T,
            coef=self.coef,
            gamma=self.gamma,
            clip_eps=self.clip_eps,
            normalizer=b.normalizer,
            baseline_B_T=baseline_B_T,
        )
        if baseline_B_T is not None:
            keep = r.mask_B_T != 0
            metrics["baseline_mean"] = float(masked_sum(baseline_B_T, keep) / keep.sum().clamp(min=1))
        return loss, metrics
