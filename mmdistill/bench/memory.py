"""memory: GPU memory per device for the standard distillation pairs, computed from exact parameter
counts, not guessed.  Each architecture is instantiated from its published config on the `meta` device
(no weights, no download) and its parameters counted; the bytes per GPU then follow for DDP, FSDP full
shard and DeepSpeed ZeRO-2 / ZeRO-3 at N = 2, 4, 8 GPUs, plus the frozen teachers in bf16 (replicated or
sharded) and an activation estimate with activation checkpointing on and off.

Pairs: Qwen3-8B teacher -> Qwen3-1.7B student (text OPD); SD3.5-Medium transformer student with three
teachers of the same architecture, plus the frozen text encoders and VAE (flow); pi0 teacher -> SmolVLA
student (robot, LeRobot 0.3.2 code).

Bytes per parameter (mixed precision with AdamW, as in ZeRO, arXiv 1910.02054, section 3.1):
    trained parameter   2 (bf16 weight) + 2 (bf16 gradient) + 12 (fp32 master weight, Adam m, Adam v) = 16
    frozen parameter    2 (bf16 weight: the frozen part of a student, every teacher, buffers)
Per GPU with P trained and F frozen student parameters on N GPUs:
    DDP                 16 P + 2 F
    ZeRO-2              2 P + (2 + 12) P / N + 2 F
    ZeRO-3, FSDP full   16 P / N + 2 F / N + 2 * 2 U      (U: the largest wrapped layer, gathered in bf16
                                                          for the current and the prefetched layer)
    teacher             2 T replicated, or 2 T / N + 2 * 2 U_T sharded
Activations of a trained transformer block, per token, in bf16 (stored for the backward pass, flash
attention so no seq x seq scores; after "Reducing Activation Recomputation in Large Transformer
Models", arXiv 2205.05198, section 4, re-derived for GQA and gated MLPs):
    a = 2 * (4 h + 2 h_q + 2 h_kv + m i)   bytes; h hidden, h_q = heads * head_dim, h_kv = kv_heads *
                                           head_dim, i the MLP width, m = 3 gated (SwiGLU) or 2 (GELU)
    checkpointing off   L * a * tokens
    checkpointing on    L * 2 h * tokens + a * tokens     (each block keeps its input; one block is
                                                          recomputed at a time)
A frozen teacher runs without gradients and keeps no activations.  Text rollouts add the student's
KV cache while sampling: 2 (k, v) * L * h_kv * 2 bytes per token.  Logits are not counted: the loss is
chunked over the vocabulary (`mmdistill.kernels`).

    mmdistill bench memory            # bench/memory.json; python -m mmdistill.bench.memory adds bench/memory.md
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import types
from pathlib import Path
from typing import Any
from unittest import mock

import torch

GIB = 1024**3
WORLD_SIZES = (2, 4, 8)
TRAINED_BYTES = {"bf16_weight": 2, "bf16_grad": 2, "fp32_master": 4, "adam_m": 4, "adam_v": 4}  # 16 in all
OPTIMIZER_BYTES = TRAINED_BYTES["fp32_master"] + TRAINED_BYTES["adam_m"] + TRAINED_BYTES["adam_v"]  # 12
FROZEN_BYTES = 2  # bf16

# ----------------------------------------------------------------------------- published configs

# Qwen/Qwen3-8B and Qwen/Qwen3-1.7B, config.json on the Hugging Face hub (model cards: 8.2B and 1.7B)
QWEN3_8B = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=False,
    max_position_embeddings=40960,
)
QWEN3_1_7B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
)
# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (SD3Transformer2DModel, MMDiT-X)
SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
# the same repository's text_encoder (CLIP ViT-L/14 text), text_encoder_2 (OpenCLIP bigG text),
# text_encoder_3 (T5 v1.1 XXL encoder) and vae config.json files
SD35_CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
SD35_CLIP_G = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    projection_dim=1280,
    hidden_act="gelu",
)
SD35_T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu"
)
SD35_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# HuggingFaceTB/SmolVLM2-500M-Video-Instruct config.json: SmolVLA's VLM (LeRobot keeps its first 16 layers)
SMOLVLM2_500M = dict(
    vision_config=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=512,
        patch_size=16,
    ),
    text_config=dict(
        model_type="llama",
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        head_dim=64,
        vocab_size=49280,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
    ),
    scale_factor=4,
    image_token_id=49190,
    tie_word_embeddings=False,
)
# pi0: LeRobot 0.3.2's PI0Config defaults, whose PaliGemma (SigLIP so400m + Gemma 2B) and Gemma action-expert
# configs are written in lerobot/policies/pi0/paligemma_with_expert.py (the PaliGemma 3B pt-224 config)

# ----------------------------------------------------------------------------- workloads (per GPU, stated)

TEXT_WORK = {"sequences": 8, "tokens_per_sequence": 4096}  # prompt + completion, one micro-batch
FLOW_WORK = {"images": 4, "resolution": 1024, "text_tokens": 77 + 256}  # CLIP 77 + T5 256 context tokens
ROBOT_WORK = {"decisions": 32, "action_chunk": 50}  # SmolVLA's chunk of 50 actions through the action expert


# ----------------------------------------------------------------------------- counting on meta


def count(model: torch.nn.Module) -> dict[str, int]:
    """Exact parameter, trained-parameter and buffer counts (shared tensors once, as `parameters()` yields)."""
    params = list(model.parameters())
    return {
        "params": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "buffers": sum(b.numel() for b in model.buffers()),
    }


def largest_unit(model: torch.nn.Module, classes: tuple[str, ...]) -> dict[str, Any]:
    """The largest module whose class name is in `classes` (what FSDP wraps): its class and parameters."""
    best = ("", 0)
    for m in model.modules():
        if type(m).__name__ in classes:
            n = sum(p.numel() for p in m.parameters())
            best = max(best, (type(m).__name__, n), key=lambda x: x[1])
    return {"class": best[0], "params": best[1]}


def qwen3(config: dict) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3Config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(Qwen3Config(**config))


def sd3_transformer(config: dict) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel(**config)


def sd3_conditioning() -> dict[str, torch.nn.Module]:
    """SD3.5's frozen text encoders and VAE, on meta."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        return {
            "clip_l": CLIPTextModelWithProjection(CLIPTextConfig(**SD35_CLIP_L)),
            "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(**SD35_CLIP_G)),
            "t5_xxl": T5EncoderModel(T5Config(**SD35_T5_XXL)),
            "vae": AutoencoderKL(**SD35_VAE),
        }


