"""LeRobot 0.3.2 policies (ACT, Diffusion, SmolVLA) behind mmdistill's robot policy interface.

Observations are dicts with LeRobot key names; in a rollout every value has leading dims `[B, T]`
(`observation.state` [B, T, S], `observation.images.image` uint8 [B, T, 3, H, W], `task` list[str]
of length B).  Actions are chunks of K = `chunk_size` actions in environment units, flattened to
D = K * A.

- `ACTGaussianPolicy`:     `dist` = Gaussian(ACT's first K predicted actions, exp(log_std)), with a
                           learnable state-independent `log_std` [K * A].
- `DiffusionPolicyWrapper`: acts with Diffusion Policy's own DDPM/DDIM sampler and trains through its
                           own loss; it has no per-decision Gaussian, so `dist` refuses (see there).
- `SmolVLAFlowPolicy`:     SmolVLA's flow-matching action expert sampled with the Flow-GRPO SDE of
                           `modalities/flow/sde.py`; `step_dist` re-scores a denoising chain.
- `load_lerobot_policy` / `save_lerobot_policy`: LeRobot's own `from_pretrained` / `save_pretrained`
  format, the wrapper's extra parameters (e.g. `log_std`) beside it, compatibility checks first.
- `tiny_act`, `tiny_diffusion`, `tiny_smolvla`, `write_tiny_smolvlm`: random-init CPU-sized models
  that build offline (tests, demos).

Conventions checked against LeRobot's code:
- SmolVLA's flow time is our sigma: `x_t = t * noise + (1 - t) * actions`, velocity `noise - actions`,
  sampled from t = 1 (noise) to t = 0 with Euler steps `x += dt * v`; so `sigma = t` and the
  velocity is used as is.  The flow state is SmolVLA's padded, *normalised* chunk
  [chunk_size, max_action_dim]; two SmolVLAs can score each other's chains only if they share it
  and their action statistics (checked in `step_dist`).
- The inner LeRobot policy always stays in eval mode (dropout off, ACT's latent at the prior mean):
  `dist` is then a deterministic function of the observation, so the log-probs a rollout records
  are the ones re-scoring computes.  Gradients flow all the same.
- LeRobot's `Unnormalize` runs under `torch.no_grad`; the Gaussian mean is unnormalised here with
  the policy's own statistics buffers so that its gradient reaches the network.

    python -m pytest tests/test_robot_lerobot.py -q -o addopts=""
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from mmdistill.errors import CheckpointError, CompatibilityError
from mmdistill.modalities.flow.sde import LogprobReduce, VelocityFn, sample_sde, step_dists, step_velocities
from mmdistill.rollout import Rollout
from mmdistill.stepdist import Gaussian, VelocityStepDist

__all__ = [
    "IMAGE_KEY",
    "WRAPPER_CONFIG",
    "WRAPPER_WEIGHTS",
    "Stats",
    "ACTGaussianPolicy",
    "DiffusionPolicyWrapper",
    "SmolVLAFlowPolicy",
    "flatten_time",
    "set_normalization_stats",
    "check_normalization_stats",
    "check_compatible",
    "load_lerobot_policy",
    "save_lerobot_policy",
    "smolvla_sigmas",
    "tiny_act",
    "tiny_diffusion",
    "tiny_smolvla",
    "write_tiny_smolvlm",
]

IMAGE_KEY = "observation.images.image"
STATE_KEY = "observation.state"
ENV_STATE_KEY = "observation.environment_state"
ACTION_KEY = "action"
WRAPPER_CONFIG = "mmdistill_wrapper.json"
WRAPPER_WEIGHTS = "mmdistill_wrapper.safetensors"
_NORM_MODULES = ("normalize_inputs", "normalize_targets", "unnormalize_outputs")
# LeRobot's ImageNet statistics, used for images when no image statistics are given.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# {feature key: {"mean"/"std" or "min"/"max": array-like}} -- e.g. a LeRobotDataset's `meta.stats`.
Stats = Mapping[str, Mapping[str, Any]]


# ----------------------------------------------------------------------------- observations


def flatten_time(obs_B_T: Mapping[str, Any], B: int, T: int) -> dict[str, Any]:
    """`[B, T, ...]` observations -> `[B * T, ...]` rows (one decision per row); `task` [B] is repeated T times."""
    out: dict[str, Any] = {}
    for key, value in obs_B_T.items():
        if isinstance(value, Tensor):
            if tuple(value.shape[:2]) != (B, T):
                raise ValueError(f"observation {key!r} must have leading dims [B, T] = [{B}, {T}]; got {tuple(value.shape)}")
            out[key] = value.reshape(B * T, *value.shape[2:])
        elif key == "task":
            tasks = [value] * B if isinstance(value, str) else list(value)
            if len(tasks) != B:
                raise ValueError(f"observation 'task' must be one instruction per episode (B = {B}); got {len(tasks)}")
            out[key] = [t for t in tasks for _ in range(T)]
        else:
            out[key] = value
    return out


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _lerobot_batch(obs_N: Mapping[str, Any], config: Any, device: torch.device) -> dict[str, Any]:
    """The policy's input features from mmdistill observations: images uint8 -> float in [0, 1]."""
    from lerobot.configs.types import FeatureType

    batch: dict[str, Any] = {}
    for key, ft in config.input_features.items():
        if key.startswith("observation.images.empty_camera_"):
            continue  # SmolVLA pads missing cameras itself
        if key not in obs_N:
            raise KeyError(
                f"the policy reads {key!r} but the observation has {sorted(obs_N)}; serve that key from the "
                f"environment or use a policy trained on these inputs"
            )
        x = torch.as_tensor(obs_N[key], device=device)
        if ft.type is FeatureType.VISUAL:
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        batch[key] = x.float()
    if "task" in obs_N:
        batch["task"] = list(obs_N["task"]) if not isinstance(obs_N["task"], str) else [obs_N["task"]]
    return batch


