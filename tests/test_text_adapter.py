"""The text adapter: the Adapter protocol and its config sections, sampling log-probs, re-scoring,
padding, rollouts as a RolloutRequest asks, evaluation, save/load, tokenizer checks.

    python -m pytest tests/test_text_adapter.py -q
"""

from __future__ import annotations

import pytest
import torch

from mmdistill.config import ModelConfig
from mmdistill.errors import CheckpointError, CompatibilityError, ConfigError
from mmdistill.interfaces import Adapter, RolloutRequest
from mmdistill.modalities.text.adapter import CausalLMAdapter, check_tokenizers_match
from mmdistill.modalities.text.config import TextEvalConfig, TextRolloutConfig, TinyLMConfig
from mmdistill.modalities.text.evaluate import pass_at_k
from mmdistill.modalities.text.tasks.arith import ArithTask
from mmdistill.modalities.text.tokenizer import build_word_tokenizer

QUESTIONS = [
    "Ann has 3 apples . She gets 4 more . How many apples does Ann have ?",
    "Bob has 9 coins . He loses 2 . How many coins does Bob have ?",
    "1 + 1",
]


@pytest.fixture
def adapter(word_tokenizer):
    return CausalLMAdapter(word_tokenizer, device="cpu", chunk_size=7)


def tiny(adapter, hidden=32, layers=2, seed=0, arch="qwen3"):
    return adapter.load_model(
        ModelConfig(
            tiny=TinyLMConfig(arch=arch, hidden_size=hidden, num_layers=layers, num_heads=2, num_kv_heads=1, seed=seed)
        )
    ).eval()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_behavior_logp_equals_rescored_logp(adapter, arch):
    """KV-cache sampling with left padding must see the same states as a full re-scoring pass."""
    model = tiny(adapter, arch=arch)
    g = torch.Generator().manual_seed(0)
    r = adapter.sample(model, QUESTIONS, max_new_tokens=10, temperature=1.0, generator=g)
    assert r.actions.shape[0] == 3 and r.mask_B_T.sum() > 0
    with torch.no_grad():
        logp = adapter.step_dist(model, r).log_prob(r.actions)
    torch.testing.assert_close(logp, r.behavior_logp_B_T, atol=2e-5, rtol=0)


def test_greedy_matches_hf_generate(adapter):
    model = tiny(adapter, seed=3)
    r = adapter.sample(model, QUESTIONS[:2], max_new_tokens=8, temperature=0.0)
    ids, attn = adapter.encode_prompts(QUESTIONS[:2])
    ref = model.generate(
        input_ids=ids,
        attention_mask=attn,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=adapter.pad_id,
        eos_token_id=adapter.eos_id,
    )[:, ids.shape[1] :]
    for i in range(2):
        n = int(r.mask_B_T[i].sum())
        assert r.actions[i, :n].tolist() == ref[i, :n].tolist()


def test_mask_stops_after_eos(adapter):
    model = tiny(adapter)
    with torch.no_grad():  # make EOS very likely so some rows stop early
        model.get_output_embeddings().weight[adapter.eos_id] *= 0
        model.get_output_embeddings().weight[adapter.eos_id] += 0.5 * model.get_input_embeddings().weight.mean(0)
    r = adapter.sample(model, QUESTIONS, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(1))
    for row_t, row_m in zip(r.actions.tolist(), r.mask_B_T.tolist()):
        if adapter.eos_id in row_t:
            k = row_t.index(adapter.eos_id)
            assert row_m[: k + 1] == [1.0] * (k + 1) and sum(row_m[k + 1 :]) == 0


