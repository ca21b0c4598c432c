"""Reference tests for SCOPE, KEPO, SOD and Uni-OPD (objectives/scope.py, kepo.py, sod.py,
uniopd.py, each with its registered class): each method's invariant from docs/objectives.md section 8,
each loss against a float64 per-rollout loop, and each registered objective called
through ObjectiveBatch with tiny Categorical student and teacher.

    pytest tests/test_objectives_text_methods.py -q
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from mmdistill.interfaces import Needs, Objective, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.objectives.grpo import group_advantages, grpo_loss
from mmdistill.objectives.kepo import KEPO, kepo_gate, kepo_loss
from mmdistill.objectives.opd import opd_advantages, opd_loss
from mmdistill.objectives.scope import SCOPE, scope_loss, scope_weights
from mmdistill.objectives.sod import SOD, sod_advantages, sod_loss, sod_step_weights, step_ids
from mmdistill.objectives.uniopd import UniOPD, group_gap, margin_calibrate, uniopd_loss
from mmdistill.registry import OBJECTIVES
from mmdistill.stepdist import Categorical

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logps(seed: int, B: int, T: int):
    """Behaviour, current (with gradient) and teacher log-probs of sampled tokens, all < 0."""
    g = _gen(seed)
    behavior = -torch.rand(B, T, generator=g, dtype=F64) * 3 - 0.05
    logp = (behavior + 0.2 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3).requires_grad_(True)
    teacher = -torch.rand(B, T, generator=g, dtype=F64) * 3 - 0.05
    return logp, behavior, teacher


def _surrogate(rho: float, adv: float, clip_eps: float | None) -> float:
    if clip_eps is None:
        return rho * adv
    return min(rho * adv, min(max(rho, 1 - clip_eps), 1 + clip_eps) * adv)


# --------------------------------------------------------------------------- SCOPE

GROUPS = torch.tensor([5, 5, 5, 2, 2, 9, 9, 9])
CORRECT = torch.tensor([True, False, True, False, False, True, True, True])  # group 2 all wrong, 9 all correct
MASK = torch.tensor(
    [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]],
    dtype=F64,
)


def _mean_logp(row: list[float], mask_row: list[float]) -> float:
    kept = [x for x, m in zip(row, mask_row) if m]
    return sum(kept) / len(kept)


def _scope_weights_loop(student, teacher, mask, correct, groups, tau):
    """w_i = PPL^(+-1/tau) / sum over the rollout's (group, branch), perplexities via math.exp."""
    B = len(groups)
    raw = []
    for i in range(B):
        if correct[i]:
            raw.append(math.exp(-_mean_logp(student[i], mask[i])) ** (1 / tau))  # PPL_S^(1/tau)
        else:
            raw.append(math.exp(-_mean_logp(teacher[i], mask[i])) ** (-1 / tau))  # PPL_T^(-1/tau)
    out, sizes = [], []
    for i in range(B):
        same = [j for j in range(B) if groups[j] == groups[i] and correct[j] == correct[i]]
        out.append(raw[i] / sum(raw[j] for j in same))
        sizes.append(len(same))
    return out, sizes


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_scope_weights_sum_to_one_per_branch_and_match_loop(tau):
    _, behavior, teacher = _logps(0, 8, 4)
    w = scope_weights(behavior, teacher, MASK, CORRECT, GROUPS, tau=tau)
    want, _ = _scope_weights_loop(
        behavior.tolist(), teacher.tolist(), MASK.tolist(), CORRECT.tolist(), GROUPS.tolist(), tau
    )
    torch.testing.assert_close(w, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-14)
    assert bool((w > 0).all())
    for gid in GROUPS.unique().tolist():
        for branch in (True, False):
            rows = (GROUPS == gid) & (CORRECT == branch)
            if rows.any():  # an empty branch (group 2 has no correct, group 9 no wrong rollout) has no weights
                assert float(w[rows].sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(w[(GROUPS == 2)].sum()) == pytest.approx(1.0) and float(w[(GROUPS == 9)].sum()) == pytest.approx(1.0)


def test_scope_weights_direction():
    """Correct: the less confident student sample weighs more; wrong: the one the teacher finds likelier weighs more."""
    mask = torch.ones(2, 1, dtype=F64)
    groups = torch.tensor([0, 0])
    w_c = scope_weights(
        torch.tensor([[-0.1], [-2.0]], dtype=F64),
        torch.zeros(2, 1, dtype=F64),
        mask,
        torch.tensor([True, True]),
        groups,
    )
    assert w_c[1] > w_c[0]
    w_w = scope_weights(
        torch.zeros(2, 1, dtype=F64),
        torch.tensor([[-0.1], [-2.0]], dtype=F64),
        mask,
        torch.tensor([False, False]),
        groups,
    )
    assert w_w[0] > w_w[1]
    torch.testing.assert_close(
        w_c, torch.tensor([math.exp(0.1), math.exp(2.0)], dtype=F64) / (math.exp(0.1) + math.exp(2.0))
    )


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_scope_loss_matches_per_rollout_loop(clip_eps):
    logp, behavior, teacher = _logps(1, 8, 4)
    coef, mle_coef, tau, N = 0.7, 1.3, 1.0, 40.0
    loss, metrics = scope_loss(
        logp,
        behavior,
        teacher,
        MASK,
        CORRECT,
        GROUPS,
        tau=tau,
        coef=coef,
        mle_coef=mle_coef,
        clip_eps=clip_eps,
        normalizer=N,
    )

    w, sizes = _scope_weights_loop(
        behavior.tolist(), teacher.tolist(), MASK.tolist(), CORRECT.tolist(), GROUPS.tolist(), tau
    )
    want = torch.zeros((), dtype=F64)
    for i in range(8):
        for t in range(4):
            if not MASK[i, t]:
                continue
            scale = sizes[i] * w[i]
            if CORRECT[i]:
                want = want - mle_coef * scale * logp[i, t]
            else:
                adv = scale * -coef * float(behavior[i, t] - teacher[i, t])
                rho = torch.exp(logp[i, t] - behavior[i, t])
                clipped = rho if clip_eps is None else rho.clamp(1 - clip_eps, 1 + clip_eps)
                want = want - torch.minimum(rho * adv, clipped * adv)
    want = want / N
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    (g_got,) = torch.autograd.grad(loss, logp, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-14)
    assert metrics["correct_fraction"] == pytest.approx(5 / 8)
    assert metrics["weight_max"] == pytest.approx(max(s * x for s, x in zip(sizes, w)))
    assert all(type(v) is float for v in metrics.values())


def test_scope_equal_perplexities_reduce_to_mle_plus_opd():
    """Equal perplexities inside each branch: every n_branch * w is 1, so the loss is plain MLE + plain OPD."""
    logp, behavior, teacher = _logps(2, 4, 3)
    behavior = behavior[:, :1].expand(4, 3).clone()  # every rollout has the same mean log-prob ...
    teacher = teacher[:, :1].expand(4, 3).clone()
    for dst, src in ((1, 0), (3, 2)):  # ... equal within each branch
        behavior[dst], teacher[dst] = behavior[src], teacher[src]
    correct, groups, mask = (
        torch.tensor([True, True, False, False]),
        torch.zeros(4, dtype=torch.long),
        torch.ones(4, 3, dtype=F64),
    )
    loss, _ = scope_loss(logp, behavior, teacher, mask, correct, groups)
    c_mask, w_mask = mask * correct[:, None], mask * ~correct[:, None]
    opd, _ = opd_loss(logp, behavior, teacher, w_mask, normalizer=12)
    torch.testing.assert_close(loss, -(logp * c_mask).sum() / 12 + opd, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- KEPO


@pytest.mark.parametrize("gamma,clip_eps", [(0.0, None), (0.5, 0.2)])
def test_kepo_zero_under_gate_and_plain_opd_above(gamma, clip_eps):
    logp, behavior, teacher = _logps(3, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=F64)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2], dtype=F64)  # 0.5: exactly at the gate passes
    passed = kepo_gate(rewards, 0.5)
    assert passed.tolist() == [True, False, True, False]
    loss, metrics = kepo_loss(
        logp, behavior, teacher, mask, rewards, threshold=0.5, coef=2.0, gamma=gamma, clip_eps=clip_eps
    )
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[~passed].abs().max() == 0.0  # no distillation gradient under the gate
    assert grad[passed].abs().max() > 1e-3

    plain, _ = opd_loss(logp, behavior, teacher, mask, coef=2.0, gamma=gamma, clip_eps=clip_eps)  # every rollout
    (grad_plain,) = torch.autograd.grad(plain, logp)
    torch.testing.assert_close(grad[passed], grad_plain[passed], rtol=1e-12, atol=1e-14)  # above the gate: plain OPD

    # hand reference: -sum over gated-in tokens of rho * A / (all kept tokens)
    adv = opd_advantages(behavior, teacher, mask, coef=2.0, gamma=gamma).tolist()
    rho = (logp.detach() - behavior).exp().tolist()
    want = -sum(_surrogate(rho[i][t], adv[i][t], clip_eps) for i in (0, 2) for t in range(5) if mask[i, t]) / float(
        mask.sum()
    )
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert metrics["gate_pass_fraction"] == 0.5


