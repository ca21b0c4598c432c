"""SOD: step-wise divergence-reweighted on-policy distillation on top of GRPO
(Zhong et al., arXiv 2605.07725; docs/objectives.md section 8).

A rollout is cut into contiguous steps k = 1..K (in the paper, the assistant turns
between tool calls).  The student-teacher divergence of each step, relative to the
first, scales the teacher signal, so steps where the student has drifted far (e.g.
after a bad tool result) get less of a teacher that is itself off-distribution:

    d_k = mean_{t in step k} |log pi_S(y_t) - log pi_T(y_t)|
    w_k = min((d_1 + eps) / (d_k + eps), 1 + delta)             (w_1 = 1; delta 0.2, eps 1e-6)
    A_t = A_GRPO,i + coef * w_k(t) * (log pi_T(y_t) - log pi_S(y_t))
    L   = -sum_t min(rho_t A_t, clip(rho_t, 1 - eps_clip, 1 + eps_clip_high) A_t) m_t / normalizer

Token rollouts have no turn structure, so steps are a parameter (`step_ids`):
- `step_token_id`: a delimiter token (e.g. a newline id) closes its step; the step
  of a kept token is the number of kept delimiters strictly before it;
- `step_len`: fixed segments of `step_len` kept tokens.
Steps count kept tokens only, so prompt padding or masked tokens never shift them.
`log pi_S` is the behaviour log-prob (pi_old): the advantage is fixed at sampling
time, as in PPO.  A_GRPO is the group-normalised reward (grpo.group_advantages).

The registered `sod` objective: student rollouts, teacher-scored, verifier-rewarded; the GRPO
advantages are computed once over the whole step's rollout (`prepare`).

    objective: {type: sod, step_len: 32}
    Run its tests: ``pytest tests/test_objectives_text_methods.py -q -k sod``
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch
from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.objectives.groups import group_ids_of, rewards_of
from mmdistill.objectives.grpo import group_advantages
from mmdistill.objectives.opd import sampled_logps
from mmdistill.objectives.policy_gradient import check_same_shape, masked_sum, policy_gradient_loss
from mmdistill.registry import OBJECTIVES

__all__ = ["step_ids", "sod_step_weights", "sod_advantages", "sod_loss", "SOD"]


def step_ids(
    actions_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    step_token_id: int | None = None,
    step_len: int | None = None,
) -> torch.Tensor:
    """Step index (0-based) of every kept token `[B, T]` (long); -1 at masked positions.

    Give exactly one of `step_token_id` (delimiter closes its step) and `step_len`
    (fixed number of kept tokens per step)."""
    check_same_shape(actions=actions_B_T, mask=mask_B_T)
    if (step_token_id is None) == (step_len is None):
        raise ValueError(
            f"give exactly one of step_token_id (a delimiter) and step_len (fixed length); "
            f"got step_token_id={step_token_id}, step_len={step_len}"
        )
    keep_B_T = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
    if step_len is not None:
        if int(step_len) < 1:
            raise ValueError(f"step_len must be >= 1 kept tokens per step; got {step_len}")
        kept_before_B_T = torch.cumsum(keep_B_T.long(), dim=-1) - keep_B_T.long()
        ids_B_T = kept_before_B_T // int(step_len)
    else:
        delim_B_T = (keep_B_T & (actions_B_T == int(step_token_id))).long()
        ids_B_T = torch.cumsum(delim_B_T, dim=-1) - delim_B_T
    return torch.where(keep_B_T, ids_B_T, torch.full_like(ids_B_T, -1))


@torch.no_grad()
def sod_step_weights(
    student_logp_B_T: torch.Tensor,
    teacher_logp_B_T: torch.Tensor,
    step_ids_B_T: torch.Tensor,
    delta: float = 0.2,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step divergences and weights: `(w_B_T, d_B_K, w_B_K)`.

    `d_B_K[b, k]` is the mean |log pi_S - log pi_T| over the tokens of step k (0 for a
    step with no tokens); `w_B_K = min((d_B_K[:, :1] + eps) / (d_B_K + eps), 1 + delta)`;
    `w_B_T` is each token's step weight (0 where `step_ids_B_T` is -1)."""
    check_same_shape(student_logp=student_logp_B_T, teacher_logp=teacher_logp_B_T, step_ids=step_ids_B_T)
    if delta < 0 or eps <= 0:
        raise ValueError(f"delta must be >= 0 and eps > 0; got delta={delta}, eps={eps}")
    keep_B_T = step_ids_B_T >= 0
    dtype = torch.promote_types(student_logp_B_T.dtype, torch.float32)
    gap_B_T = (student_logp_B_T.to(dtype) - teacher_logp_B_T.to(dtype)).abs()
    gap_B_T = torch.where(keep_B_T, gap_B_T, torch.zeros_like(gap_B_T))  # -inf teacher under padding
    index_B_T = step_ids_B_T.clamp(min=0)
    K = int(step_ids_B_T.max()) + 1 if step_ids_B_T.numel() and bool(keep_B_T.any()) else 1
    B = step_ids_B_T.shape[0]
    sum_B_K = torch.zeros(B, K, dtype=dtype, device=gap_B_T.device).scatter_add_(1, index_B_T, gap_B_T)
    count_B_K = torch.zeros(B, K, dtype=dtype, device=gap_B_T.device).scatter_add_(1, index_B_T, keep_B_T.to(dtype))
    d_B_K = sum_B_K / count_B_K.clamp(min=1)
    w_B_K = ((d_B_K[:, :1] + eps) / (d_B_K + eps)).clamp(max=1.0 + float(delta))
    w_B_T = torch.where(keep_B_T, w_B_K.gather(1, index_B_T), torch.zeros_like(gap_B_T))
    return w_B_T, d_B_K, w_B_K


