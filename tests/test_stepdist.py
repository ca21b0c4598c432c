"""Step distributions against torch.distributions and against each other."""

from __future__ import annotations

import torch

from mmdistill.interfaces import ObjectiveBatch, Rollout, StepDist
from mmdistill.registry import OBJECTIVES
from mmdistill.stepdist import (
    Categorical,
    Gaussian,
    GaussianBernoulli,
    HiddenCategorical,
    RoutedCategorical,
    TopKCategorical,
    VelocityStepDist,
)

GRPO, OPD, SFT, ReverseKL = (OBJECTIVES.get(n) for n in ("grpo", "opd", "sft", "reverse_kl"))

torch.manual_seed(0)


def test_gaussian_matches_torch_distributions():
    mean, std = torch.randn(2, 3, 4, dtype=torch.float64), torch.rand(2, 3, 4, dtype=torch.float64) + 0.1
    mean2, std2 = torch.randn(2, 3, 4, dtype=torch.float64), torch.rand(2, 3, 4, dtype=torch.float64) + 0.1
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    a = torch.randn(2, 3, 4, dtype=torch.float64)
    g, g2 = Gaussian(mean, std, mask), Gaussian(mean2, std2, mask)
    ref = torch.distributions.Normal(mean, std)
    ref2 = torch.distributions.Normal(mean2, std2)
    torch.testing.assert_close(g.log_prob(a), ref.log_prob(a).sum(-1) * mask)
    torch.testing.assert_close(g.kl(g2), torch.distributions.kl_divergence(ref, ref2).sum(-1) * mask)
    torch.testing.assert_close(g.entropy(), ref.entropy().sum(-1) * mask)


def test_hidden_categorical_equals_full_categorical():
    B, T, H, V = 3, 5, 8, 11
    h_s, h_t = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True), torch.randn(B, T, H, dtype=torch.float64)
    w_s, w_t = torch.randn(V, H, dtype=torch.float64), torch.randn(V + 5, H, dtype=torch.float64)  # padded teacher head
    mask = (torch.rand(B, T) > 0.3).double()
    acts = torch.randint(0, V, (B, T))
    s, t = (
        HiddenCategorical(h_s, w_s, mask, vocab_size=V, chunk_size=4),
        HiddenCategorical(h_t, w_t, mask, vocab_size=V, chunk_size=4),
    )
    cs, ct = Categorical(h_s @ w_s.T, mask), Categorical((h_t @ w_t.T)[..., :V], mask)
    torch.testing.assert_close(s.log_prob(acts), cs.log_prob(acts))
    for beta in (0.0, 0.5, 1.0):
        torch.testing.assert_close(s.divergence(t, beta), cs.divergence(ct, beta))
    torch.testing.assert_close(s.entropy(), cs.entropy())
    torch.testing.assert_close(s.divergence(t.topk(V), 1.0), cs.divergence(ct, 1.0))


def _batch(student_logits, teacher_logits, actions, mask, behavior=None, rewards=None):
    B, T = actions.shape
    r = Rollout(
        context=None,
        steps=None,
        actions=actions,
        mask_B_T=mask,
        behavior_logp_B_T=behavior if behavior is not None else torch.zeros(B, T, dtype=student_logits.dtype),
        rewards_B=rewards,
        group_ids_B=torch.zeros(B, dtype=torch.long),
    )
    return ObjectiveBatch(
        r,
        Categorical(student_logits, mask),
        Categorical(teacher_logits, mask),
        Categorical(teacher_logits.detach(), mask),
        float(mask.sum()),
    )


def test_registered_objectives_zero_when_student_is_teacher():
    logits = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 4, dtype=torch.float64)
    acts = torch.randint(0, 7, (2, 4))
    behavior = torch.log_softmax(logits.detach(), -1).gather(-1, acts[..., None]).squeeze(-1)
    b = _batch(logits, logits.detach().clone(), acts, mask, behavior)
    loss, m = ReverseKL()(b)
    assert abs(float(loss.detach())) < 1e-12 and abs(m["divergence"]) < 1e-12
    loss, m = OPD()(b)
    assert abs(m["reverse_kl"]) < 1e-12
    (g,) = torch.autograd.grad(loss, logits)
    assert g.abs().max() < 1e-12  # every advantage is 0


