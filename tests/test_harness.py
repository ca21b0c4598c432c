"""lm-eval (lm-evaluation-harness) on saved text checkpoints, offline, with the local tasks of
tests/data/lm_eval_tasks (two-step `arith` word problems: generate_until and multiple choice).

    OMP_NUM_THREADS=1 python -m pytest tests/test_harness.py -x -q
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from mmdistill.config import ModelConfig, RunConfig, StageConfig
from mmdistill.errors import CheckpointError, ConfigError, MmdistillError
from mmdistill.modalities.text import harness
from mmdistill.modalities.text.adapter import CausalLMAdapter
from mmdistill.modalities.text.config import TinyLMConfig
from mmdistill.modalities.text.tasks.arith import ArithTask
from mmdistill.modalities.text.tokenizer import build_word_tokenizer
from mmdistill.registry import HARNESSES, STAGE_KINDS
from mmdistill.report import build_report
from mmdistill.train import RunContext

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = "tests/data/lm_eval_tasks"  # lm-eval reads data_files from the current directory: the repo root
TINY = TinyLMConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=3)


@pytest.fixture
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def adapter():
    return CausalLMAdapter(build_word_tokenizer(ArithTask(difficulty=2, max_value=9).vocabulary()))


@pytest.fixture(scope="module")
def checkpoint(adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    adapter.save(adapter.load_model(ModelConfig(tiny=TINY), "tiny"), out)
    return out


@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup and socket connection attempted while the test runs, refused and recorded."""
    attempts: list = []

    def refuse(*args):
        attempts.append(args[1] if isinstance(args[0], socket.socket) else args[0])
        raise OSError(f"network access attempted: {attempts[-1]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_offline_switch_stops_hub_requests_before_the_network(no_network):
    """datasets and huggingface_hub read their offline flags at import time; `offline()` sets them
    too, so a hub dataset fails at once without a lookup, and everything is restored after."""
    import datasets
    import huggingface_hub.constants

    before = (
        huggingface_hub.constants.HF_HUB_OFFLINE,
        datasets.config.HF_HUB_OFFLINE,
        os.environ.get("HF_HUB_OFFLINE"),
    )
    with harness.offline():
        assert huggingface_hub.constants.HF_HUB_OFFLINE and os.environ["HF_DATASETS_OFFLINE"] == "1"
        with pytest.raises(ConnectionError, match="OfflineModeIsEnabled"):
            datasets.load_dataset("EleutherAI/arithmetic", "arithmetic_2da")
    assert no_network == []
    after = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
    assert after == before


def test_lm_eval_on_a_saved_checkpoint(checkpoint, at_repo, no_network, tmp_path):
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    res = HARNESSES.get("lm-eval")(
        model_dir=checkpoint,
        tasks=["local_arith_gen", "local_arith_mc"],
        include_path=TASKS_DIR,
        limit=8,
        device="cpu",
        batch_size=4,
        out_dir=tmp_path / "out",
    )
    print(res["table"])  # lm-eval's own markdown table (pytest -s shows it)
    table = res["table"]
    assert "local_arith_gen" in table and "local_arith_mc" in table and "exact_match" in table and "acc" in table
    assert res["n"] == 16 and res["n_by_task"] == {"local_arith_gen": 8, "local_arith_mc": 8}
    assert set(res["results"]) == {
        "local_arith_gen/exact_match/answer",
        "local_arith_mc/acc",
        "local_arith_mc/acc_norm",
    }
    assert all(0.0 <= v <= 1.0 for v in res["results"].values())
    # every score is a mean over the 8 documents of its task: a multiple of 1/8
    assert all((8 * v) == round(8 * v) for v in res["results"].values())
    saved = json.loads((tmp_path / "out" / "lm_eval_results.json").read_text())
    assert saved["results"]["local_arith_mc"]["acc,none"] == res["results"]["local_arith_mc/acc"]
    assert no_network == [], f"lm-eval tried the network: {no_network}"
    assert {k: os.environ.get(k) for k in env} == env  # the offline switch is undone


def test_harness_stage_reports_like_an_eval_stage(adapter, checkpoint, at_repo, no_network, tmp_path):
    """A models entry with a path is evaluated in place; a tiny one is saved once under the stage."""
    cfg = RunConfig(
        run_dir=str(tmp_path / "run"),
        models={"saved": ModelConfig(path=str(checkpoint)), "fresh": ModelConfig(tiny=TINY)},
    )
    st = StageConfig(
        name="harness",
        kind="harness",
        evaluate={"saved_lm": "saved", "fresh_lm": "fresh"},
        options={"tasks": ["local_arith_mc"], "include_path": TASKS_DIR, "limit": 8, "batch_size": 8},
    )
    ctx = RunContext(
        cfg=cfg,
        run_dir=tmp_path / "run",
        accelerator=type("Acc", (), {"device": torch.device("cpu")})(),
        adapter=adapter,
        task=ArithTask(difficulty=2, max_value=9),
        quiet=True,
    )
    result = STAGE_KINDS.get("harness").run(ctx, st)
    assert result["kind"] == "eval" and set(result["results"]) == {"saved_lm", "fresh_lm"}
    assert (tmp_path / "run" / "harness" / "models" / "fresh_lm" / "config.json").is_file()
    assert not (tmp_path / "run" / "harness" / "models" / "saved_lm").exists()
    # same weights (tiny seed 3) saved or built: the same score
    assert result["results"]["saved_lm"]["local_arith_mc/acc"] == result["results"]["fresh_lm"]["local_arith_mc/acc"]
    report = build_report({"harness": result}, seconds=1.0)
    assert 0.0 <= report["saved_lm"]["local_arith_mc/acc"] <= 1.0 and "n" not in report["saved_lm"]
    assert no_network == []


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"tasks": []}, r"stages\.harness\.options\.tasks: \[\]; list lm-eval task names"),
        ({"tasks": ["local_arith_mc"], "limit": 0}, r"stages\.harness\.options\.limit: 0 must be >= 1"),
        ({"tasks": ["x"], "include_path": "no/such/dir"}, r"include_path: 'no/such/dir' is not a folder"),
        ({"tasks": ["x"], "tasks_path": "y"}, r"stages\.harness\.options"),
    ],
    ids=["no tasks", "limit 0", "missing include folder", "unknown key"],
)
def test_stage_options_refused_before_compute(options, match, at_repo):
    with pytest.raises(ConfigError, match=match):
        harness.harness_options(StageConfig(name="harness", kind="harness", options=options))


