"""libero-throughput: environment steps per second of on-policy LIBERO episodes (a random-init
vision policy sampling chunks of 4 actions, so every episode runs its full 280 steps) with 1
worker process against N, and rendering the camera only at decision points against after every
environment step.

    mmdistill bench libero-throughput --out bench/libero-throughput.json
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch

from mmdistill.bench.common import resolve_device


def libero_throughput(device: str = "auto", quick: bool = False, workers: int | None = None) -> dict[str, Any]:
    from mmdistill.config import ModelConfig
    from mmdistill.modalities.robot.adapter import RobotPolicyAdapter
    from mmdistill.modalities.robot.config import TinyPolicyConfig
    from mmdistill.modalities.robot.task import LiberoTask

    n_workers = workers or max(2, min(os.cpu_count() or 2, 8))
    chunk, max_steps = 4, (40 if quick else 280)
    rows = []
    for render in ("decision", "step"):
        for w in (1, n_workers):
            task = LiberoTask(
                "libero_object",
                tasks=[0],
                num_eval=n_workers,
                num_train=1,
                max_steps=max_steps,
                render=render,
                num_workers=w,
            )
            adapter = RobotPolicyAdapter(None, device=resolve_device(device))
            adapter.bind(task)
            policy = adapter.load_model(
                ModelConfig(tiny=TinyPolicyConfig(kind="vision_gaussian", chunk_size=chunk, seed=0)), "policy"
            )
            states = task.problems("test", n_workers)
            gen = torch.Generator(device=adapter.device).manual_seed(0)
            adapter.run_episodes(policy, states[:w], gen)  # start the workers and build the simulators
            t0 = time.perf_counter()
            r = adapter.run_episodes(policy, states, gen)
            seconds = time.perf_counter() - t0
            adapter._pool.close()
            env_steps = int(r.mask_B_T.sum()) * chunk - int(r.rewards_B.sum())  # no early successes expected
            rows.append(
                {
                    "render": render,
                    "workers": w,
                    "episodes": len(states),
                    "env_steps": env_steps,
                    "seconds": round(seconds, 2),
                    "env_steps_per_s": round(env_steps / seconds, 1),
                    "decisions_per_s": round(float(r.mask_B_T.sum()) / seconds, 2),
                    "successes": int(r.rewards_B.sum()),
                }
            )
    by = {(r["render"], r["workers"]): r["env_steps_per_s"] for r in rows}
    return {
        "benchmark": "libero-throughput",
        "rows": rows,
        "speedup_workers": {
            render: round(by[(render, n_workers)] / by[(render, 1)], 2) for render in ("decision", "step")
        },
        "speedup_decision_rendering": {str(w): round(by[("decision", w)] / by[("step", w)], 2) for w in (1, n_workers)},
        "setup": {
            "suite": "libero_object",
            "task": 0,
            "chunk": chunk,
            "max_steps": max_steps,
            "image_size": 64,
            "workers": n_workers,
            "cpus": os.cpu_count(),
            "mujoco_gl": os.environ.get("MUJOCO_GL"),
            "machine": platform.machine(),
            "torch": torch.__version__,
        },
        "note": "each configuration runs `workers` episodes per round; the first round (process start, simulator build) is not timed",
    }
