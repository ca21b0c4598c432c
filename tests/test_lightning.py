"""Lightning OPD: checkpoint hashes, teacher shards round trip, loss parity with live top-k KL,
damaged shards, teacher consistency, the packaged config.

    python -m pytest tests/test_lightning.py -q
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmdistill.config import TinyLMConfig, config_from_raw, load_config
from mmdistill.errors import CheckpointError, CompatibilityError, ConfigError
from mmdistill.modalities.text.adapter import CausalLMAdapter, build_tiny_lm
from mmdistill.modalities.text.lightning import (
    LightningOPD,
    TeacherShardsTask,
    checkpoint_hash,
    precompute_options,
    run_precompute_stage,
    shard_rollout,
)
from mmdistill.objectives.registered import ForwardKL, ObjectiveBatch, ReverseKL
from mmdistill.train import RunContext, build_task, step_seed

ARITH = {"type": "arith", "difficulty": 1, "max_value": 9}
K = 8


def _tiny(tokenizer, seed: int):
    return build_tiny_lm(TinyLMConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seed=seed), tokenizer)


def _raw(root: Path) -> dict:
    shards = str(root / "run" / "logprobs" / "shards")
    return {
        "run_dir": str(root / "run"), "seed": 0, "device": "cpu", "task": ARITH,
        "models": {
            "teacher": {"path": str(root / "teacher")},
            "other": {"path": str(root / "other")},
            "random": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "seed": 1}},
            "student": {"prune": {"source": "teacher", "keep_layers": [0]}},
        },
        "eval": {"n": 4, "batch_size": 4, "max_new_tokens": 6},
        "rollout": {"max_new_tokens": 6, "temperature": 1.0},
        "stages": [
            {"name": "logprobs", "kind": "precompute", "teacher": "teacher", "precompute": {"n": 12, "k": K, "batch_size": 16, "shard_size": 5}},
            {"name": "lopd", "student": "student", "teacher": "teacher", "objective": {"type": "lightning_opd"},
             "task": {"type": "teacher_shards", "shards": shards, "task": ARITH},
             "train": {"steps": 2, "batch_size": 4, "log_every": 1, "save_every": 0}},
        ],
    }


def _ctx(cfg, adapter, root: Path) -> RunContext:
    from mmdistill.pipeline import make_accelerator

    return RunContext(cfg=cfg, run_dir=root / "run", accelerator=make_accelerator("cpu"), adapter=adapter, task=build_task(cfg.task), quiet=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, word_tokenizer):
    """Two saved tiny teachers, a config, and the teacher's shards written once."""
    pytest.importorskip("webdataset")  # the `data` extra; the config and laziness tests run without it
    root = tmp_path_factory.mktemp("lightning")
    adapter = CausalLMAdapter(word_tokenizer)
    teacher = _tiny(word_tokenizer, seed=1).eval()
    adapter.save(teacher, root / "teacher")
    adapter.save(_tiny(word_tokenizer, seed=2), root / "other")
    cfg = config_from_raw(_raw(root))
    ctx = _ctx(cfg, adapter, root)
    result = run_precompute_stage(ctx, cfg.stages[0])
    task = build_task(cfg.stages[1].task)
    return SimpleNamespace(root=root, adapter=adapter, teacher=teacher, cfg=cfg, ctx=ctx, result=result, task=task,
                           shards=Path(cfg.stages[1].task["shards"]))


def test_checkpoint_hash_is_content_only(lab, tmp_path):
    h = checkpoint_hash(lab.root / "teacher")
    copy_dir = tmp_path / "renamed copy"
    shutil.copytree(lab.root / "teacher", copy_dir)
    (copy_dir / "model.safetensors").touch()  # a new mtime
    assert checkpoint_hash(copy_dir) == h
    weights = load_file(str(copy_dir / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, str(copy_dir / "model.safetensors"), metadata={"format": "pt"})
    assert checkpoint_hash(copy_dir) != h
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        checkpoint_hash(tmp_path)


def test_precompute_writes_manifest_and_resumes(lab):
    m = json.loads((lab.shards / "manifest.json").read_text())
    assert m["teacher_hash"] == checkpoint_hash(lab.root / "teacher") == lab.result["teacher_hash"]
    assert (m["n"], m["k"], m["num_shards"]) == (12, K, 3)  # 12 samples, 5 per shard
    assert [s["name"] for s in m["shards"]] == sorted(p.name for p in lab.shards.glob("shard-*.tar"))
    assert not lab.result["reused"]
    again = run_precompute_stage(lab.ctx, lab.cfg.stages[0])
    assert again["reused"] and again["teacher_hash"] == m["teacher_hash"]


def test_shards_round_trip_exactly(lab):
    """Stored ids are the teacher's sample; stored top-k equal its live top-k on that rollout."""
    st = lab.cfg.stages[0]
    problems = lab.task.problems("train")
    assert len(problems) == 12 and len(lab.task.problems("train", 5)) == 5
    gen = torch.Generator().manual_seed(step_seed(lab.cfg.seed, st.name, 0, "sample"))
    live = lab.adapter.sample(lab.teacher, [p.question for p in problems], st.rollout.max_new_tokens, st.rollout.temperature, gen)
    stored = shard_rollout(lab.adapter, problems)
    torch.testing.assert_close(stored.mask_B_T, live.mask_B_T, rtol=0, atol=0)
    torch.testing.assert_close(stored.actions, live.actions, rtol=0, atol=0)
    top = lab.adapter.step_dist(lab.teacher, live).topk(K)
    m = stored.mask_B_T.bool()
    x = stored.extras
    assert torch.equal(x["teacher_topk_idx_B_T_K"][m], top.topk_idx_N_K)
    assert torch.equal(x["teacher_topk_logp_B_T_K"][m], top.topk_logp_N_K)
    assert torch.equal(x["teacher_tail_logp_B_T"][m], top.tail_logp_N)
    half = stored.select(slice(0, 6))  # micro-batches slice the stored top-k with the rows
    assert half.extras["teacher_topk_idx_B_T_K"].shape[0] == 6


@pytest.mark.parametrize("live_cls,beta", [(ReverseKL, 1.0), (ForwardKL, 0.0)])
def test_loss_equals_live_topk_kl(lab, live_cls, beta):
    rollout = shard_rollout(lab.adapter, lab.task.problems("train"))
    student = lab.ctx.load_model("student").float()
    n = float(rollout.num_steps())
    losses, grads = [], []
    for offline in (False, True):
        student.zero_grad()
        s = lab.adapter.step_dist(student, rollout)
        if offline:
            loss, metrics = LightningOPD(beta=beta)(ObjectiveBatch(rollout, s, None, None, n))
        else:
            with torch.no_grad():
                t = lab.adapter.step_dist(lab.teacher, rollout)
            loss, metrics = live_cls(topk=K)(ObjectiveBatch(rollout, s, t, None, n))
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in student.parameters() if p.grad is not None])
    assert losses[0] > 0
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def _copy_shards(lab, tmp_path) -> tuple[Path, TeacherShardsTask]:
    d = tmp_path / "shards"
    shutil.copytree(lab.shards, d)
    return d, TeacherShardsTask(shards=str(d), task=ARITH)


