"""Flow matching, Flow-GRPO and Flow-OPD: rewards, w(t) scalings, the authors' reference formulas, the
objective classes on the contract, and one step on a saved tiny SD3 pipeline.

    python -m pytest tests/test_flow_objectives.py -q -o addopts=""
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from mmdistill.interfaces import ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.modalities.flow.adapter import one_hot_alpha, route_velocity
from mmdistill.objectives.flow_grpo import FlowGRPO, flow_grpo_kl, flow_grpo_loss, step_velocity_kl, train_timesteps
from mmdistill.objectives.flow_matching import FlowMatching, flow_matching_loss
from mmdistill.objectives.flow_opd import FlowOPD, dense_reward, flow_opd_loss, manifold_anchor_loss, velocity_distance
from mmdistill.sde import (
    FlowSteps,
    sde_mean,
    sde_noise_scale,
    sde_step_kl_weight,
    sigma_schedule,
    step_dists,
    step_logp,
    step_velocities,
)
from mmdistill.stepdist import Gaussian, VelocityStepDist

torch.set_num_threads(1)
A = 0.7  # noise level


def _steps(B=3, T=4, D=5, seed=0):
    """Random states, velocities and a valid schedule in float64 (sigma, sigma_next, w, dt, mask)."""
    g = torch.Generator().manual_seed(seed)
    sig = torch.sort(torch.rand(B, T + 1, generator=g, dtype=torch.float64) * 0.9 + 0.05, dim=1, descending=True).values
    sigma, sigma_next = sig[:, :-1], sig[:, 1:]
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    v1, v2 = (
        torch.randn(B, T, D, generator=g, dtype=torch.float64),
        torch.randn(B, T, D, generator=g, dtype=torch.float64),
    )
    w = sde_step_kl_weight(sigma, sigma_next, A)
    return x, v1, v2, sigma, sigma_next, w, sigma_next - sigma, torch.ones(B, T, dtype=torch.float64)


def _gaussian(x, v, sigma, sigma_next, mask):
    s = sde_noise_scale(sigma, A)
    return Gaussian(sde_mean(x, v, sigma, sigma_next, s), (s * torch.sqrt(sigma - sigma_next)).unsqueeze(-1), mask)


# ----------------------------------------------------------------------------- the authors' code, restated
# Flow-GRPO (yifan123/flow_grpo) diffusers_patch/sd3_sde_with_logprob.py and scripts/train_sd3.py, and
# Flow-OPD (CostaliyA/Flow-OPD) scripts/train_sd3_opd_mix.py (reward_mode "kl_only", kl_scale -1), written
# out step by step on latents [B, C, H, W]; nothing of ours is used on this side.


def reference_step(x, v, sigma_B, sigma_next_B, sigma_max, a, prev_sample):
    """One SDE step as the reference writes it: (log-prob averaged over the non-batch dims, mean, std_dev_t)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    sig, sig_next = sigma_B.reshape(shape), sigma_next_B.reshape(shape)
    dt = sig_next - sig
    capped = torch.where(sig == 1, torch.full_like(sig, sigma_max), sig)
    std_dev_t = a * torch.sqrt(sig / (1 - capped))
    mean = x * (1 + std_dev_t**2 / (2 * sig) * dt) + v * (1 + std_dev_t**2 * (1 - sig) / (2 * sig)) * dt
    scale = std_dev_t * torch.sqrt(-dt)
    lp = -((prev_sample - mean) ** 2) / (2 * scale**2) - torch.log(scale) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=tuple(range(1, lp.dim()))), mean, std_dev_t


def reference_kl(mean, mean_other, std_dev_t):
    """Flow-GRPO's kl_loss and Flow-OPD's kl_reward per row: mean over dims of (mean gap)^2, over 2 std_dev_t^2."""
    return ((mean - mean_other) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * std_dev_t.reshape(-1) ** 2)


def reference_policy_loss(advantage_B, log_prob_B, old_log_prob_B, clip_range):
    """PPO-clipped loss of one timestep as the reference writes it (mean over the batch)."""
    ratio = torch.exp(log_prob_B - old_log_prob_B)
    return torch.mean(
        torch.maximum(-advantage_B * ratio, -advantage_B * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))
    )


