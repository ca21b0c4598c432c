"""Reward-aware distillation objectives by their YAML names: `scope`, `kepo`, `sod`, `uniopd`.

Each class keeps only its hyper-parameters and calls the math in scope.py, kepo.py,
sod.py and uniopd.py.  All four learn from the student's own sampled tokens
(`source: student`, policy-gradient scoring at the rollout temperature), need a
teacher and the task verifier's rewards, and follow registered.py's conventions.
A rollout counts as correct (or passes KEPO's gate) when `reward >= reward_threshold`.

SCOPE and Uni-OPD normalise over whole prompt groups: `train.micro_batch_size` must
then be a multiple of `rollout.group_size` (checked at each call).

    mmdistill list
"""
from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from mmdistill.objectives.grpo import group_advantages
from mmdistill.objectives.kepo import kepo_loss
from mmdistill.objectives.registered import ObjectiveBatch
from mmdistill.objectives.scope import scope_loss
from mmdistill.objectives.sod import sod_loss, step_ids
from mmdistill.objectives.uniopd import uniopd_loss
from mmdistill.registry import OBJECTIVES
from mmdistill.rollout import Rollout

__all__ = ["SCOPE", "KEPO", "SOD", "UniOPD"]


def _check_clip(clip_eps: float | None) -> None:
    if clip_eps is not None and not 0.0 < clip_eps < 1.0:
        raise ValueError(f"objective.clip_eps must lie in (0, 1) or be null, got {clip_eps}")


def _rewards(r: Rollout, name: str) -> Tensor:
    if r.rewards_B is None:
        raise ValueError(f"objective '{name}' needs verifier rewards but the rollout has none; use a task with a verifier")
    return r.rewards_B


def _group_ids(r: Rollout, name: str) -> Tensor:
    if r.group_ids_B is None:
        raise ValueError(f"objective '{name}' needs rollout.group_ids_B (rollouts of one prompt share an id)")
    return r.group_ids_B


def _record_group_sizes(rollout: Rollout, name: str) -> None:
    """Before micro-batching: how many rollouts each row's group has in the whole step."""
    ids_B = _group_ids(rollout, name)
    _, group_B, count_G = torch.unique(ids_B, return_inverse=True, return_counts=True)
    rollout.extras["group_size_B"] = count_G[group_B]


def _check_whole_groups(r: Rollout, name: str) -> None:
    """Raise if this micro-batch holds only part of a prompt group."""
    if "group_size_B" not in r.extras:  # called without prepare(): the batch is the whole rollout
        return
    _, group_B, count_G = torch.unique(_group_ids(r, name), return_inverse=True, return_counts=True)
    here_B, full_B = count_G[group_B], r.extras["group_size_B"].to(count_G.device)
    if not torch.equal(here_B, full_B):
        raise ValueError(
            f"objective '{name}' normalises over whole prompt groups, but a micro-batch holds {int(here_B.min())} of "
            f"{int(full_B.max())} rollouts of a group; set train.micro_batch_size to a multiple of rollout.group_size"
        )


class _RewardAwareOPD:
    """Shared class attributes: student rollouts, teacher-scored, verifier-rewarded."""

    needs_teacher = True
    needs_reference = False
    needs_rewards = True
    scores_with_teacher = True
    source = "student"
    policy_gradient = True  # scored at the rollout temperature, so ratios compare like with like

    def pick_source(self, rng: random.Random) -> str:
        return "student"

    def _logps(self, b: ObjectiveBatch) -> tuple[Tensor, Tensor]:
        r = b.rollout
        logp_B_T = b.student.log_prob(r.actions)
        with torch.no_grad():
            teacher_logp_B_T = b.teacher.log_prob(r.actions)
        return logp_B_T, teacher_logp_B_T

    def _whole_group_loss(self, b: ObjectiveBatch, name: str, loss_fn: Any, **hyper: Any) -> tuple[Tensor, dict[str, float]]:
        """`loss_fn(logp, behavior, teacher, mask, correct_B, group_ids_B, ..., normalizer)` on whole prompt groups."""
        r = b.rollout
        _check_whole_groups(r, name)
        correct_B = _rewards(r, name) >= self.reward_threshold
        logp_B_T, teacher_logp_B_T = self._logps(b)
        loss, metrics = loss_fn(logp_B_T, r.behavior_logp_B_T, teacher_logp_B_T, r.mask_B_T, correct_B, _group_ids(r, name),
                                normalizer=b.normalizer, **hyper)
        metrics["reward"] = float(r.rewards_B.float().mean())
        return loss, metrics


@OBJECTIVES.register("scope")
class SCOPE(_RewardAwareOPD):
    """SCOPE: per group, correct rollouts get student-perplexity-weighted MLE, wrong ones
    teacher-perplexity-weighted OPD (weights PPL_S^(1/tau), PPL_T^(-1/tau), normalised per branch)."""

    def __init__(self, tau: float = 1.0, coef: float = 1.0, mle_coef: float = 1.0, reward_threshold: float = 0.5,
                 clip_eps: float | None = None):
        if not tau > 0:
            raise ValueError(f"objective.tau must be > 0 (1 = the paper's setting), got {tau}")
        if mle_coef < 0:
            raise ValueError(f"objective.mle_coef must be >= 0, got {mle_coef}")
        _check_clip(clip_eps)
        self.tau, self.coef, self.mle_coef, self.reward_threshold, self.clip_eps = tau, coef, mle_coef, reward_threshold, clip_eps

    def prepare(self, rollout: Rollout) -> None:
        _record_group_sizes(rollout, "scope")

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        return self._whole_group_loss(b, "scope", scope_loss, tau=self.tau, coef=self.coef, mle_coef=self.mle_coef, clip_eps=self.clip_eps)


