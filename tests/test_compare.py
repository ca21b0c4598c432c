"""`mmdistill compare`: tables over seeds, curves on common steps, steps to close a gap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdistill.compare import compare, first_reaching
from mmdistill.errors import MmdistillError


def fake_run(root: Path, weak: float, teacher: float, curve: list[tuple[int, float]], final: float) -> Path:
    root.mkdir(parents=True)
    (root / "report.json").write_text(
        json.dumps(
            {
                "weak": weak,
                "teacher": teacher,
                "opd": final,
                "seconds": 3.0,
                "stages": {"opd": {"steps": 100, "accuracy": final}},
            }
        )
    )
    (root / "opd").mkdir()
    rows = [{"step": s, "loss": 1.0} for s in range(5, 101, 5)] + [{"step": s, "eval_accuracy": v} for s, v in curve]
    (root / "opd" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_first_reaching():
    assert first_reaching([(25, 0.1), (50, 0.5), (75, 0.9)], 0.5) == (50, True)
    assert first_reaching([(25, 0.1), (50, 0.4)], 0.5) == (50, False)


def test_compare_table_curves_and_gap(tmp_path):
    a = fake_run(tmp_path / "s0", 0.2, 1.0, [(25, 0.5), (50, 0.95), (75, 0.96)], 0.97)
    b = fake_run(tmp_path / "s1", 0.4, 1.0, [(25, 0.6), (50, 0.8), (75, 0.95)], 0.99)
    s = compare([a, b], tmp_path / "out", gap=("weak", "teacher"), fraction=0.9)
    assert s["table"]["opd"]["mean"] == pytest.approx(0.98) and s["table"]["opd"]["std"] == pytest.approx(
        0.0141421, rel=1e-4
    )
    assert s["curves"]["opd"]["step"] == [0, 25, 50, 75, 100]
    assert s["curves"]["opd"]["mean"][0] == pytest.approx(0.3) and s["curves"]["opd"]["mean"][2] == pytest.approx(0.875)
    reach = s["gap"]["steps_to_target"]["opd"]
    assert [r["step"] for r in reach] == [50, 75] and all(r["reached"] for r in reach)  # targets 0.92 and 0.94
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0
    assert "| opd | 0.980 | 0.014 |" in (tmp_path / "out" / "summary.md").read_text()


def test_compare_refuses_unfinished_runs_and_unknown_keys(tmp_path):
    with pytest.raises(MmdistillError, match="no report.json"):
        compare([tmp_path / "missing"], tmp_path / "out")
    a = fake_run(tmp_path / "s0", 0.2, 1.0, [(25, 0.5)], 0.6)
    with pytest.raises(MmdistillError, match="not report keys"):
        compare([a], tmp_path / "out", gap=("student", "teacher"))


def test_compare_cli(tmp_path, capsys):
    from mmdistill.cli import main

    a = fake_run(tmp_path / "s0", 0.2, 1.0, [(25, 0.5), (50, 0.95)], 0.97)
    assert main(["compare", str(a), "--gap", "weak", "teacher", "--out", str(tmp_path / "sum")]) == 0
    assert "| opd | 50 |" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nope")]) == 2
