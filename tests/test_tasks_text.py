"""Tests of the verifiable text tasks: arithmetic word problems, the answer verifier, JSONL math.

python -m pytest tests/test_tasks_text.py -q
"""

from __future__ import annotations

import json
import random
import re
import string

import pytest

from mmdistill.errors import ConfigError
from mmdistill.modalities.text.tasks import (
    ArithTask,
    JsonlMathTask,
    Problem,
    TextTask,
    answers_match,
    extract_answer,
    is_correct,
)
from mmdistill.modalities.text.tasks.arith import equation_split, evaluate
from mmdistill.modalities.text.tokenizer import build_word_tokenizer, pre_tokenize, unk_coverage

_TOKEN = re.compile(r"[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]")  # words, single digits, single symbols
_STEP = re.compile(r"(\d+) ([+-]) (\d+) = (\d+) \.")


def equations(problems: list[Problem]) -> list[tuple]:
    return [p.meta["equation"] for p in problems]


# -- arith: splits --------------------------------------------------------------------------


def test_arith_difficulty1_enumeration_is_complete_and_disjoint():
    task = ArithTask(difficulty=1, max_value=20)
    everything = task.all_equations()
    # a + b needs a + b <= 20: sum over a of (20 - a); a - b needs b <= a: sum of a -> 190 + 210.
    assert len(everything) == 400 == task.space_size
    assert len(set(everything)) == 400
    train = set(equations(task.problems("train")))
    test = set(equations(task.problems("test")))
    assert train.isdisjoint(test)
    assert train | test == set(everything)
    assert task.split_sizes() == {"train": 317, "test": 83} == {"train": len(train), "test": len(test)}
    for eq in test:
        assert equation_split(eq, 0.2) == "test"


def test_arith_split_is_pinned_and_independent_of_seed_and_max_value():
    # sha256-based, so these hold in every process; a changed hash would silently reshuffle splits.
    assert equation_split((7, "+", 1), 0.2) == "test"
    assert equation_split((6, "+", 1), 0.2) == "train"
    assert equation_split((12, "+", 7, "-", 4), 0.2) == "train"
    small_test = set(equations(ArithTask(difficulty=1, max_value=10, seed=3).problems("test")))
    big_test = set(equations(ArithTask(difficulty=1, max_value=20, seed=9).problems("test")))
    assert len(small_test) == 24
    assert small_test <= big_test
    # a larger test fraction only moves equations from train to test
    wider_test = set(equations(ArithTask(difficulty=1, test_fraction=0.5).problems("test")))
    assert big_test < wider_test


@pytest.mark.parametrize("difficulty,n_train,n_test", [(2, 3000, 800), (3, 1500, 400)])
def test_arith_large_samples_are_disjoint(difficulty, n_train, n_test):
    task = ArithTask(difficulty=difficulty, max_value=20)
    train = equations(task.problems("train", n_train, seed=1))
    test = equations(task.problems("test", n_test, seed=1))
    streamed = [task.sample_train(random.Random(i)).meta["equation"] for i in range(200)]
    assert set(train).isdisjoint(test)
    assert set(streamed).isdisjoint(test)
    assert len(set(test)) == n_test, "test problems must be distinct equations"
    assert all(equation_split(eq, 0.2) == "train" for eq in train + streamed)
    assert all(len(eq) == 1 + 2 * difficulty for eq in train + test)


def test_arith_test_split_without_replacement(capsys):
    task = ArithTask(difficulty=1, max_value=20)
    exact = equations(task.problems("test", 83))
    assert sorted(exact) == sorted(set(equations(task.problems("test"))))
    assert capsys.readouterr().err == ""
    more = equations(task.problems("test", 100))  # beyond the split: the whole split, each equation once
    assert sorted(more) == sorted(exact)
    err = capsys.readouterr().err
    assert "note: the test split of ArithTask(difficulty=1" in err and "has 83 problems; asked for 100" in err
    assert err.count("\n") == 1


