"""Diffusers SD3-style pipelines for the flow modality: tiny random-init builds, CFG velocity, save/load.

A tiny pipeline is a standard `StableDiffusion3Pipeline` (SD3Transformer2DModel +
FlowMatchEulerDiscreteScheduler + two CLIP text encoders, no T5) built without any
download: the CLIP tokenizer is a BPE over the given words, written from memory.  It
works in latent space (a tiny random-init AutoencoderKL, `vae=True`) or in pixel space
(`vae=False`: the transformer sees the image scaled to [-1, 1]; a random VAE decodes
noise, so pixel space is the one to train a task like `shapes` on from scratch).
`save_pipeline` writes a normal diffusers directory that `DiffusionPipeline.from_pretrained(path)`
loads with no arguments: StableDiffusion3Pipeline requires a T5 encoder and a VAE, so a pipeline
without them is saved with stand-ins that change nothing -- a T5 encoder whose weights are all zero
(it outputs the zeros diffusers feeds the transformer when there is no T5; its tokenizer gives no
token, so `max_sequence_length` sets how many, as without T5) and, in pixel space, a
passthrough AutoencoderKL (one block, no downsampling, decode(z) = z to float precision), so
`pipe(prompt).images[0]` is the model's image.  `load_pipeline` turns the stand-ins back into None
(and reads older directories whose T5 and VAE entries are null).

    python -c "from mmdistill.modalities.flow.pipelines import build_tiny_sd3_pipeline as b; print(b(['a', 'red', 'circle']).transformer.config)"
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmdistill.interfaces import Rollout
from mmdistill.sde import LogprobReduce, VelocityFn, sample_sde

__all__ = [
    "build_clip_tokenizer",
    "build_tiny_sd3_pipeline",
    "build_tiny_flux_pipeline",
    "is_flux",
    "pipeline_sigmas",
    "pack_latents",
    "unpack_latents",
    "save_pipeline",
    "load_pipeline",
    "build_null_t5",
    "build_null_t5_tokenizer",
    "build_passthrough_vae",
    "is_null_t5",
    "is_passthrough_vae",
    "scheduler_sigmas",
    "encode_prompts",
    "velocity",
    "velocity_fn",
    "latent_shape",
    "encode_images",
    "decode_latents",
    "sample_pipeline",
]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(words: Sequence[str], max_length: int = 16) -> Any:
    """A `CLIPTokenizer` whose BPE turns each of `words` (lower-cased) into one token;
    other words fall back to letters and digits.  Built offline, saved and loaded like any CLIP tokenizer."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for ch in string.ascii_lowercase + string.digits:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words}):
        if not word.isalnum() or not word.isascii():
            raise ValueError(f"tokenizer words must be ASCII letters/digits; got {word!r}")
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            if (merged, part) not in merges:
                merges.append((merged, part))
            merged += part
            vocab.setdefault(merged, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_tiny_sd3_pipeline(
    words: Sequence[str],
    *,
    image_size: int = 32,
    vae: bool = False,
    latent_channels: int = 4,
    vae_channels: int = 8,
    vae_blocks: int = 2,
    patch_size: int = 2,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    text_hidden_size: int = 32,
    text_layers: int = 2,
    text_heads: int = 2,
    max_length: int = 16,
    shift: float = 3.0,
    seed: int = 0,
    text_seed: int | None = None,
    tokenizer: Any = None,
) -> Any:
    """A random-init `StableDiffusion3Pipeline` sized by flat arguments (a config section's keys).

    vae=False: pixel space, 3 channels, latent = image.  vae=True: a tiny AutoencoderKL with
    `vae_blocks` blocks of `vae_channels` (downsampling 2^(vae_blocks-1)) and `latent_channels`.
    `words` sets the tokenizer vocabulary (e.g. `shapes.VOCABULARY`) unless a CLIP `tokenizer` is given.
    `seed` initialises the transformer; `text_seed` (default: seed) the text encoders and the VAE,
    so models of one run can share those frozen parts and differ in their transformers.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    down = 2 ** (vae_blocks - 1) if vae else 1
    if image_size % (down * patch_size):
        raise ValueError(
            f"image_size {image_size} must be divisible by the VAE downsampling ({down}) times patch_size ({patch_size})"
        )
    latent_size = image_size // down
    tokenizer = tokenizer if tokenizer is not None else build_clip_tokenizer(words, max_length)
    max_length = tokenizer.model_max_length
    text_seed = seed if text_seed is None else text_seed
    text_cfg = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        vocab_size=len(tokenizer),
        hidden_size=text_hidden_size,
        intermediate_size=2 * text_hidden_size,
        projection_dim=text_hidden_size,
        num_attention_heads=text_heads,
        num_hidden_layers=text_layers,
        max_position_embeddings=max_length,
        hidden_act="gelu",
    )
    torch.manual_seed(text_seed)
    text_encoder = CLIPTextModelWithProjection(text_cfg)
    torch.manual_seed(text_seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_cfg)
    torch.manual_seed(seed + 2)
    channels = latent_channels if vae else 3
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=patch_size,
        in_channels=channels,
        out_channels=channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=2 * text_hidden_size,  # the two CLIP hidden states, concatenated
        caption_projection_dim=num_attention_heads * attention_head_dim,
        pooled_projection_dim=2 * text_hidden_size,  # the two pooled projections, concatenated
        pos_embed_max_size=latent_size // patch_size,
    )
    autoencoder = None
    if vae:
        torch.manual_seed(text_seed + 3)
        autoencoder = _tiny_vae(image_size, latent_channels, vae_channels, vae_blocks)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=autoencoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def _tiny_vae(image_size: int, latent_channels: int, channels: int, blocks: int) -> Any:
    """A random-init AutoencoderKL: `blocks` blocks of `channels`, downsampling 2^(blocks-1), no scaling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(channels,) * blocks,
        layers_per_block=1,
        norm_num_groups=1,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )


