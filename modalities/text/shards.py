"""Lightning OPD: on-policy distillation with no live teacher.

The teacher's top-k log-probs (plus one tail bucket) are computed once over its own
sampled completions of training prompts (the SFT rollouts) and stored as webdataset
shards; the student then learns a generalized JSD (beta 1: reverse KL) against those
stored distributions, so no teacher is loaded while it trains.

    precompute stage  (kind: precompute, teacher: T)  -> RUN_DIR/STAGE/shards/{shard-*.tar, manifest.json}
    task teacher_shards (shards: that dir, task: the underlying task)  -> training problems with stored top-k
    objective lightning_opd (teacher: T)  -> KL(student || stored teacher top-k), normalised like reverse_kl

Teacher consistency (the paper's condition): the teacher named by the training stage must be
the checkpoint that wrote the shards, checked by a sha256 of its safetensors files against the
manifest before training (`check_teacher_consistency`).  In the same spirit, a student warmed
up by SFT on teacher data must have been warmed up on the same teacher: a stage in the student's
lineage trained on teacher shards, or by `sft` with `source: teacher`, must name a teacher with
the same hash (objective key `check_warmup: false` lets one study the mismatch on purpose).

Teachers are checkpoints (a trained stage, or a `models` entry with a `path`); a random-init
`tiny`, `prune` or `merge` teacher has no weight files to hash and is refused: train it in a
stage first.  The shards of one run are read into memory (fine up to a few GB of top-k); needs
the `data` extra (`pip install 'mmdistill[data]'`, i.e. webdataset).

    mmdistill train configs/text/lightning_opd.yaml
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmdistill.errors import CheckpointError, CompatibilityError, ConfigError, MmdistillError
from mmdistill.objectives.registered import ObjectiveBatch
from mmdistill.registry import OBJECTIVES, TASKS
from mmdistill.rollout import Rollout
from mmdistill.stepdist import TopKCategorical

FORMAT = "mmdistill.lightning/v1"
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-%06d.tar"
ARRAYS = ("completion_ids", "topk_idx", "topk_logp", "tail_logp")  # one .npy member each per sample


def _wds() -> Any:
    try:
        import webdataset
    except ImportError:
        raise MmdistillError("Lightning OPD shards need the webdataset package; install it with pip install 'mmdistill[data]'") from None
    return webdataset


# ----------------------------------------------------------------------------- hashes


def _sha256_file(path: Path, h: Any = None) -> Any:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def checkpoint_hash(path: str | Path) -> str:
    """sha256 over a checkpoint's `*.safetensors` files (names, sizes, bytes; sorted by name):
    the same for any copy of the weights, whatever the directory's name or mtimes."""
    root = Path(path)
    files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(
            f"'{root}' holds no *.safetensors weights to hash; point the teacher at a checkpoint saved with safe_serialization=True"
        )
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + p.stat().st_size.to_bytes(8, "little"))
        _sha256_file(p, h)
    return h.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of what turns a question into token ids: vocabulary, end token, chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "eos": tokenizer.eos_token,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def teacher_checkpoint(ctx: Any, ref: str, where: str) -> Path:
    """The weight directory of teacher `ref`: a stage's final checkpoint or a `models` path."""
    cfg = ctx.model_config(ref)  # a stage that has not run yet raises CheckpointError here
    if cfg.path is None:
        kind = "tiny (random-init)" if cfg.tiny is not None else "prune" if cfg.prune is not None else "merge"
        raise ConfigError(
            f"{where}: '{ref}' is a {kind} model with no checkpoint to hash for teacher consistency; "
            "train it in a stage first and name that stage as the teacher"
        )
    if cfg.cross_tokenizer:
        raise ConfigError(f"{where}: '{ref}' is a cross-tokenizer teacher; Lightning OPD stores top-k ids of the run's tokenizer, so use a same-tokenizer teacher")
    local = Path(cfg.path)
    if local.is_dir():
        return local
    try:  # a hub id: its cached snapshot (no downloads)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.path, revision=cfg.revision, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any failure means no local copy
        raise CheckpointError(f"{where}: no local copy of '{cfg.path}' to hash ({type(e).__name__}); download it or give a local path") from None


