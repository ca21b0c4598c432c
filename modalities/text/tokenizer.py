"""Offline word- and character-level tokenizers for tiny demo models, saved as standard HF tokenizers.

Word level: words and '####' are single tokens, digits and punctuation one
character each, spaces are kept as tokens so decoding is lossless.  Character
level: one token per printable ASCII character (plus newline and tab), so a
char-level teacher and a word-level student have different tokenizers (X-Token
cross-tokenizer distillation).  Both are a `PreTrainedTokenizerFast` with the
special tokens <pad>, <eos>, <unk>, <bos> that `AutoTokenizer.from_pretrained` loads back.

    python -c "from mmdistill.modalities.text.tokenizer import build_word_tokenizer; print(build_word_tokenizer(['Ann','has']).tokenize('Ann has 12'))"
    python -c "from mmdistill.modalities.text.tokenizer import build_char_tokenizer; print(build_char_tokenizer().tokenize('Ann has 12'))"
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>", "<bos>"]
PATTERN = r"####|[A-Za-z]+|\d|\s|[^\sA-Za-z\d]"
CHAR_PATTERN = r"[\s\S]"  # every character alone, newlines included


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


def build_word_tokenizer(words: list[str], chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer over `words` plus every printable ASCII character, built without downloads."""
    base = list(string.digits + string.ascii_letters + string.punctuation) + [" ", "\n", "####"]
    return _word_level(SPECIALS + base + sorted(set(words)), PATTERN, chat_template)


def build_char_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character: printable ASCII, newline and tab; others are <unk>."""
    chars = list(string.digits + string.ascii_letters + string.punctuation) + [" ", "\n", "\t"]
    return _word_level(SPECIALS + chars, CHAR_PATTERN, chat_template)
