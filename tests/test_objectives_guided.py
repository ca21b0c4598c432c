"""Teacher-shaped rollouts: the engine's mixture sampling, rollout concatenation, multi-teacher
routing, and the invariants of OPSD, BRTS, AMPO and DAgger (objectives.md section 8)."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mmdistill.config import ModelConfig, config_from_raw
from mmdistill.interfaces import Needs, ObjectiveBatch, RolloutRequest, TeacherGuidance, select_guidance
from mmdistill.modalities.text.adapter import CausalLMAdapter, cat_rollouts
from mmdistill.modalities.text.config import TextRolloutConfig, TinyLMConfig
from mmdistill.modalities.text.tasks.arith import ArithTask
from mmdistill.objectives.ampo import AMPO, ampo_loss
from mmdistill.objectives.brts import BRTS, brts_loss
from mmdistill.objectives.dagger import DAgger, mixture_beta
from mmdistill.objectives.grpo import group_advantages, grpo_loss
from mmdistill.objectives.opsd import OPSD
from mmdistill.pipeline import run_pipeline
from mmdistill.stepdist import RoutedCategorical

QUESTIONS = [
    "Ann has 3 apples . She gets 4 more . How many apples does Ann have ?",
    "Ben has 9 coins . He loses 2 . How many coins does Ben have ?",
    "Cara has 5 books . How many books does Cara have ?",
]


@pytest.fixture
def adapter(word_tokenizer):
    return CausalLMAdapter(word_tokenizer, device="cpu", chunk_size=5)


def tiny(adapter, hidden=32, seed=0):
    return adapter.load_model(
        ModelConfig(tiny=TinyLMConfig(hidden_size=hidden, num_layers=1, num_heads=2, num_kv_heads=1, seed=seed))
    ).eval()


def request_of(obj, settings, step=0, total_steps=1):
    """What the loop hands the adapter: the objective's request with the stage's rollout settings."""
    return replace(obj.request(step, total_steps, random.Random(0)), settings=settings)


# ---------------------------------------------------------------------- engine: mixture sampling


def test_mixture_extremes_are_the_pure_policies(adapter):
    student, teacher = tiny(adapter, seed=0), tiny(adapter, 48, seed=1)
    greedy_t = adapter.sample(teacher, QUESTIONS, 8, temperature=0.0)
    greedy_s = adapter.sample(student, QUESTIONS, 8, temperature=0.0)
    all_t = adapter.sample(
        student, QUESTIONS, 8, temperature=0.0, mixture=(teacher, 1.0), generator=torch.Generator().manual_seed(0)
    )
    none_t = adapter.sample(
        student, QUESTIONS, 8, temperature=0.0, mixture=(teacher, 0.0), generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(all_t.actions, greedy_t.actions) and torch.equal(none_t.actions, greedy_s.actions)
    assert bool(all_t.extras["from_teacher_B_T"][all_t.mask_B_T.bool()].all())
    assert not bool(none_t.extras["from_teacher_B_T"].any())


def test_mixture_logp_is_the_acting_policys(adapter):
    """Each token's behaviour log-prob is that of the model that drew it, at the mixed prefix."""
    student, teacher = tiny(adapter, seed=0), tiny(adapter, 48, seed=1)
    r = adapter.sample(
        student, QUESTIONS, 10, temperature=1.0, mixture=(teacher, 0.5), generator=torch.Generator().manual_seed(3)
    )
    drew_B_T = r.extras["from_teacher_B_T"] & r.mask_B_T.bool()
    assert 0 < int(drew_B_T.sum()) < int(r.mask_B_T.sum())  # both policies acted
    with torch.no_grad():
        lp_s = adapter.step_dist(student, r).log_prob(r.actions)
        lp_t = adapter.step_dist(teacher, r).log_prob(r.actions)
    expected = torch.where(drew_B_T, lp_t, lp_s) * r.mask_B_T
    torch.testing.assert_close(r.behavior_logp_B_T, expected, atol=3e-5, rtol=0)


# ---------------------------------------------------------------------- concatenation and routing


