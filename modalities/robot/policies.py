"""Policies for the robot modality: each maps observations `[B, T, O]` to a step distribution.

- `GaussianMLPPolicy`: a small MLP on the proprioceptive state (the CPU-sized student);
- `VisionGaussianPolicy`: a small CNN on the camera image plus the state (the GPU-sized student);
- `ScriptedReachExpert`: a privileged scripted expert for the point mass, a Gaussian around the
  proportional controller `clip(gain * (goal - pos), -1, 1)` (the CPU-sized teacher);
- `ScriptedPickPlaceExpert`, `FunnelPickPlaceExpert`: privileged LIBERO experts.

Students choose their head (`ActionHead`): `gaussian` (a diagonal Gaussian over the chunk's
`K x A` numbers, state-independent log-std) or `gaussian_bernoulli` (the robot's own action
space: Gaussian arm dimensions times a Bernoulli gripper, `mmdistill.stepdist.GaussianBernoulli`,
one decision of A numbers repeated over the chunk, a clamped state-independent or state-dependent
log-std).  The LIBERO experts expose the matching `gaussian_bernoulli` head (their label as the arm
mean, a sharp Bernoulli on their open / close label), so closed-form KLs between them are defined.

    python -c "from mmdistill.modalities.robot.policies import *; print(GaussianMLPPolicy(4, 2))"
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmdistill.stepdist import Gaussian, GaussianBernoulli

HEADS = ("gaussian", "gaussian_bernoulli")
STD_MODES = ("param", "state")


def state_of(obs: Tensor | dict) -> Tensor:
    """The proprioceptive state `[B, T, S]` of an observation dict (or a bare state tensor)."""
    return obs["observation.state"] if isinstance(obs, dict) else obs


class StateFeatures(nn.Module):
    """The network input of an observation: the proprioceptive state `[..., S]`, followed by the entries
    `env_entries` of `observation.environment_state` when given (a low-dimensional state student, e.g.
    LIBERO's object and basket positions 7..12, what robomimic's low_dim policies read; none: proprioception
    only), then the differences `env[i] - env[j]` of the pairs `env_deltas` (relative positions, e.g. LIBERO's
    end effector to object `[[0, 7], [1, 8], [2, 9]]`, as robosuite's `object-state` gives
    `{obj}_to_robot0_eef_pos`), as `(x - shift) / scale` per entry; when `axis_angle` is the index of a 3-D axis-angle in the
    state (LIBERO's 8-D state: 3), those three entries are replaced by the 9 entries of its rotation matrix
    (continuous where the axis-angle flips sign at an angle of pi, as it does for a gripper pointing down)."""

    def __init__(
        self,
        state_dim: int,
        shift: list[float] | None = None,
        scale: list[float] | None = None,
        axis_angle: int | None = None,
        env_entries: list[int] | None = None,
        env_deltas: list[list[int]] | None = None,
    ):
        super().__init__()
        self.env_entries = [int(i) for i in env_entries] if env_entries else None
        if env_deltas and any(len(pair) != 2 for pair in env_deltas):
            raise ValueError(f"env_deltas: {env_deltas}; give pairs [i, j], each read as env[i] - env[j]")
        self.env_deltas = [(int(i), int(j)) for i, j in env_deltas] if env_deltas else None
        state_dim = state_dim + len(self.env_entries or []) + len(self.env_deltas or [])
        for name, v in (("obs_shift", shift), ("obs_scale", scale)):
            if v is not None and len(v) != state_dim:
                raise ValueError(f"{name}: {len(v)} numbers for a {state_dim}-D state; give one per state entry")
        if scale is not None and min(scale) <= 0:
            raise ValueError(f"obs_scale: {list(scale)} has an entry <= 0; every scale must be positive")
        if axis_angle is not None and not 0 <= axis_angle <= state_dim - 3:
            raise ValueError(f"axis_angle: {axis_angle} does not index 3 entries of a {state_dim}-D state")
        # not in the state dict: rebuilt from config.json, so checkpoints written before them still load
        self.register_buffer("shift", torch.tensor(shift or [0.0] * state_dim, dtype=torch.float32), persistent=False)
        self.register_buffer("scale", torch.tensor(scale or [1.0] * state_dim, dtype=torch.float32), persistent=False)
        self._config = {
            "obs_shift": shift,
            "obs_scale": scale,
            "axis_angle": axis_angle,
            "env_entries": env_entries,
            "env_deltas": [list(pair) for pair in self.env_deltas] if self.env_deltas else None,
        }
        self.axis_angle = axis_angle
        self.dim = state_dim + (6 if axis_angle is not None else 0)

    def config(self) -> dict:
        """The keys of a policy's config.json that rebuild these features (none when all are defaults)."""
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self._config.items() if v is not None}

    def forward(self, obs: Tensor | dict) -> Tensor:
        state = state_of(obs).float()
        if self.env_entries is not None or self.env_deltas is not None:
            if not isinstance(obs, dict) or "observation.environment_state" not in obs:
                raise ValueError(
                    "env_entries / env_deltas: this policy reads observation.environment_state, which the "
                    "observation lacks"
                )
            env = obs["observation.environment_state"].float()
            parts = [state]
            if self.env_entries is not None:
                parts.append(env[..., self.env_entries])
            if self.env_deltas is not None:
                i, j = zip(*self.env_deltas)
                parts.append(env[..., list(i)] - env[..., list(j)])
            state = torch.cat(parts, -1)
        x = (state - self.shift) / self.scale
        if self.axis_angle is None:
            return x
        i = self.axis_angle
        rot = _rotvec_to_matrix(state[..., i : i + 3].reshape(-1, 3)).reshape(*state.shape[:-1], 9)
        return torch.cat([x[..., :i], rot, x[..., i + 3 :]], -1)