def _reference_inputs(B=4, T=10, C=2, H=3, W=3, seed=0):
    """Float64 latents on a 10-step shift-3 schedule (sigma 1 first), student / teacher / anchor velocities
    (the teacher far enough away that some advantages exceed +-5), sampled next states and old log-probs."""
    g = torch.Generator().manual_seed(seed)
    sigmas = sigma_schedule(T, shift=3.0).double()
    x = torch.randn(B, T, C, H, W, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, C, H, W, generator=g, dtype=torch.float64)
    v_teacher = v + 6.0 * torch.randn(B, T, C, H, W, generator=g, dtype=torch.float64)
    v_anchor = v + torch.randn(B, T, C, H, W, generator=g, dtype=torch.float64)
    prev = x + 0.3 * torch.randn(B, T, C, H, W, generator=g, dtype=torch.float64)
    old_logp_shift = 1e-4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios on both sides of the clip
    return sigmas, x, v, v_teacher, v_anchor, prev, old_logp_shift


def _our_rollout(sigmas, x, prev, behavior_logp_B_T, logprob_reduce="mean"):
    B, T = x.shape[:2]
    steps = FlowSteps(
        x_t_B_T_D=x.reshape(B, T, -1),
        sigma_B_T=sigmas[:-1].expand(B, T).clone(),
        sigma_next_B_T=sigmas[1:].expand(B, T).clone(),
        latent_shape=tuple(x.shape[2:]),
        cond=None,
        guidance_scale=1.0,
        noise_level=A,
        sigma_cap=float(sigmas[1]),
        logprob_reduce=logprob_reduce,
    )
    return Rollout(
        context=None,
        steps=steps,
        actions=prev.reshape(B, T, -1),
        mask_B_T=torch.ones(B, T, dtype=x.dtype),
        behavior_logp_B_T=behavior_logp_B_T,
    )


def _our_dist(rollout, v):
    """What `FlowAdapter.step_dist` returns for velocities `v` `[B, T, C, H, W]`."""
    s = rollout.steps
    v_B_T_D = v.reshape(*rollout.actions.shape)
    return VelocityStepDist(
        v_B_T_D, step_dists(rollout, v_B_T_D), s.kl_weight_B_T(), s.dt_B_T, rollout.mask_B_T, s.logprob_reduce
    )


def test_step_log_prob_mean_and_kl_match_the_reference_lines():
    sigmas, x, v, v_teacher, _, prev, _ = _reference_inputs()
    B, T = x.shape[:2]
    r = _our_rollout(sigmas, x, prev, torch.zeros(B, T, dtype=torch.float64))
    ours, teacher = _our_dist(r, v), _our_dist(r, v_teacher)
    for t in range(T):
        lp, mean, std_dev_t = reference_step(
            x[:, t], v[:, t], sigmas[t].expand(B), sigmas[t + 1].expand(B), float(sigmas[1]), A, prev[:, t]
        )
        _, mean_teacher, _ = reference_step(
            x[:, t], v_teacher[:, t], sigmas[t].expand(B), sigmas[t + 1].expand(B), float(sigmas[1]), A, prev[:, t]
        )
        torch.testing.assert_close(ours.gaussian.mean_B_T_D[:, t], mean.reshape(B, -1), rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.log_prob(r.actions)[:, t], lp, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            r.steps.std_B_T()[:, t], std_dev_t.reshape(-1) * torch.sqrt(sigmas[t] - sigmas[t + 1]), rtol=0, atol=1e-6
        )
        kl = reference_kl(mean, mean_teacher, std_dev_t)
        torch.testing.assert_close(
            flow_grpo_kl(v.reshape(B, T, -1), v_teacher.reshape(B, T, -1), ours.kl_weight_B_T, ours.dt_B_T, "code")[
                :, t
            ],
            kl,
            rtol=0,
            atol=1e-6,
        )
        torch.testing.assert_close(
            velocity_distance(ours.velocity_B_T_D, teacher.velocity_B_T_D, ours.kl_weight_B_T, ours.dt_B_T, "code")[
                :, t
            ],
            kl,
            rtol=0,
            atol=1e-6,
        )


