"""The `precompute` stage kind (Lightning OPD, arXiv 2604.13010; docs/objectives.md section 8.13): a
teacher writes its own completions of training prompts and their top-k log-probs once, as teacher
shards (`shards.py`), so that a later stage distils from them with no live teacher
(`models.NAME.kind: stored_logits`).

    - name: teacher_logprobs
      kind: precompute
      teacher: teacher_sft             # a checkpoint of the run's tokenizer (a models entry or a trained stage)
      options: {n: 4096, k: 64}     # written to RUN_DIR/STAGE/shards unless precompute.out

The teacher's sha256 (`shards.checkpoint_hash`) and the run's tokenizer hash are recorded in the
manifest; the stored-logits teacher checks them when it loads.  A complete manifest for the same
teacher, tokenizer and options is reused instead of rewritten.  Each shard is renamed into place
only when complete, with an index beside it, and the manifest is written last: a killed precompute
resumes after its last complete shard, and a shard found damaged is rewritten alone (the batches
that sampled it are replayed with their own seeds, so on CPU it comes back byte for byte).

    mmdistill train configs/text/lightning_opd.yaml
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmdistill.checkpoint import atomic_write_text
from mmdistill.config import from_dict
from mmdistill.errors import CheckpointError, ConfigError
from mmdistill.interfaces import StageKind
from mmdistill.modalities.text import shards
from mmdistill.registry import STAGE_KINDS
from mmdistill.train import sample_train, step_seed


@dataclass
class PrecomputeOptions:
    """`stages.NAME.options`: how many teacher rollouts, how many top-k entries, where to."""

    n: int = 1024  # teacher rollouts (training prompts drawn with the run's seed)
    k: int = 64  # top-k log-probs kept per token (plus one tail bucket)
    out: str | None = None  # shard directory; default RUN_DIR/STAGE/shards
    batch_size: int = 256  # prompts sampled and scored at once
    shard_size: int = 1000  # samples per tar shard
    score_temperature: float = 1.0  # temperature of the stored log-probs (= the distilling objective's temperature)


def precompute_options(st: Any) -> PrecomputeOptions:
    """The stage's options, checked (unknown keys, types, ranges) with the key path in every error."""
    where = f"stages.{st.name}.options"
    opt = from_dict(PrecomputeOptions, dict(st.options), where)
    for key, value in (("n", opt.n), ("k", opt.k), ("batch_size", opt.batch_size), ("shard_size", opt.shard_size)):
        if value < 1:
            raise ConfigError(f"{where}.{key}: {value} must be >= 1")
    if opt.score_temperature <= 0:
        raise ConfigError(f"{where}.score_temperature: {opt.score_temperature} must be > 0")
    return opt


def teacher_checkpoint(ctx: Any, ref: str, where: str) -> Path:
    """The weight directory of teacher `ref`: a stage's final checkpoint or a `models` path."""
    cfg = ctx.model_config(ref)  # a stage that has not run yet raises CheckpointError here
    if cfg.kind != "checkpoint":
        raise ConfigError(
            f"{where}: '{ref}' is a {cfg.kind} teacher; teacher shards store top-k ids of the run's tokenizer, "
            "so name a checkpoint of the run's tokenizer"
        )
    if cfg.path is None:
        kind = "tiny (random-init)" if cfg.tiny is not None else "prune" if cfg.prune is not None else "merge"
        raise ConfigError(
            f"{where}: '{ref}' is a {kind} model with no checkpoint to hash for teacher consistency; "
            "train it in a stage first and name that stage as the teacher"
        )
    return local_checkpoint(cfg.path, cfg.revision, where)


def local_checkpoint(path: str, revision: str | None, where: str) -> Path:
    """A local directory as is; a hub id as its cached snapshot (no downloads)."""
    local = Path(path)
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, revision=revision, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any failure means no local copy
        raise CheckpointError(
            f"{where}: no local copy of '{path}' to hash ({type(e).__name__}); download it or give a local path"
        ) from None


