"""LeRobot's SmolVLA as a flow-matching action head sampled with the Flow-GRPO SDE (`mmdistill/sde.py`).

`sample_chunk` returns the executed chunk and its denoising chain (a `Rollout` over denoising
steps); `step_dist` re-scores a chain as a `VelocityStepDist`, the same per-step Gaussians as the
flow modality (docs/objectives.md section 6).

Conventions checked against LeRobot's code: SmolVLA's flow time is our sigma (`x_t = t * noise +
(1 - t) * actions`, velocity `noise - actions`, sampled from t = 1 to 0 with Euler steps `x += dt
* v`), so `sigma = t` and the velocity is used as is.  The flow state is SmolVLA's padded,
*normalised* chunk [chunk_size, max_action_dim]; two SmolVLAs can score each other's chains only if
they share it and their action statistics (checked in `step_dist`).  LeRobot imports are lazy:
lerobot is an optional, heavy dependency.

    python -m pytest tests/test_robot_lerobot.py tests/test_robot_flow_head.py -q -o addopts="" -k smolvla
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast, SmolVLMConfig

from mmdistill.errors import CompatibilityError
from mmdistill.interfaces import Rollout
from mmdistill.modalities.robot.lerobot.common import (
    IMAGE_KEY,
    LeRobotWrapper,
    Stats,
    action_stats,
    build_policy,
    device_of,
    lerobot_batch,
    lerobot_type,
    mapping_from_stats,
    policy_features,
    register_wrapper,
    unnormalize_action,
)
from mmdistill.sde import LogprobReduce, VelocityFn, sample_sde, step_dists, step_velocities
from mmdistill.stepdist import Gaussian, VelocityStepDist


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


@register_wrapper
class SmolVLAFlowPolicy(LeRobotWrapper):
    """SmolVLA's flow-matching action expert sampled with the Flow-GRPO SDE (`sample_sde`).

    `sample_chunk` returns the executed chunk and the denoising chain (a `Rollout` over denoising
    steps whose `steps` is a `FlowSteps`); `step_dist` re-scores a chain as a `VelocityStepDist`.
    Observation values have one decision per row (`[N, ...]`); use `flatten_time` for `[B, T, ...]`.
    """

    kind = "lerobot_smolvla_flow"
    lerobot_type = "smolvla"

    def __init__(self, smolvla: nn.Module, chunk_size: int | None = None):
        if lerobot_type(smolvla) != "smolvla":
            raise CompatibilityError(
                f"SmolVLAFlowPolicy wraps a SmolVLA policy; got a {lerobot_type(smolvla)!r} policy"
            )
        if smolvla.config.adapt_to_pi_aloha:
            raise CompatibilityError(
                "SmolVLA with adapt_to_pi_aloha=True is not supported; its Aloha action transform is not part of the flow"
            )
        super().__init__(smolvla, chunk_size)
        self.config["num_steps"] = int(smolvla.config.num_steps)

    @staticmethod
    def prepare_load(config: Any, path: Path) -> None:
        """Every weight comes from model.safetensors; the VLM config and tokenizer from `path/vlm` when
        `save_lerobot_policy` wrote one there (so the directory can move)."""
        config.load_vlm_weights = False
        if (path / "vlm").is_dir():
            config.vlm_model_name = str((path / "vlm").resolve())

    @staticmethod
    @contextlib.contextmanager
    def saving(policy: nn.Module, out_dir: Path) -> Iterator[None]:
        """A VLM config/tokenizer in a local directory is copied to `out_dir/vlm` and the saved config
        points there; the live policy's config is restored afterwards."""
        src = policy.config.vlm_model_name
        if not Path(src).is_dir():
            yield
            return
        vlm_dir = (out_dir / "vlm").resolve()
        if Path(src).resolve() != vlm_dir:
            shutil.copytree(src, vlm_dir, dirs_exist_ok=True)
        policy.config.vlm_model_name = str(vlm_dir)
        try:
            yield
        finally:
            policy.config.vlm_model_name = src

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
        batch = p._prepare_batch(lerobot_batch(obs_N, p.config, device_of(p)))
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
        _, a, b = action_stats(self.lerobot)
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
        device = device_of(p)
        if noise is None:
            noise = torch.randn((N, *self.latent_shape), generator=generator, device=device)
        if tuple(noise.shape) != (N, *self.latent_shape):
            raise ValueError(
                f"noise must be [N, chunk, max_action_dim] = {[N, *self.latent_shape]}; got {list(noise.shape)}"
            )
        sigmas = smolvla_sigmas(int(p.config.num_steps) if num_steps is None else int(num_steps))
        rollout = sample_sde(
            self.velocity_fn(obs),
            noise.float(),
            sigmas,
            cond=dict(obs),
            noise_level=noise_level,
            logprob_reduce=logprob_reduce,
            generator=generator,
        )
        rollout.extras["action_signature"] = self._action_signature()
        z_N_C_M = rollout.extras["x0_B_C_H_W"]
        actions = unnormalize_action(p, z_N_C_M[:, : self.chunk_size, : self.action_dim]).flatten(1)
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
            return VelocityStepDist(
                v_B_T_D, step_dists(rollout, v_B_T_D), s.kl_weight_B_T(), s.dt_B_T, rollout.mask_B_T, s.logprob_reduce
            )
        return VelocityStepDist(v_B_T_D, None, None, s.dt_B_T, rollout.mask_B_T, s.logprob_reduce)


