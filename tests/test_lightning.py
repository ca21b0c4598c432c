"""Lightning OPD: checkpoint hashes, teacher shards round trip, the `stored_logits` teacher kind scored
by the ordinary reverse_kl / forward_kl objectives (loss parity with a live top-k teacher), damaged
shards, teacher consistency, the packaged config.

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

from mmdistill.config import ModelConfig, config_from_raw, load_config
from mmdistill.errors import CheckpointError, CompatibilityError, ConfigError
from mmdistill.interfaces import ObjectiveBatch, RolloutRequest
from mmdistill.modalities.text.adapter import CausalLMAdapter, build_tiny_lm
from mmdistill.modalities.text.config import TinyLMConfig
from mmdistill.modalities.text.precompute import precompute_options, run_precompute_stage, teacher_checkpoint
from mmdistill.modalities.text.shards import checkpoint_hash
from mmdistill.modalities.text.stored_logits import StoredLogitsTeacher
from mmdistill.modalities.text.tasks.teacher_shards import TeacherShardsTask
from mmdistill.modalities.text.tokenizer import build_word_tokenizer
from mmdistill.registry import OBJECTIVES
from mmdistill.train import RunContext, build_task, step_seed

ARITH = {"type": "arith", "difficulty": 1, "max_value": 9}
K = 8


def _tiny(tokenizer, seed: int):
    return build_tiny_lm(TinyLMConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seed=seed), tokenizer)


def _raw(root: Path) -> dict:
    shards = str(root / "run" / "logprobs" / "shards")
    return {
        "run_dir": str(root / "run"),
        "seed": 0,
        "device": "cpu",
        "task": ARITH,
        "models": {
            "teacher": {"path": str(root / "teacher")},
            "other": {"path": str(root / "other")},
            "random": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "seed": 1}},
            "student": {"prune": {"source": "teacher", "keep_layers": [0]}},
            "stored": {"kind": "stored_logits", "path": shards, "options": {"checkpoint": str(root / "teacher")}},
        },
        "eval": {"n": 4, "batch_size": 4, "max_new_tokens": 6},
        "rollout": {"max_new_tokens": 6, "temperature": 1.0},
        "stages": [
            {
                "name": "logprobs",
                "kind": "precompute",
                "teacher": "teacher",
                "precompute": {"n": 12, "k": K, "batch_size": 16, "shard_size": 5},
            },
            {
                "name": "lopd",
                "student": "student",
                "teacher": "stored",
                "objective": {"type": "reverse_kl", "source": "dataset"},
                "task": {"type": "teacher_shards", "shards": shards, "task": ARITH},
                "train": {"steps": 2, "batch_size": 4, "log_every": 1, "save_every": 0},
            },
        ],
    }


def _ctx(cfg, adapter, root: Path) -> RunContext:
    from mmdistill.pipeline import make_accelerator

    return RunContext(
        cfg=cfg,
        run_dir=root / "run",
        accelerator=make_accelerator("cpu"),
        adapter=adapter,
        task=build_task(cfg.task),
        quiet=True,
    )


def _stored_cfg(lab, **changes) -> ModelConfig:
    return ModelConfig(
        **{
            "kind": "stored_logits",
            "path": str(lab.shards),
            "options": {"checkpoint": str(lab.root / "teacher")},
            **changes,
        }
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory, word_tokenizer):
    """Two saved tiny teachers, a config, and the teacher's shards written once."""
    root = tmp_path_factory.mktemp("lightning")
    adapter = CausalLMAdapter(word_tokenizer)
    teacher = _tiny(word_tokenizer, seed=1).eval()
    adapter.save(teacher, root / "teacher")
    adapter.save(_tiny(word_tokenizer, seed=2), root / "other")
    (root / "run" / "logprobs" / "shards").mkdir(parents=True)  # the config refers to it before the stage writes it
    cfg = config_from_raw(_raw(root))
    ctx = _ctx(cfg, adapter, root)
    result = run_precompute_stage(ctx, cfg.stages[0])
    task = build_task(cfg.stages[1].task)
    return SimpleNamespace(
        root=root,
        adapter=adapter,
        teacher=teacher,
        cfg=cfg,
        ctx=ctx,
        result=result,
        task=task,
        shards=Path(cfg.stages[1].task["shards"]),
    )


def _dataset_rollout(lab, problems):
    """The loop's `source: dataset` rollout of stored completions."""
    return lab.adapter.rollout(RolloutRequest(source="dataset"), None, None, lab.task, problems, torch.Generator())


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


def test_precompute_refuses_a_teacher_without_weights_to_hash(lab):
    with pytest.raises(ConfigError, match="random-init.*no checkpoint to hash"):
        teacher_checkpoint(lab.ctx, "random", "stages.logprobs.teacher")
    with pytest.raises(ConfigError, match="'stored' is a stored_logits teacher"):
        teacher_checkpoint(lab.ctx, "stored", "stages.logprobs.teacher")


