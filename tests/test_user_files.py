"""No user file is ever lost or written into, and bad input is one line with exit 2.

python -m pytest tests/test_user_files.py -q
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mmdistill.cli import main
from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.registry import OBJECTIVES
from mmdistill.rundir import MARKER


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def user_folder(root: Path) -> Path:
    """A user's project folder: a config.yaml, a .tex file and a subfolder with a file."""
    d = root / "thesis"
    (d / "figures").mkdir(parents=True)
    (d / "config.yaml").write_text("my: settings\n")
    (d / "paper.tex").write_text("\\documentclass{article}\n")
    (d / "figures" / "plot.pdf").write_bytes(b"%PDF-1.4")
    return d


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def cfg_file(tmp_path, tiny_raw):
    tiny_raw["stages"] = tiny_raw["stages"][:1]
    tiny_raw["stages"][0]["train"]["steps"] = 1
    tiny_raw["eval"] = {"n": 2, "batch_size": 2, "max_new_tokens": 4}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    return p


@pytest.fixture
def rmtree_calls(monkeypatch):
    calls = []
    real = shutil.rmtree

    def recorder(path, *a, **k):
        calls.append(str(path))
        if str(Path(path).resolve()) == "/":
            raise AssertionError("rmtree('/') reached")
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", recorder)
    return calls


def test_nothing_of_the_users_is_deleted_or_written(tmp_path, cfg_file, capsys, monkeypatch, rmtree_calls):
    folder = user_folder(tmp_path)
    before = snapshot(folder)
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    monkeypatch.setenv("HOME", str(home))
    a_file = tmp_path / "results.csv"
    a_file.write_text("a,b\n")
    cases = [
        ["train", cfg_file, f"run_dir={folder}", "--overwrite"],
        ["train", cfg_file, f"run_dir={folder}"],
        ["train", cfg_file, "--run-dir", folder, "--overwrite"],
        ["train", cfg_file, "run_dir=/", "--overwrite"],
        ["train", cfg_file, "run_dir=/"],
        ["train", cfg_file, "run_dir=~", "--overwrite"],
        ["train", cfg_file, "--run-dir", "~"],
        ["train", cfg_file, "run_dir=$HOME", "--overwrite"],
        ["train", cfg_file, f"run_dir={a_file}", "--overwrite"],
        ["train", "--resume", folder],
    ]
    for argv in cases:
        code, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (argv, err)
    assert snapshot(folder) == before
    assert (home / "notes.txt").read_text() == "keep me" and sorted(p.name for p in home.iterdir()) == ["notes.txt"]
    assert a_file.read_text() == "a,b\n"
    assert not (folder / MARKER).exists() and not rmtree_calls


