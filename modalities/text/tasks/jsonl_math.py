r"""Math problems from your own JSONL file (GSM8K or MATH style), with a verifiable answer.

One JSON object per line, in UTF-8 (a leading byte-order mark is ignored), e.g.

    {"question": "Tom has 3 cats ...", "answer": "He has 3 + 4 = 7 cats.\n#### 7"}       # GSM8K
    {"problem": "Compute ...", "solution": "... so it is $\\boxed{\\frac{1}{2}}$."}         # MATH,
        with question_key="problem", answer_key="solution"
    {"question": "What is 6 * 7?", "answer": "42"}                                          # short answer

The gold answer is `verify.extract_answer` of the answer text (`####`, else the last `\boxed{}`);
an answer text with neither is taken whole when it is one line ("42", "\frac{1}{2}"). The target
`solution` is the answer text, ending with a `#### <answer>` line (appended when missing).
Malformed lines (bad JSON, a missing key, no final answer) are counted, named and skipped (see
`stats` and `summary()`). A file the task cannot use is refused at construction with one
`ConfigError` that names the key and the fix: missing or empty, not UTF-8 (every bad line is
counted and the first ones named), a `question_key` / `answer_key` that no line has (the keys the
file has are named), no usable line, or an empty train or test split.
Without `test_path`, a fixed sha256 of the question text puts each line in train or test;
`test_fraction: 1` holds out every line (evaluation only).

    printf '{"question": "1+1?", "answer": "#### 2"}\nnot json\n' > /tmp/q.jsonl
    python -c "from mmdistill.modalities.text.tasks.jsonl_math import JsonlMathTask; print(JsonlMathTask('/tmp/q.jsonl', test_fraction=1).summary())"
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter

from mmdistill.errors import ConfigError
from mmdistill.modalities.text.tokenizer import text_pieces
from mmdistill.registry import TASKS

from . import Problem, check_n, check_split, draw
from .verify import extract_answer, is_correct, last_boxed

MAX_EXAMPLES = 5  # malformed lines kept as examples in `stats`
MAX_NAMED = 10  # line numbers named in an encoding error
_SPLIT_SALT = "mmdistill/jsonl_math/split/v1"
_BOM = b"\xef\xbb\xbf"
_QUESTION_KEYS = ("question", "problem", "prompt", "input", "query")  # common names, for the hint
_ANSWER_KEYS = ("answer", "solution", "output", "response", "target")


def question_split(question: str, test_fraction: float) -> str:
    """'test' or 'train' for a question: a stable sha256 of its stripped text vs test_fraction."""
    key = _SPLIT_SALT + ":" + question.strip()
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "test" if u < test_fraction else "train"


def gold_and_solution(answer_text: str) -> tuple[str | None, str, str]:
    """(gold answer or None, target solution, reason when None) for one answer text."""
    text = answer_text.strip()
    if not text:
        return None, "", "empty answer"
    if "####" in text or last_boxed(text) is not None:
        gold = extract_answer(text)
        if gold is None:
            return None, "", "nothing after the final '####'"
    elif "\n" not in text:
        gold = text  # a short answer: "42", "\frac{1}{2}", "Paris"
    else:
        return None, "", "worked solution without a final '#### <answer>' line or \\boxed{...}"
    if gold == text:
        solution = f"#### {gold}"
    else:
        last_line = text.rsplit("\n", 1)[-1].strip()
        solution = text if last_line.startswith("####") else f"{text}\n#### {gold}"
    return gold, solution, ""


def _line_numbers(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:MAX_NAMED]))
    return shown + (", ..." if len(numbers) > MAX_NAMED else "")


def _file_path(value: object, key: str) -> str:
    """A path value with `~` and environment variables expanded; refuses an empty or non-string one."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"{key}={value!r} is not a file path; set {key} to a JSONL file, e.g. data/train.jsonl")
    return os.path.expandvars(os.path.expanduser(str(value)))


