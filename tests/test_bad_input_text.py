"""Bad input to the text tasks and tokenizers: one `error:` line and exit 2 before any compute, bad rows
counted and named, no problem repeated, and a warning when a tokenizer cannot spell the task.

    OMP_NUM_THREADS=1 python -m pytest tests/test_bad_input_text.py -q
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from mmdistill.cli import main
from mmdistill.config import TokenizerConfig
from mmdistill.errors import ConfigError
from mmdistill.modalities.text.adapter import CausalLMAdapter
from mmdistill.modalities.text.tasks import ArithTask, JsonlMathTask
from mmdistill.modalities.text.tokenizer import UNK_WARN, build_word_tokenizer, pre_tokenize, unk_coverage

TINY = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "seed": 1}


def gsm8k_line(i: int) -> str:
    """A GSM8K-style line whose words sit next to punctuation ("clips.", "May?")."""
    return json.dumps(
        {
            "question": f"Natalia sold clips to {i} of her friends in April, then half as many in May. How many clips?",
            "answer": f"She sold {i} + {i} = {2 * i} clips.\n#### {2 * i}",
        }
    )


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def good_file(tmp_path: Path, n: int = 40, name: str = "good.jsonl") -> str:
    return write_lines(tmp_path / name, [gsm8k_line(i) for i in range(n)])


def config_file(tmp_path: Path, task: dict, **top) -> str:
    """A tiny SFT run on `task`, written as YAML; run_dir inside tmp_path."""
    raw = {
        "run_dir": str(tmp_path / "run"),
        "device": "cpu",
        "task": task,
        "models": {"student": {"tiny": TINY}},
        "eval": {"n": 4, "batch_size": 4, "max_new_tokens": 4},
        "rollout": {"max_new_tokens": 4},
        "stages": [{"name": "sft", "student": "student", "objective": {"type": "sft"}, "train": {"steps": 1}}],
        **top,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def refused(argv: list[str], capsys, *fragments: str) -> str:
    """Run the CLI; it must exit 2 with one `error:` line holding every fragment, and no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def no_stage_ran(tmp_path: Path) -> None:
    """Refused before any compute: no stage directory, no checkpoint."""
    assert not (tmp_path / "run" / "sft").exists()


# -- train: a bad JSONL or task key is refused before any model is built -------------------


