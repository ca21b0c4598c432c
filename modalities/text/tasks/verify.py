r"""Math answer verifier for GSM8K / MATH style completions: find the final answer, let HF's `math-verify` compare it.

Extraction (`extract_answer`, ours: math-verify has no `####`, reads `2 1/2` as 1 and `−5` as nothing), first rule
that applies; a Unicode minus (U+2212) reads as `-` everywhere:
  1. the text after the last `####`, up to the end of that line (GSM8K's format; an empty one is no answer);
  2. the content of the last `\boxed{...}` / `\fbox{...}` (balanced braces, nesting allowed, linear time);
  3. the last "answer is X" / "answer: X" phrase, up to the end of its sentence (its last `$...$` if it has one,
     its last number if it is prose such as "that she has 5 apples");
  4. the last number (`-3`, `1,234`, `118 000`, `2 1/2`), or the last `$...$` / `\(...\)` / `\[...\]` span when it
     holds that number or comes after it.

Comparison (`answers_match`): both answers are tidied (an outer `\boxed{}`, `$`, a trailing `.`, a leading `+`,
thousands `1,234` / `118 000`, the mixed number `2 1/2` -> `\frac{5}{2}`, unit words after a number `5 dollars`, a
plain-word answer `Monday` -> `\text{Monday}`), then `math_verify.parse` + `math_verify.verify` decide: symbolic
equivalence, `\sqrt2` = `\sqrt{2}`, `\frac{1}{\sqrt{2}}` = `\frac{\sqrt{2}}{2}`, `5` = `x=5`, unordered sets and
lists, intervals, matrices, percent, degrees, `4\frac{2}{3}` = 14/3, `\text{(C)}` = `C`. Ours on top:
  - a plain-number gold needs a number (`12 + 3`, `96/8`, `\log_2 64`, `\binom{8}{2}` are the question, not its
    value: without this rule a policy could copy an arithmetic question and be rewarded);
  - integers, fractions and decimals (<= 6 places) are compared exactly without sympy, and two constants whose
    values differ beyond math-verify's 6-decimal rounding are refused before its `simplify` (tests check that both
    give math-verify's own verdict). Most GSM8K rewards never reach sympy.

Time bound: every math-verify parse and comparison runs under math-verify's own timeout (`TIMEOUT_S`, whole
seconds, `signal.alarm`, so main thread only; in other threads no timeout can apply and only the length cap does);
answers longer than `MAX_ANSWER_CHARS` are wrong without parsing. Any string gives True or False, never an error.

    python -c "from mmdistill.modalities.text.tasks.verify import is_correct; print(is_correct(r'so \boxed{\frac{1}{2}}', '0.5'))"
"""

from __future__ import annotations

import functools
import re
import threading
from fractions import Fraction

import sympy
from math_verify import LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException
from math_verify.utils import timeout as mv_timeout
from sympy.core.relational import Relational

TIMEOUT_S = 1  # math-verify's timeout for one parse and for one comparison (signal.alarm takes whole seconds)
MAX_ANSWER_CHARS = 500  # longer final answers are wrong without parsing (MATH's longest answers are ~100 chars)

_MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})  # minus sign, small and full-width hyphen-minus

# -- extraction ---------------------------------------------------------------------------------------------------

