"""lm-evaluation-harness (EleutherAI's `lm-eval`) on a saved text checkpoint, offline.

`run_lm_eval` runs lm-eval's `simple_evaluate` with its `hf` model on a checkpoint directory (a
stage's `final/`, or any `save_pretrained` causal LM with its tokenizer), on lm-eval tasks by name:
built-in ones whose data is already in the local datasets cache, or your own YAML tasks found under
`include_path` (a JSONL of your own: `dataset_path: json`, `dataset_kwargs: {data_files: ...}`; lm-eval
reads those paths from the current directory). Hub and datasets access is switched off while it runs,
so nothing is downloaded. It returns lm-eval's own table (`lm_eval.utils.make_table`) and the numbers.
Registered as the harness `lm-eval` (`mmdistill eval MODEL --harness lm-eval`) and as the stage kind
`harness`, which evaluates each model of `stages[].evaluate` the way an `eval` stage does:

    - name: harness
      kind: harness
      evaluate: {student_after: student_opd}        # report key -> model or earlier stage
      options: {tasks: [local_arith_gen], include_path: tests/data/lm_eval_tasks, limit: 32}

    mmdistill eval runs/quickstart/student_opd/final --harness lm-eval --harness-tasks local_arith_gen \
        --harness-include tests/data/lm_eval_tasks --n 32
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmdistill.checkpoint import atomic_dir, atomic_write_text
from mmdistill.config import from_dict
from mmdistill.errors import CheckpointError, ConfigError, MmdistillError
from mmdistill.interfaces import StageKind
from mmdistill.modalities.text.adapter import CausalLMAdapter
from mmdistill.modalities.text.precompute import local_checkpoint
from mmdistill.registry import HARNESSES, STAGE_KINDS
from mmdistill.rundir import expand

INSTALL = "pip install 'mmdistill[eval]'"  # the extra that pins lm_eval
# what `out_dir/lm_eval_results.json` keeps of lm-eval's results (not per-sample logs, not the environment)
RESULT_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
    "config",
)


@dataclass
class HarnessOptions:
    """`stages.NAME.options` of a `harness` stage: which lm-eval tasks, and how to run them."""

    tasks: list[str] = field(default_factory=list)  # lm-eval task, group or tag names
    include_path: str | None = None  # a folder of your own lm-eval task YAMLs
    limit: int | None = None  # documents per task (lm-eval's --limit); None: all
    num_fewshot: int | None = None  # None: each task's own default
    batch_size: int = 8


def harness_options(st: Any) -> HarnessOptions:
    """The stage's options, checked before any compute (unknown keys, types, ranges, the install)."""
    where = f"stages.{st.name}.options"
    opt = from_dict(HarnessOptions, dict(st.options), where)
    check_request(opt.tasks, opt.include_path, opt.limit, opt.batch_size, opt.num_fewshot, where)
    return opt


def check_request(
    tasks: list[str], include_path: str | None, limit: int | None, batch_size: int, num_fewshot: int | None, where: str
) -> None:
    """Refuse an empty task list, a missing include folder, ranges below 1, or no lm-eval installed."""
    if not tasks or any(not isinstance(t, str) or not t.strip() for t in tasks):
        raise ConfigError(f"{where}.tasks: {tasks!r}; list lm-eval task names, e.g. tasks: [local_arith_gen]")
    if include_path is not None and not expand(include_path).is_dir():
        raise ConfigError(
            f"{where}.include_path: '{include_path}' is not a folder; give the folder that holds your task YAMLs"
        )
    for key, value, low in (("limit", limit, 1), ("batch_size", batch_size, 1), ("num_fewshot", num_fewshot, 0)):
        if value is not None and value < low:
            raise ConfigError(f"{where}.{key}: {value} must be >= {low}")
    if importlib.util.find_spec("lm_eval") is None:
        raise MmdistillError(f"the lm-eval harness needs the lm_eval package; install it with {INSTALL}")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hub and datasets offline while lm-eval runs: the environment variables and the flags that
    huggingface_hub and datasets read at import time; restored afterwards."""
    import datasets.config
    import huggingface_hub.constants

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: os.environ.get(k) for k in names}
    flags = [
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
    ]
    before = [getattr(mod, name) for mod, name in flags]
    os.environ.update({k: "1" for k in names})
    for mod, name in flags:
        setattr(mod, name, True)
    try:
        yield
    finally:
        for (mod, name), value in zip(flags, before):
            setattr(mod, name, value)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def text_checkpoint(model_dir: str | os.PathLike, where: str = "model") -> Path:
    """A local causal-LM checkpoint directory with its tokenizer, or one line saying what is wrong."""
    p = expand(model_dir)
    if not p.is_dir():
        raise CheckpointError(
            f"{where}: '{model_dir}' is not a directory; give a text checkpoint, e.g. runs/quickstart/student_opd/final"
        )
    if not CausalLMAdapter.claims_checkpoint(p):
        raise CheckpointError(
            f"{where}: '{model_dir}' is not a text (causal LM) checkpoint: no config.json of a causal-LM model_type; "
            "give a stage's final/ folder, e.g. runs/quickstart/student_opd/final"
        )
    if not (p / "tokenizer_config.json").is_file():
        raise CheckpointError(
            f"{where}: '{model_dir}' holds no tokenizer (tokenizer_config.json); save the tokenizer beside the weights"
        )
    return p


def task_manager(cls: type, tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's TaskManager over `include_path` alone when it holds every task asked for (indexing
    lm-eval's ~15k built-in tasks takes ~15 s), else over both; an unknown name is refused with the
    closest known one."""
    include = str(expand(include_path)) if include_path else None
    wanted = [t for t in tasks if Path(t).suffix not in (".yaml", ".yml")]  # a YAML path is loaded as is
    if include is not None:
        local = cls(include_path=include, include_defaults=False)
        if all(t in local.all_tasks for t in wanted):
            return local
    manager = cls(include_path=include)
    for name in wanted:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "give the folder of its YAML with --harness-include"
            raise ConfigError(f"harness.tasks: lm-eval knows no task, group or tag '{name}'; {hint}")
    return manager


