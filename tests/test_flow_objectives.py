"""Flow-GRPO and Flow-OPD objectives: rewards, w(t) scalings, routing, MAR, and one step on a saved tiny SD3 pipeline.

    python -m pytest tests/test_flow_objectives.py -q -o addopts=""
"""
from __future__ import annotations

import pytest
import torch

from mmdistill.modalities.flow.sde import sde_mean, sde_noise_scale, sde_step_kl_weight, step_dists, step_logp, step_velocities
from mmdistill.objectives.flow_grpo import flow_grpo_kl, flow_grpo_loss, step_velocity_kl
from mmdistill.objectives.flow_opd import (
    dense_reward,
    flow_opd_loss,
    manifold_anchor_loss,
    one_hot_alpha,
    route_velocity,
    velocity_distance,
)
from mmdistill.stepdist import Gaussian

torch.set_num_threads(1)
A = 0.7  # noise level


def _steps(B=3, T=4, D=5, seed=0):
    """Random states, velocities and a valid schedule in float64 (sigma, sigma_next, w, dt, mask)."""
    g = torch.Generator().manual_seed(seed)
    sig = torch.sort(torch.rand(B, T + 1, generator=g, dtype=torch.float64) * 0.9 + 0.05, dim=1, descending=True).values
    sigma, sigma_next = sig[:, :-1], sig[:, 1:]
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    v1, v2 = torch.randn(B, T, D, generator=g, dtype=torch.float64), torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = sde_step_kl_weight(sigma, sigma_next, A)
    return x, v1, v2, sigma, sigma_next, w, sigma_next - sigma, torch.ones(B, T, dtype=torch.float64)


def _gaussian(x, v, sigma, sigma_next, mask):
    s = sde_noise_scale(sigma, A)
    return Gaussian(sde_mean(x, v, sigma, sigma_next, s), (s * torch.sqrt(sigma - sigma_next)).unsqueeze(-1), mask)


# ----------------------------------------------------------------------------- Flow-OPD


@pytest.mark.parametrize("reward_scale", ["paper", "code"])
def test_equal_velocities_give_zero_reward_and_zero_gkd_gradient(reward_scale):
    x, v, _, sigma, sigma_next, w, dt, mask = _steps()
    assert torch.equal(dense_reward(v, v.clone(), w, dt, mask, reward_scale), torch.zeros_like(w))
    v_student = v.clone().requires_grad_(True)
    loss, metrics = flow_opd_loss(None, None, v_student, v.clone(), w, dt, mask, variant="gkd", reward_scale=reward_scale)
    loss.backward()
    assert float(loss.detach()) == 0.0 and metrics["reward"] == 0.0 and metrics["velocity_mse"] == 0.0
    assert torch.equal(v_student.grad, torch.zeros_like(v))


def test_different_velocities_give_negative_reward_only_where_kept():
    x, v1, v2, sigma, sigma_next, w, dt, mask = _steps()
    mask[0, 1] = 0
    r = dense_reward(v1, v2, w, dt, mask)
    assert r[0, 1] == 0 and bool((r[mask.bool()] < 0).all())


def test_paper_distance_is_the_step_kl_and_code_distance_drops_dt_and_averages():
    x, v1, v2, sigma, sigma_next, w, dt, mask = _steps()
    kl = _gaussian(x, v1, sigma, sigma_next, mask).kl(_gaussian(x, v2, sigma, sigma_next, mask))
    torch.testing.assert_close(velocity_distance(v1, v2, w, dt, "paper"), kl, rtol=1e-10, atol=1e-12)
    s = sde_noise_scale(sigma, A)
    code = 0.5 * (s * (1 - sigma) / (2 * sigma) + 1 / s) ** 2 * (v1 - v2).square().mean(-1)
    torch.testing.assert_close(velocity_distance(v1, v2, w, dt, "code"), code, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="reward_scale"):
        velocity_distance(v1, v2, w, dt, "both")


def test_one_hot_routing_picks_the_prompts_teacher():
    _, v1, v2, *_ = _steps(B=4)
    v3 = -v1
    stacked = torch.stack([v1, v2, v3])
    task_ids = torch.tensor([2, 0, 1, 0])
    routed = route_velocity(stacked, one_hot_alpha(task_ids, 3))
    for b, k in enumerate(task_ids.tolist()):
        assert torch.equal(routed[b], stacked[k, b]), (b, k)
    mix = route_velocity(stacked, torch.tensor([[0.25, 0.75, 0.0]] * 4))
    torch.testing.assert_close(mix, 0.25 * v1 + 0.75 * v2)
    with pytest.raises(ValueError, match="task ids"):
        one_hot_alpha(torch.tensor([3]), 3)