def test_arith_test_split_without_replacement_in_a_sampled_space():
    task = ArithTask(difficulty=2, max_value=30)  # too large to enumerate: sampled, then deduplicated
    assert task.split_sizes() is None
    test = equations(task.problems("test", 3000))
    assert len(set(test)) == 3000


def test_arith_whole_split_of_a_large_space_needs_n():
    with pytest.raises(ConfigError, match="pass n"):
        ArithTask(difficulty=3).problems("test")


# -- arith: determinism ---------------------------------------------------------------------


def test_arith_is_deterministic_per_seed():
    a = ArithTask(difficulty=2, max_value=20).problems("train", 50, seed=4)
    b = ArithTask(difficulty=2, max_value=20).problems("train", 50, seed=4)
    c = ArithTask(difficulty=2, max_value=20).problems("train", 50, seed=5)
    d = ArithTask(difficulty=2, max_value=20, seed=1).problems("train", 50, seed=4)
    assert a == b
    assert a != c and a != d
    big = ArithTask(difficulty=3)
    assert big.problems("test", 20, seed=2) == ArithTask(difficulty=3).problems("test", 20, seed=2)
    assert big.sample_train(random.Random(7)) == big.sample_train(random.Random(7))


# -- arith: content -------------------------------------------------------------------------


def test_arith_render_matches_hand_written_solution():
    task = ArithTask(difficulty=2, max_value=20)
    p = task.render((12, "+", 7, "-", 4), random.Random(0))
    assert p.answer == "15"
    assert p.solution == "12 + 7 = 19 . 19 - 4 = 15 . #### 15"
    assert re.fullmatch(
        r"[A-Z][a-z]+ has 12 [a-z]+ \. \w+ \w+ 7 more \. Then \w+ [a-z ]+ 4 \. How many [a-z]+ does [A-Z][a-z]+ have \?",
        p.question,
    ), p.question
    one = task.render((1, "+", 2, "+", 3), random.Random(0))
    first_sentence = one.question.split(" . ")[0].split()
    assert first_sentence[1:3] == ["has", "1"]
    assert first_sentence[3] in {"apple", "book", "coin", "marble", "pencil", "sticker"}, one.question


@pytest.mark.parametrize("difficulty,ops", [(1, "+-"), (2, "+-"), (3, "+-"), (4, "+-"), (3, "+"), (3, "-")])
def test_arith_solutions_verify_and_values_stay_in_range(difficulty, ops):
    task = ArithTask(difficulty=difficulty, max_value=20, ops=ops)
    cap = 20 * difficulty
    for p in task.problems("train", 150, seed=0) + task.problems("test", 50, seed=0):
        eq = p.meta["equation"]
        values = evaluate(eq)
        assert all(0 <= v <= cap for v in values), (eq, values)
        assert 1 <= eq[0] <= 20 and all(1 <= n <= 20 for n in eq[2::2])
        assert set(eq[1::2]) <= set(ops)
        assert p.answer == str(values[-1])
        # the worked steps are correct arithmetic and chain into each other
        steps = _STEP.findall(p.solution)
        assert len(steps) == difficulty
        for k, (a, op, b, c) in enumerate(steps):
            assert int(a) == values[k] and int(c) == values[k + 1]
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert p.solution.endswith(f"#### {p.answer}")
        assert "####" not in p.question and p.question.endswith("?")
        assert task.reward(p, p.solution) == 1.0
        assert task.reward(p, p.solution.rsplit("####", 1)[0] + f"#### {values[-1] + 1}") == 0.0
        assert task.reward(p, "") == 0.0


