"""Damaged Lightning OPD teacher shards lose no intact sample: real shards written by the precompute
stage on a tiny teacher, damaged one way at a time (truncated mid-member, flipped bytes in a member or
in a tar header, a deleted shard, another shard's bytes under its name, swapped keys or a wrong count
in the manifest); the samples read must be exactly the intact ones, bit for bit, each once, and the
default policy must stop with one line naming the shard, the sample and the fix.  A killed precompute
resumes after its last complete shard, and a damaged shard is rewritten alone, byte for byte.

    python -m pytest tests/test_corrupt_shards.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mmdistill.config import config_from_raw
from mmdistill.errors import CheckpointError, ConfigError
from mmdistill.modalities.text import shards
from mmdistill.modalities.text.adapter import CausalLMAdapter, build_tiny_lm
from mmdistill.modalities.text.config import TinyLMConfig
from mmdistill.modalities.text.precompute import run_precompute_stage
from mmdistill.modalities.text.tasks.teacher_shards import TeacherShardsTask
from mmdistill.train import RunContext, build_task, step_seed

ARITH = {"type": "arith", "difficulty": 1, "max_value": 9}
N, SHARD, BATCH = 12, 5, 4  # shards hold samples 0-4, 5-9, 10-11; batches sample 0-3, 4-7, 8-11


def _cfg(root: Path, teacher: Path):
    return config_from_raw(
        {
            "run_dir": str(root / "run"),
            "seed": 0,
            "device": "cpu",
            "task": ARITH,
            "models": {"teacher": {"path": str(teacher)}},
            "rollout": {"max_new_tokens": 6, "temperature": 1.0},
            "stages": [
                {
                    "name": "logprobs",
                    "kind": "precompute",
                    "teacher": "teacher",
                    "precompute": {"n": N, "k": 4, "batch_size": BATCH, "shard_size": SHARD},
                }
            ],
        }
    )


def _precompute(adapter, teacher: Path, root: Path, fail_at_batch: int | None = None) -> tuple[dict, list[int]]:
    """Run the precompute stage in `root/run`; the batches it sampled (by seed); optionally die (an
    exception, like a kill: nothing is cleaned up) when it reaches batch `fail_at_batch`."""
    from mmdistill.pipeline import make_accelerator

    cfg = _cfg(root, teacher)
    ctx = RunContext(cfg, root / "run", make_accelerator("cpu"), adapter, build_task(cfg.task), quiet=True)
    seeds = {step_seed(cfg.seed, "logprobs", b, "sample"): b for b in range(N // BATCH + 1)}
    sampled, sample = [], adapter.sample

    def spy(model, prompts, max_new_tokens, temperature, gen):
        b = seeds[gen.initial_seed()]
        if b == fail_at_batch:
            raise KeyboardInterrupt("killed")
        sampled.append(b)
        return sample(model, prompts, max_new_tokens, temperature, gen)

    adapter.sample = spy
    try:
        return run_precompute_stage(ctx, cfg.stages[0]), sampled
    finally:
        del adapter.sample


@pytest.fixture(scope="module")
def lab(tmp_path_factory, word_tokenizer):
    root = tmp_path_factory.mktemp("corrupt")
    adapter = CausalLMAdapter(word_tokenizer)
    teacher = build_tiny_lm(
        TinyLMConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seed=1), word_tokenizer
    )
    adapter.save(teacher.eval(), root / "teacher")
    result, sampled = _precompute(adapter, root / "teacher", root / "pristine")
    d = root / "pristine" / "run" / "logprobs" / "shards"
    manifest = json.loads((d / "manifest.json").read_text())
    samples, bad = shards.read_shards(d, manifest)
    assert not bad and len(samples) == N and sampled == [0, 1, 2] and result["shards"] == 3
    return SimpleNamespace(root=root, adapter=adapter, dir=d, manifest=manifest, samples=samples)


def _bits(sample) -> tuple:
    """A sample as plain bytes: key, its JSON, and each array's dtype, shape and bytes."""
    key, meta, arrays = sample
    return (key, json.dumps(meta, sort_keys=True), *((a.dtype.str, a.shape, a.tobytes()) for a in arrays.values()))