# ----------------------------------------------------------------------------- normalisation


def _norm_mode(policy: Any, feature_type: Any) -> str:
    mode = policy.config.normalization_mapping.get(feature_type, "IDENTITY")
    return getattr(mode, "value", mode)


def set_normalization_stats(policy: nn.Module, stats: Stats) -> None:
    """Write mean/std or min/max into every `Normalize` / `Unnormalize` buffer of a LeRobot policy.

    `stats` is keyed by feature (`observation.state`, `action`, ...), e.g. a dataset's `meta.stats`;
    extra keys (count, q01, ...) are ignored.  Images without statistics get ImageNet's mean/std.
    """
    from lerobot.configs.types import FeatureType

    for module_name in _NORM_MODULES:
        module = getattr(policy, module_name)
        for key, ft in module.features.items():
            mode = _norm_mode(policy, ft.type)
            if mode == "IDENTITY":
                continue
            names = ("mean", "std") if mode == "MEAN_STD" else ("min", "max")
            given = stats.get(key, {})
            if ft.type is FeatureType.VISUAL and not all(n in given for n in names):
                given = {"mean": _IMAGENET_MEAN, "std": _IMAGENET_STD, "min": (0.0,) * 3, "max": (1.0,) * 3}
            missing = [n for n in names if n not in given]
            if missing:
                raise ValueError(
                    f"stats[{key!r}] needs {names} for {mode} normalisation; got {sorted(given)}; pass your dataset's "
                    f"meta.stats (or set policy.config.normalization_mapping to the statistics you have)"
                )
            buffer = getattr(module, "buffer_" + key.replace(".", "_"))
            for n in names:
                value = torch.as_tensor(np.asarray(given[n], dtype=np.float32))
                if value.numel() != buffer[n].numel():
                    raise ValueError(
                        f"stats[{key!r}][{n!r}] has {value.numel()} values, the policy's {key} needs "
                        f"{tuple(buffer[n].shape)}; the statistics belong to another robot or camera"
                    )
                buffer[n].data = value.reshape(buffer[n].shape).to(buffer[n].device).clone()


def check_normalization_stats(policy: nn.Module, where: str = "policy") -> None:
    """Refuse a LeRobot policy whose normalisation statistics are missing (LeRobot's inf default) or not finite."""
    for name, tensor in policy.state_dict().items():
        if name.startswith(_NORM_MODULES) and not bool(torch.isfinite(tensor).all()):
            raise CompatibilityError(
                f"{where}: normalisation statistic {name} is missing or not finite; it was saved without dataset "
                f"stats -- call set_normalization_stats(policy, dataset.meta.stats) and save it again"
            )


