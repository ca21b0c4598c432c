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
from mmdistill.evaluate import evaluate
from mmdistill.metrics import MetricsLogger, plot_curves
from mmdistill.objectives.registered import ObjectiveBatch
from mmdistill.registry import ADAPTERS, OBJECTIVES, TASKS


@dataclass
class RunContext:
    """What stages share: the config, the device, the adapter, the task, where outputs go."""

    cfg: RunConfig
    run_dir: Path
    accelerator: Any
    adapter: Any
    task: Any
    quiet: bool = False
    stage_results: dict[str, Any] = field(default_factory=dict)

    def model_config(self, ref: str) -> ModelConfig:
        """A `models` entry, or the final checkpoint of an earlier stage (keeping the dtype,
        LoRA and remote-code settings of the model that stage trained)."""
        if ref in self.cfg.models:
            return self.cfg.models[ref]
        final = self.run_dir / ref / "final"
        if not (final / "config.json").exists():
            raise CheckpointError(f"stage '{ref}' has no final checkpoint at {final}; run that stage first (or resume the run)")
        stage = next(s for s in self.cfg.stages if s.name == ref)
        origin = self.model_config(stage.student) if stage.student else ModelConfig(path=str(final))
        return dataclasses.replace(origin, path=str(final), tiny=None, prune=None, revision=None)

    def load_model(self, ref: str) -> torch.nn.Module:
        """Load a model by reference; a `prune` model is built from its source's kept layers."""
        cfg = self.model_config(ref)
        if cfg.prune is None:
            return self.adapter.load_model(cfg, ref)
        source = self.load_model(cfg.prune.source)
        return self.adapter.prune_layers(source, cfg.prune.keep_layers, lora=cfg.lora, name=ref)

    def build_task(self, spec: dict | None) -> Any:
        if spec is None:
            return self.task
        return build_task(spec)


def build_task(spec: dict) -> Any:
    args = dict(spec)
    cls = TASKS.get(args.pop("type"))
    return cls(**check_kwargs(cls, args, "task"))


def build_objective(spec: dict, where: str) -> Any:
    args = dict(spec)
    cls = OBJECTIVES.get(args.pop("type"))
    return cls(**check_kwargs(cls, args, f"{where}.objective"))


