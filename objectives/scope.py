"""SCOPE: correctness-routed, perplexity-weighted on-policy distillation
(Zheng et al., arXiv 2604.10688; docs/objectives.md section 8).

Each prompt group is split by the verifier into a correct and a wrong branch:

    correct rollout i:  student-perplexity-weighted MLE,  w_i = PPL_S(y_i)^(1/tau)  / sum_{j correct} PPL_S(y_j)^(1/tau)
    wrong rollout i:    teacher-perplexity-weighted OPD,  w_i = PPL_T(y_i)^(-1/tau) / sum_{j wrong}   PPL_T(y_j)^(-1/tau)
    PPL_M(y) = exp(-mean_t log pi_M(y_t))  over the rollout's kept tokens

so uncertain-but-correct samples get more imitation, and wrong samples the teacher
finds likely (it can correct them) get more distillation.  The weights of one
branch of one group sum to 1.  In the token-level loss each rollout's tokens are
scaled by `n_branch * w_i` (n_branch = rollouts in that branch of that group), so
equal perplexities give weight 1 and the loss reduces to plain MLE + plain OPD:

    L = [ sum_{i correct} sum_t -mle_coef * n_C w_i * log pi_theta(y_t) * m_t
        + sum_{i wrong}   sum_t -rho_t * n_W w_i * A_t * m_t ] / normalizer
    A_t = -coef * (log pi_old(y_t) - log pi_T(y_t))         (OPD advantage, opd.py)

Choices (the paper's released code computes the weights once per rollout batch):
- PPL_S uses the behaviour log-probs (pi_old, the student that sampled), so the
  weights are constants across micro-batches and repeated updates.
- An empty branch (a group with no correct or no wrong rollout) contributes
  nothing; the other branch keeps weights summing to 1 (an all-correct group is
  MLE only, an all-wrong group OPD only).  There is no fallback weight.

The registered `scope` objective: student rollouts, teacher-scored, verifier-rewarded (a rollout
is correct when `reward >= reward_threshold`); it normalises over whole prompt groups, so
`train.micro_batch_size` must be a multiple of `rollout.group_size` (checked at each call).

    objective: {type: scope, tau: 1.0}
    Run its tests: ``pytest tests/test_objectives_text_methods.py -q -k scope``
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.objectives.groups import whole_group_loss, with_group_sizes
from mmdistill.objectives.opd import check_clip_eps, opd_advantages
from mmdistill.objectives.policy_gradient import (
    check_same_shape,
    masked_sum,
    policy_gradient_loss,
    resolve_normalizer,
)
from mmdistill.registry import OBJECTIVES

__all__ = ["sequence_mean_logp", "scope_weights", "scope_loss", "SCOPE"]


def sequence_mean_logp(logp_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Mean log-prob over each row's kept tokens `[B]` (so `PPL = exp(-result)`); 0 for an empty row."""
    keep_B_T = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
    total_B = torch.where(keep_B_T, logp_B_T, torch.zeros_like(logp_B_T)).sum(-1)
    return total_B / keep_B_T.sum(-1).clamp(min=1).to(logp_B_T.dtype)


def _branch_index(correct_B: torch.Tensor, group_ids_B: torch.Tensor) -> torch.Tensor:
    """One integer per (group, branch) pair `[B]`: 2 * group + correct."""
    if correct_B.dtype != torch.bool:
        raise TypeError(f"correct_B must be a bool tensor (reward >= threshold); got dtype {correct_B.dtype}")
    if group_ids_B.dtype.is_floating_point:
        raise TypeError(f"group_ids must be integers (one id per prompt group); got dtype {group_ids_B.dtype}")
    if correct_B.shape != group_ids_B.shape or correct_B.dim() != 1:
        raise ValueError(
            f"correct and group_ids must both be 1-D [B]; got {tuple(correct_B.shape)} and {tuple(group_ids_B.shape)}"
        )
    _, group_B = torch.unique(group_ids_B, return_inverse=True)
    return 2 * group_B + correct_B.long()


@torch.no_grad()
def scope_weights(
    student_logp_B_T: torch.Tensor,
    teacher_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    correct_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    tau: float = 1.0,
) -> torch.Tensor:
    """Per-rollout SCOPE weights `[B]` (no gradient), summing to 1 over each non-empty
    (group, branch): a softmax of `-mean log pi_S / tau` over the correct rollouts
    (= PPL_S^(1/tau) normalised) and of `mean log pi_T / tau` over the wrong ones
    (= PPL_T^(-1/tau) normalised); computed in log space, so no perplexity overflows."""
    check_same_shape(student_logp=student_logp_B_T, teacher_logp=teacher_logp_B_T, mask=mask_B_T)
    if not tau > 0:
        raise ValueError(f"tau must be > 0 (1 = the paper's setting); got {tau}")
    branch_B = _branch_index(correct_B, group_ids_B)
    dtype = torch.promote_types(student_logp_B_T.dtype, torch.float32)
    student_mean_B = sequence_mean_logp(student_logp_B_T.to(dtype), mask_B_T)
    teacher_mean_B = sequence_mean_logp(teacher_logp_B_T.to(dtype), mask_B_T)
    log_w_B = torch.where(correct_B, -student_mean_B, teacher_mean_B) / float(tau)
    n_branches = int(branch_B.max()) + 1 if branch_B.numel() else 0
    max_K = torch.full((n_branches,), -torch.inf, dtype=dtype, device=log_w_B.device)
    max_K = max_K.scatter_reduce(0, branch_B, log_w_B, reduce="amax")
    unnorm_B = torch.exp(log_w_B - max_K[branch_B])
    total_K = torch.zeros(n_branches, dtype=dtype, device=log_w_B.device).index_add_(0, branch_B, unnorm_B)
    return unnorm_B / total_K[branch_B]