def test_gkd_gradient_is_the_gradient_of_the_step_reverse_kl():
    x, v1, v2, sigma, sigma_next, w, dt, mask = _steps()
    a = v1.clone().requires_grad_(True)
    loss, _ = flow_opd_loss(None, None, a, v2, w, dt, mask, variant="gkd")
    loss.backward()
    b = v1.clone().requires_grad_(True)
    kl = _gaussian(x, b, sigma, sigma_next, mask).kl(_gaussian(x, v2, sigma, sigma_next, mask))
    (kl.sum() / mask.sum()).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_clipped_variant_uses_the_dense_reward_as_advantage(gamma):
    x, v1, v2, sigma, sigma_next, w, dt, mask = _steps()
    logp = torch.randn_like(w).requires_grad_(True)
    loss, metrics = flow_opd_loss(logp, logp.detach(), v1, v2, w, dt, mask, variant="clipped", coef=2.0, gamma=gamma)
    loss.backward()
    r = -2.0 * w * (v1 - v2).square().sum(-1)
    adv = r if gamma == 0.0 else r.flip(1).cumsum(1).flip(1)  # reward-to-go
    torch.testing.assert_close(logp.grad, -adv / mask.sum())  # ratio 1: d/dlogp of -rho*A is -A
    torch.testing.assert_close(torch.tensor(metrics["reward"], dtype=torch.float64), (r / 2).mean())


def test_mar_pulls_the_student_towards_the_anchor_only():
    x, v1, v2, sigma, sigma_next, w, dt, mask = _steps()
    v_anchor = torch.randn_like(v1)
    student = v1.clone().requires_grad_(True)
    target = v2.clone().requires_grad_(True)
    anchor = v_anchor.clone().requires_grad_(True)
    logp = torch.zeros_like(w, requires_grad=True)
    loss, metrics = flow_opd_loss(logp, logp.detach(), student, target, w, dt, mask, v_anchor_B_T_D=anchor, mar_coef=0.5)
    base, _ = flow_opd_loss(logp, logp.detach(), v1, v2, w, dt, mask)
    mar = manifold_anchor_loss(v1, v_anchor, w, dt, mask)
    torch.testing.assert_close(loss.detach(), base.detach() + 0.5 * mar)
    assert metrics["mar"] == pytest.approx(float(mar))
    loss.backward()
    torch.testing.assert_close(student.grad, 0.5 * 2 * w.unsqueeze(-1) * (v1 - v_anchor) / mask.sum())
    assert target.grad is None and anchor.grad is None


# ----------------------------------------------------------------------------- Flow-GRPO


def test_flow_grpo_code_kl_is_flow_grpos_mean_formula():
    x, v1, v2, sigma, sigma_next, w, dt, mask = _steps()
    s = sde_noise_scale(sigma, A)
    mu1, mu2 = sde_mean(x, v1, sigma, sigma_next, s), sde_mean(x, v2, sigma, sigma_next, s)
    reference = (mu1 - mu2).square().mean(-1) / (2 * s**2)  # Flow-GRPO train_sd3.py
    torch.testing.assert_close(flow_grpo_kl(v1, v2, w, dt, "code"), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flow_grpo_kl(v1, v2, w, dt, "paper"), step_velocity_kl(v1, v2, w))


def test_flow_grpo_loss_clips_advantages_and_adds_the_kl():
    x, v1, v2, sigma, sigma_next, w, dt, mask = _steps()
    logp = torch.randn_like(w).requires_grad_(True)
    student = v1.clone().requires_grad_(True)
    adv = torch.tensor([10.0, -1.0, 0.5], dtype=torch.float64)
    kl = flow_grpo_kl(student, v2, w, dt)
    loss, metrics = flow_grpo_loss(logp, logp.detach(), adv, mask, kl_B_T=kl, kl_beta=0.04, adv_clip_max=5.0)
    clipped = torch.tensor([5.0, -1.0, 0.5], dtype=torch.float64)
    expected = -clipped.mean() + 0.04 * kl.detach().mean()  # ratio 1
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    torch.testing.assert_close(logp.grad, -clipped[:, None].expand_as(w) / mask.sum())
    assert student.grad.abs().sum() > 0 and metrics["kl"] == pytest.approx(float(kl.detach().mean()))