@TASKS.register("jsonl_math")
class JsonlMathTask:
    """Question/answer pairs read from JSONL; train/test from `test_path` or a hash of the question."""

    def __init__(
        self,
        path: str,
        test_path: str | None = None,
        question_key: str = "question",
        answer_key: str = "answer",
        test_fraction: float = 0.1,
        seed: int = 0,
    ):
        if (
            isinstance(test_fraction, bool)
            or not isinstance(test_fraction, (int, float))
            or not 0.0 <= test_fraction <= 1.0  # NaN and inf fail this too
        ):
            raise ConfigError(
                f"task.test_fraction={test_fraction!r} is not in [0, 1]; it is the share of the problems held out "
                "for testing, e.g. 0.1 (1 holds out every problem, to evaluate on the whole file)"
            )
        for key, value in (("question_key", question_key), ("answer_key", answer_key)):
            if not isinstance(value, str) or not value:
                raise ConfigError(
                    f"task.{key}={value!r} must be the name of a key of the JSON objects, e.g. 'question'"
                )
        if question_key == answer_key:
            raise ConfigError(
                f"task.question_key and task.answer_key are both {question_key!r}; name two different keys of the objects"
            )
        self.path = _file_path(path, "task.path")
        self.test_path = None if test_path is None else _file_path(test_path, "task.test_path")
        self.question_key = question_key
        self.answer_key = answer_key
        self.test_fraction = float(test_fraction)
        self.seed = seed
        self.stats: dict = {"total_lines": 0, "loaded": 0, "malformed": 0, "malformed_examples": []}
        self._splits: dict[str, list[Problem]] = {"train": [], "test": []}

        if self.test_path is None:
            for problem in self._read(self.path, "task.path", split=None):
                self._splits[problem.meta["split"]].append(problem)
        else:
            self._splits["train"] = self._read(self.path, "task.path", split="train")
            self._splits["test"] = self._read(self.test_path, "task.test_path", split="test")
        self._check_splits()

    # -- reading ----------------------------------------------------------------------------
    def _read(self, path: str, config_key: str, split: str | None) -> list[Problem]:
        """The usable problems of one file; refuses a file that cannot be used (see the module doc)."""
        if os.path.isdir(path):
            raise ConfigError(f"{config_key}={path!r} is a directory; set {config_key} to a JSONL file in it")
        if not os.path.isfile(path):
            raise ConfigError(
                f"{config_key}: no such file {path!r} (working directory {os.getcwd()!r}); "
                f"set {config_key} to a JSONL file with one {{{self.question_key!r}: ..., {self.answer_key!r}: ...}} per line"
            )
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"{config_key}: cannot read {path!r} ({e.strerror}); check its permissions") from None
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise ConfigError(
                f"{config_key}: {path!r} is UTF-16 (it starts with a UTF-16 byte-order mark); "
                f"re-encode it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8 {path} > fixed.jsonl"
            )
        if data.startswith(_BOM):
            data = data[len(_BOM) :]

        tag = "" if self.test_path is None else f"[{config_key}] "
        lines = 0  # non-blank lines, the undecodable ones included
        not_utf8: list[int] = []
        keys_seen: Counter[str] = Counter()  # keys of the JSON objects, for a wrong question_key / answer_key
        skipped: list[tuple[int, str]] = []
        out: list[Problem] = []
        for line_no, raw in enumerate(data.splitlines(), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                lines += 1
                not_utf8.append(line_no)
                continue
            if not line.strip():
                continue  # blank lines are not counted
            lines += 1
            problem, reason, record = self._parse(line, line_no, path, split)
            if isinstance(record, dict):
                keys_seen.update(map(str, record))
            if problem is None:
                skipped.append((line_no, reason))
            else:
                out.append(problem)

        if lines == 0:
            raise ConfigError(
                f"{config_key}: {path!r} is empty; give a JSONL file with one "
                f"{{{self.question_key!r}: ..., {self.answer_key!r}: ...}} object per line"
            )
        if not_utf8:
            raise ConfigError(
                f"{config_key}: {len(not_utf8)} of {lines} lines of {path!r} are not UTF-8 "
                f"(line{'s' if len(not_utf8) > 1 else ''} {_line_numbers(not_utf8)}); re-encode the file as UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8) or drop those lines"
            )
        for key, value, other, common in (
            ("question_key", self.question_key, self.answer_key, _QUESTION_KEYS),
            ("answer_key", self.answer_key, self.question_key, _ANSWER_KEYS),
        ):
            if keys_seen and value not in keys_seen:
                present = [k for k, _ in keys_seen.most_common(12)]
                hint = next((k for k in common if k in keys_seen and k != other), None)
                fix = f"set task.{key}={hint}" if hint else f"set task.{key} to the key that holds the {key[:-4]}"
                raise ConfigError(
                    f"task.{key}={value!r} is not a key of {path!r}: its objects have the keys {present}; {fix}"
                )
        if not out:
            why = "; ".join(f"line {no}: {r}" for no, r in skipped[:MAX_EXAMPLES])
            raise ConfigError(
                f"{config_key}: none of the {lines} lines of {path!r} is a usable problem ({why}); each line must be a "
                f"JSON object with a string {self.question_key!r} and a string {self.answer_key!r} that ends in "
                "'#### <answer>' or a \\boxed{...}, or is a one-line answer"
            )
        self.stats["total_lines"] += lines
        self.stats["loaded"] += len(out)
        self.stats["malformed"] += len(skipped)
        room = MAX_EXAMPLES - len(self.stats["malformed_examples"])
        self.stats["malformed_examples"] += [(no, tag + why) for no, why in skipped[: max(room, 0)]]
        return out

    def _parse(self, line: str, line_no: int, path: str, split: str | None) -> tuple[Problem | None, str, object]:
        """(problem or None, the reason when None, the parsed JSON value or None)."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return None, f"bad JSON ({e.msg} at column {e.colno})", None
        except (ValueError, RecursionError) as e:  # a huge integer, nesting too deep
            return None, f"bad JSON ({type(e).__name__}: {str(e)[:60]})", None
        if not isinstance(record, dict):
            return None, f"a JSON {type(record).__name__}, expected an object", record
        for key in (self.question_key, self.answer_key):
            if key not in record:
                present = ", ".join(sorted(map(str, record))) or "none"
                return None, f"missing key {key!r} (keys present: {present})", record
            if not isinstance(record[key], str):
                return None, f"{key!r} is a {type(record[key]).__name__}, expected a string", record
            try:
                record[key].encode("utf-8")
            except UnicodeEncodeError:
                return None, f"{key!r} holds a lone surrogate escape such as \\ud800 (not text)", record
        question = record[self.question_key].strip()
        if not question:
            return None, "empty question", record
        gold, solution, reason = gold_and_solution(record[self.answer_key])
        if gold is None:
            return None, reason, record
        if not is_correct(solution, gold):  # cannot happen for the formats above; guards the contract
            return None, f"solution does not verify against its own answer {gold!r}", record
        side = split or question_split(question, self.test_fraction)
        meta = {"task": "jsonl_math", "split": side, "source": path, "line": line_no}
        return Problem(question=question, answer=gold, solution=solution, meta=meta), "", record

    def _check_splits(self) -> None:
        """Refuse an empty test split, and an empty train split unless test_fraction=1 asked for it."""
        n = len(self._splits["train"]) + len(self._splits["test"])
        if self.test_path is not None:
            return  # each file was checked to hold a usable problem
        if not self._splits["test"]:
            raise ConfigError(
                f"task.test_fraction={self.test_fraction:g} puts none of the {n} problems of {self.path!r} in the test "
                "split, which evaluation uses (eval.split: test); raise task.test_fraction (e.g. 0.1) or give a "
                "held-out file as task.test_path"
            )
        if not self._splits["train"] and self.test_fraction < 1.0:
            raise ConfigError(
                f"task.test_fraction={self.test_fraction:g} puts all {n} problems of {self.path!r} in the test split; "
                "lower task.test_fraction (e.g. 0.1) to train on this file, or set it to 1 to only evaluate on it"
            )

    # -- task interface ---------------------------------------------------------------------
    def _split(self, split: str) -> list[Problem]:
        check_split(split)
        items = self._splits[split]
        if not items:  # only the train split of test_fraction=1 (see _check_splits)
            raise ConfigError(
                f"the train split of {self.path!r} is empty: task.test_fraction=1 holds out every problem; "
                "lower task.test_fraction (e.g. 0.1) or give a training file as task.path and this one as task.test_path"
            )
        return items

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        """`n` distinct problems of a split (all of them, in file order, when n is None); more than the
        split holds returns the whole split with a one-line note."""
        check_n(n)
        items = self._split(split)
        if n is None:
            return list(items)
        what = f"the {split} split of {self.path}"
        return draw(items, n, random.Random(f"jsonl_math:{self.seed}:{split}:{seed}"), what)

    def sample_train(self, rng: random.Random) -> Problem:
        """One training problem drawn with `rng` (with replacement), for streaming data."""
        return rng.choice(self._split("train"))

    def reward(self, problem: Problem, completion: str) -> float:
        return 1.0 if is_correct(completion, problem.answer) else 0.0

    def vocabulary(self) -> list[str]:
        """Every piece of every question and solution as the word tokenizer splits them (`pre_tokenize`:
        letter runs, single digits, single symbols, single whitespace characters), sorted."""
        problems = self._splits["train"] + self._splits["test"]
        return sorted(text_pieces(text for p in problems for text in (p.question, p.solution)))

    def texts(self, n: int = 2000) -> list[str]:
        """Questions and solutions of up to `n` problems of both splits (a fixed sample), for a coverage check."""
        everything = self._splits["train"] + self._splits["test"]
        if len(everything) > n:
            everything = random.Random(f"jsonl_math:texts:{self.seed}").sample(everything, n)
        return [text for p in everything for text in (p.question, p.solution)]

    def summary(self) -> str:
        s = self.stats
        text = (
            f"loaded {s['loaded']} of {s['total_lines']} lines "
            f"(train {len(self._splits['train'])}, test {len(self._splits['test'])}), "
            f"skipped {s['malformed']} malformed"
        )
        if s["malformed_examples"]:
            text += ": " + "; ".join(f"line {no}: {why}" for no, why in s["malformed_examples"])
            if s["malformed"] > len(s["malformed_examples"]):
                text += "; ..."
        return text

    def __repr__(self) -> str:
        return f"JsonlMathTask(path={self.path!r}, test_path={self.test_path!r}, {self.summary()})"