@torch.no_grad()
def sod_advantages(
    behavior_logp_B_T: torch.Tensor,
    teacher_logp_B_T: torch.Tensor,
    step_ids_B_T: torch.Tensor,
    grpo_advantage_B: torch.Tensor,
    coef: float = 1.0,
    delta: float = 0.2,
    eps: float = 1e-6,
) -> torch.Tensor:
    """`A_t = A_GRPO,i + coef * w_k(t) * (log pi_T - log pi_old)` at kept tokens, 0 elsewhere `[B, T]`."""
    if grpo_advantage_B.shape != (behavior_logp_B_T.shape[0],):
        raise ValueError(
            f"expected one GRPO advantage per rollout [B={behavior_logp_B_T.shape[0]}]; got {tuple(grpo_advantage_B.shape)}"
        )
    w_B_T, _, _ = sod_step_weights(behavior_logp_B_T, teacher_logp_B_T, step_ids_B_T, delta, eps)
    keep_B_T = step_ids_B_T >= 0
    distill_B_T = teacher_logp_B_T.to(w_B_T.dtype) - behavior_logp_B_T.to(w_B_T.dtype)
    advantage_B_T = grpo_advantage_B.to(w_B_T.dtype)[:, None] + float(coef) * w_B_T * distill_B_T
    return torch.where(keep_B_T, advantage_B_T, torch.zeros_like(advantage_B_T))


def sod_loss(
    logp_B_T: torch.Tensor,
    behavior_logp_B_T: torch.Tensor,
    teacher_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    step_ids_B_T: torch.Tensor,
    grpo_advantage_B: torch.Tensor,
    coef: float = 1.0,
    delta: float = 0.2,
    eps: float = 1e-6,
    clip_eps: float | None = 0.2,
    clip_eps_high: float | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SOD loss (module docstring): `sod_advantages` in a PPO-clipped surrogate
    (`policy_gradient_loss`).  `step_ids_B_T` from `step_ids` (-1 = not trained).
    Metrics: those of `policy_gradient_loss`, plus `step_weight_mean` (mean w over kept
    tokens), `steps_per_seq` and `abs_logp_gap` (mean |log pi_old - log pi_T|)."""
    check_same_shape(
        logp=logp_B_T,
        behavior_logp=behavior_logp_B_T,
        teacher_logp=teacher_logp_B_T,
        mask=mask_B_T,
        step_ids=step_ids_B_T,
    )
    keep_B_T = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
    if bool((keep_B_T != (step_ids_B_T >= 0)).any()):
        raise ValueError(
            "step_ids must be >= 0 exactly at kept tokens; build it with sod.step_ids(actions, mask, ...) from this mask"
        )
    advantage_B_T = sod_advantages(
        behavior_logp_B_T, teacher_logp_B_T, step_ids_B_T, grpo_advantage_B, coef, delta, eps
    )
    loss, metrics = policy_gradient_loss(
        logp_B_T,
        behavior_logp_B_T,
        advantage_B_T,
        mask_B_T,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        normalizer=normalizer,
    )
    with torch.no_grad():
        w_B_T, _, _ = sod_step_weights(behavior_logp_B_T, teacher_logp_B_T, step_ids_B_T, delta, eps)
        count = keep_B_T.sum().clamp(min=1)
        gap_B_T = (behavior_logp_B_T - teacher_logp_B_T.to(behavior_logp_B_T.dtype)).abs()
        metrics["step_weight_mean"] = float(masked_sum(w_B_T, keep_B_T) / count)
        metrics["steps_per_seq"] = (
            float((step_ids_B_T.max(-1).values + 1).float().mean()) if step_ids_B_T.numel() else 0.0
        )
        metrics["abs_logp_gap"] = float(masked_sum(gap_B_T, keep_B_T) / count)
    return loss, metrics


@OBJECTIVES.register("sod")
class SOD:
    """SOD: GRPO advantage plus step-reweighted teacher signal coef * w_k * (log pi_T - log pi_S),
    w_k = min((d_1+eps)/(d_k+eps), 1+delta); PPO-clipped.  Steps: a delimiter token or fixed length."""

    temperature = 1.0  # unused: scored at the rollout temperature, so ratios compare like with like

    def __init__(
        self,
        coef: float = 1.0,
        delta: float = 0.2,
        eps: float = 1e-6,
        step_token_id: int | None = None,
        step_len: int | None = 32,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
    ):
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
        self.needs = Needs(teacher=True, teacher_scores=True, rewards=True, sampled_actions=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source="student")

    def prepare(self, rollout: Rollout) -> Rollout:
        """GRPO advantages over the whole step's rollout, before it is cut into micro-batches."""
        advantage_B = group_advantages(rewards_of(rollout, "sod"), group_ids_of(rollout, "sod"))
        return replace(rollout, extras={**rollout.extras, "advantage_B": advantage_B})

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        r = b.rollout
        if "advantage_B" not in r.extras:
            r = self.prepare(r)
        logp_B_T, teacher_logp_B_T = sampled_logps(b)
        ids_B_T = step_ids(r.actions, r.mask_B_T, step_token_id=self.step_token_id, step_len=self.step_len)
        loss, metrics = sod_loss(
            logp_B_T,
            r.behavior_logp_B_T,
            teacher_logp_B_T,
            r.mask_B_T,
            ids_B_T,
            r.extras["advantage_B"],
            coef=self.coef,
            delta=self.delta,
            eps=self.eps,
            clip_eps=self.clip_eps,
            clip_eps_high=self.clip_eps_high,
            normalizer=b.normalizer,
        )
        metrics["reward"] = float(r.rewards_B.float().mean())
        return loss, metrics
