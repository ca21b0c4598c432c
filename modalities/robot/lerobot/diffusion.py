"""LeRobot's Diffusion Policy as a teacher that acts (its own DDPM/DDIM sampler) and a behaviour-cloning
student (its own loss).

It has no per-decision density, so `dist` refuses: the marginal density of a DDPM chunk is
intractable.  Objectives that need log-probs or KLs use ACT (Gaussian, `act.py`) or SmolVLA (flow
SDE, `smolvla.py`).  LeRobot imports are lazy: lerobot is an optional, heavy dependency.

    python -m pytest tests/test_robot_lerobot.py -q -o addopts="" -k diffusion
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mmdistill.errors import CompatibilityError
from mmdistill.modalities.robot.lerobot.common import (
    ACTION_KEY,
    LeRobotWrapper,
    Stats,
    build_policy,
    device_of,
    lerobot_batch,
    lerobot_type,
    mapping_from_stats,
    policy_features,
    register_wrapper,
    unnormalize_action,
)
from mmdistill.stepdist import Gaussian


@register_wrapper
class DiffusionPolicyWrapper(LeRobotWrapper):
    """Diffusion Policy as a teacher that acts (its own sampler) and a BC student (its own loss).

    No `dist`: the marginal density of a DDPM chunk is intractable, and exposing its denoising chain
    as Gaussian steps would mean re-deriving diffusers' DDPM posterior (clipped x0, variance types)
    outside the scheduler.  Flow students/teachers use `SmolVLAFlowPolicy` instead.
    """

    kind = "lerobot_diffusion"
    lerobot_type = "diffusion"

    def __init__(self, diffusion: nn.Module, chunk_size: int | None = None):
        if lerobot_type(diffusion) != "diffusion":
            raise CompatibilityError(
                f"DiffusionPolicyWrapper wraps a Diffusion policy; got a {lerobot_type(diffusion)!r} policy"
            )
        super().__init__(diffusion, chunk_size)

    @staticmethod
    def available_chunk(config: Any) -> int:
        return int(config.n_action_steps)  # LeRobot's sampler keeps n_action_steps of the horizon

    def dist(self, obs: Mapping[str, Any], mask_B_T: Tensor) -> Gaussian:
        raise NotImplementedError(
            "Diffusion Policy has no per-step action density; use it as a teacher-rollout actor (act) or train it "
            "by behaviour cloning through its own loss (bc_loss), or pick ACT (Gaussian) / SmolVLA (flow SDE) for "
            "objectives that need log-probs or KLs"
        )

    def _history(self, obs_N: Mapping[str, Any]) -> dict[str, Any]:
        """Observations `[N, ...]` (repeated over the n_obs_steps window, as LeRobot does at an episode's
        start) or `[N, n_obs_steps, ...]`, normalised, images stacked as LeRobot's `observation.images`."""
        from lerobot.configs.types import FeatureType
        from lerobot.constants import OBS_IMAGES

        p = self.lerobot
        n = int(p.config.n_obs_steps)
        batch = lerobot_batch(obs_N, p.config, device_of(p))
        for key, ft in p.config.input_features.items():
            x = batch[key]
            single = x.dim() == len(ft.shape) + 1
            batch[key] = x.unsqueeze(1).expand(x.shape[0], n, *x.shape[1:]) if single else x
            if batch[key].shape[1] != n:
                raise ValueError(f"{key}: Diffusion Policy reads {n} observation steps; got {tuple(x.shape)}")
            if ft.type is FeatureType.VISUAL and tuple(batch[key].shape[2:]) != tuple(ft.shape):
                raise ValueError(
                    f"{key}: the policy was built for images {tuple(ft.shape)}; got {tuple(batch[key].shape[2:])}"
                )
        batch = p.normalize_inputs(batch)
        if p.config.image_features:
            batch[OBS_IMAGES] = torch.stack([batch[key] for key in p.config.image_features], dim=-4)
        return batch

    @torch.no_grad()
    def act(self, obs: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """One sampled chunk `[N, K * A]` (environment units) per observation row, LeRobot's own sampler."""
        p = self.lerobot
        batch = self._history(obs)
        global_cond = p.diffusion._prepare_global_conditioning(batch)
        z_N_H_A = p.diffusion.conditional_sample(global_cond.shape[0], global_cond=global_cond, generator=generator)
        start = int(p.config.n_obs_steps) - 1
        return unnormalize_action(p, z_N_H_A[:, start : start + self.chunk_size]).flatten(1)

    def bc_loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """LeRobot's diffusion loss on a training batch in LeRobot's layout (observations
        `[N, n_obs_steps, ...]`, `action` [N, horizon, A], `action_is_pad` [N, horizon])."""
        p = self.lerobot
        batch_lr = lerobot_batch(batch, p.config, device_of(p))
        batch_lr[ACTION_KEY] = torch.as_tensor(batch[ACTION_KEY], device=device_of(p)).float()
        batch_lr["action_is_pad"] = torch.as_tensor(batch["action_is_pad"], device=device_of(p)).bool()
        loss, _ = p.forward(batch_lr)
        return loss, {"loss": float(loss.detach())}


def tiny_diffusion(
    state_dim: int,
    action_dim: int,
    chunk_size: int,
    stats: Stats,
    *,
    image_shape: tuple[int, int, int] | None = (3, 32, 32),
    env_state_dim: int | None = None,
    horizon: int = 8,
    n_obs_steps: int = 2,
    num_inference_steps: int = 4,
    seed: int = 0,
    device: str = "cpu",
    **overrides: Any,
) -> nn.Module:
    """A random-init LeRobot `DiffusionPolicy` (2-level U-Net of width 16/32, a few DDPM steps)."""
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    inputs, outputs = policy_features(state_dim, action_dim, image_shape, env_state_dim)
    config = DiffusionConfig(
        input_features=inputs,
        output_features=outputs,
        device=device,
        normalization_mapping=mapping_from_stats(
            stats, {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ACTION": "MIN_MAX"}
        ),
        n_obs_steps=n_obs_steps,
        horizon=horizon,
        n_action_steps=chunk_size,
        crop_shape=None,
        down_dims=(16, 32),
        kernel_size=3,
        n_groups=4,
        diffusion_step_embed_dim=16,
        spatial_softmax_num_keypoints=8,
        num_train_timesteps=100,
        num_inference_steps=num_inference_steps,
        **overrides,
    )
    return build_policy(DiffusionPolicy, config, stats, seed)
