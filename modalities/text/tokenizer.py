"""Offline word-level tokenizers for tiny demo models, saved as standard HF tokenizers.

Words and '####' are single tokens, digits and punctuation one character each,
spaces are kept as tokens so decoding is lossless.  The result is a
`PreTrainedTokenizerFast` that `AutoTokenizer.from_pretrained` loads back.

    python -c "from mmdistill.modalities.text.tokenizer import build_word_tokenizer; print(build_word_tokenizer(['Ann','has']).tokenize('Ann has 12'))"
"""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>", "<bos>"]
PATTERN = r"####|[A-Za-z]+|\d|\s|[^\sA-Za-z\d]"


def build_word_tokenizer(words: list[str], chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer over `words` plus every printable ASCII character, built without downloads."""
    base = list(string.digits + string.ascii_letters + string.punctuation) + [" ", "\n", "####"]
    vocab_list = list(dict.fromkeys(SPECIALS + base + sorted(set(words))))
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(PATTERN), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )
    tok.padding_side = "left"
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