def test_kepo_all_under_gate_is_zero_and_all_above_is_opd():
    logp, behavior, teacher = _logps(4, 3, 4)
    mask = torch.ones(3, 4, dtype=F64)
    loss, _ = kepo_loss(logp, behavior, teacher, mask, torch.zeros(3, dtype=F64), threshold=0.5)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.0 and grad.abs().max() == 0.0
    loss, _ = kepo_loss(logp, behavior, teacher, mask, torch.ones(3, dtype=F64), threshold=0.5, normalizer=7)
    plain, _ = opd_loss(logp, behavior, teacher, mask, normalizer=7)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)


# --------------------------------------------------------------------------- SOD


def test_step_ids_by_hand():
    actions = torch.tensor([[4, 9, 3, 9, 9, 1, 0], [0, 2, 9, 2, 2, 9, 5]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]], dtype=F64)  # row 1: a masked first position
    assert step_ids(actions, mask, step_token_id=9).tolist() == [[0, 0, 1, 1, 2, 3, -1], [-1, 0, 0, 1, 1, 1, 2]]
    assert step_ids(actions, mask, step_len=2).tolist() == [[0, 0, 1, 1, 2, 2, -1], [-1, 0, 0, 1, 1, 2, 2]]
    with pytest.raises(ValueError, match="exactly one of step_token_id"):
        step_ids(actions, mask, step_token_id=9, step_len=2)


