"""SDE sampling for flow models: schedules, the step's log-prob, w(t), rollouts, parity with diffusers.

python -m pytest tests/test_flow_sde.py -q -o addopts=""
"""

from __future__ import annotations

import math

import pytest
import torch

from mmdistill.sde import (
    FlowSteps,
    sample_sde,
    sde_mean,
    sde_noise_scale,
    sde_step_kl_weight,
    sde_step_with_logprob,
    sigma_schedule,
    step_dists,
    step_logp,
    step_velocities,
)
from mmdistill.stepdist import Gaussian

torch.set_num_threads(1)
diffusers = pytest.importorskip("diffusers")
A = 0.7  # noise level


class LinearVelocity(torch.nn.Module):
    """v = W x + b + sigma * c + (guidance - 1) * e: a tiny velocity model with parameters."""

    def __init__(self, D: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(0.3 * torch.randn(D, D, generator=g))
        self.b = torch.nn.Parameter(torch.randn(D, generator=g))
        self.c = torch.nn.Parameter(torch.randn(D, generator=g))
        self.e = torch.nn.Parameter(torch.randn(D, generator=g))

    def forward(self, x, sigma_B, cond, guidance_scale):
        B = x.shape[0]
        flat = x.reshape(B, -1)
        v = flat @ self.W.T + self.b + sigma_B[:, None] * self.c + (guidance_scale - 1) * self.e + cond["shift"]
        return v.reshape(x.shape)


def test_sigma_schedule_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        for n in (1, 4, 10, 28):
            sched = FlowMatchEulerDiscreteScheduler(shift=shift)
            sched.set_timesteps(n)
            assert torch.equal(sigma_schedule(n, shift=shift), sched.sigmas), (shift, n)


def test_sde_mean_is_the_flow_grpo_formula_and_log_prob_equals_normal():
    torch.manual_seed(0)
    B, C, H, W = 3, 2, 4, 4
    x, v = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)
    sigma = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    sigma_next = torch.tensor([0.8, 0.3, 0.0], dtype=torch.float64)
    a = 0.7
    out = sde_step_with_logprob(x, v, sigma, sigma_next, a, generator=torch.Generator().manual_seed(1))
    s = a * torch.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    for i in range(B):  # docs/objectives.md section 6, written out per row
        mu = (
            x[i] * (1 + s[i] ** 2 * dt[i] / (2 * sigma[i]))
            + v[i] * (1 + s[i] ** 2 * (1 - sigma[i]) / (2 * sigma[i])) * dt[i]
        )
        torch.testing.assert_close(out.mean[i], mu)
        normal = torch.distributions.Normal(mu, s[i] * torch.sqrt(-dt[i]))
        torch.testing.assert_close(out.log_prob_B[i], normal.log_prob(out.prev_sample[i]).sum())
    mean_lp = sde_step_with_logprob(
        x, v, sigma, sigma_next, a, prev_sample=out.prev_sample, logprob_reduce="mean"
    ).log_prob_B
    torch.testing.assert_close(mean_lp, out.log_prob_B / (C * H * W))


def test_one_step_matches_flow_grpos_sde_step_lines():
    """Flow-GRPO's diffusers_patch/sd3_sde_with_logprob.py (sde_type "sde"), restated in float64 on a batch whose
    first row sits at sigma = 1 (the reference puts sigmas[1] in 1 - sigma there): mean, std, log-prob averaged
    over the non-batch dims."""
    g = torch.Generator().manual_seed(5)
    sigmas = sigma_schedule(10, shift=3.0).double()
    idx = torch.tensor([0, 3, 8, 9])
    sigma, sigma_next, cap = sigmas[idx], sigmas[idx + 1], float(sigmas[1])
    x, v = (
        torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64),
    )
    prev = x + 0.2 * torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    sig, sig_next = sigma.reshape(-1, 1, 1, 1), sigma_next.reshape(-1, 1, 1, 1)
    dt = sig_next - sig
    std_dev_t = A * torch.sqrt(sig / (1 - torch.where(sig == 1, torch.full_like(sig, cap), sig)))
    mean = x * (1 + std_dev_t**2 / (2 * sig) * dt) + v * (1 + std_dev_t**2 * (1 - sig) / (2 * sig)) * dt
    scale = std_dev_t * torch.sqrt(-dt)
    lp = (-((prev - mean) ** 2) / (2 * scale**2) - torch.log(scale) - math.log(math.sqrt(2 * math.pi))).mean(
        dim=(1, 2, 3)
    )
    ours = sde_step_with_logprob(x, v, sigma, sigma_next, A, sigma_cap=cap, prev_sample=prev, logprob_reduce="mean")
    torch.testing.assert_close(ours.mean, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.std_B, scale.reshape(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.log_prob_B, lp, rtol=0, atol=1e-6)


def test_sampled_step_has_the_stated_std():
    x = torch.zeros(2, 20000, dtype=torch.float64)
    out = sde_step_with_logprob(x, torch.ones_like(x), 0.6, 0.4, 0.7, generator=torch.Generator().manual_seed(0))
    expected = 0.7 * math.sqrt(0.6 / 0.4) * math.sqrt(0.2)
    torch.testing.assert_close(out.std_B, torch.full((2,), expected, dtype=torch.float64))
    emp = (out.prev_sample - out.mean).std(1)
    assert torch.allclose(emp, out.std_B, rtol=0.03), (emp, out.std_B)


def test_sigma_one_uses_the_cap_like_flow_grpo():
    with pytest.raises(ValueError, match="sigma_cap"):
        sde_noise_scale(torch.tensor([1.0]), 0.7)
    s = sde_noise_scale(torch.tensor([1.0, 0.5]), 0.7, sigma_cap=0.9)
    torch.testing.assert_close(s, torch.tensor([0.7 * math.sqrt(1.0 / 0.1), 0.7]))


def test_noise_level_zero_is_the_diffusers_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    sigmas = sigma_schedule(6, shift=3.0)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5)
    ours = x.clone()
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 4, 5, 5)
        x = sched.step(v, t, x, return_dict=False)[0]
        out = sde_step_with_logprob(ours, v, sigmas[i], sigmas[i + 1], 0.0, sigma_cap=float(sigmas[1]))
        ours = out.prev_sample
        assert torch.equal(ours, x), f"step {i}: max diff {(ours - x).abs().max()}"
        assert torch.equal(out.log_prob_B, torch.zeros(2))


