"""The training loop: one visible loop for every objective and modality.

    rollout (student / teacher / dataset) -> rewards -> teacher scoring ->
    objective -> optimizer step -> metrics -> eval -> checkpoint

Gradient accumulation divides every micro-batch's summed loss by the global
number of trained steps in the optimizer step, so a step's gradient does not
depend on how it is split.  All randomness of step `s` is derived from
(seed, stage, s), and checkpoints hold model, optimizer, scheduler, RNG states
and the data position, so a resumed run continues bit for bit.

    mmdistill train configs/text/quickstart.yaml
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmdistill.checkpoint import (
    atomic_dir,
    latest_checkpoint,
    load_replay,
    load_training_state,
    save_training_state,
    stage_replay,
    staged_replay_files,
)
from mmdistill.config import ModelConfig, RunConfig, StageConfig, check_kwargs
from mmdistill.distributed import (
    all_sum,
    any_rank,
    barrier,
    broadcast,
    broadcast_parameters,
    local_shards,
    sum_dicts,
    sum_gradients,
)
from mmdistill.errors import CheckpointError, ConfigError, Interrupted, MmdistillError
from mmdistill.interfaces import Adapter, Objective, ObjectiveBatch, Rollout, StageKind, Task
from mmdistill.metrics import MetricsLogger, plot_curves
from mmdistill.registry import OBJECTIVES, STAGE_KINDS, TASKS
from mmdistill.report import headline
from mmdistill.signals import STOP
from mmdistill.tracking import log_media


@dataclass
class RunContext:
    """What stages share: the config, the device, the adapter, the task, where outputs go."""

    cfg: RunConfig
    run_dir: Path
    accelerator: Any
    adapter: Adapter
    task: Task
    quiet: bool = False
    stage_results: dict[str, Any] = field(default_factory=dict)

    def model_config(self, ref: str) -> ModelConfig:
        """A `models` entry, or the final checkpoint of an earlier stage (keeping the dtype,
        LoRA and remote-code settings of the model that stage trained)."""
        if ref in self.cfg.models:
            return self.cfg.models[ref]
        final = self.run_dir / ref / "final"
        if not is_checkpoint(final):
            raise CheckpointError(
                f"stage '{ref}' has no final checkpoint at {final}; run that stage first (or resume the run)"
            )
        stage = next(s for s in self.cfg.stages if s.name == ref)
        origin = self.model_config(stage.student) if stage.student else ModelConfig(path=str(final))
        return dataclasses.replace(origin, path=str(final), tiny=None, prune=None, merge=None, revision=None)

    def load_model(self, ref: str) -> torch.nn.Module:
        """Load a model by reference; a `prune` model is built from its source's kept layers,
        a `merge` model is the weighted average of its sources' weights."""
        cfg = self.model_config(ref)
        if cfg.merge is not None:
            sources = [self.load_model(src) for src in cfg.merge.sources]
            merged = merge_weights(sources, cfg.merge.weights, ref)
            if cfg.lora is not None:
                merged = self.adapter.add_lora(merged, cfg.lora)
            return merged
        if cfg.prune is None:
            return self.adapter.load_model(cfg, ref)
        source = self.load_model(cfg.prune.source)
        return self.adapter.prune_layers(source, cfg.prune.keep_layers, lora=cfg.lora, name=ref)

    def load_teacher(self, st: StageConfig) -> Any:
        """The stage's frozen teacher, or {tag: teacher} when the stage routes prompts to teachers."""
        if st.teachers:
            return {tag: self.load_model(ref).eval().requires_grad_(False) for tag, ref in st.teachers.items()}
        return self.load_model(st.teacher).eval().requires_grad_(False)

    def build_task(self, spec: dict | None) -> Any:
        if spec is None:
            return self.task
        return build_task(spec)


def is_checkpoint(path: Path) -> bool:
    """A finished stage's model directory: `final/` only appears, whole, when `atomic_dir` renames it into place."""
    return path.is_dir() and any(path.iterdir())


