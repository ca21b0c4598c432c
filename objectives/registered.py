"""The objectives by their YAML names, built from config keys (`objective: {type: opd, coef: 1.0}`).

Each class keeps only its hyper-parameters and calls the math in the
one-algorithm-per-file modules beside it.  The training loop asks each
objective where its rollouts come from (`source`) and what it needs
(teacher, reference, rewards), then calls it on an `ObjectiveBatch`.

    mmdistill list
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mmdistill.objectives.grpo import group_advantages, grpo_loss
from mmdistill.objectives.opd import opd_loss
from mmdistill.registry import OBJECTIVES
from mmdistill.rollout import Rollout

Source = Literal["student", "teacher", "dataset"]


@dataclass
class ObjectiveBatch:
    """Everything an objective may use for one micro-batch."""

    rollout: Rollout
    student: Any  # StepDist with gradient
    teacher: Any | None = None  # StepDist, no gradient
    reference: Any | None = None  # StepDist of the frozen initial policy
    normalizer: float = 1.0  # global number of trained steps in the optimizer step
    anchor: Any | None = None  # StepDist of a frozen anchor model (Manifold Anchor Regularization)


def _masked_sum(x_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    return (x_B_T * mask_B_T).sum()


@OBJECTIVES.register("sft")
class SFT:
    """Token cross-entropy on dataset (gold) or teacher-sampled completions (sequence-level KD)."""

    needs_teacher = False
    needs_reference = False
    needs_rewards = False
    scores_with_teacher = False  # the teacher (source=teacher) only writes the completions
    temperature = 1.0

    def __init__(self, source: Literal["dataset", "teacher"] = "dataset"):
        self.source = source
        self.needs_teacher = source == "teacher"

    def pick_source(self, rng: random.Random) -> str:
        return self.source

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        logp_B_T = b.student.log_prob(b.rollout.actions)
        loss = -_masked_sum(logp_B_T, b.rollout.mask_B_T) / b.normalizer
        n = b.rollout.mask_B_T.sum().clamp(min=1)
        return loss, {"nll": float(-_masked_sum(logp_B_T.detach(), b.rollout.mask_B_T) / n)}


class _Divergence:
    """Full-vocabulary generalized JSD(beta) between student and teacher on the rollout's states.

    beta = 0 forward KL(T||S), beta = 1 reverse KL(S||T).  `topk`: compare on the
    teacher's top-k tokens plus one tail bucket instead of the full vocabulary.
    """

    needs_teacher = True
    needs_reference = False
    needs_rewards = False
    scores_with_teacher = True
    beta: float

    def __init__(self, beta: float, source: Source = "student", topk: int | None = None, temperature: float = 1.0):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"objective.beta must lie in [0, 1], got {beta}")
        if temperature <= 0:
            raise ValueError(f"objective.temperature must be > 0, got {temperature}")
        if topk is not None and topk < 1:
            raise ValueError(f"objective.topk must be >= 1 (or null for the full vocabulary), got {topk}")
        self.beta, self.source, self.topk, self.temperature = beta, source, topk, temperature

    def pick_source(self, rng: random.Random) -> str:
        return self.source

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        teacher = b.teacher.topk(self.topk) if self.topk else b.teacher
        d_B_T = b.student.divergence(teacher, beta=self.beta)
        loss = _masked_sum(d_B_T, b.rollout.mask_B_T) / b.normalizer
        n = b.rollout.mask_B_T.sum().clamp(min=1)
        return loss, {"divergence": float(_masked_sum(d_B_T.detach(), b.rollout.mask_B_T) / n)}


@OBJECTIVES.register("reverse_kl")
class ReverseKL(_Divergence):
    """On-policy distillation, full-distribution form: sum_t KL(pi_S || pi_T) on the student's prefixes."""

    def __init__(self, source: Source = "student", topk: int | None = None, temperature: float = 1.0):
        super().__init__(1.0, source, topk, temperature)


@OBJECTIVES.register("forward_kl")
class ForwardKL(_Divergence):
    """sum_t KL(pi_T || pi_S); with source=teacher it is the forward-KL warm-up on teacher rollouts."""

    def __init__(self, source: Source = "teacher", topk: int | None = None, temperature: float = 1.0):
        super().__init__(0.0, source, topk, temperature)


@OBJECTIVES.register("jsd")
class JSD(_Divergence):
    """Generalized JSD(beta) (GKD), on the chosen rollout source."""

    def __init__(self, beta: float = 0.5, source: Source = "student", topk: int | None = None, temperature: float = 1.0):
        super().__init__(beta, source, topk, temperature)