def test_noise_level_zero_rollout_reproduces_diffusers_sd3_pipeline_step_for_step():
    from mmdistill.modalities.flow.pipelines import (
        build_tiny_sd3_pipeline,
        encode_prompts,
        scheduler_sigmas,
        velocity_fn,
    )

    pipe = build_tiny_sd3_pipeline(["a", "red", "circle"], image_size=16, vae=True, num_layers=1, shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a circle"]
    cond = encode_prompts(pipe, prompts, max_sequence_length=8)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def keep(p, i, t, kw):
        seen.append(kw["latents"].clone())
        return kw

    pipe(
        prompt_embeds=cond["prompt_embeds"],
        pooled_prompt_embeds=cond["pooled_prompt_embeds"],
        negative_prompt_embeds=cond["negative_prompt_embeds"],
        negative_pooled_prompt_embeds=cond["negative_pooled_prompt_embeds"],
        latents=noise.clone(),
        num_inference_steps=3,
        guidance_scale=3.0,
        height=16,
        width=16,
        output_type="latent",
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    r = sample_sde(
        velocity_fn(pipe.transformer),
        noise,
        scheduler_sigmas(pipe.scheduler, 3),
        cond,
        guidance_scale=3.0,
        noise_level=0.0,
    )
    assert len(seen) == 3 and r.actions.shape == (2, 3, 4 * 8 * 8)
    for t in range(3):
        torch.testing.assert_close(r.actions[:, t], seen[t].reshape(2, -1), rtol=0, atol=1e-6, msg=f"step {t}")
    assert r.steps.guidance_scale == 3.0 and r.steps.cond is cond


def test_step_kl_closed_form_matches_monte_carlo():
    """KL(student step || teacher step) at one state: w(t) ||v_s - v_t||^2 and Gaussian.kl agree
    with the sample mean of log p_s(x') - log p_t(x') over x' drawn by the student's SDE step."""
    torch.manual_seed(0)
    N, D, sigma, sigma_next = 100_000, 3, 0.7, 0.55
    x = torch.randn(1, D, dtype=torch.float64).expand(N, D)
    v_s = torch.randn(1, D, dtype=torch.float64).expand(N, D)
    v_t = v_s + 0.5 * torch.randn(1, D, dtype=torch.float64)
    student = sde_step_with_logprob(x, v_s, sigma, sigma_next, A, generator=torch.Generator().manual_seed(1))
    teacher = sde_step_with_logprob(x, v_t, sigma, sigma_next, A, prev_sample=student.prev_sample)
    samples = student.log_prob_B - teacher.log_prob_B
    mc, se = samples.mean(), samples.std() / math.sqrt(N)
    closed = (
        sde_step_kl_weight(torch.tensor(sigma, dtype=torch.float64), sigma_next, A) * (v_s[0] - v_t[0]).square().sum()
    )
    assert abs(float(mc - closed)) < 5 * float(se), (float(mc), float(closed), float(se))
    std = student.std_B[:1].reshape(1, 1, 1)
    one = torch.ones(1, 1, dtype=torch.float64)
    kl = Gaussian(student.mean[:1, None], std, one).kl(Gaussian(teacher.mean[:1, None], std, one))[0, 0]
    torch.testing.assert_close(kl, closed, rtol=1e-10, atol=0)


@pytest.mark.parametrize("include_sigma_one", [False, True])
def test_kl_weight_identity_for_random_states(include_sigma_one):
    g = torch.Generator().manual_seed(3)
    B, T, D = 4, 5, 7
    sig = torch.sort(
        torch.rand(B, T + 1, generator=g, dtype=torch.float64) * 0.98 + 0.01, dim=1, descending=True
    ).values
    if include_sigma_one:
        sig[:, 0] = 1.0
    sigma, sigma_next = sig[:, :-1], sig[:, 1:]
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    v1, v2 = (
        torch.randn(B, T, D, generator=g, dtype=torch.float64),
        torch.randn(B, T, D, generator=g, dtype=torch.float64),
    )
    a, cap = 0.7, 0.95
    s = sde_noise_scale(sigma, a, cap)
    std = (s * torch.sqrt(sigma - sigma_next)).unsqueeze(-1)
    mask = torch.ones(B, T, dtype=torch.float64)
    kl = Gaussian(sde_mean(x, v1, sigma, sigma_next, s), std, mask).kl(
        Gaussian(sde_mean(x, v2, sigma, sigma_next, s), std, mask)
    )
    w = sde_step_kl_weight(sigma, sigma_next, a, cap)
    torch.testing.assert_close(w * (v1 - v2).square().sum(-1), kl, rtol=1e-10, atol=1e-12)


def _toy_rollout(noise_level=0.7, logprob_reduce="sum", guidance=2.0, seed=0):
    model = LinearVelocity(2 * 3 * 3, seed=seed).double()
    noise = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cond = {"shift": torch.randn(4, 18, generator=torch.Generator().manual_seed(9), dtype=torch.float64)}
    r = sample_sde(
        model,
        noise,
        sigma_schedule(5, shift=3.0).double(),
        cond,
        guidance_scale=guidance,
        noise_level=noise_level,
        logprob_reduce=logprob_reduce,
        generator=torch.Generator().manual_seed(seed + 1),
        context=["p0", "p1", "p2", "p3"],
    )
    return model, r


@pytest.mark.parametrize("logprob_reduce", ["sum", "mean"])
def test_rollout_layout_and_rescoring_reproduces_behavior_logp(logprob_reduce):
    model, r = _toy_rollout(logprob_reduce=logprob_reduce)
    s: FlowSteps = r.steps
    assert r.actions.shape == (4, 5, 18) and s.x_t_B_T_D.shape == (4, 5, 18) and r.behavior_logp_B_T.shape == (4, 5)
    assert torch.equal(s.x_t_B_T_D[:, 1:], r.actions[:, :-1]), "x_t of step t+1 is the action of step t"
    assert torch.equal(r.extras["x0_B_C_H_W"].reshape(4, -1), r.actions[:, -1])
    assert s.latent_shape == (2, 3, 3) and s.guidance_scale == 2.0 and s.logprob_reduce == logprob_reduce
    assert bool((s.dt_B_T < 0).all())
    v = step_velocities(model, r)
    dist = step_dists(r, v)
    assert isinstance(dist, Gaussian) and dist.mean_B_T_D.shape == (4, 5, 18)
    torch.testing.assert_close(step_logp(dist, r.actions, logprob_reduce), r.behavior_logp_B_T, rtol=1e-10, atol=1e-10)
    # the guidance scale matters, and re-scoring uses the recorded one by default
    other = step_logp(step_dists(r, step_velocities(model, r, guidance_scale=1.0)), r.actions, logprob_reduce)
    assert not torch.allclose(other, r.behavior_logp_B_T)
    # micro-batches slice every batch-major field consistently
    mb = r.select(slice(1, 3))
    assert (
        mb.context == ["p1", "p2"]
        and mb.steps.x_t_B_T_D.shape == (2, 5, 18)
        and mb.steps.cond["shift"].shape == (2, 18)
    )
    torch.testing.assert_close(
        step_logp(step_dists(mb, step_velocities(model, mb)), mb.actions, logprob_reduce), r.behavior_logp_B_T[1:3]
    )


def test_rescoring_carries_gradient_and_skips_masked_steps():
    model, r = _toy_rollout()
    r.mask_B_T[:, 0] = 0
    calls = []

    def counting(x, sigma, cond, g):
        calls.append(float(sigma[0]))
        return model(x, sigma, cond, g)

    v = step_velocities(counting, r)
    assert len(calls) == 4 and torch.equal(v[:, 0], torch.zeros_like(v[:, 0]))
    step_logp(step_dists(r, v), r.actions, "sum").sum().backward()
    assert model.W.grad is not None and model.W.grad.abs().sum() > 0


def test_deterministic_rollout_has_no_step_distribution():
    model, r = _toy_rollout(noise_level=0.0)
    assert torch.equal(r.behavior_logp_B_T, torch.zeros(4, 5))
    with pytest.raises(ValueError, match="noise_level"):
        step_dists(r, step_velocities(model, r))