def _action_stats(policy: nn.Module) -> tuple[str, Tensor, Tensor]:
    """(mode, a, b) with `x = a * z + b` turning a normalised action z into environment units."""
    mode = _norm_mode(policy, "ACTION")
    if mode == "IDENTITY":
        one = torch.ones(policy.config.action_feature.shape, device=_device(policy))
        return mode, one, torch.zeros_like(one)
    buffer = policy.unnormalize_outputs.buffer_action
    if mode == "MEAN_STD":
        return mode, buffer["std"], buffer["mean"]
    half_range = (buffer["max"] - buffer["min"]) / 2  # LeRobot: x = (z + 1) / 2 * (max - min) + min
    return mode, half_range, buffer["min"] + half_range


def _unnormalize_action(policy: nn.Module, z_N_K_A: Tensor) -> Tensor:
    """LeRobot's action unnormalisation, differentiable (LeRobot's own `Unnormalize` is under no_grad)."""
    _, a, b = _action_stats(policy)
    return z_N_K_A * a + b


# ----------------------------------------------------------------------------- wrappers


def _lerobot_type(policy: nn.Module) -> str:
    return policy.config.type


def _available_chunk(config: Any) -> int:
    """The most actions one decision of a LeRobot policy can return (its predicted chunk)."""
    if config.type == "diffusion":
        return int(config.n_action_steps)  # LeRobot's sampler keeps n_action_steps of the horizon
    return int(config.chunk_size)


def _chunk(policy: nn.Module, chunk_size: int | None) -> int:
    K = int(policy.config.n_action_steps) if chunk_size is None else int(chunk_size)
    available = _available_chunk(policy.config)
    if not 1 <= K <= available:
        raise CompatibilityError(
            f"chunk {K}: this {_lerobot_type(policy)} policy predicts {available} actions per decision; "
            f"set the task's chunk to at most {available} or use a policy trained with a longer chunk"
        )
    return K


class _LeRobotWrapper(nn.Module):
    """Shared plumbing: the inner LeRobot policy as `self.lerobot`, kept in eval mode."""

    kind = "lerobot"

    def __init__(self, policy: nn.Module, chunk_size: int | None):
        super().__init__()
        check_normalization_stats(policy, where=f"{_lerobot_type(policy)} policy")
        self.lerobot = policy
        self.chunk_size = _chunk(policy, chunk_size)
        self.action_dim = int(policy.config.action_feature.shape[0])
        self.config: dict[str, Any] = {
            "kind": self.kind, "lerobot_type": _lerobot_type(policy), "chunk_size": self.chunk_size, "action_dim": self.action_dim,
        }
        self.lerobot.eval()

    def train(self, mode: bool = True) -> "_LeRobotWrapper":
        super().train(mode)
        self.lerobot.eval()  # deterministic dist: no dropout, ACT latent at its prior mean
        return self


class ACTGaussianPolicy(_LeRobotWrapper):
    """ACT as a Gaussian policy over the flattened chunk: mean = ACT's first K actions (environment
    units), std = exp(log_std) with a learnable state-independent `log_std` [K * A]."""

    kind = "lerobot_act_gaussian"

    def __init__(self, act: nn.Module, chunk_size: int | None = None, init_log_std: float = -0.5):
        if _lerobot_type(act) != "act":
            raise CompatibilityError(f"ACTGaussianPolicy wraps an ACT policy; got a {_lerobot_type(act)!r} policy")
        super().__init__(act, chunk_size)
        self.log_std = nn.Parameter(torch.full((self.chunk_size * self.action_dim,), float(init_log_std), device=_device(act)))
        self.config["init_log_std"] = float(init_log_std)

    def chunk_mean(self, obs_N: Mapping[str, Any]) -> Tensor:
        """ACT's predicted chunk `[N, K * A]` in environment units, with gradient."""
        from lerobot.constants import OBS_IMAGES

        p = self.lerobot
        batch = p.normalize_inputs(_lerobot_batch(obs_N, p.config, _device(p)))
        if p.config.image_features:
            batch[OBS_IMAGES] = [batch[key] for key in p.config.image_features]
        z_N_C_A = p.model(batch)[0]
        return _unnormalize_action(p, z_N_C_A[:, : self.chunk_size]).flatten(1)

    def dist(self, obs: Mapping[str, Any], mask_B_T: Tensor) -> Gaussian:
        B, T = mask_B_T.shape
        mean_B_T_D = self.chunk_mean(flatten_time(obs, B, T)).reshape(B, T, -1)
        return Gaussian(mean_B_T_D, self.log_std.exp().expand_as(mean_B_T_D), mask_B_T)


