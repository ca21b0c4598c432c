"""LeRobot's ACT (Action Chunking with Transformers) as a Gaussian policy over the flattened chunk.

`dist` = Gaussian(ACT's first K predicted actions in environment units, exp(log_std)) with a
learnable state-independent `log_std` [K * A]; the inner ACT stays in eval mode (dropout off, its
latent at the prior mean), so `dist` is a deterministic function of the observation.  LeRobot
imports are lazy: lerobot is an optional, heavy dependency.

    python -m pytest tests/test_robot_lerobot.py -q -o addopts="" -k act
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mmdistill.errors import CompatibilityError
from mmdistill.modalities.robot.lerobot.common import (
    LeRobotWrapper,
    Stats,
    build_policy,
    device_of,
    flatten_time,
    lerobot_batch,
    lerobot_type,
    mapping_from_stats,
    policy_features,
    register_wrapper,
    unnormalize_action,
)
from mmdistill.stepdist import Gaussian


@register_wrapper
class ACTGaussianPolicy(LeRobotWrapper):
    """ACT as a Gaussian policy over the flattened chunk: mean = ACT's first K actions (environment
    units), std = exp(log_std) with a learnable state-independent `log_std` [K * A]."""

    kind = "lerobot_act_gaussian"
    lerobot_type = "act"

    def __init__(self, act: nn.Module, chunk_size: int | None = None, init_log_std: float = -0.5):
        if lerobot_type(act) != "act":
            raise CompatibilityError(f"ACTGaussianPolicy wraps an ACT policy; got a {lerobot_type(act)!r} policy")
        super().__init__(act, chunk_size)
        self.log_std = nn.Parameter(
            torch.full((self.chunk_size * self.action_dim,), float(init_log_std), device=device_of(act))
        )
        self.config["init_log_std"] = float(init_log_std)

    @classmethod
    def wrap(cls, policy: nn.Module, chunk_size: int, init_log_std: float) -> ACTGaussianPolicy:
        return cls(policy, chunk_size, init_log_std)

    def chunk_mean(self, obs_N: Mapping[str, Any]) -> Tensor:
        """ACT's predicted chunk `[N, K * A]` in environment units, with gradient."""
        from lerobot.constants import OBS_IMAGES

        p = self.lerobot
        batch = p.normalize_inputs(lerobot_batch(obs_N, p.config, device_of(p)))
        if p.config.image_features:
            batch[OBS_IMAGES] = [batch[key] for key in p.config.image_features]
        z_N_C_A = p.model(batch)[0]
        return unnormalize_action(p, z_N_C_A[:, : self.chunk_size]).flatten(1)

    def dist(self, obs: Mapping[str, Any], mask_B_T: Tensor) -> Gaussian:
        B, T = mask_B_T.shape
        mean_B_T_D = self.chunk_mean(flatten_time(obs, B, T)).reshape(B, T, -1)
        return Gaussian(mean_B_T_D, self.log_std.exp().expand_as(mean_B_T_D), mask_B_T)


def tiny_act(
    state_dim: int,
    action_dim: int,
    chunk_size: int,
    stats: Stats,
    *,
    image_shape: tuple[int, int, int] | None = (3, 32, 32),
    env_state_dim: int | None = None,
    dim_model: int = 32,
    seed: int = 0,
    device: str = "cpu",
    **overrides: Any,
) -> nn.Module:
    """A random-init LeRobot `ACTPolicy` (resnet18 backbone without pretrained weights, 1-layer transformers)."""
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.act.modeling_act import ACTPolicy

    inputs, outputs = policy_features(state_dim, action_dim, image_shape, env_state_dim)
    config = ACTConfig(
        input_features=inputs,
        output_features=outputs,
        device=device,
        normalization_mapping=mapping_from_stats(
            stats, {"VISUAL": "MEAN_STD", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
        ),
        chunk_size=chunk_size,
        n_action_steps=chunk_size,
        pretrained_backbone_weights=None,
        dim_model=dim_model,
        n_heads=2,
        dim_feedforward=2 * dim_model,
        n_encoder_layers=1,
        n_decoder_layers=1,
        n_vae_encoder_layers=1,
        latent_dim=8,
        **overrides,
    )
    return build_policy(ACTPolicy, config, stats, seed)