def test_cat_rollouts_keeps_every_rows_scores(adapter):
    model = tiny(adapter)
    a = adapter.sample(model, QUESTIONS[:2], 6, generator=torch.Generator().manual_seed(0))
    b = adapter.sample(model, QUESTIONS[2:] * 2, 11, generator=torch.Generator().manual_seed(1))
    a.rewards_B, b.rewards_B = torch.zeros(2), torch.ones(2)
    c = cat_rollouts(a, b, adapter.pad_id)
    assert c.batch_size == 4 and c.actions.shape[1] == max(a.actions.shape[1], b.actions.shape[1])
    assert adapter.decode(c) == adapter.decode(a) + adapter.decode(b)
    with torch.no_grad():
        lp_c = adapter.step_dist(model, c).log_prob(c.actions)
        lp_a = adapter.step_dist(model, a).log_prob(a.actions)
        lp_b = adapter.step_dist(model, b).log_prob(b.actions)
    torch.testing.assert_close(lp_c[:2, : lp_a.shape[1]], lp_a, atol=2e-5, rtol=0)
    torch.testing.assert_close(lp_c[2:, : lp_b.shape[1]], lp_b, atol=2e-5, rtol=0)
    assert c.rewards_B.tolist() == [0, 0, 1, 1]


def test_routed_teachers_equal_each_teacher_on_its_rows(adapter):
    student, t_add, t_sub = tiny(adapter, seed=0), tiny(adapter, 48, seed=1), tiny(adapter, 24, seed=2)
    r = adapter.sample(student, QUESTIONS * 2, 8, generator=torch.Generator().manual_seed(0))
    r.context.tags = ["add", "sub", "add", "sub", "sub", "add"]
    routed = adapter.step_dist({"add": t_add, "sub": t_sub}, r)
    assert isinstance(routed, RoutedCategorical)
    s = adapter.step_dist(student, r)
    d_B_T = s.divergence(routed, beta=1.0)
    lp_B_T = routed.log_prob(r.actions)
    for tag, teacher in (("add", t_add), ("sub", t_sub)):
        rows = torch.tensor([i for i, t in enumerate(r.context.tags) if t == tag])
        alone = adapter.step_dist(teacher, r)
        torch.testing.assert_close(d_B_T[rows], s.divergence(alone, beta=1.0)[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lp_B_T[rows], alone.log_prob(r.actions)[rows], atol=1e-5, rtol=0)
    sub = routed.select(slice(1, 4))  # micro-batches of a routed teacher
    torch.testing.assert_close(
        s.select(slice(1, 4)).divergence(sub, beta=0.5), s.divergence(routed, beta=0.5)[1:4], atol=1e-5, rtol=1e-5
    )


def test_routing_without_tags_or_teacher_is_a_clear_error(adapter):
    from mmdistill.errors import ConfigError

    student = tiny(adapter)
    r = adapter.sample(student, QUESTIONS, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="tag"):
        adapter.step_dist({"add": student}, r)
    r.context.tags = ["add", "mul", "add"]
    with pytest.raises(ConfigError, match="mul"):
        adapter.step_dist({"add": student}, r)


# ---------------------------------------------------------------------- OPSD


def test_opsd_teacher_is_the_student_with_the_solution(adapter):
    task = ArithTask(difficulty=1, max_value=9)
    problems = task.problems("train", 3)
    student = tiny(adapter)
    obj = OPSD()
    assert obj.needs == Needs(self_teacher=True) and not obj.needs.teacher and not obj.needs.teacher_scores
    req = obj.request(0, 1, random.Random(0))
    assert req == RolloutRequest(source="student", privileged_template="{solution}\n{question}")
    rc = TextRolloutConfig(max_new_tokens=8)
    r = adapter.rollout(request_of(obj, rc), student, None, task, problems, torch.Generator().manual_seed(0))
    assert problems[0].solution in adapter.tokenizer.decode(r.teacher_view().steps["prompt_ids"][0])
    s = adapter.step_dist(student, r)
    with torch.no_grad():
        same = adapter.step_dist(student, r)  # no privileged context: teacher == student -> zero loss
        shown = adapter.step_dist(student, r.teacher_view())
    loss0, _ = obj(ObjectiveBatch(r, s, same, normalizer=float(r.num_steps())))
    loss1, m1 = obj(ObjectiveBatch(r, s, shown, normalizer=float(r.num_steps())))
    assert abs(float(loss0.detach())) < 1e-7 < float(loss1.detach()) and m1["divergence"] > 0
    loss1.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


# ---------------------------------------------------------------------- BRTS


def test_select_guidance_prefers_correct_then_aligned():
    correct = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 1]])
    align = torch.tensor([[5.0, -2.0, -1.0], [-3.0, -1.0, -2.0], [-4.0, 9.0, -3.0]])
    assert select_guidance(correct, align, keep=1) == [[2], [1], [2]]
    assert select_guidance(correct, align, keep=2) == [[2, 1], [1, 2], [2, 0]]
    assert select_guidance(correct, align, keep=2, only_correct=True) == [[2, 1], [], [2, 0]]