def write_tiny_smolvlm(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, image_size: int = 32) -> Path:
    """Write a tiny SmolVLM config and processor (byte-level tokenizer) that SmolVLA builds from offline.

    SmolVLA reads `AutoConfig` and `AutoProcessor(...).tokenizer` from `vlm_model_name`.  The
    processor saved is `Idefics3Processor` (SmolVLM's parent): transformers' `SmolVLMProcessor`
    needs the `num2words` package, which this environment lacks, and SmolVLA only uses the
    tokenizer (with SmolVLM's named image tokens) anyway.  The tokenizer is byte-level BPE without
    merges: every instruction tokenizes, one token per byte.
    """
    # lazy: Idefics3's image processor pulls in torchvision (seconds); only SmolVLA tests and demos need it
    from transformers.models.idefics3 import Idefics3ImageProcessor, Idefics3Processor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    named = {
        "fake_image_token": "<fake_token_around_image>",
        "image_token": "<image>",
        "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>",
    }
    vocab = {
        t: i for i, t in enumerate(["<|endoftext|>", *named.values(), *sorted(pre_tokenizers.ByteLevel.alphabet())])
    }
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=named,
    )
    patch = image_size // 4  # 16 patches; SmolVLM's pixel shuffle (scale 2) leaves 4 image tokens
    SmolVLMConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            vocab_size=len(vocab),
            max_position_embeddings=512,
        ),
        scale_factor=2,
        image_token_id=vocab["<image>"],
    ).save_pretrained(out_dir)
    Idefics3Processor(image_processor=Idefics3ImageProcessor(), tokenizer=tokenizer, image_seq_len=4).save_pretrained(
        out_dir
    )
    return out_dir


def tiny_smolvla(
    state_dim: int,
    action_dim: int,
    chunk_size: int,
    stats: Stats,
    vlm_dir: str | Path,
    *,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    num_steps: int = 4,
    max_dim: int = 32,
    seed: int = 0,
    device: str = "cpu",
    image_keys: tuple[str, ...] = (IMAGE_KEY,),
    vlm_image_size: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """A random-init LeRobot `SmolVLAPolicy` on the tiny VLM of `write_tiny_smolvlm(vlm_dir)`
    (`load_vlm_weights=False`: nothing is downloaded).  One camera feature of `image_shape` per key
    of `image_keys` (LIBERO checkpoints: `observation.images.image` and `.image2` at 256 px); SmolVLA
    resizes them with padding to `vlm_image_size` (default: `image_shape`'s own size), which must be
    the tiny VLM's image size."""
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    vlm_dir = Path(vlm_dir)
    if not (vlm_dir / "config.json").is_file():
        raise FileNotFoundError(f"{vlm_dir}: no VLM config; create it with write_tiny_smolvlm({str(vlm_dir)!r}) first")
    inputs, outputs = policy_features(state_dim, action_dim, image_shape, None, image_keys=tuple(image_keys))
    config = SmolVLAConfig(
        input_features=inputs,
        output_features=outputs,
        device=device,
        normalization_mapping=mapping_from_stats(
            stats, {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
        ),
        vlm_model_name=str(vlm_dir.resolve()),
        load_vlm_weights=False,
        chunk_size=chunk_size,
        n_action_steps=chunk_size,
        num_steps=num_steps,
        resize_imgs_with_padding=tuple(image_shape[1:]) if vlm_image_size is None else (vlm_image_size,) * 2,
        max_state_dim=max_dim,
        max_action_dim=max_dim,
        num_vlm_layers=-1,
        **overrides,
    )
    return build_policy(SmolVLAPolicy, config, stats, seed)