def build_tiny_flux_pipeline(
    words: Sequence[str],
    *,
    image_size: int = 16,
    latent_channels: int = 4,
    vae_channels: int = 8,
    vae_blocks: int = 2,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    text_hidden_size: int = 32,
    text_layers: int = 2,
    text_heads: int = 2,
    max_length: int = 16,
    guidance_embeds: bool = True,
    seed: int = 0,
    text_seed: int | None = None,
    tokenizer: Any = None,
) -> Any:
    """A random-init `FluxPipeline` (FluxTransformer2DModel, CLIP + a tiny T5 encoder, a tiny VAE,
    a dynamic-shifting FlowMatchEulerDiscreteScheduler), built offline.  The T5 side reuses the
    CLIP tokenizer (only ids matter for a random-init encoder).  `guidance_embeds`: Flux-dev style
    guidance distillation (the guidance scale is an input) instead of classifier-free guidance."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if attention_head_dim % 4:
        raise ValueError(
            f"attention_head_dim {attention_head_dim} must be divisible by 4 (Flux's 3-axis rotary embedding)"
        )
    down = 2 ** (vae_blocks - 1)
    if image_size % (down * 2):
        raise ValueError(
            f"image_size {image_size} must be divisible by the VAE downsampling ({down}) times 2 (Flux packs 2x2 patches)"
        )
    tokenizer = tokenizer if tokenizer is not None else build_clip_tokenizer(words, max_length)
    max_length = tokenizer.model_max_length
    text_seed = seed if text_seed is None else text_seed
    torch.manual_seed(text_seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            vocab_size=len(tokenizer),
            hidden_size=text_hidden_size,
            intermediate_size=2 * text_hidden_size,
            projection_dim=text_hidden_size,
            num_attention_heads=text_heads,
            num_hidden_layers=text_layers,
            max_position_embeddings=max_length,
            hidden_act="gelu",
        )
    )
    torch.manual_seed(text_seed + 1)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=text_hidden_size,
            d_kv=text_hidden_size // text_heads,
            d_ff=2 * text_hidden_size,
            num_layers=text_layers,
            num_heads=text_heads,
            pad_token_id=1,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    torch.manual_seed(text_seed + 3)
    vae = _tiny_vae(image_size, latent_channels, vae_channels, vae_blocks)
    torch.manual_seed(seed + 2)
    rope = attention_head_dim // 4
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=text_hidden_size,
        pooled_projection_dim=text_hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(attention_head_dim - 2 * rope, rope, rope),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_image_seq_len=16,
        max_image_seq_len=256,
        base_shift=0.5,
        max_shift=1.15,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        transformer=transformer,
    )


def _base(transformer: Any) -> Any:
    """The diffusers transformer under wrappers (peft, accelerate)."""
    while hasattr(transformer, "module"):
        transformer = transformer.module
    return transformer.get_base_model() if hasattr(transformer, "get_base_model") else transformer


def is_flux(obj: Any) -> bool:
    """A Flux pipeline or transformer (packed 2x2 latents, rotary ids, guidance embedding)."""
    t = getattr(obj, "transformer", None) if hasattr(obj, "components") else obj
    return type(_base(t)).__name__.startswith("Flux")


def pack_latents(x_B_C_H_W: Tensor) -> Tensor:
    """`[B, C, H, W]` -> Flux's `[B, (H/2)(W/2), 4C]` (2x2 patches, as FluxPipeline._pack_latents)."""
    B, C, H, W = x_B_C_H_W.shape
    return (
        x_B_C_H_W.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), 4 * C)
    )


