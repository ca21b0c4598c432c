"""Offline word- and character-level tokenizers for tiny demo models, saved as standard HF tokenizers,
and the coverage check that tells how much of a task a tokenizer can read.

Word level: words and '####' are single tokens, digits and punctuation one
character each, spaces are kept as tokens so decoding is lossless.  The vocabulary
is split by the tokenizer's own pre-tokenizer (`pre_tokenize`), so a word written
next to punctuation ("cats.") is the token "cats" plus ".", exactly as text is
tokenized.  Character level: one token per printable ASCII character (plus newline
and tab), so a char-level teacher and a word-level student have different
tokenizers (X-Token cross-tokenizer distillation).  Both are a
`PreTrainedTokenizerFast` with the special tokens <pad>, <eos>, <unk>, <bos> that
`AutoTokenizer.from_pretrained` loads back.

`unk_coverage(tokenizer, texts)` counts the words of a task that a tokenizer maps to
<unk> (a model can neither read nor write them); `report_coverage` prints it in one
line and warns above `UNK_WARN`.

    python -c "from mmdistill.modalities.text.tokenizer import build_word_tokenizer; print(build_word_tokenizer(['Ann','has']).tokenize('Ann has 12'))"
    python -c "from mmdistill.modalities.text.tokenizer import build_char_tokenizer; print(build_char_tokenizer().tokenize('Ann has 12'))"
"""

from __future__ import annotations

import string
import sys
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>", "<bos>"]
PATTERN = r"####|[A-Za-z]+|\d|\s|[^\sA-Za-z\d]"
CHAR_PATTERN = r"[\s\S]"  # every character alone, newlines included
UNK_WARN = 0.01  # warn when more than this fraction of a task's words are <unk>
_SYMBOLS = frozenset([*string.digits, *string.punctuation, "####"])  # not words: base tokens of the offline tokenizers

_WORD_PRE_TOKENIZER = pre_tokenizers.Split(Regex(PATTERN), behavior="isolated")
_REPORTED: dict[tuple[int, int], weakref.ref] = {}  # (id(tokenizer), hash(texts)) already reported


def pre_tokenize(text: str) -> list[str]:
    """`text` split exactly as the word tokenizer splits it before the vocabulary lookup:
    letter runs, '####', single digits, single whitespace and single other characters."""
    return [piece for piece, _ in _WORD_PRE_TOKENIZER.pre_tokenize_str(text)]


def text_pieces(texts: Iterable[str]) -> set[str]:
    """Every distinct piece `pre_tokenize` makes of `texts` (the vocabulary a word tokenizer needs).

    Fast on large corpora: no piece of the pattern spans a whitespace character, so each distinct
    whitespace-free chunk is pre-tokenized once, and each whitespace character is a piece of its own.
    """
    chunks: set[str] = set()
    chars: set[str] = set()
    for text in texts:
        chunks.update(text.split())
        chars.update(text)
    pieces = {piece for piece, _ in _WORD_PRE_TOKENIZER.pre_tokenize_str(" ".join(chunks))}
    return (pieces - {" "}) | {c for c in chars if c.isspace()}


def _word_level(vocab_list: list[str], pattern: str, chat_template: str | None) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer over `vocab_list`, pre-split by `pattern`, left padding."""
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )
    tok.padding_side = "left"
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def build_word_tokenizer(words: Iterable[str], chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer over `words` plus every printable ASCII character, built without downloads.

    Each word is split by `pre_tokenize` first, so a vocabulary entry is always a whole token:
    "cats." adds "cats" (and "." is in the base set); a word that is already one token is kept as is.
    """
    base = list(string.digits + string.ascii_letters + string.punctuation) + [" ", "\n", "####"]
    return _word_level(SPECIALS + base + sorted(text_pieces(words)), PATTERN, chat_template)


