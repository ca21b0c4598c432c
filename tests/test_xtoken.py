"""X-Token cross-tokenizer distillation: W from string rules, projection, character alignment,
a `kind: cross_tokenizer` char-tokenizer teacher scoring a word-tokenizer student end to end with
the ordinary reverse_kl / jsd objectives, and the demo config.

    python -m pytest tests/test_xtoken.py -q
"""

from __future__ import annotations

import pytest
import torch

from mmdistill.config import ModelConfig, load_config
from mmdistill.errors import CompatibilityError, ConfigError
from mmdistill.interfaces import ObjectiveBatch
from mmdistill.modalities.text.adapter import CausalLMAdapter, build_tiny_lm
from mmdistill.modalities.text.config import TinyLMConfig
from mmdistill.modalities.text.tasks.arith import ArithTask
from mmdistill.modalities.text.tokenizer import build_char_tokenizer, build_word_tokenizer
from mmdistill.modalities.text.xtoken import CrossTokenizerTeacher, char_alignment, special_token_map, token_strings
from mmdistill.modalities.text.xtoken_projection import move_span_mass, project_logp, projection_from_strings
from mmdistill.registry import OBJECTIVES
from mmdistill.stepdist import TopKCategorical

TASK = ArithTask(difficulty=2, max_value=9)
TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def word_tok():
    return build_word_tokenizer(TASK.vocabulary())


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer()


def projection(teacher, student):
    fallback = student.unk_token_id
    return projection_from_strings(
        token_strings(teacher), token_strings(student), special_token_map(teacher, student), fallback
    ).to_dense()


def test_char_tokenizer_is_one_token_per_character(char_tok, tmp_path):
    from transformers import AutoTokenizer

    text = "Q: Ann has 12 apples .\nA: 3 + 4 = 7 . #### 7"
    assert char_tok.tokenize(text) == list(text)
    assert char_tok.decode(char_tok(text)["input_ids"]) == text
    char_tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.get_vocab() == char_tok.get_vocab() and back.eos_token == "<eos>" and back.pad_token == "<pad>"


def test_char_teacher_tokens_map_to_identical_word_tokens(char_tok, word_tok):
    W = projection(char_tok, word_tok)
    assert W.shape == (len(char_tok), len(word_tok))
    torch.testing.assert_close(W.sum(1), torch.ones(len(char_tok)))
    student = word_tok.get_vocab()
    for ch, u in char_tok.get_vocab().items():
        if ch in student:  # every character the student has as a token (all printable ASCII here)
            assert W[u, student[ch]] == 1.0, ch
    for role in ("eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id"):
        assert W[getattr(char_tok, role), getattr(word_tok, role)] == 1.0
    assert W[:, student["####"]].sum() == 0 and W[:, student["apples"]].sum() == 0  # longer than any teacher token


def test_word_teacher_tokens_map_to_their_longest_char_prefix(char_tok, word_tok):
    W = projection(word_tok, char_tok)  # the other direction: words onto characters
    torch.testing.assert_close(W.sum(1), torch.ones(len(word_tok)))
    t, s = word_tok.get_vocab(), char_tok.get_vocab()
    assert W[t["apples"], s["a"]] == 1.0 and W[t["####"], s["#"]] == 1.0 and W[t["7"], s["7"]] == 1.0


def test_string_rules_split_ties_and_fall_back():
    teacher = ["", "ab", "abc", "x", "q"]
    student = ["", "a", "ab", "ab", "x", "<u>"]
    W = projection_from_strings(teacher, student, special_map={0: 0}, fallback_id=5).to_dense()
    assert W[0].tolist() == [1, 0, 0, 0, 0, 0]
    assert W[1].tolist() == [0, 0, 0.5, 0.5, 0, 0]  # exact match, shared by the two "ab"
    assert W[2].tolist() == [0, 0, 0.5, 0.5, 0, 0]  # longest prefix "ab"
    assert W[3].tolist() == [0, 0, 0, 0, 1, 0]
    assert W[4].tolist() == [0, 0, 0, 0, 0, 1]  # no rule: the fallback