class GaussianBernoulliHead(nn.Module):
    """Features `[B, T, H]` -> `GaussianBernoulli`: `action_dim - 1` Gaussian arm dimensions and the
    gripper (last) Bernoulli, ONE decision of `action_dim` numbers repeated `chunk_size` times.

    log-std `param` (state-independent) or `state` (a linear map of the features, zero-initialised so
    it starts state-independent), squashed smoothly into [log_std_min, log_std_max] by a sigmoid
    (gradients everywhere, never outside the bounds), starting at `init_log_std`.
    """

    def __init__(
        self,
        in_dim: int,
        action_dim: int,
        chunk_size: int = 1,
        std_mode: str = "param",
        init_log_std: float = -1.0,
        log_std_min: float = -4.0,
        log_std_max: float = 0.5,
    ):
        super().__init__()
        if std_mode not in STD_MODES:
            raise ValueError(f"std_mode: {std_mode!r}; choose one of {STD_MODES}")
        if not log_std_min < init_log_std < log_std_max:
            raise ValueError(
                f"init_log_std: {init_log_std} must lie strictly inside [log_std_min, log_std_max] = "
                f"[{log_std_min}, {log_std_max}]"
            )
        if action_dim < 2:
            raise ValueError(f"head: gaussian_bernoulli needs arm dims and a gripper; the action has {action_dim} dim")
        self.std_mode, self.chunk_size = std_mode, chunk_size
        self.log_std_min, self.log_std_max = float(log_std_min), float(log_std_max)
        D = action_dim - 1
        self.out = nn.Linear(in_dim, action_dim)  # [arm mean (D), gripper logit]
        frac = (init_log_std - log_std_min) / (log_std_max - log_std_min)
        raw0 = math.log(frac / (1 - frac))
        if std_mode == "param":
            self.raw_log_std = nn.Parameter(torch.full((D,), raw0))
        else:
            self.std_out = nn.Linear(in_dim, D)
            nn.init.zeros_(self.std_out.weight)
            nn.init.constant_(self.std_out.bias, raw0)

    def log_std(self, raw: Tensor) -> Tensor:
        """The squashed log-std `log_std_min + (log_std_max - log_std_min) * sigmoid(raw)`."""
        return self.log_std_min + (self.log_std_max - self.log_std_min) * torch.sigmoid(raw)

    def forward(self, h_B_T_H: Tensor, mask_B_T: Tensor) -> GaussianBernoulli:
        out = self.out(h_B_T_H)
        mean, logit = out[..., :-1], out[..., -1]
        raw = self.raw_log_std.expand_as(mean) if self.std_mode == "param" else self.std_out(h_B_T_H)
        return GaussianBernoulli(mean, self.log_std(raw).exp(), logit, mask_B_T, repeat=self.chunk_size)


def _check_head(head: str, std_mode: str) -> None:
    if head not in HEADS:
        raise ValueError(f"head: {head!r}; choose one of {HEADS}")
    if head == "gaussian" and std_mode != "param":
        raise ValueError("std_mode: state needs head: gaussian_bernoulli (the gaussian head keeps its parameter)")


def _head_config(head: str, std_mode: str, log_std_min: float, log_std_max: float) -> dict:
    """The head's keys of a policy's config.json (none for the original Gaussian head: old checkpoints load)."""
    if head == "gaussian":
        return {}
    return {"head": head, "std_mode": std_mode, "log_std_min": log_std_min, "log_std_max": log_std_max}