@torch.no_grad()
def merge_weights(models: list[torch.nn.Module], weights: list[float] | None, name: str) -> torch.nn.Module:
    """The weighted average of models of one architecture (model soup / expert merging); returns the first, updated."""
    weights = weights or [1.0 / len(models)] * len(models)
    states = [m.state_dict() for m in models]
    for i, st in enumerate(states[1:], 1):
        if st.keys() != states[0].keys() or any(st[k].shape != states[0][k].shape for k in st):
            raise MmdistillError(
                f"models.{name}.merge: source {i} does not have the architecture of source 0 "
                "(different parameter names or shapes); merge only models fine-tuned from one base"
            )
    merged = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            merged[k] = sum(w * st[k].float() for w, st in zip(weights, states)).to(v.dtype)
        else:
            merged[k] = v
    models[0].load_state_dict(merged)
    return models[0]


def build_task(spec: dict) -> Any:
    args = dict(spec)
    cls = TASKS.get(args.pop("type"))
    return cls(**check_kwargs(cls, args, "task"))


def build_objective(spec: dict, where: str) -> Any:
    args = dict(spec)
    cls = OBJECTIVES.get(args.pop("type"))
    return cls(**check_kwargs(cls, args, f"{where}.objective"))


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def step_seed(seed: int, stage: str, step: int, what: str) -> int:
    digest = hashlib.sha256(f"{seed}/{stage}/{step}/{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_train(task: Task, rng: random.Random, n: int) -> list[Any]:
    return [task.sample_train(rng) for _ in range(n)]


def evaluate(
    adapter: Adapter,
    model: Any,
    task: Task,
    cfg: Any,
    seed: int = 0,
    show: int = 3,
    out_dir: Path | None = None,
    tag: str = "eval",
) -> dict[str, Any]:
    """Held-out results of `model` on `task`, as the adapter evaluates its model family."""
    with torch.no_grad():
        return adapter.evaluate(model, task, cfg, seed=seed, out_dir=out_dir, tag=tag, show=show)


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float = 0.0):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac
        return min_ratio + (1 - min_ratio) * decay

    return f