def test_identical_tokenizers_give_the_identity(word_tok):
    W = projection(word_tok, word_tok)
    torch.testing.assert_close(W, torch.eye(len(word_tok)))


def test_project_logp_sums_mass_and_smooths():
    W = torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5], [1.0, 0, 0], [0, 0, 1.0]]).to_sparse()
    p_N_Vt = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    out = project_logp(p_N_Vt.log(), W).exp()
    torch.testing.assert_close(out, torch.tensor([[0.4, 0.1, 0.5]]))
    smooth = project_logp(p_N_Vt.log(), W, smoothing=0.3).exp()
    torch.testing.assert_close(smooth, 0.7 * out + 0.1)
    with pytest.raises(ValueError, match="truncate the teacher"):
        project_logp(torch.zeros(1, 5), W)


def test_move_span_mass_keeps_the_total_and_the_sign():
    W = torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5]]).to_sparse()  # teacher "#" -> student 0; teacher 1 -> students 1, 2
    p_N_Vs = torch.tensor([[0.6, 0.2, 0.2], [0.6, 0.2, 0.2]])
    out = move_span_mass(p_N_Vs, W, torch.tensor([0.5, 0.0]), torch.tensor([0, 1]), torch.tensor([2, 0]))
    torch.testing.assert_close(out[0], torch.tensor([0.1, 0.2, 0.7]))  # 0.5 of "#"'s mass moved to the span's token
    torch.testing.assert_close(out[1], p_N_Vs[1])  # no span: unchanged
    torch.testing.assert_close(out.sum(-1), torch.ones(2))


def test_char_alignment_hand_built():
    # teacher tokens "Q:" " A" ":" " 12" "+" over "Q: A: 12+" (left-padded by one), student starts:
    # 5 (the space before "12": inside no token, ends after ":" -> exact), 6 ("1": inside " 12" ->
    # nearest boundary before, the ":"), 8 ("+": exact after " 12"), 9 (end: exact after "+")
    ends_B_L = torch.tensor([[-1, 2, 4, 5, 8, 9]])
    pos, exact = char_alignment(torch.tensor([[5, 6, 8, 9]]), ends_B_L)
    assert pos.tolist() == [[3, 3, 4, 5]]
    assert exact.tolist() == [[True, False, True, True]]
    pos, exact = char_alignment(torch.tensor([[0]]), ends_B_L)  # before every teacher token: the first one
    assert pos.tolist() == [[1]] and exact.tolist() == [[False]]


def test_char_alignment_of_a_word_teacher_over_a_char_student(char_tok, word_tok, tmp_path):
    """A char-level student writing "apples ." under a word-level teacher: only word boundaries are exact."""
    model = build_tiny_lm(TinyLMConfig(**TINY), word_tok)
    model.save_pretrained(tmp_path)
    word_tok.save_pretrained(tmp_path)
    adapter = CausalLMAdapter(char_tok)
    teacher = adapter.load_model(ModelConfig(path=str(tmp_path), kind="cross_tokenizer"), "teacher")
    rollout = adapter.dataset_rollout(["Ann has"], ["apples ."])
    texts, starts, ends = teacher.texts_and_bounds(adapter, rollout)
    prompt = adapter.format_prompt("Ann has")
    assert texts == [prompt + "apples ."]
    assert starts[0].tolist() == [len(prompt) + i for i in range(9)]  # 8 characters, then EOS at the end
    assert ends[0].tolist() == [len(prompt) + i for i in range(1, 9)] + [len(prompt) + 8]  # EOS adds no text
    _, _, ends = teacher.encode(texts, torch.device("cpu"))
    _, exact = char_alignment(starts, ends)
    assert exact[0].tolist() == [True, False, False, False, False, False, True, True, True]


def save_char_teacher(path, char_tok, seed=1):
    model = build_tiny_lm(TinyLMConfig(**TINY, seed=seed), char_tok)
    model.save_pretrained(path)
    char_tok.save_pretrained(path)
    return model