@OBJECTIVES.register("kepo")
class KEPO(_RewardAwareOPD):
    """KEPO's quality-gated OPD: the OPD loss only on rollouts with reward >= reward_threshold."""

    def __init__(self, reward_threshold: float = 0.5, coef: float = 1.0, gamma: float = 0.0, clip_eps: float | None = None):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"objective.gamma must lie in [0, 1], got {gamma}")
        _check_clip(clip_eps)
        self.reward_threshold, self.coef, self.gamma, self.clip_eps = reward_threshold, coef, gamma, clip_eps

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        logp_B_T, teacher_logp_B_T = self._logps(b)
        loss, metrics = kepo_loss(
            logp_B_T, r.behavior_logp_B_T, teacher_logp_B_T, r.mask_B_T, _rewards(r, "kepo"),
            threshold=self.reward_threshold, coef=self.coef, gamma=self.gamma, clip_eps=self.clip_eps,
            normalizer=b.normalizer,
        )
        metrics["reward"] = float(r.rewards_B.float().mean())
        return loss, metrics


@OBJECTIVES.register("sod")
class SOD(_RewardAwareOPD):
    """SOD: GRPO advantage plus step-reweighted teacher signal coef * w_k * (log pi_T - log pi_S),
    w_k = min((d_1+eps)/(d_k+eps), 1+delta); PPO-clipped.  Steps: a delimiter token or fixed length."""

    def __init__(self, coef: float = 1.0, delta: float = 0.2, eps: float = 1e-6, step_token_id: int | None = None,
                 step_len: int | None = 32, clip_eps: float = 0.2, clip_eps_high: float | None = None):
        if (step_token_id is None) == (step_len is None):
            raise ValueError(
                f"objective: set exactly one of step_token_id (a delimiter) and step_len (fixed length), got "
                f"step_token_id={step_token_id}, step_len={step_len}; to split at a delimiter also set step_len: null"
            )
        if step_len is not None and step_len < 1:
            raise ValueError(f"objective.step_len must be >= 1 tokens per step, got {step_len}")
        if delta < 0:
            raise ValueError(f"objective.delta must be >= 0 (0.2 in the paper), got {delta}")
        if not eps > 0:
            raise ValueError(f"objective.eps must be > 0, got {eps}")
        if not 0.0 < clip_eps < 1.0:
            raise ValueError(f"objective.clip_eps must lie in (0, 1), got {clip_eps}")
        self.coef, self.delta, self.eps = coef, delta, eps
        self.step_token_id, self.step_len = step_token_id, step_len
        self.clip_eps, self.clip_eps_high = clip_eps, clip_eps_high

    def prepare(self, rollout: Rollout) -> None:
        """GRPO advantages over the whole step's rollout, before it is cut into micro-batches."""
        rollout.extras["advantage_B"] = group_advantages(_rewards(rollout, "sod"), _group_ids(rollout, "sod"))

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        if "advantage_B" not in r.extras:
            self.prepare(r)
        logp_B_T, teacher_logp_B_T = self._logps(b)
        ids_B_T = step_ids(r.actions, r.mask_B_T, step_token_id=self.step_token_id, step_len=self.step_len)
        loss, metrics = sod_loss(
            logp_B_T, r.behavior_logp_B_T, teacher_logp_B_T, r.mask_B_T, ids_B_T, r.extras["advantage_B"],
            coef=self.coef, delta=self.delta, eps=self.eps, clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high,
            normalizer=b.normalizer,
        )
        metrics["reward"] = float(r.rewards_B.float().mean())
        return loss, metrics


@OBJECTIVES.register("uniopd")
class UniOPD(_RewardAwareOPD):
    """Uni-OPD margin calibration: OPD advantages shifted per group so that correct rollouts'
    mean advantage exceeds wrong ones' by at least delta."""

    def __init__(self, delta: float = 0.4, coef: float = 1.0, gamma: float = 0.0, reward_threshold: float = 0.5,
                 clip_eps: float | None = None):
        if delta < 0:
            raise ValueError(f"objective.delta must be >= 0 (0.4 in the paper), got {delta}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"objective.gamma must lie in [0, 1], got {gamma}")
        _check_clip(clip_eps)
        self.delta, self.coef, self.gamma, self.reward_threshold, self.clip_eps = delta, coef, gamma, reward_threshold, clip_eps

    def prepare(self, rollout: Rollout) -> None:
        _record_group_sizes(rollout, "uniopd")

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        return self._whole_group_loss(b, "uniopd", uniopd_loss, delta=self.delta, coef=self.coef, gamma=self.gamma, clip_eps=self.clip_eps)