def test_flow_opd_clipped_code_scale_is_the_reference_kl_only_loss():
    """FlowOPD(variant clipped, reward_scale code, gamma 0, adv_clip_max 5) on our step distributions gives
    the reference's loss value: advantages -kl_reward clamped to +-5, clip 1e-4, plus beta 0.04 kl_loss to the
    anchor, averaged over the batch and the trained timesteps."""
    sigmas, x, v, v_teacher, v_anchor, prev, shift = _reference_inputs()
    B, T = x.shape[:2]
    fraction, beta, clip_range = 0.99, 0.04, 1e-4
    n_train = int(T * fraction)  # the reference's num_train_timesteps: 9 of 10
    per_step, clamped = [], 0
    old_lp = torch.zeros(B, T, dtype=torch.float64)
    for t in range(T):
        lp, mean, std_dev_t = reference_step(
            x[:, t], v[:, t], sigmas[t].expand(B), sigmas[t + 1].expand(B), float(sigmas[1]), A, prev[:, t]
        )
        old_lp[:, t] = lp.detach() + shift[:, t]
        if t >= n_train:
            continue
        _, mean_teacher, _ = reference_step(
            x[:, t], v_teacher[:, t], sigmas[t].expand(B), sigmas[t + 1].expand(B), float(sigmas[1]), A, prev[:, t]
        )
        _, mean_anchor, _ = reference_step(
            x[:, t], v_anchor[:, t], sigmas[t].expand(B), sigmas[t + 1].expand(B), float(sigmas[1]), A, prev[:, t]
        )
        advantage = -1 * reference_kl(mean, mean_teacher, std_dev_t)  # kl_scale = -1
        clamped += int((advantage.abs() > 5).sum())
        advantage = torch.clamp(advantage, -5, 5)
        per_step.append(
            reference_policy_loss(advantage, lp, old_lp[:, t], clip_range)
            + beta * reference_kl(mean, mean_anchor, std_dev_t).mean()
        )
    reference = torch.stack(per_step).mean()  # gradient accumulation over timesteps and micro-batches
    assert clamped > 0, "the inputs must exercise the +-5 clamp"

    objective = FlowOPD(
        variant="clipped",
        reward_scale="code",
        gamma=0.0,
        clip_eps=clip_range,
        mar_coef=beta,
        timestep_fraction=fraction,
        adv_clip_max=5.0,
    )
    rollout = objective.prepare(_our_rollout(sigmas, x, prev, old_lp))
    assert rollout.mask_B_T.sum(1).tolist() == [n_train] * B
    batch = ObjectiveBatch(
        rollout,
        _our_dist(rollout, v),
        _our_dist(rollout, v_teacher),
        None,
        float(rollout.num_steps()),
        _our_dist(rollout, v_anchor),
    )
    loss, metrics = objective(batch)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
    assert metrics["mar"] > 0 and metrics["reward"] < 0


def test_flow_grpo_default_is_the_reference_loss_with_its_kl():
    sigmas, x, v, _, v_ref, prev, shift = _reference_inputs(seed=1)
    B, T = x.shape[:2]
    advantage_B = torch.tensor([7.0, -1.0, 0.5, -6.0], dtype=torch.float64)
    old_lp = torch.zeros(B, T, dtype=torch.float64)
    per_step = []
    for t in range(T):
        lp, mean, std_dev_t = reference_step(
            x[:, t], v[:, t], sigmas[t].expand(B), sigmas[t + 1].expand(B), float(sigmas[1]), A, prev[:, t]
        )
        _, mean_ref, _ = reference_step(
            x[:, t], v_ref[:, t], sigmas[t].expand(B), sigmas[t + 1].expand(B), float(sigmas[1]), A, prev[:, t]
        )
        old_lp[:, t] = lp + shift[:, t]
        per_step.append(
            reference_policy_loss(advantage_B.clamp(-5, 5), lp, old_lp[:, t], 1e-4)
            + 0.04 * reference_kl(mean, mean_ref, std_dev_t).mean()
        )
    reference = torch.stack(per_step).mean()
    objective = FlowGRPO()  # defaults: clip 1e-4, kl_beta 0.04, kl_form code, adv_clip_max 5
    assert objective.kl_form == "code" and objective.needs.reference and objective.needs.sampled_actions
    rollout = _our_rollout(sigmas, x, prev, old_lp)
    rollout = replace(
        rollout, rewards_B=torch.zeros(B), extras={"advantage_B": advantage_B}
    )  # the reference's advantages
    loss, metrics = objective(
        ObjectiveBatch(rollout, _our_dist(rollout, v), None, _our_dist(rollout, v_ref), float(rollout.num_steps()))
    )
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
    assert metrics["kl"] > 0