def test_reader_reads_what_a_tar_reader_reads(lab):
    """An independent reference: webdataset (any tar reader) sees the same samples in the shards."""
    wds = pytest.importorskip("webdataset")
    ours = [_bits(s) for s in lab.samples]
    theirs = []
    for entry in lab.manifest["shards"]:
        for s in wds.WebDataset(str(lab.dir / entry["name"]), shardshuffle=False, empty_check=False):
            arrays = {a: np.load(__import__("io").BytesIO(s[f"{a}.npy"])) for a in shards.ARRAYS}
            theirs.append(_bits((s["__key__"], json.loads(s["json"]), arrays)))
    assert ours == theirs and len({b[0] for b in ours}) == N
    assert [s[0] for s in lab.samples] == [f"{i:09d}" for i in range(N)]


def _entry(m: dict, key: str) -> tuple[int, dict]:
    for i, e in enumerate(m["shards"]):
        for s in e["samples"]:
            if s["key"] == key:
                return i, s
    raise KeyError(key)


def _flip(path: Path, at: int, n: int = 4) -> None:
    data = bytearray(path.read_bytes())
    data[at : at + n] = bytes(b ^ 0xFF for b in data[at : at + n])
    path.write_bytes(bytes(data))


def _damage(kind: str, d: Path, m: dict) -> set[str]:
    """Damage the copy in `d` one way; the keys of the samples that damage destroys (worked out from
    the pristine index, independently of the reader)."""
    keys = [s["key"] for e in m["shards"] for s in e["samples"]]
    if kind == "truncate_mid_member":  # cut shard 0 in the middle of sample 2's topk_logp member
        off, size = _entry(m, keys[2])[1]["members"][3]
        cut = off + size // 2
        (d / "shard-000000.tar").write_bytes((d / "shard-000000.tar").read_bytes()[:cut])
        return {s["key"] for s in m["shards"][0]["samples"] if max(o + z for o, z in s["members"]) > cut}
    if kind == "flip_member_bytes":  # four bytes inside sample 6's topk_idx array
        off, size = _entry(m, keys[6])[1]["members"][2]
        _flip(d / "shard-000001.tar", off + size - 8)
        return {keys[6]}
    if kind == "flip_tar_header":  # the tar header of sample 7's json member: no sample's data
        off, _ = _entry(m, keys[7])[1]["members"][0]
        _flip(d / "shard-000001.tar", off - 512 + 10)
        return set()
    if kind == "delete_shard":
        (d / "shard-000002.tar").unlink()
        return {s["key"] for s in m["shards"][2]["samples"]}
    if kind == "foreign_shard":  # shard 0's bytes under shard 1's name
        shutil.copyfile(d / "shard-000000.tar", d / "shard-000001.tar")
        return {s["key"] for s in m["shards"][1]["samples"]}
    if kind == "manifest_swapped_keys":  # the index says sample 3 is sample 4 and vice versa
        mm = json.loads((d / "manifest.json").read_text())
        s3, s4 = mm["shards"][0]["samples"][3], mm["shards"][0]["samples"][4]
        s3["key"], s4["key"] = s4["key"], s3["key"]
        (d / "manifest.json").write_text(json.dumps(mm))
        return {keys[3], keys[4]}
    raise AssertionError(kind)


KINDS = [
    "truncate_mid_member",
    "flip_member_bytes",
    "flip_tar_header",
    "delete_shard",
    "foreign_shard",
    "manifest_swapped_keys",
]


