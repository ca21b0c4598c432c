"""text-step: one on-policy distillation step against TRL.  The student samples with a KV cache, the
teacher scores the student's tokens, full-distribution reverse KL(pi_S || pi_T) forward + backward (the
registered `reverse_kl` objective, docs/objectives.md section 1.2), AdamW step; by mmdistill's own code path
(`CausalLMAdapter.sample` + `.step_dist` + `OBJECTIVES.get("reverse_kl")` + AdamW) against TRL's
`GKDTrainer` (beta=1, lmbda=1: "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes", arXiv 2306.13649) on the same tiny random-init Qwen3 models, prompts, batch, new tokens and
temperature, interleaved in one process.  `ratio_vs_trl` = mmdistill / TRL (target <= 0.5);
`ratio_vs_parts` = step / the sum of its parts timed alone (target <= 1.15).  Returns a JSON-able dict
that `mmdistill bench text-step` writes, with a PNG beside it (`plot_text_step`).

    pip install -e .[bench]
    OMP_NUM_THREADS=1 mmdistill bench text-step --out bench/text-step-cpu.json
"""

from __future__ import annotations

import copy
import itertools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmdistill.bench.common import profile_python, resolve_device, sync, time_call
from mmdistill.errors import MmdistillError
from mmdistill.interfaces import ObjectiveBatch, Rollout
from mmdistill.modalities.text.config import TinyLMConfig
from mmdistill.registry import OBJECTIVES

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
    return [
        " ".join(vocab[(i * words_per_question + j) % len(vocab)] for j in range(words_per_question))
        for i in range(batch)
    ]


@dataclass
class StepSetup:
    """What both sides of the text-step benchmark share."""

    adapter: Any
    teacher: torch.nn.Module
    student: torch.nn.Module  # mmdistill's copy
    questions: list[str]
    max_new_tokens: int
    temperature: float
    objective: Any  # the registered `reverse_kl` objective (`OBJECTIVES.get("reverse_kl")()`)
    lr: float = 1e-4
    max_grad_norm: float = 1.0


def build_step_setup(
    device: torch.device,
    batch: int = 8,
    max_new_tokens: int = 64,
    vocab_size: int = 512,
    student: TinyLMConfig = STUDENT,
    teacher: TinyLMConfig = TEACHER,
    temperature: float = 1.0,
) -> StepSetup:
    from mmdistill.modalities.text.adapter import CausalLMAdapter
    from mmdistill.modalities.text.hf import build_tiny_lm

    tok = bench_tokenizer(vocab_size)
    adapter = CausalLMAdapter(tok, device=device)
    # No token id is -1: every row samples all max_new_tokens (TRL's side: eos_token_id None).
    adapter.eos_id = -1
    teacher_model = build_tiny_lm(teacher, tok).to(device).eval().requires_grad_(False)
    student_model = build_tiny_lm(student, tok).to(device)
    objective = OBJECTIVES.get("reverse_kl")()
    return StepSetup(
        adapter, teacher_model, student_model, bench_questions(tok, batch), max_new_tokens, temperature, objective
    )


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW as `mmdistill train` builds it."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0, betas=(0.9, 0.99)
    )


def reverse_kl_loss(s: StepSetup, teacher_dist: Any, rollout: Rollout) -> Tensor:
    """Full-distribution reverse KL(pi_S || pi_T) on the rollout's states, summed over its tokens and divided by
    their number, by the registered `reverse_kl` objective on the student's step distribution (as `mmdistill train`
    computes it for one micro-batch that is the whole batch)."""
    student_dist = s.adapter.step_dist(s.student, rollout, s.objective.temperature)
    batch = ObjectiveBatch(
        rollout=rollout, student=student_dist, teacher=teacher_dist, normalizer=float(max(rollout.num_steps(), 1))
    )
    loss, _ = s.objective(batch)
    return loss


def score_teacher(s: StepSetup, rollout: Rollout) -> Any:
    """The teacher's step distribution on the student's states, without gradient."""
    with torch.no_grad():
        return s.adapter.step_dist(s.teacher, rollout, s.objective.temperature)