@pytest.mark.parametrize("fraction, T, kept", [(0.99, 10, 9), (0.6, 10, 6), (0.5, 3, 1), (0.01, 10, 1), (1.0, 4, 4)])
def test_trained_timesteps_count_like_the_reference_int(fraction, T, kept):
    r = Rollout(
        context=None,
        steps=None,
        actions=torch.zeros(2, T, 1),
        mask_B_T=torch.ones(2, T),
        behavior_logp_B_T=torch.zeros(2, T),
        extras={"seed": 3},
    )
    first = train_timesteps(r, fraction, "first")
    assert first.mask_B_T[0].tolist() == [1.0] * kept + [0.0] * (T - kept) and torch.equal(r.mask_B_T, torch.ones(2, T))
    assert int(train_timesteps(r, fraction, "random").mask_B_T[0].sum()) == kept
    with pytest.raises(ValueError, match="timestep_selection"):
        train_timesteps(r, fraction, "last")


# ----------------------------------------------------------------------------- Flow-OPD


@pytest.mark.parametrize("reward_scale", ["paper", "code"])
def test_equal_velocities_give_zero_reward_and_zero_gkd_gradient(reward_scale):
    x, v, _, sigma, sigma_next, w, dt, mask = _steps()
    assert torch.equal(dense_reward(v, v.clone(), w, dt, mask, reward_scale), torch.zeros_like(w))
    v_student = v.clone().requires_grad_(True)
    loss, metrics = flow_opd_loss(
        None, None, v_student, v.clone(), w, dt, mask, variant="gkd", reward_scale=reward_scale
    )
    loss.backward()
    assert float(loss.detach()) == 0.0 and metrics["reward"] == 0.0 and metrics["velocity_mse"] == 0.0
    assert torch.equal(v_student.grad, torch.zeros_like(v))


def test_different_velocities_give_negative_reward_only_where_kept():
    x, v1, v2, sigma, sigma_next, w, dt, mask = _steps()
    mask[0, 1] = 0
    r = dense_reward(v1, v2, w, dt, mask)
    assert r[0, 1] == 0 and bool((r[mask.bool()] < 0).all())


