"""The flow adapter's own config sections: a stage's `rollout:` and `eval:`, and `models.NAME.tiny`.

Named in `FlowAdapter.spec` (`AdapterSpec.rollout_config`, `eval_config`, `tiny_config`); the
core builds them from the YAML and each `__post_init__` checks its ranges (errors name the bare
field; the core prefixes `stages.NAME.rollout.` / `stages.NAME.eval.` / `models.NAME.tiny.`).
The SDE settings are described in docs/objectives.md sections 6.1 and 6.2.

    python -c "from mmdistill.modalities.flow.config import FlowRolloutConfig as C; print(C())"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


def _at_least(cfg: object, **lows: float) -> None:
    """`ValueError("num_steps: 0 is below the smallest allowed value 1")` for the first field below its bound."""
    for key, low in lows.items():
        value = cfg.__dict__[key]
        if value is not None and value < low:
            raise ValueError(f"{key}: {value} is below the smallest allowed value {low}")


def _one_of(key: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: {value!r} is not one of {list(allowed)}")


@dataclass
class FlowRolloutConfig:
    """How the student (or teacher) samples: `num_steps` SDE steps with noise level `noise_level`
    (0 = the deterministic Euler ODE: no step log-probs), classifier-free guidance
    `guidance_scale` (<= 1: none), and the log-prob convention over the latent dimensions
    ("sum": the true log-density; "mean": Flow-GRPO's code).  `group_size` images per prompt
    (GRPO groups); `temperature` is not used by flow sampling (kept for the core's common key)."""

    group_size: int = 1  # images per prompt (GRPO groups)
    temperature: float = 1.0  # unused by flow models; the core reads it for every adapter
    num_steps: int = 10  # denoising steps
    guidance_scale: float = 1.0  # classifier-free guidance (<= 1: none)
    noise_level: float = 0.7  # the SDE's a; 0 = Euler ODE
    logprob_reduce: Literal["sum", "mean"] = "sum"  # log-density over latent dims, or Flow-GRPO's mean

    def __post_init__(self) -> None:
        _at_least(self, group_size=1, temperature=0.0, num_steps=1, noise_level=0.0)
        _one_of("logprob_reduce", self.logprob_reduce, ("sum", "mean"))


@dataclass
class FlowEvalConfig:
    """Held-out evaluation: `n` prompts of `split`, Euler ODE samples with `num_steps` and
    `guidance_scale`, `batch_size` images per forward, the first `grid` images in a sample grid."""

    n: int = 200
    split: str = "test"
    batch_size: int = 200
    num_steps: int = 10  # Euler ODE steps at evaluation
    guidance_scale: float = 1.0  # classifier-free guidance at evaluation
    grid: int = 16  # images in the sample grid written at every evaluation

    def __post_init__(self) -> None:
        _at_least(self, n=1, batch_size=1, num_steps=1, grid=0)


@dataclass
class TinyFlowConfig:
    """A random-init pipeline: `arch: sd3` (`pipelines.build_tiny_sd3_pipeline`, pixel space unless
    `vae`) or `arch: flux` (`pipelines.build_tiny_flux_pipeline`, always with a VAE; `num_layers`
    double-stream and as many single-stream blocks)."""

    arch: Literal["sd3", "flux"] = "sd3"
    image_size: int = 16
    vae: bool = False
    latent_channels: int = 4
    vae_channels: int = 8
    vae_blocks: int = 2
    patch_size: int = 2
    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 2
    shift: float = 3.0
    seed: int = 0  # the transformer's initialisation
    text_seed: int = 0  # the frozen text encoders (and VAE): keep it equal across the run's models

    def __post_init__(self) -> None:
        _one_of("arch", self.arch, ("sd3", "flux"))
        _at_least(
            self,
            image_size=1,
            latent_channels=1,
            vae_channels=1,
            vae_blocks=1,
            patch_size=1,
            num_layers=1,
            num_attention_heads=1,
            attention_head_dim=1,
            text_hidden_size=1,
            text_layers=1,
            text_heads=1,
        )
        if self.shift <= 0:
            raise ValueError(f"shift: {self.shift} must be > 0 (1.0 = no shift, SD3 uses 3.0)")
