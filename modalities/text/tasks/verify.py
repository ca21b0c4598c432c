r"""Math answer verifier for GSM8K / MATH style completions: extract the final answer, compare it.

Extraction (`extract_answer`), first rule that applies:
  1. the text after the last `####`, up to the end of that line (an empty one counts as no answer);
  2. the content of the last `\boxed{...}` / `\fbox{...}` (balanced braces, nesting allowed);
  3. the last number in the text.

Comparison (`answers_match`): both sides are normalised (`$`, `\text{}`, `\left`/`\right`,
`\dfrac`, spaces, a trailing `.`, a leading `+` are dropped; `1,234` -> `1234` but `1,2,3` stays a
list); if the gold answer is a number (integer, decimal, `a/b`, `\frac{a}{b}`, `50%`), the
prediction must equal it exactly as a `fractions.Fraction`; otherwise the normalised strings must
be equal.

    python -c "from mmdistill.modalities.text.tasks.verify import is_correct; print(is_correct(r'so \boxed{\frac{1}{2}}', '0.5'))"
"""

from __future__ import annotations

import re
from fractions import Fraction

# A number as written in prose: -12, 1,234, 3.5, .5, 3/4. The look-behind keeps "12-4" from
# reading as "-4" and "x2" from reading as "2".
_NUMBER = re.compile(r"(?<![\w.])-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:/\d+)?")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_FRAC_ARG = r"(?:\{([^{}]+)\}|(\d))"
_FRAC = re.compile(r"(-?)\\frac" + _FRAC_ARG + _FRAC_ARG)
_MIXED = re.compile(r"(-?\d+)\s+(\d+)/(\d+)")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\{([^{}]*)\}")
_ASSIGN = re.compile(r"[a-zA-Z]\w*=(.+)")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the `{...}` group opening at text[start] and the index after it; None if unbalanced."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":  # an escaped character (e.g. `\{`) never opens or closes a group
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def _boxed_at(text: str, end_of_command: int) -> str | None:
    """The argument of a `\\boxed` whose name ends at `end_of_command`: `{...}` or one bare token."""
    i = end_of_command
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] == "{":
        group = _braced(text, i)
        return None if group is None else group[0]
    bare = re.match(r"[^\s$]+", text[i:])  # MATH sometimes writes `\boxed 5`
    return bare.group(0) if bare else None


def last_boxed(text: str) -> str | None:
    r"""Content of the last well-formed `\boxed{...}` or `\fbox{...}` in `text`, else None."""
    for m in reversed(list(_BOX.finditer(text))):
        content = _boxed_at(text, m.end())
        if content is not None:
            return content
    return None


def extract_answer(text: str) -> str | None:
    r"""The final answer written in `text` (raw, not normalised), or None if there is none.

    `####` wins over `\boxed{}`, which wins over the last number. A `####` followed by nothing
    on its line is a committed-but-empty answer and returns None.
    """
    if text is None:
        return None
    marker = text.rfind("####")
    if marker != -1:
        answer = text[marker + 4 :].split("\n", 1)[0].strip()
        return answer or None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _clean(s: str) -> str:
    """Normalise the notation of an answer but keep its spaces (see `normalize`)."""
    s = s.strip()
    while True:  # a whole-string \boxed{...} (e.g. "#### \boxed{5}") is unwrapped
        m = _BOX.match(s)
        inner = _boxed_at(s, m.end()) if m else None
        if inner is None:
            break
        s = inner.strip()
    s = s.replace("$", "")
    while True:
        unwrapped = _TEXT_CMD.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\[!,;: ]", "", s)
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    s = s.replace("\\%", "%")
    s = s.strip()
    while s.endswith(".") or s.endswith(" "):
        s = s[:-1]
    while s.startswith("+"):
        s = s[1:].lstrip()
    return s


def normalize(s: str) -> str:
    r"""Canonical string form of an answer: notation cleaned, all whitespace removed."""
    return re.sub(r"\s+", "", _clean(s))


def to_number(s: str) -> Fraction | None:
    r"""Exact value of a numeric answer (`-3`, `1,234`, `0.5`, `3/4`, `\frac{3}{4}`, `50%`), else None."""
    s = _clean(s)
    mixed = _MIXED.fullmatch(s)  # "1 1/2" is one and a half, not 11/2
    if mixed:
        whole, num, den = (int(g) for g in mixed.groups())
        if den == 0:
            return None
        part = Fraction(num, den)
        return whole - part if mixed.group(1).startswith("-") else whole + part
    s = re.sub(r"\s+", "", s)
    if s.endswith("%"):
        s = s[:-1]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not s or not re.search(r"\d", s):
        return None
    frac = _FRAC.fullmatch(s)
    if frac:
        sign, num_braced, num_digit, den_braced, den_digit = frac.groups()
        num = to_number(num_braced if num_braced is not None else num_digit)
        den = to_number(den_braced if den_braced is not None else den_digit)
        if num is None or den is None or den == 0:
            return None
        value = num / den
        return -value if sign else value
    if re.fullmatch(r"[-+0-9./eE]+", s) is None:  # Fraction() also accepts "1_000", "nan", ...
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _lone_number(pred: str) -> Fraction | None:
    """The value of the only number in `pred` ("15 apples" -> 15); None if there are 0 or several."""
    numbers = _NUMBER.findall(_clean(pred))
    return to_number(numbers[0]) if len(numbers) == 1 else None


def answers_match(pred: str | None, gold: str) -> bool:
    """True when the predicted answer equals the gold one (numerically if gold is a number)."""
    if pred is None or gold is None:
        return False
    gold_norm, pred_norm = normalize(gold), normalize(pred)
    if not gold_norm or not pred_norm:
        return False
    gold_value = to_number(gold)
    if gold_value is not None:
        pred_value = to_number(pred)
        if pred_value is None:
            assigned = _ASSIGN.fullmatch(pred_norm)  # "x = 5"
            if assigned:
                pred_value = to_number(assigned.group(1))
        if pred_value is None:
            pred_value = _lone_number(pred)
        return pred_value is not None and pred_value == gold_value
    return pred_norm == gold_norm


def is_correct(completion: str, gold: str) -> bool:
    """True when the final answer extracted from `completion` matches `gold`."""
    return answers_match(extract_answer(completion), gold)
