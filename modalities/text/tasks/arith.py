"""Procedural multi-step arithmetic word problems with a verifiable answer and a worked solution.

An *equation* is the tuple of numbers and operators, e.g. (12, "+", 7, "-", 4); the wording
(name, object, verb) is drawn separately. With difficulty d there are d operations; every operand
is in [1, max_value], the start in [1, max_value], and every running value in [0, max_value * d].

    question: "Ann has 12 apples . She gets 7 more . Then she gives away 4 . How many apples does Ann have ?"
    solution: "12 + 7 = 19 . 19 - 4 = 15 . #### 15"

Train and test are disjoint by equation: a fixed sha256 of the equation decides its side, so the
split is the same in every process, for every seed and every `max_value`. Small equation spaces
are enumerated; large ones are sampled uniformly (exact counting table) and filtered by side.

    python -c "from mmdistill.modalities.text.tasks.arith import ArithTask; t = ArithTask(difficulty=2); print(*t.problems('test', 3), sep='\\n')"
"""

from __future__ import annotations

import hashlib
import random

from mmdistill.errors import ConfigError
from mmdistill.registry import TASKS

from . import SPLITS, Problem, check_n, check_split, draw
from .verify import is_correct

Equation = tuple  # (start, op1, operand1, op2, operand2, ...), ops are "+" / "-"

NAMES = (("Ann", "she"), ("Ben", "he"), ("Cara", "she"), ("Dan", "he"), ("Eve", "she"), ("Finn", "he"))
OBJECTS = (
    ("apple", "apples"),
    ("book", "books"),
    ("coin", "coins"),
    ("marble", "marbles"),
    ("pencil", "pencils"),
    ("sticker", "stickers"),
)
VERBS = {
    "+": ("gets {n} more", "finds {n} more", "buys {n} more"),
    "-": ("gives away {n}", "loses {n}", "sells {n}"),
}
PUNCTUATION = (".", "?", "+", "-", "=", "#")
SUPPORTED_OPS = "".join(VERBS)
MAX_DIFFICULTY = 4
ENUMERATE_LIMIT = 50_000  # equation spaces up to this size are listed in full
_SPLIT_SALT = "mmdistill/arith/split/v1"


def equation_split(equation: Equation, test_fraction: float) -> str:
    """'test' or 'train' for an equation: a stable sha256 of its text, compared with test_fraction."""
    key = _SPLIT_SALT + ":" + " ".join(str(x) for x in equation)
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "test" if u < test_fraction else "train"


def evaluate(equation: Equation) -> list[int]:
    """Running values of an equation: [start, after op 1, ..., final]."""
    values = [equation[0]]
    for i in range(1, len(equation), 2):
        op, n = equation[i], equation[i + 1]
        values.append(values[-1] + n if op == "+" else values[-1] - n)
    return values