def _sod_weights_loop(student, teacher, ids, delta, eps):
    out = []
    for s_row, t_row, id_row in zip(student, teacher, ids):
        gaps: dict[int, list[float]] = {}
        for s, t, k in zip(s_row, t_row, id_row):
            if k >= 0:
                gaps.setdefault(k, []).append(abs(s - t))
        d = {k: sum(v) / len(v) for k, v in gaps.items()}
        out.append([min((d[0] + eps) / (d[k] + eps), 1 + delta) if k >= 0 else 0.0 for k in id_row])
    return out


def test_sod_step_weights_invariants_and_loop():
    _, behavior, teacher = _logps(5, 3, 12)
    actions = torch.randint(0, 4, (3, 12), generator=_gen(6))
    mask = torch.ones(3, 12, dtype=F64)
    mask[2, 9:] = 0
    ids = step_ids(actions, mask, step_token_id=0)
    w_B_T, d_B_K, w_B_K = sod_step_weights(behavior, teacher, ids, delta=0.2, eps=1e-6)
    assert bool((w_B_K[:, 0] == 1.0).all())  # w_1 = 1 exactly
    assert bool((w_B_K <= 1.2).all()) and bool((w_B_T <= 1.2).all())
    want = _sod_weights_loop(behavior.tolist(), teacher.tolist(), ids.tolist(), 0.2, 1e-6)
    torch.testing.assert_close(w_B_T, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-14)
    assert d_B_K.shape[1] == int(ids.max()) + 1 and ids.max() >= 2  # several steps really were formed