def metric_values(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, int]]:
    """lm-eval's per-task results as flat scores, `{"TASK/METRIC": value}` (`TASK/METRIC/FILTER` for a
    filter other than `none`), without standard errors; and the documents evaluated per task."""
    scores: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, row in results.get(section, {}).items():
            for key, value in row.items():
                if "," not in key or "_stderr" in key or isinstance(value, bool):
                    continue
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                metric, filt = key.split(",", 1)
                scores[f"{task}/{metric}" if filt == "none" else f"{task}/{metric}/{filt}"] = float(value)
    n = {task: int(row["effective"]) for task, row in results.get("n-samples", {}).items()}
    return scores, n


@HARNESSES.register("lm-eval")
def run_lm_eval(
    model_dir: str | os.PathLike,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    out_dir: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Evaluate the checkpoint in `model_dir` on lm-eval `tasks` (offline) and return
    `{"table": lm-eval's markdown table, "results": {"TASK/METRIC": value}, "n": documents evaluated,
    "n_by_task": {...}, "seconds": ...}`; with `out_dir`, lm-eval's results (without per-sample logs)
    are also written to `out_dir/lm_eval_results.json`."""
    t0 = time.time()
    batch_size = 8 if batch_size is None else batch_size
    check_request(list(tasks), include_path, limit, batch_size, num_fewshot, "harness")
    path = text_checkpoint(model_dir)
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with offline():
        manager = task_manager(TaskManager, list(tasks), include_path)
        try:  # the data first, so a missing file fails in a second, before the model loads
            manager.load(list(tasks))
        except Exception as e:  # noqa: BLE001 - a missing, unreachable or malformed data file: one line, no traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise MmdistillError(
                f"harness.tasks {','.join(tasks)}: lm-eval could not load the task data offline "
                f"({type(e).__name__}: {first}); point the task's dataset_kwargs.data_files at a local file "
                "(read from the current directory) or put the dataset in the local datasets cache"
            ) from None
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(path), "tokenizer": str(path), "dtype": dtype},
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            limit=limit,
            task_manager=manager,
            log_samples=False,
        )
    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    scores, n_by_task = metric_values(results)
    if out_dir is not None:
        out = expand(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        keep = {k: results[k] for k in RESULT_KEYS if k in results}
        atomic_write_text(out / "lm_eval_results.json", json.dumps(keep, indent=1, default=str))
    return {
        "table": table,
        "results": scores,
        "n": sum(n_by_task.values()),
        "n_by_task": n_by_task,
        "lm_eval_version": lm_eval.__version__,
        "seconds": round(time.time() - t0, 1),
    }


def harness_model_dir(ctx: Any, ref: str, key: str, st: Any) -> tuple[Path, Any]:
    """The checkpoint directory of `ref` and its model config (dtype, device): its own directory (a
    trained stage's `final/`, a `models` path, a cached hub id), or, for a model with none (tiny,
    prune, merge), the model saved once under `RUN_DIR/STAGE/models/KEY`."""
    where = f"stages.{st.name}.evaluate.{key}"
    cfg = ctx.model_config(ref)  # a stage that has not run yet raises CheckpointError here
    if cfg.kind != "checkpoint":
        raise ConfigError(
            f"{where}: '{ref}' is a {cfg.kind} model; lm-eval evaluates checkpoints of causal LMs, "
            "so name a trained stage or a models entry with a path"
        )
    if cfg.path is not None:
        return text_checkpoint(local_checkpoint(cfg.path, cfg.revision, where), where), cfg
    saved = ctx.run_dir / st.name / "models" / key
    if not saved.is_dir():
        with atomic_dir(saved) as tmp:
            ctx.adapter.save(ctx.load_model(ref), tmp)
    return saved, cfg


def run_harness_stage(ctx: Any, st: Any) -> dict[str, Any]:
    """lm-eval on each model of `st.evaluate` (report key -> model ref); results shaped like an `eval`
    stage's, so the report shows them: `{key: {"model": ref, "n": docs, "TASK/METRIC": value, ...}}`."""
    if not isinstance(ctx.adapter, CausalLMAdapter):
        raise ConfigError(
            f"stages.{st.name}.kind: a harness stage evaluates text checkpoints with lm-eval; "
            f"this run's adapter is '{ctx.cfg.adapter}', so use an eval stage"
        )
    opt = harness_options(st)
    out: dict[str, Any] = {"kind": "eval", "harness": "lm-eval", "tasks": opt.tasks, "results": {}}
    for key, ref in st.evaluate.items():
        model_dir, cfg = harness_model_dir(ctx, ref, key, st)
        res = run_lm_eval(
            model_dir,
            opt.tasks,
            include_path=opt.include_path,
            limit=opt.limit,
            device=cfg.device or str(ctx.accelerator.device),
            batch_size=opt.batch_size,
            out_dir=ctx.run_dir / st.name / key,
            num_fewshot=opt.num_fewshot,
            dtype=cfg.dtype,
        )
        out["results"][key] = {"model": ref, "n": res["n"], **res["results"], "n_by_task": res["n_by_task"]}
        if not ctx.quiet:
            print(f"[{st.name}] {key} ({ref}), lm-eval {res['lm_eval_version']}:\n{res['table']}")
    return out


STAGE_KINDS.register("harness")(StageKind(run_harness_stage, uses="evaluate", check=harness_options))
