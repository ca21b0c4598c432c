"""Reference tests for mmdistill.objectives.grpo: group advantages against a per-group
loop, the k3 estimator, and the loss against a hand-assembled surrogate + KL.

    pytest tests/test_objectives_grpo.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from mmdistill.objectives.grpo import group_advantages, grpo_loss, k3_kl

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _loop_reference(rewards: list[float], ids: list[int], eps: float, scale_by_std: bool) -> list[float]:
    out = []
    for r, gid in zip(rewards, ids):
        members = [x for x, j in zip(rewards, ids) if j == gid]
        mean = sum(members) / len(members)
        if not scale_by_std:
            out.append(r - mean)
            continue
        var = sum((x - mean) ** 2 for x in members) / (len(members) - 1) if len(members) > 1 else 0.0
        out.append((r - mean) / (math.sqrt(var) + eps))
    return out


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_match_per_group_loop(scale_by_std):
    ids = [7, 3, 7, 42, 3, 7, 3, 7, 7, 100, 42, 3]  # groups of sizes 5, 4, 2, 1, interleaved
    rewards = torch.randn(len(ids), generator=_gen(0), dtype=F64)
    got = group_advantages(rewards, torch.tensor(ids), eps=1e-6, scale_by_std=scale_by_std)
    want = _loop_reference(rewards.tolist(), ids, 1e-6, scale_by_std)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=0, atol=1e-12)
    assert got[ids.index(100)] == 0.0  # a group of one has no signal


def test_group_advantages_edge_cases():
    same = group_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1]))
    assert torch.equal(same, torch.zeros(4))  # all-equal rewards: 0, not NaN
    ints = group_advantages(torch.tensor([1, 0, 0, 1]), torch.tensor([0, 0, 0, 0]))
    assert ints.dtype == torch.float32 and ints[0] > 0 > ints[1]
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.ones(4), torch.zeros(3, dtype=torch.long))


def test_k3_nonnegative_and_zero_iff_equal():
    g = _gen(1)
    logp = torch.randn(4, 50, generator=g, dtype=F64) * 3
    ref = torch.randn(4, 50, generator=g, dtype=F64) * 3
    k3 = k3_kl(logp, ref)
    assert (k3 > 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros_like(logp))
    d = ref - logp
    torch.testing.assert_close(k3, d.exp() - d - 1)


def test_grpo_loss_by_hand():
    g = _gen(2)
    B, T = 3, 5
    behavior = torch.randn(B, T, generator=g, dtype=F64) - 2
    logp = (behavior + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).requires_grad_(True)
    ref = behavior + 0.1 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)

    loss, metrics = grpo_loss(logp, behavior, adv, mask, ref_logp_B_T=ref, clip_eps=0.2, kl_beta=0.04)

    ratio = (logp - behavior).exp()
    a = adv[:, None].expand(B, T)
    surrogate = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    d = ref - logp
    per_token = -surrogate + 0.04 * (d.exp() - d - 1)
    want = per_token[mask].sum() / mask.sum()
    torch.testing.assert_close(loss, want)
    (g_got,) = torch.autograd.grad(loss, logp, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g_got, g_want)
    k3_mean = (d.exp() - d - 1)[mask].mean().item()
    assert metrics["kl"] == pytest.approx(k3_mean)
    assert set(metrics) == {"ratio_mean", "clip_fraction", "advantage_mean", "kl"}

    no_ref, no_ref_metrics = grpo_loss(logp, behavior, adv, mask, normalizer=20)
    torch.testing.assert_close(no_ref, -surrogate[mask].sum() / 20)
    assert "kl" not in no_ref_metrics
