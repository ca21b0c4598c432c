"""Distillation objectives whose rollouts the teacher shapes, by their YAML names:
`opsd`, `brts`, `ampo`, `dagger`.

Each declares to the adapter what its rollout needs (see `Rollout` and `TeacherGuidance`):
- `opsd`: `self_teacher` + `privileged_context`: the teacher is the student's own weights
  given the reference solution before the question (`rollout.teacher_view()`);
- `brts`: `teacher_guidance` always: the best of `n` teacher samples per prompt joins the batch;
- `ampo`: `teacher_guidance` when every student rollout of a prompt failed;
- `dagger`: `mixture_beta`: tokens drawn from the teacher with an annealed probability.

    mmdistill list
"""
from __future__ import annotations

import random
from typing import Literal

import torch
from torch import Tensor

from mmdistill.objectives.ampo import ampo_loss
from mmdistill.objectives.brts import branch_token_counts, brts_loss
from mmdistill.objectives.dagger import mixture_beta
from mmdistill.objectives.grpo import group_advantages
from mmdistill.objectives.registered import ObjectiveBatch, _Divergence
from mmdistill.registry import OBJECTIVES
from mmdistill.rollout import Rollout, TeacherGuidance

__all__ = ["OPSD", "BRTS", "AMPO", "DAgger"]


def _masked_mean(x_B_T: Tensor, mask_B_T: Tensor) -> float:
    return float((x_B_T.detach() * mask_B_T).sum() / mask_B_T.sum().clamp(min=1))


@OBJECTIVES.register("opsd")
class OPSD(_Divergence):
    """On-policy self-distillation: the student, shown the reference solution, teaches itself
    without it; per-token generalized JSD(beta) on the student's own rollouts (beta=1 reverse KL)."""

    needs_teacher = False
    self_teacher = True  # the loop scores the teacher side with the student's current weights, no gradient
    privileged_context = True  # the adapter stores the teacher's prompts (solution shown) in the rollout

    def __init__(self, beta: float = 1.0, topk: int | None = None, temperature: float = 1.0,
                 privileged_template: str = "{solution}\n{question}"):
        super().__init__(beta, "student", topk, temperature)
        if "{question}" not in privileged_template or "{solution}" not in privileged_template and "{answer}" not in privileged_template:
            raise ValueError("objective.privileged_template must contain {question} and {solution} (or {answer}), "
                             "e.g. 'Reference solution: {solution}\nNow solve: {question}'")
        self.privileged_template = privileged_template


@OBJECTIVES.register("brts")
class BRTS(_Divergence):
    """BRTS: student-context OPD (top-k reverse KL) plus kappa x the same divergence on the best of
    n teacher rollouts per prompt (correct first, then the one the student finds most likely)."""

    def __init__(self, kappa: float = 0.05, n: int = 2, topk: int | None = 16, beta: float = 1.0,
                 reward_threshold: float = 0.5, temperature: float = 1.0):
        if kappa < 0:
            raise ValueError(f"objective.kappa must be >= 0 (0.05 in the paper), got {kappa}")
        if n < 1:
            raise ValueError(f"objective.n must be >= 1 teacher samples per prompt, got {n}")
        super().__init__(beta, "student", topk, temperature)
        self.kappa = kappa
        self.teacher_guidance = TeacherGuidance(n=n, keep=1, when="always", threshold=reward_threshold)

    def prepare(self, rollout: Rollout) -> None:
        rollout.extras["branch_tokens"] = branch_token_counts(rollout.mask_B_T, rollout.extras["from_teacher_B"])

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        teacher = b.teacher.topk(self.topk) if self.topk else b.teacher
        d_B_T = b.student.divergence(teacher, beta=self.beta)
        n_student, n_teacher = r.extras.get("branch_tokens") or branch_token_counts(r.mask_B_T, r.extras["from_teacher_B"])
        loss, metrics = brts_loss(d_B_T, r.mask_B_T, r.extras["from_teacher_B"], self.kappa, n_student, n_teacher)
        student_B = ~r.extras["from_teacher_B"]
        if r.rewards_B is not None:
            metrics["teacher_ctx_reward"] = float(r.rewards_B[~student_B].float().mean()) if (~student_B).any() else 0.0
        return loss, metrics


