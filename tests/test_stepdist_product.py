"""The arm + gripper product step distribution (`GaussianBernoulli`) against brute force and Monte Carlo.

OMP_NUM_THREADS=1 python -m pytest tests/test_stepdist_product.py -q -s
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from mmdistill.interfaces import StepDist
from mmdistill.stepdist import Gaussian, GaussianBernoulli

B, T, D = 2, 3, 2
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
N_MC = 200_000
SIGMAS = 4.0  # Monte-Carlo tolerance in standard errors


def _params(seed: int, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    log_std = 0.4 * torch.randn(B, T, D, generator=g, dtype=torch.float64) - 0.3
    logit = 1.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return tuple(x.requires_grad_(requires_grad) for x in (mean, log_std, logit))


def _dist(mean, log_std, logit, mask=MASK) -> GaussianBernoulli:
    return GaussianBernoulli(mean, log_std.exp(), logit, mask)


def _refs(mean, log_std, logit) -> tuple[Independent, Bernoulli]:
    return Independent(Normal(mean, log_std.exp()), 1), Bernoulli(logits=logit)


def _expand(d: GaussianBernoulli, n: int) -> GaussianBernoulli:
    """The same distribution repeated along a leading sample dim (n independent draws per step)."""
    return GaussianBernoulli(
        d.mean_B_T_D.expand(n, *d.mean_B_T_D.shape),
        d.std_B_T_D.expand(n, *d.std_B_T_D.shape),
        d.gripper_logit_B_T.expand(n, *d.gripper_logit_B_T.shape),
        d.mask_B_T.expand(n, *d.mask_B_T.shape),
    )


def _within(est: torch.Tensor, se: torch.Tensor, exact: torch.Tensor) -> bool:
    return bool(((est - exact).abs() <= SIGMAS * se + 1e-12).all())


def test_log_prob_and_entropy_match_torch_distributions():
    mean, log_std, logit = _params(0)
    d = _dist(mean, log_std, logit)
    arm_ref, grip_ref = _refs(mean, log_std, logit)
    g = torch.Generator().manual_seed(1)
    arm = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    closed = torch.rand(B, T, generator=g) < 0.5
    grip = torch.where(closed, 1.0, -1.0).double()
    a = torch.cat([arm, grip[..., None]], -1)
    ref = (arm_ref.log_prob(arm) + grip_ref.log_prob(closed.double())) * MASK
    torch.testing.assert_close(d.log_prob(a), ref)
    # a continuous gripper value is read by its sign, as robosuite does
    a_soft = torch.cat([arm, 0.3 * grip[..., None]], -1)
    torch.testing.assert_close(d.log_prob(a_soft), ref)
    # another encoding (0 open, 1 close) gives the same log-probs
    d01 = GaussianBernoulli(mean, log_std.exp(), logit, MASK, open_value=0.0, close_value=1.0)
    torch.testing.assert_close(d01.log_prob(torch.cat([arm, closed.double()[..., None]], -1)), ref)
    # and so does an inverted one (+1 open, -1 close)
    inv = GaussianBernoulli(mean, log_std.exp(), logit, MASK, open_value=1.0, close_value=-1.0)
    torch.testing.assert_close(inv.log_prob(torch.cat([arm, -grip[..., None]], -1)), ref)
    ent_ref = (arm_ref.entropy() + grip_ref.entropy()) * MASK
    torch.testing.assert_close(d.entropy(), ent_ref)
    per_dim = d.entropy_per_dim()
    assert per_dim.shape == (B, T, D + 1)
    torch.testing.assert_close(per_dim.sum(-1), ent_ref)
    torch.testing.assert_close(per_dim[..., -1], grip_ref.entropy() * MASK)
    torch.testing.assert_close(per_dim[..., :D], Normal(mean, log_std.exp()).entropy() * MASK[..., None])


def test_kl_and_divergence_match_torch_and_monte_carlo():
    s_par, t_par = _params(2), _params(3)
    s, t = _dist(*s_par), _dist(*t_par)
    (sa, sg), (ta, tg) = _refs(*s_par), _refs(*t_par)
    rkl_ref = (kl_divergence(sa, ta) + kl_divergence(sg, tg)) * MASK
    fkl_ref = (kl_divergence(ta, sa) + kl_divergence(tg, sg)) * MASK
    torch.testing.assert_close(s.kl(t), rkl_ref)
    torch.testing.assert_close(s.divergence(t, 1.0), rkl_ref)
    torch.testing.assert_close(s.divergence(t, 0.0), fkl_ref)
    with pytest.raises(ValueError, match="beta 0"):
        s.divergence(t, 0.5)
    # Monte Carlo: KL(P || Q) = E_{a ~ P}[log P(a) - log Q(a)], per step
    torch.manual_seed(4)
    for p, q, exact, name in ((s, t, rkl_ref, "reverse KL(S||T)"), (t, s, fkl_ref, "forward KL(T||S)")):
        a = _expand(p, N_MC).sample()
        assert a.shape == (N_MC, B, T, D + 1) and set(a[..., -1].unique().tolist()) <= {-1.0, 1.0}
        r = p.log_prob(a) - q.log_prob(a)  # log-probs broadcast over the leading sample dim
        est, se = r.mean(0), r.std(0) / N_MC**0.5
        print(
            f"\n{name}: closed {exact.flatten().tolist()}\n  MC {est.flatten().tolist()}\n  se {se.flatten().tolist()}"
        )
        assert _within(est, se, exact), (est, se, exact)
        assert (est[MASK == 0] == 0).all()


def test_reverse_kl_gradient_equals_expected_sampled_reward_gradient():
    """grad KL(S||T) = E_{a~S}[grad log S(a) * sg(log S(a) - log T(a) - b)] for any per-state constant b."""
    mean, log_std, logit = _params(5, requires_grad=True)
    t = _dist(*_params(6))
    s = _dist(mean, log_std, logit)
    kl_B_T = s.kl(t)
    exact = torch.autograd.grad(kl_B_T.sum(), (mean, log_std, logit), retain_graph=True)
    fkl_grad = torch.autograd.grad(s.divergence(t, 0.0).sum(), (mean, log_std, logit))
    # per-sample copies of the student's parameters give per-sample gradients (for the standard error)
    torch.manual_seed(7)
    copies = [x.detach().expand(N_MC, *x.shape).clone().requires_grad_(True) for x in (mean, log_std, logit)]
    s_N = _dist(*copies, mask=MASK.expand(N_MC, B, T))
    a = s_N.sample()
    lp = s_N.log_prob(a)
    reward = (lp - t.log_prob(a)).detach()
    for baseline, label in ((kl_B_T.detach(), "baseline = closed-form KL"), (0.0, "no baseline")):
        per_sample = torch.autograd.grad((lp * (reward - baseline)).sum(), copies, retain_graph=True)
        print(f"\n{label}:")
        for name, g_N, g_exact, g_fkl in zip(("mean", "log_std", "gripper_logit"), per_sample, exact, fkl_grad):
            est, se = g_N.mean(0), g_N.std(0) / N_MC**0.5
            print(f"  {name}: closed {g_exact.flatten().tolist()}")
            print(f"  {name}: MC     {est.flatten().tolist()}")
            print(f"  {name}: se     {se.flatten().tolist()}")
            assert _within(est, se, g_exact), (name, est, se, g_exact)
            assert (g_exact[MASK == 0] == 0).all()
            if isinstance(baseline, torch.Tensor):  # the check has power: it rejects the forward-KL gradient
                assert not _within(est, se, g_fkl), name


def test_gripper_reverse_kl_gradient_by_exact_enumeration():
    _, _, z_t = _params(6)
    mean, log_std, z = _params(5, requires_grad=True)
    s, t = _dist(mean, log_std, z), _dist(mean.detach(), log_std.detach(), z_t)
    (exact,) = torch.autograd.grad(s.kl(t).sum(), z, retain_graph=True)
    surrogate = 0.0
    for closed in (True, False):  # sum over both gripper outcomes, weighted by their probability
        c = torch.full((B, T), closed)
        lp_s, lp_t = s.gripper_log_prob(c), t.gripper_log_prob(c)
        surrogate = surrogate + (lp_s.exp() * (lp_s - lp_t)).detach() * lp_s * MASK
    (enumerated,) = torch.autograd.grad(surrogate.sum(), z)
    torch.testing.assert_close(enumerated, exact, rtol=1e-12, atol=1e-12)


def test_select_mode_mask_protocol_and_teaching_errors():
    mean, log_std, logit = _params(8)
    logit = torch.tensor([[2.0, -0.5, 1.0], [-3.0, 0.7, 0.0]], dtype=torch.float64)
    d = _dist(mean, log_std, logit)
    assert isinstance(d, StepDist)
    m = d.mode()
    assert m.shape == (B, T, D + 1)
    torch.testing.assert_close(m[..., :D], mean)
    assert m[..., -1].tolist() == [[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]]  # close iff logit > 0
    # the mode's gripper is the likelier outcome
    flipped = m.clone()
    flipped[..., -1] = -flipped[..., -1]
    assert (d.log_prob(m) >= d.log_prob(flipped)).all()
    # masked steps are exact zeros in every [B, T] method, whatever the parameters there
    a = d.sample()
    t = _dist(*_params(9))
    for out in (d.log_prob(a), d.entropy(), d.kl(t), d.divergence(t, 0.0)):
        assert out.shape == (B, T) and (out[MASK == 0] == 0).all() and (out[MASK == 1] != 0).all()
    assert (d.entropy_per_dim()[MASK == 0] == 0).all()
    rows = torch.tensor([1, 0])
    for sel, sl in ((d.select(rows), rows), (d.select(slice(1, 2)), slice(1, 2))):
        assert isinstance(sel, GaussianBernoulli)
        torch.testing.assert_close(sel.log_prob(a[sl]), d.log_prob(a)[sl])
        torch.testing.assert_close(sel.entropy(), d.entropy()[sl])
        torch.testing.assert_close(sel.kl(t.select(sl)), d.kl(t)[sl])
        torch.testing.assert_close(sel.mode(), m[sl])
    moved = d.to("cpu")
    torch.testing.assert_close(moved.log_prob(a), d.log_prob(a))
    enc = GaussianBernoulli(mean, log_std.exp(), logit, MASK, open_value=0.0, close_value=1.0)
    assert set(enc.select(rows).to("cpu").sample()[..., -1].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="topk: null"):
        d.topk(3)
    with pytest.raises(ValueError, match="GaussianBernoulli"):
        d.kl(Gaussian(mean, log_std.exp(), MASK))
    with pytest.raises(ValueError, match="D \\+ 1"):
        d.log_prob(a[..., :D])
    with pytest.raises(ValueError, match="distinct"):
        GaussianBernoulli(mean, log_std.exp(), logit, MASK, open_value=1.0, close_value=1.0)


def test_from_flat_layouts_and_std_clamp():
    mean, log_std, logit = _params(10)
    flat = torch.cat([mean, log_std, logit[..., None]], -1)
    d = GaussianBernoulli.from_flat(flat, MASK)
    ref = _dist(mean, log_std, logit)
    a = ref.sample()
    torch.testing.assert_close(d.log_prob(a), ref.log_prob(a))
    # a state-independent log-std: the flat output is [mean, gripper_logit]
    log_std_D = torch.tensor([-0.2, 0.1], dtype=torch.float64, requires_grad=True)
    d2 = GaussianBernoulli.from_flat(torch.cat([mean, logit[..., None]], -1), MASK, log_std_D=log_std_D)
    torch.testing.assert_close(d2.std_B_T_D, log_std_D.detach().exp().expand(B, T, D))
    d2.entropy().sum().backward()
    assert log_std_D.grad is not None and (log_std_D.grad == MASK.sum()).all()  # d entropy / d log_std = 1 per step
    # the std is clamped into [exp(log_std_min), exp(log_std_max)]
    wild = torch.cat([mean, torch.full_like(log_std, 50.0), logit[..., None]], -1)
    assert torch.allclose(
        GaussianBernoulli.from_flat(wild, MASK, log_std_max=1.0).std_B_T_D, torch.tensor(1.0, dtype=torch.float64).exp()
    )
    with pytest.raises(ValueError, match="2D \\+ 1"):
        GaussianBernoulli.from_flat(flat[..., :-1], MASK)
    with pytest.raises(ValueError, match="D \\+ 1"):
        GaussianBernoulli.from_flat(flat, MASK, log_std_D=log_std_D)