def build_char_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character: printable ASCII, newline and tab; others are <unk>."""
    chars = list(string.digits + string.ascii_letters + string.punctuation) + [" ", "\n", "\t"]
    return _word_level(SPECIALS + chars, CHAR_PATTERN, chat_template)


# ---------------------------------------------------------------------- coverage


@dataclass(frozen=True)
class Coverage:
    """How much of some texts a tokenizer can spell: `unk` of `total` words (or tokens) are <unk>."""

    unit: str  # "words" (see `unk_coverage`); "tokens" for a tokenizer without offsets
    total: int
    unk: int
    texts: int
    examples: tuple[str, ...]  # the most frequent pieces of text that became <unk>, most frequent first

    @property
    def unk_fraction(self) -> float:
        return self.unk / self.total if self.total else 0.0


def unk_coverage(tokenizer: Any, texts: list[str], examples: int = 5) -> Coverage | None:
    """The words of `texts` that `tokenizer` maps (at least partly) to its <unk> token.

    A word is a piece of `pre_tokenize` other than whitespace, an ASCII digit, ASCII punctuation or
    '####' (base tokens of every offline tokenizer): a letter run, or a non-ASCII character such as
    'é', '中' or '√'; so the count means the same for every tokenizer. Each distinct whitespace-free
    chunk of the texts is tokenized once and weighted by its count (fast on large corpora); a
    tokenizer without character offsets (a slow one) is measured in tokens. None when the tokenizer
    has no <unk> token (byte-level BPE spells anything).
    """
    unk_id = tokenizer.unk_token_id
    if unk_id is None:
        return None
    texts = [t for t in texts if t]
    chunks = Counter(chunk for text in texts for chunk in text.split())
    if not chunks:
        return Coverage("words", 0, 0, len(texts), ())
    unique = list(chunks)
    if not tokenizer.is_fast:
        ids = tokenizer(unique, add_special_tokens=False)["input_ids"]
        total = sum(chunks[c] * len(row) for c, row in zip(unique, ids))
        unk = sum(chunks[c] * row.count(unk_id) for c, row in zip(unique, ids))
        return Coverage("tokens", total, unk, len(texts), ())
    encodings = tokenizer.backend_tokenizer.encode_batch(unique, add_special_tokens=False)
    # the chunks joined by single spaces are pre-tokenized in one call; offsets map pieces back to chunks
    starts, unk_chars, pos = [], set(), 0
    for chunk, enc in zip(unique, encodings):
        starts.append(pos)
        unk_chars.update(pos + i for t, (a, b) in zip(enc.ids, enc.offsets) if t == unk_id for i in range(a, b))
        pos += len(chunk) + 1
    total = unk = 0
    unknown: Counter[str] = Counter()
    k = 0
    for piece, (a, b) in _WORD_PRE_TOKENIZER.pre_tokenize_str(" ".join(unique)):
        if piece.isspace() or piece in _SYMBOLS:
            continue
        while k + 1 < len(starts) and starts[k + 1] <= a:
            k += 1
        count = chunks[unique[k]]
        total += count
        if unk_chars and any(i in unk_chars for i in range(a, b)):
            unk += count
            unknown[piece] += count
    return Coverage("words", total, unk, len(texts), tuple(w for w, _ in unknown.most_common(examples)))


def report_coverage(tokenizer: Any, texts: list[str], what: str, fix: str) -> Coverage | None:
    """Measure `unk_coverage` and say it in one line: nothing when every word is covered, a note on
    stdout below `UNK_WARN`, a `warning:` on stderr above it that names `fix`.

    Said once per (tokenizer object, texts): the run's tokenizer is reported where it is built, and a
    later call for the same pair (e.g. when the adapter meets the task) measures and says nothing.
    """
    key = (id(tokenizer), hash(tuple(texts)))
    seen = _REPORTED.get(key)
    if seen is not None and seen() is tokenizer:
        return None
    try:
        _REPORTED[key] = weakref.ref(tokenizer)
    except TypeError:  # an object without weak references is measured every time
        pass
    cov = unk_coverage(tokenizer, texts)
    if cov is None or cov.unk == 0:
        return cov
    line = (
        f"{100 * cov.unk_fraction:.1f}% of {what}'s {cov.unit} are <unk> ({cov.unk} of {cov.total} in "
        f"{cov.texts} texts, e.g. {', '.join(map(repr, cov.examples))})"
    )
    if cov.unk_fraction > UNK_WARN:
        print(f"warning: tokenizer: {line}: the model can neither read nor write them; {fix}", file=sys.stderr)
    else:
        print(f"[tokenizer] {line}")
    return cov
