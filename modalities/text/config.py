"""The text adapter's own config sections: `rollout:`, `eval:`, `models.NAME.tiny`, and the options
of its teacher kinds (`models.NAME.options` of `kind: cross_tokenizer` / `kind: stored_logits`).

Ranges are checked in `__post_init__` with the bare key first ("max_new_tokens: 0 is below ...");
the core prefixes the section path (`stages.NAME.rollout.`).

    python -c "from mmdistill.modalities.text.config import TextRolloutConfig; TextRolloutConfig(max_new_tokens=0)"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


def check_at_least(obj: Any, lows: dict[str, float]) -> None:
    """Raise `ValueError("key: value is below the smallest allowed value low")` for the first field under its bound."""
    for key, low in lows.items():
        value = obj.__dict__[key]
        if value is not None and value < low:
            raise ValueError(f"{key}: {value} is below the smallest allowed value {low}")


@dataclass
class TinyLMConfig:
    """A random-init causal LM built from this section (tests, demos, CPU runs)."""

    arch: Literal["qwen3", "llama"] = "qwen3"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int | None = None  # default 4 x hidden_size
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    seed: int = 0


@dataclass
class TextRolloutConfig:
    """`stages.NAME.rollout` for text: how completions are sampled during training."""

    group_size: int = 1  # rollouts per prompt (GRPO groups)
    temperature: float = 1.0
    max_new_tokens: int = 32
    engine: str = "hf"  # the generation engine (modalities/text/engine.py; `hf` = KV-cache loop)

    def __post_init__(self) -> None:
        check_at_least(self, {"group_size": 1, "max_new_tokens": 1, "temperature": 0.0})


@dataclass
class TextEvalConfig:
    """`stages.NAME.eval` for text: held-out accuracy by generation plus the task's verifier."""

    n: int = 200
    batch_size: int = 200
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    k: int = 1  # samples per problem for pass@k (k > 1 needs temperature > 0)
    split: str = "test"

    def __post_init__(self) -> None:
        check_at_least(self, {"n": 1, "batch_size": 1, "k": 1, "max_new_tokens": 1, "temperature": 0.0})
        if self.k > 1 and self.temperature <= 0:
            raise ValueError(
                f"k: {self.k} samples per problem need temperature > 0 (greedy samples are all the same); set temperature"
            )


@dataclass
class CrossTokenizerOptions:
    """`models.NAME.options` of `kind: cross_tokenizer` (X-Token projection onto the run's vocabulary)."""

    topk: int = 256  # projected entries kept per step (plus one tail bucket), capped at the student's vocabulary
    smoothing: float = 1e-4  # uniform floor mixed into the projected distribution (keeps reverse KL finite)

    def __post_init__(self) -> None:
        check_at_least(self, {"topk": 1})
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing: {self.smoothing} must lie in [0, 1)")


@dataclass
class StoredLogitsOptions:
    """`models.NAME.options` of `kind: stored_logits` (teacher top-k written by a precompute stage).

    checkpoint: the teacher checkpoint (directory or hub id) that should have written the shards;
                its sha256 must equal the manifest's `teacher_hash` (teacher consistency).  Null
                skips the check: the shards' manifest names their teacher anyway."""

    checkpoint: str | None = None
