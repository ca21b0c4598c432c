"""Policies for the robot modality: each maps observations `[B, T, O]` to a step distribution.

- `GaussianMLPPolicy`: a small MLP mean and a state-independent log-std (a continuous action head,
  the CPU-sized student);
- `ScriptedReachExpert`: a privileged scripted expert for the point mass, a Gaussian around the
  proportional controller `clip(gain * (goal - pos), -1, 1)` (the CPU-sized teacher).

    python -c "from mmdistill.modalities.robot.policies import *; print(GaussianMLPPolicy(4, 2))"
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmdistill.stepdist import Gaussian


class GaussianMLPPolicy(nn.Module):
    kind = "gaussian_mlp"

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 64, layers: int = 2, init_log_std: float = -0.5):
        super().__init__()
        dims = [obs_dim] + [hidden] * layers
        body: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.Tanh()]
        self.body = nn.Sequential(*body)
        self.mean = nn.Linear(dims[-1], action_dim)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))
        self.config = {"kind": self.kind, "obs_dim": obs_dim, "action_dim": action_dim, "hidden": hidden, "layers": layers, "init_log_std": init_log_std}

    def dist(self, obs_B_T_O: Tensor, mask_B_T: Tensor) -> Gaussian:
        mean = self.mean(self.body(obs_B_T_O))
        std = self.log_std.clamp(-5, 2).exp().expand_as(mean)
        return Gaussian(mean, std, mask_B_T)


class ScriptedReachExpert(nn.Module):
    """Reads the privileged position and goal (here part of the observation) and returns
    `N(clip(gain * (goal - pos), -1, 1), std^2)` per action dimension."""

    kind = "scripted_reach"

    def __init__(self, gain: float = 10.0, std: float = 0.1):
        super().__init__()
        if std <= 0:
            raise ValueError(f"the scripted expert's std must be > 0; got {std}")
        self.gain, self.std = gain, std
        self.config = {"kind": self.kind, "gain": gain, "std": std}

    def dist(self, obs_B_T_O: Tensor, mask_B_T: Tensor) -> Gaussian:
        pos, goal = obs_B_T_O[..., :2], obs_B_T_O[..., 2:4]
        mean = (self.gain * (goal - pos)).clamp(-1, 1)
        return Gaussian(mean, torch.full_like(mean, self.std), mask_B_T)


def gaussian_log_prob(mean: Tensor, std: Tensor, x: Tensor) -> Tensor:
    """Brute-force reference: sum over dims of log N(x; mean, std^2)."""
    return (-((x - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
