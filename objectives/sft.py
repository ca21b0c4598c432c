"""Supervised fine-tuning: token negative log-likelihood on given targets (teacher
trajectories, cold starts, the correct branch of SCOPE), from logits or chunked from
hidden states and the LM head.

    L = -sum_t m_t * log p(target_t) / normalizer      (normalizer defaults to the kept-token count)

The registered `sft` objective is the same loss on a rollout's step distributions: the targets
are the dataset's own completions (`source: dataset`) or the teacher's samples (`source: teacher`,
sequence-level KD, where the teacher only writes the completions and is never scored).

    objective: {type: sft, source: dataset}
    Run its tests: ``pytest tests/test_objectives_divergence.py -q -k nll``
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from torch import Tensor

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.kernels import chunked_token_logp
from mmdistill.objectives.policy_gradient import masked_sum, resolve_normalizer
from mmdistill.registry import OBJECTIVES

__all__ = ["token_nll", "chunked_token_nll", "SFT"]


def _nll_metrics(nll_sum: torch.Tensor, keep: torch.Tensor) -> dict[str, float]:
    count = int(keep.sum())
    nll = float(nll_sum) / max(count, 1)
    return {"nll": nll, "tokens": float(count)}


def token_nll(
    logits_B_T_V: torch.Tensor,
    targets_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    temperature: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean (or `/ normalizer`) negative log-likelihood of `targets` under `softmax(logits / temperature)`.

    Targets at masked positions are ignored (they may hold -100).  Computed in float32
    or wider.  Metrics: `nll` (mean over kept tokens), `tokens` (kept-token count).
    """
    if tuple(logits_B_T_V.shape[:-1]) != tuple(targets_B_T.shape) or targets_B_T.shape != mask_B_T.shape:
        raise ValueError(
            f"expected logits [..., V] with targets and mask of shape [...]; got logits "
            f"{tuple(logits_B_T_V.shape)}, targets {tuple(targets_B_T.shape)}, mask {tuple(mask_B_T.shape)}"
        )
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    keep = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
    vocab = logits_B_T_V.shape[-1]
    safe_targets = torch.where(keep, targets_B_T, torch.zeros_like(targets_B_T)).long()
    if safe_targets.numel() and (int(safe_targets.min()) < 0 or int(safe_targets.max()) >= vocab):
        raise ValueError(
            f"kept target ids must lie in [0, {vocab}); got ids in "
            f"[{int(safe_targets.min())}, {int(safe_targets.max())}]"
        )
    dtype = torch.promote_types(logits_B_T_V.dtype, torch.float32)
    logits = logits_B_T_V.to(dtype) / float(temperature)
    logp_B_T = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    nll_sum = -masked_sum(logp_B_T, mask_B_T)
    loss = nll_sum / resolve_normalizer(normalizer, mask_B_T, logp_B_T)
    return loss, _nll_metrics(nll_sum.detach(), keep)


def chunked_token_nll(
    hidden_N_H: torch.Tensor,
    head_weight_V_H: torch.Tensor,
    targets_N: torch.Tensor,
    mask_N: torch.Tensor,
    chunk_size: int = 1024,
    normalizer: float | torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`token_nll` from hidden states `[N, H]` and the LM head `[V, H]`, never holding `N x V` logits.

    Only the kept rows (mask != 0) go through the head, `chunk_size` rows at a time with
    activation checkpointing (`chunked_token_logp`).  `vocab_size` truncates a padded head.
    """
    if hidden_N_H.dim() != 2 or tuple(targets_N.shape) != (hidden_N_H.shape[0],) or targets_N.shape != mask_N.shape:
        raise ValueError(
            f"expected hidden [N, H] with targets and mask [N]; got hidden {tuple(hidden_N_H.shape)}, "
            f"targets {tuple(targets_N.shape)}, mask {tuple(mask_N.shape)}"
        )
    keep = mask_N if mask_N.dtype == torch.bool else mask_N != 0
    rows = keep.nonzero().squeeze(-1)
    logp_K = chunked_token_logp(
        hidden_N_H.index_select(0, rows),
        head_weight_V_H,
        targets_N.index_select(0, rows),
        chunk_size=chunk_size,
        vocab_size=vocab_size,
    )
    weight_K = None if mask_N.dtype == torch.bool else mask_N.index_select(0, rows)
    nll_sum = -masked_sum(logp_K, weight_K)
    loss = nll_sum / resolve_normalizer(normalizer, mask_N, logp_K)
    return loss, _nll_metrics(nll_sum.detach(), keep)


@OBJECTIVES.register("sft")
class SFT:
    """Token cross-entropy on dataset (gold) or teacher-sampled completions (sequence-level KD)."""

    temperature = 1.0

    def __init__(self, source: Literal["dataset", "teacher"] = "dataset"):
        self.source = source
        self.needs = Needs(teacher=source == "teacher")  # the teacher only writes the completions

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source=self.source)

    def prepare(self, rollout: Rollout) -> Rollout:
        return rollout

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        mask_B_T = b.rollout.mask_B_T
        logp_B_T = b.student.log_prob(b.rollout.actions)
        loss = -(logp_B_T * mask_B_T).sum() / b.normalizer
        n = mask_B_T.sum().clamp(min=1)
        return loss, {"nll": float(-(logp_B_T.detach() * mask_B_T).sum() / n)}
