"""Text evaluation by generation plus the task's verifier: accuracy, and pass@k with k samples per problem.

mmdistill eval runs/quickstart/student_opd/final --task arith --n 200
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mmdistill.modalities.text.config import TextEvalConfig


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct ("Evaluating Large Language Models Trained on Code", arXiv 2107.03374)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@torch.no_grad()
def evaluate_generation(
    adapter: Any, model: torch.nn.Module, task: Any, cfg: TextEvalConfig, seed: int = 0, show: int = 3
) -> dict[str, Any]:
    """Greedy accuracy (temperature 0) or sampled accuracy on `cfg.n` held-out problems of `cfg.split`;
    pass@k and pass@1 with `cfg.k` samples per problem; the first `show` samples for the report."""
    problems = task.problems(cfg.split, cfg.n, seed=seed)
    if cfg.k > 1 and cfg.temperature <= 0:
        raise ValueError("eval.k > 1 needs eval.temperature > 0 (greedy samples are all the same)")
    gen = torch.Generator(device=adapter.device).manual_seed(10_007 + seed)
    correct = [0] * len(problems)
    samples = []
    for start in range(0, len(problems), cfg.batch_size):
        batch = problems[start : start + cfg.batch_size]
        for _ in range(cfg.k):
            rollout = adapter.sample(model, [p.question for p in batch], cfg.max_new_tokens, cfg.temperature, gen)
            texts = adapter.decode(rollout)
            for i, (p, t) in enumerate(zip(batch, texts)):
                ok = task.reward(p, t) >= 1.0
                correct[start + i] += int(ok)
                if len(samples) < show:
                    samples.append({"question": p.question, "completion": t, "answer": p.answer, "correct": ok})
    n = len(problems)
    out: dict[str, Any] = {
        "n": n,
        "accuracy": sum(c / cfg.k for c in correct) / max(n, 1),
        "samples": samples,
    }
    if cfg.k > 1:
        out[f"pass@{cfg.k}"] = sum(pass_at_k(cfg.k, c, cfg.k) for c in correct) / max(n, 1)
        out["pass@1"] = sum(pass_at_k(cfg.k, c, 1) for c in correct) / max(n, 1)
    return out