def unpack_latents(x_B_L_F: Tensor, H: int, W: int) -> Tensor:
    """Inverse of `pack_latents`."""
    B, _, F = x_B_L_F.shape
    return x_B_L_F.reshape(B, H // 2, W // 2, F // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, F // 4, H, W)


PASSTHROUGH_SCALE = 1.0 / 1024  # the passthrough VAE's signal scale inside its GroupNorm (a power of two: exact)


def build_null_t5(d_model: int, vocab_size: int = 1) -> Any:
    """A `T5EncoderModel` with no layers and every weight zero: it outputs zeros `[B, L, d_model]`, what
    StableDiffusion3Pipeline feeds the transformer in place of T5 when `text_encoder_3` is None."""
    from transformers import T5Config, T5EncoderModel

    heads = 2 if d_model % 2 == 0 else 1
    model = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=d_model // heads,
            d_ff=d_model,
            num_layers=0,
            num_heads=heads,
            pad_token_id=0,
            eos_token_id=0,
            decoder_start_token_id=0,
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model.eval()


def build_null_t5_tokenizer() -> Any:
    """The null T5's tokenizer: every text gives no token, so the T5 slot contributes exactly
    `max_sequence_length` padding tokens -- the zeros diffusers appends without T5, for any length, 0 included."""
    from tokenizers import Regex, Tokenizer, normalizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"<pad>": 0}, unk_token="<pad>"))
    backend.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")  # drop every character
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", model_max_length=512)


def is_null_t5(module: Any) -> bool:
    """A T5 encoder whose every weight is zero (so its output is zero): `build_null_t5`'s stand-in."""
    return (
        type(module).__name__ == "T5EncoderModel"
        and module.config.num_layers == 0
        and all(not p.any() for p in module.parameters())
    )