def update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor, max_grad_norm: float) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reverse_kl_step(s: StepSetup, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> float:
    """One on-policy distillation step with the full-distribution reverse KL, by mmdistill's code path: sample,
    score the teacher, `reverse_kl_loss`, backward, clip, AdamW.  Returns the loss."""
    rollout = s.adapter.sample(s.student, s.questions, s.max_new_tokens, s.temperature, generator)
    teacher_dist = score_teacher(s, rollout)
    loss = reverse_kl_loss(s, teacher_dist, rollout)
    update(s.student, optimizer, loss, s.max_grad_norm)
    return float(loss.detach())


def step_parts(
    s: StepSetup, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> dict[str, Callable[[], Any]]:
    """The three parts of `reverse_kl_step`, each callable alone (they share the last rollout)."""
    last: dict[str, Any] = {}

    def generate() -> None:
        last["rollout"] = s.adapter.sample(s.student, s.questions, s.max_new_tokens, s.temperature, generator)

    def teacher_scoring() -> None:
        last["teacher"] = score_teacher(s, last["rollout"])

    def student_update() -> None:
        update(s.student, optimizer, reverse_kl_loss(s, last["teacher"], last["rollout"]), s.max_grad_norm)

    generate(), teacher_scoring()
    return {
        "generate": generate,
        "teacher_scoring": teacher_scoring,
        "student_forward_backward_optimizer": student_update,
    }


def _import_trl() -> Any:
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        try:
            from trl import GKDConfig, GKDTrainer
        except ImportError:
            raise MmdistillError(
                "text-step compares against TRL, which is not installed: pip install -e .[bench]"
            ) from None
    return GKDConfig, GKDTrainer


def build_trl_trainer(
    s: StepSetup,
    student: torch.nn.Module,
    device: torch.device,
    max_steps: int,
    callbacks: list,
    out_dir: str,
    activation_checkpointing: bool = False,
) -> Any:
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
        rows.append(
            {"prompt": prompt, "input_ids": tok(prompt, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]}
        )
    checkpointing = {
        n: activation_checkpointing
        for n in ("gradient_checkpointing", "activation_checkpointing")
        if n in GKDConfig.__dataclass_fields__
    }  # the second is transformers 5's name
    args = GKDConfig(
        output_dir=out_dir,
        max_steps=max_steps,
        per_device_train_batch_size=len(s.questions),
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta2=0.99,
        optim="adamw_torch",
        max_grad_norm=s.max_grad_norm,
        temperature=s.temperature,
        lmbda=1.0,
        beta=1.0,
        max_new_tokens=s.max_new_tokens,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        seed=0,
        bf16=False,
        fp16=False,
        **checkpointing,
    )
    return GKDTrainer(
        model=student,
        teacher_model=copy.deepcopy(s.teacher),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=callbacks,
    )


class _Generated:
    """Wraps GKDTrainer.generate_on_policy_outputs to record how many tokens each TRL step generated."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn, self.new_tokens, self.pad_in_completion = fn, [], 0

    def __call__(self, model: Any, inputs: dict, generation_config: Any, pad_token_id: int | None = None) -> Any:
        ids, attn, labels = self.fn(model, inputs, generation_config, pad_token_id)
        completion = ids[:, inputs["prompts"].shape[1] :]
        self.new_tokens.append(int(completion.shape[1]))
        self.pad_in_completion += int((completion == pad_token_id).sum())
        return ids, attn, labels


def interleaved_with_trl(
    s: StepSetup,
    student: torch.nn.Module,
    device: torch.device,
    steps: int,
    ours: dict[str, Callable[[], Any]],
    activation_checkpointing: bool = False,
) -> tuple[dict[str, list[float]], _Generated]:
    """Seconds of `steps` TRL training steps, each followed by one timed call of every function in `ours`.

    A callback times TRL's step from on_step_begin to on_step_end (on-policy generation, teacher and student
    forward, loss, backward, clipping, optimizer, scheduler, zero_grad) and then runs ours, so all alternate.
    """
    from transformers import TrainerCallback

    times: dict[str, list[float]] = {"trl": [], **{k: [] for k in ours}}

    class Interleave(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            times["trl"].append(time.perf_counter() - self.t0)
            for k, fn in ours.items():
                times[k].append(time_call(fn, device))

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trl_trainer(s, student, device, steps, [Interleave()], out_dir, activation_checkpointing)
        recorder = trainer.generate_on_policy_outputs = _Generated(trainer.generate_on_policy_outputs)
        trainer.train()
    if set(recorder.new_tokens) != {s.max_new_tokens}:
        raise MmdistillError(
            f"TRL generated {sorted(set(recorder.new_tokens))} new tokens per step, expected {s.max_new_tokens}: "
            "the two sides did not do the same work"
        )
    return times, recorder


def text_step(device: str = "auto", quick: bool = False) -> dict[str, Any]:
    from mmdistill.pipeline import quiet_library_logs

    _import_trl()
    import transformers
    import trl

    quiet_library_logs()
    dev = resolve_device(device)
    load_start = os.getloadavg()[0]
    batch, new_tokens, warmup, repeats = (2, 8, 1, 2) if quick else (8, 64, 2, 10)
    student_cfg, teacher_cfg, vocab_size = (STUDENT_QUICK, TEACHER_QUICK, 128) if quick else (STUDENT, TEACHER, 512)
    s = build_step_setup(
        dev, batch=batch, max_new_tokens=new_tokens, vocab_size=vocab_size, student=student_cfg, teacher=teacher_cfg
    )
    initial_student = copy.deepcopy(s.student)
    optimizer = make_optimizer(s.student, s.lr)
    gen = torch.Generator(device=dev).manual_seed(0)
    step = lambda: reverse_kl_step(s, optimizer, gen)  # noqa: E731
    times, recorder = interleaved_with_trl(
        s, initial_student, dev, warmup + repeats, {"mmdistill": step, **step_parts(s, optimizer, gen)}
    )
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
        times_ckpt, _ = interleaved_with_trl(
            s, initial_student, dev, warmup + repeats, {"mmdistill": step}, activation_checkpointing=True
        )
        ckpt = {k: statistics.median(v[warmup:]) for k, v in times_ckpt.items()}
        result["trl_default_checkpointing_step_seconds"] = ckpt["trl"]
        result["ratio_vs_trl_default_checkpointing"] = ckpt["mmdistill"] / ckpt["trl"]
        timed.update({f"{k}_vs_trl_default_checkpointing": v[warmup:] for k, v in times_ckpt.items()})
    if result["ratio_vs_trl"] > 0.5 or result["ratio_vs_parts"] > 1.15:
        result["profile_top"] = profile_python(step)
    result.update(
        {
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
                "student_forward_backward_optimizer": "adapter.step_dist(student), the registered reverse_kl objective (teacher head applied chunk by chunk "
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
                "device": str(dev),
                "dtype": "float32",
                "batch": batch,
                "max_new_tokens": new_tokens,
                "prompt_tokens": int(s.adapter.encode_prompts(s.questions[:1])[0].shape[1]),
                "temperature": s.temperature,
                "beta": 1.0,
                "lmbda": 1.0,
                "lr": s.lr,
                "vocab_size": s.adapter.vocab_size,
                "teacher": _model_desc(teacher_cfg, s.teacher),
                "student": _model_desc(student_cfg, s.student),
                "warmup": warmup,
                "repeats": repeats,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
                "threads": torch.get_num_threads(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "cpus": os.cpu_count(),
                "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
                "machine": platform.machine(),
            },
            "times": timed,
        }
    )
    return result


def _model_desc(cfg: TinyLMConfig, model: torch.nn.Module) -> dict[str, Any]:
    return {
        "arch": cfg.arch,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def plot_text_step(result: dict[str, Any], path: Path) -> None:
    """Seconds per step: TRL, mmdistill, and mmdistill's parts stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("TRL GKDTrainer\n(KV cache)", {"step": result["trl_step_seconds"]})]
    if "trl_default_checkpointing_step_seconds" in result:
        bars.append(
            (
                "TRL GKDTrainer\n(default: checkpointing,\nno KV cache)",
                {"step": result["trl_default_checkpointing_step_seconds"]},
            )
        )
    bars += [
        ("mmdistill step", {"step": result["mmdistill_step_seconds"]}),
        ("mmdistill parts\n(timed alone)", result["parts_seconds"]),
    ]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    colors = {
        "step": "tab:gray",
        "generate": "tab:blue",
        "teacher_scoring": "tab:orange",
        "student_forward_backward_optimizer": "tab:green",
    }
    seen = set()
    for i, (_, segments) in enumerate(bars):
        bottom = 0.0
        for name, sec in segments.items():
            ax.bar(
                i,
                sec,
                bottom=bottom,
                color=colors.get(name, "tab:purple"),
                label=None if name in seen else name.replace("_", " "),
            )
            seen.add(name)
            bottom += sec
        ax.text(i, bottom, f"{bottom:.3f}s", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("seconds per training step (median)")
    s = result["setup"]
    ax.set_title(
        f"OPD step, batch {s['batch']}, {s['max_new_tokens']} new tokens, V={s['vocab_size']}, {s['device']} "
        f"x{s['threads']} thread(s)\nratio vs TRL {result['ratio_vs_trl']:.2f}, vs parts {result['ratio_vs_parts']:.2f}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