# ----------------------------------------------------------------------------- precompute stage


@dataclass
class PrecomputeOptions:
    """`stages.NAME.precompute`: how many teacher rollouts, how many top-k entries, where to."""

    n: int = 1024  # teacher rollouts (training prompts drawn with the run's seed)
    k: int = 64  # top-k log-probs kept per token (plus one tail bucket)
    out: str | None = None  # shard directory; default RUN_DIR/STAGE/shards
    batch_size: int = 256  # prompts sampled and scored at once
    shard_size: int = 1000  # samples per tar shard
    score_temperature: float = 1.0  # temperature of the stored log-probs (= the objective's temperature)


def precompute_options(st: Any) -> PrecomputeOptions:
    """The stage's options, checked (unknown keys, types, ranges) with the key path in every error."""
    from mmdistill.config import from_dict

    where = f"stages.{st.name}.precompute"
    opt = from_dict(PrecomputeOptions, dict(st.precompute), where)
    for key in ("n", "k", "batch_size", "shard_size"):
        if getattr(opt, key) < 1:
            raise ConfigError(f"{where}.{key}: {getattr(opt, key)} must be >= 1")
    if opt.score_temperature <= 0:
        raise ConfigError(f"{where}.score_temperature: {opt.score_temperature} must be > 0")
    return opt


def run_precompute_stage(ctx: Any, st: Any) -> dict[str, Any]:
    """Sample `n` teacher completions of training prompts, score them with the same teacher,
    write top-k + tail per completion token as webdataset shards with a manifest (atomically);
    a complete manifest for the same teacher, tokenizer and options is reused."""
    from tqdm.auto import tqdm

    from mmdistill.checkpoint import atomic_dir, atomic_write_text
    from mmdistill.train import sample_train, step_seed

    wds = _wds()
    t0 = time.time()
    opt = precompute_options(st)
    where = f"stages.{st.name}"
    if st.task is not None and st.task.get("type") == "teacher_shards":
        raise ConfigError(f"{where}.task: a precompute stage samples prompts of an ordinary task (e.g. arith), not teacher_shards")
    adapter, task = ctx.adapter, ctx.build_task(st.task)
    if opt.k > adapter.vocab_size:
        raise ConfigError(f"{where}.precompute.k: {opt.k} exceeds the tokenizer's {adapter.vocab_size} tokens; lower it")
    out = Path(opt.out) if opt.out else ctx.run_dir / st.name / "shards"
    teacher_dir = teacher_checkpoint(ctx, st.teacher, f"{where}.teacher")
    header = {
        "format": FORMAT,
        "teacher": st.teacher,
        "teacher_path": str(teacher_dir),
        "teacher_hash": checkpoint_hash(teacher_dir),
        "tokenizer_hash": tokenizer_hash(adapter.tokenizer),
        "k": opt.k,
        "n": opt.n,
        "score_temperature": opt.score_temperature,
        "rollout": {"temperature": st.rollout.temperature, "max_new_tokens": st.rollout.max_new_tokens},
        "task": st.task or ctx.cfg.task,
        "seed": ctx.cfg.seed,
        "stage": st.name,
    }
    same = ("teacher_hash", "tokenizer_hash", "k", "n", "score_temperature", "rollout", "task", "seed")
    old = _read_manifest_quiet(out)
    if old is not None and all(old.get(key) == header[key] for key in same) and _shards_intact(out, old):
        if not ctx.quiet:
            print(f"[{st.name}] reusing complete shards in {out}")
        return _result(old, out, time.time() - t0, reused=True)

    if old is not None and not ctx.quiet:
        print(f"[{st.name}] {out} holds damaged shards or those of another teacher, tokenizer or options; rewriting them")
    teacher = ctx.load_model(st.teacher).eval().requires_grad_(False)
    adapter.chunk_size = st.train.chunk_size
    problems = sample_train(task, random.Random(step_seed(ctx.cfg.seed, st.name, 0, "data")), opt.n)
    tokens, reward_sum = 0, 0.0
    with atomic_dir(out) as tmp:
        with wds.ShardWriter(str(tmp / SHARD_PATTERN), maxcount=opt.shard_size, maxsize=float("inf"), verbose=0, mtime=0.0) as sink:
            starts = range(0, opt.n, opt.batch_size)
            for b, start in enumerate(tqdm(starts, desc=st.name, unit="batch", disable=ctx.quiet, dynamic_ncols=True)):
                batch = problems[start : start + opt.batch_size]
                gen = torch.Generator(device=adapter.device).manual_seed(step_seed(ctx.cfg.seed, st.name, b, "sample"))
                with torch.no_grad():
                    rollout = adapter.sample(teacher, [p.question for p in batch], st.rollout.max_new_tokens, st.rollout.temperature, gen)
                    top = adapter.step_dist(teacher, rollout, temperature=opt.score_temperature).topk(opt.k)
                rewards = [float(task.reward(p, t)) for p, t in zip(batch, adapter.decode(rollout))]
                lens = rollout.mask_B_T.sum(1).long().tolist()
                ids_N = rollout.actions[rollout.mask_B_T.bool()]
                parts = [x.cpu().split(lens) for x in (ids_N, top.topk_idx_N_K, top.topk_logp_N_K, top.tail_logp_N)]
                for i, (p, ids, idx, logp, tail) in enumerate(zip(batch, *parts)):
                    meta = {"question": p.question, "answer": getattr(p, "answer", ""), "solution": getattr(p, "solution", ""), "teacher_reward": rewards[i]}
                    sink.write({
                        "__key__": f"{start + i:09d}",
                        "json": meta,
                        "completion_ids.npy": ids.numpy().astype(np.int32),
                        "topk_idx.npy": idx.numpy().astype(np.int32),
                        "topk_logp.npy": logp.float().numpy(),
                        "tail_logp.npy": tail.float().numpy(),
                    })
                tokens += sum(lens)
                reward_sum += sum(rewards)
        shards = [{"name": p.name, "bytes": p.stat().st_size, "sha256": _sha256_file(p).hexdigest()} for p in sorted(tmp.glob("shard-*.tar"))]
        manifest = {**header, "tokens": tokens, "teacher_reward": reward_sum / opt.n, "num_shards": len(shards), "shards": shards}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    return _result(manifest, out, time.time() - t0, reused=False)