@pytest.mark.parametrize("kind", KINDS)
def test_damage_costs_exactly_the_damaged_samples(lab, tmp_path, kind):
    d = tmp_path / "shards"
    shutil.copytree(lab.dir, d)
    lost = _damage(kind, d, lab.manifest)
    assert kind == "flip_tar_header" or lost, "the damage must hit at least one sample"
    intact = [_bits(s) for s in lab.samples if s[0] not in lost]

    skip = TeacherShardsTask(shards=str(d), task=ARITH, damaged="skip")
    problems = skip.problems("train")
    assert sorted(d.key for d in skip.skipped) == sorted(lost)
    # the intact samples, each once, with their own data (the stored teacher's arrays, bit for bit)
    good, bad = shards.read_shards(d, json.loads((d / "manifest.json").read_text()))
    assert [_bits(s) for s in good] == intact and {b.key for b in bad} == lost
    assert [p.meta["key"] for p in problems] == [b[0] for b in intact]
    by_key = {s[0]: s for s in lab.samples}
    for p in problems:
        ref = by_key[p.meta["key"]]
        assert p.question == ref[1]["question"] and p.answer == ref[1]["answer"]
        assert p.completion_ids.tobytes() == ref[2]["completion_ids"].tobytes()

    strict = TeacherShardsTask(shards=str(d), task=ARITH)
    if not lost:
        assert [p.meta["key"] for p in strict.problems("train")] == [b[0] for b in intact]
        return
    first, shard = bad[0].key, bad[0].shard  # the first damaged sample in the manifest's order (checked above)
    with pytest.raises(CheckpointError) as e:
        strict.problems("train")
    line = str(e.value)
    assert "\n" not in line
    assert f"{shard}: sample '{first}' is damaged" in line
    assert f"`mmdistill train --resume {lab.root / 'pristine' / 'run'}`" in line
    assert "rewrites only the damaged shards" in line and "task.damaged: skip" in line
    assert f"({len(lost)} left out)" in line


def test_manifest_that_disagrees_with_its_count_is_refused(lab, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(lab.dir, d)
    m = json.loads((d / "manifest.json").read_text())
    m["n"] = N + 1
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"indexes 12 samples \(12 distinct keys\), its n is 13.*--resume"):
        TeacherShardsTask(shards=str(d), task=ARITH, damaged="skip").problems("train")
    with pytest.raises(ConfigError, match="task.damaged: 'ignore' is not one of error, skip"):
        TeacherShardsTask(shards=str(d), task=ARITH, damaged="ignore")


