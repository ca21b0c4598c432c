"""Run a config's stages in order; each stage writes a standard checkpoint and a result,
so a pipeline stopped anywhere resumes at the stage (and step) where it stopped.

    mmdistill train configs/text/quickstart.yaml
    mmdistill train --resume runs/quickstart
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from mmdistill.checkpoint import atomic_dir, atomic_write_text
from mmdistill.config import RunConfig, save_resolved
from mmdistill.distributed import barrier, broadcast
from mmdistill.errors import ConfigError, Interrupted
from mmdistill.registry import ADAPTERS, STAGE_KINDS
from mmdistill.report import build_report, plot_report, print_table
from mmdistill.rundir import claim, expand, mark_running, read_marker
from mmdistill.signals import STOP
from mmdistill.train import RunContext, build_task


def make_accelerator(device: str, tracker: str | None = None, run_dir: Path | None = None) -> Any:
    """The run's Accelerator (and its process group when launched on several processes); with `tracker`,
    accelerate's tracker of that name will write to RUN_DIR/tracking once `start_tracking` is called."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no GPU is visible; set device=auto or device=cpu")
    if tracker is None:
        acc = Accelerator(cpu=device == "cpu")
    else:
        acc = Accelerator(cpu=device == "cpu", log_with=tracker, project_dir=str(Path(run_dir) / "tracking"))
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ConfigError(
            f"accelerate is configured for {acc.distributed_type.value}, which mmdistill does not drive yet; launch "
            "data-parallel (DDP): `accelerate launch --multi_gpu --num_processes N -m mmdistill train CONFIG` "
            "(docs/scaling.md)"
        )
    return acc


def start_tracking(acc: Any, tracker: str | None, run_dir: Path) -> None:
    """Open the run's trackers (rank 0 only: accelerate's trackers log from the main process)."""
    if tracker is not None:
        acc.init_trackers(project_name=Path(run_dir).name or "mmdistill")


def quiet_library_logs() -> None:
    """No progress bars or info logs from transformers / diffusers: our own bar is the one that matters."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from diffusers.utils import logging as df_logging

        df_logging.disable_progress_bar()
        df_logging.set_verbosity_error()
    except ImportError:  # the flow extra is optional
        pass


def run_pipeline(
    cfg: RunConfig, run_dir: Path | None = None, quiet: bool = False, config_path: str | None = None
) -> dict[str, Any]:
    """Run (or resume) every stage of `cfg` in `run_dir`. Tasks and checkpoints are checked before the
    directory is claimed, so a refused start leaves nothing behind."""
    quiet_library_logs()
    run_dir = expand(run_dir or cfg.run_dir)
    names = [st.name for st in cfg.stages]
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task)
    for st in cfg.stages:  # pre-flight: every stage's own task builds (its files, keys and splits)
        if st.task is not None:
            build_task(st.task)
    adapter_cls = ADAPTERS.get(cfg.adapter)
    for name, m in cfg.models.items():  # pre-flight: checkpoints are of the adapter's kind
        if m.path is not None and m.kind == "checkpoint":
            adapter_cls.check_checkpoint(m.path, name)
    acc = make_accelerator(cfg.device, cfg.tracker, run_dir)  # on N processes: every rank meets here
    world, main = acc.num_processes, acc.is_main_process
    quiet = quiet or not main
    if main:
        if read_marker(run_dir) is None and not (run_dir / "config.yaml").is_file():
            claim(run_dir, names, config_path)  # a fresh run
        save_resolved(cfg, run_dir / "config.yaml")
    barrier(world)
    start_tracking(acc, cfg.tracker, run_dir)
    summary = task.summary()
    if summary and not quiet:
        print(f"[task] {summary}")
    if main:
        tokenizer = _run_tokenizer(cfg, adapter_cls, task, run_dir)
    barrier(world)  # rank 0 built and saved it; the others load it
    if not main:
        tokenizer = _run_tokenizer(cfg, adapter_cls, task, run_dir)
    for name, m in cfg.models.items():  # pre-flight: every checkpoint must share the run's tokenizer
        if m.path is not None and m.kind == "checkpoint" and tokenizer is not None:
            adapter_cls.check_tokenizer_of(
                m.path, tokenizer, name, compare_chat_template=cfg.tokenizer.chat_template is None
            )

    chunk = cfg.stages[0].train.chunk_size
    adapter = adapter_cls(tokenizer, device=acc.device, chunk_size=chunk)
    adapter.bind(task)  # adapters whose models depend on the task (the environment's sizes)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, accelerator=acc, adapter=adapter, task=task, quiet=quiet)

    if main:
        mark_running(run_dir, names)  # from here on the directory holds a run to resume
    t0 = time.time()
    with STOP.installed():
        for st in cfg.stages:
            result_path = run_dir / st.name / "result.json"
            if result_path.exists():
                ctx.stage_results[st.name] = json.loads(result_path.read_text())
                if not quiet:
                    print(f"[{st.name}] already done, skipped")
                continue
            if not quiet:
                print(f"[{st.name}] {st.kind} stage starting")
            kind = STAGE_KINDS.get(st.kind)
            if kind.every_rank or world == 1:
                result = kind.run(ctx, st)
            else:  # a kind that does not shard its work: rank 0 runs it, the others wait for its result
                result = broadcast(kind.run(ctx, st) if main else None, world)
            if main:
                atomic_write_text(result_path, json.dumps(result, indent=1))
            ctx.stage_results[st.name] = result
            barrier(world)
            if STOP.requested and st is not cfg.stages[-1]:
                raise Interrupted(
                    f"stopped by {STOP.name()} after stage '{st.name}'; continue with `mmdistill train --resume {run_dir}`",
                    STOP.signum,
                )
    report = build_report(ctx.stage_results, seconds=time.time() - t0)
    if cfg.tracker is not None:
        acc.end_training()
    if main:
        atomic_write_text(run_dir / "report.json", json.dumps(report, indent=1))
        plot_report(ctx.stage_results, run_dir, run_dir / "report.png")
    if not quiet:
        print_table(report)
        print(f"report: {run_dir / 'report.json'}")
    return report


def _run_tokenizer(cfg: RunConfig, adapter_cls: Any, task: Any, run_dir: Path) -> Any:
    """The run's tokenizer: the one saved at the first start (a resumed run), else the adapter builds it
    and it is saved in RUN_DIR/tokenizer; None for adapters without one (state-based robot policies)."""
    if not adapter_cls.spec.needs_tokenizer:
        return None
    tok_dir = run_dir / "tokenizer"
    if tok_dir.is_dir() and any(tok_dir.iterdir()):
        return adapter_cls.load_tokenizer(str(tok_dir))
    tokenizer = adapter_cls.build_tokenizer(cfg.tokenizer, task, cfg.models)
    with atomic_dir(tok_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return tokenizer
