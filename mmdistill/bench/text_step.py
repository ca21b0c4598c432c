"""Text benchmarks: one on-policy distillation step against TRL, and the memory of the
distillation loss at Qwen's vocabulary.  Each is a function returning a JSON-able dict
that `mmdistill bench NAME` writes, with a PNG beside it.

text-step: one OPD training step (the student samples with a KV cache, the teacher scores the
student's tokens, full-vocabulary reverse KL forward + backward, AdamW step) by mmdistill's own
code path (`CausalLMAdapter.sample` + `.step_dist` + `ReverseKL` + AdamW) against TRL's
`GKDTrainer` (beta=1, lmbda=1) on the same tiny random-init Qwen3 models, prompts, batch, new
tokens and temperature, interleaved in one process.  `ratio_vs_trl` = mmdistill / TRL (target
<= 0.5); `ratio_vs_parts` = step / the sum of its parts timed alone (target <= 1.15).

    pip install -e .[bench]
    OMP_NUM_THREADS=1 mmdistill bench text-step --out bench/text-step-cpu.json

text-loss-memory: peak memory and time of the loss forward + backward (LM-head matmul from the
hidden states included) at V=151,936, T=2,048, hidden 1,024, batch 1..4: chunked
(`HiddenCategorical.divergence` exactly as a training run calls it: hand-written backward for KL,
rows per chunk capped by the library's logits budget), teacher top-k + tail (student chunked), and
naive full logits.  Every configuration runs in a fresh subprocess; CPU peaks are ru_maxrss over the
resident size once the inputs exist, CUDA peaks `torch.cuda.max_memory_allocated`.

    OMP_NUM_THREADS=1 mmdistill bench text-loss-memory --out bench/text-loss-memory-cpu.json
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdistill.bench import _device
from mmdistill.config import TinyLMConfig
from mmdistill.errors import MmdistillError

GIB = 1024**3

# ====================================================================== text-step

STUDENT = TinyLMConfig(arch="qwen3", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, seed=1)
TEACHER = TinyLMConfig(arch="qwen3", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, seed=0)
STUDENT_QUICK = TinyLMConfig(arch="qwen3", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=1)  # --quick
TEACHER_QUICK = TinyLMConfig(arch="qwen3", hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, seed=0)


def bench_tokenizer(vocab_size: int = 512) -> Any:
    """A word tokenizer of exactly `vocab_size` tokens: printable ASCII plus made-up three-letter words."""
    from mmdistill.modalities.text.tokenizer import build_word_tokenizer

    n_base = len(build_word_tokenizer([]))
    if vocab_size <= n_base:
        raise MmdistillError(f"vocab_size={vocab_size} must exceed the {n_base} base tokens of the word tokenizer")
    words = ["".join(p) for p in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=3)][: vocab_size - n_base]
    return build_word_tokenizer(words)


def bench_questions(tokenizer: Any, batch: int, words_per_question: int = 8) -> list[str]:
    """`batch` different questions of equal token length (no prompt padding on either side)."""
    vocab = [w for w in tokenizer.get_vocab() if len(w) == 3 and w.isalpha()]
    return [" ".join(vocab[(i * words_per_question + j) % len(vocab)] for j in range(words_per_question)) for i in range(batch)]


@dataclass
class StepSetup:
    """What both sides of the text-step benchmark share."""

    adapter: Any
    teacher: torch.nn.Module
    student: torch.nn.Module  # mmdistill's copy
    questions: list[str]
    max_new_tokens: int
    temperature: float
    lr: float = 1e-4
    max_grad_norm: float = 1.0


def build_step_setup(device: torch.device, batch: int = 8, max_new_tokens: int = 64, vocab_size: int = 512,
                     student: TinyLMConfig = STUDENT, teacher: TinyLMConfig = TEACHER, temperature: float = 1.0) -> StepSetup:
    from mmdistill.modalities.text.adapter import CausalLMAdapter, build_tiny_lm

    tok = bench_tokenizer(vocab_size)
    adapter = CausalLMAdapter(tok, device=device)
    # No token id is -1: every row samples all max_new_tokens (TRL's side: eos_token_id None).
    adapter.eos_id = -1
    teacher_model = build_tiny_lm(teacher, tok).to(device).eval().requires_grad_(False)
    student_model = build_tiny_lm(student, tok).to(device)
    return StepSetup(adapter, teacher_model, student_model, bench_questions(tok, batch), max_new_tokens, temperature)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW as `mmdistill train` builds it."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0, betas=(0.9, 0.99))


def opd_loss(adapter: Any, student: torch.nn.Module, teacher_dist: Any, rollout: Any) -> Tensor:
    """Full-vocabulary reverse KL on the rollout's states, mean over its tokens (as `mmdistill train`)."""
    from mmdistill.objectives.registered import ObjectiveBatch, ReverseKL

    student_dist = adapter.step_dist(student, rollout)
    loss, _ = ReverseKL()(ObjectiveBatch(rollout, student_dist, teacher_dist, normalizer=float(max(rollout.num_steps(), 1))))
    return loss