def _files(d: Path) -> dict[str, tuple[int, int]]:
    """Each shard file's inode and mtime: unchanged when a run keeps the shard."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(d.glob("shard-*.tar"))}


def test_killed_precompute_resumes_after_its_last_complete_shard(lab, tmp_path):
    root = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        _precompute(
            lab.adapter, lab.root / "teacher", root, fail_at_batch=2
        )  # batches 0 and 1 ran: shard 0 is complete
    d = root / "run" / "logprobs" / "shards"
    assert sorted(p.name for p in d.iterdir()) == [
        "shard-000000.index.json",
        "shard-000000.tar",
        "shard-000001.tar.tmp",
    ]
    with pytest.raises(CheckpointError, match="no manifest.json"):  # a reader never sees the half-written run
        TeacherShardsTask(shards=str(d), task=ARITH).problems("train")
    kept = _files(d)
    result, sampled = _precompute(lab.adapter, lab.root / "teacher", root)
    assert sampled == [1, 2]  # shard 1 (samples 5-9) and shard 2 (10-11): batch 0 is not replayed
    assert not result["reused"] and _files(d)["shard-000000.tar"] == kept["shard-000000.tar"]
    for e in lab.manifest["shards"]:  # byte for byte the uninterrupted run's shards
        assert (d / e["name"]).read_bytes() == (lab.dir / e["name"]).read_bytes()
    m = json.loads((d / "manifest.json").read_text())
    assert {**m, "run_dir": None} == {**lab.manifest, "run_dir": None}
    assert not list(d.glob("*.tmp"))


@pytest.mark.parametrize("kind", ["flip_member_bytes", "flip_tar_header", "delete_shard"])
def test_precompute_rewrites_only_the_damaged_shard(lab, tmp_path, kind):
    root = tmp_path / "repair"
    shutil.copytree(lab.root / "pristine", root)
    d = root / "run" / "logprobs" / "shards"
    m = json.loads((d / "manifest.json").read_text())
    m["run_dir"] = str(root / "run")  # the copy's own run directory
    (d / "manifest.json").write_text(json.dumps(m))
    _damage(kind, d, m)
    hit = {"flip_member_bytes": "shard-000001.tar", "flip_tar_header": "shard-000001.tar"}.get(kind, "shard-000002.tar")
    before = _files(d)
    result, sampled = _precompute(lab.adapter, lab.root / "teacher", root)
    assert sampled == ({"shard-000001.tar": [1, 2], "shard-000002.tar": [2]}[hit])
    after = _files(d)
    assert {k: v for k, v in after.items() if k != hit} == {k: v for k, v in before.items() if k != hit}
    assert (d / hit).read_bytes() == (lab.dir / hit).read_bytes()  # the same teacher samples, replayed
    good, bad = shards.read_shards(d, json.loads((d / "manifest.json").read_text()))
    assert not bad and [_bits(s) for s in good] == [_bits(s) for s in lab.samples]
    again, sampled = _precompute(lab.adapter, lab.root / "teacher", root)
    assert again["reused"] and sampled == []


@pytest.mark.slow  # two pipeline runs: about 20 s on a shared CPU
def test_the_printed_fix_works_end_to_end(lab, tmp_path, capsys):
    """`mmdistill train`: a damaged shard stops the distillation stage with exit code 2 and one line; the
    line's fix (delete the precompute stage's result.json, `mmdistill train --resume RUN_DIR`) rewrites
    that shard alone and the run completes; `damaged: skip` would have trained on the intact samples."""
    import yaml

    from mmdistill.cli import main

    run = tmp_path / "run"
    shards_dir = run / "logprobs" / "shards"
    raw = {
        "run_dir": str(run),
        "seed": 0,
        "device": "cpu",
        "task": ARITH,
        "models": {
            "teacher": {"path": str(lab.root / "teacher")},
            "student": {"prune": {"source": "teacher", "keep_layers": [0]}},
            "stored": {"kind": "stored_logits", "path": str(shards_dir)},
        },
        "eval": {"n": 2, "batch_size": 2, "max_new_tokens": 4},
        "rollout": {"max_new_tokens": 6, "temperature": 1.0},
        "stages": [
            {
                "name": "logprobs",
                "kind": "precompute",
                "teacher": "teacher",
                "precompute": {"n": N, "k": 4, "batch_size": BATCH, "shard_size": SHARD},
            },
            {
                "name": "lopd",
                "student": "student",
                "teacher": "stored",
                "objective": {"type": "reverse_kl", "source": "dataset"},
                "task": {"type": "teacher_shards", "shards": str(shards_dir), "task": ARITH},
                "train": {"steps": 1, "batch_size": 4, "log_every": 1, "save_every": 0},
            },
        ],
    }
    cfg = tmp_path / "lopd.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    from mmdistill.modalities.text import precompute

    result = precompute._result

    def result_then_damage(manifest, out, *args, **kwargs):  # the disk damages shard 1 once the stage is done
        off, size = manifest["shards"][1]["samples"][1]["members"][2]  # sample 6's topk_idx array
        _flip(out / "shard-000001.tar", off + size - 8)
        return result(manifest, out, *args, **kwargs)

    precompute._result = result_then_damage
    try:
        assert main(["train", str(cfg)]) == 2
    finally:
        precompute._result = result
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "shard-000001.tar: sample '000000006' is damaged (sha256 mismatch)" in err[0]
    fix = f"delete {run / 'logprobs' / 'result.json'} and run `mmdistill train --resume {run}`"
    assert fix in err[0] and "task.damaged: skip" in err[0]
    (run / "logprobs" / "result.json").unlink()
    assert main(["train", "--resume", str(run)]) == 0
    assert (shards_dir / "shard-000001.tar").read_bytes() == (lab.dir / "shard-000001.tar").read_bytes()
    assert json.loads((run / "lopd" / "result.json").read_text())["steps"] == 1


def test_a_malformed_index_is_one_line(lab, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(lab.dir, d)
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][1]["samples"][2]["members"] = [[-5, 3]] * 5
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"the index of shard-000001\.tar is malformed .*--resume") as e:
        TeacherShardsTask(shards=str(d), task=ARITH, damaged="skip").problems("train")
    assert "\n" not in str(e.value)