def build_passthrough_vae(image_size: int) -> Any:
    """An `AutoencoderKL` for pixel-space pipelines: 3 latent channels, one block (no downsampling, so
    the pipeline's `vae_scale_factor` is 1), scaling 1, shift 0, `decode(z) = z` and `encode(x).mode() = x`
    to a relative error of 2^-21 sum_c mean(z_c^2).  Each coder is set by hand: conv_in makes the 8
    channels (e z, -e z, 1, -1) with e = 2^-10, so its final GroupNorm sees mean 0 and variance
    (1 + e^2 sum_c mean(z_c^2)) / 4; the resnets' last convolutions are zero (identities); the norm
    scales e z back by 1/(2e), and conv_out returns silu(z) - silu(-z) = z."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        latent_channels=3,
        block_out_channels=(8,),
        layers_per_block=1,
        norm_num_groups=1,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        force_upcast=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    e = PASSTHROUGH_SCALE
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for coder in (vae.encoder, vae.decoder):
            for c in range(3):
                coder.conv_in.weight[c, c, 1, 1] = e
                coder.conv_in.weight[c + 3, c, 1, 1] = -e
                coder.conv_out.weight[c, c, 1, 1] = 1.0
                coder.conv_out.weight[c, c + 3, 1, 1] = -1.0
            coder.conv_in.bias[6], coder.conv_in.bias[7] = 1.0, -1.0
            coder.conv_norm_out.weight[:6] = 1 / (2 * e)  # GroupNorm divides by sqrt(1/4): 2 e z -> z
        vae.encoder.conv_out.bias[3:] = -30.0  # the posterior's log-variance: the smallest diffusers allows
    return vae.eval()


def is_passthrough_vae(module: Any) -> bool:
    """The VAE `build_passthrough_vae` makes (same config and the same weights, in any dtype)."""
    if type(module).__name__ != "AutoencoderKL" or tuple(module.config.block_out_channels) != (8,):
        return False
    if module.config.latent_channels != 3 or module.config.norm_num_groups != 1:
        return False
    ref = build_passthrough_vae(module.config.sample_size).state_dict()
    own = module.state_dict()
    return own.keys() == ref.keys() and all(torch.equal(own[k].float().cpu(), ref[k]) for k in ref)


def _with_stand_ins(pipe: Any) -> Any:
    """The pipeline with a null T5 and, in pixel space, a passthrough VAE where it has None (SD3 only:
    StableDiffusion3Pipeline refuses null entries on load); any other pipeline as it is."""
    comps = dict(pipe.components)
    if "text_encoder_3" not in comps or (comps["text_encoder_3"] is not None and comps.get("vae") is not None):
        return pipe  # a real SD3 / SD3.5 checkpoint, Flux, ...: saved as diffusers saves it
    transformer = _base(comps["transformer"])
    if comps["text_encoder_3"] is None:
        comps["text_encoder_3"] = build_null_t5(transformer.config.joint_attention_dim).to(comps["text_encoder"].dtype)
        comps["tokenizer_3"] = build_null_t5_tokenizer()
    if comps["vae"] is None:
        if transformer.config.in_channels != 3:
            raise ValueError(
                f"a pipeline without a VAE must work in pixel space (3 channels); its transformer has {transformer.config.in_channels}"
            )
        comps["vae"] = build_passthrough_vae(transformer.config.sample_size).to(transformer.dtype)
    return type(pipe)(**comps)


def _without_stand_ins(pipe: Any) -> Any:
    """Inverse of `_with_stand_ins`: a null T5 and a passthrough VAE become None again, so the adapter
    conditions without T5 tokens and works on pixels directly, as the run that saved the pipeline did."""
    comps = dict(pipe.components)
    changed = False
    if is_null_t5(comps.get("text_encoder_3")):
        comps["text_encoder_3"], comps["tokenizer_3"], changed = None, None, True
    if comps.get("vae") is not None and is_passthrough_vae(comps["vae"]):
        comps["vae"], changed = None, True
    if not changed:
        return pipe
    bare = type(pipe)(**comps)
    bare.register_to_config(_name_or_path=pipe.name_or_path)
    return bare


def save_pipeline(pipe: Any, out_dir: str | Path) -> None:
    """A standard diffusers pipeline directory (model_index.json + one folder per component, safetensors)
    that `DiffusionPipeline.from_pretrained(out_dir)` loads with no arguments (stand-ins, see the module doc)."""
    _with_stand_ins(pipe).save_pretrained(str(out_dir), safe_serialization=True)


def load_pipeline(
    path: str | Path, torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Any:
    """`DiffusionPipeline.from_pretrained(path)` with the stand-ins of `save_pipeline` turned back into None;
    components an older save recorded as null (no T5, no VAE) are passed as None."""
    from diffusers import DiffusionPipeline

    index_file = Path(path) / "model_index.json"
    if not Path(path).exists():  # a hub id: from_pretrained resolves (and caches) it
        pipe = _without_stand_ins(DiffusionPipeline.from_pretrained(str(path), torch_dtype=torch_dtype))
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device=device)
    if not index_file.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    index = json.loads(index_file.read_text())
    missing = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    pipe = _without_stand_ins(DiffusionPipeline.from_pretrained(str(path), **missing))  # dtype keyword renamed in 0.4x
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=torch_dtype)


def pipeline_sigmas(pipe: Any, num_steps: int, image_size: int) -> Tensor:
    """The sigmas the pipeline's own `__call__` uses: SD3 `set_timesteps(num_steps)`; Flux the
    custom `linspace(1, 1/N, N)` shifted by the resolution-dependent `mu` (dynamic shifting)."""
    cfg = pipe.scheduler.config
    if not is_flux(pipe):
        mu = None
        if cfg.get("use_dynamic_shifting", False):
            seq = (
                image_size
                // (pipe.vae_scale_factor if pipe.vae is not None else 1)
                // pipe.transformer.config.patch_size
            ) ** 2
            mu = _calculate_shift(seq, cfg)
        return scheduler_sigmas(pipe.scheduler, num_steps, mu)
    C, H, W = latent_shape(pipe, image_size)
    mu = _calculate_shift((H // 2) * (W // 2), cfg)
    custom = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
    return scheduler_sigmas(pipe.scheduler, num_steps, mu, sigmas=custom)


def _calculate_shift(seq_len: int, cfg: Any) -> float:
    base, top = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    lo, hi = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (hi - lo) / (top - base)
    return seq_len * m + lo - m * base


def scheduler_sigmas(scheduler: Any, num_steps: int, mu: float | None = None, sigmas: Any = None) -> Tensor:
    """The `[num_steps + 1]` sigmas (last 0) the scheduler uses, on CPU; the scheduler itself is not
    modified.  `mu` is the resolution shift of dynamic-shifting schedulers (Flux, SD3.5 with it on)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
        raise TypeError(f"the flow modality needs a FlowMatchEulerDiscreteScheduler; got {type(scheduler).__name__}")
    fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    if sigmas is not None:
        fresh.set_timesteps(sigmas=list(sigmas), device="cpu", mu=mu)
    else:
        fresh.set_timesteps(num_steps, device="cpu", mu=mu)
    return fresh.sigmas.clone()