def run_precompute_stage(ctx: Any, st: Any) -> dict[str, Any]:
    """Sample `n` teacher completions of training prompts, score them with the same teacher and
    write top-k + tail per completion token as tar shards, each renamed into place when complete,
    then the manifest.  Shards already written with the same settings and still intact are kept:
    a complete manifest is reused, a killed run resumes after its last complete shard, and a
    damaged shard is rewritten alone (the batches that sampled it are replayed with their seeds)."""
    t0 = time.time()
    opt = precompute_options(st)
    where = f"stages.{st.name}"
    if st.task is not None and st.task.get("type") == "teacher_shards":
        raise ConfigError(
            f"{where}.task: a precompute stage samples prompts of an ordinary task (e.g. arith), not teacher_shards"
        )
    adapter, task = ctx.adapter, ctx.build_task(st.task)
    if opt.k > adapter.vocab_size:
        raise ConfigError(
            f"{where}.precompute.k: {opt.k} exceeds the tokenizer's {adapter.vocab_size} tokens; lower it"
        )
    out = Path(opt.out) if opt.out else ctx.run_dir / st.name / "shards"
    teacher_dir = teacher_checkpoint(ctx, st.teacher, f"{where}.teacher")
    header = {
        "format": shards.FORMAT,
        "teacher": st.teacher,
        "teacher_path": str(teacher_dir),
        "teacher_hash": shards.checkpoint_hash(teacher_dir),
        "tokenizer_hash": shards.tokenizer_hash(adapter.tokenizer),
        "k": opt.k,
        "n": opt.n,
        "score_temperature": opt.score_temperature,
        "rollout": {"temperature": st.rollout.temperature, "max_new_tokens": st.rollout.max_new_tokens},
        "task": st.task or ctx.cfg.task,
        "seed": ctx.cfg.seed,
        "stage": st.name,
        "run_dir": str(ctx.run_dir),
    }
    same = ("teacher_hash", "tokenizer_hash", "k", "n", "score_temperature", "rollout", "task", "seed")
    old = shards.read_manifest_quiet(out)
    if old is not None and all(old.get(key) == header[key] for key in same):
        if all(shards.shard_ok(out, e) for e in old.get("shards", [])) and _indexed(old):
            if not ctx.quiet:
                print(f"[{st.name}] reusing complete shards in {out}")
            return _result(old, out, time.time() - t0, reused=True)

    # what a shard's samples depend on: a kept shard was written with exactly these settings
    settings = {key: header[key] for key in same} | {"batch_size": opt.batch_size, "shard_size": opt.shard_size}
    num_shards = -(-opt.n // opt.shard_size)
    out.mkdir(parents=True, exist_ok=True)
    (out / shards.MANIFEST).unlink(missing_ok=True)  # the manifest is written last: readers never see a mix
    for stale in out.glob("shard-*.tar.tmp"):  # a shard a killed run left half-written
        stale.unlink()
    done = {i for i in range(num_shards) if _kept_shard(out / (shards.SHARD_PATTERN % i), settings)}
    keep = {shards.SHARD_PATTERN % i for i in done} | {
        shards.index_path(out / (shards.SHARD_PATTERN % i)).name for i in done
    }
    for extra in out.glob("shard-*"):  # damaged shards, shards of other settings, shards beyond num_shards
        if extra.name not in keep:
            extra.unlink()
    todo = [i for i in range(num_shards) if i not in done]
    if not ctx.quiet:
        if done:
            print(f"[{st.name}] keeping {len(done)} intact shards in {out}; writing {len(todo)}")
        elif old is not None:
            print(f"[{st.name}] {out} holds shards of another teacher, tokenizer or options; rewriting them")

    if todo:
        _write_shards(ctx, st, opt, task, out, todo, settings)
    entries = [_kept_shard(out / (shards.SHARD_PATTERN % i), settings) for i in range(num_shards)]
    if any(e is None for e in entries):
        raise CheckpointError(f"{where}: a shard written to {out} does not read back intact; check the disk and re-run")
    manifest = {
        **header,
        "tokens": sum(e["tokens"] for e in entries),
        "teacher_reward": sum(e["reward_sum"] for e in entries) / opt.n,
        "num_shards": num_shards,
        "shards": [{key: e[key] for key in ("name", "bytes", "sha256", "samples")} for e in entries],
    }
    atomic_write_text(out / shards.MANIFEST, json.dumps(manifest, indent=1))
    return _result(manifest, out, time.time() - t0, reused=False)


def _indexed(manifest: dict) -> bool:
    """True when every shard entry carries its sample index (the reader needs it)."""
    return all(isinstance(e, dict) and isinstance(e.get("samples"), list) for e in manifest.get("shards", []))


def _kept_shard(path: Path, settings: dict) -> dict | None:
    """The index of a complete shard written with `settings` whose bytes still match it, else None."""
    try:
        index = json.loads(shards.index_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("settings") != settings or not shards.shard_ok(path.parent, index):
        return None
    return index


def _write_shards(ctx: Any, st: Any, opt: PrecomputeOptions, task: Any, out: Path, todo: list[int], settings: dict):
    """Write shards `todo`: replay every batch that holds one of their samples (its own seed), keep
    the samples of those shards in order, and finish each shard (rename + index) when it is full."""
    adapter = ctx.adapter
    teacher = ctx.load_model(st.teacher).eval().requires_grad_(False)
    adapter.chunk_size = st.train.chunk_size
    problems = sample_train(task, random.Random(step_seed(ctx.cfg.seed, st.name, 0, "data")), opt.n)
    wanted = {i for s in todo for i in range(s * opt.shard_size, min((s + 1) * opt.shard_size, opt.n))}
    batches = sorted({i // opt.batch_size for i in wanted})
    writer, shard, tokens, reward_sum = None, -1, 0, 0.0
    for b in tqdm(batches, desc=st.name, unit="batch", disable=ctx.quiet, dynamic_ncols=True):
        start = b * opt.batch_size
        batch = problems[start : start + opt.batch_size]
        gen = torch.Generator(device=adapter.device).manual_seed(step_seed(ctx.cfg.seed, st.name, b, "sample"))
        with torch.no_grad():
            rollout = adapter.sample(
                teacher, [p.question for p in batch], st.rollout.max_new_tokens, st.rollout.temperature, gen
            )
            top = adapter.step_dist(teacher, rollout, temperature=opt.score_temperature).topk(opt.k)
        rewards = [float(task.reward(p, t)) for p, t in zip(batch, adapter.decode(rollout))]
        lens = rollout.mask_B_T.sum(1).long().tolist()
        ids_N = rollout.actions[rollout.mask_B_T.bool()]
        parts = [x.cpu().split(lens) for x in (ids_N, top.topk_idx_N_K, top.topk_logp_N_K, top.tail_logp_N)]
        for i, (p, ids, idx, logp, tail) in enumerate(zip(batch, *parts)):
            index = start + i
            if index not in wanted:
                continue
            if index // opt.shard_size != shard:
                shard = index // opt.shard_size
                writer, tokens, reward_sum = shards.ShardWriter(out / (shards.SHARD_PATTERN % shard)), 0, 0.0
            meta = {"question": p.question, "answer": p.answer, "solution": p.solution, "teacher_reward": rewards[i]}
            arrays = {"completion_ids": ids, "topk_idx": idx, "topk_logp": logp.float(), "tail_logp": tail.float()}
            writer.write(f"{index:09d}", meta, {name: a.numpy() for name, a in arrays.items()})
            tokens += lens[i]
            reward_sum += rewards[i]
            if index + 1 == min((shard + 1) * opt.shard_size, opt.n):  # the shard's last sample
                entry = writer.finish()
                record = {**entry, "settings": settings, "tokens": tokens, "reward_sum": reward_sum}
                atomic_write_text(shards.index_path(writer.path), json.dumps(record))


def _result(manifest: dict, out: Path, seconds: float, reused: bool) -> dict[str, Any]:
    # "eval" holds the mean verifier reward of the stored teacher completions (the SFT data's quality)
    return {
        "kind": "precompute",
        "n": manifest["n"],
        "k": manifest["k"],
        "shards": manifest["num_shards"],
        "tokens": manifest["tokens"],
        "teacher": manifest["teacher"],
        "teacher_hash": manifest["teacher_hash"],
        "out": str(out),
        "reused": reused,
        "seconds": round(seconds, 1),
        "eval": {"teacher_rollout_reward": manifest["teacher_reward"]},
    }


STAGE_KINDS.register("precompute")(StageKind(run_precompute_stage, uses="teacher", check=precompute_options))
