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

from mmdistill.checkpoint import atomic_dir, latest_checkpoint, load_training_state, save_training_state
from mmdistill.config import ModelConfig, RunConfig, StageConfig, check_kwargs
from mmdistill.errors import CheckpointError, MmdistillError
from mmdistill.interfaces import Adapter, Objective, ObjectiveBatch, StageKind, Task
from mmdistill.metrics import MetricsLogger, plot_curves
from mmdistill.registry import OBJECTIVES, STAGE_KINDS, TASKS
from mmdistill.report import headline


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
    """Train the stage's student with its objective: rollout, teacher scoring, update; then save and evaluate."""
    acc, adapter, cfg = ctx.accelerator, ctx.adapter, ctx.cfg
    if acc.num_processes > 1:  # not yet: prompts are not sharded and token counts not all-reduced
        raise MmdistillError(
            f"training on {acc.num_processes} processes is not supported yet; run one process (one GPU or the CPU) per run"
        )
    stage_dir = ctx.run_dir / st.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    task = ctx.build_task(st.task)
    objective: Objective = build_objective(st.objective, f"stages.{st.name}")
    needs = objective.needs
    tc, rc = st.train, st.rollout
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
    student, optimizer = acc.prepare(student, optimizer)
    student.train()

    ckpt_root = stage_dir / "checkpoints"
    start = 0
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        state = load_training_state(latest, acc.unwrap_model(student), optimizer, scheduler)
        start = int(state["step"])
        if not ctx.quiet:
            print(f"[{st.name}] resumed from {latest} at step {start}")
    logger = MetricsLogger(stage_dir / "metrics.jsonl", resume_step=start if latest is not None else None)

    group = rc.group_size
    prompts_per_step = tc.batch_size // group
    micro = tc.micro_batch_size or tc.batch_size
    # policy-gradient objectives score at the sampling temperature (ratios against behaviour log-probs)
    score_temperature = rc.temperature if needs.sampled_actions else objective.temperature
    autocast = torch.autocast(adapter.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    skipped = bad_in_row = 0
    t0 = time.time()
    bar = tqdm(
        range(start, tc.steps), desc=st.name, initial=start, total=tc.steps, disable=ctx.quiet, dynamic_ncols=True
    )
    for step in bar:
        rng = random.Random(step_seed(cfg.seed, st.name, step, "data"))
        gen = torch.Generator(device=adapter.device).manual_seed(step_seed(cfg.seed, st.name, step, "sample"))
        problems = [p for p in sample_train(task, rng, prompts_per_step) for _ in range(group)]
        request = dataclasses.replace(objective.request(step, tc.steps, rng), settings=rc)
        source = request.source

        # 1. rollout
        with autocast:
            rollout = adapter.rollout(request, acc.unwrap_model(student), teacher, task, problems, gen)
        if rollout.group_ids_B is None:  # adapters that append teacher rollouts set the groups themselves
            rollout.group_ids_B = torch.arange(prompts_per_step, device=adapter.device).repeat_interleave(group)
        rollout.extras["seed"] = step_seed(cfg.seed, st.name, step, "prepare")
        rollout = objective.prepare(rollout)
        normalizer = max(rollout.num_steps(), 1)

        # 2-4. score, objective, backward (micro-batches, normalised by the global step count)
        sums: dict[str, float] = {}
        loss_total = 0.0
        teacher_all = None  # the teacher scored once over `teacher_batch_size` rows, sliced per micro-batch
        scores_teacher = teacher is not None and needs.teacher_scores
        if scores_teacher and tc.teacher_batch_size and tc.teacher_batch_size >= rollout.batch_size > micro:
            with autocast, torch.no_grad():
                teacher_all = adapter.step_dist(teacher, rollout.teacher_view(), temperature=score_temperature)
        # a NaN / inf loss or gradient: the step is skipped, counted, and the run stops after N in a row
        nonfinite = False
        for update in range(tc.updates_per_rollout):  # metrics are those of the first, on-policy pass
            for i in range(0, rollout.batch_size, micro):
                mb = rollout.select(slice(i, i + micro))
                with autocast:
                    student_dist = adapter.step_dist(student, mb, temperature=score_temperature)
                    teacher_dist = ref_dist = anchor_dist = None
                    with torch.no_grad():
                        if teacher_all is not None:
                            teacher_dist = teacher_all.select(slice(i, i + micro))
                        elif scores_teacher:
                            teacher_dist = adapter.step_dist(teacher, mb.teacher_view(), temperature=score_temperature)
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
                if not torch.isfinite(loss.detach()):
                    nonfinite = True
                    break
                acc.backward(loss)
                if update == 0:
                    loss_total += float(loss.detach())
                    w = mb.batch_size / rollout.batch_size
                    metrics = {**metrics, **adapter.dist_metrics(student_dist, mb)}  # e.g. the student's entropy
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + w * float(v)
            grad_norm = None
            if not nonfinite and tc.max_grad_norm:
                grad_norm = acc.clip_grad_norm_(params, tc.max_grad_norm)
                nonfinite = not math.isfinite(float(grad_norm))
            if nonfinite:
                optimizer.zero_grad(set_to_none=True)
                grad_norm = None
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if nonfinite:
            skipped += 1
            bad_in_row += 1
            if bad_in_row >= tc.max_nonfinite_steps:
                raise MmdistillError(
                    f"stages.{st.name}: the loss or gradient was NaN or inf on {bad_in_row} optimizer steps in a row "
                    f"(the last at step {step + 1}; {skipped} skipped in all); lower train.lr (now {tc.lr}) or check the "
                    "data and the teacher; resume with `mmdistill train --resume` once fixed"
                )
        else:
            bad_in_row = 0

        # 5. metrics, eval, checkpoint
        record: dict[str, Any] = {"step": step + 1, "loss": loss_total, **sums, "lr": scheduler.get_last_lr()[0]}
        if skipped:
            record["nonfinite_skipped"] = skipped
        if rollout.rewards_B is not None and source != "dataset":
            record[f"{source}_reward"] = float(rollout.rewards_B.mean())
        record["tokens_per_seq"] = normalizer / rollout.batch_size
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < tc.steps:
            student.eval()
            ev = evaluate(
                adapter,
                acc.unwrap_model(student),
                task,
                st.eval,
                seed=cfg.seed,
                show=0,
                out_dir=stage_dir / "samples",
                tag=f"step_{step + 1:06d}",
            )
            student.train()
            record.update({f"eval_{k}": v for k, v in headline(ev).items()})
            reached = tc.stop_at and all(headline(ev).get(m, -math.inf) >= target for m, target in tc.stop_at.items())
            if reached:
                record["stopped_early"] = 1.0
        record["time"] = round(time.time() - t0, 3)
        evaluated = any(k.startswith("eval_") for k in record)
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps or evaluated:
            logger.log(record)
            if cfg.tracker is not None:  # the same scalars as metrics.jsonl, one tag per stage and key
                acc.log({f"{st.name}/{k}": v for k, v in record.items() if k != "step" and _scalar(v)}, step=step + 1)
            shown = ("loss", "student_reward") + tuple(k for k in record if k.startswith("eval_"))
            bar.set_postfix({k: f"{record[k]:.3g}" for k in shown if k in record})
        if tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 < tc.steps:
            save_training_state(
                ckpt_root,
                step + 1,
                acc.unwrap_model(student),
                optimizer,
                scheduler,
                {"samples_seen": (step + 1) * tc.batch_size},
            )
        if "stopped_early" in record:
            if not ctx.quiet:
                print(f"[{st.name}] stop_at {tc.stop_at} reached at step {step + 1}")
            break
    bar.close()
    train_seconds = time.time() - t0
    steps_done = step + 1 if tc.steps > start else start

    final_model = acc.unwrap_model(student).eval()
    if compute_dtype != torch.float32:
        final_model = final_model.to(compute_dtype)
    with atomic_dir(stage_dir / "final") as tmp:
        adapter.save(final_model, tmp)
    return _finish_stage(ctx, st, task, final_model, train_seconds, steps_done)


def _finish_stage(
    ctx: RunContext, st: StageConfig, task: Any, model: Any, train_seconds: float, steps_done: int | None = None
) -> dict[str, Any]:
    stage_dir = ctx.run_dir / st.name
    ev = evaluate(ctx.adapter, model, task, st.eval, seed=ctx.cfg.seed, out_dir=stage_dir / "samples", tag="final")
    try:
        plot_curves(stage_dir / "metrics.jsonl", stage_dir / "curves.png", title=f"{st.name} ({st.objective['type']})")
    except Exception as e:  # noqa: BLE001 - a plot never fails a finished stage
        print(f"[{st.name}] warning: could not plot curves ({type(e).__name__}: {e})")
    steps = st.train.steps if steps_done is None else steps_done
    return {
        "kind": "train",
        "objective": st.objective["type"],
        "steps": steps,
        "train_seconds": round(train_seconds, 1),
        "eval": ev,
        "eval_setup": _eval_setup(st),
        "weights_sha256": ctx.adapter.stage_fingerprint(model),
    }


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
    """Evaluate each model of `evaluate:` on held-out problems (reusing a train stage's identical final evaluation)."""
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
    return out


STAGE_KINDS.register("train")(StageKind(run_train_stage, uses="train"))
STAGE_KINDS.register("eval")(StageKind(run_eval_stage, uses="evaluate"))