def scope_loss(
    logp_B_T: torch.Tensor,
    behavior_logp_B_T: torch.Tensor,
    teacher_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    correct_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    tau: float = 1.0,
    coef: float = 1.0,
    mle_coef: float = 1.0,
    clip_eps: float | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SCOPE loss (module docstring): weighted MLE on correct rollouts plus weighted OPD
    (importance-sampled, or PPO-clipped with clip_eps) on wrong ones, token sums over
    `normalizer` (default: the kept-token count of the whole batch).
    Metrics: those of `policy_gradient_loss` over wrong-rollout tokens, plus
    `correct_fraction`, `nll_correct` (mean NLL of correct tokens), `reverse_kl_wrong`
    (mean `log pi_old - log pi_T` over wrong tokens) and `weight_max` (largest `n_branch * w`; 1 = uniform)."""
    check_same_shape(logp=logp_B_T, behavior_logp=behavior_logp_B_T, teacher_logp=teacher_logp_B_T, mask=mask_B_T)
    if correct_B.shape != (logp_B_T.shape[0],):
        raise ValueError(
            f"expected one correctness flag per rollout [B={logp_B_T.shape[0]}]; got correct {tuple(correct_B.shape)}"
        )
    weight_B = scope_weights(behavior_logp_B_T, teacher_logp_B_T, mask_B_T, correct_B, group_ids_B, tau)
    branch_B = _branch_index(correct_B, group_ids_B)
    size_B = torch.zeros_like(weight_B).index_add_(0, branch_B, torch.ones_like(weight_B))[branch_B]
    scale_B = (size_B * weight_B).to(logp_B_T.dtype)  # 1 everywhere when a branch's perplexities are equal

    denominator = resolve_normalizer(normalizer, mask_B_T, logp_B_T)
    zero_B_T = torch.zeros_like(mask_B_T)
    correct_mask_B_T = torch.where(correct_B[:, None], mask_B_T, zero_B_T)
    wrong_mask_B_T = torch.where(correct_B[:, None], zero_B_T, mask_B_T)

    mle = -float(mle_coef) * masked_sum(logp_B_T * scale_B[:, None], correct_mask_B_T) / denominator
    advantage_B_T = opd_advantages(behavior_logp_B_T, teacher_logp_B_T, wrong_mask_B_T, coef=coef) * scale_B[:, None]
    opd, metrics = policy_gradient_loss(
        logp_B_T, behavior_logp_B_T, advantage_B_T, wrong_mask_B_T, clip_eps=clip_eps, normalizer=denominator
    )

    with torch.no_grad():
        keep_c = correct_mask_B_T != 0
        keep_w = wrong_mask_B_T != 0
        rkl_B_T = behavior_logp_B_T - teacher_logp_B_T.to(behavior_logp_B_T.dtype)
        metrics["correct_fraction"] = float(correct_B.float().mean()) if correct_B.numel() else 0.0
        metrics["nll_correct"] = float(-masked_sum(logp_B_T.detach(), keep_c) / keep_c.sum().clamp(min=1))
        metrics["reverse_kl_wrong"] = float(masked_sum(rkl_B_T, keep_w) / keep_w.sum().clamp(min=1))
        metrics["weight_max"] = float(scale_B.max()) if scale_B.numel() else 0.0
    return mle + opd, metrics


@OBJECTIVES.register("scope")
class SCOPE:
    """SCOPE: per group, correct rollouts get student-perplexity-weighted MLE, wrong ones
    teacher-perplexity-weighted OPD (weights PPL_S^(1/tau), PPL_T^(-1/tau), normalised per branch)."""

    temperature = 1.0  # unused: scored at the rollout temperature, so ratios compare like with like

    def __init__(
        self,
        tau: float = 1.0,
        coef: float = 1.0,
        mle_coef: float = 1.0,
        reward_threshold: float = 0.5,
        clip_eps: float | None = None,
    ):
        if not tau > 0:
            raise ValueError(f"objective.tau must be > 0 (1 = the paper's setting), got {tau}")
        if mle_coef < 0:
            raise ValueError(f"objective.mle_coef must be >= 0, got {mle_coef}")
        check_clip_eps(clip_eps)
        self.tau = tau
        self.coef = coef
        self.mle_coef = mle_coef
        self.reward_threshold = reward_threshold
        self.clip_eps = clip_eps
        self.needs = Needs(teacher=True, teacher_scores=True, rewards=True, sampled_actions=True, whole_groups=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source="student")

    def prepare(self, rollout: Rollout) -> Rollout:
        return with_group_sizes(rollout, "scope")

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        return whole_group_loss(
            b,
            "scope",
            self.reward_threshold,
            scope_loss,
            tau=self.tau,
            coef=self.coef,
            mle_coef=self.mle_coef,
            clip_eps=self.clip_eps,
        )