class DiffusionPolicyWrapper(_LeRobotWrapper):
    """Diffusion Policy as a teacher that acts (its own sampler) and a BC student (its own loss).

    No `dist`: the marginal density of a DDPM chunk is intractable, and exposing its denoising chain
    as Gaussian steps would mean re-deriving diffusers' DDPM posterior (clipped x0, variance types)
    outside the scheduler.  Flow students/teachers use `SmolVLAFlowPolicy` instead.
    """

    kind = "lerobot_diffusion"

    def __init__(self, diffusion: nn.Module, chunk_size: int | None = None):
        if _lerobot_type(diffusion) != "diffusion":
            raise CompatibilityError(f"DiffusionPolicyWrapper wraps a Diffusion policy; got a {_lerobot_type(diffusion)!r} policy")
        super().__init__(diffusion, chunk_size)

    def dist(self, obs: Mapping[str, Any], mask_B_T: Tensor) -> Gaussian:
        raise NotImplementedError(
            "Diffusion Policy has no per-step action density; use it as a teacher-rollout actor (act) or train it "
            "by behaviour cloning through its own loss (bc_loss), or pick ACT (Gaussian) / SmolVLA (flow SDE) for "
            "objectives that need log-probs or KLs"
        )

    def _history(self, obs_N: Mapping[str, Any]) -> dict[str, Any]:
        """Observations `[N, ...]` (repeated over the n_obs_steps window, as LeRobot does at an episode's
        start) or `[N, n_obs_steps, ...]`, normalised, images stacked as LeRobot's `observation.images`."""
        from lerobot.constants import OBS_IMAGES
        from lerobot.configs.types import FeatureType

        p = self.lerobot
        n = int(p.config.n_obs_steps)
        batch = _lerobot_batch(obs_N, p.config, _device(p))
        for key, ft in p.config.input_features.items():
            x = batch[key]
            single = x.dim() == len(ft.shape) + 1
            batch[key] = x.unsqueeze(1).expand(x.shape[0], n, *x.shape[1:]) if single else x
            if batch[key].shape[1] != n:
                raise ValueError(f"{key}: Diffusion Policy reads {n} observation steps; got {tuple(x.shape)}")
            if ft.type is FeatureType.VISUAL and tuple(batch[key].shape[2:]) != tuple(ft.shape):
                raise ValueError(f"{key}: the policy was built for images {tuple(ft.shape)}; got {tuple(batch[key].shape[2:])}")
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
        return _unnormalize_action(p, z_N_H_A[:, start : start + self.chunk_size]).flatten(1)

    def bc_loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """LeRobot's diffusion loss on a training batch in LeRobot's layout (observations
        `[N, n_obs_steps, ...]`, `action` [N, horizon, A], `action_is_pad` [N, horizon])."""
        p = self.lerobot
        lerobot_batch = _lerobot_batch(batch, p.config, _device(p))
        lerobot_batch[ACTION_KEY] = torch.as_tensor(batch[ACTION_KEY], device=_device(p)).float()
        lerobot_batch["action_is_pad"] = torch.as_tensor(batch["action_is_pad"], device=_device(p)).bool()
        loss, _ = p.forward(lerobot_batch)
        return loss, {"loss": float(loss.detach())}