def _result(manifest: dict, out: Path, seconds: float, reused: bool) -> dict[str, Any]:
    # "eval" holds the mean verifier reward of the stored teacher completions (the SFT data's quality)
    return {"kind": "precompute", "n": manifest["n"], "k": manifest["k"], "shards": manifest["num_shards"], "tokens": manifest["tokens"],
            "teacher": manifest["teacher"], "teacher_hash": manifest["teacher_hash"], "out": str(out), "reused": reused,
            "seconds": round(seconds, 1), "eval": {"teacher_rollout_reward": manifest["teacher_reward"]}}


def _read_manifest_quiet(out: Path) -> dict | None:
    try:
        m = json.loads((out / MANIFEST).read_text())
        return m if m.get("format") == FORMAT else None
    except (OSError, ValueError):
        return None


def _shards_intact(out: Path, manifest: dict) -> bool:
    try:
        return all(_sha256_file(out / s["name"]).hexdigest() == s["sha256"] for s in manifest["shards"])
    except (OSError, KeyError, TypeError):
        return False


# ----------------------------------------------------------------------------- the task


@dataclass(frozen=True, eq=False)
class ShardProblem:
    """A training problem read from the shards: the prompt, the teacher's completion ids and its top-k per token."""

    question: str
    answer: str
    solution: str
    completion_ids: np.ndarray  # [T] int32, ends with the end token unless cut at max_new_tokens
    teacher_topk_idx: np.ndarray  # [T, K] int32
    teacher_topk_logp: np.ndarray  # [T, K] float32
    teacher_tail_logp: np.ndarray  # [T] float32, log of the mass outside the top-k
    key: str = ""
    meta: dict = field(default_factory=dict)


