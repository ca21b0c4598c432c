r"""Math problems from your own JSONL file (GSM8K or MATH style), with a verifiable answer.

One JSON object per line, e.g.

    {"question": "Tom has 3 cats ...", "answer": "He has 3 + 4 = 7 cats.\n#### 7"}       # GSM8K
    {"problem": "Compute ...", "solution": "... so it is $\\boxed{\\frac{1}{2}}$."}         # MATH,
        with question_key="problem", answer_key="solution"
    {"question": "What is 6 * 7?", "answer": "42"}                                          # short answer

The gold answer is `verify.extract_answer` of the answer text (`####`, else the last `\boxed{}`);
an answer text with neither is taken whole when it is one line ("42", "\frac{1}{2}"). The target
`solution` is the answer text, ending with a `#### <answer>` line (appended when missing).
Malformed lines are counted and skipped (see `stats` and `summary()`); they never raise.
Without `test_path`, a fixed sha256 of the question text puts each line in train or test.

    printf '{"question": "1+1?", "answer": "#### 2"}\nnot json\n' > /tmp/q.jsonl
    python -c "from mmdistill.modalities.text.tasks.jsonl_math import JsonlMathTask; print(JsonlMathTask('/tmp/q.jsonl').summary())"
"""

from __future__ import annotations

import hashlib
import json
import os
import random

from mmdistill.registry import TASKS

from . import Problem, check_split, draw
from .verify import extract_answer, is_correct, last_boxed

MAX_EXAMPLES = 5  # malformed lines kept as examples in `stats`
_SPLIT_SALT = "mmdistill/jsonl_math/split/v1"


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
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"task.test_fraction={test_fraction!r} must be in [0, 1) (e.g. 0.1)")
        self.path = str(path)
        self.test_path = None if test_path is None else str(test_path)
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
        if self.stats["loaded"] == 0:
            raise ValueError(
                f"no usable problem in {self.path}"
                + (f" / {self.test_path}" if self.test_path else "")
                + f": {self.summary()}. Check task.question_key={question_key!r} and "
                f"task.answer_key={answer_key!r} against the keys in the file."
            )

    def _read(self, path: str, config_key: str, split: str | None) -> list[Problem]:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{config_key}: no such file {path!r} (working directory {os.getcwd()!r}); "
                f"set {config_key} to a JSONL file with one {{{self.question_key!r}: ..., {self.answer_key!r}: ...}} per line"
            )
        tag = "" if self.test_path is None else f"[{config_key}] "
        out: list[Problem] = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # blank lines are not counted
                self.stats["total_lines"] += 1
                problem, reason = self._parse(line, line_no, path, split)
                if problem is None:
                    self.stats["malformed"] += 1
                    if len(self.stats["malformed_examples"]) < MAX_EXAMPLES:
                        self.stats["malformed_examples"].append((line_no, tag + reason))
                else:
                    self.stats["loaded"] += 1
                    out.append(problem)
        return out

    def _parse(self, line: str, line_no: int, path: str, split: str | None) -> tuple[Problem | None, str]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return None, f"bad JSON ({e.msg} at column {e.colno})"
        if not isinstance(record, dict):
            return None, f"a JSON {type(record).__name__}, expected an object"
        for key in (self.question_key, self.answer_key):
            if key not in record:
                present = ", ".join(sorted(map(str, record))) or "none"
                return None, f"missing key {key!r} (keys present: {present})"
            if not isinstance(record[key], str):
                return None, f"{key!r} is a {type(record[key]).__name__}, expected a string"
        question = record[self.question_key].strip()
        if not question:
            return None, "empty question"
        gold, solution, reason = gold_and_solution(record[self.answer_key])
        if gold is None:
            return None, reason
        if not is_correct(solution, gold):  # cannot happen for the formats above; guards the contract
            return None, f"solution does not verify against its own answer {gold!r}"
        side = split or question_split(question, self.test_fraction)
        meta = {"task": "jsonl_math", "split": side, "source": path, "line": line_no}
        return Problem(question=question, answer=gold, solution=solution, meta=meta), ""

    # -- task interface ---------------------------------------------------------------------
    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        """`n` problems of a split (all of them, in file order, when n is None)."""
        check_split(split)
        items = self._splits[split]
        if n is None:
            return list(items)
        if n > 0 and not items:
            raise ValueError(
                f"the {split} split of {self.path} is empty ({self.summary()}); "
                "raise task.test_fraction or set task.test_path"
            )
        return draw(items, n, random.Random(f"jsonl_math:{self.seed}:{split}:{seed}"))

    def sample_train(self, rng: random.Random) -> Problem:
        """One training problem drawn with `rng` (with replacement), for streaming data."""
        if not self._splits["train"]:
            raise ValueError(f"the train split of {self.path} is empty ({self.summary()})")
        return rng.choice(self._splits["train"])

    def reward(self, problem: Problem, completion: str) -> float:
        return 1.0 if is_correct(completion, problem.answer) else 0.0

    def vocabulary(self) -> list[str]:
        """Whitespace-separated words and single characters of every question and solution, sorted."""
        vocab: set[str] = set()
        for items in self._splits.values():
            for p in items:
                for text in (p.question, p.solution):
                    vocab.update(text.split())
                    vocab.update(c for c in text if not c.isspace())
        return sorted(vocab)

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
