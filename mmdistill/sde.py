"""SDE sampling of flow-matching models with per-step log-probs (Flow-GRPO form), and re-scoring.

Time runs with the noise level sigma from 1 (noise) to 0 (data); a step goes from
`sigma` to `sigma_next < sigma`, `dt = sigma_next - sigma < 0`.  With noise level `a`
(docs/objectives.md sections 6.1 to 6.3)::

    sigma_t = a * sqrt(sigma / (1 - sigma))                       (the SDE's noise scale)
    mu      = x (1 + sigma_t^2 dt / (2 sigma)) + v (1 + sigma_t^2 (1 - sigma) / (2 sigma)) dt
    x'      = mu + sigma_t sqrt(-dt) eps,        x' ~ N(mu, sigma_t^2 |dt|)

At sigma == 1 the ratio sigma / (1 - sigma) is infinite; like Flow-GRPO we put the
schedule's second sigma (`sigma_cap`) in the denominator there.  `a = 0` is exactly the
Euler ODE step of diffusers' FlowMatchEulerDiscreteScheduler (`x' = x + v dt`).

Two step Gaussians at the same state differ only in their means, and the means are
affine in v, so the per-step KL is a weighted squared velocity difference::

    KL = ||mu_1 - mu_2||^2 / (2 sigma_t^2 |dt|) = w(t) ||v_1 - v_2||^2,
    w(t) = (|dt| / 2) (sigma_t (1 - sigma) / (2 sigma) + 1 / sigma_t)^2      (`sde_step_kl_weight`)

A rollout (`sample_sde`) stores, per denoising step t, the state x_t (flattened to D),
the sigmas, the condition and the CFG scale in `FlowSteps`; `actions` are the sampled
x_{t-dt}; `behavior_logp_B_T` their log-probs.  `step_velocities` re-scores any
velocity model on those states and `step_dists` turns velocities into
`mmdistill.stepdist.Gaussian` step distributions (mean/std `[B, T, D]`).

Log-prob reduction: the true log-density sums over the D latent dimensions ("sum");
Flow-GRPO's code averages ("mean").  Mean, std and the "mean" log-prob equal the lines of
Flow-GRPO's `sd3_sde_with_logprob.py` (tests/test_flow_sde.py, float64, to 1e-15).  Flow-GRPO
and Flow-OPD call `sigma_t` (without sqrt|dt|) `std_dev_t` and divide their KL by
`2 std_dev_t^2`: that KL is the exact one times |dt| / D (docs/objectives.md section 6.5).
`Gaussian.log_prob` always sums; use `step_logp` to get log-probs on the rollout's own convention.

    python -m pytest tests/test_flow_sde.py -q -o addopts=""
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from mmdistill.interfaces import Rollout
from mmdistill.stepdist import Gaussian

__all__ = [
    "LogprobReduce",
    "VelocityFn",
    "FlowSteps",
    "SDEStep",
    "sigma_schedule",
    "sde_noise_scale",
    "sde_mean",
    "sde_step_with_logprob",
    "sde_step_kl_weight",
    "sample_sde",
    "step_velocities",
    "step_dists",
    "step_logp",
    "rescore",
]

LogprobReduce = Literal["sum", "mean"]
# velocity_fn(x_t_B_C_H_W, sigma_B, cond, guidance_scale) -> v_B_C_H_W
VelocityFn = Callable[[Tensor, Tensor, Any, float], Tensor]


def _check_reduce(logprob_reduce: str) -> None:
    if logprob_reduce not in ("sum", "mean"):
        raise ValueError(
            f"logprob_reduce must be 'sum' (true log-density over the latent dims) or 'mean' "
            f"(Flow-GRPO's code); got {logprob_reduce!r}"
        )


def _bc(s: Tensor, like: Tensor) -> Tensor:
    """Append singleton dims to `s` ([] , [B] or [B, T]) so it broadcasts against `like`."""
    return s.reshape(*s.shape, *([1] * (like.dim() - s.dim())))


# ----------------------------------------------------------------------------- schedules


def sigma_schedule(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """The `[num_steps + 1]` float32 sigmas (last one 0) that diffusers'
    `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)` produces
    (no dynamic shifting, no Karras/exponential/beta sigmas); tests compare them exactly.
    The transformer's timestep for sigma is `sigma * num_train_timesteps`."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0 (1.0 = no shift, SD3 uses 3.0); got {shift}")
    n = num_train_timesteps
    train = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
    train = shift * train / (1 + (shift - 1) * train)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    sigmas = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.cat([torch.from_numpy(sigmas).to(torch.float32), torch.zeros(1)])