def score_teacher(adapter: Any, teacher: torch.nn.Module, rollout: Any) -> Any:
    with torch.no_grad():
        return adapter.step_dist(teacher, rollout)


def update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor, max_grad_norm: float) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def opd_step(s: StepSetup, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> float:
    """One on-policy distillation step by mmdistill's code path; returns the loss."""
    rollout = s.adapter.sample(s.student, s.questions, s.max_new_tokens, s.temperature, generator)
    teacher_dist = score_teacher(s.adapter, s.teacher, rollout)
    loss = opd_loss(s.adapter, s.student, teacher_dist, rollout)
    update(s.student, optimizer, loss, s.max_grad_norm)
    return float(loss.detach())


def step_parts(s: StepSetup, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict[str, Callable[[], Any]]:
    """The three parts of `opd_step`, each callable alone (they share the last rollout)."""
    last: dict[str, Any] = {}

    def generate() -> None:
        last["rollout"] = s.adapter.sample(s.student, s.questions, s.max_new_tokens, s.temperature, generator)

    def teacher_scoring() -> None:
        last["teacher"] = score_teacher(s.adapter, s.teacher, last["rollout"])

    def student_update() -> None:
        update(s.student, optimizer, opd_loss(s.adapter, s.student, last["teacher"], last["rollout"]), s.max_grad_norm)

    generate(), teacher_scoring()
    return {"generate": generate, "teacher_scoring": teacher_scoring, "student_forward_backward_optimizer": student_update}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _import_trl() -> Any:
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        try:
            from trl import GKDConfig, GKDTrainer
        except ImportError:
            raise MmdistillError("text-step compares against TRL, which is not installed: pip install -e .[bench]") from None
    return GKDConfig, GKDTrainer


def build_trl_trainer(s: StepSetup, student: torch.nn.Module, device: torch.device, max_steps: int, callbacks: list,
                      out_dir: str, activation_checkpointing: bool = False) -> Any:
    """TRL's GKDTrainer on a copy of `student`: reverse KL (beta=1), always on-policy (lmbda=1).

    TRL turns activation checkpointing on by default, and then its GKDTrainer generates without a KV cache;
    `activation_checkpointing=False` makes it do the same work as mmdistill's step.
    """
    from datasets import Dataset

    GKDConfig, GKDTrainer = _import_trl()
    tok = s.adapter.tokenizer
    student = copy.deepcopy(student)
    student.generation_config.eos_token_id = None  # generate all max_new_tokens, like mmdistill's side
    student.config.eos_token_id = None
    rows = []
    for q in s.questions:
        prompt = s.adapter.format_prompt(q)
        rows.append({"prompt": prompt, "input_ids": tok(prompt, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]})
    checkpointing = {n: activation_checkpointing for n in ("gradient_checkpointing", "activation_checkpointing")
                     if n in GKDConfig.__dataclass_fields__}  # the second is transformers 5's name
    args = GKDConfig(
        output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=len(s.questions), learning_rate=s.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta2=0.99, optim="adamw_torch",
        max_grad_norm=s.max_grad_norm, temperature=s.temperature, lmbda=1.0, beta=1.0, max_new_tokens=s.max_new_tokens,
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=device.type == "cpu",
        dataloader_num_workers=0, seed=0, bf16=False, fp16=False, **checkpointing,
    )
    return GKDTrainer(model=student, teacher_model=copy.deepcopy(s.teacher), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, callbacks=callbacks)


class _Generated:
    """Wraps GKDTrainer.generate_on_policy_outputs to record how many tokens each TRL step generated."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn, self.new_tokens, self.pad_in_completion = fn, [], 0

    def __call__(self, model: Any, inputs: dict, generation_config: Any, pad_token_id: int | None = None) -> Any:
        ids, attn, labels = self.fn(model, inputs, generation_config, pad_token_id)
        completion = ids[:, inputs["prompts"].shape[1]:]
        self.new_tokens.append(int(completion.shape[1]))
        self.pad_in_completion += int((completion == pad_token_id).sum())
        return ids, attn, labels


def interleaved_with_trl(s: StepSetup, student: torch.nn.Module, device: torch.device, steps: int,
                         ours: dict[str, Callable[[], Any]], activation_checkpointing: bool = False) -> tuple[dict[str, list[float]], _Generated]:
    """Seconds of `steps` TRL training steps, each followed by one timed call of every function in `ours`.

    A callback times TRL's step from on_step_begin to on_step_end (on-policy generation, teacher and student
    forward, loss, backward, clipping, optimizer, scheduler, zero_grad) and then runs ours, so all alternate.
    """
    from transformers import TrainerCallback

    times: dict[str, list[float]] = {"trl": [], **{k: [] for k in ours}}

    class Interleave(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            times["trl"].append(time.perf_counter() - self.t0)
            for k, fn in ours.items():
                times[k].append(_time(fn, device))

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trl_trainer(s, student, device, steps, [Interleave()], out_dir, activation_checkpointing)
        recorder = trainer.generate_on_policy_outputs = _Generated(trainer.generate_on_policy_outputs)
        trainer.train()
    if set(recorder.new_tokens) != {s.max_new_tokens}:
        raise MmdistillError(f"TRL generated {sorted(set(recorder.new_tokens))} new tokens per step, expected {s.max_new_tokens}: "
                             "the two sides did not do the same work")
    return times, recorder


def profile_step(step: Callable[[], Any], calls: int = 2, n: int = 12) -> list[dict[str, Any]]:
    """cProfile of `calls` steps: the `n` functions with the most own time (Python overhead shows up here too)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (primitive calls, calls, tottime, cumtime, callers)}
    total = sum(v[2] for v in stats.values())
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [{"function": f"{Path(f).name}:{line}({name})" if f != "~" else name, "calls_per_step": v[1] // calls,
             "own_seconds_per_step": round(v[2] / calls, 4), "share": round(v[2] / total, 3)} for (f, line, name), v in top]


