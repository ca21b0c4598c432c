"""The `mmdistill` command: train, eval, sample, list.

mmdistill train configs/text/quickstart.yaml
mmdistill train configs/text/quickstart.yaml stages.student_opd.train.steps=50
mmdistill train --resume runs/quickstart
mmdistill eval runs/quickstart/student_opd/final --task arith --n 200 --json
mmdistill sample runs/quickstart/student_opd/final --task arith --n 4
mmdistill bench flow-sampling
mmdistill list
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from mmdistill.errors import Interrupted, MmdistillError


def _parse_task_args(items: list[str]) -> dict:
    import yaml

    out = {}
    for it in items:
        if "=" not in it:
            raise MmdistillError(f"--set '{it}' has no '='; write KEY=VALUE, e.g. --set difficulty=2")
        k, _, v = it.partition("=")
        out[k] = yaml.safe_load(v)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from mmdistill.config import load_config
    from mmdistill.pipeline import run_pipeline
    from mmdistill.rundir import check_usable, claim_check, expand, read_marker, wipe

    if args.num_processes and "LOCAL_RANK" not in os.environ:
        return launch(args.num_processes)
    if args.resume:
        run_dir = expand(args.resume)
        check_usable(run_dir)
        if read_marker(run_dir) is None and not (run_dir / "config.yaml").is_file():
            raise MmdistillError(
                f"--resume {run_dir}: not a run directory (no .mmdistill-run marker, no config.yaml); give the run "
                "directory of an earlier `mmdistill train`"
            )
        if not (run_dir / "config.yaml").is_file():
            raise MmdistillError(f"--resume {run_dir}: the run never got as far as writing config.yaml; start it anew")
        if args.config is not None:
            args.overrides = [args.config, *args.overrides]  # `--resume DIR key=value`
        cfg = load_config(run_dir / "config.yaml", args.overrides)
        run_pipeline(cfg, run_dir=run_dir, quiet=args.quiet)
        return 0
    if args.config is None:
        raise MmdistillError(
            "train needs a config file: mmdistill train CONFIG.yaml [key=value ...] (or --resume RUN_DIR)"
        )
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={json.dumps(args.run_dir)}")  # quoted: `--run-dir ~` is a path, not YAML null
    cfg = load_config(args.config, overrides)
    run_dir = expand(cfg.run_dir)
    if args.overwrite and int(os.environ.get("RANK", "0")) == 0:  # one process deletes; the others meet it later
        removed = wipe(run_dir)
        if removed and not args.quiet:
            print(f"--overwrite: removed {', '.join(removed)} from {run_dir}")
    claim_check(run_dir)  # refused before any compute; run_pipeline claims it once the tasks have loaded
    run_pipeline(cfg, run_dir=run_dir, quiet=args.quiet, config_path=str(args.config))
    return 0


def _load_for_eval(args: argparse.Namespace):
    """The adapter that claims the checkpoint directory, the model, and the task to evaluate it on."""

    from mmdistill.config import ModelConfig, check_kwargs
    from mmdistill.pipeline import quiet_library_logs
    from mmdistill.registry import ADAPTERS, TASKS
    from mmdistill.rundir import expand

    path = expand(args.model)
    owners = [(name, cls) for name, cls in ADAPTERS.items() if cls.claims_checkpoint(str(path))]
    if not owners:
        raise MmdistillError(
            f"model '{path}' is not a saved checkpoint of any adapter ({', '.join(ADAPTERS.names())}); give a stage's "
            "final directory, e.g. runs/quickstart/student_opd/final or runs/shapes_flow_opd/flow_opd/final"
        )
    _, adapter_cls = owners[0]
    cfg = _eval_config(adapter_cls.spec, args)  # bad flags are refused before anything loads
    adapter_cls.check_checkpoint(str(path), "model")
    task_name = args.task or adapter_cls.spec.default_task
    task_cls = TASKS.get(task_name)
    task = task_cls(**check_kwargs(task_cls, _parse_task_args(args.set), "task"))
    device = _device(args.device)
    quiet_library_logs()
    adapter = adapter_cls(adapter_cls.load_tokenizer(str(path)), device=device)
    adapter.bind(task)
    return adapter, adapter.load_model(ModelConfig(path=str(path)), "model").eval(), task, cfg


def _eval_config(spec: Any, args: argparse.Namespace) -> Any:
    """The adapter's eval config from the command-line flags it has (the others do not apply to it)."""
    import dataclasses

    from mmdistill.errors import ConfigError

    cls = spec.eval_config
    given = {f.name: vars(args)[f.name] for f in dataclasses.fields(cls) if vars(args).get(f.name) is not None}
    try:
        return cls(**given)
    except ValueError as e:
        raise ConfigError(f"--{str(e).replace('_', '-')}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from mmdistill.report import headline
    from mmdistill.train import evaluate

    if args.harness:
        return _eval_harness(args)

    adapter, model, task, cfg = _load_for_eval(args)
    res = evaluate(adapter, model, task, cfg, seed=args.seed, out_dir=Path(args.grid_dir) if args.grid_dir else None)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(", ".join(f"{k} {v:.3f}" for k, v in headline(res).items()) + f" on {res['n']} {args.split} problems")
    return 0


def _device(flag: str) -> str:
    import torch

    return "cuda" if flag == "cuda" or (flag == "auto" and torch.cuda.is_available()) else "cpu"


def _eval_harness(args: argparse.Namespace) -> int:
    """A saved checkpoint through an external evaluation harness (lm-eval): its own table, printed."""
    from mmdistill.registry import HARNESSES
    from mmdistill.rundir import expand

    if not args.harness_tasks:
        raise MmdistillError(
            "--harness needs --harness-tasks T1,T2 (task names of the harness, or of --harness-include)"
        )
    if args.harness not in HARNESSES:
        raise MmdistillError(
            f"--harness: unknown harness '{args.harness}'; known: {', '.join(HARNESSES.names()) or '(none)'}"
        )
    path = expand(args.model)
    if not (path / "config.json").is_file():
        raise MmdistillError(
            f"--harness: '{path}' is not a saved transformers checkpoint (no config.json); give a stage's final"
        )
    include = str(expand(args.harness_include)) if args.harness_include else None
    result = HARNESSES.get(args.harness)(
        model_dir=str(path),
        tasks=[t.strip() for t in args.harness_tasks.split(",") if t.strip()],
        include_path=include,
        limit=args.n,
        device="cpu" if args.device == "auto" else args.device,
        batch_size=args.batch_size,
        out_dir=None,
    )
    print(json.dumps(result.get("results", {}), indent=1) if args.json else result["table"])
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from mmdistill.train import evaluate

    args.batch_size = args.n
    adapter, model, task, cfg = _load_for_eval(args)
    res = evaluate(adapter, model, task, cfg, seed=args.seed, show=args.n)
    for sample in res.get("samples", []):
        print("\n".join(f"{k}: {v}" for k, v in sample.items()) + "\n")
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """Episodes of one model of a robot run config, written as a LeRobot dataset."""
    from mmdistill.config import load_config
    from mmdistill.pipeline import build_task, quiet_library_logs
    from mmdistill.registry import ADAPTERS
    from mmdistill.train import RunContext

    quiet_library_logs()
    cfg = load_config(args.config, args.overrides)
    adapter_cls = ADAPTERS.get(cfg.adapter)
    if not adapter_cls.spec.can_record:
        raise MmdistillError(
            f"adapter {cfg.adapter!r} has no episodes to record; `mmdistill record` is for robot_policy configs"
        )
    task = build_task(cfg.task)
    adapter = adapter_cls(None, device="cpu" if cfg.device in ("cpu", "auto") else cfg.device)
    adapter.bind(task)
    ctx = RunContext(cfg=cfg, run_dir=Path(cfg.run_dir), accelerator=None, adapter=adapter, task=task, quiet=True)
    model = ctx.load_model(args.model).eval()
    problems = task.problems(args.split, args.episodes, seed=cfg.seed)
    out = Path(args.out or Path(cfg.run_dir) / "datasets" / f"{args.model}_{args.split}")
    res = adapter.record(
        model, task, problems, out, repo_id=f"mmdistill/{args.model}", sample=not args.mean, seed=cfg.seed
    )
    print(json.dumps(res, indent=1))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mmdistill.bench import BENCHES as benches
    from mmdistill.bench import PLOTS

    fn = benches.get(args.name)
    if fn is None:
        raise MmdistillError(f"unknown benchmark '{args.name}'; known: {', '.join(sorted(benches))}")
    out = Path(args.out or f"bench/{args.name}.json")
    extra = {"workers": args.workers} if args.workers else {}
    if extra and args.name != "libero-throughput":
        raise MmdistillError(f"--workers applies to libero-throughput only, not to '{args.name}'; drop it")
    result = fn(device=args.device, quick=args.quick, **extra)
    from mmdistill.checkpoint import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    if args.name in PLOTS:
        PLOTS[args.name](result, out.with_suffix(".png"))
        print(f"written: {out.with_suffix('.png')}")
    long = ("setup", "times", "profile_top", "methods", "method", "parts", "equal_work", "differences")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list) and k not in long}, indent=1))
    print(f"written: {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from mmdistill.compare import compare

    out = Path(args.out or (Path(args.runs[0]).parent / "summary"))
    summary = compare(
        [Path(r) for r in args.runs],
        out,
        metric=args.metric,
        gap=tuple(args.gap) if args.gap else None,
        fraction=args.fraction,
        title=args.title,
    )
    print((out / "summary.md").read_text(), end="")
    print(f"written: {out / 'summary.json'}, {out / 'summary.md'}, {out / 'curves.png'}")
    return 0 if summary else 2


def cmd_list(args: argparse.Namespace) -> int:
    from mmdistill.interfaces import StageKind
    from mmdistill.registry import ADAPTERS, OBJECTIVES, STAGE_KINDS, TASKS

    for title, reg in (
        ("objectives", OBJECTIVES),
        ("adapters", ADAPTERS),
        ("tasks", TASKS),
        ("stage kinds", STAGE_KINDS),
    ):
        print(f"{title}:")
        for name, obj in reg.items():
            doc = ((obj.run if isinstance(obj, StageKind) else obj).__doc__ or "").strip().splitlines()
            print(f"  {name:<14} {doc[0] if doc else ''}")
    import mmdistill.configs as pkg

    root = Path(pkg.__file__).parent
    print("configs:")
    for p in sorted(root.rglob("*.yaml")):
        print(f"  configs/{p.relative_to(root)}")
    return 0


def launch(num_processes: int) -> int:
    """`mmdistill train --num-processes N ...`: the same command under `accelerate launch` (DDP on GPUs; on a
    machine without GPUs, N gloo processes on the CPU, which `accelerate launch --cpu` would not start)."""
    import subprocess

    if num_processes < 1:
        raise MmdistillError(f"--num-processes: {num_processes} is below 1; give the number of processes to launch")
    argv = sys.argv[1:]
    rest = []
    skip = False
    for i, a in enumerate(argv):  # drop --num-processes N / --num-processes=N, keep everything else
        if skip:
            skip = False
            continue
        if a == "--num-processes":
            skip = True
            continue
        if a.startswith("--num-processes="):
            continue
        rest.append(a)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
    ]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        cmd += ["--multi_gpu"]  # with Accelerator(cpu=True) on a CPU box this gives gloo processes
    cmd += ["-m", "mmdistill", *rest]
    env = dict(os.environ)
    if not _has_cuda():  # CPU processes share the cores: one thread each unless the user says otherwise
        env.setdefault("OMP_NUM_THREADS", "1")
    print(f"[launch] {' '.join(cmd)}", file=sys.stderr)
    import signal

    child = subprocess.Popen(cmd, env=env)
    got: list[int] = []

    def forward(signum: int, frame: object) -> None:  # SIGTERM / Ctrl-C reach the workers through the launcher
        got.append(signum)
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()
    if got:
        print(
            f"stopped: {signal.Signals(got[0]).name} was passed to the {num_processes} processes, which saved a "
            f"checkpoint (see the line above); continue with `mmdistill train --resume RUN_DIR --num-processes "
            f"{num_processes}` (any process count that divides the run's rollout shards)",
            file=sys.stderr,
        )
        return 128 + got[0]
    if code != 0:
        print(
            f"error: the {num_processes}-process run failed (exit {code}); the launcher's report above names the "
            "rank that failed first (Root Cause); fix it, then continue with `mmdistill train --resume RUN_DIR "
            f"--num-processes {num_processes}`",
            file=sys.stderr,
        )
    return code if code >= 0 else 128 - code


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _rank_prefix() -> str:
    """Errors of a multi-process run: rank 0's plain, the others' marked with their rank."""
    return f"[rank {_rank()}] " if _rank() else ""


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdistill", description="Teacher-to-student distillation across modalities.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="run a training stage or a pipeline of stages from a YAML config")
    t.add_argument(
        "config", nargs="?", help="YAML config (a path, or a packaged one such as configs/text/quickstart.yaml)"
    )
    t.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 stages.student_opd.objective.coef=0.5"
    )
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.add_argument("--run-dir", help="where outputs go (same as run_dir=...)")
    t.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument(
        "--num-processes",
        type=int,
        default=0,
        metavar="N",
        help="data-parallel over N processes through `accelerate launch` (GPUs, or gloo on the CPU)",
    )
    t.set_defaults(fn=cmd_train)

    for name, fn, hlp in (
        ("eval", cmd_eval, "accuracy and pass@k of a checkpoint on held-out problems"),
        ("sample", cmd_sample, "print generations of a checkpoint"),
    ):
        e = sub.add_parser(name, help=hlp)
        e.add_argument("model", help="a saved checkpoint directory (transformers, diffusers or LeRobot)")
        e.add_argument("--task", help="task name (mmdistill list); default: the adapter's own (arith, shapes, ...)")
        e.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="task argument, e.g. --set difficulty=2"
        )
        e.add_argument("--n", type=int, default=200 if name == "eval" else 4)
        e.add_argument("--split", default="test")
        e.add_argument("--max-new-tokens", type=int, default=48, help="text models: tokens per completion")
        e.add_argument("--temperature", type=float, default=0.0)
        e.add_argument("--seed", type=int, default=0)
        e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        e.add_argument("--num-steps", type=int, help="flow models: Euler ODE steps (default 10)")
        e.add_argument("--guidance-scale", type=float, help="flow models: classifier-free guidance (default 1)")
        if name == "eval":
            e.add_argument("--k", type=int, default=1, help="samples per problem for pass@k (needs --temperature > 0)")
            e.add_argument("--batch-size", type=int, default=200)
            e.add_argument("--json", action="store_true", help="print the full result as JSON")
            e.add_argument("--grid-dir", help="flow models: write a sample grid (eval.png) here")
            e.add_argument("--harness", help="evaluate with an external harness instead (lm-eval); prints its table")
            e.add_argument("--harness-tasks", help="the harness's task names, comma-separated (with --harness)")
            e.add_argument("--harness-include", help="a folder of the harness's own task YAMLs (local tasks)")
        e.set_defaults(fn=fn)

    b = sub.add_parser("bench", help="speed / memory benchmarks, written as JSON")
    b.add_argument("name", help="flow-sampling | libero-throughput | text-step | text-loss-memory | memory")
    b.add_argument("--out", help="output JSON (default bench/NAME.json)")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--quick", action="store_true", help="fewer repeats, smaller shapes (CI smoke)")
    b.add_argument(
        "--workers", type=int, help="libero-throughput: the N of 1 vs N worker processes (default: the CPU count, 2..8)"
    )
    b.set_defaults(fn=cmd_bench)

    rec = sub.add_parser("record", help="robot runs: record a model's episodes as a LeRobot dataset")
    rec.add_argument("config", help="a robot_policy run config (YAML)")
    rec.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    rec.add_argument("--model", required=True, help="a models entry or a finished stage (its final checkpoint)")
    rec.add_argument("--episodes", type=int, default=10)
    rec.add_argument(
        "--split", default="train", choices=["train", "test"], help="initial states (default: training ones)"
    )
    rec.add_argument("--mean", action="store_true", help="act with the policy's mean action instead of sampling")
    rec.add_argument("--out", help="dataset directory (default RUN_DIR/datasets/MODEL_SPLIT; must not exist)")
    rec.set_defaults(fn=cmd_record)

    cmp = sub.add_parser("compare", help="runs of one config over seeds: a table (mean, std) and evaluation curves")
    cmp.add_argument("runs", nargs="+", help="finished run directories (each with report.json)")
    cmp.add_argument("--out", help="output directory (default: RUNS[0]/../summary)")
    cmp.add_argument("--metric", default="accuracy", help="the evaluation metric of the curves (default accuracy)")
    cmp.add_argument(
        "--gap",
        nargs=2,
        metavar=("FROM", "TO"),
        help="report keys: steps each stage needed to close --fraction of FROM -> TO",
    )
    cmp.add_argument("--fraction", type=float, default=0.9)
    cmp.add_argument("--title", help="plot title")
    cmp.set_defaults(fn=cmd_compare)

    ls = sub.add_parser("list", help="registered objectives, adapters, tasks, and packaged configs")
    ls.set_defaults(fn=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may also follow a flag (`train cfg.yaml --overwrite train.steps=5`)
    if extra and "overrides" in vars(args) and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except Interrupted as e:
        if _rank() == 0:
            print(f"stopped: {e}", file=sys.stderr)
        return 128 + (e.signum or 2)
    except MmdistillError as e:
        print(f"{_rank_prefix()}error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a collective that lost its peers: another process of the run died
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(
            m in str(e) for m in ("gloo", "Connection reset", "Connection closed", "NCCL", "ProcessGroup")
        ):
            first = str(e).splitlines()[0][:200]
            print(
                f"{_rank_prefix() or '[rank 0] '}error: lost contact with another process of the run ({first}); the "
                "launcher's report names the rank that died and why; continue with `mmdistill train --resume RUN_DIR`",
                file=sys.stderr,
            )
            return 2
        raise
    except KeyError as e:  # registry lookups
        if str(e).startswith('"unknown') or str(e).startswith("'unknown"):
            print(f"error: {e.args[0]}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