def test_brts_loss_by_hand():
    d = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    teacher = torch.tensor([False, False, True])
    loss, m = brts_loss(d, mask, teacher, kappa=0.5, n_student=3.0, n_teacher=3.0)
    assert float(loss) == pytest.approx((1 + 2 + 3) / 3 + 0.5 * 12 / 3)
    assert m["divergence_student_ctx"] == pytest.approx(2.0) and m["divergence_teacher_ctx"] == pytest.approx(4.0)
    loss0, _ = brts_loss(d, mask, teacher, kappa=0.0, n_student=3.0, n_teacher=3.0)
    assert float(loss0) == pytest.approx(2.0)  # kappa 0: plain student-context OPD


def test_brts_rollout_appends_one_teacher_rollout_per_prompt(adapter):
    task = ArithTask(difficulty=1, max_value=9)
    problems = [p for p in task.problems("train", 2) for _ in range(3)]
    student, teacher = tiny(adapter), tiny(adapter, 48, seed=1)
    obj = BRTS(n=3, topk=4)
    assert obj.needs == Needs(teacher=True, teacher_scores=True)
    assert obj.request(0, 1, random.Random(0)).guidance == TeacherGuidance(n=3, keep=1, when="always", threshold=0.5)
    rc = TextRolloutConfig(max_new_tokens=6, group_size=3)
    r = adapter.rollout(request_of(obj, rc), student, teacher, task, problems, torch.Generator().manual_seed(0))
    assert r.batch_size == 8 and r.extras["from_teacher_B"].tolist() == [False] * 6 + [True] * 2
    assert r.group_ids_B.tolist() == [0, 0, 0, 1, 1, 1, 0, 1]
    assert r.context.questions[6] == problems[0].question and r.context.questions[7] == problems[3].question
    r = obj.prepare(r)
    assert r.extras["branch_tokens"] == (float(r.mask_B_T[:6].sum()), float(r.mask_B_T[6:].sum()))
    s = adapter.step_dist(student, r)
    with torch.no_grad():
        t = adapter.step_dist(teacher, r)
    loss, m = obj(ObjectiveBatch(r, s, t, normalizer=float(r.num_steps())))
    assert torch.isfinite(loss) and m["divergence_teacher_ctx"] > 0


# ---------------------------------------------------------------------- AMPO


def test_ampo_without_teacher_rows_is_grpo():
    torch.manual_seed(0)
    logp = torch.randn(4, 5, requires_grad=True)
    behavior = logp.detach() + 0.1 * torch.randn(4, 5)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mask = torch.ones(4, 5)
    a, _ = ampo_loss(logp, behavior, adv, mask, torch.zeros(4, dtype=torch.bool), normalizer=20.0)
    g, _ = grpo_loss(logp, behavior, adv, mask, clip_eps=0.2, kl_beta=0.0, normalizer=20.0)
    torch.testing.assert_close(a, g)


