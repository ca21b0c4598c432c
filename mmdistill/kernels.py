"""Categorical divergences between a student and a teacher: generalized JSD (GKD), its
memory-lean chunked form computed from hidden states and LM heads, and a top-k + tail
form for stored teacher logits (docs/objectives.md sections 2 and 3).

Beta convention (as TRL's ``GKDTrainer.generalized_jsd_loss``), per token::

    M       = beta * P_T + (1 - beta) * P_S
    JSD_b   = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M)
    beta 0  -> exactly forward KL(P_T || P_S)
    beta 1  -> exactly reverse KL(P_S || P_T)

Logits are divided by ``temperature`` before the log-softmax.  All math runs in float32
or wider (bf16/fp16 inputs are upcast; float64 stays float64) and the results carry
that compute dtype.  Probabilities that are exactly 0 (``-inf`` logits, an empty tail
bucket) contribute ``0 * log 0 = 0`` with finite (zero) gradients.

Run its tests: ``pytest tests/test_objectives_divergence.py -q``
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "generalized_jsd",
    "forward_kl",
    "reverse_kl",
    "chunked_divergence",
    "chunked_token_logp",
    "chunked_entropy",
    "topk_tail",
    "topk_tail_divergence",
]

_REDUCTIONS = ("none", "sum", "batchmean")


# --------------------------------------------------------------------------- helpers


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The widest of the given float dtypes and float32."""
    out = torch.float32
    for dtype in dtypes:
        if not dtype.is_floating_point:
            raise TypeError(f"expected floating-point logits or hidden states, got dtype {dtype}")
        out = torch.promote_types(out, dtype)
    return out


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not 0.0 <= beta <= 1.0 or math.isnan(beta):
        raise ValueError(
            f"beta must lie in [0, 1] (0 = forward KL(T||S), 1 = reverse KL(S||T), "
            f"0.5 = symmetric JSD); got beta={beta}"
        )
    return beta


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0 (logits are divided by it); got {temperature}")
    return temperature


def _check_chunk_size(chunk_size: int) -> int:
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (rows per chunk); got {chunk_size!r}")
    return int(chunk_size)


def _safe_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp over `dim` that returns -inf (with zero gradient, not NaN) for all -inf slices."""
    shift = x.detach().amax(dim=dim, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = torch.exp(x - shift).sum(dim=dim)
    positive = total > 0
    log_total = torch.log(torch.where(positive, total, torch.ones_like(total)))
    out = log_total + shift.squeeze(dim)
    return torch.where(positive, out, torch.full_like(out, -math.inf))


def _safe_logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) + exp(b)) elementwise; -inf (zero gradient) where both are -inf."""
    shift = torch.maximum(a, b).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = torch.exp(a - shift) + torch.exp(b - shift)
    positive = total > 0
    out = torch.log(torch.where(positive, total, torch.ones_like(total))) + shift
    return torch.where(positive, out, torch.full_like(out, -math.inf))