def smolvla_sigmas(num_steps: int) -> Tensor:
    """The `[num_steps + 1]` noise levels SmolVLA's own sampler visits (its float32 `time += dt` loop,
    from 1 down), ending in 0, so the SDE sampler's model sees exactly SmolVLA's timesteps."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32)
    t, out = torch.tensor(1.0, dtype=torch.float32), []
    while t >= -dt / 2:
        out.append(t.clone())
        t = t + dt
    return torch.stack(out + [torch.zeros(())])


class SmolVLAFlowPolicy(_LeRobotWrapper):
    """SmolVLA's flow-matching action expert sampled with the Flow-GRPO SDE (`sample_sde`).

    `sample_chunk` returns the executed chunk and the denoising chain (a `Rollout` over denoising
    steps whose `steps` is a `FlowSteps`); `step_dist` re-scores a chain as a `VelocityStepDist`.
    Observation values have one decision per row (`[N, ...]`); use `flatten_time` for `[B, T, ...]`.
    """

    kind = "lerobot_smolvla_flow"

    def __init__(self, smolvla: nn.Module, chunk_size: int | None = None):
        if _lerobot_type(smolvla) != "smolvla":
            raise CompatibilityError(f"SmolVLAFlowPolicy wraps a SmolVLA policy; got a {_lerobot_type(smolvla)!r} policy")
        if smolvla.config.adapt_to_pi_aloha:
            raise CompatibilityError("SmolVLA with adapt_to_pi_aloha=True is not supported; its Aloha action transform is not part of the flow")
        super().__init__(smolvla, chunk_size)
        self.config["num_steps"] = int(smolvla.config.num_steps)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return int(self.lerobot.config.chunk_size), int(self.lerobot.config.max_action_dim)

    def dist(self, obs: Mapping[str, Any], mask_B_T: Tensor) -> Gaussian:
        raise NotImplementedError(
            "SmolVLA has no per-decision Gaussian; sample with sample_chunk(obs, ...) and score the denoising chain "
            "with step_dist(obs, rollout) (a VelocityStepDist), as the flow objectives do"
        )

    def _prefix(self, obs_N: Mapping[str, Any]) -> tuple[Tensor, Any]:
        """SmolVLA's prefix (images, language, state) through the VLM: pad masks and the key/value cache
        that every denoising step attends to (gradient flows when enabled)."""
        from lerobot.policies.smolvla.modeling_smolvla import make_att_2d_masks

        p, m = self.lerobot, self.lerobot.model
        batch = p._prepare_batch(_lerobot_batch(obs_N, p.config, _device(p)))
        images, img_masks = p.prepare_images(batch)
        state = p.prepare_state(batch)
        lang_tokens, lang_masks = p.prepare_language(batch)
        embs, pad_masks, att_masks = m.embed_prefix(images, img_masks, lang_tokens, lang_masks, state=state)
        _, past_key_values = m.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(pad_masks, att_masks),
            position_ids=torch.cumsum(pad_masks, dim=1) - 1,
            past_key_values=None,
            inputs_embeds=[embs, None],
            use_cache=m.config.use_cache,
            fill_kv_cache=True,
        )
        return pad_masks, past_key_values

    def velocity_fn(self, obs_N: Mapping[str, Any]) -> VelocityFn:
        """`v(x [N, chunk, max_action_dim], sigma [N], cond, guidance)`: SmolVLA's `denoise_step`; sigma is its time."""
        pad_masks, past_key_values = self._prefix(obs_N)
        model = self.lerobot.model

        def v(x: Tensor, sigma_N: Tensor, cond: Any, guidance_scale: float) -> Tensor:
            return model.denoise_step(pad_masks, past_key_values, x, sigma_N)

        return v

    def _action_signature(self) -> tuple[float, ...]:
        _, a, b = _action_stats(self.lerobot)
        return tuple(torch.cat([a.flatten(), b.flatten()]).tolist())

    @torch.no_grad()
    def sample_chunk(
        self,
        obs: Mapping[str, Any],
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
        noise_level: float = 0.7,
        *,
        noise: Tensor | None = None,
        logprob_reduce: LogprobReduce = "sum",
    ) -> tuple[Tensor, Rollout]:
        """Sample one chunk per observation row: `(actions [N, K * A] in environment units, rollout)`.

        The rollout runs over the `num_steps` denoising steps (default: SmolVLA's `num_steps`);
        noise_level 0 is SmolVLA's own Euler sampler.  `noise` [N, chunk, max_action_dim] fixes the
        initial state (otherwise drawn from `generator`).
        """
        p = self.lerobot
        N = len(next(v for v in obs.values() if isinstance(v, Tensor)))
        device = _device(p)
        if noise is None:
            noise = torch.randn((N, *self.latent_shape), generator=generator, device=device)
        if tuple(noise.shape) != (N, *self.latent_shape):
            raise ValueError(f"noise must be [N, chunk, max_action_dim] = {[N, *self.latent_shape]}; got {list(noise.shape)}")
        sigmas = smolvla_sigmas(int(p.config.num_steps) if num_steps is None else int(num_steps))
        rollout = sample_sde(
            self.velocity_fn(obs), noise.float(), sigmas, cond=dict(obs),
            noise_level=noise_level, logprob_reduce=logprob_reduce, generator=generator,
        )
        rollout.extras["action_signature"] = self._action_signature()
        z_N_C_M = rollout.extras["x0_B_C_H_W"]
        actions = _unnormalize_action(p, z_N_C_M[:, : self.chunk_size, : self.action_dim]).flatten(1)
        return actions, rollout

    def step_dist(self, obs: Mapping[str, Any] | None, rollout: Rollout) -> VelocityStepDist:
        """This model's velocities on the chain's states and, for SDE chains, its step Gaussians.
        `obs` defaults to the observations the chain was sampled for (`rollout.steps.cond`)."""
        s = rollout.steps
        if tuple(s.latent_shape) != self.latent_shape:
            raise CompatibilityError(
                f"the chain's flow state is {tuple(s.latent_shape)} (chunk, max_action_dim), this SmolVLA's is "
                f"{self.latent_shape}; teacher and student must share chunk_size and max_action_dim"
            )
        signature = rollout.extras.get("action_signature")
        if signature is not None and not np.allclose(signature, self._action_signature()):
            raise CompatibilityError(
                "the chain was sampled by a SmolVLA with other action statistics; its flow state is normalised "
                "differently -- give teacher and student the same action stats (set_normalization_stats)"
            )
        v_B_T_D = step_velocities(self.velocity_fn(s.cond if obs is None else obs), rollout)
        if s.noise_level > 0:
            return VelocityStepDist(v_B_T_D, step_dists(rollout, v_B_T_D), s.kl_weight_B_T(), s.dt_B_T, rollout.mask_B_T, s.logprob_reduce)
        return VelocityStepDist(v_B_T_D, None, None, s.dt_B_T, rollout.mask_B_T, s.logprob_reduce)