def test_identical_tokenizers_equal_the_plain_divergence(word_tok, tmp_path):
    adapter = CausalLMAdapter(word_tok, chunk_size=5)
    model = build_tiny_lm(TinyLMConfig(**TINY, seed=4), word_tok).eval()
    teacher = CrossTokenizerTeacher(model, word_tok, word_tok, smoothing=0.0)
    torch.testing.assert_close(teacher.projection().to_dense(), torch.eye(len(word_tok)))
    student = build_tiny_lm(TinyLMConfig(**TINY, seed=5), word_tok)
    problems = TASK.problems("train", 3)
    rollout = adapter.dataset_rollout([p.question for p in problems], [p.solution for p in problems])
    s = adapter.step_dist(student, rollout)
    with torch.no_grad():
        plain = adapter.step_dist(model, rollout)
        projected = adapter.step_dist(teacher, rollout)
    assert bool(projected.exact_B_T[rollout.mask_B_T.bool()].all())
    for beta in (0.0, 0.5, 1.0):
        torch.testing.assert_close(s.divergence(projected, beta), s.divergence(plain, beta), atol=1e-5, rtol=1e-5)
    b = ObjectiveBatch(rollout, s, projected, normalizer=float(rollout.mask_B_T.sum()))
    loss, metrics = OBJECTIVES.get("reverse_kl")()(b)  # the ordinary objective scores the projected teacher
    assert abs(metrics["divergence"] - float(s.divergence(plain, 1.0).detach().sum() / rollout.mask_B_T.sum())) < 1e-5