def run_train_stage(ctx: RunContext, st: StageConfig) -> dict[str, Any]:
    """Train the stage's student with its objective: rollout, teacher scoring, update; then save and evaluate.

    On N processes each rank rolls out its shards of the global batch (see mmdistill/distributed.py); losses
    are normalised by the global step count and gradients summed over ranks; rank 0 writes every file."""
    acc, adapter, cfg = ctx.accelerator, ctx.adapter, ctx.cfg
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    quiet = ctx.quiet or not main
    stage_dir = ctx.run_dir / st.name
    if main:
        stage_dir.mkdir(parents=True, exist_ok=True)
    task = ctx.build_task(st.task)
    objective: Objective = build_objective(st.objective, f"stages.{st.name}")
    needs = objective.needs
    tc, rc = st.train, st.rollout
    if tc.replay_rounds and needs.sampled_actions:
        raise MmdistillError(
            f"stages.{st.name}.train.replay_rounds: {st.objective['type']} scores sampled actions against the policy "
            "that took them, so older rollouts cannot be replayed; set replay_rounds: 0 or use a closed-form objective "
            "(reverse_kl, forward_kl, hard_ce)"
        )
    adapter.chunk_size = tc.chunk_size
    torch.manual_seed(step_seed(cfg.seed, st.name, 0, "init"))  # LoRA init etc. independent of earlier stages

    if is_checkpoint(stage_dir / "final"):  # trained, killed before its result was written
        model = ctx.load_model(st.name).eval()
        return _finish_stage(ctx, st, task, model, train_seconds=0.0)

    student_cfg = ctx.model_config(st.student)
    student = ctx.load_model(st.student)
    # low-precision students keep fp32 master weights; forward passes run under autocast
    compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[student_cfg.dtype]
    student.float()
    teacher = ctx.load_teacher(st) if needs.teacher else None
    anchor = ctx.load_model(st.anchor).eval().requires_grad_(False) if needs.anchor else None
    reference = copy.deepcopy(student).eval().requires_grad_(False) if needs.reference else None

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tc.schedule, tc.warmup_steps, tc.steps, tc.min_lr_ratio)
    )
    if world == 1:
        student, optimizer = acc.prepare(student, optimizer)
    else:  # no DDP wrapper: adapters call their models' own methods; gradients are summed explicitly
        student.to(acc.device)
    student.train()

    ckpt_root = stage_dir / "checkpoints"
    start = 0
    latest = latest_checkpoint(ckpt_root)
    replay: list[tuple[str, Rollout]] = []  # DAgger aggregation: (tag, rollout) of earlier steps
    saved_shards = None
    if latest is not None:
        state = load_training_state(latest, acc.unwrap_model(student), optimizer, scheduler)
        start = int(state["step"])
        saved_shards = state.get("rollout_shards")
        if tc.replay_rounds:
            replay = load_replay(latest, world, rank)
        if not quiet:
            print(f"[{st.name}] resumed from {latest} at step {start}")
    broadcast_parameters(params, world)
    logger = (
        MetricsLogger(stage_dir / "metrics.jsonl", resume_step=start if latest is not None else None) if main else None
    )

    group = rc.group_size
    prompts_per_step = tc.batch_size // group
    # the sampling shards of a global batch; a resumed run keeps the count it started with
    shards = tc.rollout_shards or saved_shards or world
    if shards % world or prompts_per_step % shards:
        raise ConfigError(
            f"stages.{st.name}.train: {prompts_per_step} prompts per step (batch_size {tc.batch_size} / group_size "
            f"{group}) cut into {shards} rollout shards over {world} processes: the shards must divide the prompts and "
            "the processes must divide the shards; set train.rollout_shards or train.batch_size accordingly"
        )
    my_shards = local_shards(shards, world, rank)
    prompts_per_shard = prompts_per_step // shards
    micro = tc.micro_batch_size or tc.batch_size
    n_minibatches = tc.batch_size // tc.minibatch_size if tc.minibatch_size else 1
    # policy-gradient objectives score at the sampling temperature (ratios against behaviour log-probs)
    score_temperature = rc.temperature if needs.sampled_actions else objective.temperature
    autocast = torch.autocast(adapter.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    skipped = bad_in_row = 0
    step = start - 1
    t0 = time.time()
    bar = tqdm(range(start, tc.steps), desc=st.name, initial=start, total=tc.steps, disable=quiet, dynamic_ncols=True)
    for step in bar:
        rng = random.Random(step_seed(cfg.seed, st.name, step, "data"))
        problems = [p for p in sample_train(task, rng, prompts_per_step) for _ in range(group)]
        request = dataclasses.replace(objective.request(step, tc.steps, rng), settings=rc)
        source = request.source

        # 1. rollout: this rank's shards, each from its own generator
        fresh: list[tuple[str, Rollout]] = []
        for s in my_shards:
            tag = "" if shards == 1 else f"/{s}"
            gen = torch.Generator(device=adapter.device).manual_seed(step_seed(cfg.seed, st.name, step, f"sample{tag}"))
            rows = slice(s * prompts_per_shard * group, (s + 1) * prompts_per_shard * group)
            with autocast:
                r = adapter.rollout(request, acc.unwrap_model(student), teacher, task, problems[rows], gen)
            if r.group_ids_B is None:  # adapters that append teacher rollouts set the groups themselves
                r.group_ids_B = torch.arange(
                    s * prompts_per_shard, (s + 1) * prompts_per_shard, device=adapter.device
                ).repeat_interleave(group)
            r.extras["seed"] = step_seed(cfg.seed, st.name, step, f"prepare{tag}")
            fresh.append((f"{step}{tag}", objective.prepare(r)))
        chunks = replay + fresh
        fresh_rows, fresh_steps, total_rows = all_sum(
            [
                sum(r.batch_size for _, r in fresh),
                sum(r.num_steps() for _, r in fresh),
                sum(r.batch_size for _, r in chunks),
            ],
            world,
            adapter.device,
        )

        # 2-4. score, objective, backward: minibatches (an optimizer step each) of micro-batches
        passes: list[dict[str, float]] = []
        loss_total = 0.0
        grad_norm = None
        nonfinite = False  # a NaN / inf loss or gradient: the step is skipped, counted; N in a row stop the run
        scores_teacher = teacher is not None and needs.teacher_scores
        for update in range(tc.updates_per_rollout):
            sums: dict[str, float] = {}
            for parts in minibatches(chunks, n_minibatches, cfg.seed, st.name, step, update, needs.whole_groups):
                normalizer = max(all_sum([sum(r.num_steps() for r in parts)], world, adapter.device)[0], 1.0)
                for r in parts:
                    teacher_all = None  # scored once over `teacher_batch_size` rows, sliced per micro-batch
                    if scores_teacher and tc.teacher_batch_size and tc.teacher_batch_size >= r.batch_size > micro:
                        with autocast, torch.no_grad():
                            teacher_all = adapter.step_dist(teacher, r.teacher_view(), temperature=score_temperature)
                    for i in range(0, r.batch_size, micro):
                        mb = r.select(slice(i, i + micro))
                        with autocast:
                            student_dist = adapter.step_dist(student, mb, temperature=score_temperature)
                            teacher_dist = ref_dist = anchor_dist = None
                            with torch.no_grad():
                                if teacher_all is not None:
                                    teacher_dist = teacher_all.select(slice(i, i + micro))
                                elif scores_teacher:
                                    teacher_dist = adapter.step_dist(
                                        teacher, mb.teacher_view(), temperature=score_temperature
                                    )
                                elif needs.self_teacher:  # OPSD: the student itself, given privileged context
                                    teacher_dist = adapter.step_dist(
                                        acc.unwrap_model(student), mb.teacher_view(), temperature=score_temperature
                                    )
                                if reference is not None:
                                    ref_dist = adapter.step_dist(reference, mb, temperature=score_temperature)
                                if anchor is not None:
                                    anchor_dist = adapter.step_dist(anchor, mb, temperature=score_temperature)
                            loss, metrics = objective(
                                ObjectiveBatch(mb, student_dist, teacher_dist, ref_dist, float(normalizer), anchor_dist)
                            )
                        if any_rank(not torch.isfinite(loss.detach()), world, adapter.device):
                            nonfinite = True
                            break
                        acc.backward(loss)
                        if update == 0:
                            loss_total += float(loss.detach()) / n_minibatches
                        w = mb.batch_size / total_rows
                        metrics = {**metrics, **adapter.dist_metrics(student_dist, mb)}  # e.g. the student's entropy
                        for k, v in metrics.items():
                            sums[k] = sums.get(k, 0.0) + w * float(v)
                    if nonfinite:
                        break
                if not nonfinite:
                    sum_gradients(params, world)
                    if tc.max_grad_norm:
                        grad_norm = acc.clip_grad_norm_(params, tc.max_grad_norm)
                        nonfinite = not math.isfinite(float(grad_norm))
                if nonfinite:
                    optimizer.zero_grad(set_to_none=True)
                    grad_norm = None
                    break
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            passes.append(sum_dicts(sums, world))
            if nonfinite:
                break
        scheduler.step()
        if tc.replay_rounds:
            replay = chunks[-tc.replay_rounds * len(fresh) :]
        if nonfinite:
            skipped += 1
            bad_in_row += 1
            if bad_in_row >= tc.max_nonfinite_steps:
                raise MmdistillError(
                    f"stages.{st.name}: the loss or gradient was NaN or inf on {bad_in_row} optimizer steps in a row "
                    f"(the last at step {step + 1}; {skipped} skipped in all); lower train.lr (now {tc.lr}) or check "
                    "the data and the teacher; resume with `mmdistill train --resume` once fixed"
                )
        else:
            bad_in_row = 0

        # 5. metrics, eval, checkpoint
        loss_total = all_sum([loss_total], world, adapter.device)[0]
        record: dict[str, Any] = {"step": step + 1, "loss": loss_total, **passes[0], "lr": scheduler.get_last_lr()[0]}
        if len(passes) > 1:
            record.update({f"{k}_last": v for k, v in passes[-1].items()})
            record["passes"] = passes
        if skipped:
            record["nonfinite_skipped"] = skipped
        rewards = [r.rewards_B for _, r in fresh if r.rewards_B is not None]
        if rewards and source != "dataset":
            if world == 1 and len(rewards) == 1:
                record[f"{source}_reward"] = float(rewards[0].mean())
            else:
                total_reward, n_reward = all_sum(
                    [float(sum(x.float().sum() for x in rewards)), float(sum(x.numel() for x in rewards))],
                    world,
                    adapter.device,
                )
                record[f"{source}_reward"] = total_reward / max(n_reward, 1.0)
        record["tokens_per_seq"] = max(fresh_steps, 1.0) / fresh_rows
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < tc.steps:
            ev = None
            if main:
                student.eval()
                ev = evaluate(
                    adapter,
                    acc.unwrap_model(student),
                    task,
                    st.eval,
                    seed=cfg.seed,
                    show=3 if cfg.tracker is not None else 0,  # text samples for the tracker
                    out_dir=stage_dir / "samples",
                    tag=f"step_{step + 1:06d}",
                )
                student.train()
                if cfg.tracker is not None:  # sample grid, robot video, text samples
                    log_media(acc, ev, st.name, step + 1)
            ev = broadcast(ev, world)
            record.update({f"eval_{k}": v for k, v in headline(ev).items()})
            reached = tc.stop_at and all(headline(ev).get(m, -math.inf) >= target for m, target in tc.stop_at.items())
            if reached:
                record["stopped_early"] = 1.0
        record["time"] = round(time.time() - t0, 3)
        evaluated = any(k.startswith("eval_") for k in record)
        if main and ((step + 1) % tc.log_every == 0 or step + 1 == tc.steps or evaluated):
            logger.log(record)
            if cfg.tracker is not None:  # the same scalars as metrics.jsonl, one tag per stage and key
                acc.log({f"{st.name}/{k}": v for k, v in record.items() if k != "step" and _scalar(v)}, step=step + 1)
            shown = ("loss", "student_reward") + tuple(k for k in record if k.startswith("eval_"))
            bar.set_postfix({k: f"{record[k]:.3g}" for k in shown if k in record})
        stopping = any_rank(STOP.requested, world, adapter.device)
        periodic = tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 < tc.steps
        if periodic or (stopping and step + 1 < tc.steps):
            staged = stage_replay(ckpt_root, step + 1, replay, rank) if tc.replay_rounds else []
            barrier(world)  # every rank's replay file is staged
            if main:
                save_training_state(
                    ckpt_root,
                    step + 1,
                    acc.unwrap_model(student),
                    optimizer,
                    scheduler,
                    {"samples_seen": (step + 1) * tc.batch_size, "rollout_shards": shards},
                    staged=staged_replay_files(ckpt_root, step + 1, world) if tc.replay_rounds else [],
                )
            del staged
            barrier(world)
        if stopping and step + 1 < tc.steps:
            raise Interrupted(
                f"stages.{st.name}: stopped by {STOP.name()} after step {step + 1} of {tc.steps}; the checkpoint "
                f"is saved, continue with `mmdistill train --resume {ctx.run_dir}`",
                STOP.signum,
            )
        if "stopped_early" in record:
            if not quiet:
                print(f"[{st.name}] stop_at {tc.stop_at} reached at step {step + 1}")
            break
    bar.close()
    train_seconds = time.time() - t0
    steps_done = step + 1 if tc.steps > start else start

    final_model = acc.unwrap_model(student).eval()
    if compute_dtype != torch.float32:
        final_model = final_model.to(compute_dtype)
    if main:
        with atomic_dir(stage_dir / "final") as tmp:
            adapter.save(final_model, tmp)
    barrier(world)
    return _finish_stage(ctx, st, task, final_model, train_seconds, steps_done)


def minibatches(
    chunks: list[tuple[str, Rollout]],
    n: int,
    seed: int,
    stage: str,
    step: int,
    update: int,
    whole_groups: bool,
) -> list[list[Rollout]]:
    """The optimizer steps of one pass: n = 1 is every chunk whole (no shuffle); else each chunk's groups
    are shuffled (its own seed, so the split does not depend on which rank holds the chunk) and cut into
    n parts, and minibatch j is the j-th part of every chunk."""
    if n == 1:
        return [[r for _, r in chunks]]
    out: list[list[Rollout]] = [[] for _ in range(n)]
    for tag, r in chunks:
        ids_B = r.group_ids_B if whole_groups and r.group_ids_B is not None else torch.arange(r.batch_size)
        uniq, inverse_B = torch.unique(ids_B.cpu(), return_inverse=True)
        gen = torch.Generator().manual_seed(step_seed(seed, stage, step, f"shuffle/{update}/{tag}"))
        order = torch.randperm(len(uniq), generator=gen)
        for j, part in enumerate(torch.tensor_split(order, n)):
            rows = torch.nonzero(torch.isin(inverse_B, part)).flatten()
            if len(rows):
                out[j].append(r.select(rows.to(r.actions.device)))
    return [parts for parts in out if parts]


def _finish_stage(
    ctx: RunContext, st: StageConfig, task: Any, model: Any, train_seconds: float, steps_done: int | None = None
) -> dict[str, Any]:
    """The stage's final evaluation and result (rank 0 evaluates and writes; every rank gets the result)."""
    acc = ctx.accelerator
    world = acc.num_processes if acc is not None else 1
    result = None
    if acc is None or acc.is_main_process:
        stage_dir = ctx.run_dir / st.name
        ev = evaluate(ctx.adapter, model, task, st.eval, seed=ctx.cfg.seed, out_dir=stage_dir / "samples", tag="final")
        steps = st.train.steps if steps_done is None else steps_done
        if acc is not None and ctx.cfg.tracker is not None:
            log_media(acc, ev, st.name, steps)
        try:
            plot_curves(
                stage_dir / "metrics.jsonl", stage_dir / "curves.png", title=f"{st.name} ({st.objective['type']})"
            )
        except Exception as e:  # noqa: BLE001 - a plot never fails a finished stage
            print(f"[{st.name}] warning: could not plot curves ({type(e).__name__}: {e})")
        result = {
            "kind": "train",
            "objective": st.objective["type"],
            "steps": steps,
            "train_seconds": round(train_seconds, 1),
            "eval": ev,
            "eval_setup": _eval_setup(st),
            "weights_sha256": ctx.adapter.stage_fingerprint(model),
        }
    return broadcast(result, world)


def _reuse_media(ev: dict[str, Any], out_dir: Path, key: str) -> dict[str, Any]:
    """A reused evaluation's sample grid or video copied to `out_dir/KEY.ext`, as a fresh one would be."""
    import shutil

    ev = dict(ev)
    for name in ("grid", "video"):
        if isinstance(ev.get(name), str) and Path(ev[name]).is_file():
            dst = out_dir / f"{key}{Path(ev[name]).suffix}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ev[name], dst)
            ev[name] = str(dst)
    return ev


def _eval_setup(st: StageConfig) -> dict[str, Any]:
    """What an evaluation's result depends on besides the model (equal setups give equal results)."""
    return {"eval": dataclasses.asdict(st.eval), "task": st.task}


def run_eval_stage(ctx: RunContext, st: StageConfig) -> dict[str, Any]:
    """Evaluate each model of `evaluate:` on held-out problems (reusing a train stage's identical final evaluation);
    rank 0 evaluates, every rank gets the results."""
    acc = ctx.accelerator
    world = acc.num_processes if acc is not None else 1
    if acc is not None and not acc.is_main_process:
        return broadcast(None, world)
    task = ctx.build_task(st.task)
    out: dict[str, Any] = {"kind": "eval", "results": {}}
    for key, ref in st.evaluate.items():
        done = ctx.stage_results.get(ref, {})
        if done.get("kind") == "train" and done.get("eval_setup") == _eval_setup(st):
            ev = _reuse_media(
                done["eval"], ctx.run_dir / st.name, key
            )  # that stage's final evaluation, same settings and task
        else:
            model = ctx.load_model(ref).eval()
            ev = evaluate(ctx.adapter, model, task, st.eval, seed=ctx.cfg.seed, out_dir=ctx.run_dir / st.name, tag=key)
        out["results"][key] = {"model": ref, **ev}
        if not ctx.quiet:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in headline(ev).items())
            print(f"[{st.name}] {key} ({ref}): {shown} on {ev['n']} held-out problems")
    return broadcast(out, world)


STAGE_KINDS.register("train")(StageKind(run_train_stage, uses="train", every_rank=True))
STAGE_KINDS.register("eval")(StageKind(run_eval_stage, uses="evaluate", every_rank=True))