def test_bad_input_is_one_line(checkpoint, at_repo, no_network, tmp_path):
    run = HARNESSES.get("lm-eval")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a directory"):
        run(model_dir=tmp_path / "nowhere", tasks=["local_arith_mc"], include_path=TASKS_DIR)
    with pytest.raises(CheckpointError, match=r"is not a text \(causal LM\) checkpoint"):
        run(model_dir=tmp_path / "empty", tasks=["local_arith_mc"], include_path=TASKS_DIR)
    with pytest.raises(
        ConfigError, match="knows no task, group or tag 'local_arith_mcq'; did you mean 'local_arith_mc'"
    ):
        harness.task_manager(_local_manager(), ["local_arith_mcq"], TASKS_DIR)
    # a task whose JSONL is missing, or is not JSON: refused before the model loads, in one line
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tmp_path / "bad.jsonl").write_text('{"question": "1 + 1", "choices": ["2"], "label": 0}\nnot json\n')
    text = (REPO / TASKS_DIR / "local_arith_mc.yaml").read_text()
    for name, data in (("gone", "no/such/file.jsonl"), ("bad", str(tmp_path / "bad.jsonl"))):
        (tasks / f"{name}.yaml").write_text(
            text.replace("task: local_arith_mc", f"task: {name}_mc").replace(f"{TASKS_DIR}/arith_test.jsonl", data)
        )
    for name, error in (("gone", "FileNotFoundError"), ("bad", "DatasetGenerationError")):
        with pytest.raises(MmdistillError, match=rf"could not load the task data offline \({error}") as e:
            run(model_dir=checkpoint, tasks=[f"{name}_mc"], include_path=str(tasks), device="cpu")
        assert "\n" not in str(e.value)
    assert no_network == []


def _local_manager():
    """lm-eval's TaskManager that never indexes the built-in tasks (the full index takes ~15 s)."""
    from lm_eval.tasks import TaskManager

    def build(include_path=None, include_defaults=True):
        return TaskManager(include_path=include_path, include_defaults=False)

    return build
