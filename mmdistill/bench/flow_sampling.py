"""Benchmarks, each a function returning a JSON-able dict (`mmdistill bench NAME` writes it).

flow-sampling: SDE sampling with per-step log-probs (`sde.sample_sde`, the rollout of Flow-GRPO
and Flow-OPD) against diffusers' own Euler loop (`StableDiffusion3Pipeline.__call__` with
precomputed prompt embeddings, latents out) on the same transformer, steps, batch, guidance
and initial noise.  `ratio` = SDE time / Euler time (target <= 1.2).  It also checks that our
loop with noise_level 0 gives diffusers' latents (`ode_max_abs_diff`).

    mmdistill bench flow-sampling --out bench/flow-sampling.json

libero-throughput: environment steps per second of on-policy LIBERO episodes (a random-init
vision policy sampling chunks of 4 actions, so every episode runs its full 280 steps) with 1
worker process against N, and rendering the camera only at decision points against after every
environment step.

    mmdistill bench libero-throughput --out bench/libero-throughput.json
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable

import torch


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _timed(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Each function once to warm up, then `repeats` rounds, interleaved so drifts hit all alike."""
    outs = {k: fn() for k, fn in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs[k] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    return times, outs


@torch.no_grad()
def flow_sampling(device: str = "auto", quick: bool = False) -> dict[str, Any]:
    from mmdistill.modalities.flow import pipelines as P
    from mmdistill.modalities.flow.sde import sample_sde
    from mmdistill.modalities.flow.shapes import VOCABULARY
    from mmdistill.pipeline import quiet_library_logs

    quiet_library_logs()
    dev = _device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = dict(image_size=32, vae=True, latent_channels=4, vae_blocks=2, patch_size=2, num_layers=4,
                 num_attention_heads=4, attention_head_dim=32, text_hidden_size=64)
    batch, steps, guidance, repeats = 8, 10, 4.5, (2 if quick else 5)
    pipe = P.build_tiny_sd3_pipeline(VOCABULARY, **model)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(dev, dtype)
    prompts = ["a red circle on the left of a blue square"] * batch
    cond = P.encode_prompts(pipe, prompts, max_sequence_length=0)
    shape = (batch, *P.latent_shape(pipe, model["image_size"]))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dev)
    sigmas = P.scheduler_sigmas(pipe.scheduler, steps).to(dev)
    vfn = P.velocity_fn(pipe.transformer, pipe.scheduler.config.num_train_timesteps)

    def euler() -> torch.Tensor:
        return pipe(
            prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
            negative_prompt_embeds=cond["negative_prompt_embeds"], negative_pooled_prompt_embeds=cond["negative_pooled_prompt_embeds"],
            num_inference_steps=steps, guidance_scale=guidance, latents=noise.to(dtype), output_type="latent",
        ).images

    def sde(noise_level: float) -> Callable[[], Any]:
        def run() -> Any:
            gen = torch.Generator(device=dev).manual_seed(1)
            return sample_sde(vfn, noise, sigmas, cond, guidance_scale=guidance, noise_level=noise_level, generator=gen)

        return run

    times, outs = _timed({"euler": euler, "sde": sde(0.7), "ode": sde(0.0)}, repeats, dev)
    euler_times, sde_times, ode_times = times["euler"], times["sde"], times["ode"]
    euler_latents, rollout, ode_rollout = outs["euler"], outs["sde"], outs["ode"]
    med = statistics.median
    return {
        "benchmark": "flow-sampling",
        "ratio": med(sde_times) / med(euler_times),
        "sde_seconds": med(sde_times),
        "euler_seconds": med(euler_times),
        "ode_seconds": med(ode_times),
        "ode_ratio": med(ode_times) / med(euler_times),
        "ode_max_abs_diff": float((ode_rollout.extras["x0_B_C_H_W"].float() - euler_latents.float()).abs().max()),
        "logprob_finite": bool(torch.isfinite(rollout.behavior_logp_B_T).all()),
        "target_ratio": 1.2,
        "setup": {
            "device": str(dev), "dtype": str(dtype).replace("torch.", ""), "batch": batch, "steps": steps,
            "guidance_scale": guidance, "repeats": repeats, "model": model, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
        },
        "times": times,
        "note": "CPU timings need a quiet machine: run with OMP_NUM_THREADS set to the free cores (oversubscribed threads make any ratio meaningless)",
    }


def libero_throughput(device: str = "auto", quick: bool = False, workers: int | None = None) -> dict[str, Any]:
    import os

    from mmdistill.config import ModelConfig
    from mmdistill.modalities.robot.adapter import RobotPolicyAdapter, TinyPolicyConfig
    from mmdistill.modalities.robot.task import LiberoTask

    n_workers = workers or max(2, min(os.cpu_count() or 2, 8))
    chunk, max_steps = 4, (40 if quick else 280)
    rows = []
    for render in ("decision", "step"):
        for w in (1, n_workers):
            task = LiberoTask("libero_object", tasks=[0], num_eval=n_workers, num_train=1, max_steps=max_steps, render=render, num_workers=w)
            adapter = RobotPolicyAdapter(device=_device(device))
            adapter.bind(task)
            policy = adapter.load_model(ModelConfig(tiny=TinyPolicyConfig(kind="vision_gaussian", chunk_size=chunk, seed=0)), "policy")
            states = task.problems("test", n_workers)
            gen = torch.Generator(device=adapter.device).manual_seed(0)
            adapter.run_episodes(policy, states[:w], gen)  # start the workers and build the simulators
            t0 = time.perf_counter()
            r = adapter.run_episodes(policy, states, gen)
            seconds = time.perf_counter() - t0
            adapter._pool.close()
            env_steps = int(r.mask_B_T.sum()) * chunk - int(r.rewards_B.sum())  # no early successes expected
            rows.append({"render": render, "workers": w, "episodes": len(states), "env_steps": env_steps, "seconds": round(seconds, 2),
                         "env_steps_per_s": round(env_steps / seconds, 1), "decisions_per_s": round(float(r.mask_B_T.sum()) / seconds, 2),
                         "successes": int(r.rewards_B.sum())})
    by = {(r["render"], r["workers"]): r["env_steps_per_s"] for r in rows}
    return {
        "benchmark": "libero-throughput",
        "rows": rows,
        "speedup_workers": {render: round(by[(render, n_workers)] / by[(render, 1)], 2) for render in ("decision", "step")},
        "speedup_decision_rendering": {str(w): round(by[("decision", w)] / by[("step", w)], 2) for w in (1, n_workers)},
        "setup": {"suite": "libero_object", "task": 0, "chunk": chunk, "max_steps": max_steps, "image_size": 64, "workers": n_workers,
                  "cpus": os.cpu_count(), "mujoco_gl": os.environ.get("MUJOCO_GL"), "machine": platform.machine(), "torch": torch.__version__},
        "note": "each configuration runs `workers` episodes per round; the first round (process start, simulator build) is not timed",
    }


BENCHES: dict[str, Callable[..., dict[str, Any]]] = {"flow-sampling": flow_sampling, "libero-throughput": libero_throughput}
