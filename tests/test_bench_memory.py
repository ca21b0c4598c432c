"""`mmdistill bench memory`: parameter counts on the meta device equal the real models' and a count by
hand from the config; the per-GPU byte arithmetic of DDP / ZeRO-2 / FSDP / ZeRO-3 and the activation
formula on hand-computed cases.

    python -m pytest tests/test_bench_memory.py -q
"""

from __future__ import annotations

import pytest
import torch

from mmdistill.bench import BENCHES
from mmdistill.bench import memory as mem

GIB = 2**30


def _qwen3_by_hand(c: dict) -> int:
    """Qwen3's parameters from its config: embeddings, per layer q/k/v/o, q/k norms, SwiGLU MLP and two
    norms, the final norm, and an untied LM head."""
    h, L, V, i, d = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"], c["head_dim"]
    hq, hkv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    layer = h * hq + 2 * h * hkv + hq * h + 2 * d + 3 * h * i + 2 * h
    return V * h + L * layer + h + (0 if c["tie_word_embeddings"] else V * h)


TINY_QWEN3 = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    tie_word_embeddings=False,
)


@pytest.mark.parametrize("tie", [False, True])
def test_meta_count_of_a_tiny_qwen3_equals_the_real_model(tie):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = dict(TINY_QWEN3, tie_word_embeddings=tie)
    meta = mem.qwen3(cfg)
    assert next(meta.parameters()).device.type == "meta"
    real = AutoModelForCausalLM.from_config(Qwen3Config(**cfg))
    n_real = sum(p.numel() for p in real.parameters())
    assert mem.count(meta)["params"] == n_real == _qwen3_by_hand(cfg)
    unit = mem.largest_unit(meta, ("Qwen3DecoderLayer",))
    assert unit == {"class": "Qwen3DecoderLayer", "params": sum(p.numel() for p in real.model.layers[0].parameters())}


def test_meta_count_of_a_tiny_sd3_equals_the_real_model():
    from diffusers import SD3Transformer2DModel

    cfg = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=10,
        out_channels=4,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    real = SD3Transformer2DModel(**cfg)
    got = mem.count(mem.sd3_transformer(cfg))
    assert got["params"] == sum(p.numel() for p in real.parameters())
    assert got["buffers"] == sum(b.numel() for b in real.buffers()) == 8 * 8 * 16  # the positional table


def test_published_qwen3_counts_match_the_config_by_hand():
    """Qwen3-8B and Qwen3-1.7B: the meta count equals the count by hand (8.19B and 1.72B, as the cards say)."""
    for cfg, approx in ((mem.QWEN3_8B, 8.19e9), (mem.QWEN3_1_7B, 1.72e9)):
        n = mem.count(mem.qwen3(cfg))["params"]
        assert n == _qwen3_by_hand(cfg) and abs(n - approx) / approx < 0.005


def test_state_bytes_by_hand():
    P, F, U = 1000, 200, 100
    assert mem.state_bytes("ddp", P, F, U, 1) == 16 * 1000 + 2 * 200  # 16400
    assert mem.state_bytes("zero2", P, F, U, 4) == 2000 + 14000 // 4 + 400  # 5900
    assert mem.state_bytes("fsdp", P, F, U, 4) == 16000 // 4 + 400 // 4 + 4 * 100  # 4500
    assert mem.state_bytes("zero3", P, F, U, 4) == mem.state_bytes("fsdp", P, F, U, 4)
    assert sum(mem.TRAINED_BYTES.values()) == 16 and mem.OPTIMIZER_BYTES == 12
    assert mem.teacher_bytes(3000, 300, 4, sharded=False) == 6000
    assert mem.teacher_bytes(3000, 300, 4, sharded=True) == 1500 + 1200
    with pytest.raises(ValueError, match="unknown strategy"):
        mem.state_bytes("zero1", P, F, U, 4)


def test_activation_formula_by_hand():
    # Qwen3-1.7B: h 2048, h_q 2048, h_kv 1024, i 6144, SwiGLU -> 2 * (8192 + 4096 + 2048 + 18432) = 65536 bytes
    assert mem.block_bytes_per_token(2048, 2048, 1024, 6144, gated=True) == 65536
    assert mem.block_bytes_per_token(10, 10, 10, 40, gated=False) == 2 * (40 + 20 + 20 + 80)
    a = mem.block_bytes_per_token(2048, 2048, 1024, 6144, gated=True)
    assert mem.activation_bytes(28, 2048, a, 1000, checkpointing=False) == 28 * 65536 * 1000
    assert mem.activation_bytes(28, 2048, a, 1000, checkpointing=True) == 28 * 4096 * 1000 + 65536 * 1000


def test_rows_by_hand():
    student = {"params": GIB, "trainable": GIB, "buffers": 0, "largest_unit": {"params": 2**26}}
    teacher = {"params": 4 * GIB, "trainable": 0, "buffers": 0, "largest_unit": {"params": 2**27}}
    rows = mem._rows(student, [teacher], 0, {"on": GIB, "off": 3 * GIB}, 0)
    by = {(r["strategy"], r["gpus"]): r for r in rows}
    assert set(by) == {("ddp", 1)} | {(s, n) for s in ("zero2", "fsdp", "zero3") for n in (2, 4, 8)}
    assert (by["ddp", 1]["student_states_gib"], by["ddp", 1]["teachers_gib"]) == (16.0, 8.0)
    assert by["ddp", 1]["total_ckpt_on_gib"] == 25.0 and by["ddp", 1]["total_ckpt_off_gib"] == 27.0
    assert by["zero2", 4]["student_states_gib"] == 2 + 14 / 4 and by["zero2", 4]["teachers_gib"] == 8.0
    assert by["fsdp", 4]["student_states_gib"] == 4.25  # 16/4 GiB + two gathered 2**26-param layers in bf16
    assert by["fsdp", 4]["teachers_gib"] == 2.5  # 8/4 GiB + two gathered 2**27-param layers


def test_registered_as_a_benchmark():
    assert BENCHES["memory"] is mem.memory


@pytest.mark.slow
def test_full_benchmark_counts(tmp_path):
    """All three pairs on meta (about 30 s): the published totals (8.19B, 1.72B, SD3.5-M 2.47B with its
    positional table, pi0 3.5B, SmolVLA 450M)."""
    res = mem.memory()
    text, flow, robot = res["pairs"]
    assert text["models"]["teacher"]["params"] == 8_190_735_360
    s = flow["models"]["student"]
    assert abs(s["params"] + s["buffers"] - 2.47e9) / 2.47e9 < 0.01
    assert abs(robot["models"]["student"]["params"] - 450e6) / 450e6 < 0.01
    assert torch.tensor([r["total_ckpt_on_gib"] for r in text["rows"]]).min() > 0