def sde_noise_scale(sigma: Tensor | float, noise_level: float, sigma_cap: float | None = None) -> Tensor:
    """`sigma_t = noise_level * sqrt(sigma / (1 - sigma))`; where sigma >= 1 the denominator
    uses `sigma_cap` instead (Flow-GRPO: the schedule's second sigma)."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0 (0 = deterministic Euler ODE step); got {noise_level}")
    sigma = torch.as_tensor(sigma)
    at_one = sigma >= 1
    if sigma_cap is None:
        if bool(at_one.any()):
            raise ValueError(
                "sigma == 1 makes sigma / (1 - sigma) infinite; pass sigma_cap (Flow-GRPO uses the "
                "schedule's second sigma, which `sample_sde` does)"
            )
        denominator = 1 - sigma
    else:
        if not 0 <= sigma_cap < 1:
            raise ValueError(f"sigma_cap must lie in [0, 1); got {sigma_cap}")
        denominator = 1 - torch.where(at_one, torch.full_like(sigma, sigma_cap), sigma)
    return noise_level * torch.sqrt(sigma / denominator)


def sde_mean(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_scale: Tensor) -> Tensor:
    """Mean of the SDE step: `x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt`,
    `s = sigma_t`.  sigma, sigma_next, noise_scale are `[]`, `[B]` or `[B, T]` and broadcast
    against x (`[B, ...]` or `[B, T, D]`).  With s = 0 it is exactly `x + v dt`."""
    sigma, sigma_next, s = _bc(sigma, x), _bc(sigma_next, x), _bc(noise_scale, x)
    dt = sigma_next - sigma
    return x * (1 + s**2 * dt / (2 * sigma)) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt


def sde_step_kl_weight(
    sigma: Tensor | float, sigma_next: Tensor | float, noise_level: float, sigma_cap: float | None = None
) -> Tensor:
    """w(t) with `KL(N(mu(v_1), S) || N(mu(v_2), S)) = w(t) ||v_1 - v_2||^2` for one SDE step:
    `w = (|dt| / 2) (sigma_t (1 - sigma) / (2 sigma) + 1 / sigma_t)^2`."""
    if noise_level <= 0:
        raise ValueError(f"w(t) needs a stochastic step (noise_level > 0); got noise_level={noise_level}")
    sigma = torch.as_tensor(sigma)
    sigma_next = torch.as_tensor(sigma_next, dtype=sigma.dtype, device=sigma.device)
    s = sde_noise_scale(sigma, noise_level, sigma_cap)
    dt_abs = sigma - sigma_next
    return dt_abs / 2 * (s * (1 - sigma) / (2 * sigma) + 1 / s) ** 2


# ----------------------------------------------------------------------------- one step


class SDEStep(NamedTuple):
    prev_sample: Tensor  # x_{t-dt}, same shape as x
    log_prob_B: Tensor  # log N(prev_sample; mean, std^2), summed or averaged over non-batch dims
    mean: Tensor  # same shape as x
    std_B: Tensor  # sigma_t sqrt(|dt|) per row


def sde_step_with_logprob(
    x: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float = 0.7,
    *,
    sigma_cap: float | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    logprob_reduce: LogprobReduce = "sum",
) -> SDEStep:
    """One Flow-GRPO SDE step from `x` ([B, ...]) with velocity `v` at `sigma` -> `sigma_next`.

    Samples x' (unless `prev_sample` is given, e.g. to re-score a rollout) and returns its
    log-prob under `N(mean, (sigma_t sqrt|dt|)^2)` per row.  Computed in at least float32.
    noise_level = 0 is diffusers' deterministic Euler step; there is no density then and
    the log-prob is returned as 0 (use it to evaluate, not to train).
    """
    _check_reduce(logprob_reduce)
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, v = x.to(dtype), v.to(dtype)
    B = x.shape[0]
    sigma_B = torch.as_tensor(sigma, dtype=dtype, device=x.device).expand(B)
    sigma_next_B = torch.as_tensor(sigma_next, dtype=dtype, device=x.device).expand(B)
    noise_scale_B = sde_noise_scale(sigma_B, noise_level, sigma_cap)
    mean = sde_mean(x, v, sigma_B, sigma_next_B, noise_scale_B)
    std_B = noise_scale_B * torch.sqrt(sigma_B - sigma_next_B)
    if prev_sample is None:
        if noise_level == 0:
            prev_sample = mean
        else:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)
            prev_sample = mean + _bc(std_B, x) * eps
    prev_sample = prev_sample.to(dtype)
    if noise_level == 0:
        return SDEStep(prev_sample, torch.zeros(B, dtype=dtype, device=x.device), mean, std_B)
    std = _bc(std_B, x)
    lp = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, lp.dim()))
    log_prob_B = lp.sum(dims) if logprob_reduce == "sum" else lp.mean(dims)
    return SDEStep(prev_sample, log_prob_B, mean, std_B)


# ----------------------------------------------------------------------------- rollouts


@dataclass
class FlowSteps:
    """What re-scoring a flow rollout needs, step t = 0 .. T-1 (batch-major, so `Rollout.select` slices it).

    x_t_B_T_D:        the state before each step, latents flattened to D = prod(latent_shape)
    sigma_B_T:        sigma at each step (the transformer sees sigma * num_train_timesteps)
    sigma_next_B_T:   sigma after each step
    latent_shape:     (C, H, W) of one latent
    cond:             the condition, batch-major (e.g. {"prompt_embeds": [B, L, E], ...})
    guidance_scale:   classifier-free guidance scale used when sampling (<= 1: no CFG)
    noise_level:      the SDE noise level a
    sigma_cap:        the sigma used in 1 - sigma where sigma == 1 (the schedule's second sigma)
    logprob_reduce:   "sum" or "mean" over D, the convention of `behavior_logp_B_T`
    """

    x_t_B_T_D: Tensor
    sigma_B_T: Tensor
    sigma_next_B_T: Tensor
    latent_shape: tuple[int, ...]
    cond: Any
    guidance_scale: float
    noise_level: float
    sigma_cap: float
    logprob_reduce: LogprobReduce = "sum"

    @property
    def dt_B_T(self) -> Tensor:
        """sigma_next - sigma (< 0)."""
        return self.sigma_next_B_T - self.sigma_B_T

    def noise_scale_B_T(self) -> Tensor:
        return sde_noise_scale(self.sigma_B_T, self.noise_level, self.sigma_cap)

    def std_B_T(self) -> Tensor:
        """The step Gaussian's standard deviation sigma_t sqrt(|dt|)."""
        return self.noise_scale_B_T() * torch.sqrt(self.sigma_B_T - self.sigma_next_B_T)

    def kl_weight_B_T(self) -> Tensor:
        """w(t) of every step (see `sde_step_kl_weight`)."""
        return sde_step_kl_weight(self.sigma_B_T, self.sigma_next_B_T, self.noise_level, self.sigma_cap)

    def x_t(self, t: int) -> Tensor:
        """The state before step t as `[B, *latent_shape]`."""
        return self.x_t_B_T_D[:, t].reshape(-1, *self.latent_shape)


def _check_sigmas(sigmas_T1: Tensor) -> None:
    if sigmas_T1.dim() != 1 or sigmas_T1.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with T + 1 >= 2 entries (last one 0); got shape {tuple(sigmas_T1.shape)}")
    if not bool((sigmas_T1[1:] < sigmas_T1[:-1]).all()) or float(sigmas_T1[0]) > 1 or float(sigmas_T1[-1]) < 0:
        raise ValueError(f"sigmas must decrease strictly inside [0, 1] (noise -> data); got {sigmas_T1.tolist()}")


@torch.no_grad()
def sample_sde(
    velocity_fn: VelocityFn,
    noise_B_C_H_W: Tensor,
    sigmas_T1: Tensor,
    cond: Any,
    *,
    guidance_scale: float = 1.0,
    noise_level: float = 0.7,
    logprob_reduce: LogprobReduce = "sum",
    generator: torch.Generator | None = None,
    context: Any = None,
) -> Rollout:
    """Run T = len(sigmas) - 1 SDE steps from `noise_B_C_H_W` (the state at sigmas[0]).

    `velocity_fn(x_t, sigma_B, cond, guidance_scale)` is any velocity model (CFG inside it).
    Returns a `Rollout`: `steps` a `FlowSteps`, `actions` x_{t-dt} per step `[B, T, D]`,
    `mask_B_T` ones, `behavior_logp_B_T` the step log-probs (0 when noise_level = 0),
    `extras["x0_B_C_H_W"]` the final clean sample.  noise_level = 0 reproduces diffusers'
    Euler ODE sampler step for step.
    """
    _check_reduce(logprob_reduce)
    sigmas_T1 = sigmas_T1.to(device=noise_B_C_H_W.device, dtype=torch.float32)
    _check_sigmas(sigmas_T1)
    B, latent_shape, T = noise_B_C_H_W.shape[0], tuple(noise_B_C_H_W.shape[1:]), sigmas_T1.numel() - 1
    sigma_cap = float(sigmas_T1[1])
    x = noise_B_C_H_W.to(torch.promote_types(noise_B_C_H_W.dtype, torch.float32))
    step_sigmas_T1 = sigmas_T1.to(x.dtype)  # SDE arithmetic in the state's dtype; the model sees float32 sigmas
    states, actions, logps = [], [], []
    for t in range(T):
        sigma_B = sigmas_T1[t].expand(B)
        v = velocity_fn(x, sigma_B, cond, guidance_scale)
        step = sde_step_with_logprob(
            x,
            v,
            step_sigmas_T1[t],
            step_sigmas_T1[t + 1],
            noise_level,
            sigma_cap=sigma_cap,
            generator=generator,
            logprob_reduce=logprob_reduce,
        )
        states.append(x.reshape(B, -1))
        actions.append(step.prev_sample.reshape(B, -1))
        logps.append(step.log_prob_B)
        x = step.prev_sample
    steps = FlowSteps(
        x_t_B_T_D=torch.stack(states, 1),
        sigma_B_T=step_sigmas_T1[:-1].expand(B, T).clone(),
        sigma_next_B_T=step_sigmas_T1[1:].expand(B, T).clone(),
        latent_shape=latent_shape,
        cond=cond,
        guidance_scale=float(guidance_scale),
        noise_level=float(noise_level),
        sigma_cap=sigma_cap,
        logprob_reduce=logprob_reduce,
    )
    return Rollout(
        context=context,
        steps=steps,
        actions=torch.stack(actions, 1),
        mask_B_T=torch.ones(B, T, device=x.device),
        behavior_logp_B_T=torch.stack(logps, 1),
        extras={"x0_B_C_H_W": x},
    )


# ----------------------------------------------------------------------------- re-scoring


def step_velocities(velocity_fn: VelocityFn, rollout: Rollout, guidance_scale: float | None = None) -> Tensor:
    """Velocities `[B, T, D]` of any model on the rollout's states (gradient flows if enabled).

    One call per denoising step; steps that no row trains (`mask_B_T[:, t]` all 0) are
    skipped and left 0.  `guidance_scale` defaults to the one used when sampling.
    """
    s: FlowSteps = rollout.steps
    B, T, D = s.x_t_B_T_D.shape
    g = s.guidance_scale if guidance_scale is None else float(guidance_scale)
    active = rollout.mask_B_T.detach().bool().any(0).tolist()
    vs = []
    for t in range(T):
        if not active[t]:
            vs.append(s.x_t_B_T_D.new_zeros(B, D))
            continue
        v = velocity_fn(s.x_t(t), s.sigma_B_T[:, t].float(), s.cond, g)  # float32 sigmas, as when sampling
        vs.append(v.reshape(B, D).to(s.x_t_B_T_D.dtype))
    return torch.stack(vs, 1)


def step_dists(rollout: Rollout, v_B_T_D: Tensor) -> Gaussian:
    """The SDE step distributions `N(mu(x_t, v), (sigma_t sqrt|dt|)^2)` as a `Gaussian` `[B, T, D]`."""
    s: FlowSteps = rollout.steps
    if s.noise_level <= 0:
        raise ValueError("step distributions need a stochastic rollout (noise_level > 0); this one was sampled with 0")
    if tuple(v_B_T_D.shape) != tuple(s.x_t_B_T_D.shape):
        raise ValueError(
            f"velocities must match the states [B, T, D]; got {tuple(v_B_T_D.shape)} vs {tuple(s.x_t_B_T_D.shape)}"
        )
    mean_B_T_D = sde_mean(s.x_t_B_T_D, v_B_T_D, s.sigma_B_T, s.sigma_next_B_T, s.noise_scale_B_T())
    return Gaussian(mean_B_T_D, s.std_B_T().unsqueeze(-1), rollout.mask_B_T)


def step_logp(dist: Gaussian, actions_B_T_D: Tensor, logprob_reduce: LogprobReduce) -> Tensor:
    """Log-probs `[B, T]` on a rollout's convention: `Gaussian.log_prob` sums over D; "mean" divides by D."""
    _check_reduce(logprob_reduce)
    lp_B_T = dist.log_prob(actions_B_T_D)
    return lp_B_T if logprob_reduce == "sum" else lp_B_T / actions_B_T_D.shape[-1]


def rescore(velocity_fn: VelocityFn, rollout: Rollout, guidance_scale: float | None = None) -> tuple[Gaussian, Tensor]:
    """`step_velocities` then `step_dists`: the model's step distributions and its velocities `[B, T, D]`."""
    v_B_T_D = step_velocities(velocity_fn, rollout, guidance_scale)
    return step_dists(rollout, v_B_T_D), v_B_T_D
