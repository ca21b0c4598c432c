"""transformers causal LMs for the text modality: loading, tiny random-init models, LoRA, unwrapping.

Shared by the adapter, the generation engine and the teacher kinds (a module of plain functions,
so none of them imports another for these helpers).

    python -c "from mmdistill.modalities.text.hf import DTYPES; print(sorted(DTYPES))"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmdistill.config import LoraConfig
from mmdistill.errors import CheckpointError, CompatibilityError, ConfigError
from mmdistill.modalities.text.config import TinyLMConfig

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # default LoRA targets (attention projections)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under accelerate / DDP (`.module`) and peft (`.get_base_model()`) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def build_tiny_lm(cfg: TinyLMConfig, tokenizer: Any) -> torch.nn.Module:
    """A random-init Qwen3 or Llama causal LM sized by `cfg`, vocabulary padded to a multiple of 8."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    vocab = -(-len(tokenizer) // 8) * 8
    common = dict(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"tiny.hidden_size={cfg.hidden_size} is not divisible by tiny.num_heads={cfg.num_heads}")
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(cfg.seed)
        if cfg.arch == "qwen3":
            model = Qwen3ForCausalLM(Qwen3Config(head_dim=cfg.hidden_size // cfg.num_heads, **common))
        else:
            model = LlamaForCausalLM(LlamaConfig(**common))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_causal_lm(
    path: str, dtype: torch.dtype, revision: str | None, trust_remote_code: bool, name: str
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    local = Path(path)
    if local.exists() and not (local / "config.json").exists():
        raise CheckpointError(
            f"models.{name}.path: '{path}' has no config.json; point it at a saved HF checkpoint directory"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"models.{name}.path: cannot load '{path}' ({first}); check the path or hub id (no downloads here?)"
        ) from None


def check_model_tokenizer(model: torch.nn.Module, tokenizer: Any, path: str) -> None:
    rows = unwrap(model).get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise CompatibilityError(
            f"model '{path}' has {rows} output rows but the tokenizer has {len(tokenizer)} tokens; "
            "use the tokenizer saved with this model (tokenizer.path)"
        )


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    if any(t in ("lm_head", "embed_tokens") for t in cfg.target_modules or ()):
        raise ConfigError(
            "lora.target_modules: LoRA on lm_head/embed_tokens is not supported (re-scoring reads the head weight directly); "
            "target attention/MLP projections"
        )
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    return get_peft_model(
        model,
        PeftLoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules or LORA_TARGETS),
            task_type="CAUSAL_LM",
        ),
    )
