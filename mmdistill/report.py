"""Run reports: the table printed at the end of a run, report.json, and report.png (the
evaluated models as bars beside every training stage's curves).

    mmdistill train configs/text/quickstart.yaml   # writes runs/quickstart/report.{json,png}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mmdistill.metrics import read_jsonl


def headline(ev: dict[str, Any]) -> dict[str, float]:
    """The scalar results of an evaluation (accuracy, pass@k, rewards), without counts and samples."""
    return {k: float(v) for k, v in ev.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"}


def build_report(stage_results: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Every eval stage's keys at the top level (`teacher_accuracy: 0.93`), plus per-stage details."""
    report: dict[str, Any] = {}
    for name, res in stage_results.items():
        if res.get("kind") == "eval":
            for key, r in res["results"].items():
                # text: the accuracy; flow: {color_reward: .., position_reward: ..}; robots also
                # {success_by_task: {...}, video: path}
                report[key] = r["accuracy"] if "accuracy" in r else headline(r) | _details(r)
        elif "accuracy" in res["eval"]:
            report[f"{name}_final_accuracy"] = res["eval"]["accuracy"]
        else:
            report[f"{name}_final"] = headline(res["eval"])
    t, b, a = (report.get(k) for k in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"))
    if None not in (t, b, a) and t > b:
        report["gap_closed"] = (a - b) / (t - b)
    report["stages"] = {
        n: {k: v for k, v in r.items() if k != "eval"} | (headline(r["eval"]) if "eval" in r else {})
        for n, r in stage_results.items()
    }
    report["seconds"] = round(seconds, 1)
    return report


def _details(r: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's per-group results (dicts of numbers) and its video or image path."""
    return {
        k: v
        for k, v in r.items()
        if (isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())) or k == "video"
    }


def print_table(report: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in report.items() if isinstance(v, float) and k != "seconds"]
    nested = [(k, headline(v)) for k, v in report.items() if isinstance(v, dict) and k != "stages"]
    nested = [(k, v) for k, v in nested if v]
    if rows:
        w = max(len(k) for k, _ in rows)
        print("-" * (w + 12))
        for k, v in rows:
            print(f"{k:<{w}}  {v:8.3f}")
        print("-" * (w + 12))
    if nested:  # one row per model, one column per metric
        cols = list(dict.fromkeys(c for _, v in nested for c in v))
        w = max(len(k) for k, _ in nested)
        cw = {c: max(15, len(c)) for c in cols}  # long metric names (lm-eval's task/metric/filter) keep their column
        print(f"{'':<{w}}  " + "  ".join(f"{c:>{cw[c]}}" for c in cols))
        for k, v in nested:
            print(f"{k:<{w}}  " + "  ".join(f"{v[c]:{cw[c]}.3f}" if c in v else f"{'':>{cw[c]}}" for c in cols))


NOT_SCORES = ("decisions",)  # evaluation counts left out of the results bar chart


def plot_report(stage_results: dict[str, Any], run_dir: Path, png: Path) -> None:
    """Bar chart of the evaluated models, next to the training curves of every stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [
        (k, headline(r))
        for res in stage_results.values()
        if res.get("kind") == "eval"
        for k, r in res["results"].items()
    ]
    curves = [(n, run_dir / n / "metrics.jsonl") for n, r in stage_results.items() if r.get("kind") == "train"]
    curves = [(n, p) for n, p in curves if p.exists()]
    if not evals and not curves:
        return
    # the results bar chart, then one panel of curves per training stage (training reward, evaluations),
    # and, when the adapter logs it (robot policies), the policy entropy of every stage in one panel
    entropy = [(n, [(r["step"], r["entropy"]) for r in read_jsonl(p) if "entropy" in r]) for n, p in curves]
    entropy = [(n, pts) for n, pts in entropy if pts]
    panels = len(curves) + (1 if entropy else 0)
    cols = 3
    rows_n = 1 + math.ceil(panels / cols) if panels else 1
    fig = plt.figure(figsize=(12, 3.6 * rows_n))
    grid = fig.add_gridspec(rows_n, cols)
    ax0 = fig.add_subplot(grid[0, :])
    if evals:  # grouped horizontal bars: one group per model, one bar per metric
        metrics = list(
            dict.fromkeys(m for _, h in evals for m in h if not m.startswith("pass@") and m not in NOT_SCORES)
        )
        height = 0.8 / max(len(metrics), 1)
        for j, m in enumerate(metrics):
            ys = [i + j * height for i in range(len(evals))]
            vals = [h.get(m, 0.0) for _, h in evals]
            ax0.barh(ys, vals, height=height, label=m)
            for y, v in zip(ys, vals):
                ax0.text(v + 0.01, y, f"{v:.3f}", va="center", fontsize=7)
        ax0.set_yticks([i + 0.4 - height / 2 for i in range(len(evals))], [k for k, _ in evals])
        allv = [v for _, h in evals for k, v in h.items() if k in metrics]
        ax0.set_xlim(min(0.0, min(allv) * 1.15), max(1.1, max(allv) * 1.15))
        ax0.set_xlabel("held-out score")
        if len(metrics) > 1:
            ax0.legend(fontsize=7, loc="lower right")
    for i, (name, path) in enumerate(curves):
        ax = fig.add_subplot(grid[1 + i // cols, i % cols])
        rows = read_jsonl(path)
        key = next((k for k in ("student_reward", "teacher_reward") if any(k in r for r in rows)), None)
        if key:
            ax.plot(
                [r["step"] for r in rows if key in r],
                [r[key] for r in rows if key in r],
                lw=0.8,
                alpha=0.6,
                label=f"train: {key}",
            )
        final = headline(stage_results[name].get("eval", {}))  # the stage's final evaluation ends each curve
        for j, m in enumerate(
            dict.fromkeys([k[len("eval_") :] for r in rows for k in r if k.startswith("eval_")] + list(final))
        ):
            if m.startswith("pass@") or m in NOT_SCORES:
                continue
            ev = [(r["step"], r[f"eval_{m}"]) for r in rows if f"eval_{m}" in r]
            if m in final:
                ev.append((stage_results[name].get("steps", ev[-1][0] if ev else 0), final[m]))
            ax.plot(*zip(*ev), "o--", color=f"C{j}", label=m)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        if ys and 0 <= min(ys) and max(ys) <= 1:
            ax.set_ylim(0, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    if entropy:
        ax = fig.add_subplot(grid[1 + len(curves) // cols, len(curves) % cols])
        for j, (name, pts) in enumerate(entropy):
            ax.plot(*zip(*pts), "-", color=f"C{j}", label=name)
        ax.set_title("policy entropy per decision (training rollouts)", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