_WRAPPERS: dict[str, type[_LeRobotWrapper]] = {
    "act": ACTGaussianPolicy,
    "diffusion": DiffusionPolicyWrapper,
    "smolvla": SmolVLAFlowPolicy,
}


# ----------------------------------------------------------------------------- load / save


def check_compatible(config: Any, expect_action_dim: int, expect_chunk: int, where: str = "policy") -> None:
    """Config-level checks, cheap enough to run before any weight is read: policy type, action size, chunk."""
    kind = config.type
    if kind not in _WRAPPERS:
        raise CompatibilityError(f"{where}: LeRobot policy type {kind!r} is not supported; use one of {sorted(_WRAPPERS)}")
    action = config.action_feature
    if action is None or int(action.shape[0]) != int(expect_action_dim):
        got = None if action is None else int(action.shape[0])
        raise CompatibilityError(
            f"{where}: the policy outputs {got}-D actions, the environment takes {expect_action_dim}-D; use a policy "
            f"trained for this robot's action space"
        )
    available = _available_chunk(config)
    if not 1 <= int(expect_chunk) <= available:
        raise CompatibilityError(
            f"{where}: chunk {expect_chunk} requested, the {kind} policy predicts {available} actions per decision; "
            f"set the task's chunk to at most {available}"
        )


def load_lerobot_policy(
    path: str | Path, expect_action_dim: int, expect_chunk: int, device: str = "cpu", init_log_std: float = -0.5
) -> _LeRobotWrapper:
    """Load a LeRobot checkpoint directory (its class's `from_pretrained`) and wrap it.

    Refuses, with one line, before reading weights: a missing config, another policy type, another
    action size, a chunk longer than the policy predicts; after: missing or non-finite normalisation
    statistics, wrapper parameters of another shape.  SmolVLA's VLM config and tokenizer are taken
    from `path/vlm` when present (written by `save_lerobot_policy`), so the directory can move.
    """
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: no LeRobot config.json; pass a local directory written by save_pretrained / save_lerobot_policy "
            f"(hub ids are not downloaded at run time)"
        )
    config = PreTrainedConfig.from_pretrained(path)
    check_compatible(config, expect_action_dim, expect_chunk, where=str(path))
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: model.safetensors is missing; the checkpoint is incomplete, save it again")
    config.device = device
    if config.type == "smolvla":
        config.load_vlm_weights = False  # every weight comes from model.safetensors
        if (path / "vlm").is_dir():
            config.vlm_model_name = str((path / "vlm").resolve())
    policy = get_policy_class(config.type).from_pretrained(path, config=config)
    check_normalization_stats(policy, where=str(path))
    kwargs: dict[str, Any] = {"chunk_size": int(expect_chunk)}
    if config.type == "act":
        kwargs["init_log_std"] = init_log_std
    wrapper = _WRAPPERS[config.type](policy, **kwargs)
    extra = path / WRAPPER_WEIGHTS
    if extra.is_file():
        from safetensors.torch import load_file

        own = dict(_own_parameters(wrapper))
        for name, value in load_file(str(extra), device=str(device)).items():
            if name not in own or own[name].shape != value.shape:
                want = None if name not in own else tuple(own[name].shape)
                raise CompatibilityError(
                    f"{extra}: {name} has shape {tuple(value.shape)}, this wrapper needs {want} (chunk {expect_chunk} x "
                    f"action {expect_action_dim}); load with the chunk it was trained with or delete the file to start from init"
                )
            with torch.no_grad():
                own[name].copy_(value)
    return wrapper