def pi0() -> torch.nn.Module:
    """LeRobot's PI0FlowMatching at its default config.  LeRobot 0.3.2's `set_requires_grad` reads
    `paligemma.vision_tower`, which transformers 5 moved; it only sets requires_grad, so it is skipped
    here (the teacher is frozen anyway)."""
    from lerobot.policies.pi0 import paligemma_with_expert
    from lerobot.policies.pi0.configuration_pi0 import PI0Config
    from lerobot.policies.pi0.modeling_pi0 import PI0FlowMatching

    skip = mock.patch.object(paligemma_with_expert.PaliGemmaWithExpertModel, "set_requires_grad", lambda self: None)
    with torch.device("meta"), skip:
        return PI0FlowMatching(PI0Config())


def smolvla() -> torch.nn.Module:
    """LeRobot's VLAFlowMatching (SmolVLA) at its default config on SmolVLM2-500M's published config;
    the VLM config and the processor (only its image token ids are read) are handed in instead of
    downloaded.  Trained parameters follow LeRobot's defaults (train_expert_only: the action expert)."""
    from lerobot.policies.smolvla import smolvlm_with_expert
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import VLAFlowMatching
    from transformers import SmolVLMConfig

    vlm = SmolVLMConfig(**SMOLVLM2_500M)
    tok = types.SimpleNamespace(fake_image_token_id=0, global_image_token_id=0)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.device("meta"))
        stack.enter_context(mock.patch.object(smolvlm_with_expert.AutoConfig, "from_pretrained", lambda *a, **k: vlm))
        stack.enter_context(
            mock.patch.object(
                smolvlm_with_expert.AutoProcessor,
                "from_pretrained",
                lambda *a, **k: types.SimpleNamespace(tokenizer=tok),
            )
        )
        stack.enter_context(
            contextlib.redirect_stdout(sys.stderr)
        )  # LeRobot prints "Reducing the number of VLM layers"
        return VLAFlowMatching(SmolVLAConfig())