@OBJECTIVES.register("ampo")
class AMPO:
    """AMPO-style guidance on demand: GRPO on the student's groups; for prompts where every student
    rollout failed, up to `keep` of `n` teacher rollouts (correct first, then the ones the student
    finds most likely) join the group and its advantages (teacher rows on-policy, ratio 1)."""

    needs_teacher = True
    needs_reference = False
    needs_rewards = True
    scores_with_teacher = False  # the teacher only writes guidance rollouts
    source = "student"
    policy_gradient = True

    def __init__(self, n: int = 2, keep: int = 1, clip_eps: float = 0.2, reward_threshold: float = 0.5,
                 scale_by_std: bool = True):
        if not 0.0 < clip_eps < 1.0:
            raise ValueError(f"objective.clip_eps must lie in (0, 1), got {clip_eps}")
        self.clip_eps, self.scale_by_std = clip_eps, scale_by_std
        self.teacher_guidance = TeacherGuidance(n=n, keep=keep, when="all_failed", threshold=reward_threshold, only_correct=True)

    def pick_source(self, rng: random.Random) -> str:
        return "student"

    def prepare(self, rollout: Rollout) -> None:
        rollout.extras["advantage_B"] = group_advantages(rollout.rewards_B, rollout.group_ids_B, scale_by_std=self.scale_by_std)

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        if "advantage_B" not in r.extras:
            self.prepare(r)
        from_teacher_B = r.extras.get("from_teacher_B", torch.zeros(r.batch_size, dtype=torch.bool, device=r.actions.device))
        logp_B_T = b.student.log_prob(r.actions)
        loss, metrics = ampo_loss(logp_B_T, r.behavior_logp_B_T, r.extras["advantage_B"], r.mask_B_T, from_teacher_B,
                                  clip_eps=self.clip_eps, normalizer=b.normalizer)
        student_B = ~from_teacher_B
        metrics["reward"] = float(r.rewards_B[student_B].float().mean()) if student_B.any() else 0.0
        return loss, metrics


@OBJECTIVES.register("dagger")
class DAgger:
    """DAgger mixing: each token is the teacher's with probability beta_k (annealed from beta0 to 0),
    and the student learns the teacher's labels at every visited state (soft: forward KL; hard: argmax CE)."""

    needs_teacher = True
    needs_reference = False
    needs_rewards = False
    scores_with_teacher = True
    source = "student"
    temperature = 1.0

    def __init__(self, beta0: float = 0.5, schedule: Literal["linear", "exponential", "constant"] = "linear",
                 anneal_fraction: float = 1.0, label: Literal["soft", "hard"] = "soft"):
        if not 0.0 <= beta0 <= 1.0:
            raise ValueError(f"objective.beta0 must lie in [0, 1], got {beta0}")
        if not 0.0 < anneal_fraction <= 1.0:
            raise ValueError(f"objective.anneal_fraction must lie in (0, 1], got {anneal_fraction}")
        if label not in ("soft", "hard"):
            raise ValueError(f"objective.label must be 'soft' (forward KL) or 'hard' (teacher argmax), got {label!r}")
        mixture_beta(0, 1, beta0, schedule)  # checks the schedule's name
        self.beta0, self.schedule, self.anneal_fraction, self.label = beta0, schedule, anneal_fraction, label
        self.mixture_beta = beta0

    def set_step(self, step: int, total_steps: int) -> None:
        self.mixture_beta = mixture_beta(step, total_steps, self.beta0, self.schedule, self.anneal_fraction)

    def pick_source(self, rng: random.Random) -> str:
        return "student"

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        if self.label == "soft":
            loss_B_T = b.student.divergence(b.teacher, beta=0.0)
        else:
            top = b.teacher.topk(1)
            label_B_T = torch.zeros_like(r.actions)
            label_B_T[r.mask_B_T.bool()] = top.topk_idx_N_K[:, 0]
            loss_B_T = -b.student.log_prob(label_B_T)
        loss = (loss_B_T * r.mask_B_T).sum() / b.normalizer
        metrics = {"teacher_label_loss": _masked_mean(loss_B_T, r.mask_B_T), "mixture_beta": self.mixture_beta}
        if "from_teacher_B_T" in r.extras:
            metrics["teacher_token_fraction"] = _masked_mean(r.extras["from_teacher_B_T"].float(), r.mask_B_T)
        return loss, metrics