@TASKS.register("teacher_shards")
class TeacherShardsTask:
    """Training problems from precomputed teacher shards; evaluation, rewards and vocabulary from
    the underlying `task`.  Shards are read (and checked against the manifest) on first use, so
    the directory may be written by a precompute stage earlier in the same run."""

    def __init__(self, shards: str, task: dict[str, Any]):
        from mmdistill.train import build_task

        if not isinstance(task, dict) or "type" not in task:
            raise ConfigError("task.task: give the underlying task's spec, e.g. {type: arith, difficulty: 2}")
        if task["type"] == "teacher_shards":
            raise ConfigError("task.task.type: the underlying task of teacher_shards cannot itself be teacher_shards")
        self.shards_dir = Path(shards)
        self.spec = dict(task)
        self.base = build_task(task)
        self._manifest: dict | None = None
        self._train: list[ShardProblem] | None = None

    def manifest(self) -> dict:
        if self._manifest is None:
            path = self.shards_dir / MANIFEST
            if not path.exists():
                raise CheckpointError(f"task.shards: no {MANIFEST} in '{self.shards_dir}'; run the precompute stage that writes it (its precompute.out, default RUN_DIR/STAGE/shards) or fix task.shards")
            try:
                m = json.loads(path.read_text())
            except ValueError as e:
                raise CheckpointError(f"{path} is not valid JSON ({e}); delete '{self.shards_dir}' and re-run the precompute stage") from None
            if m.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a {FORMAT} manifest (format {m.get('format')!r}); re-run the precompute stage")
            self._manifest = m
        return self._manifest

    def _load(self) -> list[ShardProblem]:
        if self._train is None:
            m = self.manifest()
            problems = [p for s in m["shards"] for p in read_shard(self.shards_dir / s["name"], s["sha256"])]
            if len(problems) != m["n"]:
                raise CheckpointError(f"'{self.shards_dir}' holds {len(problems)} samples, its manifest says {m['n']}; re-run the precompute stage {m.get('stage', '')!r}")
            self._train = problems
        return self._train

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list:
        from mmdistill.modalities.text.tasks import check_split, draw

        check_split(split)
        if split != "train":
            return self.base.problems(split, n, seed=seed)
        pool = self._load()
        return list(pool) if n is None else draw(pool, n, random.Random(f"teacher_shards:{seed}"))

    def sample_train(self, rng: random.Random) -> ShardProblem:
        return rng.choice(self._load())

    def reward(self, problem: Any, completion: str) -> float:
        return self.base.reward(problem, completion)

    def vocabulary(self) -> list[str]:
        return self.base.vocabulary()

    def summary(self) -> str:
        base = self.base.summary() if hasattr(self.base, "summary") else repr(self.base)
        return f"teacher shards in {self.shards_dir} over {base}"

    def __repr__(self) -> str:
        return f"TeacherShardsTask(shards={str(self.shards_dir)!r}, task={self.spec!r})"


def read_shard(path: Path, sha256: str) -> list[ShardProblem]:
    """One shard's samples, after checking its sha256 against the manifest; any damage raises
    CheckpointError naming the shard and the fix."""
    wds = _wds()
    fix = f"re-run the precompute stage that wrote '{path.parent}' (delete that directory and its stage's result.json)"
    try:
        digest = _sha256_file(path).hexdigest()
    except OSError as e:
        raise CheckpointError(f"teacher shard {path} cannot be read ({e.strerror or type(e).__name__}); {fix}") from None
    if digest != sha256:
        raise CheckpointError(f"teacher shard {path} is corrupt (sha256 {digest[:12]} != manifest {sha256[:12]}); {fix}")
    out = []
    try:
        for s in wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False):
            meta = json.loads(s["json"])
            arr = {k: np.lib.format.read_array(io.BytesIO(s[f"{k}.npy"]), allow_pickle=False) for k in ARRAYS}
            out.append(ShardProblem(meta["question"], meta.get("answer", ""), meta.get("solution", ""), arr["completion_ids"],
                                    arr["topk_idx"], arr["topk_logp"], arr["tail_logp"], key=s["__key__"],
                                    meta={"teacher_reward": meta.get("teacher_reward")}))
    except Exception as e:  # noqa: BLE001 - a tar, JSON or array error all mean a damaged shard
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"teacher shard {path} is unreadable ({type(e).__name__}: {first}); {fix}") from None
    return out