def _own_parameters(wrapper: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in wrapper.named_parameters() if not n.startswith("lerobot.")]


def save_lerobot_policy(policy: nn.Module, out_dir: str | Path) -> Path:
    """Write LeRobot's own format (`save_pretrained`: config.json + model.safetensors, so e.g.
    `ACTPolicy.from_pretrained(out_dir)` loads it) plus the wrapper's own parameters in
    `mmdistill_wrapper.safetensors` and its config in `mmdistill_wrapper.json`.  A SmolVLA whose VLM
    config/tokenizer is a local directory gets a copy in `out_dir/vlm`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inner = policy.lerobot if isinstance(policy, _LeRobotWrapper) else policy
    restore = None
    if inner.config.type == "smolvla" and Path(inner.config.vlm_model_name).is_dir():
        vlm_dir = (out_dir / "vlm").resolve()
        if Path(inner.config.vlm_model_name).resolve() != vlm_dir:
            shutil.copytree(inner.config.vlm_model_name, vlm_dir, dirs_exist_ok=True)
        restore, inner.config.vlm_model_name = inner.config.vlm_model_name, str(vlm_dir)
    try:
        inner.save_pretrained(out_dir)
    finally:
        if restore is not None:
            inner.config.vlm_model_name = restore
    if isinstance(policy, _LeRobotWrapper):
        own = {n: p.detach().contiguous().cpu() for n, p in _own_parameters(policy)}
        if own:
            save_file(own, str(out_dir / WRAPPER_WEIGHTS))
        (out_dir / WRAPPER_CONFIG).write_text(json.dumps(policy.config, indent=2))
    return out_dir


# ----------------------------------------------------------------------------- tiny builders


def _features(state_dim: int, action_dim: int, image_shape: tuple[int, int, int] | None, env_state_dim: int | None) -> tuple[dict, dict]:
    from lerobot.configs.types import FeatureType, PolicyFeature

    inputs = {STATE_KEY: PolicyFeature(FeatureType.STATE, (int(state_dim),))}
    if image_shape is not None:
        inputs[IMAGE_KEY] = PolicyFeature(FeatureType.VISUAL, tuple(int(s) for s in image_shape))
    if env_state_dim is not None:
        inputs[ENV_STATE_KEY] = PolicyFeature(FeatureType.ENV, (int(env_state_dim),))
    return inputs, {ACTION_KEY: PolicyFeature(FeatureType.ACTION, (int(action_dim),))}


def _mapping_from_stats(stats: Stats, defaults: dict[str, str]) -> dict[str, Any]:
    """The model's default normalisation per feature type, except that STATE / ACTION switch to the
    other mode (MEAN_STD <-> MIN_MAX) when only that mode's statistics are given."""
    from lerobot.configs.types import NormalizationMode

    needs = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max")}
    mapping = {k: NormalizationMode(v) for k, v in defaults.items()}
    for feature_type, key in (("STATE", STATE_KEY), ("ACTION", ACTION_KEY)):
        given = stats.get(key, {})
        if all(n in given for n in needs[mapping[feature_type].value]):
            continue
        for mode, names in needs.items():
            if all(n in given for n in names):
                mapping[feature_type] = NormalizationMode(mode)
                break
    return mapping


