"""text-loss-memory: peak memory and time of the distillation loss forward + backward (LM-head matmul
from the hidden states included) at V=151,936, T=2,048, hidden 1,024, batch 1..4, the loss being the
full-distribution reverse KL(pi_S || pi_T) mean over tokens (docs/objectives.md sections 1.2 and 3): chunked
(`HiddenCategorical.divergence` exactly as a training run calls it, i.e. `mmdistill.kernels.chunked_divergence`:
hand-written backward for KL, rows per chunk capped by the library's logits budget), teacher top-k + tail
(student chunked, `mmdistill.kernels.topk_tail_divergence`), and naive full logits.  Every configuration runs
in a fresh subprocess; CPU peaks are ru_maxrss over the resident size once the inputs exist, CUDA peaks
`torch.cuda.max_memory_allocated`.  Returns a JSON-able dict that `mmdistill bench text-loss-memory` writes,
with a PNG beside it (`plot_loss_memory`).

    OMP_NUM_THREADS=1 mmdistill bench text-loss-memory --out bench/text-loss-memory-cpu.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdistill.bench.common import GIB, current_rss_bytes, peak_rss_bytes, profile_torch_ops, resolve_device, time_call
from mmdistill.config import TrainConfig
from mmdistill.errors import MmdistillError
from mmdistill.kernels import LOGITS_BUDGET, rows_per_chunk
from mmdistill.stepdist import HiddenCategorical

LOSS_METHODS = ("chunked", "topk", "naive")


def loss_inputs(
    batch: int,
    seq_len: int,
    vocab_size: int,
    hidden: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Tensor]:
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


def _hidden_dist(x: dict[str, Tensor], who: str, chunk_size: int) -> HiddenCategorical:
    return HiddenCategorical(x[f"{who}_hidden_B_T_H"], x[f"{who}_head_V_H"], x["mask_B_T"], chunk_size=chunk_size)


def _mean_over_tokens(d_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    return (d_B_T * mask_B_T).sum() / mask_B_T.sum()


def chunked_reverse_kl(x: dict[str, Tensor], chunk_size: int = 1024) -> Tensor:
    """Reverse KL from hidden states by `HiddenCategorical.divergence`, as a training run calls it: at most
    `chunk_size` rows of logits at a time, fewer where the library's logits budget caps them (`rows_per_chunk`)."""
    d_B_T = _hidden_dist(x, "student", chunk_size).divergence(_hidden_dist(x, "teacher", chunk_size), beta=1.0)
    return _mean_over_tokens(d_B_T, x["mask_B_T"])


def teacher_topk(x: dict[str, Tensor], k: int, chunk_size: int = 64) -> Any:
    """The teacher's top-k log-probs plus a tail bucket per token (what a run would store offline)."""
    return _hidden_dist(x, "teacher", chunk_size).topk(k)


def topk_reverse_kl(x: dict[str, Tensor], teacher: Any, chunk_size: int = 1024) -> Tensor:
    """Reverse KL on the teacher's top-k tokens plus one tail bucket, the student chunked."""
    return _mean_over_tokens(_hidden_dist(x, "student", chunk_size).divergence(teacher, beta=1.0), x["mask_B_T"])


def naive_reverse_kl(x: dict[str, Tensor]) -> Tensor:
    """Reverse KL the plain way: full `B x T x V` logits for both models, log_softmax, kl_div (as TRL's GKD loss)."""
    student_logits_B_T_V = F.linear(x["student_hidden_B_T_H"], x["student_head_V_H"])
    with torch.no_grad():
        teacher_logp_B_T_V = F.log_softmax(F.linear(x["teacher_hidden_B_T_H"], x["teacher_head_V_H"]), dim=-1)
    student_logp_B_T_V = F.log_softmax(student_logits_B_T_V, dim=-1)
    del student_logits_B_T_V
    kl = F.kl_div(
        teacher_logp_B_T_V, student_logp_B_T_V, reduction="sum", log_target=True
    )  # sum p_S (log p_S - log p_T)
    return kl / x["mask_B_T"].sum()