def test_sod_advantage_and_loss_by_hand():
    # steps (delimiter 9 closes a step): [t0, t1] [t2, t3] [t4, t5]; t6 masked
    actions = torch.tensor([[1, 9, 2, 9, 3, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]], dtype=F64)
    behavior = torch.tensor([[-1.0, -2.0, -1.0, -1.0, -0.5, -0.5, -7.0]], dtype=F64)
    teacher = torch.tensor([[-1.5, -1.5, -2.0, -2.0, -0.6, -0.4, -9.0]], dtype=F64)
    # d_1 = 0.5, d_2 = 1.0, d_3 = 0.1  ->  w = 1, (0.5+eps)/(1+eps), min((0.5+eps)/(0.1+eps), 1.2) = 1.2
    eps = 1e-6
    w2 = (0.5 + eps) / (1.0 + eps)
    ids = step_ids(actions, mask, step_token_id=9)
    _, d, w = sod_step_weights(behavior, teacher, ids, delta=0.2, eps=eps)
    torch.testing.assert_close(d, torch.tensor([[0.5, 1.0, 0.1]], dtype=F64))
    torch.testing.assert_close(w, torch.tensor([[1.0, w2, 1.2]], dtype=F64))

    a_grpo, c = 0.7, 2.0
    adv = sod_advantages(behavior, teacher, ids, torch.tensor([a_grpo], dtype=F64), coef=c, delta=0.2, eps=eps)
    want = [
        a_grpo + c * 1.0 * -0.5,
        a_grpo + c * 1.0 * 0.5,
        a_grpo + c * w2 * -1.0,
        a_grpo + c * w2 * -1.0,
        a_grpo + c * 1.2 * -0.1,
        a_grpo + c * 1.2 * 0.1,
        0.0,
    ]
    torch.testing.assert_close(adv, torch.tensor([want], dtype=F64), rtol=1e-12, atol=1e-14)

    ratios = [1.5, 0.5, 1.1, 0.7, 1.0, 1.3, 1.0]
    logp = (behavior + torch.tensor([ratios], dtype=F64).log()).requires_grad_(True)
    loss, metrics = sod_loss(
        logp,
        behavior,
        teacher,
        mask,
        ids,
        torch.tensor([a_grpo], dtype=F64),
        coef=c,
        eps=eps,
        clip_eps=0.2,
        normalizer=10,
    )
    want_loss = -sum(_surrogate(ratios[t], want[t], 0.2) for t in range(6)) / 10
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    assert metrics["steps_per_seq"] == 3.0
    assert metrics["step_weight_mean"] == pytest.approx((2 * 1.0 + 2 * w2 + 2 * 1.2) / 6)