@TASKS.register("arith")
class ArithTask:
    """Arithmetic word problems with `difficulty` operations drawn from `ops` ("+", "-")."""

    def __init__(
        self,
        difficulty: int = 1,
        max_value: int = 20,
        ops: str = "+-",
        seed: int = 0,
        test_fraction: float = 0.2,
    ):
        if isinstance(difficulty, bool) or not isinstance(difficulty, int) or not 1 <= difficulty <= MAX_DIFFICULTY:
            raise ConfigError(
                f"task.difficulty={difficulty!r} must be an integer number of operations in 1..{MAX_DIFFICULTY}"
            )
        if isinstance(max_value, bool) or not isinstance(max_value, int) or max_value < 1:
            raise ConfigError(f"task.max_value={max_value!r} must be an integer >= 1 (e.g. 20)")
        if not isinstance(ops, str) or not ops or set(ops) - set(SUPPORTED_OPS):
            raise ConfigError(f"task.ops={ops!r} must be a non-empty string of operators from {SUPPORTED_OPS!r}")
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
            raise ConfigError(f"task.test_fraction={test_fraction!r} must be strictly between 0 and 1 (e.g. 0.2)")
        self.difficulty = difficulty
        self.max_value = max_value
        self.ops = "".join(op for op in SUPPORTED_OPS if op in ops)
        self.seed = seed
        self.test_fraction = float(test_fraction)
        self.cap = max_value * difficulty  # running values stay in [0, cap]

        # ways[k][v]: number of ways to apply k more operations starting from running value v.
        self._ways = self._count_ways()
        self.space_size = sum(self._ways[difficulty][a] for a in range(1, max_value + 1))
        if self.space_size == 0:
            raise ConfigError(
                f"no equation fits difficulty={difficulty}, max_value={max_value}, ops={ops!r} "
                f"(running values must stay in [0, {self.cap}]); raise task.max_value or add '-' to task.ops"
            )
        self._enumerated: dict[str, list[Equation]] | None = None
        if self.space_size <= ENUMERATE_LIMIT:
            sides: dict[str, list[Equation]] = {"train": [], "test": []}
            for eq in self.all_equations():
                sides[equation_split(eq, self.test_fraction)].append(eq)
            self._enumerated = sides

    # -- equation space ---------------------------------------------------------------------
    def _moves(self, value: int) -> list[tuple[str, int, int]]:
        """Every (op, operand, new value) allowed from a running value."""
        moves = []
        for op in self.ops:
            top = min(self.max_value, self.cap - value) if op == "+" else min(self.max_value, value)
            for n in range(1, top + 1):
                moves.append((op, n, value + n if op == "+" else value - n))
        return moves

    def _count_ways(self) -> list[list[int]]:
        cap, m = self.cap, self.max_value
        ways = [[1] * (cap + 1)]
        for _ in range(self.difficulty):
            prev = ways[-1]
            prefix = [0]
            for w in prev:
                prefix.append(prefix[-1] + w)
            row = []
            for v in range(cap + 1):
                total = 0
                if "+" in self.ops:
                    hi = min(m, cap - v)  # new values v+1 .. v+hi
                    total += prefix[v + hi + 1] - prefix[v + 1]
                if "-" in self.ops:
                    lo = min(m, v)  # new values v-lo .. v-1
                    total += prefix[v] - prefix[v - lo]
                row.append(total)
            ways.append(row)
        return ways

    def all_equations(self) -> list[Equation]:
        """Every equation of this configuration, both splits, in a fixed order."""
        if self.space_size > ENUMERATE_LIMIT * 20:
            raise ConfigError(f"{self.space_size} equations are too many to list; use problems(split, n)")
        out: list[Equation] = []

        def extend(eq: tuple, value: int, left: int) -> None:
            if left == 0:
                out.append(eq)
                return
            for op, n, new in self._moves(value):
                if self._ways[left - 1][new]:
                    extend(eq + (op, n), new, left - 1)

        for start in range(1, self.max_value + 1):
            if self._ways[self.difficulty][start]:
                extend((start,), start, self.difficulty)
        return out

    def split_sizes(self) -> dict[str, int] | None:
        """Number of equations on each side, or None when the space is too large to enumerate."""
        if self._enumerated is None:
            return None
        return {side: len(eqs) for side, eqs in self._enumerated.items()}

    def _uniform_equation(self, rng: random.Random) -> Equation:
        """One equation drawn uniformly from the whole space, using the exact counting table."""
        d = self.difficulty
        r = rng.randrange(self.space_size)
        for start in range(1, self.max_value + 1):
            r -= self._ways[d][start]
            if r < 0:
                break
        eq: tuple = (start,)
        value = start
        for left in range(d, 0, -1):
            r = rng.randrange(self._ways[left][value])
            for op, n, new in self._moves(value):
                r -= self._ways[left - 1][new]
                if r < 0:
                    break
            eq += (op, n)
            value = new
        return eq

    def _equation_on(self, side: str, rng: random.Random) -> Equation:
        if self._enumerated is not None:
            return rng.choice(self._enumerated[side])
        while True:  # rejection: about 1 / fraction draws per accepted equation
            eq = self._uniform_equation(rng)
            if equation_split(eq, self.test_fraction) == side:
                return eq

    # -- text -------------------------------------------------------------------------------
    def render(self, equation: Equation, rng: random.Random, split: str = "train") -> Problem:
        """Word the equation as a question and a worked solution, choosing names/verbs with `rng`."""
        name, pronoun = rng.choice(NAMES)
        singular, plural = rng.choice(OBJECTS)
        start = equation[0]
        sentences = [f"{name} has {start} {singular if start == 1 else plural} ."]
        steps = []
        values = evaluate(equation)
        for k, i in enumerate(range(1, len(equation), 2)):
            op, n = equation[i], equation[i + 1]
            subject = pronoun.capitalize() if k == 0 else f"Then {pronoun}"
            sentences.append(f"{subject} {rng.choice(VERBS[op]).format(n=n)} .")
            steps.append(f"{values[k]} {op} {n} = {values[k + 1]} .")
        sentences.append(f"How many {plural} does {name} have ?")
        answer = str(values[-1])
        return Problem(
            question=" ".join(sentences),
            answer=answer,
            solution=" ".join(steps + [f"#### {answer}"]),
            meta={
                "task": "arith",
                "split": split,
                "difficulty": self.difficulty,
                "max_value": self.max_value,
                "equation": tuple(equation),
            },
        )

    # -- task interface ---------------------------------------------------------------------
    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        """`n` distinct problems (equations) from one side of the split, the same ones for the same
        (task seed, seed).

        n larger than an enumerable split returns the whole split, each equation once, with a one-line
        note; n=None returns the whole split (only for enumerable spaces, see `split_sizes()`).
        """
        check_split(split)
        check_n(n)
        rng = random.Random(f"arith:{self.seed}:{split}:{seed}")
        if self._enumerated is not None:
            equations = draw(self._enumerated[split], n, rng, f"the {split} split of {self!r}")
        elif n is None:
            raise ConfigError(
                f"the {split} split of difficulty={self.difficulty}, max_value={self.max_value} has "
                f"about {self._side_size(split)} equations, too many to return in full; pass n (eval.n or --n, e.g. 500)"
            )
        else:
            seen: set = set()
            equations = []
            budget = 50 * n + 1000
            while len(equations) < n:
                budget -= 1
                if budget < 0:
                    raise ConfigError(
                        f"could not draw {n} distinct {split} equations of {self!r}; ask for fewer (e.g. --n {n // 2})"
                    )
                eq = self._equation_on(split, rng)
                if eq not in seen:
                    seen.add(eq)
                    equations.append(eq)
        return [self.render(eq, rng, split) for eq in equations]

    def _side_size(self, split: str) -> int:
        """The number of equations on one side of a space too large to enumerate (its expected value)."""
        share = self.test_fraction if split == "test" else 1 - self.test_fraction
        return round(self.space_size * share)

    def sample_train(self, rng: random.Random) -> Problem:
        """One training problem drawn with `rng` (with replacement), for streaming data."""
        return self.render(self._equation_on("train", rng), rng, "train")

    def reward(self, problem: Problem, completion: str) -> float:
        return 1.0 if is_correct(completion, problem.answer) else 0.0

    def summary(self) -> str:
        """Nothing printed at the start of a run (the task's keys are in the config)."""
        return ""

    def texts(self, n: int = 2000) -> list[str]:
        """Questions and solutions of `n` problems drawn from both sides (a fixed sample), for a coverage check."""
        rng = random.Random(f"arith:texts:{self.seed}")
        problems = [self.render(self._equation_on(side, rng), rng, side) for side in SPLITS for _ in range(n // 2)]
        return [text for p in problems for text in (p.question, p.solution)]

    def vocabulary(self) -> list[str]:
        """Every word of the templates, the digits 0-9 and each punctuation character, sorted."""
        words = {"has", "Then", "How", "many", "does", "have"}
        for name, pronoun in NAMES:
            words.update((name, pronoun, pronoun.capitalize()))
        for singular, plural in OBJECTS:
            words.update((singular, plural))
        for phrases in VERBS.values():
            for phrase in phrases:
                words.update(w for w in phrase.split() if w != "{n}")
        words.update(str(d) for d in range(10))
        words.update(PUNCTUATION)
        return sorted(words)

    def __repr__(self) -> str:
        return (
            f"ArithTask(difficulty={self.difficulty}, max_value={self.max_value}, ops={self.ops!r}, "
            f"seed={self.seed}, test_fraction={self.test_fraction})"
        )
