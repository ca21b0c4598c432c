"""Surviving faults: SIGTERM saves a checkpoint and resumes bit for bit (also with a DAgger replay buffer);
a 2-process run SIGKILLed at 5 random moments and resumed each time ends with the weights of an
uninterrupted run; a rank that dies ends the run with a line naming it, and the run resumes.

    python -m pytest tests/test_faults.py -m "slow or not slow"
"""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "mmdistill", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the launcher and its workers form one process group
    )


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / stage / "final" / "model.safetensors"))


def assert_equal_weights(a: Path, b: Path, stage: str, atol: float = 0.0) -> None:
    wa, wb = weights(a, stage), weights(b, stage)
    assert wa.keys() == wb.keys()
    for k in wa:
        if atol == 0.0:
            assert torch.equal(wa[k], wb[k]), f"{stage} {k} differs"
        else:
            torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=f"{stage} {k}")


def wait_for(path: Path, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} never appeared (exit {proc.poll()}): {proc.stdout.read() if proc.stdout else ''}")


def write(raw: dict, tmp_path: Path, name: str) -> Path:
    r = copy.deepcopy(raw)
    r["run_dir"] = str(tmp_path / name)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def pointmass_raw(steps: int = 8) -> dict:
    raw = yaml.safe_load((REPO / "configs" / "vla" / "pointmass_opd.yaml").read_text())
    raw["device"] = "cpu"
    raw["stages"] = [s for s in raw["stages"] if s["name"] in ("warmup", "rkl_opd")]
    raw["stages"][0]["train"]["steps"] = 2
    rkl = raw["stages"][1]
    rkl["train"].update(steps=steps, save_every=1000, log_every=1, replay_rounds=2, minibatch_size=8)
    rkl["train"]["updates_per_rollout"] = 2
    raw["eval"] = {**raw.get("eval", {}), "n": 4, "batch_size": 4, "grid": 0}
    return raw


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_bit_exact_with_replay(tmp_path):
    """DAgger aggregation (replay_rounds 2) and minibatches: SIGTERM mid-stage, then --resume."""
    raw = pointmass_raw(steps=8)
    rkl = raw["stages"][1]
    assert rkl["objective"]["type"] in ("reverse_kl", "forward_kl", "hard_ce"), rkl["objective"]
    proc = start(["train", str(write(raw, tmp_path, "stopped"))], tmp_path)
    metrics = tmp_path / "stopped" / "rkl_opd" / "metrics.jsonl"
    wait_for(metrics, proc, "the rkl_opd stage's first metrics")
    while proc.poll() is None and len(metrics.read_text().splitlines()) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("stopped:"))
    assert "stopped by SIGTERM after step" in line and "--resume" in line
    step = int(line.split("after step ")[1].split()[0])
    ckpt = tmp_path / "stopped" / "rkl_opd" / "checkpoints" / f"step_{step:06d}"
    assert (ckpt / "replay-rank0.pt").is_file() and (ckpt / "state.json").is_file()
    assert step < 8 and not (tmp_path / "stopped" / "rkl_opd" / "final").exists()

    out = finish(start(["train", "--resume", str(tmp_path / "stopped")], tmp_path))
    assert f"resumed from {ckpt}" in out
    finish(start(["train", str(write(raw, tmp_path, "clean")), "--quiet"], tmp_path))
    assert_equal_weights(tmp_path / "stopped", tmp_path / "clean", "rkl_opd")
    rows = [yaml.safe_load(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))  # no step lost or repeated
    assert len(rows[-1]["passes"]) == 2 and "loss" in rows[-1]  # metrics of every update pass


def text_raw() -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_RAW

    raw = copy.deepcopy(TINY_RAW)
    raw["stages"] = raw["stages"][:2]
    for st in raw["stages"]:
        st["train"].update(steps=12, save_every=1, log_every=1)
    return raw