# ----------------------------------------------------------------------------- tiny SD3 end to end


def test_saved_tiny_sd3_pipeline_loads_back_and_runs_one_flow_opd_step(tmp_path):
    pytest.importorskip("diffusers")
    from mmdistill.modalities.flow.pipelines import (
        build_tiny_sd3_pipeline,
        decode_latents,
        encode_images,
        load_pipeline,
        sample_pipeline,
        save_pipeline,
        velocity_fn,
    )

    words = ["a", "red", "circle", "blue", "square"]
    built = build_tiny_sd3_pipeline(words, image_size=16, vae=True, num_layers=1, seed=0)
    save_pipeline(built, tmp_path / "student")
    student = load_pipeline(tmp_path / "student")
    assert type(student).__name__ == "StableDiffusion3Pipeline" and student.text_encoder_3 is None
    for (name, p), (_, q) in zip(built.transformer.state_dict().items(), student.transformer.state_dict().items()):
        assert torch.equal(p, q), name
    assert student.tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
    teacher = build_tiny_sd3_pipeline(words, image_size=16, vae=True, num_layers=1, seed=7).transformer.requires_grad_(False)
    anchor = build_tiny_sd3_pipeline(words, image_size=16, vae=True, num_layers=1, seed=8).transformer.requires_grad_(False)

    rollout = sample_pipeline(
        student, ["a red circle", "a blue square"], image_size=16, num_steps=3, guidance_scale=2.0,
        max_sequence_length=4, generator=torch.Generator().manual_seed(0),
    )
    images = decode_latents(student, rollout.extras["x0_B_C_H_W"])
    assert images.shape == (2, 3, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert encode_images(student, images).shape == (2, 4, 8, 8)

    s = rollout.steps
    v_student = step_velocities(velocity_fn(student.transformer), rollout)
    logp = step_logp(step_dists(rollout, v_student), rollout.actions, s.logprob_reduce)
    torch.testing.assert_close(logp.detach(), rollout.behavior_logp_B_T, rtol=1e-6, atol=1e-4)  # ratio 1 on-policy
    with torch.no_grad():
        v_teacher = step_velocities(velocity_fn(teacher), rollout)
        v_anchor = step_velocities(velocity_fn(anchor), rollout)
    loss, metrics = flow_opd_loss(
        logp, rollout.behavior_logp_B_T, v_student, v_teacher, s.kl_weight_B_T(), s.dt_B_T, rollout.mask_B_T,
        v_anchor_B_T_D=v_anchor,
    )
    assert metrics["reward"] < 0 and metrics["mar"] > 0
    opt = torch.optim.SGD(student.transformer.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in student.transformer.parameters()]
    loss.backward()
    opt.step()
    changed = sum(not torch.equal(b, p) for b, p in zip(before, student.transformer.parameters()))
    assert changed > 0, "one Flow-OPD step must update the student transformer"


def test_pixel_space_pipeline_saves_loads_and_samples_with_plain_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    from mmdistill.modalities.flow.pipelines import (
        build_tiny_sd3_pipeline,
        decode_latents,
        encode_images,
        encode_prompts,
        latent_shape,
        load_pipeline,
        save_pipeline,
        scheduler_sigmas,
        velocity_fn,
    )
    from mmdistill.modalities.flow.sde import sample_sde

    save_pipeline(build_tiny_sd3_pipeline(["a", "red", "circle"], image_size=8, vae=False, num_layers=1), tmp_path / "p")
    pipe = load_pipeline(tmp_path / "p")
    assert pipe.vae is None and latent_shape(pipe, 8) == (3, 8, 8)
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(decode_latents(pipe, encode_images(pipe, images)), images)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode_prompts(pipe, ["a red circle", "a circle"], max_sequence_length=4)
    ours = sample_sde(velocity_fn(pipe.transformer), noise, scheduler_sigmas(pipe.scheduler, 2), cond, noise_level=0.0)
    # a diffusers user with no mmdistill: pass the initial noise; without a VAE the pipeline assumes a factor of 8
    theirs = pipe(
        prompt=["a red circle", "a circle"], latents=noise.clone(), num_inference_steps=2, guidance_scale=1.0,
        height=8 * 8, width=8 * 8, output_type="latent", max_sequence_length=4,
    ).images
    torch.testing.assert_close(ours.extras["x0_B_C_H_W"], theirs, rtol=0, atol=1e-6)