def test_arith_vocabulary_covers_every_token():
    task = ArithTask(difficulty=4, max_value=20)
    vocab = set(task.vocabulary())
    assert {str(d) for d in range(10)} | {".", "?", "+", "-", "=", "#"} <= vocab
    assert not any(len(tok) > 1 and tok.isdigit() for tok in vocab), "numbers are spelled digit by digit"
    for p in task.problems("train", 300) + ArithTask(difficulty=1).problems("test"):
        tokens = set(_TOKEN.findall(p.question + " " + p.solution))
        assert tokens <= vocab, tokens - vocab
    assert len(vocab) < 80
    # every entry is one piece of the word tokenizer's own pre-tokenizer, and the tokenizer spells every text
    assert all(pre_tokenize(word) == [word] for word in vocab)
    cov = unk_coverage(build_word_tokenizer(task.vocabulary()), task.texts(400))
    assert (cov.unit, cov.unk, cov.texts) == ("words", 0, 800) and cov.total > 5_000


def test_arith_texts_are_fixed_and_from_both_sides():
    task = ArithTask(difficulty=2, max_value=9)
    texts = task.texts(10)
    assert len(texts) == 20 and texts == ArithTask(difficulty=2, max_value=9).texts(10)
    assert all("####" in t for t in texts[1::2]) and all(t.endswith("?") for t in texts[0::2])


def test_arith_bad_config_is_explained():
    with pytest.raises(ConfigError, match="task.difficulty"):
        ArithTask(difficulty=5)
    with pytest.raises(ConfigError, match="task.ops"):
        ArithTask(ops="*")
    with pytest.raises(ConfigError, match="task.max_value"):
        ArithTask(difficulty=2, max_value=1, ops="+")  # 1 + 1 + 1 > cap 2: no equation fits
    with pytest.raises(ConfigError, match="task.test_fraction"):
        ArithTask(test_fraction=float("nan"))
    with pytest.raises(ConfigError, match="split"):
        ArithTask().problems("validation")
    with pytest.raises(ConfigError, match="n=-1"):
        ArithTask().problems("test", -1)


def test_tasks_follow_the_protocol_and_problems_hash():
    task = ArithTask()
    assert isinstance(task, TextTask)
    p = task.problems("test", 1)[0]
    assert hash(p) == hash(Problem(p.question, p.answer, p.solution, {}))


# -- verifier -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3 + 4 = 7\n#### 72", "72"),
        ("#### 1\nlater\n#### 5", "5"),
        ("#### -3 \n", "-3"),
        ("\\boxed{3}\n#### 4", "4"),  # #### beats \boxed
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{\\sqrt{\\frac{1}{4}}} done", "\\sqrt{\\frac{1}{4}}"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed{\\}}", "\\}"),  # an escaped brace does not close the box
        ("\\boxed{3} and \\boxed{4", "3"),  # the unbalanced last box is skipped
        ("I had 12 and then 15 apples.", "15"),
        ("12-4", "4"),
        ("it is -3", "-3"),
        ("total 1,234 dollars", "1,234"),
        ("pi is about 3.14.", "3.14"),
        ("no idea", None),
        ("####", None),
        ("####\n15", None),  # an empty committed answer is no answer
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "pred,gold,expected",
    [
        ("72", "72", True),
        ("73", "72", False),
        ("3.0", "3", True),
        ("3.5", "3", False),
        ("3.50", "3.5", True),
        ("0.5", "1/2", True),
        ("\\frac{1}{2}", "1/2", True),
        ("\\dfrac{1}{2}", "0.5", True),
        ("\\frac12", "0.5", True),
        ("-\\frac{3}{4}", "-0.75", True),
        ("\\frac{3}{4}", "-3/4", False),
        ("1,234", "1234", True),
        ("$1,234.00$", "1234", True),
        ("1,2,3", "123", False),
        ("1,2,3", "1,2,3", True),
        ("50%", "50", True),
        ("50\\%", "50", True),
        ("50", "50%", True),
        ("-3", "-3", True),
        ("3", "-3", False),
        ("+5", "5", True),
        ("15.", "15", True),
        ("x = 5", "5", True),
        ("15 apples", "15", True),
        ("15 - 4", "11", False),
        ("1 1/2", "3/2", True),
        ("1 1/2", "11/2", False),
        ("1/0", "0", False),
        ("\\boxed{5}", "5", True),
        ("\\text{(B)}", "(B)", True),
        ("\\left( 1, 2 \\right)", "(1,2)", True),
        ("(1,3)", "(1,2)", False),
        (None, "5", False),
        ("", "5", False),
    ],
)
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