# A number as written in prose: -12, 1,234, 118 000, 3.5, .5, 3/4, 2 1/2. The look-behind keeps "12-4" from
# reading as "-4" and "x2" from reading as "2".
_NUMBER = re.compile(
    r"(?<![\w.^])(?<!\^\{)-?(?:"
    r"\d+[ \t]+\d+/\d+(?![\d/])"  # mixed number: 2 1/2
    r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)"  # 1,234.5
    r"|\d{1,3}(?:[ \t]\d{3})+(?:\.\d+)?(?![\w/-])"  # 118 000
    r"|\d+(?:\.\d+)?(?:/\d+)?|\.\d+"
    r")"
)
_MINUS_DOLLAR = re.compile(r"(?<![\w)}])-\s?\$(?=\d)")  # "-$150" is -150 dollars
_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BARE_BOX_ARG = re.compile(r"[^\s$]+")  # MATH sometimes writes `\boxed 5`
_MATH_DELIM = re.compile(r"\\\\|\\\$|\$\$|\$|\\\(|\\\)|\\\[|\\\]")
_MATH_CLOSE = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}
_PHRASE = re.compile(r"\banswer\b(?:\s+(?:is|should be|would be|will be|must be)\b|\s*[:=])[\s:]*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")
_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_MATH_WORDS = frozenset({"pi", "sqrt", "frac", "infty", "infinity", "inf", "and", "or"})


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each balanced `{` -> index of its `}`, in one pass (escaped `\\{` / `\\}` are not braces)."""
    match: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            match[stack.pop()] = i
        i += 1
    return match


def last_boxed(text: str) -> str | None:
    r"""Content of the last well-formed `\boxed{...}` or `\fbox{...}` in `text`, else None (linear time)."""
    boxes = [m.end() for m in _BOX.finditer(text)]
    if not boxes:
        return None
    braces = _matching_braces(text)
    for end in reversed(boxes):
        i = end
        while i < len(text) and text[i] == " ":
            i += 1
        if i >= len(text):
            continue
        if text[i] == "{":
            if i in braces:
                return text[i + 1 : braces[i]]
            continue
        bare = _BARE_BOX_ARG.match(text, i)
        if bare:
            return bare.group(0)
    return None


def _math_spans(text: str) -> list[tuple[int, int, int, int]]:
    """(start, inner start, inner end, end) of each `$..$`, `$$..$$`, `\\(..\\)`, `\\[..\\]` span, in one pass."""
    spans: list[tuple[int, int, int, int]] = []
    opener, start, inner = None, 0, 0
    for m in _MATH_DELIM.finditer(text):
        tok = m.group()
        if tok in ("\\\\", "\\$"):
            continue
        if opener is None:
            if tok in _MATH_CLOSE:
                opener, start, inner = tok, m.start(), m.end()
        elif tok == _MATH_CLOSE[opener]:
            if opener == "$" and "\n" in text[inner : m.start()]:  # inline math ends at its line: reopen here
                start, inner = m.start(), m.end()
                continue
            spans.append((start, inner, m.start(), m.end()))
            opener = None
    return spans


def _last_number_or_math(text: str) -> str | None:
    """The last number in `text`, or the last math span's content when it holds that number or comes after it."""
    last_number = None
    for last_number in _NUMBER.finditer(text):  # keep the last match
        pass
    spans = [s for s in _math_spans(text) if text[s[1] : s[2]].strip()]
    if spans and (last_number is None or spans[-1][3] > last_number.start()):
        _, inner_start, inner_end, _ = spans[-1]
        return text[inner_start:inner_end].strip()
    return last_number.group(0) if last_number else None


