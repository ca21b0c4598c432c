"""flow-sampling: SDE sampling with per-step log-probs (`sde.sample_sde`, docs/objectives.md section 6.1: the
rollout of Flow-GRPO, "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470, and Flow-OPD,
"Flow-OPD: On-Policy Distillation for Flow Matching Models", arXiv 2605.08063) against diffusers' own Euler loop
(`StableDiffusion3Pipeline.__call__` with precomputed prompt embeddings, latents out) on the same transformer,
steps, batch, guidance and initial noise.  `ratio` = SDE time / Euler time (target <= 1.2).  It also checks that
our loop with noise_level 0 gives diffusers' latents (`ode_max_abs_diff`).

    mmdistill bench flow-sampling --out bench/flow-sampling.json
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable
from typing import Any

import torch

from mmdistill.bench.common import resolve_device, timed_rounds


@torch.no_grad()
def flow_sampling(device: str = "auto", quick: bool = False) -> dict[str, Any]:
    from mmdistill.modalities.flow import pipelines as P
    from mmdistill.modalities.flow.shapes import VOCABULARY
    from mmdistill.pipeline import quiet_library_logs
    from mmdistill.sde import sample_sde

    quiet_library_logs()
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = dict(
        image_size=32,
        vae=True,
        latent_channels=4,
        vae_blocks=2,
        patch_size=2,
        num_layers=4,
        num_attention_heads=4,
        attention_head_dim=32,
        text_hidden_size=64,
    )
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
            prompt_embeds=cond["prompt_embeds"],
            pooled_prompt_embeds=cond["pooled_prompt_embeds"],
            negative_prompt_embeds=cond["negative_prompt_embeds"],
            negative_pooled_prompt_embeds=cond["negative_pooled_prompt_embeds"],
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise.to(dtype),
            output_type="latent",
        ).images

    def sde(noise_level: float) -> Callable[[], Any]:
        def run() -> Any:
            gen = torch.Generator(device=dev).manual_seed(1)
            return sample_sde(vfn, noise, sigmas, cond, guidance_scale=guidance, noise_level=noise_level, generator=gen)

        return run

    times, outs = timed_rounds({"euler": euler, "sde": sde(0.7), "ode": sde(0.0)}, repeats, dev)
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
            "device": str(dev),
            "dtype": str(dtype).replace("torch.", ""),
            "batch": batch,
            "steps": steps,
            "guidance_scale": guidance,
            "repeats": repeats,
            "model": model,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "times": times,
        "note": "CPU timings need a quiet machine: run with OMP_NUM_THREADS set to the free cores (oversubscribed threads make any ratio meaningless)",
    }