@pytest.mark.parametrize(
    "completion,gold,expected",
    [
        ("12 + 3 = 15 . #### 15", "15", True),
        ("12 + 3 = 15 . #### 16", "15", False),
        ("The answer is \\boxed{\\dfrac{3}{4}}.", "0.75", True),
        ("so 12 + 3 = 15", "15", True),
        ("#### 1,000", "1000", True),
        ("I cannot tell.", "5", False),
        ("####", "0", False),
    ],
)
def test_is_correct(completion, gold, expected):
    assert is_correct(completion, gold) is expected


# -- jsonl math -----------------------------------------------------------------------------

GOOD_AND_BAD = [
    json.dumps({"question": "Tom has 3 cats and gets 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"}),
    '{"question": "broken",',
    json.dumps({"question": "q without answer"}),
    json.dumps({"question": "q", "answer": "   "}),
    "",
    json.dumps({"question": "q2", "answer": 5}),
    json.dumps({"question": "Half of one?", "answer": "It is $\\boxed{\\frac{1}{2}}$."}),
    json.dumps({"question": "What is 6 times 7?", "answer": "42"}),
    "[1, 2]",
    json.dumps({"question": "q3", "answer": "line one\nline two"}),
    json.dumps({"question": "q4", "answer": "work\n#### "}),
]


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_counts_malformed_lines_and_keeps_good_ones(tmp_path):
    task = JsonlMathTask(write_jsonl(tmp_path / "mix.jsonl", GOOD_AND_BAD), test_fraction=1.0)
    assert isinstance(task, TextTask)
    stats = task.stats
    assert (stats["total_lines"], stats["loaded"], stats["malformed"]) == (10, 3, 7)
    assert [no for no, _ in stats["malformed_examples"]] == [2, 3, 4, 6, 9]
    reasons = [why for _, why in stats["malformed_examples"]]
    assert reasons[0].startswith("bad JSON")
    assert "missing key 'answer'" in reasons[1] and "keys present: question" in reasons[1]
    assert reasons[2] == "empty answer"
    assert "'answer' is a int, expected a string" == reasons[3]
    assert "expected an object" in reasons[4]
    assert "loaded 3 of 10 lines" in task.summary() and "skipped 7 malformed" in task.summary()

    train = task.problems("test")  # test_fraction=1: every problem is held out
    assert [p.answer for p in train] == ["7", "\\frac{1}{2}", "42"]
    assert [p.meta["line"] for p in train] == [1, 7, 8]
    assert [p.solution for p in train] == [
        "3 + 4 = 7\n#### 7",
        "It is $\\boxed{\\frac{1}{2}}$.\n#### \\frac{1}{2}",
        "#### 42",
    ]
    with pytest.raises(ConfigError, match="test_fraction=1 holds out every problem"):
        task.problems("train")
    with pytest.raises(ConfigError, match="the train split .* is empty"):
        task.sample_train(random.Random(0))
    for p in train:
        assert task.reward(p, p.solution) == 1.0
    assert task.reward(train[0], "#### 8") == 0.0
    assert task.reward(train[1], "it is 0.5 so #### 0.5") == 1.0
    vocab = set(task.vocabulary())
    assert {"Tom", "####", "7", "?"} <= vocab
    assert "more." not in vocab and "more" in vocab, "words are split as the tokenizer splits them"


