"""The training loop end to end on tiny models: outputs, gradient accumulation, exact resume."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmdistill.config import config_from_raw
from mmdistill.pipeline import run_pipeline


def test_pipeline_end_to_end(tiny_raw):
    report = run_pipeline(config_from_raw(tiny_raw), quiet=True)
    run = Path(tiny_raw["run_dir"])
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= report[key] <= 1.0
    assert json.loads((run / "report.json").read_text())["teacher_accuracy"] == report["teacher_accuracy"]
    assert (run / "config.yaml").exists() and (run / "report.png").exists()
    rows = [json.loads(line) for line in (run / "student_opd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["divergence"] >= 0 for r in rows)
    assert (run / "student_opd" / "curves.png").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "student_opd" / "final")
    # a second call resumes: every stage is already done
    again = run_pipeline(config_from_raw(tiny_raw), quiet=True)
    assert again["student_accuracy_after"] == report["student_accuracy_after"]


def _final_weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / stage / "final" / "model.safetensors"))


@pytest.mark.parametrize("objective", [{"type": "reverse_kl"}, {"type": "opd"}, {"type": "sft"}])
def test_gradient_accumulation_is_invariant(tiny_raw, tmp_path, objective):
    """Micro-batches of 2 give the same update as one batch of 8 (loss normalised by the global token count)."""
    finals = []
    for micro in (None, 2):
        raw = copy.deepcopy(tiny_raw)
        raw["run_dir"] = str(tmp_path / f"micro_{micro}")
        raw["stages"] = raw["stages"][:2]
        raw["stages"][1]["objective"] = objective
        raw["stages"][1]["train"].update(steps=2, micro_batch_size=micro)
        run_pipeline(config_from_raw(raw), quiet=True)
        finals.append(_final_weights(Path(raw["run_dir"]), "student_opd"))
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], atol=2e-6, rtol=1e-5)
    rows = [
        json.loads(line) for line in (tmp_path / "micro_2" / "student_opd" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(r["grad_norm"] > 0 for r in rows)  # the comparison is not between two untouched models


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mmdistill.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kw,
    )


def test_sigkill_and_resume_is_bit_exact(tiny_raw, tmp_path):
    """Kill the run during the OPD stage (after a checkpoint), resume, compare with an uninterrupted run."""
    raw = copy.deepcopy(tiny_raw)
    raw["stages"][1]["train"].update(steps=10, save_every=2)
    raw["stages"] = raw["stages"][:2]
    cfgs = {}
    for name in ("killed", "clean"):
        r = copy.deepcopy(raw)
        r["run_dir"] = str(tmp_path / name)
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(r))

    proc = _cli("train", str(cfgs["killed"]), "--quiet")
    latest = tmp_path / "killed" / "student_opd" / "checkpoints" / "latest.txt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step_000004":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + (
        proc.stdout.read() if proc.stdout else ""
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "student_opd" / "final").exists()

    resumed = _cli("train", "--resume", str(tmp_path / "killed"))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out and "[teacher_sft] already done" in out
    clean = _cli("train", str(cfgs["clean"]), "--quiet")
    out2, _ = clean.communicate(timeout=300)
    assert clean.returncode == 0, out2

    a, b = _final_weights(tmp_path / "killed", "student_opd"), _final_weights(tmp_path / "clean", "student_opd")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
