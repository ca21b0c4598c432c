"""Reference tests for mmdistill.objectives.policy_gradient and mmdistill.objectives.opd:
brute-force discounting, hand-computed PPO clipping, and the OPD gradient identity by
exact enumeration over a small vocabulary.

    pytest tests/test_objectives_pg.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from mmdistill.kernels import reverse_kl
from mmdistill.objectives.opd import opd_advantages, opd_loss
from mmdistill.objectives.policy_gradient import discounted_cumsum, policy_gradient_loss

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- discounting


def _brute_discounted(x: torch.Tensor, gamma: float) -> torch.Tensor:
    rows = x.tolist()
    out = [[sum(gamma ** (u - t) * row[u] for u in range(t, len(row))) for t in range(len(row))] for row in rows]
    return torch.tensor(out, dtype=x.dtype)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("T", [1, 5, 64, 65, 150])
def test_discounted_cumsum_matches_double_loop(gamma, T):
    x = torch.randn(3, T, generator=_gen(T), dtype=F64)
    torch.testing.assert_close(discounted_cumsum(x, gamma), _brute_discounted(x, gamma), rtol=1e-12, atol=1e-10)


def test_discounted_cumsum_gamma_zero_and_mask():
    x = torch.randn(2, 6, generator=_gen(1), dtype=F64)
    assert torch.equal(discounted_cumsum(x, 0.0), x)
    mask = torch.tensor([[True, True, False, True, True, False], [False, True, True, True, True, True]])
    x_nan = x.clone()
    x_nan[~mask] = math.nan  # masked positions neither contribute nor leak
    got = discounted_cumsum(x_nan, 0.7, mask)
    want = _brute_discounted(torch.where(mask, x, 0.0), 0.7) * mask
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="gamma must lie in"):
        discounted_cumsum(x, 1.5)


# --------------------------------------------------------------------------- policy-gradient loss


def _case():
    # ratios 1.5, 1.5, 0.5, 0.5 against advantages +1, -1, +1, -1 (and one masked token)
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 3.0]], dtype=F64)
    behavior = torch.zeros(1, 5, dtype=F64)
    logp = ratio.log().requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 7.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, True, False]])
    return logp, behavior, adv, mask


def test_importance_sampling_loss_by_hand():
    logp, behavior, adv, mask = _case()
    loss, metrics = policy_gradient_loss(logp, behavior, adv, mask)
    assert loss.item() == pytest.approx(-(1.5 - 1.5 + 0.5 - 0.5) / 4)
    (grad,) = torch.autograd.grad(loss, logp)  # d(-rho A / 4)/dlogp = -rho A / 4
    torch.testing.assert_close(grad, torch.tensor([[-1.5, 1.5, -0.5, 0.5, 0.0]], dtype=F64) / 4)
    assert metrics == pytest.approx({"ratio_mean": 1.0, "clip_fraction": 0.0, "advantage_mean": 0.0})
    assert all(type(v) is float for v in metrics.values())


def test_ppo_clipping_by_hand():
    logp, behavior, adv, mask = _case()
    loss, metrics = policy_gradient_loss(logp, behavior, adv, mask, clip_eps=0.2)
    # min(1.5, 1.2) = 1.2 (clipped), min(-1.5, -1.2) = -1.5, min(0.5, 0.8) = 0.5, min(-0.5, -0.8) = -0.8 (clipped)
    assert loss.item() == pytest.approx(-(1.2 - 1.5 + 0.5 - 0.8) / 4)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.5, -0.5, 0.0, 0.0]], dtype=F64) / 4)
    assert metrics["clip_fraction"] == pytest.approx(0.5)

    logp, behavior, adv, mask = _case()
    loss_hi, _ = policy_gradient_loss(logp, behavior, adv, mask, clip_eps=0.2, clip_eps_high=0.3, normalizer=10)
    assert loss_hi.item() == pytest.approx(-(1.3 - 1.5 + 0.5 - 0.8) / 10)

    # ratios inside [1 - eps, 1 + eps]: nothing clipped, the loss is the plain IS loss
    inside = torch.tensor([[1.1, 0.9, 1.0]], dtype=F64).log()
    adv3, mask3 = torch.tensor([[1.0, -1.0, 2.0]], dtype=F64), torch.ones(1, 3, dtype=torch.bool)
    loss_in, metrics_in = policy_gradient_loss(inside, torch.zeros(1, 3, dtype=F64), adv3, mask3, clip_eps=0.2)
    assert metrics_in["clip_fraction"] == 0.0
    assert loss_in.item() == pytest.approx(-(1.1 - 0.9 + 2.0) / 3)


def test_policy_gradient_shape_error():
    logp, behavior, adv, mask = _case()
    with pytest.raises(ValueError, match=r"one shape.*advantage \(1, 4\)"):
        policy_gradient_loss(logp, behavior, adv[:, :4], mask)


# --------------------------------------------------------------------------- OPD


def _state(seed: int, V: int = 6):
    g = _gen(seed)
    student_z = torch.randn(V, generator=g, dtype=F64, requires_grad=True)
    teacher_logp = torch.log_softmax(torch.randn(V, generator=g, dtype=F64), dim=-1)
    return student_z, teacher_logp


def test_opd_score_function_identity_by_enumeration():
    """sum_y pi(y) grad log pi(y) sg(log pi(y) - log pi_T(y)) == grad KL(pi || pi_T)."""
    student_z, teacher_logp = _state(0)
    logp = torch.log_softmax(student_z, dim=-1)
    pi = logp.exp().detach()
    score_sum = torch.zeros_like(student_z)
    for y in range(student_z.shape[0]):  # exact expectation over the vocabulary
        (grad_logp_y,) = torch.autograd.grad(logp[y], student_z, retain_graph=True)
        score_sum += pi[y] * grad_logp_y * (logp[y] - teacher_logp[y]).detach()
    kl = (logp.exp() * (logp - teacher_logp)).sum()
    (grad_kl,) = torch.autograd.grad(kl, student_z)
    torch.testing.assert_close(score_sum, grad_kl, rtol=0, atol=1e-12)
    assert grad_kl.abs().max() > 1e-3  # a real, non-trivial gradient


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_opd_loss_expected_gradient_is_reverse_kl_gradient(clip_eps):
    """Every action y as its own one-token rollout sampled by the current policy (rho = 1),
    weighted by pi(y): the expected opd_loss gradient equals grad KL(pi || pi_T)."""
    student_z, teacher_logp = _state(1)
    V = student_z.shape[0]
    logp_all = torch.log_softmax(student_z, dim=-1)
    pi = logp_all.exp().detach()
    expected_loss = 0.0
    for y in range(V):
        logp_y = logp_all[y].reshape(1, 1)
        loss_y, _ = opd_loss(
            logp_y,
            logp_y.detach(),
            teacher_logp[y].reshape(1, 1),
            torch.ones(1, 1, dtype=torch.bool),
            clip_eps=clip_eps,
        )
        expected_loss = expected_loss + pi[y] * loss_y
    (grad_opd,) = torch.autograd.grad(expected_loss, student_z)
    kl = reverse_kl(student_z[None], teacher_logp[None], reduction="sum")
    (grad_kl,) = torch.autograd.grad(kl, student_z)
    torch.testing.assert_close(grad_opd, grad_kl, rtol=0, atol=1e-12)


def test_opd_is_zero_when_student_equals_teacher():
    g = _gen(2)
    logits = torch.randn(2, 3, 5, generator=g, dtype=F64)
    logp = torch.log_softmax(logits, dim=-1)
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    token_logp = logp.gather(-1, tokens[..., None]).squeeze(-1).requires_grad_(True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = opd_advantages(token_logp.detach(), token_logp.detach(), mask, gamma=0.9)
    assert torch.equal(adv, torch.zeros_like(adv))
    loss, metrics = opd_loss(token_logp, token_logp.detach(), token_logp.detach(), mask)
    (grad,) = torch.autograd.grad(loss, token_logp)
    assert loss.item() == 0.0 and grad.abs().max() == 0.0 and metrics["reverse_kl"] == 0.0
    assert reverse_kl(logits, logits, reduction="none").abs().max() < 1e-12


def test_opd_advantages_by_hand():
    behavior = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=F64, requires_grad=True)
    teacher = torch.tensor([[-1.5, -1.0, -0.5, -math.inf]], dtype=F64)  # -inf under padding
    mask = torch.tensor([[True, True, True, False]])
    env = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=F64)
    adv = opd_advantages(behavior, teacher, mask, coef=2.0, gamma=0.5, env_advantage_B_T=env)
    assert not adv.requires_grad  # a reward: stop-gradient
    per_token = [-2.0 * 0.5, -2.0 * -1.0, 1.0 + 0.0]  # A_env - coef * (behavior - teacher)
    want = [
        per_token[0] + 0.5 * per_token[1] + 0.25 * per_token[2],
        per_token[1] + 0.5 * per_token[2],
        per_token[2],
        0.0,
    ]
    torch.testing.assert_close(adv, torch.tensor([want], dtype=F64))

    logp = behavior.detach().clone().requires_grad_(True)
    loss, metrics = opd_loss(
        logp, behavior.detach(), teacher, mask, coef=2.0, gamma=0.5, env_advantage_B_T=env, normalizer=6
    )
    assert loss.item() == pytest.approx(-sum(want[:3]) / 6)
    assert metrics["reverse_kl"] == pytest.approx((0.5 - 1.0 + 0.0) / 3)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
