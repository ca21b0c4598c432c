"""Token-level policy-gradient surrogate (importance-sampled or PPO-clipped) and discounted sums.

Shared by OPD, GRPO and the step-distribution objectives: a loss is
``-sum_t rho_t * A_t * m_t / normalizer`` with ``rho = pi_theta / pi_old``, optionally
clipped as in PPO.  Advantages and behaviour log-probs are treated as constants (sg).

Run its tests: ``pytest tests/test_objectives_pg.py -q``
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "discounted_cumsum",
    "policy_gradient_loss",
    "add_kl_penalty",
    "masked_sum",
    "resolve_normalizer",
    "check_same_shape",
]

_BLOCK = 64  # time steps solved in closed form per block of discounted_cumsum


def check_same_shape(**tensors: torch.Tensor | None) -> tuple[int, ...]:
    """Raise a ValueError listing every shape unless all given (non-None) tensors share one."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"expected tensors of one shape [B, T]; got {listed}")
    return next(iter(shapes.values()))


def masked_sum(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of `x * mask` where the mask is non-zero; masked-out entries (even inf/NaN) count 0.

    A bool mask selects; a float mask also weights.
    """
    if mask is None:
        return x.sum()
    if mask.dtype == torch.bool:
        return torch.where(mask, x, torch.zeros_like(x)).sum()
    return torch.where(mask != 0, x * mask.to(x.dtype), torch.zeros_like(x)).sum()


def resolve_normalizer(normalizer: float | torch.Tensor | None, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The loss denominator: `normalizer` if given (e.g. the global token count under
    gradient accumulation), else `mask.sum()`; a zero count becomes 1 (the sum is then 0)."""
    if normalizer is None:
        count = mask.to(like.dtype).sum()
        return torch.where(count > 0, count, torch.ones_like(count))
    value = torch.as_tensor(normalizer, dtype=like.dtype, device=like.device)
    if value.numel() != 1:
        raise ValueError(f"normalizer must be a scalar (a token count); got shape {tuple(value.shape)}")
    return value.reshape(())


def discounted_cumsum(x_B_T: torch.Tensor, gamma: float, mask_B_T: torch.Tensor | None = None) -> torch.Tensor:
    """`y_t = sum_{t' >= t} gamma^(t' - t) x_t'` along the last axis.

    gamma counts positions (not kept tokens).  With a mask, masked positions contribute 0
    and their outputs are 0.  gamma = 0 returns x (times the mask, if given).  Blocks of
    64 steps are solved with one small matrix product each; a Python loop runs over the
    T / 64 blocks only.
    """
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1] (0 = next token only, 1 = undiscounted sum); got {gamma}")
    if mask_B_T is not None:
        check_same_shape(x=x_B_T, mask=mask_B_T)
        keep = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
        scale = 1 if mask_B_T.dtype == torch.bool else mask_B_T.to(x_B_T.dtype)
        x_B_T = torch.where(keep, x_B_T * scale, torch.zeros_like(x_B_T))
    if gamma == 0.0 or x_B_T.shape[-1] == 0:
        return x_B_T.clone()

    T = x_B_T.shape[-1]
    block = min(_BLOCK, T)
    n_blocks = -(-T // block)
    padded = torch.nn.functional.pad(x_B_T, (0, n_blocks * block - T))
    x_B_N_L = padded.reshape(*x_B_T.shape[:-1], n_blocks, block)

    steps = torch.arange(block, device=x_B_T.device)
    lag_L_L = steps[None, :] - steps[:, None]  # lag[i, j] = j - i
    powers = torch.tensor(gamma, dtype=x_B_T.dtype, device=x_B_T.device) ** lag_L_L.clamp(min=0).to(x_B_T.dtype)
    discount_L_L = torch.where(lag_L_L >= 0, powers, torch.zeros_like(powers))  # y_i = sum_j D[i, j] x_j
    local_B_N_L = x_B_N_L @ discount_L_L.T

    # carry the sum of later blocks backwards: y(block b) += gamma^(L - i) * y(first step of block b+1)
    carry_weight_L = torch.tensor(gamma, dtype=x_B_T.dtype, device=x_B_T.device) ** (block - steps).to(x_B_T.dtype)
    blocks = [local_B_N_L[..., n_blocks - 1, :]]
    for b in range(n_blocks - 2, -1, -1):
        blocks.append(local_B_N_L[..., b, :] + carry_weight_L * blocks[-1][..., :1])
    y = torch.cat(blocks[::-1], dim=-1)[..., :T]
    if mask_B_T is not None:
        y = torch.where(keep, y, torch.zeros_like(y))
    return y


def policy_gradient_loss(
    logp_B_T: torch.Tensor,
    behavior_logp_B_T: torch.Tensor,
    advantage_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    clip_eps: float | None = None,
    clip_eps_high: float | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance-sampled (clip_eps None) or PPO-clipped policy-gradient loss.

    `rho = exp(logp - behavior_logp)`;
    plain:   `-sum(rho * A * m) / normalizer`;
    clipped: `-sum(min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A) * m) / normalizer`,
    eps_high defaulting to clip_eps (asymmetric "clip-higher" when given).
    normalizer defaults to `mask.sum()`; pass the global token count under gradient
    accumulation.  Advantages and behaviour log-probs are detached.
    Metrics: `ratio_mean`, `clip_fraction` (kept tokens whose clipped term is the
    minimum, i.e. whose gradient is cut), `advantage_mean`, all over kept tokens.
    """
    check_same_shape(logp=logp_B_T, behavior_logp=behavior_logp_B_T, advantage=advantage_B_T, mask=mask_B_T)
    advantage_B_T = advantage_B_T.detach().to(logp_B_T.dtype)
    ratio_B_T = torch.exp(logp_B_T - behavior_logp_B_T.detach().to(logp_B_T.dtype))
    unclipped_B_T = ratio_B_T * advantage_B_T
    if clip_eps is None:
        if clip_eps_high is not None:
            raise ValueError("clip_eps_high was given without clip_eps; set clip_eps to enable PPO clipping")
        surrogate_B_T = unclipped_B_T
        clipped_B_T = torch.zeros_like(mask_B_T, dtype=torch.bool)
    else:
        eps_low = float(clip_eps)
        eps_high = eps_low if clip_eps_high is None else float(clip_eps_high)
        if not (0.0 <= eps_low < 1.0 and eps_high >= 0.0):
            raise ValueError(
                f"clip_eps must lie in [0, 1) and clip_eps_high be >= 0; got clip_eps={clip_eps}, "
                f"clip_eps_high={clip_eps_high}"
            )
        clipped_ratio_B_T = ratio_B_T.clamp(1.0 - eps_low, 1.0 + eps_high)
        clipped_term_B_T = clipped_ratio_B_T * advantage_B_T
        surrogate_B_T = torch.minimum(unclipped_B_T, clipped_term_B_T)
        clipped_B_T = clipped_term_B_T.detach() < unclipped_B_T.detach()

    denominator = resolve_normalizer(normalizer, mask_B_T, logp_B_T)
    loss = -masked_sum(surrogate_B_T, mask_B_T) / denominator

    with torch.no_grad():
        keep = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
        count = keep.sum().clamp(min=1).to(logp_B_T.dtype)
        stats = torch.stack(
            [
                masked_sum(ratio_B_T, keep) / count,
                masked_sum(clipped_B_T.to(logp_B_T.dtype), keep) / count,
                masked_sum(advantage_B_T, keep) / count,
            ]
        ).tolist()
    metrics = {"ratio_mean": stats[0], "clip_fraction": stats[1], "advantage_mean": stats[2]}
    return loss, metrics


def add_kl_penalty(
    loss: Tensor, metrics: dict, kl_B_T: Tensor, mask_B_T: Tensor, kl_beta: float, normalizer: Any, like: Tensor
) -> Tensor:
    """`loss + kl_beta * sum(kl * mask) / normalizer`, recording the mean per-step KL in `metrics["kl"]`."""
    if kl_beta:
        loss = loss + float(kl_beta) * masked_sum(kl_B_T, mask_B_T) / resolve_normalizer(normalizer, mask_B_T, like)
    with torch.no_grad():
        keep = mask_B_T if mask_B_T.dtype == torch.bool else mask_B_T != 0
        metrics["kl"] = float(masked_sum(kl_B_T, keep) / keep.sum().clamp(min=1))
    return loss