class GaussianMLPPolicy(nn.Module):
    """An MLP on the proprioceptive state (`StateFeatures`); `chunk_size` actions per decision.

    head `gaussian` (default, the original student): a diagonal Gaussian over the chunk's
    `chunk_size * action_dim` numbers with a state-independent log-std clamped to [-5, 2];
    head `gaussian_bernoulli`: `GaussianBernoulliHead` (one decision repeated over the chunk)."""

    kind = "gaussian_mlp"

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: int = 64,
        layers: int = 2,
        init_log_std: float = -0.5,
        chunk_size: int = 1,
        head: str = "gaussian",
        std_mode: str = "param",
        log_std_min: float = -4.0,
        log_std_max: float = 0.5,
        obs_shift: list[float] | None = None,
        obs_scale: list[float] | None = None,
        axis_angle: int | None = None,
        env_entries: list[int] | None = None,
        env_deltas: list[list[int]] | None = None,
    ):
        super().__init__()
        _check_head(head, std_mode)
        self.action_dim, self.chunk_size, self.head_kind = action_dim, chunk_size, head
        self.features = StateFeatures(obs_dim, obs_shift, obs_scale, axis_angle, env_entries, env_deltas)
        dims = [self.features.dim] + [hidden] * layers
        body: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.Tanh()]
        self.body = nn.Sequential(*body)
        if head == "gaussian":
            self.mean = nn.Linear(dims[-1], action_dim * chunk_size)
            self.log_std = nn.Parameter(torch.full((action_dim * chunk_size,), float(init_log_std)))
        else:
            self.gb_head = GaussianBernoulliHead(
                dims[-1], action_dim, chunk_size, std_mode, init_log_std, log_std_min, log_std_max
            )
        self.config = {
            "kind": self.kind,
            "obs_dim": obs_dim,
            "action_dim": action_dim,
            "hidden": hidden,
            "layers": layers,
            "init_log_std": init_log_std,
            "chunk_size": chunk_size,
            **_head_config(head, std_mode, log_std_min, log_std_max),
            **self.features.config(),
        }

    def dist(self, obs: Tensor | dict, mask_B_T: Tensor) -> Gaussian | GaussianBernoulli:
        h = self.body(self.features(obs))
        if self.head_kind == "gaussian_bernoulli":
            return self.gb_head(h, mask_B_T)
        mean = self.mean(h)
        std = self.log_std.clamp(-5, 2).exp().expand_as(mean)
        return Gaussian(mean, std, mask_B_T)


class SpatialSoftmax(nn.Module):
    """Expected image coordinates of each feature map `[N, C, H, W] -> [N, 2C]` (robomimic's keypoints)."""

    def forward(self, x_N_C_H_W: Tensor) -> Tensor:
        N, C, H, W = x_N_C_H_W.shape
        attn = x_N_C_H_W.flatten(2).softmax(-1).view(N, C, H, W)
        ys = torch.linspace(-1, 1, H, device=x_N_C_H_W.device, dtype=attn.dtype)
        xs = torch.linspace(-1, 1, W, device=x_N_C_H_W.device, dtype=attn.dtype)
        return torch.cat([(attn.sum(2) * xs).sum(-1), (attn.sum(3) * ys).sum(-1)], -1)