# ----------------------------------------------------------------------------- byte arithmetic


def state_bytes(strategy: str, trained: int, frozen: int, unit: int, n: int) -> int:
    """Bytes per GPU of a student's weights, gradients and optimizer states (module docstring)."""
    if strategy == "ddp":
        return 16 * trained + FROZEN_BYTES * frozen
    if strategy == "zero2":
        return 2 * trained + (2 + OPTIMIZER_BYTES) * trained // n + FROZEN_BYTES * frozen
    if strategy in ("zero3", "fsdp"):
        return 16 * trained // n + FROZEN_BYTES * frozen // n + 2 * FROZEN_BYTES * unit
    raise ValueError(f"unknown strategy {strategy!r}")


def teacher_bytes(params: int, unit: int, n: int, sharded: bool) -> int:
    """Bytes per GPU of a frozen bf16 teacher, replicated or sharded (with two gathered layers in flight)."""
    return FROZEN_BYTES * params // n + 2 * FROZEN_BYTES * unit if sharded else FROZEN_BYTES * params


def block_bytes_per_token(h: int, h_q: int, h_kv: int, i: int, gated: bool) -> int:
    """Stored bf16 activations of one trained transformer block, per token (module docstring)."""
    return 2 * (4 * h + 2 * h_q + 2 * h_kv + (3 if gated else 2) * i)


def activation_bytes(layers: int, h: int, per_token: int, tokens: int, checkpointing: bool) -> int:
    """All trained blocks' stored activations for `tokens` tokens, with or without per-block checkpointing."""
    if checkpointing:
        return layers * 2 * h * tokens + per_token * tokens
    return layers * per_token * tokens


# ----------------------------------------------------------------------------- the pairs


def _gib(x: int | float) -> float:
    return round(x / GIB, 2)


def _model_entry(model: torch.nn.Module, source: str, config: dict | str, unit_classes: tuple[str, ...]) -> dict:
    return {"source": source, "config": config, **count(model), "largest_unit": largest_unit(model, unit_classes)}


def _rows(student: dict, teachers: list[dict], extra_frozen: int, activations: dict[str, int], kv_cache: int) -> list:
    """Per-GPU GiB for every strategy and N.  Buffers (e.g. SD3's positional table) are replicated under
    every strategy, as FSDP and ZeRO-3 shard parameters only; the frozen conditioning models stay replicated."""
    trained = student["trainable"]
    frozen = student["params"] - trained
    unit = student["largest_unit"]["params"]
    t_unit = max((t["largest_unit"]["params"] for t in teachers), default=0)  # gathered per teacher, conservatively
    rows = []
    for strategy in ("ddp", "zero2", "fsdp", "zero3"):
        for n in (1,) if strategy == "ddp" else WORLD_SIZES:
            sharded = strategy in ("fsdp", "zero3")
            st = state_bytes(strategy, trained, frozen, unit, n) + FROZEN_BYTES * student["buffers"]
            te = sum(teacher_bytes(t["params"], t_unit, n, sharded) + FROZEN_BYTES * t["buffers"] for t in teachers)
            cond = FROZEN_BYTES * extra_frozen
            total_on = st + te + cond + activations["on"] + kv_cache
            rows.append(
                {
                    "strategy": strategy,
                    "gpus": n,
                    "student_states_gib": _gib(st),
                    "teachers_gib": _gib(te),
                    "teachers_sharded": sharded,
                    "frozen_conditioning_gib": _gib(cond),
                    "activations_ckpt_on_gib": _gib(activations["on"]),
                    "activations_ckpt_off_gib": _gib(activations["off"]),
                    "kv_cache_gib": _gib(kv_cache),
                    "total_ckpt_on_gib": _gib(total_on),
                    "total_ckpt_off_gib": _gib(total_on - activations["on"] + activations["off"]),
                }
            )
    return rows


