"""Compare runs of one config over seeds: a table (mean and spread) and evaluation curves.

Each run directory holds `report.json` (the eval stage's results) and, per train stage,
`metrics.jsonl` with `eval_<metric>` rows every `train.eval_every` steps.  For every stage
the curves of all seeds are averaged on their common steps; with `--gap FROM TO` each stage
also gets the first step at which it closed `--fraction` (default 0.9) of the gap between
model FROM and model TO (report keys), per seed, and curves start at FROM's result; a stage that never got there counts as
"more than its last step".

    mmdistill compare runs/evidence_a/s0 runs/evidence_a/s1 runs/evidence_a/s2 \
        --gap weak_student teacher --out runs/evidence_a/summary
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from mmdistill.errors import MmdistillError


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def load_run(run: Path, metric: str) -> dict[str, Any]:
    """The report's scalar results and every train stage's evaluation curve of `metric`."""
    report_path = run / "report.json"
    if not report_path.exists():
        raise MmdistillError(f"{run}: no report.json; finish the run first (mmdistill train --resume {run})")
    report = json.loads(report_path.read_text())
    results = {k: v for k, v in report.items() if isinstance(v, (int, float)) and k != "seconds"}
    curves: dict[str, list[tuple[int, float]]] = {}
    for metrics in sorted(run.glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        pts = [(int(r["step"]), float(r[f"eval_{metric}"])) for r in rows if f"eval_{metric}" in r]
        stage = metrics.parent.name
        final = report.get("stages", {}).get(stage, {})
        if pts and metric in final:  # the stage's final evaluation closes its curve
            pts.append((int(final.get("steps", pts[-1][0])), float(final[metric])))
        if pts:
            curves[stage] = sorted(dict(pts).items())
    return {"results": results, "curves": curves}


def first_reaching(curve: list[tuple[int, float]], target: float) -> tuple[int, bool]:
    """(first step with value >= target, True) or (last step, False) when it never got there."""
    for step, value in curve:
        if value >= target:
            return step, True
    return (curve[-1][0] if curve else 0), False


def compare(
    runs: list[Path],
    out: Path,
    metric: str = "accuracy",
    gap: tuple[str, str] | None = None,
    fraction: float = 0.9,
    title: str | None = None,
) -> dict[str, Any]:
    loaded = [load_run(Path(r), metric) for r in runs]
    if gap is not None:  # stages trained from FROM start at its result (step 0)
        for x in loaded:
            for st, pts in x["curves"].items():
                if len(pts) > 1 and gap[0] in x["results"]:
                    x["curves"][st] = [(0, x["results"][gap[0]])] + [p for p in pts if p[0] != 0]
    keys = sorted(set.intersection(*(set(x["results"]) for x in loaded)))
    keys = [
        k for k in keys if not (k.endswith(f"_final_{metric}") and k[: -len(f"_final_{metric}")] in keys)
    ]  # eval-stage twins
    table = {k: dict(zip(("mean", "std"), _mean_std([x["results"][k] for x in loaded]))) for k in keys}
    stages = sorted(set.intersection(*(set(x["curves"]) for x in loaded)))
    curves = {}
    for st in stages:
        common = sorted(set.intersection(*(set(s for s, _ in x["curves"][st]) for x in loaded)))
        vals = [[dict(x["curves"][st])[s] for x in loaded] for s in common]
        curves[st] = {
            "step": common,
            "mean": [statistics.fmean(v) for v in vals],
            "std": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals],
        }
    summary: dict[str, Any] = {"runs": [str(r) for r in runs], "metric": metric, "table": table, "curves": curves}
    trained = {st: c for st, c in curves.items() if len(c["step"]) > 1}
    if len(trained) > 1:  # every curve at the last step they all reached: equal student updates
        step = min(c["step"][-1] for c in trained.values())
        at = {st: [dict(x["curves"][st])[step] for x in loaded] for st, c in trained.items() if step in c["step"]}
        summary["equal_steps"] = {
            "step": step,
            **{st: dict(zip(("mean", "std"), _mean_std(v))) for st, v in at.items()},
        }
    if gap is not None:
        lo_key, hi_key = gap
        missing = [k for k in gap if k not in keys]
        if missing:
            raise MmdistillError(f"--gap: {missing} are not report keys of every run; choose from {keys}")
        reach: dict[str, Any] = {}
        for st in stages:
            per_seed = []
            for x in loaded:
                lo, hi = x["results"][lo_key], x["results"][hi_key]
                target = lo + fraction * (hi - lo)
                step, ok = first_reaching(x["curves"][st], target)
                per_seed.append({"target": target, "step": step, "reached": ok})
            reach[st] = per_seed
        summary["gap"] = {"from": lo_key, "to": hi_key, "fraction": fraction, "steps_to_target": reach}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(_markdown(summary))
    _plot(summary, out / "curves.png", title or out.name)
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    n = len(summary["runs"])
    lines = [f"{summary['metric']} over {n} seed(s): mean ± std", "", "| model | mean | std |", "|---|---|---|"]
    lines += [f"| {k} | {v['mean']:.3f} | {v['std']:.3f} |" for k, v in summary["table"].items()]
    if "equal_steps" in summary:
        eq = dict(summary["equal_steps"])
        step = eq.pop("step")
        lines += ["", f"At equal student updates ({step}):", "", "| stage | mean | std |", "|---|---|---|"]
        lines += [f"| {st} | {v['mean']:.3f} | {v['std']:.3f} |" for st, v in eq.items()]
    if "gap" in summary:
        g = summary["gap"]
        lines += [
            "",
            f"Steps to close {g['fraction']:.0%} of the gap {g['from']} -> {g['to']} (per seed; '>' = not reached)",
            "",
            "| stage | steps per seed |",
            "|---|---|",
        ]
        for st, per in g["steps_to_target"].items():
            lines.append(f"| {st} | {', '.join(('' if p['reached'] else '>') + str(p['step']) for p in per)} |")
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for st, c in summary["curves"].items():
        lo = [m - s for m, s in zip(c["mean"], c["std"])]
        hi = [m + s for m, s in zip(c["mean"], c["std"])]
        ax.plot(c["step"], c["mean"], marker="o", ms=3, label=st)
        ax.fill_between(c["step"], lo, hi, alpha=0.2)
    for key, style in (("teacher", "--"),):
        if key in summary["table"]:
            level = summary["table"][key]["mean"]
            ax.axhline(level, ls=style, c="k", lw=1, label=f"{key} (mean)")
            ax.set_ylim(top=max(ax.get_ylim()[1], level + 0.02))
    if "gap" in summary:
        targets = [p["target"] for per in summary["gap"]["steps_to_target"].values() for p in per]
        if targets:
            ax.axhline(
                statistics.fmean(targets), ls=":", c="gray", lw=1, label=f"{summary['gap']['fraction']:.0%} of the gap"
            )
    ax.set_xlabel("student updates")
    ax.set_ylabel(f"held-out {summary['metric']}")
    ax.set_title(f"{title} ({len(summary['runs'])} seeds, mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