def test_empty_jsonl(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    cfg = config_file(tmp_path, {"type": "jsonl_math", "path": str(empty)})
    refused(["train", cfg, "--quiet"], capsys, "task.path", "is empty", "one {'question': ..., 'answer': ...}")
    no_stage_ran(tmp_path)
    blank = write_lines(tmp_path / "blank.jsonl", ["", "   ", "\t"])
    refused(["train", cfg, f"task.path={blank}", "--quiet", "--overwrite"], capsys, "is empty")


@pytest.mark.parametrize(
    "key,value,named",
    [
        ("question_key", "problem", "set task.question_key=question"),
        ("answer_key", "solution", "set task.answer_key=answer"),
    ],
)
def test_wrong_key_names_the_keys_of_the_file(tmp_path, capsys, key, value, named):
    cfg = config_file(tmp_path, {"type": "jsonl_math", "path": good_file(tmp_path), key: value})
    refused(
        ["train", cfg, "--quiet"],
        capsys,
        f"task.{key}='{value}' is not a key of",
        "its objects have the keys ['question', 'answer']",
        named,
    )
    no_stage_ran(tmp_path)


def test_wrong_key_without_a_common_name(tmp_path, capsys):
    path = write_lines(tmp_path / "qa.jsonl", [json.dumps({"q": "1+1?", "a": "#### 2"})] * 3)
    cfg = config_file(tmp_path, {"type": "jsonl_math", "path": path})
    refused(["train", cfg, "--quiet"], capsys, "task.question_key='question'", "['q', 'a']", "set task.question_key to")


@pytest.mark.parametrize(
    "value,fragment",
    [
        ("1.5", "task.test_fraction=1.5 is not in [0, 1]"),
        ("-0.1", "task.test_fraction=-0.1 is not in [0, 1]"),
        ("2", "task.test_fraction=2.0 is not in [0, 1]"),
        (".nan", "nan"),  # refused by the config's finite check, or by the task's range check
        (".inf", "inf"),
        ("-.inf", "inf"),
        ("true", "task.test_fraction"),
    ],
)
def test_test_fraction_out_of_range(tmp_path, capsys, value, fragment):
    cfg = config_file(tmp_path, {"type": "jsonl_math", "path": good_file(tmp_path)})
    refused(["train", cfg, f"task.test_fraction={value}", "--quiet"], capsys, "task.test_fraction", fragment)
    no_stage_ran(tmp_path)
    with pytest.raises(ConfigError, match="is not in \\[0, 1\\]"):  # the task's own check, whatever the loader does
        JsonlMathTask(good_file(tmp_path), test_fraction=yaml.safe_load(value))


def test_arith_out_of_range(tmp_path, capsys):
    cfg = config_file(tmp_path, {"type": "arith"})
    refused(["train", cfg, "task.difficulty=7", "--quiet"], capsys, "task.difficulty=7", "1..4")
    refused(["train", cfg, "task.test_fraction=1.0", "--quiet", "--overwrite"], capsys, "task.test_fraction=1.0")
    no_stage_ran(tmp_path)


def test_mixture_bad_weights(tmp_path, capsys):
    task = {"type": "mixture", "tasks": {"add": {"type": "arith", "ops": "+"}, "sub": {"type": "arith", "ops": "-"}}}
    cfg = config_file(tmp_path, task)
    refused(["train", cfg, "task.weights={add: 1}", "--quiet"], capsys, "task.weights", "['add', 'sub']")


def test_empty_test_split_is_refused_at_construction(tmp_path, capsys):
    cfg = config_file(tmp_path, {"type": "jsonl_math", "path": good_file(tmp_path), "test_fraction": 0.0})
    refused(
        ["train", cfg, "--quiet"],
        capsys,
        "task.test_fraction=0 puts none of the 40 problems",
        "raise task.test_fraction",
        "task.test_path",
    )
    no_stage_ran(tmp_path)
    # a small file whose few questions all hash to train, with test_fraction > 0
    few = write_lines(tmp_path / "few.jsonl", [gsm8k_line(i) for i in (0, 1)])
    refused(
        ["train", cfg, f"task.path={few}", "task.test_fraction=0.01", "--quiet", "--overwrite"],
        capsys,
        "task.test_fraction=0.01 puts none of the 2 problems",
    )


def test_all_in_test_is_refused_unless_asked_for(tmp_path, capsys):
    cfg = config_file(tmp_path, {"type": "jsonl_math", "path": good_file(tmp_path, n=3), "test_fraction": 0.99})
    refused(["train", cfg, "--quiet"], capsys, "puts all 3 problems", "in the test split", "set it to 1")
    no_stage_ran(tmp_path)
    # test_fraction=1 asks for it (evaluation only); training on it is refused with the fix
    refused(
        ["train", cfg, "task.test_fraction=1", "--quiet", "--overwrite"],
        capsys,
        "the train split of",
        "task.test_fraction=1 holds out every problem",
    )


def test_missing_task_file(tmp_path, capsys):
    cfg = config_file(tmp_path, {"type": "jsonl_math", "path": str(tmp_path / "nope.jsonl")})
    refused(["train", cfg, "--quiet"], capsys, "task.path", "nope.jsonl")  # the loader's check or the task's
    no_stage_ran(tmp_path)
    cfg = config_file(tmp_path, {"type": "jsonl_math", "path": str(tmp_path)})
    refused(["train", cfg, "--quiet", "--overwrite"], capsys, "is a directory")


def test_missing_test_path(tmp_path, capsys):
    task = {"type": "jsonl_math", "path": good_file(tmp_path), "test_path": str(tmp_path / "held_out.jsonl")}
    refused(["train", config_file(tmp_path, task), "--quiet"], capsys, "task.test_path", "held_out.jsonl")


def test_no_usable_line(tmp_path, capsys):
    path = write_lines(tmp_path / "bad.jsonl", ["not json", json.dumps({"question": "q", "answer": "a\nb"})])
    cfg = config_file(tmp_path, {"type": "jsonl_math", "path": path})
    refused(["train", cfg, "--quiet"], capsys, "none of the 2 lines", "line 1: bad JSON", "line 2: worked solution")


# -- encodings ------------------------------------------------------------------------------


def test_non_utf8_rows_are_counted_and_named(tmp_path, capsys):
    lines = [gsm8k_line(i).encode() for i in range(20)]
    for no in (4, 9, 17):  # 1-based line numbers
        lines[no - 1] = (
            json.dumps({"question": "caf\u00e9 prices?", "answer": "#### 3"})
            .encode("utf-8")
            .replace(b"\\u00e9", "\u00e9".encode("latin-1"))
        )
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    cfg = config_file(tmp_path, {"type": "jsonl_math", "path": str(path)})
    refused(
        ["train", cfg, "--quiet"],
        capsys,
        "3 of 20 lines of",
        "are not UTF-8 (lines 4, 9, 17)",
        "re-encode the file as UTF-8",
    )
    no_stage_ran(tmp_path)


def test_many_non_utf8_rows_name_the_first_ten(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_bytes(b"".join(b'{"question": "\xe9", "answer": "1"}\n' for _ in range(30)))
    with pytest.raises(ConfigError, match=r"30 of 30 lines .* \(lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, \.\.\.\)"):
        JsonlMathTask(str(path))


def test_utf16_file_is_named(tmp_path, capsys):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes("\n".join(gsm8k_line(i) for i in range(5)).encode("utf-16"))
    cfg = config_file(tmp_path, {"type": "jsonl_math", "path": str(path)})
    refused(["train", cfg, "--quiet"], capsys, "is UTF-16", "iconv -f UTF-16 -t UTF-8")


def test_bom_keeps_line_one(tmp_path):
    lines = [gsm8k_line(i) for i in range(12)]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")  # Windows: BOM and CRLF
    task = JsonlMathTask(str(path), test_fraction=1.0)
    assert task.stats["loaded"] == 12 and task.stats["malformed"] == 0
    assert [p.meta["line"] for p in task.problems("test")] == list(range(1, 13))
    assert task.problems("test")[0].question.startswith("Natalia sold clips to 0 ")


def test_json_edge_cases_are_skipped_and_named(tmp_path):
    lines = [
        gsm8k_line(1),
        "[" * 100_000,  # nesting too deep for json
        '{"question": "big", "answer": "#### ' + "9" * 10 + '", "n": ' + "9" * 5000 + "}",  # int too long to parse
        json.dumps({"question": "lone \ud800 surrogate", "answer": "#### 1"}),
        json.dumps({"question": "   ", "answer": "#### 1"}),
    ]
    task = JsonlMathTask(write_lines(tmp_path / "edge.jsonl", lines), test_fraction=1.0)
    assert (task.stats["loaded"], task.stats["malformed"]) == (1, 4)
    reasons = dict(task.stats["malformed_examples"])
    assert reasons[2].startswith("bad JSON") and reasons[3].startswith("bad JSON")
    assert "surrogate" in reasons[4] and reasons[5] == "empty question"


def test_generated_files_never_raise_anything_but_a_config_error(tmp_path):
    """500 generated files (seeded): good lines, garbage bytes, BOMs, CRLF, wrong types, deep nesting,
    surrogates, blank lines; the task loads or refuses with a ConfigError, never anything else."""
    pieces = [
        lambda r: gsm8k_line(r.randrange(1000)).encode(),
        lambda r: bytes(r.randrange(256) for _ in range(r.randrange(1, 40))),
        lambda r: b"\xef\xbb\xbf" + gsm8k_line(r.randrange(9)).encode(),
        lambda r: json.dumps(
            {"question": r.choice(["", " ", "q?", 3, None]), "answer": r.choice(["#### 1", 2, ""])}
        ).encode(),
        lambda r: b"[" * r.randrange(1, 3000),
        lambda r: b'{"question": "\\udc80", "answer": "#### 1"}',
        lambda r: b"",
        lambda r: json.dumps({"question": "x", "answer": "\\boxed{" * r.randrange(1, 50)}).encode(),
        lambda r: r.choice([b"\r", b"\n", b"\r\n", b"\x00", b"\xff\xfe"]),
    ]
    outcomes = {"loaded": 0, "refused": 0}
    path = tmp_path / "gen.jsonl"
    for seed in range(500):
        r = random.Random(seed)
        path.write_bytes(b"\n".join(r.choice(pieces)(r) for _ in range(r.randrange(0, 12))))
        try:
            task = JsonlMathTask(str(path), test_fraction=r.choice([0.5, 1.0]))
        except ConfigError as e:
            assert "\n" not in str(e), str(e)
            outcomes["refused"] += 1
        else:
            assert task.problems("test") and task.summary()
            outcomes["loaded"] += 1
    assert outcomes["loaded"] > 20 and outcomes["refused"] > 20, outcomes


# -- eval: the task's own checks, and --n never repeats a problem ---------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen3 saved with the quickstart's tokenizer (no training)."""
    from mmdistill.modalities.text.adapter import build_tiny_lm
    from mmdistill.modalities.text.config import TinyLMConfig

    tok = build_word_tokenizer(ArithTask(difficulty=2, max_value=9).vocabulary())
    out = tmp_path_factory.mktemp("ckpt")
    build_tiny_lm(TinyLMConfig(**TINY), tok).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def test_eval_missing_task_file(checkpoint, tmp_path, capsys):
    missing = str(tmp_path / "gsm8k_test.jsonl")
    refused(
        ["eval", checkpoint, "--task", "jsonl_math", "--set", f"path={missing}"],
        capsys,
        "task.path: no such file",
        "gsm8k_test.jsonl",
    )
    refused(["eval", checkpoint, "--task", "jsonl_math", "--set", "path="], capsys, "task.path")


def test_eval_bad_split(checkpoint, capsys):
    refused(["eval", checkpoint, "--split", "validation"], capsys, "split='validation' is not a split")


def test_eval_n_beyond_the_split_uses_each_problem_once(checkpoint, tmp_path, capsys):
    path = good_file(tmp_path, n=5)
    argv = ["eval", checkpoint, "--task", "jsonl_math", "--set", f"path={path}", "--set", "test_fraction=1"]
    capsys.readouterr()
    assert main([*argv, "--n", "200", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().endswith("on 5 test problems"), captured.out
    assert "has 5 problems; asked for 200, using each once (5)" in captured.err
    assert main([*argv, "--n", "3", "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3


def test_problems_never_repeat(tmp_path):
    task = JsonlMathTask(good_file(tmp_path, n=30), test_fraction=0.5)
    for split in ("train", "test"):
        size = len(task.problems(split))
        got = task.problems(split, size + 7, seed=3)
        assert len(got) == size and len({p.question for p in got}) == size
    arith = ArithTask(difficulty=1, max_value=5)
    size = arith.split_sizes()["test"]
    assert (
        len({p.meta["equation"] for p in arith.problems("test", 10 * size)})
        == size
        == len(arith.problems("test", 10 * size))
    )


# -- tokenizer coverage ---------------------------------------------------------------------


def test_word_vocabulary_uses_the_tokenizers_own_split(tmp_path, capsys):
    task = JsonlMathTask(good_file(tmp_path), test_fraction=0.2)
    vocab = set(task.vocabulary())
    assert {"clips", "May", "April"} <= vocab and not {"clips.", "May.", "April,", "clips?"} & vocab
    tok = CausalLMAdapter.build_tokenizer(TokenizerConfig(), task, {})
    assert capsys.readouterr().err == ""  # every word of the task is spelled: nothing to warn about
    cov = unk_coverage(tok, task.texts())
    assert cov.unk == 0 and cov.total == 40 * 21  # 40 problems, 21 words each (18 in the question, 3 in the answer)
    ids = tok("How many clips?", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.convert_ids_to_tokens(ids)[-2:] == ["clips", "?"]


def test_build_word_tokenizer_splits_words_next_to_punctuation():
    tok = build_word_tokenizer(["clips.", "May?"])
    assert {"clips", "May"} <= set(tok.get_vocab()) and "clips." not in tok.get_vocab()
    assert pre_tokenize("clips. 12") == ["clips", ".", " ", "1", "2"]


def test_quickstart_tokenizer_is_silent_on_its_task(capsys):
    CausalLMAdapter.build_tokenizer(TokenizerConfig(), ArithTask(difficulty=2, max_value=9), {})
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_a_tokenizer_that_cannot_spell_the_task_is_warned_about(checkpoint, tmp_path, capsys):
    task = JsonlMathTask(good_file(tmp_path), test_fraction=0.2)
    CausalLMAdapter.build_tokenizer(TokenizerConfig(path=checkpoint), task, {})  # the quickstart's word tokenizer
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: tokenizer: ")
    assert "of the task's words are <unk>" in err and "'clips'" in err and "set tokenizer.path" in err


def test_char_tokenizer_on_non_ascii_text_is_warned_about(tmp_path, capsys):
    lines = [
        json.dumps({"question": f"Combien font {i} + {i} ? Réponds vite, s'il te plaît.", "answer": f"#### {2 * i}"})
        for i in range(20)
    ]
    task = JsonlMathTask(write_lines(tmp_path / "fr.jsonl", lines), test_fraction=0.5)
    CausalLMAdapter.build_tokenizer(TokenizerConfig(level="char"), task, {})
    err = capsys.readouterr().err
    assert err.startswith("warning: tokenizer: ") and "'é'" in err and "'î'" in err
    assert "tokenizer.level: word" in err
    CausalLMAdapter.build_tokenizer(TokenizerConfig(), task, {})  # the word tokenizer learns 'é', 'î' as tokens
    assert capsys.readouterr().err == ""


def test_a_few_unknown_words_are_a_note_not_a_warning(capsys):
    tok = build_word_tokenizer(["alpha"])
    from mmdistill.modalities.text.tokenizer import report_coverage

    texts = ["alpha " * 200 + "zeta"]
    cov = report_coverage(tok, texts, "the task", "fix it")
    assert cov.unk == 1 and cov.unk_fraction <= UNK_WARN
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("[tokenizer] 0.5% of the task's words are <unk>")
    assert report_coverage(tok, texts, "the task", "fix it") is None  # said once per (tokenizer, texts)
    assert capsys.readouterr().out == ""
    assert report_coverage(tok, texts + ["zeta"], "the task", "fix it").unk == 2


def test_coverage_of_a_byte_level_tokenizer_is_not_measured():
    class NoUnk:
        unk_token_id = None

    assert unk_coverage(NoUnk(), ["anything"]) is None