@pytest.mark.slow
def test_two_processes_killed_five_times_at_random_end_with_the_uninterrupted_weights(tmp_path):
    raw = text_raw()
    for st in raw["stages"]:  # long enough that 5 kills land before the end on an idle machine (~8 steps/s)
        st["train"]["steps"] = 100
    cfg = write(raw, tmp_path, "killed")
    rng = random.Random(0)
    run = tmp_path / "killed"
    kills = 0
    proc = start(["train", str(cfg), "--num-processes", "2", "--quiet"], tmp_path)
    wait_for(run / "config.yaml", proc, "config.yaml")  # the run exists; from here on it may die any time
    while kills < 5:
        time.sleep(rng.uniform(3.0, 12.0))  # from the launch: start-up (~8 s) or training
        if proc.poll() is not None:  # finished before the kill: start again from the top is not the test
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        proc = start(["train", "--resume", str(run), "--num-processes", "2", "--quiet"], tmp_path)
    finish(proc)
    assert kills == 5, f"the run ended after {kills} kills; lengthen it"
    clean = start(["train", str(write(raw, tmp_path, "clean")), "--num-processes", "2", "--quiet"], tmp_path)
    finish(clean)
    for stage in ("teacher_sft", "student_opd"):
        assert_equal_weights(run, tmp_path / "clean", stage)


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_run_with_its_name_and_the_run_resumes(tmp_path):
    raw = text_raw()
    run = tmp_path / "died"
    proc = start(["train", str(write(raw, tmp_path, "died")), "--num-processes", "2", "--quiet"], tmp_path)
    wait_for(run / "teacher_sft" / "checkpoints" / "latest.txt", proc, "a checkpoint")
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "mmdistill" in " ".join(p.cmdline())]
    ranks = {int(p.environ().get("RANK", -1)): p for p in workers}
    assert set(ranks) >= {0, 1}, ranks
    ranks[1].kill()
    out, _ = proc.communicate(timeout=180)  # the others end; nothing hangs
    assert proc.returncode != 0
    assert "rank      : 1" in out.split("Root Cause")[1], out[-3000:]  # the launcher names the rank that died
    assert "lost contact with another process" in out and "[rank0]: Traceback" not in out  # one line, no traceback
    assert "names the rank that failed first" in out.splitlines()[-1]
    finish(start(["train", "--resume", str(run), "--num-processes", "2", "--quiet"], tmp_path))
    assert (run / "student_opd" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_on_two_processes_then_resume_on_one_equals_the_uninterrupted_run(tmp_path):
    """The launcher passes SIGTERM to the workers; they save one checkpoint; one process resumes it with the
    run's 2 rollout shards (kept in the checkpoint) and ends where a 1-process, 2-shard run ends."""
    raw = text_raw()
    raw["stages"][1]["train"].update(steps=40, save_every=1000)
    run = tmp_path / "stopped"
    proc = start(["train", str(write(raw, tmp_path, "stopped")), "--num-processes", "2", "--quiet"], tmp_path)
    metrics = run / "student_opd" / "metrics.jsonl"
    wait_for(metrics, proc, "the student stage's metrics")
    while proc.poll() is None and len(metrics.read_text().splitlines()) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert out.count("stopped: stages.student_opd: stopped by SIGTERM after step") == 1  # rank 0 says it once
    assert "--resume RUN_DIR --num-processes 2" in out.splitlines()[-1]
    assert not (run / "student_opd" / "final").exists()
    out = finish(start(["train", "--resume", str(run)], tmp_path))
    assert "resumed from" in out
    clean = copy.deepcopy(raw)
    for st in clean["stages"]:
        st["train"]["rollout_shards"] = 2
    finish(start(["train", str(write(clean, tmp_path, "clean")), "--quiet"], tmp_path))
    for stage in ("teacher_sft", "student_opd"):
        assert_equal_weights(run, tmp_path / "clean", stage, atol=1e-6)
