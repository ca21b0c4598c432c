"""What every benchmark shares: the device, wall-clock timing with CUDA synchronisation, resident
memory, and profiles (Python functions by own time, torch ops by self CPU time).

    python -c "from mmdistill.bench.common import resolve_device; print(resolve_device('auto'))"
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GIB = 1024**3


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when there is one, else the CPU; any other value is taken as a torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a wall-clock reading covers it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of fn, queued CUDA work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed_rounds(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Each function once to warm up, then `repeats` rounds, interleaved so drifts hit all alike.
    Returns the seconds of every timed call and the last output of each function."""
    outs = {k: fn() for k, fn in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            outs[k] = fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times, outs


def peak_rss_bytes() -> int:
    """This process's resident-size high-water mark (ru_maxrss)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    """This process's resident size now."""
    import psutil

    return psutil.Process().memory_info().rss


def profile_python(step: Callable[[], Any], calls: int = 2, n: int = 12) -> list[dict[str, Any]]:
    """cProfile of `calls` steps: the `n` functions with the most own time (Python overhead shows up here too)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (primitive calls, calls, tottime, cumtime, callers)}
    total = sum(v[2] for v in stats.values())
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [
        {
            "function": f"{Path(f).name}:{line}({name})" if f != "~" else name,
            "calls_per_step": v[1] // calls,
            "own_seconds_per_step": round(v[2] / calls, 4),
            "share": round(v[2] / total, 3),
        }
        for (f, line, name), v in top
    ]


def profile_torch_ops(fn: Callable[[], Any], n: int = 10) -> list[dict[str, Any]]:
    """The `n` ops with the most self CPU time in one call of fn (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_cpu_seconds": round(e.self_cpu_time_total / 1e6, 3),
            "self_cpu_memory_gib": round(e.self_cpu_memory_usage / GIB, 3),
        }
        for e in events
    ]