def _p_log_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Elementwise p * (log p - log q) with the convention 0 * anything = 0 (no NaN, no NaN grads)."""
    support = logp > -math.inf
    zeros = torch.zeros_like(logp)
    logp_safe = torch.where(support, logp, zeros)
    logq_safe = torch.where(support, logq, zeros)
    return torch.where(support, torch.exp(logp_safe) * (logp_safe - logq_safe), zeros)


def _jsd_from_logp(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token generalized JSD from normalised log-probs `[..., V]` -> `[...]`."""
    if beta == 0.0:
        return _p_log_ratio(teacher_logp, student_logp).sum(dim=-1)
    if beta == 1.0:
        return _p_log_ratio(student_logp, teacher_logp).sum(dim=-1)
    mixture_logp = _safe_logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    kl_teacher = _p_log_ratio(teacher_logp, mixture_logp).sum(dim=-1)
    kl_student = _p_log_ratio(student_logp, mixture_logp).sum(dim=-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def _reduce(per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    if mask is not None:
        if mask.shape != per_token.shape:
            raise ValueError(
                f"mask must have the logits' shape without the vocabulary axis, {tuple(per_token.shape)}; "
                f"got {tuple(mask.shape)}"
            )
        keep = mask if mask.dtype == torch.bool else mask != 0
        weighted = per_token if mask.dtype == torch.bool else per_token * mask.to(per_token.dtype)
        per_token = torch.where(keep, weighted, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if mask is None:
        return total / max(per_token.numel(), 1)
    count = mask.to(per_token.dtype).sum()
    return total / torch.where(count > 0, count, torch.ones_like(count))


# --------------------------------------------------------------------------- full logits


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence between teacher and student, logits `[..., V]`.

    mask: `[...]`, bool or 0/1 float (float values act as token weights); None = every token.
    reduction: "none" -> per-token `[...]` (masked tokens 0); "sum" -> sum over kept tokens;
    "batchmean" -> sum over the vocabulary, mean over kept tokens (sum / mask.sum(), and
    0 when nothing is kept).  Under gradient accumulation use "sum" and divide by the
    global token count.
    """
    beta = _check_beta(beta)
    temperature = _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape [..., V]; got student "
            f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            f"(for padded vocabularies slice both to the tokenizer's length first)"
        )
    dtype = _compute_dtype(student_logits.dtype, teacher_logits.dtype)
    student_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    per_token = _jsd_from_logp(student_logp, teacher_logp, beta)
    return _reduce(per_token, mask, reduction)


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Forward KL(P_T || P_S) (mode-covering); `generalized_jsd` with beta = 0."""
    return generalized_jsd(student_logits, teacher_logits, mask, 0.0, temperature, reduction)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Reverse KL(P_S || P_T) (mode-seeking); `generalized_jsd` with beta = 1."""
    return generalized_jsd(student_logits, teacher_logits, mask, 1.0, temperature, reduction)


# --------------------------------------------------------------------------- chunked over rows


def _check_head(name: str, hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, bias_V: torch.Tensor | None) -> None:
    if hidden_N_H.dim() != 2:
        raise ValueError(
            f"{name} hidden states must be 2-D [N, H] (flatten batch and time); got {tuple(hidden_N_H.shape)}"
        )
    if weight_V_H.dim() != 2 or weight_V_H.shape[1] != hidden_N_H.shape[1]:
        raise ValueError(
            f"{name} head weight must be [V, H] with H = {hidden_N_H.shape[1]} (the hidden size); "
            f"got {tuple(weight_V_H.shape)}"
        )
    if bias_V is not None and tuple(bias_V.shape) != (weight_V_H.shape[0],):
        raise ValueError(f"{name} head bias must be [V] = [{weight_V_H.shape[0]}]; got {tuple(bias_V.shape)}")


def _check_vocab_size(vocab_size: int | None, **sizes: int) -> int:
    if vocab_size is None:
        values = set(sizes.values())
        if len(values) != 1:
            listed = ", ".join(f"{k} V={v}" for k, v in sizes.items())
            raise ValueError(
                f"the LM heads have different vocabulary sizes ({listed}); pass vocab_size= "
                f"the shared tokenizer's length so both are truncated to it"
            )
        return values.pop()
    if int(vocab_size) != vocab_size or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer; got {vocab_size!r}")
    for name, size in sizes.items():
        if vocab_size > size:
            raise ValueError(f"vocab_size={vocab_size} exceeds the {name} head's vocabulary V={size}")
    return int(vocab_size)


def _head_logits(
    hidden_N_H: torch.Tensor,
    weight_V_H: torch.Tensor,
    bias_V: torch.Tensor | None,
    vocab_size: int,
    temperature: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Tempered logits `[N, vocab_size]` in `dtype` (the matmul runs in the inputs' dtype)."""
    weight_V_H = weight_V_H[:vocab_size]
    bias_V = None if bias_V is None else bias_V[:vocab_size]
    return F.linear(hidden_N_H, weight_V_H, bias_V).to(dtype) / temperature


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _map_chunks(
    fn, chunk_size: int, n_rows: int, row_args: tuple, shared_args: tuple, checkpointed: bool
) -> torch.Tensor:
    """Apply fn(*row_chunks, *shared_args) -> [chunk] to row chunks; optionally checkpoint each."""
    outputs = []
    for start in range(0, n_rows, chunk_size):
        rows = tuple(a[start : start + chunk_size] for a in row_args)
        if checkpointed:
            outputs.append(checkpoint(fn, *rows, *shared_args, use_reentrant=False))
        else:
            outputs.append(fn(*rows, *shared_args))
    return torch.cat(outputs, dim=0)


def _divergence_chunk(
    student_hidden,
    teacher_hidden,
    student_weight,
    student_bias,
    teacher_weight,
    teacher_bias,
    *,
    beta,
    temperature,
    vocab_size,
    dtype,
):
    # The teacher's logits are recomputed (not saved) when the student's chunk is
    # recomputed in backward, so only one chunk of logits is ever alive.
    with torch.no_grad():
        teacher_logp = F.log_softmax(
            _head_logits(teacher_hidden, teacher_weight, teacher_bias, vocab_size, temperature, dtype), dim=-1
        )
    student_logp = F.log_softmax(
        _head_logits(student_hidden, student_weight, student_bias, vocab_size, temperature, dtype), dim=-1
    )
    return _jsd_from_logp(student_logp, teacher_logp, beta)


LOGITS_BUDGET = 1 << 25  # elements of one [chunk, V] logits buffer (128 MiB in fp32): caps rows per chunk for large V


def rows_per_chunk(chunk_size: int, vocab_size: int) -> int:
    """`chunk_size` rows, fewer when V is large (1024 rows x 151,936 would be 0.58 GiB per buffer)."""
    return min(chunk_size, max(16, LOGITS_BUDGET // max(vocab_size, 1)))


def _kl_chunk_grad(zS, zT, beta: float, grad_out_C: torch.Tensor | None):
    """Per-row KL of one chunk from tempered logits, and d(sum go_c KL_c)/d zS, in three [C, V] buffers.

    beta = 1 (reverse KL(S||T)): d KL / d zS = p_S (log p_S - log p_T - KL);
    beta = 0 (forward KL(T||S)): d KL / d zS = p_S - p_T.
    """
    logpS = F.log_softmax(zS, dim=-1)
    logpT = F.log_softmax(zT, dim=-1)
    if beta == 1.0:
        diff = logpS - logpT  # log p_S - log p_T
        pS = logpS.exp_()
        kl = (pS * diff).sum(-1)
        if grad_out_C is None:
            return kl, None
        return kl, diff.sub_(kl[:, None]).mul_(pS).mul_(grad_out_C[:, None])
    diff = logpT - logpS
    pT = logpT.exp_()
    kl = (pT * diff).sum(-1)
    if grad_out_C is None:
        return kl, None
    return kl, logpS.exp_().sub_(pT).mul_(grad_out_C[:, None])


class _LeanKL(torch.autograd.Function):
    """Per-token forward or reverse KL `[N]` from hidden states and heads with a hand-written backward.

    The forward keeps no logits; the backward recomputes each chunk's logits once and forms the
    gradient in place (three `[chunk, V]` buffers), instead of autograd's many temporaries."""

    @staticmethod
    def forward(ctx, hS, WS, bS, hT, WT, bT, beta, temperature, vocab_size, dtype, chunk):
        ctx.save_for_backward(hS, WS, bS, hT, WT, bT)
        ctx.cfg = (beta, temperature, vocab_size, dtype, chunk)
        out = []
        with torch.no_grad():
            for start in range(0, hS.shape[0], chunk):
                sl = slice(start, start + chunk)
                zS = _head_logits(hS[sl], WS, bS, vocab_size, temperature, dtype)
                zT = _head_logits(hT[sl], WT, bT, vocab_size, temperature, dtype)
                out.append(_kl_chunk_grad(zS, zT, beta, None)[0])
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out_N):
        hS, WS, bS, hT, WT, bT = ctx.saved_tensors
        beta, temperature, vocab_size, dtype, chunk = ctx.cfg
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bS is not None and ctx.needs_input_grad[2]
        g_h = torch.zeros_like(hS) if need_h else None
        g_W = torch.zeros(WS.shape, dtype=dtype, device=WS.device) if need_W else None
        g_b = torch.zeros(bS.shape, dtype=dtype, device=bS.device) if need_b else None
        with torch.no_grad():
            for start in range(0, hS.shape[0], chunk):
                sl = slice(start, start + chunk)
                zS = _head_logits(hS[sl], WS, bS, vocab_size, temperature, dtype)
                zT = _head_logits(hT[sl], WT, bT, vocab_size, temperature, dtype)
                _, g_z = _kl_chunk_grad(zS, zT, beta, grad_out_N[sl].to(dtype))
                g_z = g_z.div_(temperature)  # d z / d logits = 1 / temperature
                if g_h is not None:
                    g_h[sl] = (g_z @ WS[:vocab_size].to(dtype)).to(hS.dtype)
                if g_W is not None:
                    g_W[:vocab_size].addmm_(g_z.T, hS[sl].to(dtype))
                if g_b is not None:
                    g_b[:vocab_size] += g_z.sum(0)
                del zS, zT, g_z
        return (
            g_h,
            None if g_W is None else g_W.to(WS.dtype),
            None if g_b is None else g_b.to(bS.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def chunked_divergence(
    student_hidden_N_H: torch.Tensor,
    student_head_weight_V_H: torch.Tensor,
    teacher_hidden_N_H: torch.Tensor,
    teacher_head_weight_V_H: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token generalized JSD `[N]` from hidden states and LM heads, `chunk_size` rows at a time.

    Equals `generalized_jsd(h_S @ W_S.T, h_T @ W_T.T, beta=beta, reduction="none")` without
    ever holding `N x V` logits: the teacher side runs under no_grad, the student side of
    each chunk is activation-checkpointed, so forward and backward each hold one chunk.
    The hidden sizes of teacher and student may differ.  `vocab_size` truncates both heads
    to their first `vocab_size` rows (padded vocabularies); it is required when the heads'
    V differ.  Gradients flow into the student hidden states, head weight and bias.
    """
    beta = _check_beta(beta)
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    _check_head("student", student_hidden_N_H, student_head_weight_V_H, student_head_bias)
    _check_head("teacher", teacher_hidden_N_H, teacher_head_weight_V_H, teacher_head_bias)
    if student_hidden_N_H.shape[0] != teacher_hidden_N_H.shape[0]:
        raise ValueError(
            f"student and teacher hidden states must cover the same N tokens; got student "
            f"N={student_hidden_N_H.shape[0]} and teacher N={teacher_hidden_N_H.shape[0]}"
        )
    vocab_size = _check_vocab_size(
        vocab_size, student=student_head_weight_V_H.shape[0], teacher=teacher_head_weight_V_H.shape[0]
    )
    dtype = _compute_dtype(student_hidden_N_H.dtype, teacher_hidden_N_H.dtype)
    n_rows = student_hidden_N_H.shape[0]
    if n_rows == 0:
        return student_hidden_N_H.new_zeros(0, dtype=dtype)
    chunk_size = rows_per_chunk(chunk_size, vocab_size)
    if beta in (0.0, 1.0) and _needs_grad(student_hidden_N_H, student_head_weight_V_H, student_head_bias):
        # forward / reverse KL: a hand-written backward holds three [chunk, V] buffers, not autograd's dozen
        return _LeanKL.apply(
            student_hidden_N_H,
            student_head_weight_V_H,
            student_head_bias,
            teacher_hidden_N_H.detach(),
            teacher_head_weight_V_H.detach(),
            None if teacher_head_bias is None else teacher_head_bias.detach(),
            beta,
            temperature,
            vocab_size,
            dtype,
            chunk_size,
        )
    fn = functools.partial(_divergence_chunk, beta=beta, temperature=temperature, vocab_size=vocab_size, dtype=dtype)
    return _map_chunks(
        fn,
        chunk_size,
        n_rows,
        (student_hidden_N_H, teacher_hidden_N_H),
        (student_head_weight_V_H, student_head_bias, teacher_head_weight_V_H, teacher_head_bias),
        checkpointed=_needs_grad(student_hidden_N_H, student_head_weight_V_H, student_head_bias),
    )


def _token_logp_chunk(hidden, tokens, weight, bias, *, temperature, vocab_size, dtype):
    logits = _head_logits(hidden, weight, bias, vocab_size, temperature, dtype)
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_token_logp(
    hidden_N_H: torch.Tensor,
    head_weight_V_H: torch.Tensor,
    tokens_N: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """log softmax(h @ W.T / temperature)[token] per row, `[N]`, with gradients, one checkpointed chunk at a time."""
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    _check_head("model", hidden_N_H, head_weight_V_H, bias)
    vocab_size = _check_vocab_size(vocab_size, model=head_weight_V_H.shape[0])
    if tuple(tokens_N.shape) != (hidden_N_H.shape[0],):
        raise ValueError(
            f"tokens must be [N] = [{hidden_N_H.shape[0]}] to match the hidden states; got {tuple(tokens_N.shape)}"
        )
    if tokens_N.dtype.is_floating_point or tokens_N.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor of token ids; got dtype {tokens_N.dtype}")
    dtype = _compute_dtype(hidden_N_H.dtype)
    if tokens_N.numel() == 0:
        return hidden_N_H.new_zeros(0, dtype=dtype)
    low, high = int(tokens_N.min()), int(tokens_N.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got ids in [{low}, {high}] "
            f"(replace ignore-index values such as -100 before calling)"
        )
    fn = functools.partial(_token_logp_chunk, temperature=temperature, vocab_size=vocab_size, dtype=dtype)
    return _map_chunks(
        fn,
        rows_per_chunk(chunk_size, vocab_size),
        hidden_N_H.shape[0],
        (hidden_N_H, tokens_N.long()),
        (head_weight_V_H, bias),
        checkpointed=_needs_grad(hidden_N_H, head_weight_V_H, bias),
    )


def _entropy_chunk(hidden, weight, bias, *, temperature, vocab_size, dtype):
    logp = F.log_softmax(_head_logits(hidden, weight, bias, vocab_size, temperature, dtype), dim=-1)
    return -_p_log_ratio(logp, torch.zeros_like(logp)).sum(dim=-1)


def chunked_entropy(
    hidden_N_H: torch.Tensor,
    head_weight_V_H: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Entropy `[N]` of softmax(h @ W.T / temperature) per row, one (checkpointed) chunk at a time."""
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    _check_head("model", hidden_N_H, head_weight_V_H, bias)
    vocab_size = _check_vocab_size(vocab_size, model=head_weight_V_H.shape[0])
    dtype = _compute_dtype(hidden_N_H.dtype)
    if hidden_N_H.shape[0] == 0:
        return hidden_N_H.new_zeros(0, dtype=dtype)
    fn = functools.partial(_entropy_chunk, temperature=temperature, vocab_size=vocab_size, dtype=dtype)
    return _map_chunks(
        fn,
        rows_per_chunk(chunk_size, vocab_size),
        hidden_N_H.shape[0],
        (hidden_N_H,),
        (head_weight_V_H, bias),
        checkpointed=_needs_grad(hidden_N_H, head_weight_V_H, bias),
    )


# --------------------------------------------------------------------------- top-k + tail


def _tail_logp(logp: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_{i in topk} p_i) as the logsumexp of the entries outside the top-k (-inf if none)."""
    outside = logp.scatter(-1, topk_idx, -math.inf)
    return _safe_logsumexp(outside, dim=-1)


def topk_tail(
    teacher_logits_N_V: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress teacher logits `[..., V]` to top-k log-probs plus one tail bucket.

    Returns `(topk_idx [..., k], topk_logp [..., k], tail_logp [...])` where
    `tail_logp = log(1 - sum of the top-k probabilities)` at the given temperature,
    computed as the logsumexp of the log-probs outside the top-k (no cancellation when the
    top-k hold almost all the mass); it is -inf when the tail is empty (k == V).
    """
    temperature = _check_temperature(temperature)
    vocab = teacher_logits_N_V.shape[-1]
    if int(k) != k or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in [1, V={vocab}]; got k={k!r}")
    dtype = _compute_dtype(teacher_logits_N_V.dtype)
    logp = F.log_softmax(teacher_logits_N_V.to(dtype) / temperature, dim=-1)
    topk_logp, topk_idx = logp.topk(int(k), dim=-1)
    return topk_idx, topk_logp, _tail_logp(logp, topk_idx)


def topk_tail_divergence(
    student_logits_N_V: torch.Tensor,
    topk_idx_N_K: torch.Tensor,
    teacher_topk_logp_N_K: torch.Tensor,
    teacher_tail_logp_N: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token generalized JSD `[...]` on k + 1 buckets: the teacher's top-k tokens and one tail.

    The student's distribution is collapsed onto the same buckets: its log-probs at
    `topk_idx` and `log(1 - sum of those probabilities)` for the tail.  With k == V this
    equals `generalized_jsd(..., reduction="none")` (values and gradients).
    """
    beta = _check_beta(beta)
    temperature = _check_temperature(temperature)
    lead = tuple(student_logits_N_V.shape[:-1])
    if topk_idx_N_K.shape != teacher_topk_logp_N_K.shape or tuple(topk_idx_N_K.shape[:-1]) != lead:
        raise ValueError(
            f"topk_idx and teacher_topk_logp must both be [..., K] with leading dims {lead} of the "
            f"student logits; got {tuple(topk_idx_N_K.shape)} and {tuple(teacher_topk_logp_N_K.shape)}"
        )
    if tuple(teacher_tail_logp_N.shape) != lead:
        raise ValueError(f"teacher_tail_logp must be [...] = {lead}; got {tuple(teacher_tail_logp_N.shape)}")
    dtype = _compute_dtype(student_logits_N_V.dtype, teacher_topk_logp_N_K.dtype)
    student_logp = F.log_softmax(student_logits_N_V.to(dtype) / temperature, dim=-1)
    topk_idx_N_K = topk_idx_N_K.long()
    student_buckets = torch.cat(
        [student_logp.gather(-1, topk_idx_N_K), _tail_logp(student_logp, topk_idx_N_K).unsqueeze(-1)], dim=-1
    )
    teacher_buckets = torch.cat([teacher_topk_logp_N_K.to(dtype), teacher_tail_logp_N.to(dtype).unsqueeze(-1)], dim=-1)
    return _jsd_from_logp(student_buckets, teacher_buckets, beta)