def test_shards_round_trip_exactly(lab):
    """Stored ids are the teacher's sample; the stored teacher's top-k equal its live top-k on that rollout."""
    st = lab.cfg.stages[0]
    problems = lab.task.problems("train")
    assert len(problems) == 12 and len(lab.task.problems("train", 5)) == 5
    gen = torch.Generator().manual_seed(step_seed(lab.cfg.seed, st.name, 0, "sample"))
    live = lab.adapter.sample(
        lab.teacher, [p.question for p in problems], st.rollout.max_new_tokens, st.rollout.temperature, gen
    )
    stored = _dataset_rollout(lab, problems)
    torch.testing.assert_close(stored.mask_B_T, live.mask_B_T, rtol=0, atol=0)
    torch.testing.assert_close(stored.actions, live.actions, rtol=0, atol=0)
    assert stored.context.keys == [p.meta["key"] for p in problems]
    top = lab.adapter.step_dist(lab.teacher, live).topk(K)
    teacher = lab.adapter.load_model(_stored_cfg(lab), "stored")
    assert isinstance(teacher, StoredLogitsTeacher) and not list(teacher.parameters())
    t = lab.adapter.step_dist(teacher, stored)
    assert torch.equal(t.topk_idx_N_K, top.topk_idx_N_K)
    assert torch.equal(t.topk_logp_N_K, top.topk_logp_N_K)
    assert torch.equal(t.tail_logp_N, top.tail_logp_N)
    half = lab.adapter.step_dist(teacher, stored.select(slice(0, 6)))  # micro-batches: the rows' own stored top-k
    assert torch.equal(half.topk_logp_N_K, t.select(slice(0, 6)).topk_logp_N_K)
    assert lab.adapter.stage_fingerprint(teacher) == checkpoint_hash(lab.root / "teacher")