def loss_worker(
    method: str,
    batch: int,
    seq_len: int,
    vocab_size: int,
    hidden: int,
    device: str = "cpu",
    k: int = 128,
    chunk_size: int = 1024,
    repeats: int = 1,
    profile: bool = False,
) -> dict[str, Any]:
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
    run = {
        "chunked": lambda: chunked_reverse_kl(x, chunk_size),
        "topk": lambda: topk_reverse_kl(x, teacher, chunk_size),
        "naive": lambda: naive_reverse_kl(x),
    }[method]

    def forward_backward() -> Tensor:
        for t in (x["student_hidden_B_T_H"], x["student_head_V_H"]):
            t.grad = None
        loss = run()
        loss.backward()
        return loss

    if profile:
        return {"profile_top": profile_torch_ops(forward_backward)}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = current_rss_bytes()
        extra["baseline_slack_bytes"] = peak_rss_bytes() - base
    seconds, cpu_seconds = [], []
    extra["load_average_1m"] = os.getloadavg()[0]
    for _ in range(max(repeats, 1)):
        cpu0 = time.process_time()
        seconds.append(time_call(lambda: extra.update(loss=float(forward_backward().detach())), dev))
        cpu_seconds.append(time.process_time() - cpu0)
        if len(seconds) == 1:
            peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss_bytes()) - base
    return {
        "peak_bytes": int(peak),
        "seconds": statistics.median(seconds),
        "cpu_seconds": statistics.median(cpu_seconds),
        "seconds_all": seconds,
        "baseline_bytes": base,
        **extra,
    }