@OBJECTIVES.register("gkd")
class GKD(_Divergence):
    """GKD (Agarwal et al.): generalized JSD on student samples with probability `lmbda`, else on dataset sequences."""

    def __init__(self, beta: float = 0.5, lmbda: float = 0.5, topk: int | None = None, temperature: float = 1.0):
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"objective.lmbda must lie in [0, 1], got {lmbda}")
        super().__init__(beta, "student", topk, temperature)
        self.lmbda = lmbda

    def pick_source(self, rng: random.Random) -> str:
        return "student" if rng.random() < self.lmbda else "dataset"


@OBJECTIVES.register("hard_ce")
class HardCE:
    """DAgger-style hard cross-entropy: -sum_t log pi_S(mode of pi_T(.|s_t)) on the student's own
    states (the teacher's most likely action as the label; mode-collapsing by design)."""

    needs_teacher = True
    needs_reference = False
    needs_rewards = False
    scores_with_teacher = True
    temperature = 1.0

    def __init__(self, source: Source = "student"):
        self.source = source

    def pick_source(self, rng: random.Random) -> str:
        return self.source

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        nll_B_T = -b.student.log_prob(b.teacher.mode().detach())
        loss = _masked_sum(nll_B_T, b.rollout.mask_B_T) / b.normalizer
        n = b.rollout.mask_B_T.sum().clamp(min=1)
        return loss, {"nll": float(_masked_sum(nll_B_T.detach(), b.rollout.mask_B_T) / n)}


@OBJECTIVES.register("opd")
class OPD:
    """Sampled-token on-policy distillation: advantage -coef (log pi_old - log pi_T), discounted by gamma,
    in an importance-sampling (clip_eps null) or PPO-clipped policy-gradient update."""

    needs_teacher = True
    needs_reference = False
    needs_rewards = False
    scores_with_teacher = True
    source = "student"
    policy_gradient = True  # scored at the rollout temperature, so ratios compare like with like

    def __init__(self, coef: float = 1.0, gamma: float = 0.0, clip_eps: float | None = None):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"objective.gamma must lie in [0, 1], got {gamma}")
        if clip_eps is not None and not 0.0 < clip_eps < 1.0:
            raise ValueError(f"objective.clip_eps must lie in (0, 1) or be null, got {clip_eps}")
        self.coef, self.gamma, self.clip_eps = coef, gamma, clip_eps

    def pick_source(self, rng: random.Random) -> str:
        return "student"

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        logp_B_T = b.student.log_prob(r.actions)
        with torch.no_grad():
            teacher_logp_B_T = b.teacher.log_prob(r.actions)
        return opd_loss(
            logp_B_T, r.behavior_logp_B_T, teacher_logp_B_T, r.mask_B_T,
            coef=self.coef, gamma=self.gamma, clip_eps=self.clip_eps, normalizer=b.normalizer,
        )


@OBJECTIVES.register("grpo")
class GRPO:
    """GRPO: group-normalised verifier reward, clipped ratio, k3 KL to the frozen initial policy."""

    needs_teacher = False
    needs_rewards = True
    scores_with_teacher = False
    source = "student"
    policy_gradient = True

    def __init__(self, clip_eps: float = 0.2, clip_eps_high: float | None = None, kl_beta: float = 0.04, scale_by_std: bool = True):
        if not 0.0 < clip_eps < 1.0:
            raise ValueError(f"objective.clip_eps must lie in (0, 1), got {clip_eps}")
        if kl_beta < 0:
            raise ValueError(f"objective.kl_beta must be >= 0, got {kl_beta}")
        self.clip_eps, self.clip_eps_high, self.kl_beta, self.scale_by_std = clip_eps, clip_eps_high, kl_beta, scale_by_std
        self.needs_reference = kl_beta > 0

    def pick_source(self, rng: random.Random) -> str:
        return "student"

    def prepare(self, rollout: Rollout) -> None:
        """Group advantages over the whole step's rollout, before it is cut into micro-batches."""
        assert rollout.rewards_B is not None and rollout.group_ids_B is not None, "GRPO needs rewards and group ids"
        rollout.extras["advantage_B"] = group_advantages(rollout.rewards_B, rollout.group_ids_B, scale_by_std=self.scale_by_std)

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        if "advantage_B" not in r.extras:
            self.prepare(r)
        adv_B = r.extras["advantage_B"]
        logp_B_T = b.student.log_prob(r.actions)
        ref_B_T = None
        if b.reference is not None:
            with torch.no_grad():
                ref_B_T = b.reference.log_prob(r.actions)
        loss, metrics = grpo_loss(
            logp_B_T, r.behavior_logp_B_T, adv_B, r.mask_B_T, ref_logp_B_T=ref_B_T,
            clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high, kl_beta=self.kl_beta, normalizer=b.normalizer,
        )
        metrics["reward"] = float(r.rewards_B.mean())
        return loss, metrics
