"""DAgger-style teacher/student mixing (2605.12913, DAgger for LM agents; after "A Reduction of
Imitation Learning and Structured Prediction to No-Regret Online Learning", arXiv 1011.0686;
docs/objectives.md).

The behaviour policy interpolates teacher and student: at every step (a token here; a turn
for agents) the teacher acts with probability beta_k, else the student, and beta_k anneals
from `beta0` to 0 over the stage.  The student is trained on the teacher's labels at every
visited state, whichever policy acted there: the forward KL(pi_T || pi_S) to the teacher's
full distribution (`label: soft`) or the cross-entropy of the teacher's argmax (`hard`).

    L = sum_t m_t * KL(pi_T(. | s_t) || pi_S(. | s_t)) / normalizer                     (soft)
    L = -sum_t m_t * log pi_S(argmax_a pi_T(a | s_t) | s_t) / normalizer                (hard)

The objective asks for beta_k in its rollout request (`mixture_beta`, from the optimizer step
and the stage's length); the adapter draws each token from the teacher with that probability.

    objective: {type: dagger, beta0: 0.5, schedule: linear}
    python -m pytest tests/test_objectives_guided.py -k dagger
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.registry import OBJECTIVES

__all__ = ["mixture_beta", "dagger_loss", "DAgger"]


def mixture_beta(step: int, total_steps: int, beta0: float, schedule: str, anneal_fraction: float = 1.0) -> float:
    """beta_k: linear from beta0 to 0 over `anneal_fraction` of the stage, or exponential (beta0 * 0.5^(k / (0.1 * span)))."""
    span = max(1.0, anneal_fraction * total_steps)
    if schedule == "constant":
        return beta0
    if schedule == "linear":
        return beta0 * max(0.0, 1.0 - step / span)
    if schedule == "exponential":
        return beta0 * math.pow(0.5, step / (0.1 * span))
    raise ValueError(f"objective.schedule must be 'constant', 'linear' or 'exponential', got {schedule!r}")


def _masked_mean(x_B_T: Tensor, mask_B_T: Tensor) -> float:
    return float((x_B_T.detach() * mask_B_T).sum() / mask_B_T.sum().clamp(min=1))


def dagger_loss(b: ObjectiveBatch, label: Literal["soft", "hard"]) -> tuple[Tensor, dict[str, float]]:
    """The teacher-label loss at every visited state (module docstring).  Metrics: `teacher_label_loss`
    (mean per trained step) and, when the rollout records who acted, `teacher_token_fraction`."""
    r = b.rollout
    if label == "soft":
        loss_B_T = b.student.divergence(b.teacher, beta=0.0)
    else:
        top = b.teacher.topk(1)
        label_B_T = torch.zeros_like(r.actions)
        label_B_T[r.mask_B_T.bool()] = top.topk_idx_N_K[:, 0]
        loss_B_T = -b.student.log_prob(label_B_T)
    loss = (loss_B_T * r.mask_B_T).sum() / b.normalizer
    metrics = {"teacher_label_loss": _masked_mean(loss_B_T, r.mask_B_T)}
    if "from_teacher_B_T" in r.extras:
        metrics["teacher_token_fraction"] = _masked_mean(r.extras["from_teacher_B_T"].float(), r.mask_B_T)
    return loss, metrics


@OBJECTIVES.register("dagger")
class DAgger:
    """DAgger mixing: each token is the teacher's with probability beta_k (annealed from beta0 to 0),
    and the student learns the teacher's labels at every visited state (soft: forward KL; hard: argmax CE)."""

    temperature = 1.0

    def __init__(
        self,
        beta0: float = 0.5,
        schedule: Literal["linear", "exponential", "constant"] = "linear",
        anneal_fraction: float = 1.0,
        label: Literal["soft", "hard"] = "soft",
    ):
        if not 0.0 <= beta0 <= 1.0:
            raise ValueError(f"objective.beta0 must lie in [0, 1], got {beta0}")
        if not 0.0 < anneal_fraction <= 1.0:
            raise ValueError(f"objective.anneal_fraction must lie in (0, 1], got {anneal_fraction}")
        if label not in ("soft", "hard"):
            raise ValueError(f"objective.label must be 'soft' (forward KL) or 'hard' (teacher argmax), got {label!r}")
        mixture_beta(0, 1, beta0, schedule)  # checks the schedule's name
        self.beta0, self.schedule, self.anneal_fraction, self.label = beta0, schedule, anneal_fraction, label
        self.mixture_beta = beta0  # the last requested beta_k, reported in the metrics
        self.needs = Needs(teacher=True, teacher_scores=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        self.mixture_beta = mixture_beta(step, total_steps, self.beta0, self.schedule, self.anneal_fraction)
        return RolloutRequest(source="student", mixture_beta=self.mixture_beta)

    def prepare(self, rollout: Rollout) -> Rollout:
        return rollout

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        loss, metrics = dagger_loss(b, self.label)
        first = metrics.pop("teacher_label_loss")  # the metrics in their historical order
        return loss, {"teacher_label_loss": first, "mixture_beta": self.mixture_beta, **metrics}
