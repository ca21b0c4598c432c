"""Reference tests for mmdistill.kernels (and the SFT losses built on its
chunked heads): brute-force float64 enumeration over small vocabularies; the registered
divergence objectives (jsd.py, reverse_kl.py, forward_kl.py, gkd.py, opsd.py), hard_ce and sft
on the same brute force.

    pytest tests/test_objectives_divergence.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmdistill.kernels as divergence
from mmdistill.interfaces import ObjectiveBatch, Rollout
from mmdistill.kernels import (
    chunked_divergence,
    chunked_entropy,
    chunked_token_logp,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    topk_tail,
    topk_tail_divergence,
)
from mmdistill.objectives.forward_kl import ForwardKL
from mmdistill.objectives.gkd import GKD
from mmdistill.objectives.hard_ce import HardCE
from mmdistill.objectives.jsd import JSD
from mmdistill.objectives.opsd import OPSD
from mmdistill.objectives.reverse_kl import ReverseKL
from mmdistill.objectives.sft import SFT, chunked_token_nll, token_nll
from mmdistill.stepdist import Categorical, HiddenCategorical

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
F64 = torch.float64


# --------------------------------------------------------------------------- brute force


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    finite = [x / temperature for x in row if x != -math.inf]
    top = max(finite)
    exps = [0.0 if x == -math.inf else math.exp(x / temperature - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    out = 0.0
    for pi, qi in zip(p, q):
        if pi > 0:
            out += math.inf if qi == 0 else pi * math.log(pi / qi)
    return out


def _jsd_probs(p_student: list[float], p_teacher: list[float], beta: float) -> float:
    if beta == 0.0:
        return _kl(p_teacher, p_student)
    if beta == 1.0:
        return _kl(p_student, p_teacher)
    mix = [beta * t + (1 - beta) * s for s, t in zip(p_student, p_teacher)]
    return beta * _kl(p_teacher, mix) + (1 - beta) * _kl(p_student, mix)


def _brute_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0):
    """Per-token generalized JSD `[...]` by plain Python sums over the vocabulary."""
    s_rows = student_logits.reshape(-1, student_logits.shape[-1]).tolist()
    t_rows = teacher_logits.reshape(-1, teacher_logits.shape[-1]).tolist()
    values = [_jsd_probs(_softmax(s, temperature), _softmax(t, temperature), beta) for s, t in zip(s_rows, t_rows)]
    return torch.tensor(values, dtype=F64).reshape(student_logits.shape[:-1])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- generalized JSD


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_jsd_matches_brute_force(beta, temperature):
    g = _gen(0)
    student = 2.0 * torch.randn(2, 3, 7, generator=g, dtype=F64)
    teacher = 2.0 * torch.randn(2, 3, 7, generator=g, dtype=F64)
    got = generalized_jsd(student, teacher, beta=beta, temperature=temperature, reduction="none")
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, _brute_jsd(student, teacher, beta, temperature), rtol=0, atol=1e-12)


def test_endpoints_are_exact_kls_and_wrappers_agree():
    g = _gen(1)
    student = torch.randn(4, 9, generator=g, dtype=F64)
    teacher = torch.randn(4, 9, generator=g, dtype=F64)
    fkl = torch.tensor([_kl(_softmax(t), _softmax(s)) for s, t in zip(student.tolist(), teacher.tolist())], dtype=F64)
    rkl = torch.tensor([_kl(_softmax(s), _softmax(t)) for s, t in zip(student.tolist(), teacher.tolist())], dtype=F64)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.0, reduction="none"), fkl, rtol=0, atol=1e-12)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=1.0, reduction="none"), rkl, rtol=0, atol=1e-12)
    torch.testing.assert_close(forward_kl(student, teacher, reduction="none"), fkl, rtol=0, atol=1e-12)
    torch.testing.assert_close(reverse_kl(student, teacher, reduction="none"), rkl, rtol=0, atol=1e-12)
    assert not torch.allclose(fkl, rkl)  # the two directions really differ here


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_nonnegative_and_bounded(beta):
    g = _gen(2)
    student = 4.0 * torch.randn(256, 11, generator=g, dtype=F64)
    teacher = 4.0 * torch.randn(256, 11, generator=g, dtype=F64)
    got = generalized_jsd(student, teacher, beta=beta, reduction="none")
    assert (got >= -1e-12).all()
    if 0.0 < beta < 1.0:
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert (got <= bound + 1e-12).all()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_bound_is_attained_by_disjoint_supports(beta):
    teacher = torch.tensor([[0.0, -math.inf, -math.inf]], dtype=F64)
    student = torch.tensor([[-math.inf, 0.0, -math.inf]], dtype=F64)
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    got = generalized_jsd(student, teacher, beta=beta, reduction="none")
    torch.testing.assert_close(got, torch.tensor([bound], dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_zero_iff_equal(beta):
    g = _gen(3)
    logits = torch.randn(5, 8, generator=g, dtype=F64)
    same = generalized_jsd(logits, logits + 3.0, beta=beta, reduction="none")  # same distribution
    assert same.abs().max() < 1e-12
    other = logits.clone()
    other[:, 0] += 0.1
    assert (generalized_jsd(logits, other, beta=beta, reduction="none") > 1e-8).all()


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_zero_teacher_probabilities_give_finite_values_and_grads(beta):
    g = _gen(4)
    teacher = torch.randn(3, 6, generator=g, dtype=F64)
    teacher[:, :2] = -math.inf  # teacher probability exactly 0 on two tokens
    student = torch.randn(3, 6, generator=g, dtype=F64, requires_grad=True)
    # token 0 is banned for both models (e.g. a masked vocabulary entry): 0 * log(0 / 0) = 0
    banned = torch.tensor([-math.inf, 0, 0, 0, 0, 0], dtype=F64)
    got = generalized_jsd(student + banned, teacher, beta=beta, reduction="none")
    torch.testing.assert_close(got, _brute_jsd((student + banned).detach(), teacher, beta), rtol=0, atol=1e-12)
    got.sum().backward()
    assert torch.isfinite(student.grad).all()
    # reverse KL with a teacher zero under student mass is genuinely infinite
    assert torch.isinf(generalized_jsd(student.detach(), teacher, beta=1.0, reduction="none")).all()


def test_masking_and_reductions_by_hand():
    g = _gen(5)
    student = torch.randn(2, 3, 5, generator=g, dtype=F64)
    teacher = torch.randn(2, 3, 5, generator=g, dtype=F64)
    student[1, 2] = math.nan  # garbage at a masked (padding) position must not leak
    mask = torch.tensor([[True, True, False], [True, False, False]])
    per = _brute_jsd(student, teacher, 0.5)
    kept = [per[0, 0].item(), per[0, 1].item(), per[1, 0].item()]

    none = generalized_jsd(student, teacher, mask, beta=0.5, reduction="none")
    assert none.shape == (2, 3)
    assert none[0, 2] == 0 and none[1, 1] == 0 and none[1, 2] == 0
    torch.testing.assert_close(none[mask], torch.tensor(kept, dtype=F64), rtol=0, atol=1e-12)
    total = generalized_jsd(student, teacher, mask, beta=0.5, reduction="sum")
    assert abs(total.item() - sum(kept)) < 1e-12
    mean = generalized_jsd(student, teacher, mask, beta=0.5, reduction="batchmean")
    assert abs(mean.item() - sum(kept) / 3) < 1e-12
    # float 0/1 masks behave like bool masks
    mean_f = generalized_jsd(student, teacher, mask.to(F64), beta=0.5, reduction="batchmean")
    assert abs(mean_f.item() - sum(kept) / 3) < 1e-12
    # nothing kept: 0, not NaN
    empty = generalized_jsd(student, teacher, torch.zeros(2, 3, dtype=torch.bool), beta=0.5)
    assert empty.item() == 0.0
    # no mask: mean over every token
    clean = student.clone()
    clean[1, 2] = 0.0
    want = _brute_jsd(clean, teacher, 0.5).mean().item()
    assert abs(generalized_jsd(clean, teacher, beta=0.5).item() - want) < 1e-12


def test_argument_errors():
    x = torch.zeros(2, 4)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta must lie in"):
            generalized_jsd(x, x, beta=bad)
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd(x, x, reduction="mean")
    with pytest.raises(ValueError, match="same shape"):
        generalized_jsd(x, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="mask"):
        generalized_jsd(x, x, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd(x, x, temperature=0.0)


def test_low_precision_inputs_compute_in_float32():
    g = _gen(6)
    student = torch.randn(4, 10, generator=g)
    teacher = torch.randn(4, 10, generator=g)
    got = generalized_jsd(student.bfloat16(), teacher.bfloat16(), beta=0.5)
    assert got.dtype == torch.float32
    want = generalized_jsd(student.bfloat16().double(), teacher.bfloat16().double(), beta=0.5)
    assert abs(got.item() - want.item()) < 1e-5


# --------------------------------------------------------------------------- chunked


def _heads(seed, n=13, h_s=5, h_t=6, v_s=17, v_t=17, bias=False):
    g = _gen(seed)
    s_h = torch.randn(n, h_s, generator=g, dtype=F64, requires_grad=True)
    s_w = torch.randn(v_s, h_s, generator=g, dtype=F64, requires_grad=True)
    t_h = torch.randn(n, h_t, generator=g, dtype=F64)
    t_w = torch.randn(v_t, h_t, generator=g, dtype=F64)
    s_b = torch.randn(v_s, generator=g, dtype=F64, requires_grad=True) if bias else None
    t_b = torch.randn(v_t, generator=g, dtype=F64) if bias else None
    return s_h, s_w, s_b, t_h, t_w, t_b


def _grads(out, inputs):
    return torch.autograd.grad(out, [x for x in inputs if x is not None], retain_graph=True)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 100])
def test_chunked_divergence_matches_full(beta, chunk_size):
    s_h, s_w, s_b, t_h, t_w, t_b = _heads(10, bias=(chunk_size == 4))
    weights = torch.rand(s_h.shape[0], generator=_gen(11), dtype=F64)

    got = chunked_divergence(
        s_h, s_w, t_h, t_w, beta, temperature=0.7, chunk_size=chunk_size, student_head_bias=s_b, teacher_head_bias=t_b
    )
    s_logits = F.linear(s_h, s_w, s_b)
    t_logits = F.linear(t_h, t_w, t_b)
    want = generalized_jsd(s_logits, t_logits, beta=beta, temperature=0.7, reduction="none")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    for g_got, g_want in zip(
        _grads((got * weights).sum(), (s_h, s_w, s_b)), _grads((want * weights).sum(), (s_h, s_w, s_b))
    ):
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-6)


def test_chunked_divergence_checkpoints_each_chunk_and_keeps_teacher_frozen(monkeypatch):
    calls = []
    real = divergence.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(divergence, "checkpoint", counting)
    s_h, s_w, _, t_h, t_w, _ = _heads(12)
    t_w.requires_grad_(True)  # e.g. self-distillation where the teacher head is the student's
    out = chunked_divergence(s_h, s_w, t_h, t_w, 0.5, chunk_size=5)
    assert calls == [False, False, False]  # ceil(13 / 5) chunks, non-reentrant
    out.sum().backward()
    assert t_w.grad is None and s_w.grad is not None and s_h.grad is not None

    calls.clear()
    with torch.no_grad():
        chunked_divergence(s_h, s_w, t_h, t_w, 0.5, chunk_size=5)
    assert calls == []  # no backward, no checkpointing needed


def test_chunked_heads_save_no_logits_for_backward():
    """Only inputs (hidden rows, head weights) are kept for backward, never a [chunk, V] logits tensor."""
    s_h, s_w, _, t_h, t_w, _ = _heads(16)  # H_S = 5, H_T = 6, V = 17
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_divergence(s_h, s_w, t_h, t_w, 0.5, chunk_size=4)
        chunked_token_logp(s_h, s_w, torch.zeros(13, dtype=torch.long), chunk_size=4)
        chunked_entropy(s_h, s_w, chunk_size=4)
    assert shapes and all(shape[-1] != 17 for shape in shapes), shapes  # logits would end in V = 17


def test_chunked_divergence_vocab_truncation_and_mismatch_error():
    s_h, s_w, _, t_h, t_w, _ = _heads(13, v_s=20, v_t=23)
    got = chunked_divergence(s_h, s_w, t_h, t_w, 0.5, chunk_size=4, vocab_size=17)
    want = generalized_jsd(s_h @ s_w[:17].T, t_h @ t_w[:17].T, beta=0.5, reduction="none")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"student V=20, teacher V=23.*vocab_size"):
        chunked_divergence(s_h, s_w, t_h, t_w, 0.5)
    with pytest.raises(ValueError, match="exceeds"):
        chunked_divergence(s_h, s_w, t_h, t_w, 0.5, vocab_size=21)
    with pytest.raises(ValueError, match="same N"):
        chunked_divergence(s_h, s_w, t_h[:5], t_w, 0.5, vocab_size=17)


@pytest.mark.parametrize("chunk_size", [3, 13])
def test_chunked_token_logp_and_entropy_match_full(chunk_size):
    s_h, s_w, s_b, _, _, _ = _heads(14, v_s=19, bias=True)
    tokens = torch.randint(0, 15, (13,), generator=_gen(15))
    got = chunked_token_logp(s_h, s_w, tokens, temperature=1.3, chunk_size=chunk_size, vocab_size=15, bias=s_b)
    logp_full = F.log_softmax(F.linear(s_h, s_w[:15], s_b[:15]) / 1.3, dim=-1)
    want = logp_full.gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for g_got, g_want in zip(_grads(got.sum(), (s_h, s_w, s_b)), _grads(want.sum(), (s_h, s_w, s_b))):
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-10)

    ent = chunked_entropy(s_h, s_w, temperature=1.3, chunk_size=chunk_size, vocab_size=15, bias=s_b)
    ent_want = -(logp_full.exp() * logp_full).sum(-1)
    torch.testing.assert_close(ent, ent_want, rtol=0, atol=1e-10)
    torch.testing.assert_close(_grads(ent.sum(), (s_h,))[0], _grads(ent_want.sum(), (s_h,))[0], rtol=0, atol=1e-10)

    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 15\)"):
        chunked_token_logp(s_h, s_w, torch.full((13,), 15), vocab_size=15)


# --------------------------------------------------------------------------- top-k + tail


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_topk_with_k_equal_v_is_the_full_divergence(beta, temperature):
    g = _gen(20)
    teacher = 2.0 * torch.randn(6, 9, generator=g, dtype=F64)
    if beta < 1.0:  # (under reverse KL a zero-probability teacher token makes the value +inf)
        teacher[0, 3] = -math.inf  # a zero-probability teacher token
    student = (2.0 * torch.randn(6, 9, generator=g, dtype=F64)).requires_grad_(True)

    idx, topk_logp, tail = topk_tail(teacher, k=9, temperature=temperature)
    assert torch.isneginf(tail).all()
    got = topk_tail_divergence(student, idx, topk_logp, tail, beta, temperature=temperature)
    want = generalized_jsd(student, teacher, beta=beta, temperature=temperature, reduction="none")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    (g_got,) = torch.autograd.grad(got.sum(), student)
    (g_want,) = torch.autograd.grad(want.sum(), student)
    assert torch.isfinite(got).all() and torch.isfinite(g_got).all()
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_topk_tail_divergence_matches_brute_force_buckets(beta, k):
    g = _gen(21)
    teacher = 2.0 * torch.randn(5, 8, generator=g, dtype=F64)
    student = (2.0 * torch.randn(5, 8, generator=g, dtype=F64)).requires_grad_(True)
    temperature = 0.8
    idx, topk_logp, tail = topk_tail(teacher, k=k, temperature=temperature)

    want = []
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p_t, p_s = _softmax(t_row, temperature), _softmax(s_row, temperature)
        top = sorted(range(8), key=lambda i: -p_t[i])[:k]
        t_buckets = [p_t[i] for i in top] + [1 - sum(p_t[i] for i in top)]
        s_buckets = [p_s[i] for i in top] + [1 - sum(p_s[i] for i in top)]
        want.append(_jsd_probs(s_buckets, t_buckets, beta))
    got = topk_tail_divergence(student, idx, topk_logp, tail, beta, temperature=temperature)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=0, atol=1e-10)
    (grad,) = torch.autograd.grad(got.sum(), student)
    assert torch.isfinite(grad).all()


def test_topk_tail_compression_is_exact_and_stable():
    g = _gen(22)
    teacher = torch.randn(4, 10, generator=g, dtype=F64)
    idx, topk_logp, tail = topk_tail(teacher, k=3, temperature=2.0)
    logp = F.log_softmax(teacher / 2.0, dim=-1)
    torch.testing.assert_close(topk_logp, logp.gather(-1, idx))
    assert (topk_logp.min(-1).values >= logp.sort(-1, descending=True).values[:, 2] - 1e-15).all()
    torch.testing.assert_close(topk_logp.exp().sum(-1) + tail.exp(), torch.ones(4, dtype=F64))
    # top-1 holds all but ~2e^-50 of the mass: float32 still resolves the tail
    # (log1mexp of the top-k logsumexp would round it to log 0 = -inf)
    _, _, tiny_tail = topk_tail(torch.tensor([[50.0, 0.0, 0.0]]), k=1)
    assert tiny_tail.dtype == torch.float32
    assert abs(tiny_tail.item() - (math.log(2.0) - 50.0)) < 1e-4
    with pytest.raises(ValueError, match="k must be"):
        topk_tail(teacher, k=11)


# --------------------------------------------------------------------------- SFT (nll)


def test_token_nll_matches_cross_entropy():
    g = _gen(30)
    logits = torch.randn(2, 4, 7, generator=g, dtype=F64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 4), generator=g)
    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    targets[~mask] = -100
    loss, metrics = token_nll(logits, targets, mask, temperature=2.0)
    want = F.cross_entropy((logits / 2.0).reshape(-1, 7), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, want)
    assert metrics["tokens"] == 5.0 and abs(metrics["nll"] - want.item()) < 1e-12
    loss_n, _ = token_nll(logits, targets, mask, temperature=2.0, normalizer=10)
    torch.testing.assert_close(loss_n, want * 5 / 10)


@pytest.mark.parametrize("chunk_size", [2, 1024])
def test_chunked_token_nll_matches_token_nll(chunk_size):
    s_h, s_w, _, _, _, _ = _heads(31, v_s=12)
    targets = torch.randint(0, 10, (13,), generator=_gen(32))
    mask = torch.rand(13, generator=_gen(33)) > 0.3
    targets[~mask] = -100
    got, got_m = chunked_token_nll(s_h, s_w, targets, mask, chunk_size=chunk_size, vocab_size=10)
    want, want_m = token_nll((s_h @ s_w[:10].T)[None], targets[None], mask[None])
    torch.testing.assert_close(got, want)
    assert got_m == pytest.approx(want_m)
    for g_got, g_want in zip(_grads(got, (s_h, s_w)), _grads(want, (s_h, s_w))):
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- registered divergence objectives


def _objective_batch(B=3, T=4, V=6, seed=11):
    g = _gen(seed)
    student_logits = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    teacher_logits = 2 * torch.randn(B, T, V, generator=g, dtype=F64)
    actions = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=F64)
    mask[0, 3] = mask[2, 2:] = 0
    r = Rollout(
        context=None, steps=None, actions=actions, mask_B_T=mask, behavior_logp_B_T=torch.zeros(B, T, dtype=F64)
    )
    b = ObjectiveBatch(r, Categorical(student_logits, mask), Categorical(teacher_logits, mask), normalizer=7.0)
    return b, student_logits, teacher_logits, actions, mask


@pytest.mark.parametrize(
    "obj, beta",
    [
        (ReverseKL(), 1.0),
        (ForwardKL(), 0.0),
        (JSD(), 0.5),
        (JSD(beta=0.2), 0.2),
        (GKD(beta=0.9), 0.9),
        (OPSD(), 1.0),
    ],
)
def test_divergence_objectives_equal_brute_force(obj, beta):
    b, s_logits, t_logits, _, mask = _objective_batch()
    want_B_T = _brute_jsd(s_logits.detach(), t_logits, beta) * mask
    loss, metrics = obj(b)
    assert float(loss.detach()) == pytest.approx(float(want_B_T.sum() / 7.0), rel=1e-10)
    assert metrics == {"divergence": pytest.approx(float(want_B_T.sum() / mask.sum()), rel=1e-10)}
    (grad,) = torch.autograd.grad(loss, s_logits)
    assert float(grad[mask == 0].abs().max()) == 0.0 and float(grad.abs().max()) > 0


def test_divergence_objective_topk_is_the_teacher_topk():
    g = _gen(3)
    B, T, H, V = 2, 3, 5, 9
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
    student = HiddenCategorical(
        torch.randn(B, T, H, generator=g, dtype=F64), torch.randn(V, H, generator=g, dtype=F64), mask
    )
    teacher = HiddenCategorical(
        torch.randn(B, T, H, generator=g, dtype=F64), torch.randn(V, H, generator=g, dtype=F64), mask
    )
    r = Rollout(
        context=None, steps=None, actions=torch.zeros(B, T, dtype=torch.long), mask_B_T=mask, behavior_logp_B_T=mask
    )
    b = ObjectiveBatch(r, student, teacher, normalizer=5.0)
    for obj in (ReverseKL(topk=2), JSD(beta=0.3, topk=2), ForwardKL(topk=2), GKD(topk=2), OPSD(topk=2)):
        d_B_T = student.divergence(teacher.topk(2), beta=obj.beta)
        full_B_T = student.divergence(teacher, beta=obj.beta)
        loss = obj(b)[0].detach()
        assert float(loss) == pytest.approx(float((d_B_T * mask).sum() / 5.0), rel=1e-12)
        assert float(loss) != pytest.approx(float((full_B_T * mask).sum() / 5.0), rel=1e-3)


def test_divergence_objectives_check_their_arguments():
    with pytest.raises(ValueError, match=r"objective\.beta must lie in \[0, 1\], got 1.5"):
        JSD(beta=1.5)
    with pytest.raises(ValueError, match=r"objective\.temperature must be > 0, got 0"):
        ReverseKL(temperature=0)
    with pytest.raises(ValueError, match=r"objective\.topk must be >= 1"):
        ForwardKL(topk=0)
    with pytest.raises(ValueError, match=r"objective\.lmbda must lie in \[0, 1\]"):
        GKD(lmbda=-0.1)
    with pytest.raises(ValueError, match="privileged_template must contain"):
        OPSD(privileged_template="{question}")
    assert (
        ForwardKL().source == "teacher" and ReverseKL().source == "student" and JSD(temperature=2.0).temperature == 2.0
    )


def test_sft_and_hard_ce_by_hand():
    b, s_logits, t_logits, actions, mask = _objective_batch()
    logp_B_T_V = torch.log_softmax(s_logits.detach(), -1)
    nll_B_T = -logp_B_T_V.gather(-1, actions[..., None]).squeeze(-1) * mask
    loss, m = SFT()(b)
    assert float(loss.detach()) == pytest.approx(float(nll_B_T.sum() / 7.0), rel=1e-12)
    assert m == {"nll": pytest.approx(float(nll_B_T.sum() / mask.sum()), rel=1e-12)}
    hard_B_T = -logp_B_T_V.gather(-1, t_logits.argmax(-1, keepdim=True)).squeeze(-1) * mask
    loss, m = HardCE()(b)
    assert float(loss.detach()) == pytest.approx(float(hard_B_T.sum() / 7.0), rel=1e-12)
    assert m == {"nll": pytest.approx(float(hard_B_T.sum() / mask.sum()), rel=1e-12)}
    assert (
        not SFT().needs.teacher
        and SFT(source="teacher").needs.teacher
        and not SFT(source="teacher").needs.teacher_scores
    )