def test_sod_equals_grpo_surrogate_when_student_is_teacher():
    logp, behavior, _ = _logps(7, 2, 5)
    mask = torch.ones(2, 5, dtype=F64)
    ids = step_ids(torch.zeros(2, 5, dtype=torch.long), mask, step_len=2)
    adv_B = torch.tensor([0.9, -0.9], dtype=F64)
    loss, _ = sod_loss(logp, behavior, behavior, mask, ids, adv_B)
    grpo, _ = grpo_loss(logp, behavior, adv_B, mask, clip_eps=0.2, kl_beta=0.0)
    torch.testing.assert_close(loss, grpo, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- Uni-OPD


def _gap_loop(adv, mask, correct, groups):
    out = {}
    for gid in sorted(set(groups)):
        means = {True: [], False: []}
        for i, g in enumerate(groups):
            if g == gid:
                kept = [a for a, m in zip(adv[i], mask[i]) if m]
                means[correct[i]].append(sum(kept) / len(kept))
        if means[True] and means[False]:
            out[gid] = sum(means[True]) / len(means[True]) - sum(means[False]) / len(means[False])
    return out


def test_uniopd_margin_invariant_and_untouched_groups():
    g = _gen(8)
    B, T, delta = 9, 4, 0.4
    adv = torch.randn(B, T, generator=g, dtype=F64) * 0.3
    mask = (torch.rand(B, T, generator=g) > 0.3).to(F64)
    mask[:, 0] = 1
    groups = torch.tensor([3, 3, 3, 0, 0, 0, 7, 7, 1])
    correct = torch.tensor([True, False, False, True, False, True, True, True, False])  # group 7, 1: one kind only
    adv[3] += 2.0  # group 0: gap already far above delta
    adv = torch.where(mask.bool(), adv, torch.full_like(adv, 123.0))  # masked values must stay as they are

    gap_G, has_both_G, _ = group_gap(adv, mask, correct, groups)
    want = _gap_loop(adv.tolist(), mask.tolist(), correct.tolist(), groups.tolist())
    assert has_both_G.tolist() == [True, False, True, False]  # sorted ids 0, 1, 3, 7
    assert gap_G[0].item() == pytest.approx(want[0], rel=1e-12) and gap_G[2].item() == pytest.approx(want[3], rel=1e-12)
    assert want[0] >= delta and want[3] < delta  # the example covers both cases

    new, shift = margin_calibrate(adv, mask, correct, groups, delta)
    new_gap, _, _ = group_gap(new, mask, correct, groups)
    assert new_gap[2].item() == pytest.approx(delta, abs=1e-12)  # lifted exactly to the margin
    assert bool((new_gap[has_both_G] >= delta - 1e-12).all())
    rows_0_1_7 = (groups == 0) | (groups == 1) | (groups == 7)
    assert torch.equal(new[rows_0_1_7], adv[rows_0_1_7]) and bool((shift[rows_0_1_7] == 0).all())
    half = (delta - want[3]) / 2
    torch.testing.assert_close(shift[:3], torch.tensor([half, -half, -half], dtype=F64))
    assert torch.equal(new[~mask.bool()], adv[~mask.bool()])


def test_uniopd_loss_by_hand():
    # one group: rollout 0 correct, rollout 1 wrong; OPD advantages -(behavior - teacher)
    behavior = torch.tensor([[-1.0, -1.0], [-0.5, -2.0]], dtype=F64)
    teacher = torch.tensor([[-1.2, -0.8], [-1.5, -1.0]], dtype=F64)  # A: [-0.2, 0.2] mean 0; [-1, 1] mean 0
    mask = torch.ones(2, 2, dtype=F64)
    ratios = torch.tensor([[1.1, 0.9], [1.0, 1.2]], dtype=F64)
    logp = (behavior + ratios.log()).requires_grad_(True)
    loss, metrics = uniopd_loss(
        logp, behavior, teacher, mask, torch.tensor([True, False]), torch.tensor([0, 0]), delta=0.4, normalizer=4
    )
    # g = 0 < 0.4: +0.2 on rollout 0, -0.2 on rollout 1
    want = -(1.1 * 0.0 + 0.9 * 0.4 + 1.0 * -1.2 + 1.2 * 0.8) / 4
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert metrics["gap_before"] == pytest.approx(0.0, abs=1e-12) and metrics["calibrated_fraction"] == 1.0
    loss_wide, m_wide = uniopd_loss(
        logp, behavior, teacher, mask, torch.tensor([True, False]), torch.tensor([0, 0]), delta=0.0, normalizer=4
    )  # margin 0 already met: plain OPD
    plain, _ = opd_loss(logp, behavior, teacher, mask, normalizer=4)
    torch.testing.assert_close(loss_wide, plain, rtol=0, atol=0)
    assert m_wide["calibrated_fraction"] == 0.0


# --------------------------------------------------------------------------- registered objectives


def _batch(B=4, T=3, V=5, seed=9, rewards=(1.0, 0.0, 1.0, 0.0), groups=(0, 0, 1, 1)):
    g = _gen(seed)
    student_logits = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    teacher_logits = torch.randn(B, T, V, generator=g, dtype=F64)
    actions = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=F64)
    mask[1, 2] = 0
    behavior = torch.log_softmax(student_logits.detach() + 0.1, -1).gather(-1, actions[..., None]).squeeze(-1) * mask
    r = Rollout(
        context=None,
        steps=None,
        actions=actions,
        mask_B_T=mask,
        behavior_logp_B_T=behavior,
        rewards_B=torch.tensor(rewards, dtype=F64),
        group_ids_B=torch.tensor(groups),
    )
    b = ObjectiveBatch(r, Categorical(student_logits, mask), Categorical(teacher_logits, mask), None, float(mask.sum()))
    logp = torch.log_softmax(student_logits, -1).gather(-1, actions[..., None]).squeeze(-1) * mask
    teacher = torch.log_softmax(teacher_logits, -1).gather(-1, actions[..., None]).squeeze(-1) * mask
    return b, logp, behavior, teacher, mask, student_logits