def _run_loss_config(cfg: dict[str, Any], timeout_s: float = 3600) -> dict[str, Any]:
    """`loss_worker(**cfg)` in a fresh Python process; its JSON is the last stdout line."""
    code = (
        "import json, sys; from mmdistill.bench.text_loss_memory import loss_worker; "
        "print(json.dumps(loss_worker(**json.loads(sys.argv[1]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True, timeout=timeout_s
    )
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
    dev = resolve_device(device)
    load_start = os.getloadavg()[0]
    seq_len, batches = (128, [1, 2]) if quick else (2048, [1, 2, 3, 4])
    vocab_size, hidden, k = (32_768, 256, 128) if quick else (151_936, 1024, 128)
    chunk = {
        "chunked": TrainConfig.chunk_size,
        "topk": TrainConfig.chunk_size,
        "naive": 0,
    }  # the library caps the rows itself
    inputs_bytes = 2 * vocab_size * hidden * 4
    rows: list[dict[str, Any]] = []

    def run(method: str, batch: int, seq: int = seq_len, role: str = "grid") -> None:
        cs = chunk[method]
        row: dict[str, Any] = {
            "method": method,
            "batch": batch,
            "seq_len": seq,
            "tokens": batch * seq,
            "chunk_size": cs or None,
            "rows_per_chunk": rows_per_chunk(cs, vocab_size) if cs else None,
            "role": role,
        }
        if method == "naive" and dev.type == "cpu":  # the process total: baseline (inputs, torch) + the loss's peak
            est = _naive_estimate(rows, batch * seq, vocab_size)
            total = est + inputs_bytes + 0.6 * GIB
            if total > memory_limit_gib * GIB:
                rows.append(
                    {
                        **row,
                        "status": "skipped",
                        "skipped": f"the process would reach about {total / GIB:.1f} GiB "
                        f"(> {memory_limit_gib:.0f} GiB allowed on this machine); peak estimated from the measured naive rows",
                    }
                )
                return
        cfg = dict(
            method=method,
            batch=batch,
            seq_len=seq,
            vocab_size=vocab_size,
            hidden=hidden,
            device=str(dev),
            k=k,
            chunk_size=cs or 1,
        )
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
    profile = _run_loss_config(
        dict(
            method="chunked",
            batch=1,
            seq_len=min(seq_len, 512),
            vocab_size=vocab_size,
            hidden=hidden,
            device=str(dev),
            chunk_size=chunk["chunked"],
            profile=True,
        )
    )
    return {
        "benchmark": "text-loss-memory",
        "ratio_chunked_vs_naive": ratio["chunked"],
        "ratio_topk_vs_naive": ratio["topk"],
        "ratio_batch": max(ran) if ran else None,
        "target_ratio_chunked_vs_naive": 0.25,
        "rows": rows,
        "profile_top": {
            "config": f"chunked, B=1, T={min(seq_len, 512)}, chunk_size {chunk['chunked']} "
            f"({rows_per_chunk(chunk['chunked'], vocab_size)} rows per chunk)",
            **profile,
        },
        "methods": {
            "chunked": "HiddenCategorical.divergence(HiddenCategorical, beta=1) as a training run calls it (TrainConfig's "
            f"chunk_size {chunk['chunked']}): mmdistill/kernels.py chunked_divergence, whose forward/reverse KL "
            "has a hand-written backward (_LeanKL: three [chunk, V] buffers, no autograd graph per chunk) and whose "
            f"rows per chunk are capped by a {LOGITS_BUDGET * 4 // 2**20} MiB fp32 logits budget "
            f"(LOGITS_BUDGET = {LOGITS_BUDGET} elements: {rows_per_chunk(chunk['chunked'], vocab_size)} rows at "
            f"V={vocab_size}; `rows_per_chunk` in each row)",
            "topk": f"HiddenCategorical.divergence(teacher.topk({k}), beta=1): teacher top-k + tail computed before the "
            "baseline (stored offline in practice; `teacher_topk_seconds`), the student chunked and checkpointed",
            "naive": "F.linear to B x T x V logits for both models, log_softmax, F.kl_div(log_target=True), backward",
        },
        "method": (
            "each configuration in a fresh subprocess; inputs (student and teacher hidden states [B,T,H] and heads [V,H], "
            "fp32) are allocated first; peak = "
            + (
                "torch.cuda.max_memory_allocated - memory_allocated before"
                if dev.type == "cuda"
                else "ru_maxrss after the first forward + backward - the resident size just before it"
            )
            + "; the loss is the reverse "
            "KL mean over tokens with the LM-head matmul from the hidden states, gradients into the student's hidden "
            "states and head; seconds = wall time of that same forward + backward, cpu_seconds = its process CPU time "
            "(one thread: what a quiet machine's wall time would be; configurations run one after another, so on a "
            "shared machine compare cpu_seconds)"
        ),
        "setup": {
            "device": str(dev),
            "dtype": "float32",
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "hidden": hidden,
            "batches": batches,
            "k": k,
            "chunk_sizes": {m: c or None for m, c in chunk.items()},
            "rows_per_chunk": {m: rows_per_chunk(c, vocab_size) if c else None for m, c in chunk.items()},
            "logits_budget_elements": LOGITS_BUDGET,
            "memory_limit_gib": memory_limit_gib,
            "beta": 1.0,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpus": os.cpu_count(),
            "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
            "machine": platform.machine(),
        },
    }


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
        ax_time.plot(
            [r["batch"] for r in ok],
            [r.get("cpu_seconds", r["seconds"]) for r in ok],
            "o-",
            color=color,
            label=f"{method} CPU",
        )
        ax_time.plot(
            [r["batch"] for r in ok], [r["seconds"] for r in ok], ":", color=color, alpha=0.6, label=f"{method} wall"
        )
        if est and ok:
            ax_mem.plot(
                [ok[-1]["batch"]] + [r["batch"] for r in est],
                [ok[-1]["peak_gib"]] + [r["estimated_peak_gib"] for r in est],
                "o--",
                color=color,
                markerfacecolor="none",
                label=f"{method} (estimated, not run)",
            )
    s = result["setup"]
    ax_mem.set(
        xlabel="batch",
        ylabel="peak memory over baseline (GiB)",
        title=f"peak, T={s['seq_len']}, V={s['vocab_size']}, H={s['hidden']}",
    )
    ax_time.set(
        xlabel="batch",
        ylabel="seconds (forward + backward)",
        title=f"time (CPU solid, wall dotted), {s['device']} x{s['threads']} thread(s)",
    )
    for ax in (ax_mem, ax_time):
        ax.set_xticks(s["batches"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