# ----------------------------------------------------------------------------- rollouts


def shard_rollout(adapter: Any, problems: list[ShardProblem]) -> Rollout:
    """A rollout of the stored completions (`adapter.ids_rollout`) with the teacher's top-k in
    `extras` as B-major tensors."""
    K = {p.teacher_topk_idx.shape[-1] for p in problems}
    if len(K) != 1:
        raise MmdistillError(f"the batch mixes teacher shards of different top-k sizes {sorted(K)}; train on shards of one precompute stage")
    rollout = adapter.ids_rollout([p.question for p in problems], [p.completion_ids for p in problems])
    mask_B_T = rollout.mask_B_T.bool()
    B, T = mask_B_T.shape
    (K,) = K

    def scatter(arrays: list[np.ndarray], fill: float, tail: tuple = ()) -> Tensor:
        flat = torch.from_numpy(np.concatenate(arrays)).to(mask_B_T.device)
        out = torch.full((B, T, *tail), fill, dtype=flat.dtype if flat.is_floating_point() else torch.long, device=mask_B_T.device)
        out[mask_B_T] = flat.to(out.dtype)
        return out

    rollout.extras = {
        "teacher_topk_idx_B_T_K": scatter([p.teacher_topk_idx for p in problems], 0, (K,)),
        "teacher_topk_logp_B_T_K": scatter([p.teacher_topk_logp for p in problems], 0.0, (K,)),
        "teacher_tail_logp_B_T": scatter([p.teacher_tail_logp for p in problems], 0.0),
    }
    return rollout


def stored_teacher(rollout: Rollout) -> TopKCategorical:
    """The teacher's stored top-k on the rollout's trained positions."""
    if "teacher_topk_idx_B_T_K" not in rollout.extras:
        raise MmdistillError("objective lightning_opd reads the teacher's stored top-k; train it on a task of type teacher_shards")
    m = rollout.mask_B_T.bool()
    x = rollout.extras
    return TopKCategorical(x["teacher_topk_idx_B_T_K"][m], x["teacher_topk_logp_B_T_K"][m], x["teacher_tail_logp_B_T"][m], rollout.mask_B_T)


# ----------------------------------------------------------------------------- teacher consistency


def check_teacher_consistency(ctx: Any, st: Any, task: Any, temperature: float | None = None, check_warmup: bool = True) -> None:
    """Before training: the stage's teacher is the checkpoint that wrote the shards (sha256), the
    run's tokenizer is the one they were written with, the scoring temperature matches, and
    (check_warmup) no SFT warm-up in the student's lineage learned from another teacher."""
    where = f"stages.{st.name}"
    if not hasattr(task, "manifest"):
        raise ConfigError(f"{where}.task: objective lightning_opd trains on stored teacher top-k; set the task type to teacher_shards")
    if st.teacher is None:
        raise ConfigError(f"{where}.teacher: lightning_opd checks teacher consistency; name the teacher that wrote the shards (e.g. the precompute stage's teacher)")
    m = task.manifest()
    ours = checkpoint_hash(teacher_checkpoint(ctx, st.teacher, f"{where}.teacher"))
    if ours != m["teacher_hash"]:
        raise CompatibilityError(
            f"{where}.teacher: '{st.teacher}' (sha256 {ours[:12]}) is not the teacher that wrote {task.shards_dir} "
            f"('{m['teacher']}', sha256 {m['teacher_hash'][:12]}); name that teacher or re-run the precompute stage with this one"
        )
    if tokenizer_hash(ctx.adapter.tokenizer) != m["tokenizer_hash"]:
        raise CompatibilityError(f"{where}.task: the shards in {task.shards_dir} were written with another tokenizer (ids would mean other tokens); re-run the precompute stage in this run")
    if temperature is not None and abs(temperature - m["score_temperature"]) > 1e-9:
        raise ConfigError(f"{where}.objective.temperature: {temperature} differs from the shards' score_temperature {m['score_temperature']}; set them equal")
    if not check_warmup:
        return
    for stage, teacher_hash, what in _warmup_teachers(ctx, st.student):
        if teacher_hash != m["teacher_hash"]:
            raise CompatibilityError(
                f"{where}.student: its warm-up stage '{stage}' learned from {what} (sha256 {teacher_hash[:12]}), not the OPD teacher "
                f"'{st.teacher}' (sha256 {m['teacher_hash'][:12]}); teacher consistency needs one teacher for SFT and OPD "
                f"(or set {where}.objective.check_warmup=false to study the mismatch)"
            )