def text_pair() -> dict[str, Any]:
    units = ("Qwen3DecoderLayer",)
    teacher = {**_model_entry(qwen3(QWEN3_8B), "Qwen/Qwen3-8B config.json", QWEN3_8B, units), "trainable": 0}
    student = _model_entry(qwen3(QWEN3_1_7B), "Qwen/Qwen3-1.7B config.json", QWEN3_1_7B, units)
    c = QWEN3_1_7B
    h_q, h_kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    per_token = block_bytes_per_token(c["hidden_size"], h_q, h_kv, c["intermediate_size"], gated=True)
    tokens = TEXT_WORK["sequences"] * TEXT_WORK["tokens_per_sequence"]
    L = c["num_hidden_layers"]
    act = {cp: activation_bytes(L, c["hidden_size"], per_token, tokens, cp == "on") for cp in ("on", "off")}
    kv = 2 * L * h_kv * FROZEN_BYTES * tokens  # the student's KV cache while it samples the rollouts
    return {
        "pair": "text OPD: Qwen3-8B -> Qwen3-1.7B",
        "models": {"teacher": teacher, "student": student},
        "workload": {**TEXT_WORK, "block_bytes_per_token": per_token, "kv_cache_bytes_per_token": 2 * L * h_kv * 2},
        "rows": _rows(student, [teacher], 0, act, kv),
    }


def flow_pair() -> dict[str, Any]:
    units = ("JointTransformerBlock",)
    model = sd3_transformer(SD35_MEDIUM)
    student = _model_entry(model, "stabilityai/stable-diffusion-3.5-medium transformer/config.json", SD35_MEDIUM, units)
    teachers = [dict(student, trainable=0) for _ in range(3)]  # three frozen teachers of the same architecture
    cond = {k: count(m) for k, m in sd3_conditioning().items()}
    cond_params = sum(c["params"] + c["buffers"] for c in cond.values())
    c = SD35_MEDIUM
    h = c["num_attention_heads"] * c["attention_head_dim"]
    side = FLOW_WORK["resolution"] // 8 // c["patch_size"]  # VAE downsamples by 8, then 2 x 2 patches
    img_tokens, txt_tokens = side * side * FLOW_WORK["images"], FLOW_WORK["text_tokens"] * FLOW_WORK["images"]
    per_token = block_bytes_per_token(h, h, h, 4 * h, gated=False)  # image and context streams alike
    dual_extra = 2 * (2 * h + 2 * h + 2 * h)  # the second (image-only) attention of a dual-attention block
    L = c["num_layers"]
    act = {
        cp: activation_bytes(L, h, per_token, img_tokens + txt_tokens, cp == "on")
        + (len(c["dual_attention_layers"]) * dual_extra * img_tokens if cp == "off" else dual_extra * img_tokens)
        for cp in ("on", "off")
    }
    return {
        "pair": "flow: SD3.5-Medium student, three SD3.5-Medium teachers",
        "models": {"student": student, "conditioning": {"sources": "the same repository's config.json files", **cond}},
        "workload": {
            **FLOW_WORK,
            "image_tokens": img_tokens,
            "context_tokens": txt_tokens,
            "block_bytes_per_token": per_token,
        },
        "rows": _rows(student, teachers, cond_params, act, 0),
    }