def _build(policy_cls: Any, config: Any, stats: Stats, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = policy_cls(config)
    set_normalization_stats(policy, stats)
    return policy.to(config.device).eval()


def tiny_act(
    state_dim: int, action_dim: int, chunk_size: int, stats: Stats, *,
    image_shape: tuple[int, int, int] | None = (3, 32, 32), env_state_dim: int | None = None,
    dim_model: int = 32, seed: int = 0, device: str = "cpu", **overrides: Any,
) -> nn.Module:
    """A random-init LeRobot `ACTPolicy` (resnet18 backbone without pretrained weights, 1-layer transformers)."""
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.act.modeling_act import ACTPolicy

    inputs, outputs = _features(state_dim, action_dim, image_shape, env_state_dim)
    config = ACTConfig(
        input_features=inputs, output_features=outputs, device=device,
        normalization_mapping=_mapping_from_stats(stats, {"VISUAL": "MEAN_STD", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}),
        chunk_size=chunk_size, n_action_steps=chunk_size, pretrained_backbone_weights=None,
        dim_model=dim_model, n_heads=2, dim_feedforward=2 * dim_model, n_encoder_layers=1, n_decoder_layers=1,
        n_vae_encoder_layers=1, latent_dim=8, **overrides,
    )
    return _build(ACTPolicy, config, stats, seed)


def tiny_diffusion(
    state_dim: int, action_dim: int, chunk_size: int, stats: Stats, *,
    image_shape: tuple[int, int, int] | None = (3, 32, 32), env_state_dim: int | None = None,
    horizon: int = 8, n_obs_steps: int = 2, num_inference_steps: int = 4, seed: int = 0, device: str = "cpu", **overrides: Any,
) -> nn.Module:
    """A random-init LeRobot `DiffusionPolicy` (2-level U-Net of width 16/32, a few DDPM steps)."""
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    inputs, outputs = _features(state_dim, action_dim, image_shape, env_state_dim)
    config = DiffusionConfig(
        input_features=inputs, output_features=outputs, device=device,
        normalization_mapping=_mapping_from_stats(stats, {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ACTION": "MIN_MAX"}),
        n_obs_steps=n_obs_steps, horizon=horizon, n_action_steps=chunk_size, crop_shape=None,
        down_dims=(16, 32), kernel_size=3, n_groups=4, diffusion_step_embed_dim=16, spatial_softmax_num_keypoints=8,
        num_train_timesteps=100, num_inference_steps=num_inference_steps, **overrides,
    )
    return _build(DiffusionPolicy, config, stats, seed)


def write_tiny_smolvlm(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, image_size: int = 32) -> Path:
    """Write a tiny SmolVLM config and processor (byte-level tokenizer) that SmolVLA builds from offline.

    SmolVLA reads `AutoConfig` and `AutoProcessor(...).tokenizer` from `vlm_model_name`.  The
    processor saved is `Idefics3Processor` (SmolVLM's parent): transformers' `SmolVLMProcessor`
    needs the `num2words` package, which this environment lacks, and SmolVLA only uses the
    tokenizer (with SmolVLM's named image tokens) anyway.  The tokenizer is byte-level BPE without
    merges: every instruction tokenizes, one token per byte.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig
    from transformers.models.idefics3 import Idefics3ImageProcessor, Idefics3Processor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    named = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", *named.values(), *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        extra_special_tokens=named,
    )
    patch = image_size // 4  # 16 patches; SmolVLM's pixel shuffle (scale 2) leaves 4 image tokens
    SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=patch),
        text_config=dict(model_type="llama", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=hidden_size // 4, vocab_size=len(vocab), max_position_embeddings=512),
        scale_factor=2, image_token_id=vocab["<image>"],
    ).save_pretrained(out_dir)
    Idefics3Processor(image_processor=Idefics3ImageProcessor(), tokenizer=tokenizer, image_seq_len=4).save_pretrained(out_dir)
    return out_dir


def tiny_smolvla(
    state_dim: int, action_dim: int, chunk_size: int, stats: Stats, vlm_dir: str | Path, *,
    image_shape: tuple[int, int, int] = (3, 32, 32), num_steps: int = 4, max_dim: int = 32,
    seed: int = 0, device: str = "cpu", **overrides: Any,
) -> nn.Module:
    """A random-init LeRobot `SmolVLAPolicy` on the tiny VLM of `write_tiny_smolvlm(vlm_dir)`
    (`load_vlm_weights=False`: nothing is downloaded)."""
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    vlm_dir = Path(vlm_dir)
    if not (vlm_dir / "config.json").is_file():
        raise FileNotFoundError(f"{vlm_dir}: no VLM config; create it with write_tiny_smolvlm({str(vlm_dir)!r}) first")
    inputs, outputs = _features(state_dim, action_dim, image_shape, None)
    config = SmolVLAConfig(
        input_features=inputs, output_features=outputs, device=device,
        normalization_mapping=_mapping_from_stats(stats, {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}),
        vlm_model_name=str(vlm_dir.resolve()), load_vlm_weights=False, chunk_size=chunk_size, n_action_steps=chunk_size,
        num_steps=num_steps, resize_imgs_with_padding=tuple(image_shape[1:]), max_state_dim=max_dim, max_action_dim=max_dim,
        num_vlm_layers=-1, **overrides,
    )
    return _build(SmolVLAPolicy, config, stats, seed)