def _warmup_teachers(ctx: Any, ref: str | None, seen: set | None = None) -> list[tuple[str, str, str]]:
    """(stage, teacher hash, description) for each SFT-from-a-teacher stage the model `ref` descends from."""
    seen = set() if seen is None else seen
    if ref is None or ref in seen:
        return []
    seen.add(ref)
    cfg = ctx.cfg
    if ref in cfg.models:
        m = cfg.models[ref]
        sources = [m.prune.source] if m.prune is not None else list(m.merge.sources) if m.merge is not None else []
        return [x for src in sources for x in _warmup_teachers(ctx, src, seen)]
    stage = next((s for s in cfg.stages if s.name == ref), None)
    if stage is None or stage.kind != "train":
        return []
    found = []
    obj = stage.objective
    if stage.task is not None and stage.task.get("type") == "teacher_shards":
        shards = ctx.build_task(stage.task)
        found.append((stage.name, shards.manifest()["teacher_hash"], f"the teacher shards in {shards.shards_dir}"))
    elif obj.get("type") == "sft" and obj.get("source") == "teacher" and stage.teacher is not None:
        path = teacher_checkpoint(ctx, stage.teacher, f"stages.{stage.name}.teacher")
        found.append((stage.name, checkpoint_hash(path), f"teacher '{stage.teacher}'"))
    return found + _warmup_teachers(ctx, stage.student, seen)


# ----------------------------------------------------------------------------- the objective


@OBJECTIVES.register("lightning_opd")
class LightningOPD:
    """Offline OPD: generalized JSD(beta) between the student and the teacher's stored top-k + tail
    on the stored teacher completions (beta 1 reverse KL(S||T), 0 forward KL(T||S)), summed over
    tokens and divided by the step's token count like reverse_kl.  No teacher is loaded; the stage
    still names it (`teacher:`) so `check_teacher` can verify it wrote the shards."""

    needs_teacher = False
    needs_reference = False
    needs_rewards = False
    scores_with_teacher = False
    source = "dataset"

    def __init__(self, beta: float = 1.0, temperature: float = 1.0, check_warmup: bool = True):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"objective.beta must lie in [0, 1], got {beta}")
        if temperature <= 0:
            raise ValueError(f"objective.temperature must be > 0, got {temperature}")
        self.beta, self.temperature, self.check_warmup = beta, temperature, check_warmup

    def pick_source(self, rng: random.Random) -> str:
        return "dataset"

    def check_teacher(self, ctx: Any, st: Any, task: Any) -> None:
        check_teacher_consistency(ctx, st, task, temperature=self.temperature, check_warmup=self.check_warmup)

    def __call__(self, b: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        mask_B_T = b.rollout.mask_B_T
        d_B_T = b.student.divergence(stored_teacher(b.rollout), beta=self.beta)
        loss = (d_B_T * mask_B_T).sum() / b.normalizer
        n = mask_B_T.sum().clamp(min=1)
        return loss, {"divergence": float((d_B_T.detach() * mask_B_T).sum() / n)}