def text_step(device: str = "auto", quick: bool = False) -> dict[str, Any]:
    from mmdistill.pipeline import quiet_library_logs

    _import_trl()
    import transformers
    import trl

    quiet_library_logs()
    dev = _device(device)
    load_start = os.getloadavg()[0]
    batch, new_tokens, warmup, repeats = (2, 8, 1, 2) if quick else (8, 64, 2, 10)
    student_cfg, teacher_cfg, vocab_size = (STUDENT_QUICK, TEACHER_QUICK, 128) if quick else (STUDENT, TEACHER, 512)
    s = build_step_setup(dev, batch=batch, max_new_tokens=new_tokens, vocab_size=vocab_size, student=student_cfg, teacher=teacher_cfg)
    initial_student = copy.deepcopy(s.student)
    optimizer = make_optimizer(s.student, s.lr)
    gen = torch.Generator(device=dev).manual_seed(0)
    step = lambda: opd_step(s, optimizer, gen)  # noqa: E731
    times, recorder = interleaved_with_trl(s, initial_student, dev, warmup + repeats, {"mmdistill": step, **step_parts(s, optimizer, gen)})
    timed = {k: v[warmup:] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in timed.items()}
    parts = {k: med[k] for k in timed if k not in ("trl", "mmdistill")}
    parts_sum = sum(parts.values())
    result: dict[str, Any] = {
        "benchmark": "text-step",
        "trl_step_seconds": med["trl"],
        "mmdistill_step_seconds": med["mmdistill"],
        "ratio_vs_trl": med["mmdistill"] / med["trl"],
        "parts_seconds": parts,
        "parts_sum_seconds": parts_sum,
        "ratio_vs_parts": med["mmdistill"] / parts_sum,
        "target_ratio_vs_trl": 0.5,
        "target_ratio_vs_parts": 1.15,
        "ratio_vs_trl_if_generation_took_no_time": (parts_sum - parts["generate"]) / med["trl"],
    }
    if not quick:  # TRL as configured out of the box: activation checkpointing on, so generation without a KV cache
        times_ckpt, _ = interleaved_with_trl(s, initial_student, dev, warmup + repeats, {"mmdistill": step}, activation_checkpointing=True)
        ckpt = {k: statistics.median(v[warmup:]) for k, v in times_ckpt.items()}
        result["trl_default_checkpointing_step_seconds"] = ckpt["trl"]
        result["ratio_vs_trl_default_checkpointing"] = ckpt["mmdistill"] / ckpt["trl"]
        timed.update({f"{k}_vs_trl_default_checkpointing": v[warmup:] for k, v in times_ckpt.items()})
    if result["ratio_vs_trl"] > 0.5 or result["ratio_vs_parts"] > 1.15:
        result["profile_top"] = profile_step(step)
    result.update({
        "method": (
            f"one process; TRL's GKDTrainer.train() runs {warmup + repeats} steps and a callback times each from on_step_begin "
            "to on_step_end (on-policy generate, teacher and student forward, loss, backward, grad clipping, AdamW, scheduler, "
            "zero_grad; collation and logging excluded); right after each TRL step the callback times one mmdistill step "
            f"and then each of its parts alone, so all alternate; the first {warmup} rounds are warm-up, then medians of "
            f"{repeats}. trl_step_seconds: activation checkpointing off, so TRL generates with a KV cache as mmdistill does "
            "(same work); trl_default_checkpointing_step_seconds: TRL's default (on), where GKDTrainer generates without a "
            "KV cache and recomputes activations in backward, timed in a second interleaved run"
        ),
        "parts": {
            "generate": "adapter.sample: KV-cache sampling of all new tokens",
            "teacher_scoring": "adapter.step_dist(teacher) under no_grad: the teacher decoder over prompt + completion",
            "student_forward_backward_optimizer": "adapter.step_dist(student), ReverseKL (teacher head applied chunk by chunk "
                                                  "inside), backward, clip_grad_norm 1.0, AdamW step, zero_grad",
        },
        "equal_work": (
            f"every row generates exactly {new_tokens} tokens on both sides: EOS is disabled (mmdistill: the adapter's eos id "
            "set to -1; TRL: the student's eos_token_id None), checked on TRL's side on every step; prompts have equal token "
            "lengths (no padding); sampling and loss temperature 1.0 on both sides; same gradient clipping (1.0) and "
            "optimizer (torch AdamW, non-fused, betas 0.9/0.99, constant lr). TRL masks any sampled pad token from its loss "
            f"({recorder.pad_in_completion} such tokens in {len(recorder.new_tokens)} steps)"
        ),
        "differences": (
            "TRL computes B x (P+T) x V logits for student and teacher over prompt and completion and runs HF generate "
            "(logits processors, stopping criteria); mmdistill takes hidden states and computes logits only at the "
            "completion positions, chunk by chunk, and samples in its own KV-cache loop"
        ),
        "setup": {
            "device": str(dev), "dtype": "float32", "batch": batch, "max_new_tokens": new_tokens,
            "prompt_tokens": int(s.adapter.encode_prompts(s.questions[:1])[0].shape[1]), "temperature": s.temperature,
            "beta": 1.0, "lmbda": 1.0, "lr": s.lr, "vocab_size": s.adapter.vocab_size,
            "teacher": _model_desc(teacher_cfg, s.teacher), "student": _model_desc(student_cfg, s.student),
            "warmup": warmup, "repeats": repeats, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpus": os.cpu_count(), "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]}, "machine": platform.machine(),
        },
        "times": timed,
    })
    return result