def test_sft_objective_is_mean_token_nll():
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    acts = torch.randint(0, 5, (2, 3))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    loss, m = SFT()(_batch(logits, logits, acts, mask))
    ref = -sum(torch.log_softmax(logits[i, j], -1)[acts[i, j]] for i in range(2) for j in range(3) if mask[i, j]) / 5
    torch.testing.assert_close(loss, ref)


def test_grpo_objective_pushes_towards_rewarded_sample():
    logits = torch.zeros(2, 1, 3, dtype=torch.float64, requires_grad=True)
    acts = torch.tensor([[0], [1]])
    mask = torch.ones(2, 1, dtype=torch.float64)
    behavior = torch.full((2, 1), -torch.log(torch.tensor(3.0, dtype=torch.float64)))
    b = _batch(logits, logits.detach(), acts, mask, behavior, rewards=torch.tensor([1.0, 0.0], dtype=torch.float64))
    loss, m = GRPO(kl_beta=0.0)(b)
    (g,) = torch.autograd.grad(loss, logits)
    assert g[0, 0, 0] < 0 and g[1, 0, 1] > 0  # descent raises the rewarded token, lowers the other
    assert m["reward"] == 0.5


def test_every_family_is_a_complete_stepdist():
    mask = torch.ones(2, 3)
    fams = [
        Categorical(torch.randn(2, 3, 5), mask),
        HiddenCategorical(torch.randn(2, 3, 4), torch.randn(5, 4), mask),
        TopKCategorical(torch.zeros(6, 2, dtype=torch.long), torch.zeros(6, 2), torch.zeros(6), mask),
        Gaussian(torch.zeros(2, 3, 2), torch.ones(2, 3, 2), mask),
        VelocityStepDist(torch.zeros(2, 3, 2), None, None, torch.zeros(2, 3), mask),
        GaussianBernoulli(torch.zeros(2, 3, 2), torch.ones(2, 3, 2), torch.zeros(2, 3), mask),
    ]
    for d in fams:
        assert isinstance(d, StepDist), type(d).__name__


def test_select_mode_topk_agree_with_the_full_distribution():
    B, T, H, V = 4, 5, 6, 9
    mask = (torch.rand(B, T) > 0.3).double()
    mask[:, 0] = 1.0
    h, w = torch.randn(B, T, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    full = Categorical(h @ w.T, mask)
    hidden = HiddenCategorical(h, w, mask, chunk_size=3)
    acts = torch.randint(0, V, (B, T))
    torch.testing.assert_close(hidden.mode() * mask.long(), full.mode() * mask.long())
    rows = torch.tensor([1, 3])
    for d in (full, hidden):
        torch.testing.assert_close(d.select(rows).log_prob(acts[rows]), d.log_prob(acts)[rows])
        torch.testing.assert_close(d.select(slice(1, 3)).entropy(), d.entropy()[1:3])
    top = full.topk(V)  # k = V keeps everything: the same log-probs, an empty tail
    torch.testing.assert_close(top.log_prob(acts), full.log_prob(acts))
    torch.testing.assert_close(top.select(rows).log_prob(acts[rows]), full.log_prob(acts)[rows])
    torch.testing.assert_close(top.mode() * mask.long(), full.mode() * mask.long())
    # shrinking the stored lists moves their mass into the tail bucket: the total stays 1
    small = top.topk(3)
    total = torch.logsumexp(torch.cat([small.topk_logp_N_K, small.tail_logp_N[:, None]], 1), 1)
    torch.testing.assert_close(total, torch.zeros_like(total))
    routed = RoutedCategorical(
        [
            (torch.tensor([0, 2]), full.select(torch.tensor([0, 2]))),
            (torch.tensor([1, 3]), full.select(torch.tensor([1, 3]))),
        ],
        mask,
    )
    torch.testing.assert_close(routed.log_prob(acts), full.log_prob(acts))
    torch.testing.assert_close(routed.mode() * mask.long(), full.mode() * mask.long())


def test_gaussian_select_and_teaching_errors():
    g = Gaussian(torch.randn(3, 2, 4), torch.rand(3, 2, 4) + 0.5, torch.ones(3, 2))
    a = torch.randn(3, 2, 4)
    torch.testing.assert_close(g.select(slice(0, 2)).log_prob(a[:2]), g.log_prob(a)[:2])
    try:
        g.topk(4)
    except ValueError as e:
        assert "topk: null" in str(e)
    else:
        raise AssertionError("a Gaussian has no top-k form")