def step_seed(seed: int, stage: str, step: int, what: str) -> int:
    digest = hashlib.sha256(f"{seed}/{stage}/{step}/{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_train(task: Any, rng: random.Random, n: int) -> list[Any]:
    if hasattr(task, "sample_train"):
        return [task.sample_train(rng) for _ in range(n)]
    pool = task.problems("train")
    return [rng.choice(pool) for _ in range(n)]


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac

    return f


def run_train_stage(ctx: RunContext, st: StageConfig) -> dict[str, Any]:
    acc, adapter, cfg = ctx.accelerator, ctx.adapter, ctx.cfg
    if acc.num_processes > 1:  # not yet: prompts are not sharded and token counts not all-reduced
        raise MmdistillError(
            f"training on {acc.num_processes} processes is not supported yet; run one process (one GPU or the CPU) per run"
        )
    stage_dir = ctx.run_dir / st.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    task = ctx.build_task(st.task)
    objective = build_objective(st.objective, f"stages.{st.name}")
    tc, rc = st.train, st.rollout
    adapter.chunk_size = tc.chunk_size
    torch.manual_seed(step_seed(cfg.seed, st.name, 0, "init"))  # LoRA init etc. independent of earlier stages

    if (stage_dir / "final" / "config.json").exists():  # trained, killed before its result was written
        model = ctx.load_model(st.name).eval()
        return _finish_stage(ctx, st, task, model, train_seconds=0.0)

    student_cfg = ctx.model_config(st.student)
    student = ctx.load_model(st.student)
    # low-precision students keep fp32 master weights; forward passes run under autocast
    compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[student_cfg.dtype]
    student.float()
    teacher = None
    if objective.needs_teacher:
        teacher = ctx.load_model(st.teacher).eval().requires_grad_(False)
    reference = copy.deepcopy(student).eval().requires_grad_(False) if objective.needs_reference else None

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.schedule, tc.warmup_steps, tc.steps))
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
    score_temperature = rc.temperature if getattr(objective, "policy_gradient", False) else objective.temperature
    autocast = torch.autocast(adapter.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    t0 = time.time()
    bar = tqdm(range(start, tc.steps), desc=st.name, initial=start, total=tc.steps, disable=ctx.quiet, dynamic_ncols=True)
    for step in bar:
        rng = random.Random(step_seed(cfg.seed, st.name, step, "data"))
        gen = torch.Generator(device=adapter.device).manual_seed(step_seed(cfg.seed, st.name, step, "sample"))
        problems = [p for p in sample_train(task, rng, prompts_per_step) for _ in range(group)]
        source = objective.pick_source(rng)

        # 1. rollout
        with autocast:
            rollout = _rollout(adapter, source, acc.unwrap_model(student), teacher, task, problems, rc, gen)
        rollout.group_ids_B = torch.arange(prompts_per_step, device=adapter.device).repeat_interleave(group)
        if hasattr(objective, "prepare"):
            objective.prepare(rollout)
        normalizer = max(rollout.num_steps(), 1)

        # 2-4. score, objective, backward (micro-batches, normalised by the global step count)
        sums: dict[str, float] = {}
        loss_total = 0.0
        for i in range(0, rollout.batch_size, micro):
            mb = rollout.select(slice(i, i + micro))
            with autocast:
                student_dist = adapter.step_dist(student, mb, temperature=score_temperature)
                teacher_dist = ref_dist = None
                with torch.no_grad():
                    if teacher is not None and objective.scores_with_teacher:
                        teacher_dist = adapter.step_dist(teacher, mb, temperature=score_temperature)
                    if reference is not None:
                        ref_dist = adapter.step_dist(reference, mb, temperature=score_temperature)
                loss, metrics = objective(ObjectiveBatch(mb, student_dist, teacher_dist, ref_dist, float(normalizer)))
            acc.backward(loss)
            loss_total += float(loss.detach())
            w = mb.batch_size / rollout.batch_size
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + w * float(v)
        grad_norm = acc.clip_grad_norm_(params, tc.max_grad_norm) if tc.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 5. metrics, eval, checkpoint
        record: dict[str, Any] = {"step": step + 1, "loss": loss_total, **sums, "lr": scheduler.get_last_lr()[0]}
        if rollout.rewards_B is not None and source != "dataset":
            record[f"{source}_reward"] = float(rollout.rewards_B.mean())
        record["tokens_per_seq"] = normalizer / rollout.batch_size
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < tc.steps:
            ev = evaluate(adapter, acc.unwrap_model(student), task, st.eval, seed=cfg.seed, show=0)
            record["eval_accuracy"] = ev["accuracy"]
        record["time"] = round(time.time() - t0, 3)
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps or "eval_accuracy" in record:
            logger.log(record)
            bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "student_reward", "eval_accuracy") if k in record})
        if tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 < tc.steps:
            save_training_state(ckpt_root, step + 1, acc.unwrap_model(student), optimizer, scheduler, {"samples_seen": (step + 1) * tc.batch_size})
    bar.close()
    train_seconds = time.time() - t0

    final_model = acc.unwrap_model(student)
    if compute_dtype != torch.float32:
        final_model = final_model.to(compute_dtype)
    with atomic_dir(stage_dir / "final") as tmp:
        adapter.save(final_model, tmp)
    return _finish_stage(ctx, st, task, final_model, train_seconds)


def _rollout(adapter: Any, source: str, student: Any, teacher: Any, task: Any, problems: list, rc: Any, gen: Any) -> Any:
    """Student or teacher samples (with verifier rewards), or the dataset's own completions."""
    questions = [p.question for p in problems]
    if source == "dataset":
        return adapter.dataset_rollout(questions, [p.solution for p in problems])
    rollout = adapter.sample(student if source == "student" else teacher, questions, rc.max_new_tokens, rc.temperature, gen)
    texts = adapter.decode(rollout)
    rollout.rewards_B = torch.tensor([task.reward(p, t) for p, t in zip(problems, texts)], device=adapter.device)
    return rollout


def _finish_stage(ctx: RunContext, st: StageConfig, task: Any, model: Any, train_seconds: float) -> dict[str, Any]:
    ev = evaluate(ctx.adapter, model, task, st.eval, seed=ctx.cfg.seed)
    stage_dir = ctx.run_dir / st.name
    try:
        plot_curves(stage_dir / "metrics.jsonl", stage_dir / "curves.png", title=f"{st.name} ({st.objective['type']})")
    except Exception as e:  # noqa: BLE001 - a plot never fails a finished stage
        print(f"[{st.name}] warning: could not plot curves ({type(e).__name__}: {e})")
    return {"kind": "train", "objective": st.objective["type"], "steps": st.train.steps, "train_seconds": round(train_seconds, 1), "eval": ev}


def run_eval_stage(ctx: RunContext, st: StageConfig) -> dict[str, Any]:
    task = ctx.build_task(st.task)
    out: dict[str, Any] = {"kind": "eval", "results": {}}
    for key, ref in st.evaluate.items():
        model = ctx.load_model(ref).eval()
        ev = evaluate(ctx.adapter, model, task, st.eval, seed=ctx.cfg.seed)
        out["results"][key] = {"model": ref, **ev}
        if not ctx.quiet:
            print(f"[{st.name}] {key} ({ref}): accuracy {ev['accuracy']:.3f} on {ev['n']} held-out problems")
    return out