@torch.no_grad()
def encode_prompts(
    pipe: Any, prompts: Sequence[str], negative_prompt: str = "", max_sequence_length: int = 256
) -> dict[str, Tensor]:
    """The SD3 condition of each prompt and of the negative prompt (for CFG), batch-major:
    `prompt_embeds [B, L, E]`, `pooled_prompt_embeds [B, P]` and their `negative_` twins.
    `max_sequence_length` zero T5 tokens are appended (no T5 encoder), as diffusers does."""
    prompts = list(prompts)
    if is_flux(pipe):
        pe, ppe, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=pipe.transformer.device, max_sequence_length=max_sequence_length
        )
        npe, nppe, _ = pipe.encode_prompt(
            prompt=[negative_prompt] * len(prompts),
            prompt_2=None,
            device=pipe.transformer.device,
            max_sequence_length=max_sequence_length,
        )
        return {
            "prompt_embeds": pe,
            "pooled_prompt_embeds": ppe,
            "negative_prompt_embeds": npe,
            "negative_pooled_prompt_embeds": nppe,
        }
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        negative_prompt=[negative_prompt] * len(prompts),
        do_classifier_free_guidance=True,
        device=pipe.transformer.device,
        max_sequence_length=max_sequence_length,
    )
    return {
        "prompt_embeds": pe,
        "pooled_prompt_embeds": ppe,
        "negative_prompt_embeds": npe,
        "negative_pooled_prompt_embeds": nppe,
    }