def _answer_phrase(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" up to the end of its sentence, refined (see module doc)."""
    last = None
    for last in _PHRASE.finditer(text):  # keep the last match
        pass
    if last is None:
        return None
    rest = text[last.end() :]
    end = _SENTENCE_END.search(rest)
    content = (rest[: end.start()] if end else rest).strip().strip("*").strip()
    if not content:
        return None
    spans = [s for s in _math_spans(content) if content[s[1] : s[2]].strip()]
    if spans:
        return content[spans[-1][1] : spans[-1][2]].strip()
    prose = any(w.group().lower() not in _MATH_WORDS for w in _PROSE_WORD.finditer(content))
    if prose and re.search(r"\d", content):  # "that she has 5 apples" -> 5
        return _last_number_or_math(content)
    return content


def extract_answer(text: str) -> str | None:
    r"""The final answer written in `text` (raw, not normalised), or None if there is none.

    `####` wins over `\boxed{}`, which wins over an "answer is" phrase, which wins over the last number / math
    span. A `####` followed by nothing on its line is a committed-but-empty answer and returns None.
    """
    if not isinstance(text, str):
        return None
    text = _MINUS_DOLLAR.sub("-", text.translate(_MINUS))
    marker = text.rfind("####")
    if marker != -1:
        answer = text[marker + 4 :].split("\n", 1)[0].strip()
        return answer or None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    phrase = _answer_phrase(text)
    if phrase is not None:
        return phrase
    return _last_number_or_math(text)


# -- comparison ---------------------------------------------------------------------------------------------------

_DOLLAR = re.compile(r"(?<!\\)\$")
_INT = re.compile(r"-?\d+")
_DIVISION = re.compile(r"/|\\[dt]?frac")
_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}")
_RATIONAL = re.compile(
    r"(-?)(?:(\d+(?:\.\d{1,6})?|\.\d{1,6})(?:/(\d+))?|\\[dt]?frac\{(-?\d+)\}\{(\d+)\}|\\[dt]?frac(\d)(\d))"
)
_COMMA_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SPACE_THOUSANDS = re.compile(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_MIXED = re.compile(r"(-?)(\d+)\s+(\d+)/(\d+)")
_NUMBER_THEN_WORDS = re.compile(
    r"(?P<num>[-\d.,/ ]*\d)\s+(?P<words>[A-Za-z]{2,}(?:[\s./]+[A-Za-z]+)*\.?(?:\^\{?\d\}?)?)"
)
_UNIT_KEEP = frozenset({"percent", "percentage", "pct", "pi", "sqrt", "degree", "degrees"})  # math-verify reads these
_WORDS = re.compile(r"[A-Za-z]+(?:[ '\-][A-Za-z]+)*")
# A number written out, as a plain-number gold needs its answer to be: `5`, `-3.5`, `3/4`, `\frac{3}{4}`,
# `4\frac{2}{3}`, `32,\!348`, `2\times 10^{3}`, with `x =`, `\$`, `\%`, `^\circ`, `\text{ cents}` around it.
_DIGITS = r"(?:\d+(?:(?:,|\\,|\{,\}|,\\!|\\!|\\ )\d{3})*(?:\.\d*)?|\.\d+)"
_NUMERIC_ANSWER = re.compile(
    r"(?:[A-Za-z]\w*\s*=\s*)?[-+]?\s*(?:\\?\$\s*)?[-+]?\s*(?:"
    r"\d+\s*\\[dt]?frac(?:\{\d+\}\{\d+\}|\d\d)"
    rf"|\\[dt]?frac(?:\{{\s*-?{_DIGITS}\s*\}}\{{\s*{_DIGITS}\s*\}}|\d\d)"
    rf"|{_DIGITS}(?:\s*/\s*{_DIGITS})?(?:\s*(?:\\times|\\cdot|\*|×)\s*10\s*\^\s*(?:\{{\s*-?\d+\s*\}}|-?\d))?"
    r")(?:\s*(?:\\?%|\^\s*\{?\s*\\circ\s*\}?|\\(?:text|mbox|mathrm)\s*\{[^{}]*\}(?:\^\{?\d\}?)?))*"
)
_PERCENT = re.compile(r"(.*?)\s*\\?%", re.DOTALL)
_PERCENT_WORD = re.compile(r"%|percent|pct", re.IGNORECASE)  # math-verify equates 9% with 9: no numeric shortcut
_LATEX_ONLY = [LatexExtractionConfig(boxed_match_priority=0)]


def _unbox(s: str) -> str:
    """`s` without whole-string `\\boxed{...}` wrappers (`"\\boxed{5}"` -> `"5"`, `"\\boxed 5"` -> `"5"`)."""
    while True:
        m = _BOX.match(s)
        if m is None:
            return s
        i = m.end()
        while i < len(s) and s[i] == " ":
            i += 1
        if i < len(s) and s[i] != "{" and _BARE_BOX_ARG.fullmatch(s, i):
            return s[i:]
        if i >= len(s) or _matching_braces(s).get(i) != len(s) - 1:
            return s
        s = s[i + 1 : -1].strip()


def _tidy(s: str) -> str:
    """One answer in the notation math-verify reads best (see the module doc); "" when nothing is left."""
    s = _unbox(s.translate(_MINUS).strip())
    s = _DOLLAR.sub("", s).strip()
    while s.endswith("."):
        s = s[:-1].rstrip()
    if s.startswith("+") and s[1:].lstrip()[:1].isdigit():
        s = s[1:].lstrip()
    unit = _NUMBER_THEN_WORDS.fullmatch(s)  # "5 dollars" -> "5" (math-verify reads "dollars" as a product)
    if unit and not _UNIT_KEEP & set(unit.group("words").lower().replace(".", " ").split()):
        s = unit.group("num").strip()
    if _COMMA_THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    elif _SPACE_THOUSANDS.fullmatch(s):
        s = s.replace(" ", "")
    mixed = _MIXED.fullmatch(s)  # "2 1/2" is two and a half (math-verify reads 2 * 1/2)
    if mixed and int(mixed.group(4)) != 0:
        sign, whole, num, den = mixed.group(1), *(int(g) for g in mixed.groups()[1:])
        s = f"{sign}\\frac{{{whole * den + num}}}{{{den}}}"
    if _WORDS.fullmatch(s) and any(len(w) > 2 for w in re.split(r"[ '\-]", s)) and s.lower() not in _MATH_WORDS:
        s = f"\\text{{{s}}}"  # "Monday": one word, not the product M*o*n*d*a*y
    return s


def _exact(s: str) -> tuple[Fraction, str] | None:
    """(value, "int" / "decimal" / "fraction") of `12`, `-7.5`, `3/4`, `\\frac{-3}{4}`, `\\frac34`; None otherwise.

    Decimals have at most 6 places: math-verify rounds floats to 6 places, so between two decimals (or a decimal
    and an integer) exact equality is its verdict too, as it is between fractions and integers; a decimal against a
    fraction (0.333333 vs 1/3) is left to it."""
    m = _RATIONAL.fullmatch(s)
    if m is None:
        return None
    sign, num, den = m.group(1), m.group(2) or m.group(4) or m.group(6), m.group(3) or m.group(5) or m.group(7)
    if den is not None and int(den) == 0:
        return None
    value = Fraction(num) / int(den or 1)
    kind = "fraction" if den is not None else "decimal" if "." in num else "int"
    return (-value if sign else value), kind


def _timeout() -> int | None:
    """math-verify's timeout here: TIMEOUT_S in the main thread; None elsewhere (signal.alarm works only there)."""
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parsed(s: str, timeout: int | None) -> tuple:
    """math-verify's parse of one tidied answer: (sympy object, string) or (string,) or ()."""
    body, percent = s, ""
    m = _PERCENT.fullmatch(s)
    if m:  # math-verify reads a percent sign after the math, not inside it
        body, percent = m.group(1), "\\%"
    if body.endswith("\\"):  # `\$$` would not close the math
        body += " "
    return tuple(parse(f"$${body}$$" + percent, _LATEX_ONLY, fallback_mode="first_match", parsing_timeout=timeout))


def _numbers_differ(gold: object, pred: object, timeout: int | None) -> bool:
    """True when gold and pred are constant expressions whose values differ by more than math-verify's rounding
    (6 decimals) could hide: then no strategy of math-verify can call them equal, and its `simplify` is skipped."""
    kinds = (Relational, sympy.Set, sympy.Tuple, sympy.Symbol)
    if not all(isinstance(x, sympy.Expr) and not isinstance(x, kinds) and not x.free_symbols for x in (gold, pred)):
        return False

    def differ() -> bool:
        a, b = complex(gold.evalf(30)), complex(pred.evalf(30))
        return abs(a - b) > 1e-6 * (1 + abs(a))  # nan compares False: left to math-verify

    try:
        return mv_timeout(timeout)(differ)()
    except (Exception, TimeoutException):
        return False


def answers_match(pred: str | None, gold: str | None) -> bool:
    """True when the predicted final answer equals the gold one (math-verify's symbolic equivalence, see above)."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    p, g = _tidy(pred), _tidy(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    if _NUMERIC_ANSWER.fullmatch(g) and not _NUMERIC_ANSWER.fullmatch(p):
        return False  # `12 + 3`, `\log_2 8`, `\binom{8}{2}`: the question, not its value
    if _INT.fullmatch(g) and _DIVISION.search(_TEXT.sub("", p)):
        return False  # `96/8` for 12: a division left to do
    exact_p, exact_g = _exact(p), _exact(g)
    if exact_p and exact_g and {exact_p[1], exact_g[1]} != {"decimal", "fraction"}:
        return exact_p[0] == exact_g[0]  # what math-verify decides for these, without sympy
    timeout = _timeout()
    try:
        gold_parsed, pred_parsed = _parsed(g, timeout), _parsed(p, timeout)
        if not gold_parsed or not pred_parsed:
            return False
        if not _PERCENT_WORD.search(g + p) and _numbers_differ(gold_parsed[0], pred_parsed[0], timeout):
            return False  # a fast no for wrong numeric answers (math-verify's `simplify` takes ~20 ms)
        return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=timeout))
    except Exception:  # math-verify catches its own errors; this keeps a reward from ever raising
        return False


def is_correct(completion: str, gold: str) -> bool:
    """True when the final answer extracted from `completion` matches `gold`."""
    return answers_match(extract_answer(completion), gold)