class VisionGaussianPolicy(nn.Module):
    """A small vision student: a 3-layer CNN with spatial-softmax keypoints on the camera image,
    concatenated with the proprioceptive state (`StateFeatures`), an MLP, and the head: `gaussian`
    (default: the mean of a chunk of `chunk_size` free actions, a state-independent log-std) or
    `gaussian_bernoulli` (`GaussianBernoulliHead`: one decision repeated over the chunk).  Reads
    `observation.environment_state` only when `env_entries` / `env_deltas` ask for it (a camera
    student normally leaves both unset)."""

    kind = "vision_gaussian"

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        chunk_size: int = 1,
        channels: int = 32,
        hidden: int = 128,
        init_log_std: float = -1.0,
        image_key: str = "observation.images.image",
        head: str = "gaussian",
        std_mode: str = "param",
        log_std_min: float = -4.0,
        log_std_max: float = 0.5,
        obs_shift: list[float] | None = None,
        obs_scale: list[float] | None = None,
        axis_angle: int | None = None,
        env_entries: list[int] | None = None,
        env_deltas: list[list[int]] | None = None,
    ):
        super().__init__()
        _check_head(head, std_mode)
        self.action_dim, self.chunk_size, self.image_key, self.head_kind = action_dim, chunk_size, image_key, head
        self.features = StateFeatures(state_dim, obs_shift, obs_scale, axis_angle, env_entries, env_deltas)
        self.conv = nn.Sequential(
            nn.Conv2d(3, channels // 2, 5, stride=2),
            nn.ReLU(),
            nn.Conv2d(channels // 2, channels, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3),
            SpatialSoftmax(),
        )
        trunk: list[nn.Module] = [
            nn.Linear(2 * channels + self.features.dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        ]
        if head == "gaussian":
            self.mlp = nn.Sequential(*trunk, nn.Linear(hidden, action_dim * chunk_size))
            self.log_std = nn.Parameter(torch.full((action_dim * chunk_size,), float(init_log_std)))
        else:
            self.mlp = nn.Sequential(*trunk)
            self.gb_head = GaussianBernoulliHead(
                hidden, action_dim, chunk_size, std_mode, init_log_std, log_std_min, log_std_max
            )
        self.config = {
            "kind": self.kind,
            "state_dim": state_dim,
            "action_dim": action_dim,
            "chunk_size": chunk_size,
            "channels": channels,
            "hidden": hidden,
            "init_log_std": init_log_std,
            "image_key": image_key,
            **_head_config(head, std_mode, log_std_min, log_std_max),
            **self.features.config(),
        }

    def dist(self, obs: dict, mask_B_T: Tensor) -> Gaussian | GaussianBernoulli:
        img = obs[self.image_key]
        B, T = img.shape[:2]
        x = img.reshape(B * T, *img.shape[2:]).float() / 255.0 - 0.5
        feats = self.conv(x).view(B, T, -1)
        h = self.mlp(torch.cat([feats, self.features(obs)], -1))
        if self.head_kind == "gaussian_bernoulli":
            return self.gb_head(h, mask_B_T)
        std = self.log_std.clamp(-5, 2).exp().expand_as(h)
        return Gaussian(h, std, mask_B_T)


class ScriptedReachExpert(nn.Module):
    """Reads the privileged position and goal (here part of the observation) and returns
    `N(clip(gain * (goal - pos), -1, 1), std^2)` per action dimension."""

    kind = "scripted_reach"
    chunk_size = 1
    action_dim = 2

    def __init__(self, gain: float = 10.0, std: float = 0.1):
        super().__init__()
        if std <= 0:
            raise ValueError(f"the scripted expert's std must be > 0; got {std}")
        self.gain, self.std = gain, std
        self.config = {"kind": self.kind, "gain": gain, "std": std}

    def dist(self, obs: Tensor | dict, mask_B_T: Tensor) -> Gaussian:
        obs_B_T_O = state_of(obs)
        pos, goal = obs_B_T_O[..., :2], obs_B_T_O[..., 2:4]
        mean = (self.gain * (goal - pos)).clamp(-1, 1)
        return Gaussian(mean, torch.full_like(mean, self.std), mask_B_T)


def gaussian_log_prob(mean: Tensor, std: Tensor, x: Tensor) -> Tensor:
    """Brute-force reference: sum over dims of log N(x; mean, std^2)."""
    return (-((x - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def split_privileged(priv_N_P: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The privileged LIBERO state `[N, 13]` (or `[N, 15]`: entries 13-14, the object's extent, are left out)
    as (end effector xyz, gripper joints, gripper joint velocities, object xyz, target xyz)."""
    return priv_N_P[:, 0:3], priv_N_P[:, 3:5], priv_N_P[:, 5:7], priv_N_P[:, 7:10], priv_N_P[:, 10:13]


def grasp_height(priv_N_P: Tensor, grasp_dz: float, top_depth: float, hand_room: float, tall: float) -> Tensor:
    """How far above the object's position to grasp, `[N, 1]`, from its extent when the privileged
    vector carries it (entries 13-14, `object_top` / `object_bottom`; a 13-D vector or NaN entries give
    `grasp_dz`):
    `grasp_dz`, raised to `hand_room` below the top of a tall object (top + bottom above `tall`: the
    hand, about 3 cm above the fingertips' grasp point, must stay above a bottle's top), and lowered
    to `top_depth` below the top (a flat box's top lies under a fixed `grasp_dz`)."""
    dz_N_1 = torch.full_like(priv_N_P[:, :1], grasp_dz)
    if priv_N_P.shape[-1] < 15:
        return dz_N_1
    top_N_1, bottom_N_1 = priv_N_P[:, 13:14], priv_N_P[:, 14:15]
    known_N_1 = top_N_1.isfinite() & bottom_N_1.isfinite()
    per_object_N_1 = torch.where(top_N_1 + bottom_N_1 > tall, torch.maximum(dz_N_1, top_N_1 - hand_room), dz_N_1)
    return torch.where(known_N_1, torch.minimum(per_object_N_1, top_N_1 - top_depth), dz_N_1)


def carry_lift(priv_N_P: Tensor, tall: float) -> Tensor:
    """How much higher to carry, lower and release the object, `[N]`: how far its height (top +
    bottom, privileged entries 13-14) exceeds `tall`, so a tall carton's bottom clears the basket's
    rim as a can's does; 0 for a vector without them (13-D, or NaN entries)."""
    if priv_N_P.shape[-1] < 15:
        return torch.zeros_like(priv_N_P[:, 0])
    excess_N = (priv_N_P[:, 13] + priv_N_P[:, 14] - tall).clamp_min(0)
    return torch.where(excess_N.isfinite(), excess_N, torch.zeros_like(excess_N))


class ScriptedPickPlaceExpert(nn.Module):
    """A privileged scripted expert for LIBERO pick-and-place: reads the end effector, gripper,
    object and place-target positions from `observation.environment_state` (layout
    `libero.PRIVILEGED`) and returns a Gaussian around a proportional controller with phases
    decided from the state alone (no memory, so it can score any state a student visits):

    release (object in the target: open, rise) | carry (object held: lift, move over the target,
    lower, open) | reach (move above the object, descend, close).

    Actions are 7-D delta end-effector commands in [-1, 1] (position, rotation = 0, gripper
    -1 open / +1 close); a chunk of `chunk_size` steps repeats the decision-point action.
    """

    kind = "scripted_pick_place"

    def __init__(
        self,
        gain: float = 10.0,
        std: float = 0.1,
        chunk_size: int = 1,
        grasp_dz: float = 0.02,
        near: float = 0.03,
        open_width: float = 0.08,
        target_radius: float = 0.07,
        target_height: float = 0.08,
        still: float = 0.05,
        carry: float = 0.20,
        xy_tol: float = 0.01,
        drop: float = 0.10,
        approach: float = 0.10,
        head: str = "gaussian",
        gripper_logit: float = 8.0,
    ):
        super().__init__()
        if std <= 0 or chunk_size < 1:
            raise ValueError(f"the scripted expert needs std > 0 and chunk_size >= 1; got {std}, {chunk_size}")
        if head not in HEADS or gripper_logit <= 0:
            raise ValueError(
                f"the scripted expert's head is one of {HEADS} with gripper_logit > 0; got {head!r}, {gripper_logit}"
            )
        self.head_kind, self.gripper_logit = head, float(gripper_logit)
        self.p = dict(
            gain=gain,
            grasp_dz=grasp_dz,
            near=near,
            open_width=open_width,
            target_radius=target_radius,
            target_height=target_height,
            still=still,
            carry=carry,
            xy_tol=xy_tol,
            drop=drop,
            approach=approach,
        )
        self.std, self.chunk_size, self.action_dim = std, chunk_size, 7
        self.config = {"kind": self.kind, "std": std, "chunk_size": chunk_size, **self.p, **self._head_config()}

    def _head_config(self) -> dict:
        return {} if self.head_kind == "gaussian" else {"head": self.head_kind, "gripper_logit": self.gripper_logit}

    def labelled(self, a_B_T_7: Tensor, mask_B_T: Tensor) -> Gaussian | GaussianBernoulli:
        """The step distribution around the controller's labels `[B, T, 7]`: head `gaussian`, `N(label, std^2)`
        on each of the chunk's `chunk_size * 7` numbers (the label repeated); head `gaussian_bernoulli`, one
        decision repeated over the chunk, `N(label, std^2)` on the 6 arm dimensions and a sharp Bernoulli
        gripper, logit `+gripper_logit` on a close label (> 0) and `-gripper_logit` on an open one."""
        B, T, A = a_B_T_7.shape
        if self.head_kind == "gaussian_bernoulli":
            arm = a_B_T_7[..., :-1]
            logit = torch.where(a_B_T_7[..., -1] > 0, self.gripper_logit, -self.gripper_logit)
            return GaussianBernoulli(arm, torch.full_like(arm, self.std), logit, mask_B_T, repeat=self.chunk_size)
        a = a_B_T_7.view(B, T, 1, A).expand(B, T, self.chunk_size, A).reshape(B, T, -1)
        return Gaussian(a, torch.full_like(a, self.std), mask_B_T)

    def action(self, priv_N_P: Tensor) -> Tensor:
        """The controller's action `[N, 7]` from privileged states `[N, 13]`."""
        p = self.p
        eef, gq, gv, obj, tgt = split_privileged(priv_N_P)
        up = torch.tensor([0.0, 0.0, 1.0], dtype=priv_N_P.dtype, device=priv_N_P.device)

        def move(target: Tensor) -> Tensor:
            return (p["gain"] * (target - eef)).clamp(-1, 1)

        def col(c: Tensor) -> Tensor:
            return c.unsqueeze(-1)

        width = gq[:, 0] - gq[:, 1]
        grasp = obj + p["grasp_dz"] * up
        near = (eef - grasp).norm(dim=-1) < p["near"]
        closed = width < p["open_width"] - 0.004
        in_target = ((obj[:, :2] - tgt[:, :2]).norm(dim=-1) < p["target_radius"]) & (
            obj[:, 2] < tgt[:, 2] + p["target_height"]
        )
        held = near & closed & (gv.abs().amax(-1) < p["still"])
        release = in_target & ~(near & closed & (obj[:, 2] > tgt[:, 2] + 0.06))
        # carrying: lift, move over the target at carry height, lower, open
        to_tgt = torch.cat([tgt[:, :2] - obj[:, :2], torch.zeros_like(obj[:, :1])], -1)
        off_z = (eef - obj)[:, 2]
        carry_z = tgt[:, 2] + p["carry"]
        d_tgt = to_tgt.norm(dim=-1)
        lift_t = torch.cat([eef[:, :2], col(carry_z + off_z)], -1)
        lift = move(lift_t)
        lift_xy = move(eef + to_tgt)[:, :2]
        lift = torch.where(col(d_tgt < 0.3), torch.cat([lift_xy, lift[:, 2:]], -1), lift)
        over_t = eef + to_tgt
        carry = move(torch.cat([over_t[:, :2], col(carry_z + off_z)], -1))
        lower = move(torch.cat([over_t[:, :2], col(tgt[:, 2] + p["drop"] + off_z)], -1))
        far = d_tgt > 2 * p["xy_tol"]
        held_pos = torch.where(col(far), torch.where(col(obj[:, 2] < carry_z - 0.03), lift, carry), lower)
        held_g = torch.where(far | (obj[:, 2] > tgt[:, 2] + p["drop"] + 0.02), 1.0, -1.0)
        # reaching: reopen if closed on nothing, move above the object, descend, close
        d_xy = (eef[:, :2] - grasp[:, :2]).norm(dim=-1)
        above = torch.cat([grasp[:, :2], col(grasp[:, 2] + p["approach"])], -1)
        reach_pos = torch.where(
            col(closed & ~near), move(eef + 0.05 * up), torch.where(col(d_xy > p["xy_tol"]), move(above), move(grasp))
        )
        at_grasp = (d_xy <= p["xy_tol"]) & (eef[:, 2] <= grasp[:, 2] + 0.01) & ~(closed & ~near)
        reach_g = torch.where(at_grasp, 1.0, -1.0)
        pos = torch.where(col(release), move(eef + 0.1 * up), torch.where(col(held), held_pos, reach_pos))
        g = torch.where(release, -1.0, torch.where(held, held_g, reach_g))
        return torch.cat([pos, torch.zeros_like(pos), col(g)], -1)

    def dist(self, obs: dict, mask_B_T: Tensor) -> Gaussian | GaussianBernoulli:
        priv = obs["observation.environment_state"]
        B, T, P = priv.shape
        return self.labelled(self.action(priv.reshape(B * T, P).float()).view(B, T, 7), mask_B_T)


def _rotvec_to_matrix(rv_N_3: Tensor) -> Tensor:
    """Rotation matrices `[N, 3, 3]` of axis-angle vectors `[N, 3]` (Rodrigues)."""
    angle = rv_N_3.norm(dim=-1, keepdim=True)
    axis = rv_N_3 / angle.clamp_min(1e-8)
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).view(-1, 3, 3)
    s, c = angle.sin().unsqueeze(-1), angle.cos().unsqueeze(-1)
    eye = torch.eye(3, dtype=rv_N_3.dtype, device=rv_N_3.device).expand_as(K)
    return eye + s * K + (1 - c) * (K @ K)


def _matrix_to_rotvec(R_N_3_3: Tensor) -> Tensor:
    """Axis-angle `[N, 3]` of rotation matrices (angles below pi; at pi the axis is arbitrary but bounded)."""
    cos = ((R_N_3_3.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    angle = cos.acos()
    vee = torch.stack(
        [R_N_3_3[:, 2, 1] - R_N_3_3[:, 1, 2], R_N_3_3[:, 0, 2] - R_N_3_3[:, 2, 0], R_N_3_3[:, 1, 0] - R_N_3_3[:, 0, 1]],
        -1,
    )
    scale = torch.where(angle < 1e-6, torch.full_like(angle, 0.5), angle / (2 * angle.sin().clamp_min(1e-6)))
    return vee * scale.unsqueeze(-1)


class FunnelPickPlaceExpert(ScriptedPickPlaceExpert):
    """The scripted pick-and-place expert made to recover from states its own trajectories never
    visit (a student's, or its own samples at a large std), still memoryless and privileged:

    - reach in a funnel: the target height above the grasp point grows with the xy error,
      `clamp(slope * (d_xy - funnel_free), 0, approach)`, instead of climbing back to the approach
      height whenever the end effector is more than `xy_tol` off; the xy target is always the grasp;
    - close inside a wider box (`close_xy` in xy, `close_dz` above the grasp), and keep closing
      while the fingers close around the object;
    - re-grasp after a drop: closed on nothing (finger width below `empty_width`) or closed away
      from the object (it was not lifted) -> open and rise toward the approach height;
    - place in a funnel too: lower over the target as the xy error shrinks, open within `place_xy`;
    - correct orientation: the rotation dimensions (world-frame axis-angle deltas) drive the end
      effector back to `ref_rotvec` (gripper pointing down, LIBERO's start) from the 8-D
      `observation.state` (its axis-angle, entries 3:6); without that key rotation stays 0;
    - grasp per object (from its geometry, privileged entries 13-14, when present): `grasp_dz` above
      the object's position, but no lower than `hand_room` below the top of an object taller than
      `tall` and no higher than `top_depth` below its top (`grasp_height`: flat boxes are grasped
      low, tall bottles high); carry, place and release heights raised by how far the object is
      taller than `tall` (`carry_lift`: tall cartons clear the basket's rim).  The alphabet soup can
      of LIBERO-Object task 0 (7.6 cm tall, 6.3 cm wide: under 10 cm at any tilt; its top 3.1-4.9 cm
      above its position) keeps exactly the 13-D behaviour.

    The step distribution stays `N(label, std^2)` per dimension, as the base expert's.
    """

    kind = "funnel_pick_place"

    def __init__(
        self,
        gain: float = 10.0,
        std: float = 0.1,
        chunk_size: int = 1,
        grasp_dz: float = 0.02,
        funnel_slope: float = 1.5,
        funnel_free: float = 0.01,
        close_xy: float = 0.02,
        close_dz: float = 0.015,
        empty_width: float = 0.01,
        place_slope: float = 1.5,
        place_free: float = 0.02,
        place_xy: float = 0.03,
        rot_gain: float = 1.0,
        ref_rotvec: tuple[float, float, float] = (math.pi, 0.0, 0.0),
        top_depth: float = 0.01,
        hand_room: float = 0.025,
        tall: float = 0.10,
        **base: float,
    ):
        super().__init__(gain, std, chunk_size, grasp_dz, **base)
        self.p.update(
            funnel_slope=funnel_slope,
            funnel_free=funnel_free,
            close_xy=close_xy,
            close_dz=close_dz,
            empty_width=empty_width,
            place_slope=place_slope,
            place_free=place_free,
            place_xy=place_xy,
            rot_gain=rot_gain,
            top_depth=top_depth,
            hand_room=hand_room,
            tall=tall,
        )
        self.ref_rotvec = tuple(float(v) for v in ref_rotvec)
        self.config = {
            "kind": self.kind,
            "std": std,
            "chunk_size": chunk_size,
            **self.p,
            "ref_rotvec": self.ref_rotvec,
            **self._head_config(),
        }

    def rotation(self, rotvec_N_3: Tensor) -> Tensor:
        """Rotation actions `[N, 3]`: `rot_gain` times the world-frame axis-angle from the current
        end-effector orientation (axis-angle `[N, 3]`) to `ref_rotvec`, clipped to [-1, 1]."""
        ref = torch.tensor(self.ref_rotvec, dtype=rotvec_N_3.dtype, device=rotvec_N_3.device).expand_as(rotvec_N_3)
        R_err = _rotvec_to_matrix(ref) @ _rotvec_to_matrix(rotvec_N_3).transpose(-1, -2)
        return (self.p["rot_gain"] * _matrix_to_rotvec(R_err)).clamp(-1, 1)

    def action(self, priv_N_P: Tensor, rotvec_N_3: Tensor | None = None) -> Tensor:
        """The controller's action `[N, 7]` from privileged states `[N, 13]` or `[N, 15]` (with the
        object's extent) and, when given, the end effector's axis-angle `[N, 3]` (else no rotation)."""
        p = self.p
        eef, gq, gv, obj, tgt = split_privileged(priv_N_P)
        up = torch.tensor([0.0, 0.0, 1.0], dtype=priv_N_P.dtype, device=priv_N_P.device)

        def move(target: Tensor) -> Tensor:
            return (p["gain"] * (target - eef)).clamp(-1, 1)

        def col(c: Tensor) -> Tensor:
            return c.unsqueeze(-1)

        width = gq[:, 0] - gq[:, 1]
        grasp = obj + grasp_height(priv_N_P, p["grasp_dz"], p["top_depth"], p["hand_room"], p["tall"]) * up
        lift = carry_lift(priv_N_P, p["tall"])  # 0 unless the object is taller than `tall`
        near = (eef - grasp).norm(dim=-1) < p["near"]
        closed = width < p["open_width"] - 0.004
        empty = width < p["empty_width"]  # closed on nothing: the fingers touch
        in_target = ((obj[:, :2] - tgt[:, :2]).norm(dim=-1) < p["target_radius"]) & (
            obj[:, 2] < tgt[:, 2] + p["target_height"] + lift
        )
        held = near & closed & ~empty & (gv.abs().amax(-1) < p["still"])
        release = in_target & ~(near & closed & ~empty & (obj[:, 2] > tgt[:, 2] + 0.06 + lift))
        # carrying: lift, move over the target, lower in a funnel, open within place_xy
        to_tgt = torch.cat([tgt[:, :2] - obj[:, :2], torch.zeros_like(obj[:, :1])], -1)
        off_z = (eef - obj)[:, 2]
        d_tgt = to_tgt.norm(dim=-1)
        h_place = (p["place_slope"] * (d_tgt - p["place_free"])).clamp(0, p["carry"] - p["drop"])
        place_z = tgt[:, 2] + p["drop"] + h_place + lift
        low = obj[:, 2] < place_z - 0.03
        over_xy = (eef + to_tgt)[:, :2]
        held_xy = torch.where(col(low & (d_tgt > 0.3)), eef[:, :2], over_xy)  # far and low: lift first
        held_pos = move(torch.cat([held_xy, col(place_z + off_z)], -1))
        held_g = torch.where((d_tgt > p["place_xy"]) | (obj[:, 2] > tgt[:, 2] + p["drop"] + 0.02 + lift), 1.0, -1.0)
        # reaching: reopen if closed on nothing or away from the object, descend in a funnel, close
        lost = (closed & ~near) | (closed & empty)
        d_xy = (eef[:, :2] - grasp[:, :2]).norm(dim=-1)
        h = (p["funnel_slope"] * (d_xy - p["funnel_free"])).clamp(0, p["approach"])
        funnel = move(torch.cat([grasp[:, :2], col(grasp[:, 2] + h)], -1))
        regrasp = move(torch.cat([grasp[:, :2], col(torch.maximum(eef[:, 2], grasp[:, 2] + p["approach"]))], -1))
        reach_pos = torch.where(col(lost), regrasp, funnel)
        in_box = (d_xy <= p["close_xy"]) & (eef[:, 2] <= grasp[:, 2] + p["close_dz"])
        reach_g = torch.where(~lost & (in_box | (closed & near)), 1.0, -1.0)
        pos = torch.where(col(release), move(eef + 0.1 * up), torch.where(col(held), held_pos, reach_pos))
        g = torch.where(release, -1.0, torch.where(held, held_g, reach_g))
        rot = torch.zeros_like(pos) if rotvec_N_3 is None else self.rotation(rotvec_N_3)
        return torch.cat([pos, rot, col(g)], -1)

    def dist(self, obs: dict, mask_B_T: Tensor) -> Gaussian | GaussianBernoulli:
        priv = obs["observation.environment_state"]
        B, T, P = priv.shape
        state = obs.get("observation.state") if isinstance(obs, dict) else None
        rotvec = None if state is None else state[..., 3:6].reshape(B * T, 3).float()
        return self.labelled(self.action(priv.reshape(B * T, P).float(), rotvec).view(B, T, 7), mask_B_T)