@pytest.mark.parametrize("objective", ["reverse_kl", "forward_kl"])
def test_loss_equals_live_topk_kl(lab, objective):
    """The same objective, once with the live teacher kept as its top-k and once with the stored teacher."""
    rollout = _dataset_rollout(lab, lab.task.problems("train"))
    student = lab.ctx.load_model("student").float()
    stored = lab.adapter.load_model(_stored_cfg(lab), "stored")
    n = float(rollout.num_steps())
    losses, grads = [], []
    for offline in (False, True):
        student.zero_grad()
        s = lab.adapter.step_dist(student, rollout)
        with torch.no_grad():
            t = lab.adapter.step_dist(stored if offline else lab.teacher, rollout)
        obj = OBJECTIVES.get(objective)(source="dataset") if offline else OBJECTIVES.get(objective)(topk=K)
        loss, metrics = obj(ObjectiveBatch(rollout, s, t, None, n))
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
    """The task stops at a damaged sample with one line; the stored teacher loads the intact ones and
    refuses the damaged one by name (tests/test_corrupt_shards.py covers every kind of damage)."""
    d, task = _copy_shards(lab, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    key = m["shards"][1]["samples"][0]["key"]
    off = m["shards"][1]["samples"][0]["members"][2][0]  # inside its topk_idx array
    data = bytearray((d / "shard-000001.tar").read_bytes())
    data[off + 200 : off + 208] = bytes(b ^ 0xFF for b in data[off + 200 : off + 208])
    (d / "shard-000001.tar").write_bytes(bytes(data))
    line = rf"shard-000001\.tar: sample '{key}' is damaged \(sha256 mismatch\); .*rewrites only the damaged shards"
    with pytest.raises(CheckpointError, match=line + r".*task\.damaged: skip") as e:
        task.problems("train")
    assert "\n" not in str(e.value)
    teacher = lab.adapter.load_model(_stored_cfg(lab, path=str(d)), "stored")
    assert set(teacher.damaged) == {key} and len(teacher.samples) == 11
    problems = {p.meta["key"]: p for p in lab.task.problems("train")}
    lab.adapter.step_dist(teacher, _dataset_rollout(lab, [problems["000000000"]]))  # intact: scored
    with pytest.raises(CheckpointError, match=line) as e:
        lab.adapter.step_dist(teacher, _dataset_rollout(lab, [problems[key]]))
    assert "\n" not in str(e.value)


def test_missing_shards_name_the_precompute_stage(lab, tmp_path):
    task = TeacherShardsTask(shards=str(tmp_path / "nowhere"), task=ARITH)  # lazy: nothing read yet
    assert len(task.problems("test", 3)) == 3  # evaluation is the underlying task's
    with pytest.raises(CheckpointError, match="run the precompute stage"):
        task.problems("train")
    with pytest.raises(CheckpointError, match=r"models\.stored\.path: no manifest\.json .*run the precompute stage"):
        lab.adapter.load_model(_stored_cfg(lab, path=str(tmp_path / "nowhere")), "stored")


def test_mismatched_teacher_is_refused(lab, tmp_path):
    """Teacher consistency: the checkpoint named in the options must be the one that wrote the shards."""
    lab.adapter.load_model(_stored_cfg(lab), "stored")  # the teacher that wrote the shards: fine
    lab.adapter.load_model(_stored_cfg(lab, options={}), "stored")  # no checkpoint named: the manifest's teacher
    with pytest.raises(
        CompatibilityError, match=r"options\.checkpoint: '.*other' \(sha256 \w+\) is not the teacher that wrote"
    ):
        lab.adapter.load_model(_stored_cfg(lab, options={"checkpoint": str(lab.root / "other")}), "stored")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        lab.adapter.load_model(_stored_cfg(lab, options={"checkpoint": str(tmp_path)}), "stored")
    with pytest.raises(ConfigError, match="unknown config key 'models.stored.options.checkpiont'"):
        lab.adapter.load_model(_stored_cfg(lab, options={"checkpiont": "x"}), "stored")
    other_tok = build_word_tokenizer(["zebra", "quokka"])
    with pytest.raises(CompatibilityError, match="written with another tokenizer"):
        CausalLMAdapter(other_tok).load_model(_stored_cfg(lab), "stored")


def test_stored_teacher_scores_only_its_own_completions(lab):
    teacher = lab.adapter.load_model(_stored_cfg(lab), "stored")
    problems = lab.task.problems("train", 4)
    rollout = _dataset_rollout(lab, problems)
    with pytest.raises(ConfigError, match="score_temperature 1.0.*temperature 2.0"):
        lab.adapter.step_dist(teacher, rollout, temperature=2.0)
    sampled = lab.adapter.rollout(
        RolloutRequest(source="student"), lab.teacher, None, lab.task, problems, torch.Generator().manual_seed(5)
    )
    with pytest.raises(
        CompatibilityError, match="scores only its own stored completions"
    ):  # student rows carry no keys
        lab.adapter.step_dist(teacher, copy.copy(sampled))
    sampled.context.keys = rollout.context.keys  # keys of stored samples, but other tokens
    if not torch.equal(sampled.actions, rollout.actions[:, : sampled.actions.shape[1]]):
        with pytest.raises(CompatibilityError, match="is not the completion stored"):
            lab.adapter.step_dist(teacher, sampled)
    with pytest.raises(CompatibilityError, match="cannot generate"):
        lab.adapter.sample(teacher, ["1 + 1"], 4)


def test_train_stage_runs_without_a_live_teacher(lab, tmp_path, monkeypatch):
    from mmdistill.train import run_train_stage

    ctx = _ctx(lab.cfg, lab.adapter, tmp_path)
    loaded = []
    load_model = lab.adapter.load_model

    def spy(cfg, name="model"):
        model = load_model(cfg, name)
        loaded.append((name, type(model).__name__))
        return model

    monkeypatch.setattr(lab.adapter, "load_model", spy)
    result = run_train_stage(ctx, lab.cfg.stages[1])
    assert loaded == [
        ("teacher", "Qwen3ForCausalLM"),
        ("stored", "StoredLogitsTeacher"),
    ]  # the student's prune source, then no live teacher
    rows = [json.loads(line) for line in (tmp_path / "run" / "lopd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["divergence"] > 0 for r in rows)
    assert 0.0 <= result["eval"]["accuracy"] <= 1.0


def test_packaged_config_loads_and_validates():
    cfg = load_config("configs/text/lightning_opd.yaml")
    pre = next(s for s in cfg.stages if s.kind == "precompute")
    assert precompute_options(pre).k == 64
    lopd = next(s for s in cfg.stages if s.task is not None and s.task["type"] == "teacher_shards")
    assert lopd.objective == {"type": "reverse_kl", "source": "dataset"}
    stored = cfg.models[lopd.teacher]
    assert stored.kind == "stored_logits" and stored.path == lopd.task["shards"]
    assert stored.options["checkpoint"] == f"{cfg.run_dir}/{pre.teacher}/final"
    task = build_task(lopd.task)  # lazy: the shards do not exist yet
    assert isinstance(task, TeacherShardsTask) and len(task.problems("test", 2)) == 2
    with pytest.raises(ConfigError, match="did you mean 'shard_size'"):
        precompute_options(SimpleNamespace(name="x", options={"shard_sise": 3}))


def test_old_lightning_objective_names_the_new_form():
    with pytest.raises(ConfigError, match="lightning_opd.*kind: stored_logits") as e:
        load_config("configs/text/lightning_opd.yaml", ["stages.student_lightning.objective.type=lightning_opd"])
    assert "\n" not in str(e.value)