def test_registered_names_and_attributes():
    for cls, name in ((SCOPE, "scope"), (KEPO, "kepo"), (SOD, "sod"), (UniOPD, "uniopd")):
        assert cls.registry_name == name
        obj = cls()
        whole = cls in (SCOPE, UniOPD)
        assert obj.needs == Needs(
            teacher=True, teacher_scores=True, rewards=True, sampled_actions=True, whole_groups=whole
        )
        assert obj.request(0, 1, None) == RolloutRequest(source="student")


def test_registered_objectives_equal_the_math():
    b, logp, behavior, teacher, mask, logits = _batch()
    r, N = b.rollout, b.normalizer
    correct = r.rewards_B >= 0.5
    cases = [
        (SCOPE(tau=0.8), scope_loss(logp, behavior, teacher, mask, correct, r.group_ids_B, tau=0.8, normalizer=N)),
        (KEPO(coef=0.5), kepo_loss(logp, behavior, teacher, mask, r.rewards_B, threshold=0.5, coef=0.5, normalizer=N)),
        (
            UniOPD(delta=0.3),
            uniopd_loss(logp, behavior, teacher, mask, correct, r.group_ids_B, delta=0.3, normalizer=N),
        ),
        (
            SOD(step_len=2),
            sod_loss(
                logp,
                behavior,
                teacher,
                mask,
                step_ids(r.actions, mask, step_len=2),
                group_advantages(r.rewards_B, r.group_ids_B),
                normalizer=N,
            ),
        ),
    ]
    for obj, (want, want_metrics) in cases:
        got, metrics = obj(b)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        (g_got,) = torch.autograd.grad(got, logits, retain_graph=True)
        (g_want,) = torch.autograd.grad(want, logits, retain_graph=True)
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-14)
        assert g_got.abs().max() > 1e-4, type(obj).__name__
        assert {k: v for k, v in metrics.items() if k != "reward"} == pytest.approx(want_metrics)
        assert metrics["reward"] == 0.5 and all(type(v) is float for v in metrics.values())


def test_group_objectives_refuse_split_groups():
    for obj in (SCOPE(), UniOPD()):
        b, *_ = _batch()
        prepared = obj.prepare(b.rollout)
        for sl, ok in ((slice(0, 2), True), (slice(1, 3), False)):  # one whole group; halves of two groups
            mb = prepared.select(sl)
            mb_batch = ObjectiveBatch(
                mb,
                Categorical(b.student.logits_B_T_V[sl], mb.mask_B_T),
                Categorical(b.teacher.logits_B_T_V[sl], mb.mask_B_T),
                None,
                b.normalizer,
            )
            if ok:
                loss, _ = obj(mb_batch)
                assert torch.isfinite(loss)
            else:
                with pytest.raises(ValueError, match="micro_batch_size to a multiple of rollout.group_size"):
                    obj(mb_batch)