def test_jsonl_hash_split_is_deterministic(tmp_path):
    lines = [json.dumps({"question": f"What is {i} plus 1?", "answer": f"#### {i + 1}"}) for i in range(200)]
    lines.append(lines[5])  # a repeated question lands on the same side
    path = write_jsonl(tmp_path / "many.jsonl", lines)
    a, b = JsonlMathTask(path, test_fraction=0.3), JsonlMathTask(path, test_fraction=0.3, seed=4)
    assert a.problems("test") == b.problems("test")
    n_test = len(a.problems("test"))
    assert 40 <= n_test <= 80 and n_test + len(a.problems("train")) == 201
    sides = {p.meta["split"] for p in a.problems("train") + a.problems("test") if p.question == "What is 5 plus 1?"}
    assert len(sides) == 1
    assert {p.question for p in a.problems("train")}.isdisjoint(p.question for p in a.problems("test"))
    sample = a.problems("train", 10, seed=1)
    assert sample == a.problems("train", 10, seed=1) != a.problems("train", 10, seed=2)
    assert len(set(sample)) == 10


def test_jsonl_separate_test_file_and_custom_keys(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [json.dumps({"problem": "1+1?", "solution": "\\boxed{2}"})])
    test = write_jsonl(tmp_path / "test.jsonl", [json.dumps({"problem": "2+2?", "solution": "\\boxed{4}"}), "{"])
    task = JsonlMathTask(train, test_path=test, question_key="problem", answer_key="solution")
    assert [p.answer for p in task.problems("train")] == ["2"]
    assert [p.answer for p in task.problems("test")] == ["4"]
    assert task.stats["malformed_examples"] == [(2, task.stats["malformed_examples"][0][1])]
    assert task.stats["malformed_examples"][0][1].startswith("[task.test_path] bad JSON")


def test_jsonl_missing_file_and_wrong_keys_are_explained(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="task.path") as err:
        JsonlMathTask(missing)
    assert missing in str(err.value)
    good = write_jsonl(tmp_path / "ok.jsonl", GOOD_AND_BAD[:1])
    with pytest.raises(ConfigError, match="task.test_path"):
        JsonlMathTask(good, test_path=missing)
    with pytest.raises(ConfigError, match="task.question_key='problem' is not a key") as err:
        JsonlMathTask(good, question_key="problem")
    assert "['question', 'answer']" in str(err.value) and "set task.question_key=question" in str(err.value)


# -- tokenizer coverage ---------------------------------------------------------------------


@pytest.mark.parametrize("level", ["word", "char"])
def test_unk_coverage_matches_a_text_by_text_count(level):
    from mmdistill.modalities.text.tokenizer import build_char_tokenizer

    rng = random.Random(0)
    alphabet = list("abcxyz ABC .,?!#\t\n0123456789") + ["é", "ü", "中", "####", "cats.", "  "]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))) for _ in range(300)]
    tok = build_word_tokenizer(["abc", "cats", "xyz"]) if level == "word" else build_char_tokenizer()
    cov = unk_coverage(tok, texts)
    word_tok = build_word_tokenizer([])  # a word is a piece of the word pattern, whatever the tokenizer
    expected_total = expected_unk = 0
    for text in texts:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        bad = {
            i
            for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
            if t == tok.unk_token_id
            for i in range(a, b)
        }
        for piece, (a, b) in word_tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text):
            if not piece.isspace() and not (
                piece == "####" or (len(piece) == 1 and piece in string.digits + string.punctuation)
            ):
                expected_total += 1
                expected_unk += any(i in bad for i in range(a, b))
    assert (cov.total, cov.unk) == (expected_total, expected_unk)
    assert cov.unk > 0 and cov.texts == sum(1 for t in texts if t)


def test_text_pieces_match_the_pre_tokenizer_text_by_text():
    from mmdistill.modalities.text.tokenizer import text_pieces

    rng = random.Random(1)
    alphabet = list("abXY .,?#\t\n\r07") + ["é", "\u00a0", "\u2028", "\x1c", "####"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(500)]
    assert text_pieces(texts) == {piece for t in texts for piece in pre_tokenize(t)}