def velocity(
    transformer: Any,
    x_t_B_C_H_W: Tensor,
    sigma_B: Tensor,
    cond: dict[str, Tensor],
    guidance_scale: float = 1.0,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """The transformer's velocity at noise level sigma (timestep `sigma * num_train_timesteps`).

    guidance_scale > 1: classifier-free guidance `v_u + g (v_c - v_u)` from one batched call
    on [negative; positive], as StableDiffusion3Pipeline does; otherwise the conditional v.
    Returned in float32 (or the input's wider dtype)."""
    out_dtype = torch.promote_types(x_t_B_C_H_W.dtype, torch.float32)
    x = x_t_B_C_H_W.to(transformer.dtype)
    timestep_B = sigma_B.to(x.device, torch.float32) * num_train_timesteps
    if is_flux(transformer):
        return _flux_velocity(transformer, x, timestep_B / num_train_timesteps, cond, guidance_scale).to(out_dtype)
    if guidance_scale > 1:
        v = transformer(
            hidden_states=torch.cat([x, x]),
            timestep=torch.cat([timestep_B, timestep_B]),
            encoder_hidden_states=torch.cat([cond["negative_prompt_embeds"], cond["prompt_embeds"]]),
            pooled_projections=torch.cat([cond["negative_pooled_prompt_embeds"], cond["pooled_prompt_embeds"]]),
            return_dict=False,
        )[0]
        v_uncond, v_cond = v.chunk(2)
        v = v_uncond + guidance_scale * (v_cond - v_uncond)
    else:
        v = transformer(
            hidden_states=x,
            timestep=timestep_B,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
    return v.to(out_dtype)


def _flux_velocity(
    transformer: Any, x_B_C_H_W: Tensor, t_B: Tensor, cond: dict[str, Tensor], guidance_scale: float
) -> Tensor:
    """Flux: pack 2x2 patches, rotary ids for text (zeros) and image (row, column), the guidance scale
    as an input for guidance-distilled models, true CFG for the others -- as FluxPipeline does."""
    B, C, H, W = x_B_C_H_W.shape
    dtype, device = x_B_C_H_W.dtype, x_B_C_H_W.device
    img_ids = torch.zeros(H // 2, W // 2, 3)
    img_ids[..., 1] += torch.arange(H // 2)[:, None]
    img_ids[..., 2] += torch.arange(W // 2)[None, :]
    img_ids = img_ids.reshape(-1, 3).to(device, dtype)
    txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
    base = _base(transformer)
    guidance = (
        torch.full((B,), guidance_scale, device=device, dtype=torch.float32) if base.config.guidance_embeds else None
    )
    packed = pack_latents(x_B_C_H_W)

    def run(pe: Tensor, ppe: Tensor) -> Tensor:
        return transformer(
            hidden_states=packed,
            timestep=t_B.to(dtype),
            guidance=guidance,
            pooled_projections=ppe,
            encoder_hidden_states=pe,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]

    v = run(cond["prompt_embeds"], cond["pooled_prompt_embeds"])
    if guidance is None and guidance_scale > 1:  # true classifier-free guidance
        v_u = run(cond["negative_prompt_embeds"], cond["negative_pooled_prompt_embeds"])
        v = v_u + guidance_scale * (v - v_u)
    return unpack_latents(v, H, W)


def velocity_fn(transformer: Any, num_train_timesteps: int = 1000) -> VelocityFn:
    """`velocity` bound to one transformer: the `VelocityFn` that `sde.sample_sde` and `sde.step_velocities` take."""
    return partial(velocity, transformer, num_train_timesteps=num_train_timesteps)


def latent_shape(pipe: Any, image_size: int) -> tuple[int, int, int]:
    """(C, H, W) of one latent for a square image of `image_size` pixels (Flux: before 2x2 packing)."""
    down = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 1
    if image_size % down:
        raise ValueError(f"image_size {image_size} must be divisible by the VAE downsampling factor {down}")
    channels = _base(pipe.transformer).config.in_channels
    return (channels // 4 if is_flux(pipe) else channels, image_size // down, image_size // down)


@torch.no_grad()
def encode_images(pipe: Any, images_B_3_H_W: Tensor) -> Tensor:
    """Images in [0, 1] -> the transformer's latents (VAE mode, then `(z - shift) * scale`; pixel space: `2x - 1`)."""
    x = images_B_3_H_W.float() * 2 - 1
    if pipe.vae is None:
        return x
    z = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist.mode()
    return ((z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor).float()


@torch.no_grad()
def decode_latents(pipe: Any, latents_B_C_H_W: Tensor) -> Tensor:
    """The transformer's latents -> images in [0, 1] `[B, 3, H, W]` (float32)."""
    z = latents_B_C_H_W.float()
    if pipe.vae is not None:
        z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        z = pipe.vae.decode(z.to(pipe.vae.dtype), return_dict=False)[0].float()
    return ((z + 1) / 2).clamp(0, 1)


def sample_pipeline(
    pipe: Any,
    prompts: Sequence[str],
    *,
    image_size: int,
    num_steps: int = 10,
    guidance_scale: float = 4.5,
    noise_level: float = 0.7,
    logprob_reduce: LogprobReduce = "sum",
    generator: torch.Generator | None = None,
    negative_prompt: str = "",
    max_sequence_length: int = 256,
    mu: float | None = None,
) -> Rollout:
    """Encode `prompts`, draw the initial noise, run `sde.sample_sde` with the pipeline's
    transformer and scheduler sigmas.  `context` is the list of prompts; `extras["x0_B_C_H_W"]`
    the final latents (`decode_latents` turns them into images)."""
    device = pipe.transformer.device
    cond = encode_prompts(pipe, prompts, negative_prompt, max_sequence_length)
    noise = torch.randn((len(prompts), *latent_shape(pipe, image_size)), generator=generator, device=device)
    sigmas = (
        scheduler_sigmas(pipe.scheduler, num_steps, mu)
        if mu is not None
        else pipeline_sigmas(pipe, num_steps, image_size)
    ).to(device)
    return sample_sde(
        velocity_fn(pipe.transformer, pipe.scheduler.config.num_train_timesteps),
        noise,
        sigmas,
        cond,
        guidance_scale=guidance_scale,
        noise_level=noise_level,
        logprob_reduce=logprob_reduce,
        generator=generator,
        context=list(prompts),
    )