def test_sod_prepare_uses_the_whole_step():
    b, logp, behavior, teacher, mask, _ = _batch(rewards=(1.0, 0.0, 0.0, 0.0), groups=(0, 0, 0, 0))
    obj = SOD(step_len=2)
    prepared = obj.prepare(b.rollout)
    torch.testing.assert_close(
        prepared.extras["advantage_B"], group_advantages(b.rollout.rewards_B, b.rollout.group_ids_B)
    )
    mb = prepared.select(slice(2, 4))  # rewards 0, 0: a per-micro-batch GRPO would give advantage 0
    assert bool((mb.extras["advantage_B"] < 0).all())


def test_registered_hyper_parameters_are_checked():
    with pytest.raises(ValueError, match=r"objective\.tau must be > 0"):
        SCOPE(tau=0.0)
    with pytest.raises(ValueError, match=r"objective\.clip_eps must lie in"):
        KEPO(clip_eps=1.5)
    with pytest.raises(ValueError, match=r"objective\.gamma must lie in"):
        UniOPD(gamma=2.0)
    with pytest.raises(ValueError, match=r"objective\.delta must be >= 0"):
        UniOPD(delta=-0.1)
    with pytest.raises(ValueError, match="set exactly one of step_token_id"):
        SOD(step_token_id=13)  # step_len keeps its default: ambiguous
    assert SOD(step_token_id=13, step_len=None).step_token_id == 13
    with pytest.raises(ValueError, match=r"objective\.step_len must be >= 1"):
        SOD(step_len=0)
    b, *_ = _batch()
    b.rollout.rewards_B = None
    with pytest.raises(ValueError, match="needs verifier rewards"):
        KEPO()(b)


# --------------------------------------------------------------------------- every registered objective: the contract

# objectives whose constructor has required arguments get minimal valid values here (none today)
MINIMAL_ARGS: dict[str, dict] = {}


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_registered_objective_follows_the_contract(name):
    """mmdistill.interfaces.Objective: declared `needs`, a scoring `temperature`, `request()` returning plain data,
    `prepare()` and `__call__`; built from its defaults as `objective: {type: NAME}` would build it."""
    obj = OBJECTIVES.get(name)(**MINIMAL_ARGS.get(name, {}))
    assert isinstance(obj, Objective), name
    assert isinstance(obj.needs, Needs) and isinstance(obj.temperature, (int, float)) and obj.temperature > 0
    assert callable(obj.prepare) and callable(obj)
    for step in (0, 3):
        req = obj.request(step, 10, random.Random(step))
        assert isinstance(req, RolloutRequest) and req.settings is None, name  # the loop adds the stage's settings
        assert req.source in ("student", "teacher", "dataset")
    if obj.needs.teacher_scores:
        assert obj.needs.teacher, f"{name}: teacher_scores without a teacher"
    assert not (obj.needs.teacher and obj.needs.self_teacher), name


def test_no_objective_inherits_from_another():
    """Shared math is plain functions: no registered class derives from another objective class."""
    classes = [OBJECTIVES.get(n) for n in OBJECTIVES.names()]
    for cls in classes:
        bases = [b for b in cls.__mro__[1:] if b is not object and not b.__dict__.get("_is_protocol", False)]
        assert not bases, f"{cls.__name__} inherits from {[b.__name__ for b in bases]}"


def test_gkd_draws_its_source_like_pick_source():
    """GKD's `request` makes exactly the draw `pick_source` made: one rng.random() against lmbda."""
    from mmdistill.objectives.gkd import GKD

    obj, rng, replay = GKD(lmbda=0.3), random.Random(7), random.Random(7)
    got = [obj.request(k, 50, rng).source for k in range(50)]
    want = ["student" if replay.random() < 0.3 else "dataset" for _ in range(50)]
    assert got == want and {"student", "dataset"} == set(got)
    assert rng.getstate() == replay.getstate()