def test_ampo_teacher_rows_are_unclipped_policy_gradient():
    logp = torch.tensor([[-0.1, -0.2], [-3.0, -4.0]], requires_grad=True)
    behavior = torch.tensor([[-0.1, -0.2], [-0.01, -0.01]])  # teacher row: its own (huge) behaviour ratio is ignored
    rewards, groups = torch.tensor([0.0, 1.0]), torch.tensor([0, 0])
    adv = group_advantages(rewards, groups)
    assert adv[1] > 0 > adv[0]  # the correct teacher rollout lifts the failed group's baseline
    loss, _ = ampo_loss(logp, behavior, adv, torch.ones(2, 2), torch.tensor([False, True]), normalizer=4.0)
    loss.backward()
    torch.testing.assert_close(logp.grad[1], -adv[1].expand(2) / 4.0)


def test_ampo_guides_only_failed_groups(adapter):
    task = ArithTask(difficulty=1, max_value=9)
    problems = [p for p in task.problems("train", 2) for _ in range(2)]
    student = tiny(adapter)
    obj = AMPO(n=2, keep=1)
    assert obj.needs == Needs(teacher=True, teacher_scores=False, rewards=True, sampled_actions=True)
    assert obj.guidance == TeacherGuidance(n=2, keep=1, when="all_failed", threshold=0.5, only_correct=True)
    obj.guidance = replace(
        obj.guidance, only_correct=False
    )  # a random teacher is never right: keep its rollouts to see them
    rc = TextRolloutConfig(max_new_tokens=6, group_size=2)
    r = adapter.rollout(
        request_of(obj, rc), student, tiny(adapter, 48, seed=1), task, problems, torch.Generator().manual_seed(0)
    )
    assert r.batch_size == 6 and r.extras["from_teacher_B"].sum() == 2  # both groups failed: one teacher rollout each
    r.rewards_B[0] = 1.0  # ... but a group with a success would get none
    assert r.rewards_B.view(-1)[:2].max() >= 0.5


# ---------------------------------------------------------------------- DAgger


def test_dagger_schedule():
    assert mixture_beta(0, 100, 0.8, "linear") == pytest.approx(0.8)
    assert mixture_beta(50, 100, 0.8, "linear") == pytest.approx(0.4)
    assert mixture_beta(100, 100, 0.8, "linear") == 0.0
    assert mixture_beta(50, 100, 0.8, "linear", anneal_fraction=0.5) == 0.0
    assert mixture_beta(10, 100, 0.8, "exponential") == pytest.approx(0.4)
    assert mixture_beta(7, 100, 0.3, "constant") == 0.3
    with pytest.raises(ValueError, match="schedule"):
        DAgger(schedule="cosine")


def test_dagger_requests_the_annealed_mixture():
    """The loop used to call set_step(step, total) before each rollout; request(step, total, rng) now does it."""
    obj = DAgger(beta0=0.8)
    assert obj.mixture_beta == 0.8 and obj.needs == Needs(teacher=True, teacher_scores=True)
    rng = random.Random(0)
    state = rng.getstate()
    req = obj.request(50, 100, rng)
    assert req == RolloutRequest(source="student", mixture_beta=obj.mixture_beta) and obj.mixture_beta == pytest.approx(
        0.4
    )
    assert rng.getstate() == state  # no draw from the step's data rng
    assert obj.request(100, 100, rng).mixture_beta == 0.0