def _model_desc(cfg: TinyLMConfig, model: torch.nn.Module) -> dict[str, Any]:
    return {"arch": cfg.arch, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "parameters": sum(p.numel() for p in model.parameters())}


# ====================================================================== text-loss-memory

LOSS_METHODS = ("chunked", "topk", "naive")


def loss_inputs(batch: int, seq_len: int, vocab_size: int, hidden: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Tensor]:
    """Student and teacher hidden states `[B, T, H]` and LM heads `[V, H]`, logits of unit scale.

    Filled in place (`normal_`), so building them leaves no temporaries above the memory baseline.
    """
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int, std: float = 1.0) -> Tensor:
        return torch.empty(*shape, device=device, dtype=dtype).normal_(std=std, generator=gen)

    return {
        "student_hidden_B_T_H": normal(batch, seq_len, hidden).requires_grad_(),
        "student_head_V_H": normal(vocab_size, hidden, std=hidden**-0.5).requires_grad_(),
        "teacher_hidden_B_T_H": normal(batch, seq_len, hidden),
        "teacher_head_V_H": normal(vocab_size, hidden, std=hidden**-0.5),
        "mask_B_T": torch.ones(batch, seq_len, device=device),
    }


def _hidden_dist(x: dict[str, Tensor], who: str, chunk_size: int) -> Any:
    from mmdistill.stepdist import HiddenCategorical

    return HiddenCategorical(x[f"{who}_hidden_B_T_H"], x[f"{who}_head_V_H"], x["mask_B_T"], chunk_size=chunk_size)