def robot_pair() -> dict[str, Any]:
    teacher = _model_entry(
        pi0(),
        "LeRobot 0.3.2 PI0Config defaults (PaliGemma 3B + Gemma 300M expert)",
        "lerobot defaults",
        ("GemmaDecoderLayer",),
    )
    teacher["trainable"] = 0  # frozen
    s = smolvla()
    student = _model_entry(
        s,
        "LeRobot 0.3.2 SmolVLAConfig defaults on HuggingFaceTB/SmolVLM2-500M-Video-Instruct config.json",
        {"vlm": "SMOLVLM2_500M", "num_vlm_layers": 16, "expert_width_multiplier": 0.75},
        ("LlamaDecoderLayer",),
    )
    ec = s.vlm_with_expert.lm_expert.config
    h_q, h_kv = ec.num_attention_heads * ec.head_dim, ec.num_key_value_heads * ec.head_dim
    per_token = block_bytes_per_token(ec.hidden_size, h_q, h_kv, ec.intermediate_size, gated=True)
    tokens = ROBOT_WORK["decisions"] * ROBOT_WORK["action_chunk"]
    L = len(s.vlm_with_expert.lm_expert.layers)
    act = {cp: activation_bytes(L, ec.hidden_size, per_token, tokens, cp == "on") for cp in ("on", "off")}
    return {
        "pair": "robot: pi0 -> SmolVLA",
        "models": {"teacher": teacher, "student": student},
        "workload": {**ROBOT_WORK, "expert_block_bytes_per_token": per_token},
        "rows": _rows(student, [teacher], 0, act, 0),
    }


def markdown(result: dict[str, Any]) -> str:
    """One table per pair: GiB per GPU, activation checkpointing on (off in parentheses); the
    student's states include its buffers, the teachers' column the frozen text encoders and VAE."""
    out = []
    for p in result["pairs"]:
        m = p["models"]
        counts = ", ".join(
            f"{k} {v['params']:,} params"
            + (f" ({v['trainable']:,} trained)" if k == "student" else "")
            + (f" + {v['buffers']:,} buffer elements" if v["buffers"] > 1000 else "")
            for k, v in [*m.items(), *m.get("conditioning", {}).items()]
            if isinstance(v, dict) and "params" in v
        )
        out += [f"**{p['pair']}**: {counts}", ""]
        out += [
            "| strategy | GPUs | student states | teachers (+ frozen encoders) | activations | KV cache | total (ckpt off) |"
        ]
        out += ["|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            where = "sharded" if r["teachers_sharded"] else "replicated"
            teach = r["teachers_gib"] + r["frozen_conditioning_gib"]
            out.append(
                f"| {r['strategy']} | {r['gpus']} | {r['student_states_gib']} | {teach:.2f} ({where}) | "
                f"{r['activations_ckpt_on_gib']} ({r['activations_ckpt_off_gib']}) | {r['kv_cache_gib']} | "
                f"{r['total_ckpt_on_gib']} ({r['total_ckpt_off_gib']}) |"
            )
        out.append("")
    return "\n".join(out)


def memory(device: str = "auto", quick: bool = False) -> dict[str, Any]:
    """The JSON `mmdistill bench memory` writes; nothing runs on `device` (all on meta)."""
    t0 = time.time()
    pairs = [text_pair(), flow_pair(), robot_pair()]
    result = {
        "bench": "memory",
        "setup": {
            "bytes_per_trained_param": TRAINED_BYTES,
            "bytes_per_frozen_param": FROZEN_BYTES,
            "world_sizes": [1, *WORLD_SIZES],
            "formulas": (__doc__ or "").split("Bytes per parameter", 1)[1].split("    mmdistill bench")[0].strip(),
            "units": "GiB (2**30 bytes) per GPU",
        },
        "pairs": pairs,
        "seconds": round(time.time() - t0, 1),
    }
    result["table_md"] = markdown(
        result
    ).splitlines()  # a list of lines: readable in the JSON, skipped by the CLI print
    return result


if __name__ == "__main__":
    res = memory()
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text("\n".join(res["table_md"]) + "\n")
    print("\n".join(res["table_md"]))