def test_corrupt_shard_is_refused_clearly(lab, tmp_path):
    d, task = _copy_shards(lab, tmp_path)
    data = bytearray((d / "shard-000001.tar").read_bytes())
    data[600:608] = bytes(b ^ 0xFF for b in data[600:608])
    (d / "shard-000001.tar").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"shard-000001\.tar is corrupt .*re-run the precompute stage") as e:
        task.problems("train")
    assert "\n" not in str(e.value)


def test_truncated_shard_with_matching_checksum_is_refused(lab, tmp_path):
    """A tar error (here: truncated, with the manifest rewritten to match) is caught too."""
    import hashlib

    d, task = _copy_shards(lab, tmp_path)
    shard = d / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"shard-000000\.tar .*re-run the precompute stage"):
        task.problems("train")


def test_missing_shards_name_the_precompute_stage(tmp_path):
    task = TeacherShardsTask(shards=str(tmp_path / "nowhere"), task=ARITH)  # lazy: nothing read yet
    assert len(task.problems("test", 3)) == 3  # evaluation is the underlying task's
    with pytest.raises(CheckpointError, match="run the precompute stage"):
        task.problems("train")


def test_mismatched_teacher_is_refused(lab):
    st = copy.deepcopy(lab.cfg.stages[1])
    objective = LightningOPD()
    objective.check_teacher(lab.ctx, st, lab.task)  # the teacher that wrote the shards: fine
    st.teacher = "other"
    with pytest.raises(CompatibilityError, match="'other' .* is not the teacher that wrote"):
        objective.check_teacher(lab.ctx, st, lab.task)
    st.teacher = "random"
    with pytest.raises(ConfigError, match="random-init.*no checkpoint to hash"):
        objective.check_teacher(lab.ctx, st, lab.task)
    st.teacher = "teacher"
    with pytest.raises(ConfigError, match="score_temperature"):
        LightningOPD(temperature=2.0).check_teacher(lab.ctx, st, lab.task)


def test_warmup_on_another_teacher_is_refused(lab):
    """The SFT warm-up and the OPD teacher must be one model (the paper's teacher consistency)."""
    raw = _raw(lab.root)
    warm = {"name": "warm", "student": "student", "teacher": "other", "objective": {"type": "sft", "source": "teacher"}}
    lopd = {**raw["stages"][1], "student": "warm"}
    raw["stages"] = [raw["stages"][0], warm, lopd]
    cfg = config_from_raw(raw)
    ctx = _ctx(cfg, lab.adapter, lab.root)
    with pytest.raises(CompatibilityError, match="warm-up stage 'warm' learned from teacher 'other'"):
        LightningOPD().check_teacher(ctx, cfg.stages[2], lab.task)
    LightningOPD(check_warmup=False).check_teacher(ctx, cfg.stages[2], lab.task)


def test_train_stage_runs_without_a_live_teacher(lab, tmp_path):
    from mmdistill.train import run_train_stage

    ctx = _ctx(lab.cfg, lab.adapter, tmp_path)
    ctx.load_teacher = lambda st: pytest.fail("Lightning OPD must not load the teacher")
    result = run_train_stage(ctx, lab.cfg.stages[1])
    rows = [json.loads(line) for line in (tmp_path / "run" / "lopd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["divergence"] > 0 for r in rows)
    assert 0.0 <= result["eval"]["accuracy"] <= 1.0


def test_packaged_config_loads_and_validates():
    cfg = load_config("configs/text/lightning_opd.yaml")
    pre = next(s for s in cfg.stages if s.kind == "precompute")
    assert precompute_options(pre).k == 64
    lopd = next(s for s in cfg.stages if s.objective["type"] == "lightning_opd")
    assert lopd.teacher == pre.teacher
    task = build_task(lopd.task)  # lazy: the shards do not exist yet
    assert isinstance(task, TeacherShardsTask) and len(task.problems("test", 2)) == 2
    with pytest.raises(ConfigError, match="did you mean 'shard_size'"):
        precompute_options(SimpleNamespace(name="x", precompute={"shard_sise": 3}))