def test_end_to_end_char_teacher_word_student(char_tok, word_tok, tmp_path):
    save_char_teacher(tmp_path, char_tok)
    adapter = CausalLMAdapter(word_tok, chunk_size=16)
    teacher = (
        adapter.load_model(ModelConfig(path=str(tmp_path), kind="cross_tokenizer"), "teacher")
        .eval()
        .requires_grad_(False)
    )
    assert isinstance(teacher, CrossTokenizerTeacher)
    torch.manual_seed(0)
    student = adapter.load_model(ModelConfig(tiny=TinyLMConfig(**TINY, seed=2)))
    problems = TASK.problems("train", 4)
    rollout = adapter.sample(student, [p.question for p in problems], 12, 1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = adapter.step_dist(teacher, rollout)
    assert isinstance(t, TopKCategorical) and t.topk_idx_N_K.shape == (int(rollout.mask_B_T.sum()), len(word_tok))
    torch.testing.assert_close(
        torch.logaddexp(t.topk_logp_N_K.logsumexp(-1), t.tail_logp_N).exp(), torch.ones(t.tail_logp_N.shape)
    )
    assert bool(t.exact_B_T[rollout.mask_B_T.bool()].all())  # a char teacher has every boundary
    objective = OBJECTIVES.get("jsd")(beta=1.0, topk=16)  # the projected top-k shrunk to 16 plus the tail
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss, metrics = objective(
            ObjectiveBatch(rollout, adapter.step_dist(student, rollout), t, normalizer=float(rollout.mask_B_T.sum()))
        )
        assert torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_multi_character_student_token_gets_the_teachers_span_probability(char_tok, word_tok, tmp_path):
    """A word-level "####" under a character teacher: W gives it nothing, the realised span its exact probability."""
    model = save_char_teacher(tmp_path, char_tok, seed=7).eval()
    adapter = CausalLMAdapter(word_tok, chunk_size=8)
    teacher = adapter.load_model(
        ModelConfig(path=str(tmp_path), kind="cross_tokenizer", options={"smoothing": 0.0}), "teacher"
    )
    assert teacher.smoothing == 0.0 and teacher.topk == 256
    question, completion = "Ann has 3 apples .", "3 . #### 3"
    rollout = adapter.dataset_rollout([question], [completion])
    assert "####" in word_tok.convert_ids_to_tokens(rollout.actions[0].tolist())
    t = adapter.step_dist(teacher, rollout)
    n = int(rollout.mask_B_T.sum())
    assert t.span_B_T[0].tolist() == [False, False, False, False, True, False, False, False][:n] + [False] * (
        rollout.actions.shape[1] - n
    )
    hashes = word_tok.convert_tokens_to_ids("####")
    text = adapter.format_prompt(question) + completion
    ids = torch.tensor([char_tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :, : len(char_tok)], -1)
    c = len(adapter.format_prompt(question)) + len("3 . ")  # "####" starts at character c
    expected = sum(float(logp[c - 1 + i, ids[0, c + i]]) for i in range(4))
    row = int(rollout.mask_B_T[0, :4].sum())  # the rows before "####"
    got = t.topk_logp_N_K[row][t.topk_idx_N_K[row] == hashes]
    torch.testing.assert_close(got, torch.tensor([expected]), atol=1e-5, rtol=1e-5)
    total = torch.logaddexp(t.topk_logp_N_K.logsumexp(-1), t.tail_logp_N).exp()
    torch.testing.assert_close(total, torch.ones_like(total))


def test_cross_tokenizer_teacher_errors(char_tok, word_tok, tmp_path):
    model = build_tiny_lm(TinyLMConfig(**TINY), char_tok)
    model.save_pretrained(tmp_path)  # weights only, no tokenizer
    adapter = CausalLMAdapter(word_tok)
    with pytest.raises(CompatibilityError, match="has no tokenizer"):
        adapter.load_model(ModelConfig(path=str(tmp_path), kind="cross_tokenizer"), "teacher")
    char_tok.save_pretrained(tmp_path)
    teacher = adapter.load_model(ModelConfig(path=str(tmp_path), kind="cross_tokenizer"), "teacher")
    with pytest.raises(CompatibilityError, match="cannot generate"):
        adapter.sample(teacher, ["Ann has 3 apples ."], 4)
    with pytest.raises(ConfigError, match=r"models\.teacher\.options\.smoothing: 1\.5 must lie in \[0, 1\)"):
        adapter.load_model(
            ModelConfig(path=str(tmp_path), kind="cross_tokenizer", options={"smoothing": 1.5}), "teacher"
        )
    with pytest.raises(ConfigError, match=r"unknown config key 'models\.teacher\.options\.top_k'; did you mean 'topk'"):
        adapter.load_model(ModelConfig(path=str(tmp_path), kind="cross_tokenizer", options={"top_k": 8}), "teacher")


def test_xtoken_configs_load_and_validate(char_tok, tmp_path):
    save_char_teacher(tmp_path / "teacher", char_tok)
    cfg = load_config(
        "configs/text/xtoken_opd.yaml", [f"models.teacher.path={tmp_path / 'teacher'}", f"run_dir={tmp_path / 'run'}"]
    )
    assert cfg.models["teacher"].kind == "cross_tokenizer" and cfg.tokenizer.level == "word"
    assert any(st.teacher == "teacher" and st.objective.get("type") == "reverse_kl" for st in cfg.stages)
    teacher_cfg = load_config("configs/text/xtoken_teacher.yaml")
    assert teacher_cfg.tokenizer.level == "char"


def test_old_cross_tokenizer_keys_name_the_new_ones(char_tok, tmp_path):
    """`cross_tokenizer: true` and `objective: {type: xtoken_kl}` fail with one line naming the new form."""
    save_char_teacher(tmp_path / "teacher", char_tok)
    base = [
        "configs/text/xtoken_opd.yaml",
        f"models.teacher.path={tmp_path / 'teacher'}",
        f"run_dir={tmp_path / 'run'}",
    ]
    with pytest.raises(ConfigError, match="kind: cross_tokenizer") as e:
        load_config(base[0], base[1:] + ["models.teacher.cross_tokenizer=true"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="xtoken_kl.*kind: cross_tokenizer") as e:
        load_config(base[0], base[1:] + ["stages.student_xtoken.objective.type=xtoken_kl"])
    assert "\n" not in str(e.value)


def test_run_tokenizer_is_not_the_cross_tokenizer_teachers(char_tok, tmp_path):
    save_char_teacher(tmp_path / "teacher", char_tok)
    cfg = load_config(
        "configs/text/xtoken_opd.yaml", [f"models.teacher.path={tmp_path / 'teacher'}", f"run_dir={tmp_path / 'run'}"]
    )
    tok = CausalLMAdapter.build_tokenizer(cfg.tokenizer, TASK, cfg.models)
    assert "####" in tok.get_vocab()  # the student's word tokenizer, not the teacher's characters