def test_padded_vocabularies_of_different_sizes(adapter, word_tokenizer):
    """Teacher head with 64 extra rows, student with 8: divergences use the tokenizer's length."""
    teacher, student = tiny(adapter, seed=1), tiny(adapter, hidden=16, layers=1, seed=2)
    teacher.resize_token_embeddings(len(word_tokenizer) + 64)
    assert teacher.get_output_embeddings().weight.shape[0] != student.get_output_embeddings().weight.shape[0]
    r = adapter.sample(student, QUESTIONS, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    s, t = adapter.step_dist(student, r), adapter.step_dist(teacher, r)
    d = s.divergence(t, beta=1.0)
    assert torch.isfinite(d).all() and (d[r.mask_B_T.bool()] > 0).all()
    V = len(word_tokenizer)
    ref = (
        torch.log_softmax(s.rows() @ s.head_weight_V_H[:V].T, -1).exp()
        * (
            torch.log_softmax(s.rows() @ s.head_weight_V_H[:V].T, -1)
            - torch.log_softmax(t.rows() @ t.head_weight_V_H[:V].T, -1)
        )
    ).sum(-1)
    torch.testing.assert_close(d[r.mask_B_T.bool()], ref, atol=1e-5, rtol=1e-5)


def test_chat_template_applied(word_tokenizer):
    tok = build_word_tokenizer(
        ArithTask().vocabulary(),
        chat_template="{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant: ",
    )
    ad = CausalLMAdapter(tok)
    assert ad.format_prompt("1 + 1") == "User: 1 + 1\nAssistant: "
    assert CausalLMAdapter(word_tokenizer).format_prompt("1 + 1") == "Q: 1 + 1\nA: "


def test_tokenizer_mismatch_refused(word_tokenizer):
    other = build_word_tokenizer(["zebra", "quokka"])
    with pytest.raises(CompatibilityError, match="tokenizers differ"):
        check_tokenizers_match(other, word_tokenizer)
    templated = build_word_tokenizer(
        ArithTask(difficulty=1, max_value=9).vocabulary(), chat_template="{{ messages[0]['content'] }}"
    )
    with pytest.raises(CompatibilityError, match="chat templates differ"):
        check_tokenizers_match(templated, word_tokenizer)
    check_tokenizers_match(word_tokenizer, word_tokenizer)


def test_saved_student_is_a_plain_hf_checkpoint(adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny(adapter, seed=5)
    adapter.save(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.get_vocab() == adapter.tokenizer.get_vocab()
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_lora_student_saves_merged(adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    from mmdistill.config import LoraConfig

    cfg = ModelConfig(
        tiny=TinyLMConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1), lora=LoraConfig(r=4, alpha=8)
    )
    model = adapter.load_model(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    r = adapter.sample(model, QUESTIONS[:1], max_new_tokens=4, temperature=0.0)
    adapter.save(model, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    r2 = adapter.sample(merged, QUESTIONS[:1], max_new_tokens=4, temperature=0.0)
    assert (tmp_path / "lora_adapter").exists()
    assert r.actions.tolist() == r2.actions.tolist()


def test_prune_layers_keeps_cache_consistent(adapter):
    """A layer-dropped copy samples with a KV cache exactly as it re-scores, and keeping all layers changes nothing."""
    model = tiny(adapter, layers=4, seed=7)
    small = adapter.prune_layers(model, [0, 3]).eval()
    assert small.config.num_hidden_layers == 2 and len(small.get_decoder().layers) == 2
    assert len(model.get_decoder().layers) == 4  # the source is untouched
    r = adapter.sample(small, QUESTIONS, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.step_dist(small, r).log_prob(r.actions), r.behavior_logp_B_T, atol=2e-5, rtol=0
        )
        same = adapter.prune_layers(model, [0, 1, 2, 3]).eval()
        torch.testing.assert_close(
            adapter.step_dist(same, r).log_prob(r.actions), adapter.step_dist(model, r).log_prob(r.actions)
        )


def test_prune_layers_out_of_range(adapter):
    from mmdistill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"keep_layers: \[5\] out of range for a model with 2 layers"):
        adapter.prune_layers(tiny(adapter), [0, 5], name="student")


def test_adapter_follows_the_protocol_and_declares_its_spec(adapter):
    assert isinstance(adapter, Adapter)
    spec = CausalLMAdapter.spec
    assert (spec.rollout_config, spec.eval_config, spec.tiny_config) == (
        TextRolloutConfig,
        TextEvalConfig,
        TinyLMConfig,
    )
    assert (
        set(spec.model_kinds) == {"cross_tokenizer", "stored_logits"}
        and spec.supports_routing
        and spec.default_task == "arith"
    )
    assert adapter.dist_metrics(None, None) == {} and adapter.bind(ArithTask()) is None


@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        (TextRolloutConfig, {"max_new_tokens": 0}, "max_new_tokens: 0 is below the smallest allowed value 1"),
        (TextRolloutConfig, {"group_size": 0}, "group_size: 0 is below the smallest allowed value 1"),
        (TextRolloutConfig, {"temperature": -1.0}, "temperature: -1.0 is below the smallest allowed value 0.0"),
        (TextEvalConfig, {"n": 0}, "n: 0 is below the smallest allowed value 1"),
        (TextEvalConfig, {"batch_size": 0}, "batch_size: 0 is below the smallest allowed value 1"),
        (TextEvalConfig, {"max_new_tokens": 0}, "max_new_tokens: 0 is below the smallest allowed value 1"),
        (TextEvalConfig, {"k": 0}, "k: 0 is below the smallest allowed value 1"),
        (TextEvalConfig, {"k": 4}, "k: 4 samples per problem need temperature > 0"),
    ],
)
def test_config_sections_check_their_ranges(cls, kwargs, message):
    with pytest.raises(ValueError) as e:
        cls(**kwargs)
    assert str(e.value).startswith(message)
    assert TextEvalConfig(k=4, temperature=1.0).k == 4


def test_stage_sections_become_the_text_configs(tiny_raw):
    from mmdistill.config import config_from_raw

    cfg = config_from_raw(tiny_raw)
    st = cfg.stages[1]
    assert isinstance(st.rollout, TextRolloutConfig) and st.rollout.max_new_tokens == 12 and st.rollout.engine == "hf"
    assert isinstance(st.eval, TextEvalConfig) and (st.eval.n, st.eval.split) == (8, "test")
    raw = {**tiny_raw, "rollout": {"max_new_tokens": 0}}
    with pytest.raises(
        ConfigError, match=r"stages\.teacher_sft\.rollout\.max_new_tokens: 0 is below the smallest allowed value 1"
    ):
        config_from_raw(raw)


def test_claims_only_causal_lm_checkpoints(adapter, tmp_path):
    model = tiny(adapter)
    adapter.save(model, tmp_path / "lm")
    assert CausalLMAdapter.claims_checkpoint(tmp_path / "lm")
    (tmp_path / "robot").mkdir()
    (tmp_path / "robot" / "config.json").write_text('{"kind": "tokenized_lm", "action_dim": 2}')
    (tmp_path / "flow").mkdir()
    (tmp_path / "flow" / "model_index.json").write_text("{}")
    (tmp_path / "flow" / "config.json").write_text('{"model_type": "llama"}')
    assert not any(CausalLMAdapter.claims_checkpoint(tmp_path / d) for d in ("robot", "flow", "nowhere"))
    tok = CausalLMAdapter.load_tokenizer(tmp_path / "lm")
    assert tok.get_vocab() == adapter.tokenizer.get_vocab()
    adapter.tokenizer.save_pretrained(tmp_path / "run" / "tokenizer")
    assert CausalLMAdapter.load_tokenizer(tmp_path / "run").get_vocab() == adapter.tokenizer.get_vocab()
    with pytest.raises(CheckpointError, match="holds no tokenizer"):
        CausalLMAdapter.load_tokenizer(tmp_path / "robot")


def test_rollout_reads_the_request_and_its_settings(adapter):
    task = ArithTask(difficulty=1, max_value=9)
    problems = task.problems("train", 3)
    model = tiny(adapter)
    rc = TextRolloutConfig(max_new_tokens=5, temperature=1.0)
    r = adapter.rollout(
        RolloutRequest(source="student", settings=rc), model, None, task, problems, torch.Generator().manual_seed(0)
    )
    ref = adapter.sample(model, [p.question for p in problems], 5, 1.0, torch.Generator().manual_seed(0))
    assert r.actions.tolist() == ref.actions.tolist() and r.actions.shape[1] <= 5 and r.rewards_B.shape == (3,)
    d = adapter.rollout(RolloutRequest(source="dataset", settings=rc), model, None, task, problems, torch.Generator())
    assert (
        d.actions.tolist()
        == adapter.dataset_rollout([p.question for p in problems], [p.solution for p in problems]).actions.tolist()
    )
    assert d.context.keys == [None] * 3 and d.rewards_B is None
    p = adapter.rollout(
        RolloutRequest(source="student", privileged_template="{solution} | {question}", settings=rc),
        model,
        None,
        task,
        problems,
        torch.Generator().manual_seed(0),
    )
    assert p.teacher_view().steps["prompt_ids"].shape[1] > r.steps["prompt_ids"].shape[1]
    with pytest.raises(ConfigError, match="flow models"):
        adapter.rollout(
            RolloutRequest(kind="forward_process", settings=rc), model, None, task, problems, torch.Generator()
        )


def test_evaluate_accuracy_and_pass_at_k(adapter):
    task = ArithTask(difficulty=1, max_value=9)
    model = tiny(adapter)
    ev = adapter.evaluate(model, task, TextEvalConfig(n=4, batch_size=2, max_new_tokens=4), show=2)
    assert ev["n"] == 4 and 0.0 <= ev["accuracy"] <= 1.0 and len(ev["samples"]) == 2
    ev = adapter.evaluate(model, task, TextEvalConfig(n=2, batch_size=2, max_new_tokens=4, k=3, temperature=1.0))
    assert {"pass@3", "pass@1"} <= set(ev)
    assert pass_at_k(5, 0, 2) == 0.0 and pass_at_k(5, 4, 2) == 1.0 and abs(pass_at_k(4, 1, 1) - 0.25) < 1e-12


def test_stage_fingerprint_is_the_weights(adapter):
    a, b = tiny(adapter, seed=1), tiny(adapter, seed=1)
    assert adapter.stage_fingerprint(a) == adapter.stage_fingerprint(b)
    with torch.no_grad():
        b.get_output_embeddings().weight[0, 0] += 1.0
    assert adapter.stage_fingerprint(a) != adapter.stage_fingerprint(b)
