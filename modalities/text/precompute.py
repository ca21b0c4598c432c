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
teacher, tokenizer and options is reused instead of rewritten.

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

from mmdistill.checkpoint import atomic_dir, atomic_write_text
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
    """Sample `n` teacher completions of training prompts, score them with the same teacher,
    write top-k + tail per completion token as webdataset shards with a manifest (atomically);
    a complete manifest for the same teacher, tokenizer and options is reused."""
    wds = shards.webdataset()
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
    }
    same = ("teacher_hash", "tokenizer_hash", "k", "n", "score_temperature", "rollout", "task", "seed")
    old = shards.read_manifest_quiet(out)
    if old is not None and all(old.get(key) == header[key] for key in same) and shards.shards_intact(out, old):
        if not ctx.quiet:
            print(f"[{st.name}] reusing complete shards in {out}")
        return _result(old, out, time.time() - t0, reused=True)

    if old is not None and not ctx.quiet:
        print(
            f"[{st.name}] {out} holds damaged shards or those of another teacher, tokenizer or options; rewriting them"
        )
    teacher = ctx.load_model(st.teacher).eval().requires_grad_(False)
    adapter.chunk_size = st.train.chunk_size
    problems = sample_train(task, random.Random(step_seed(ctx.cfg.seed, st.name, 0, "data")), opt.n)
    tokens, reward_sum = 0, 0.0
    with atomic_dir(out) as tmp:
        with wds.ShardWriter(
            str(tmp / shards.SHARD_PATTERN), maxcount=opt.shard_size, maxsize=float("inf"), verbose=0, mtime=0.0
        ) as sink:
            starts = range(0, opt.n, opt.batch_size)
            for b, start in enumerate(tqdm(starts, desc=st.name, unit="batch", disable=ctx.quiet, dynamic_ncols=True)):
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
                    meta = {
                        "question": p.question,
                        "answer": p.answer,
                        "solution": p.solution,
                        "teacher_reward": rewards[i],
                    }
                    sink.write(
                        shards.sample_record(
                            f"{start + i:09d}",
                            meta,
                            ids.numpy(),
                            idx.numpy(),
                            logp.float().numpy(),
                            tail.float().numpy(),
                        )
                    )
                tokens += sum(lens)
                reward_sum += sum(rewards)
        entries = shards.shard_entries(tmp)
        manifest = {
            **header,
            "tokens": tokens,
            "teacher_reward": reward_sum / opt.n,
            "num_shards": len(entries),
            "shards": entries,
        }
        atomic_write_text(tmp / shards.MANIFEST, json.dumps(manifest, indent=1))
    return _result(manifest, out, time.time() - t0, reused=False)


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