def test_overwrite_removes_only_what_the_run_wrote(tmp_path, cfg_file, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", cfg_file, f"run_dir={run}", "--quiet")[0] == 0
    assert (run / MARKER).is_file() and (run / "teacher_sft" / "final").is_dir()
    (run / "my_notes.md").write_text("analysis")  # a user's file beside the run's
    code, err = run_cli(capsys, "train", cfg_file, f"run_dir={run}")
    assert code == 2 and "--resume" in err  # a second start never runs over a finished run
    assert run_cli(capsys, "train", cfg_file, f"run_dir={run}", "--overwrite", "--quiet")[0] == 0
    assert (run / "my_notes.md").read_text() == "analysis"
    assert json.loads((run / MARKER).read_text())["status"] == "running"


def test_tilde_and_variables_expand(tmp_path, cfg_file, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    monkeypatch.setenv("RUNS", str(tmp_path / "r"))
    assert run_cli(capsys, "train", cfg_file, "run_dir=~/x", "--quiet")[0] == 0
    assert (tmp_path / "h" / "x" / "report.json").is_file() and not Path("~").exists()
    assert run_cli(capsys, "train", cfg_file, "--run-dir", "$RUNS/y", "--quiet")[0] == 0
    assert (tmp_path / "r" / "y" / "report.json").is_file()


def test_a_failed_start_does_not_block_the_next(tmp_path, cfg_file, capsys, monkeypatch):
    import mmdistill.pipeline as pipeline

    def boom(*a, **k):
        raise RuntimeError("disk full")

    run = tmp_path / "run"
    monkeypatch.setattr(pipeline, "make_accelerator", boom)
    with pytest.raises(RuntimeError):
        main(["train", str(cfg_file), f"run_dir={run}", "--quiet"])
    monkeypatch.undo()
    assert run_cli(capsys, "train", cfg_file, f"run_dir={run}", "--quiet")[0] == 0


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("stages.teacher_sft.train.lr=.nan", "train.lr: nan is not a finite number"),
        ("stages.teacher_sft.train.lr=.inf", "train.lr: inf is not a finite number"),
        ("stages.teacher_sft.train.max_grad_norm=-.inf", "is not a finite number"),
    ],
)
def test_non_finite_values_refused(tmp_path, cfg_file, capsys, override, fragment):
    code, err = run_cli(capsys, "train", cfg_file, f"run_dir={tmp_path / 'run'}", override)
    assert code == 2 and fragment in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_non_utf8_yaml(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_bytes(b"run_dir: runs/x\nseed: 0 # caf\xe9\n")
    code, err = run_cli(capsys, "train", p)
    assert code == 2 and "is not UTF-8" in err and "\n" not in err


def test_k_without_temperature_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from mmdistill.modalities.text.adapter import CausalLMAdapter

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    monkeypatch.setattr(CausalLMAdapter, "load_tokenizer", staticmethod(lambda path: pytest.fail("loaded a tokenizer")))
    code, err = run_cli(capsys, "eval", ckpt, "--k", "4")
    assert code == 2 and "temperature" in err and "\n" not in err


@OBJECTIVES.register("test_nan_sft")
class NanSFT:
    """SFT whose loss is NaN on the optimizer steps listed in `bad` (a test objective)."""

    temperature = 1.0

    def __init__(self, bad: list[int] | None = None):
        self.bad = list(bad or [])
        self.needs = Needs()
        self.step = 0

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        self.step = step
        return RolloutRequest(source="dataset")

    def prepare(self, rollout: Rollout) -> Rollout:
        return rollout

    def __call__(self, b: ObjectiveBatch):
        nll = -(b.student.log_prob(b.rollout.actions) * b.rollout.mask_B_T).sum() / b.normalizer
        return (nll * float("nan") if self.step in self.bad else nll), {}


def test_nan_loss_steps_are_skipped_and_counted(tmp_path, tiny_raw):
    from safetensors.torch import load_file

    from mmdistill.config import config_from_raw
    from mmdistill.pipeline import run_pipeline

    tiny_raw["stages"] = tiny_raw["stages"][:1]
    st = tiny_raw["stages"][0]
    st["train"].update(steps=3, save_every=1)
    st["objective"] = {"type": "test_nan_sft", "bad": [2]}
    tiny_raw["eval"] = {"n": 2, "batch_size": 2, "max_new_tokens": 4}
    run_pipeline(config_from_raw(tiny_raw), quiet=True)
    run = Path(tiny_raw["run_dir"]) / "teacher_sft"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite_skipped", 0) for r in rows] == [0, 0, 1]
    after2 = load_file(str(run / "checkpoints" / "step_000002" / "model.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    for k in final:  # the NaN step changed no weight
        torch.testing.assert_close(final[k], after2[k].to(final[k].dtype))


def test_nan_loss_in_a_row_stops_the_run(tmp_path, tiny_raw, capsys):
    tiny_raw["stages"] = tiny_raw["stages"][:1]
    st = tiny_raw["stages"][0]
    st["train"].update(steps=6, max_nonfinite_steps=2)
    st["objective"] = {"type": "test_nan_sft", "bad": [1, 2, 3]}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    code, err = run_cli(capsys, "train", p, "--quiet")
    assert code == 2 and "NaN or inf on 2 optimizer steps in a row (the last at step 3" in err and "\n" not in err


def test_a_directory_that_is_not_a_checkpoint(tmp_path, cfg_file, capsys):
    """A config.json without weights or tokenizer: one line naming what is missing, at eval and at train."""
    d = tmp_path / "not_a_checkpoint"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    code, err = run_cli(capsys, "eval", d)
    assert code == 2 and "not a complete transformers checkpoint" in err and "\n" not in err
    run = tmp_path / "run"
    code, err = run_cli(
        capsys, "train", cfg_file, f"run_dir={run}", "models.teacher_init.tiny=null", f"models.teacher_init.path={d}"
    )
    assert code == 2 and "models.teacher_init" in err and "no weights" in err and "\n" not in err
    assert not run.exists()  # refused before the run directory was claimed