def _mean_over_tokens(d_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    return (d_B_T * mask_B_T).sum() / mask_B_T.sum()


def chunked_loss(x: dict[str, Tensor], chunk_size: int = 1024) -> Tensor:
    """Reverse KL from hidden states by `HiddenCategorical.divergence`, as a training run calls it: at most
    `chunk_size` rows of logits at a time, fewer where the library's logits budget caps them (`rows_per_chunk`)."""
    d_B_T = _hidden_dist(x, "student", chunk_size).divergence(_hidden_dist(x, "teacher", chunk_size), beta=1.0)
    return _mean_over_tokens(d_B_T, x["mask_B_T"])


def teacher_topk(x: dict[str, Tensor], k: int, chunk_size: int = 64) -> Any:
    """The teacher's top-k log-probs plus a tail bucket per token (what a run would store offline)."""
    return _hidden_dist(x, "teacher", chunk_size).topk(k)


def topk_loss(x: dict[str, Tensor], teacher: Any, chunk_size: int = 1024) -> Tensor:
    """Reverse KL on the teacher's top-k tokens plus one tail bucket, the student chunked."""
    return _mean_over_tokens(_hidden_dist(x, "student", chunk_size).divergence(teacher, beta=1.0), x["mask_B_T"])


def naive_loss(x: dict[str, Tensor]) -> Tensor:
    """Reverse KL the plain way: full `B x T x V` logits for both models, log_softmax, kl_div (as TRL's GKD loss)."""
    student_logits_B_T_V = F.linear(x["student_hidden_B_T_H"], x["student_head_V_H"])
    with torch.no_grad():
        teacher_logp_B_T_V = F.log_softmax(F.linear(x["teacher_hidden_B_T_H"], x["teacher_head_V_H"]), dim=-1)
    student_logp_B_T_V = F.log_softmax(student_logits_B_T_V, dim=-1)
    del student_logits_B_T_V
    kl = F.kl_div(teacher_logp_B_T_V, student_logp_B_T_V, reduction="sum", log_target=True)  # sum p_S (log p_S - log p_T)
    return kl / x["mask_B_T"].sum()


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _profile_top(fn: Callable[[], Any], n: int = 10) -> list[dict[str, Any]]:
    """The `n` ops with the most self CPU time in one call of fn (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "calls": e.count, "self_cpu_seconds": round(e.self_cpu_time_total / 1e6, 3),
             "self_cpu_memory_gib": round(e.self_cpu_memory_usage / GIB, 3)} for e in events]


def loss_worker(method: str, batch: int, seq_len: int, vocab_size: int, hidden: int, device: str = "cpu",
                k: int = 128, chunk_size: int = 1024, repeats: int = 1, profile: bool = False) -> dict[str, Any]:
    """One configuration in this process: peak memory of a forward + backward over the baseline once the
    inputs exist, and its seconds.

    Meant for a fresh process (`_run_loss_config`): on CPU the peak is the process's ru_maxrss, so only
    the first forward + backward here can raise it; the baseline is the resident size just before it
    (`baseline_slack_bytes` = how far an earlier high-water mark lies above that: it should be ~0).
    """
    if method not in LOSS_METHODS:
        raise MmdistillError(f"loss method '{method}' unknown; choose one of {', '.join(LOSS_METHODS)}")
    dev = torch.device(device)
    x = loss_inputs(batch, seq_len, vocab_size, hidden, dev)
    extra: dict[str, Any] = {}
    if method == "topk":
        t0 = time.perf_counter()
        teacher = teacher_topk(x, k)  # small chunks: its own high-water mark stays near the baseline
        extra["teacher_topk_seconds"] = time.perf_counter() - t0
    run = {"chunked": lambda: chunked_loss(x, chunk_size), "topk": lambda: topk_loss(x, teacher, chunk_size),
           "naive": lambda: naive_loss(x)}[method]

    def forward_backward() -> Tensor:
        for t in (x["student_hidden_B_T_H"], x["student_head_V_H"]):
            t.grad = None
        loss = run()
        loss.backward()
        return loss

    if profile:
        return {"profile_top": _profile_top(forward_backward)}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _current_rss_bytes()
        extra["baseline_slack_bytes"] = _peak_rss_bytes() - base
    seconds, cpu_seconds = [], []
    extra["load_average_1m"] = os.getloadavg()[0]
    for _ in range(max(repeats, 1)):
        cpu0 = time.process_time()
        seconds.append(_time(lambda: extra.update(loss=float(forward_backward().detach())), dev))
        cpu_seconds.append(time.process_time() - cpu0)
        if len(seconds) == 1:
            peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _peak_rss_bytes()) - base
    return {"peak_bytes": int(peak), "seconds": statistics.median(seconds), "cpu_seconds": statistics.median(cpu_seconds),
            "seconds_all": seconds, "baseline_bytes": base, **extra}


def _run_loss_config(cfg: dict[str, Any], timeout_s: float = 3600) -> dict[str, Any]:
    """`loss_worker(**cfg)` in a fresh Python process; its JSON is the last stdout line."""
    code = ("import json, sys; from mmdistill.bench_text import loss_worker; "
            "print(json.dumps(loss_worker(**json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"status": "failed", "error": f"exit {proc.returncode}: {tail}"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


NAIVE_LOGIT_COPIES = 5.0  # measured here: naive's peak is ~5 fp32 copies of the B x T x V logits


def _naive_estimate(rows: list[dict[str, Any]], tokens: int, vocab_size: int) -> float:
    """Naive peak bytes at `tokens` = B*T: the line through the measured naive rows, else 5 fp32 `N x V` copies."""
    pts = sorted({(r["tokens"], r["peak_bytes"]) for r in rows if r["method"] == "naive" and r["status"] == "ok"})
    if len(pts) >= 2:
        (t0, p0), (t1, p1) = pts[0], pts[-1]
        return p1 + (p1 - p0) / (t1 - t0) * (tokens - t1)
    return NAIVE_LOGIT_COPIES * tokens * vocab_size * 4


def text_loss_memory(device: str = "auto", quick: bool = False, memory_limit_gib: float = 12.0) -> dict[str, Any]:
    from mmdistill.config import TrainConfig
    from mmdistill.objectives.divergence import LOGITS_BUDGET, _rows_per_chunk

    dev = _device(device)
    load_start = os.getloadavg()[0]
    seq_len, batches = (128, [1, 2]) if quick else (2048, [1, 2, 3, 4])
    vocab_size, hidden, k = (32_768, 256, 128) if quick else (151_936, 1024, 128)
    chunk = {"chunked": TrainConfig.chunk_size, "topk": TrainConfig.chunk_size, "naive": 0}  # the library caps the rows itself
    inputs_bytes = 2 * vocab_size * hidden * 4
    rows: list[dict[str, Any]] = []

    def run(method: str, batch: int, seq: int = seq_len, role: str = "grid") -> None:
        cs = chunk[method]
        row: dict[str, Any] = {"method": method, "batch": batch, "seq_len": seq, "tokens": batch * seq, "chunk_size": cs or None,
                               "rows_per_chunk": _rows_per_chunk(cs, vocab_size) if cs else None, "role": role}
        if method == "naive" and dev.type == "cpu":  # the process total: baseline (inputs, torch) + the loss's peak
            est = _naive_estimate(rows, batch * seq, vocab_size)
            total = est + inputs_bytes + 0.6 * GIB
            if total > memory_limit_gib * GIB:
                rows.append({**row, "status": "skipped", "skipped": f"the process would reach about {total / GIB:.1f} GiB "
                             f"(> {memory_limit_gib:.0f} GiB allowed on this machine); peak estimated from the measured naive rows"})
                return
        cfg = dict(method=method, batch=batch, seq_len=seq, vocab_size=vocab_size, hidden=hidden, device=str(dev), k=k, chunk_size=cs or 1)
        rows.append({**row, **_run_loss_config(cfg)})

    if not quick:  # a second naive point at half the tokens: the per-token slope for the skipped estimates
        run("naive", 1, seq_len // 2, role="calibration")
    for batch in batches:
        for method in LOSS_METHODS:
            run(method, batch)
    for r in rows:
        if r["status"] == "skipped":
            r["estimated_peak_bytes"] = int(_naive_estimate(rows, r["tokens"], vocab_size))
        for key in ("peak_bytes", "estimated_peak_bytes"):
            if key in r:
                r[key.replace("_bytes", "_gib")] = round(r[key] / GIB, 3)
    grid = [r for r in rows if r["role"] == "grid"]
    ran = [r["batch"] for r in grid if r["method"] == "naive" and r["status"] == "ok"]
    peak = {r["method"]: r["peak_bytes"] for r in grid if ran and r["batch"] == max(ran) and r["status"] == "ok"}
    ratio = {m: peak[m] / peak["naive"] if m in peak and "naive" in peak else None for m in ("chunked", "topk")}
    profile = _run_loss_config(dict(method="chunked", batch=1, seq_len=min(seq_len, 512), vocab_size=vocab_size, hidden=hidden,
                                    device=str(dev), chunk_size=chunk["chunked"], profile=True))
    return {
        "benchmark": "text-loss-memory",
        "ratio_chunked_vs_naive": ratio["chunked"],
        "ratio_topk_vs_naive": ratio["topk"],
        "ratio_batch": max(ran) if ran else None,
        "target_ratio_chunked_vs_naive": 0.25,
        "rows": rows,
        "profile_top": {"config": f"chunked, B=1, T={min(seq_len, 512)}, chunk_size {chunk['chunked']} "
                                  f"({_rows_per_chunk(chunk['chunked'], vocab_size)} rows per chunk)", **profile},
        "methods": {
            "chunked": "HiddenCategorical.divergence(HiddenCategorical, beta=1) as a training run calls it (TrainConfig's "
                       f"chunk_size {chunk['chunked']}): objectives/divergence.py chunked_divergence, whose forward/reverse KL "
                       "has a hand-written backward (_LeanKL: three [chunk, V] buffers, no autograd graph per chunk) and whose "
                       f"rows per chunk are capped by a {LOGITS_BUDGET * 4 // 2**20} MiB fp32 logits budget "
                       f"(LOGITS_BUDGET = {LOGITS_BUDGET} elements: {_rows_per_chunk(chunk['chunked'], vocab_size)} rows at "
                       f"V={vocab_size}; `rows_per_chunk` in each row)",
            "topk": f"HiddenCategorical.divergence(teacher.topk({k}), beta=1): teacher top-k + tail computed before the "
                    "baseline (stored offline in practice; `teacher_topk_seconds`), the student chunked and checkpointed",
            "naive": "F.linear to B x T x V logits for both models, log_softmax, F.kl_div(log_target=True), backward",
        },
        "method": (
            "each configuration in a fresh subprocess; inputs (student and teacher hidden states [B,T,H] and heads [V,H], "
            "fp32) are allocated first; peak = " + ("torch.cuda.max_memory_allocated - memory_allocated before" if dev.type == "cuda"
            else "ru_maxrss after the first forward + backward - the resident size just before it") + "; the loss is the reverse "
            "KL mean over tokens with the LM-head matmul from the hidden states, gradients into the student's hidden "
            "states and head; seconds = wall time of that same forward + backward, cpu_seconds = its process CPU time "
            "(one thread: what a quiet machine's wall time would be; configurations run one after another, so on a "
            "shared machine compare cpu_seconds)"
        ),
        "setup": {
            "device": str(dev), "dtype": "float32", "vocab_size": vocab_size, "seq_len": seq_len, "hidden": hidden,
            "batches": batches, "k": k, "chunk_sizes": {m: c or None for m, c in chunk.items()},
            "rows_per_chunk": {m: _rows_per_chunk(c, vocab_size) if c else None for m, c in chunk.items()},
            "logits_budget_elements": LOGITS_BUDGET, "memory_limit_gib": memory_limit_gib,
            "beta": 1.0, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
            "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]}, "machine": platform.machine(),
        },
    }


# ====================================================================== plots


def plot_text_step(result: dict[str, Any], path: Path) -> None:
    """Seconds per step: TRL, mmdistill, and mmdistill's parts stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("TRL GKDTrainer\n(KV cache)", {"step": result["trl_step_seconds"]})]
    if "trl_default_checkpointing_step_seconds" in result:
        bars.append(("TRL GKDTrainer\n(default: checkpointing,\nno KV cache)", {"step": result["trl_default_checkpointing_step_seconds"]}))
    bars += [("mmdistill step", {"step": result["mmdistill_step_seconds"]}), ("mmdistill parts\n(timed alone)", result["parts_seconds"])]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    colors = {"step": "tab:gray", "generate": "tab:blue", "teacher_scoring": "tab:orange", "student_forward_backward_optimizer": "tab:green"}
    seen = set()
    for i, (_, segments) in enumerate(bars):
        bottom = 0.0
        for name, sec in segments.items():
            ax.bar(i, sec, bottom=bottom, color=colors.get(name, "tab:purple"), label=None if name in seen else name.replace("_", " "))
            seen.add(name)
            bottom += sec
        ax.text(i, bottom, f"{bottom:.3f}s", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("seconds per training step (median)")
    s = result["setup"]
    ax.set_title(f"OPD step, batch {s['batch']}, {s['max_new_tokens']} new tokens, V={s['vocab_size']}, {s['device']} "
                 f"x{s['threads']} thread(s)\nratio vs TRL {result['ratio_vs_trl']:.2f}, vs parts {result['ratio_vs_parts']:.2f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_memory(result: dict[str, Any], path: Path) -> None:
    """Peak GiB and seconds per method against batch; naive estimates (skipped runs) hollow and dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    grid = [r for r in result["rows"] if r["role"] == "grid"]
    for i, method in enumerate(LOSS_METHODS):
        color = f"C{i}"
        ok = [r for r in grid if r["method"] == method and r["status"] == "ok"]
        est = [r for r in grid if r["method"] == method and r["status"] == "skipped"]
        ax_mem.plot([r["batch"] for r in ok], [r["peak_gib"] for r in ok], "o-", color=color, label=method)
        ax_time.plot([r["batch"] for r in ok], [r.get("cpu_seconds", r["seconds"]) for r in ok], "o-", color=color, label=f"{method} CPU")
        ax_time.plot([r["batch"] for r in ok], [r["seconds"] for r in ok], ":", color=color, alpha=0.6, label=f"{method} wall")
        if est and ok:
            ax_mem.plot([ok[-1]["batch"]] + [r["batch"] for r in est], [ok[-1]["peak_gib"]] + [r["estimated_peak_gib"] for r in est],
                        "o--", color=color, markerfacecolor="none", label=f"{method} (estimated, not run)")
    s = result["setup"]
    ax_mem.set(xlabel="batch", ylabel="peak memory over baseline (GiB)", title=f"peak, T={s['seq_len']}, V={s['vocab_size']}, H={s['hidden']}")
    ax_time.set(xlabel="batch", ylabel="seconds (forward + backward)", title=f"time (CPU solid, wall dotted), {s['device']} x{s['threads']} thread(s)")
    for ax in (ax_mem, ax_time):
        ax.set_xticks(s["batches"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


BENCHES: dict[str, Callable[..., dict[str, Any]]] = {"text-step": text_step, "text-loss-memory": text_loss_memory}
PLOTS: dict[str, Callable[[dict[str, Any], Path], None]] = {"text-step": plot_text_step, "text-loss-memory": plot_loss_memory}