def test_paper_distance_is_the_step_kl_and_code_distance_is_the_reference_kl_reward():
    x, v1, v2, sigma, sigma_next, w, dt, mask = _steps()
    kl = _gaussian(x, v1, sigma, sigma_next, mask).kl(_gaussian(x, v2, sigma, sigma_next, mask))
    torch.testing.assert_close(velocity_distance(v1, v2, w, dt, "paper"), kl, rtol=1e-10, atol=1e-12)
    s = sde_noise_scale(sigma, A)  # std_dev_t: sigma_t WITHOUT sqrt(|dt|)
    mu1, mu2 = sde_mean(x, v1, sigma, sigma_next, s), sde_mean(x, v2, sigma, sigma_next, s)
    reference = (mu1 - mu2).square().mean(-1) / (2 * s**2)
    torch.testing.assert_close(velocity_distance(v1, v2, w, dt, "code"), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(velocity_distance(v1, v2, w, dt, "code"), dt.abs() * w * (v1 - v2).square().mean(-1))
    torch.testing.assert_close(velocity_distance(v1, v2, w, dt, "code"), flow_grpo_kl(v1, v2, w, dt, "code"))
    with pytest.raises(ValueError, match="reward_scale"):
        velocity_distance(v1, v2, w, dt, "both")


def test_code_scale_weights_steps_like_the_reference_on_a_shift_3_schedule():
    """On 10 shift-3 steps the code-scale factor on mean_D ||dv||^2 is |dt| w(t) (the earlier misreading
    w(t) / |dt| was 629x too large on the first step and 12,544x on the last)."""
    sig = sigma_schedule(10, shift=3.0).double()
    w = sde_step_kl_weight(sig[:-1], sig[1:], A, float(sig[1]))
    dt = sig[1:] - sig[:-1]
    ones = torch.ones(1, 10, 1, dtype=torch.float64)
    factor = velocity_distance(ones, torch.zeros_like(ones), w[None], dt[None], "code")[0]
    torch.testing.assert_close(factor, dt.abs() * w)
    assert factor[0] == pytest.approx(6.467e-5, rel=1e-3) and factor[-1] == pytest.approx(1.3996e-2, rel=1e-3)
    assert float(1 / dt[0] ** 2) == pytest.approx(629.06, rel=1e-4) and float(1 / dt[-1] ** 2) == pytest.approx(
        12544.0, rel=1e-4
    )


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


def test_adv_clip_max_clamps_the_clipped_advantages_and_is_refused_for_gkd():
    x, v1, v2, sigma, sigma_next, w, dt, mask = _steps()
    v2 = v1 + 10 * (v2 - v1)  # rewards far below -5
    logp = torch.zeros_like(w).requires_grad_(True)
    loss, _ = flow_opd_loss(logp, logp.detach(), v1, v2, w, dt, mask, variant="clipped", gamma=0.0, adv_clip_max=5.0)
    loss.backward()
    adv = (-w * (v1 - v2).square().sum(-1)).clamp(-5, 5)
    assert bool((adv == -5).any())
    torch.testing.assert_close(logp.grad, -adv / mask.sum())
    with pytest.raises(ValueError, match="adv_clip_max"):
        flow_opd_loss(None, None, v1, v2, w, dt, mask, variant="gkd", adv_clip_max=5.0)
    with pytest.raises(ValueError, match="adv_clip_max"):
        FlowOPD(variant="gkd", adv_clip_max=5.0)
    assert FlowOPD().adv_clip_max is None  # default: no clamp, as before


def test_mar_pulls_the_student_towards_the_anchor_only():
    x, v1, v2, sigma, sigma_next, w, dt, mask = _steps()
    v_anchor = torch.randn_like(v1)
    student = v1.clone().requires_grad_(True)
    target = v2.clone().requires_grad_(True)
    anchor = v_anchor.clone().requires_grad_(True)
    logp = torch.zeros_like(w, requires_grad=True)
    loss, metrics = flow_opd_loss(
        logp, logp.detach(), student, target, w, dt, mask, v_anchor_B_T_D=anchor, mar_coef=0.5
    )
    base, _ = flow_opd_loss(logp, logp.detach(), v1, v2, w, dt, mask)
    mar = manifold_anchor_loss(v1, v_anchor, w, dt, mask)
    torch.testing.assert_close(loss.detach(), base.detach() + 0.5 * mar)
    assert metrics["mar"] == pytest.approx(float(mar))
    loss.backward()
    torch.testing.assert_close(student.grad, 0.5 * 2 * w.unsqueeze(-1) * (v1 - v_anchor) / mask.sum())
    assert target.grad is None and anchor.grad is None


def test_flow_opd_contract_needs_request_and_errors():
    opd = FlowOPD(variant="clipped", mar_coef=0.04)
    assert opd.needs.teacher and opd.needs.teacher_scores and opd.needs.anchor and opd.needs.sampled_actions
    assert not FlowOPD(variant="gkd", mar_coef=0.0).needs.anchor and not FlowOPD(variant="gkd").needs.sampled_actions
    assert opd.request(0, 10, random.Random(0)) == RolloutRequest(source="student")
    for kwargs, key in [
        ({"variant": "ppo"}, "variant"),
        ({"reward_scale": "both"}, "reward_scale"),
        ({"gamma": 2.0}, "gamma"),
        ({"timestep_fraction": 0.0}, "timestep_fraction"),
        ({"timestep_selection": "last"}, "timestep_selection"),
        ({"adv_clip_max": -1.0, "variant": "clipped"}, "adv_clip_max"),
    ]:
        with pytest.raises(ValueError, match=f"objective.{key}"):
            FlowOPD(**kwargs)


def test_one_hot_routing_picks_the_prompts_teacher():
    """The adapter's routing weights (docs/objectives.md section 6: v_tgt = sum_k alpha_k(c) v_k)."""
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


# ----------------------------------------------------------------------------- Flow-GRPO


def test_flow_grpo_code_kl_is_flow_grpos_mean_formula():
    x, v1, v2, sigma, sigma_next, w, dt, mask = _steps()
    s = sde_noise_scale(sigma, A)
    mu1, mu2 = sde_mean(x, v1, sigma, sigma_next, s), sde_mean(x, v2, sigma, sigma_next, s)
    reference = (mu1 - mu2).square().mean(-1) / (2 * s**2)  # Flow-GRPO train_sd3.py
    torch.testing.assert_close(flow_grpo_kl(v1, v2, w, dt, "code"), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flow_grpo_kl(v1, v2, w, dt), reference, rtol=1e-10, atol=1e-12)  # the default
    torch.testing.assert_close(flow_grpo_kl(v1, v2, w, dt, "paper"), step_velocity_kl(v1, v2, w))
    with pytest.raises(ValueError, match="objective.kl_form"):
        FlowGRPO(kl_form="exact")


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


def test_flow_grpo_prepare_sets_group_advantages_and_the_first_timesteps():
    B, T = 4, 10
    r = Rollout(
        context=None,
        steps=None,
        actions=torch.zeros(B, T, 1),
        mask_B_T=torch.ones(B, T),
        behavior_logp_B_T=torch.zeros(B, T),
        rewards_B=torch.tensor([1.0, 0.0, 0.5, 0.5]),
        group_ids_B=torch.tensor([0, 0, 1, 1]),
    )
    out = FlowGRPO(timestep_fraction=0.55).prepare(r)
    torch.testing.assert_close(
        out.extras["advantage_B"], torch.tensor([0.5 / (0.5**0.5 + 1e-6), -0.5 / (0.5**0.5 + 1e-6), 0.0, 0.0])
    )
    assert out.mask_B_T[0].tolist() == [1.0] * 5 + [0.0] * 5 and "advantage_B" not in r.extras
    assert not FlowGRPO(kl_beta=0.0).needs.reference
    with pytest.raises(ValueError, match="prepare"):
        FlowGRPO()(ObjectiveBatch(r, None))


# ----------------------------------------------------------------------------- flow matching


def test_flow_matching_requests_a_forward_process_and_matches_the_target():
    fm = FlowMatching(source="teacher", cond_dropout=0.2, sigma_sampling="uniform")
    assert fm.needs.teacher and not fm.needs.teacher_scores and not FlowMatching().needs.teacher
    assert fm.request(3, 10, random.Random(0)) == RolloutRequest(
        source="teacher", kind="forward_process", cond_dropout=0.2, sigma_sampling="uniform"
    )
    for kwargs, key in [
        ({"cond_dropout": 1.0}, "cond_dropout"),
        ({"source": "student"}, "source"),
        ({"sigma_sampling": "beta"}, "sigma_sampling"),
    ]:
        with pytest.raises(ValueError, match=f"objective.{key}"):
            FlowMatching(**kwargs)
    g = torch.Generator().manual_seed(0)
    v, target = torch.randn(3, 1, 6, generator=g), torch.randn(3, 1, 6, generator=g)
    mask = torch.tensor([[1.0], [0.0], [1.0]])
    r = Rollout(
        context=None,
        steps=None,
        actions=target,
        mask_B_T=mask,
        behavior_logp_B_T=torch.zeros(3, 1),
        extras={"target_v_B_T_D": target},
    )
    dist = VelocityStepDist(v, None, None, -torch.ones(3, 1), mask)
    loss, metrics = FlowMatching()(ObjectiveBatch(r, dist, normalizer=4.0))
    mse = (v - target).square().mean(-1)[:, 0]
    torch.testing.assert_close(loss, (mse[0] + mse[2]) / 4.0)
    assert metrics["fm_loss"] == pytest.approx(float((mse[0] + mse[2]) / 2))
    torch.testing.assert_close(flow_matching_loss(v, target, mask, 4.0)[0], loss)


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
    teacher = build_tiny_sd3_pipeline(words, image_size=16, vae=True, num_layers=1, seed=7).transformer.requires_grad_(
        False
    )
    anchor = build_tiny_sd3_pipeline(words, image_size=16, vae=True, num_layers=1, seed=8).transformer.requires_grad_(
        False
    )

    rollout = sample_pipeline(
        student,
        ["a red circle", "a blue square"],
        image_size=16,
        num_steps=3,
        guidance_scale=2.0,
        max_sequence_length=4,
        generator=torch.Generator().manual_seed(0),
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
        logp,
        rollout.behavior_logp_B_T,
        v_student,
        v_teacher,
        s.kl_weight_B_T(),
        s.dt_B_T,
        rollout.mask_B_T,
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
    from mmdistill.sde import sample_sde

    save_pipeline(
        build_tiny_sd3_pipeline(["a", "red", "circle"], image_size=8, vae=False, num_layers=1), tmp_path / "p"
    )
    pipe = load_pipeline(tmp_path / "p")
    assert pipe.vae is None and latent_shape(pipe, 8) == (3, 8, 8)
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(decode_latents(pipe, encode_images(pipe, images)), images)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode_prompts(pipe, ["a red circle", "a circle"], max_sequence_length=4)
    ours = sample_sde(velocity_fn(pipe.transformer), noise, scheduler_sigmas(pipe.scheduler, 2), cond, noise_level=0.0)
    # a diffusers user with no mmdistill: pass the initial noise; without a VAE the pipeline assumes a factor of 8
    theirs = pipe(
        prompt=["a red circle", "a circle"],
        latents=noise.clone(),
        num_inference_steps=2,
        guidance_scale=1.0,
        height=8 * 8,
        width=8 * 8,
        output_type="latent",
        max_sequence_length=4,
    ).images
    torch.testing.assert_close(ours.extras["x0_B_C_H_W"], theirs, rtol=0, atol=1e-6)
