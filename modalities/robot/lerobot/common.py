"""What the three LeRobot wrappers share: observation batches, normalisation, the wrapper base
class, compatibility checks, and LeRobot's own `save_pretrained` / `from_pretrained` format.

Every LeRobot import here is lazy (inside the function that needs it): lerobot is an optional,
heavy dependency (`pip install -e '.[robot]'`), and the robot modality must import without it.

    python -m pytest tests/test_robot_lerobot.py -q -o addopts="" -k "round_trip or compatibility"
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmdistill.errors import CheckpointError, CompatibilityError

IMAGE_KEY = "observation.images.image"
STATE_KEY = "observation.state"
ENV_STATE_KEY = "observation.environment_state"
ACTION_KEY = "action"
WRAPPER_CONFIG = "mmdistill_wrapper.json"
WRAPPER_WEIGHTS = "mmdistill_wrapper.safetensors"
NORM_MODULES = ("normalize_inputs", "normalize_targets", "unnormalize_outputs")
# LeRobot's ImageNet statistics, used for images when no image statistics are given.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# {feature key: {"mean"/"std" or "min"/"max": array-like}} -- e.g. a LeRobotDataset's `meta.stats`.
Stats = Mapping[str, Mapping[str, Any]]


# ----------------------------------------------------------------------------- observations


def flatten_time(obs_B_T: Mapping[str, Any], B: int, T: int) -> dict[str, Any]:
    """`[B, T, ...]` observations -> `[B * T, ...]` rows (one decision per row); `task` [B] is repeated T times."""
    out: dict[str, Any] = {}
    for key, value in obs_B_T.items():
        if isinstance(value, Tensor):
            if tuple(value.shape[:2]) != (B, T):
                raise ValueError(
                    f"observation {key!r} must have leading dims [B, T] = [{B}, {T}]; got {tuple(value.shape)}"
                )
            out[key] = value.reshape(B * T, *value.shape[2:])
        elif key == "task":
            tasks = [value] * B if isinstance(value, str) else list(value)
            if len(tasks) != B:
                raise ValueError(f"observation 'task' must be one instruction per episode (B = {B}); got {len(tasks)}")
            out[key] = [t for t in tasks for _ in range(T)]
        else:
            out[key] = value
    return out


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def lerobot_batch(obs_N: Mapping[str, Any], config: Any, device: torch.device) -> dict[str, Any]:
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


def norm_mode(policy: Any, feature_type: Any) -> str:
    mode = policy.config.normalization_mapping.get(feature_type, "IDENTITY")
    return getattr(mode, "value", mode)


def set_normalization_stats(policy: nn.Module, stats: Stats) -> None:
    """Write mean/std or min/max into every `Normalize` / `Unnormalize` buffer of a LeRobot policy.

    `stats` is keyed by feature (`observation.state`, `action`, ...), e.g. a dataset's `meta.stats`;
    extra keys (count, q01, ...) are ignored.  Images without statistics get ImageNet's mean/std.
    """
    from lerobot.configs.types import FeatureType

    for module_name in NORM_MODULES:
        module = getattr(policy, module_name)
        for key, ft in module.features.items():
            mode = norm_mode(policy, ft.type)
            if mode == "IDENTITY":
                continue
            names = ("mean", "std") if mode == "MEAN_STD" else ("min", "max")
            given = stats.get(key, {})
            if ft.type is FeatureType.VISUAL and not all(n in given for n in names):
                given = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "min": (0.0,) * 3, "max": (1.0,) * 3}
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


PROCESSOR_STATS = (
    "policy_preprocessor_step_*_normalizer_processor.safetensors",
    "policy_postprocessor_step_*_unnormalizer_processor.safetensors",
)


def processor_stats(path: str | Path) -> dict[str, dict[str, Tensor]]:
    """The dataset statistics a LeRobot checkpoint saved by its processor pipeline (LeRobot >= 0.4
    writes them beside model.safetensors, keyed `FEATURE.STAT`, e.g. `action.mean`), as
    `{feature: {stat: tensor}}`; empty when the checkpoint has no such file (0.3 keeps them in the
    policy's own buffers)."""
    out: dict[str, dict[str, Tensor]] = {}
    for pattern in PROCESSOR_STATS:
        for file in sorted(Path(path).glob(pattern)):
            for flat, tensor in load_file(str(file)).items():
                feature, _, stat = flat.rpartition(".")
                if feature:
                    out.setdefault(feature, {})[stat] = tensor
    return out


def check_normalization_stats(policy: nn.Module, where: str = "policy") -> None:
    """Refuse a LeRobot policy whose normalisation statistics are missing (LeRobot's inf default) or not finite."""
    for name, tensor in policy.state_dict().items():
        if name.startswith(NORM_MODULES) and not bool(torch.isfinite(tensor).all()):
            raise CompatibilityError(
                f"{where}: normalisation statistic {name} is missing or not finite; it was saved without dataset "
                f"stats -- call set_normalization_stats(policy, dataset.meta.stats) and save it again"
            )


def action_stats(policy: nn.Module) -> tuple[str, Tensor, Tensor]:
    """(mode, a, b) with `x = a * z + b` turning a normalised action z into environment units."""
    mode = norm_mode(policy, "ACTION")
    if mode == "IDENTITY":
        one = torch.ones(policy.config.action_feature.shape, device=device_of(policy))
        return mode, one, torch.zeros_like(one)
    buffer = policy.unnormalize_outputs.buffer_action
    if mode == "MEAN_STD":
        return mode, buffer["std"], buffer["mean"]
    half_range = (buffer["max"] - buffer["min"]) / 2  # LeRobot: x = (z + 1) / 2 * (max - min) + min
    return mode, half_range, buffer["min"] + half_range


def unnormalize_action(policy: nn.Module, z_N_K_A: Tensor) -> Tensor:
    """LeRobot's action unnormalisation, differentiable (LeRobot's own `Unnormalize` is under no_grad)."""
    _, a, b = action_stats(policy)
    return z_N_K_A * a + b


# ----------------------------------------------------------------------------- the wrapper base class


def lerobot_type(policy: nn.Module) -> str:
    return policy.config.type


class LeRobotWrapper(nn.Module):
    """Shared plumbing: the inner LeRobot policy as `self.lerobot`, kept in eval mode.

    A subclass wraps one LeRobot policy type (`lerobot_type`) and registers itself with
    `@register_wrapper`; the class-level hooks below are what loading and saving ask of it."""

    kind = "lerobot"
    lerobot_type = ""  # LeRobot's `config.type` of the policies this class wraps

    def __init__(self, policy: nn.Module, chunk_size: int | None):
        super().__init__()
        check_normalization_stats(policy, where=f"{lerobot_type(policy)} policy")
        self.lerobot = policy
        self.chunk_size = self._chunk(policy, chunk_size)
        self.action_dim = int(policy.config.action_feature.shape[0])
        self.config: dict[str, Any] = {
            "kind": self.kind,
            "lerobot_type": lerobot_type(policy),
            "chunk_size": self.chunk_size,
            "action_dim": self.action_dim,
        }
        self.lerobot.eval()

    def train(self, mode: bool = True) -> LeRobotWrapper:
        super().train(mode)
        self.lerobot.eval()  # deterministic dist: no dropout, ACT latent at its prior mean
        return self

    @classmethod
    def _chunk(cls, policy: nn.Module, chunk_size: int | None) -> int:
        K = int(policy.config.n_action_steps) if chunk_size is None else int(chunk_size)
        available = cls.available_chunk(policy.config)
        if not 1 <= K <= available:
            raise CompatibilityError(
                f"chunk {K}: this {lerobot_type(policy)} policy predicts {available} actions per decision; "
                f"set the task's chunk to at most {available} or use a policy trained with a longer chunk"
            )
        return K

    # ------------------------------------------------------------------ hooks for load / save

    @staticmethod
    def available_chunk(config: Any) -> int:
        """The most actions one decision of this LeRobot policy can return (its predicted chunk)."""
        return int(config.chunk_size)

    @staticmethod
    def prepare_load(config: Any, path: Path) -> None:
        """Adjust a checkpoint's config before `from_pretrained` builds the policy (default: nothing)."""

    @classmethod
    def wrap(cls, policy: nn.Module, chunk_size: int, init_log_std: float) -> LeRobotWrapper:
        """The loaded LeRobot policy wrapped; `init_log_std` is for wrappers with a Gaussian head."""
        return cls(policy, chunk_size)

    @staticmethod
    @contextlib.contextmanager
    def saving(policy: nn.Module, out_dir: Path) -> Iterator[None]:
        """Context around `save_pretrained(out_dir)` of the inner policy (default: nothing)."""
        yield


WRAPPERS: dict[str, type[LeRobotWrapper]] = {}  # LeRobot policy type -> wrapper class


def register_wrapper(cls: type[LeRobotWrapper]) -> type[LeRobotWrapper]:
    """Class decorator: `load_lerobot_policy` wraps checkpoints of `cls.lerobot_type` with `cls`."""
    WRAPPERS[cls.lerobot_type] = cls
    return cls


# ----------------------------------------------------------------------------- load / save


def check_compatible(config: Any, expect_action_dim: int, expect_chunk: int, where: str = "policy") -> None:
    """Config-level checks, cheap enough to run before any weight is read: policy type, action size, chunk."""
    kind = config.type
    if kind not in WRAPPERS:
        raise CompatibilityError(
            f"{where}: LeRobot policy type {kind!r} is not supported; use one of {sorted(WRAPPERS)}"
        )
    action = config.action_feature
    if action is None or int(action.shape[0]) != int(expect_action_dim):
        got = None if action is None else int(action.shape[0])
        raise CompatibilityError(
            f"{where}: the policy outputs {got}-D actions, the environment takes {expect_action_dim}-D; use a policy "
            f"trained for this robot's action space"
        )
    available = WRAPPERS[kind].available_chunk(config)
    if not 1 <= int(expect_chunk) <= available:
        raise CompatibilityError(
            f"{where}: chunk {expect_chunk} requested, the {kind} policy predicts {available} actions per decision; "
            f"set the task's chunk to at most {available}"
        )


def load_lerobot_policy(
    path: str | Path, expect_action_dim: int, expect_chunk: int, device: str = "cpu", init_log_std: float = -0.5
) -> LeRobotWrapper:
    """Load a LeRobot checkpoint directory (its class's `from_pretrained`) and wrap it.

    Refuses, with one line, before reading weights: a missing config, another policy type, another
    action size, a chunk longer than the policy predicts; after: missing or non-finite normalisation
    statistics, wrapper parameters of another shape.  SmolVLA's VLM config and tokenizer are taken
    from `path/vlm` when present (written by `save_lerobot_policy`), so the directory can move.
    Statistics a checkpoint carries in processor files (`processor_stats`) replace the buffers'.
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
    cls = WRAPPERS[config.type]
    cls.prepare_load(config, path)
    policy = get_policy_class(config.type).from_pretrained(path, config=config)
    carried = processor_stats(path)
    if carried:  # newer LeRobot checkpoints keep their dataset statistics beside the weights
        set_normalization_stats(policy, carried)
    check_normalization_stats(policy, where=str(path))
    wrapper = cls.wrap(policy, int(expect_chunk), init_log_std)
    extra = path / WRAPPER_WEIGHTS
    if extra.is_file():
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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inner = policy.lerobot if isinstance(policy, LeRobotWrapper) else policy
    with WRAPPERS.get(inner.config.type, LeRobotWrapper).saving(inner, out_dir):
        inner.save_pretrained(out_dir)
    if isinstance(policy, LeRobotWrapper):
        own = {n: p.detach().contiguous().cpu() for n, p in _own_parameters(policy)}
        if own:
            save_file(own, str(out_dir / WRAPPER_WEIGHTS))
        (out_dir / WRAPPER_CONFIG).write_text(json.dumps(policy.config, indent=2))
    return out_dir


# ----------------------------------------------------------------------------- tiny builders


def policy_features(
    state_dim: int,
    action_dim: int,
    image_shape: tuple[int, int, int] | None,
    env_state_dim: int | None,
    image_keys: tuple[str, ...] = (IMAGE_KEY,),
) -> tuple[dict, dict]:
    """LeRobot input and output features of a robot with a state, optionally cameras (one feature of
    `image_shape` per key of `image_keys`) and a privileged state."""
    from lerobot.configs.types import FeatureType, PolicyFeature

    inputs = {STATE_KEY: PolicyFeature(FeatureType.STATE, (int(state_dim),))}
    if image_shape is not None:
        for key in image_keys:
            inputs[key] = PolicyFeature(FeatureType.VISUAL, tuple(int(s) for s in image_shape))
    if env_state_dim is not None:
        inputs[ENV_STATE_KEY] = PolicyFeature(FeatureType.ENV, (int(env_state_dim),))
    return inputs, {ACTION_KEY: PolicyFeature(FeatureType.ACTION, (int(action_dim),))}


def mapping_from_stats(stats: Stats, defaults: dict[str, str]) -> dict[str, Any]:
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


def build_policy(policy_cls: Any, config: Any, stats: Stats, seed: int) -> nn.Module:
    """A random-init LeRobot policy from `config` (seeded without touching the global RNG), statistics set."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = policy_cls(config)
    set_normalization_stats(policy, stats)
    return policy.to(config.device).eval()