def test_dagger_labels_match_brute_force(adapter):
    student, teacher = tiny(adapter), tiny(adapter, 48, seed=1)
    r = adapter.sample(student, QUESTIONS, 6, mixture=(teacher, 0.5), generator=torch.Generator().manual_seed(0))
    s = adapter.step_dist(student, r)
    with torch.no_grad():
        t = adapter.step_dist(teacher, r)
    n = float(r.num_steps())
    m = r.mask_B_T.bool()
    logits_s = torch.nn.functional.linear(s.rows(), s.head_weight_V_H)[:, : adapter.vocab_size].double().log_softmax(-1)
    logits_t = torch.nn.functional.linear(t.rows(), t.head_weight_V_H)[:, : adapter.vocab_size].double().log_softmax(-1)
    soft_obj = DAgger(label="soft")
    soft_obj.request(1, 4, random.Random(0))
    soft, soft_m = soft_obj(ObjectiveBatch(r, s, t, normalizer=n))
    hard, _ = DAgger(label="hard")(ObjectiveBatch(r, s, t, normalizer=n))
    assert list(soft_m) == ["teacher_label_loss", "mixture_beta", "teacher_token_fraction"]
    assert soft_m["mixture_beta"] == pytest.approx(0.5 * 0.75)
    fkl = (logits_t.exp() * (logits_t - logits_s)).sum(-1).sum() / n
    ce = -logits_s.gather(-1, logits_t.argmax(-1, keepdim=True)).sum() / n
    assert float(soft.detach()) == pytest.approx(float(fkl.detach()), rel=1e-4) and float(
        hard.detach()
    ) == pytest.approx(float(ce.detach()), rel=1e-4)
    assert m.sum() == r.num_steps()


# ---------------------------------------------------------------------- through the training loop


@pytest.mark.parametrize(
    "objective, extra",
    [
        ({"type": "opsd"}, {}),
        ({"type": "brts", "n": 2, "topk": 8}, {"rollout": {"group_size": 2}}),
        ({"type": "ampo", "n": 2}, {"rollout": {"group_size": 4}}),
        ({"type": "dagger", "beta0": 0.5}, {}),
    ],
)
def test_guided_objectives_train_end_to_end(tiny_raw, objective, extra):
    raw = copy.deepcopy(tiny_raw)
    raw["stages"] = raw["stages"][:2]
    st = raw["stages"][1]
    st["objective"] = objective
    st["train"].update(steps=2, micro_batch_size=4)
    st.update(copy.deepcopy(extra))
    if objective["type"] == "opsd":
        st.pop("teacher")
    run_pipeline(config_from_raw(raw), quiet=True)
    rows = [
        json.loads(line) for line in (Path(raw["run_dir"]) / "student_opd" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if objective["type"] == "ampo":  # a 4-step teacher is never right: no guidance, all-zero rewards, no gradient
        assert all(r["teacher_rows"] == 0 for r in rows)
    else:
        assert all(r["grad_norm"] > 0 for r in rows)


def test_mixture_task_routes_teachers_in_training(tiny_raw):
    raw = copy.deepcopy(tiny_raw)
    raw["task"] = {
        "type": "mixture",
        "tasks": {
            "add": {"type": "arith", "ops": "+", "max_value": 9},
            "sub": {"type": "arith", "ops": "-", "max_value": 9},
        },
    }
    raw["models"]["teacher_sub"] = {
        "tiny": {"hidden_size": 24, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "seed": 5}
    }
    raw["stages"] = raw["stages"][:2]
    st = raw["stages"][1]
    st.pop("teacher")
    st["teachers"] = {"add": "teacher_sft", "sub": "teacher_sub"}
    st["train"].update(steps=2, micro_batch_size=4)
    run_pipeline(config_from_raw(raw), quiet=True)
    rows = [
        json.loads(line) for line in (Path(raw["run_dir"]) / "student_opd" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2 and all(r["divergence"] > 0 for r in rows)
    rng = random.Random(0)
    from mmdistill.train import build_task

    tags = {build_task(raw["task"]).sample_train(rng).meta["tag"] for _ in range(20)}
    assert tags == {"add", "sub"}


def test_teacher_scored_in_one_batch_equals_per_micro_batch(tiny_raw, tmp_path):
    from safetensors.torch import load_file

    finals = []
    for tbs in (None, 8):
        raw = copy.deepcopy(tiny_raw)
        raw["run_dir"] = str(tmp_path / f"tbs_{tbs}")
        raw["stages"] = raw["stages"][:2]
        raw["stages"][1]["train"].update(steps=2, micro_batch_size=2, teacher_batch_size=tbs)
        run_pipeline(config_from_raw(raw), quiet=True)
        finals.append(load_file(str(Path(raw["run_dir"]) / "student_opd" / "final" / "model.safetensors")))
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], atol=2e-6, rtol=1e-5)
