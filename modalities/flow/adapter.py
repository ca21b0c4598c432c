"""The `diffusers_flow` adapter: flow-matching text-to-image models behind the `Adapter` contract.

A model of a flow run is a diffusers transformer (SD3-style `SD3Transformer2DModel` or Flux; the
velocity of a model is `pipelines.velocity`).  Every model of a run shares the frozen parts of
the first pipeline loaded -- tokenizers, text encoders, VAE, scheduler -- and the adapter
refuses a checkpoint whose text encoders or VAE differ (a teacher/student mismatch).  A
trained model is saved back as a standard diffusers pipeline directory (`from_pretrained`
loads it; a LoRA student is merged, its adapter kept in `lora_adapter/`).

Rollouts (`rollout`, reading `request.settings`, a `config.FlowRolloutConfig`):
- kind "trajectory" (Flow-GRPO, Flow-OPD): SDE samples with per-step log-probs from the student
  (or the teacher), decoded to images and scored by the task's rewards;
- kind "forward_process" (flow matching: base training, cold start): clean images -- rendered by
  the task (`source: dataset`) or sampled by the (routed) teacher (`source: teacher`) -- noised at
  a random sigma (`request.sigma_sampling`), with the target velocity `eps - x0` and a fraction
  `request.cond_dropout` of empty-prompt conditions.
Re-scoring (`step_dist`) returns a `VelocityStepDist`; a dict of teachers `{tag: model}` is
routed: each prompt's velocity comes from the teacher of its tag (one-hot alpha,
docs/objectives.md section 6.6).

    mmdistill train configs/flow/shapes_flow_opd.yaml
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmdistill.config import LoraConfig, ModelConfig, TokenizerConfig
from mmdistill.errors import CheckpointError, CompatibilityError, ConfigError
from mmdistill.interfaces import AdapterSpec, Rollout, RolloutRequest
from mmdistill.modalities.flow import pipelines as P
from mmdistill.modalities.flow.config import FlowEvalConfig, FlowRolloutConfig, TinyFlowConfig
from mmdistill.registry import ADAPTERS
from mmdistill.sde import FlowSteps, sample_sde, step_dists, step_velocities
from mmdistill.stepdist import VelocityStepDist

__all__ = ["FlowAdapter", "one_hot_alpha", "route_velocity", "unwrap", "save_grid"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the transformer's attention projections


def unwrap(model: Any) -> Any:
    while hasattr(model, "module"):
        model = model.module
    return model


FROZEN = (
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "vae",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "scheduler",
)


def _frozen_signature(path: Path) -> list[tuple[str, int, str]]:
    """(file, size, sha256 of its first MiB) for every file of the pipeline's frozen folders."""
    out = []
    for comp in FROZEN:
        folder = path / comp
        if not folder.is_dir():
            continue
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                with f.open("rb") as fh:
                    digest = hashlib.sha256(fh.read(1 << 20)).hexdigest()
                out.append((str(f.relative_to(path)), f.stat().st_size, digest))
    return out


def _fingerprint(module: Any) -> list[float]:
    """A cheap identity of frozen weights: the sum of each parameter (same weights -> same list)."""
    if module is None:
        return []
    return [round(float(p.detach().double().sum()), 4) for p in module.parameters()]


# ----------------------------------------------------------------------------- routing (Flow-OPD)


def one_hot_alpha(task_ids_B: Tensor, num_teachers: int) -> Tensor:
    """Routing weights `[B, K]`: 1 for the teacher of each prompt's task, 0 elsewhere."""
    if task_ids_B.dtype.is_floating_point or task_ids_B.dim() != 1:
        raise ValueError(f"task_ids must be a 1-D integer tensor [B]; got {task_ids_B.dtype} {tuple(task_ids_B.shape)}")
    if task_ids_B.numel() and (int(task_ids_B.min()) < 0 or int(task_ids_B.max()) >= num_teachers):
        raise ValueError(f"task ids must lie in [0, {num_teachers}) (one per teacher); got {task_ids_B.tolist()}")
    return torch.nn.functional.one_hot(task_ids_B.long(), num_teachers).float()


def route_velocity(v_teachers_K_B_T_D: Tensor, alpha_B_K: Tensor) -> Tensor:
    """`v_tgt[b] = sum_k alpha[b, k] v_k[b]` (`[B, T, D]`), teachers stacked on a leading K axis: the
    target that `FlowAdapter.velocity_fn` computes row by row for a dict of teachers."""
    K, B = v_teachers_K_B_T_D.shape[:2]
    if tuple(alpha_B_K.shape) != (B, K):
        raise ValueError(
            f"alpha must be [B, K] = [{B}, {K}] (one weight per teacher per prompt); got {tuple(alpha_B_K.shape)}"
        )
    return torch.einsum("bk,kbtd->btd", alpha_B_K.to(v_teachers_K_B_T_D.dtype), v_teachers_K_B_T_D)


@ADAPTERS.register("diffusers_flow")
class FlowAdapter:
    """Diffusers flow-matching pipelines (SD3, Flux): SDE rollouts with per-step log-probs; teachers re-score
    the student's states."""

    spec = AdapterSpec(
        rollout_config=FlowRolloutConfig,
        eval_config=FlowEvalConfig,
        tiny_config=TinyFlowConfig,
        model_kinds=(),
        needs_tokenizer=True,  # the CLIP tokenizer, saved beside checkpoints (built offline for tiny pipelines)
        supports_routing=True,
        can_record=False,
        default_task="shapes",
    )

    def __init__(self, tokenizer: Any, device: torch.device | str = "cpu", chunk_size: int = 1024):
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.chunk_size = chunk_size  # unused: no vocabulary to chunk
        self.pipe: Any = None  # the frozen shared parts come from the first pipeline loaded
        self.image_size: int | None = None
        self._fingerprints: dict[str, list[float]] = {}
        self._signature: Any = None  # file signature of the frozen folders (see `_frozen_signature`)
        self._cond_cache: dict[str, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ loading

    @staticmethod
    def build_tokenizer(cfg: TokenizerConfig, task: Any, models: dict[str, ModelConfig]) -> Any:
        """The CLIP tokenizer of `tokenizer.path` or of the first pipeline checkpoint; for
        random-init pipelines one built offline from the task's vocabulary."""
        from transformers import CLIPTokenizer

        path = cfg.path or next((m.path for m in models.values() if m.path is not None), None)
        if path is not None:
            sub = "tokenizer" if (Path(path) / "model_index.json").exists() or not Path(path).exists() else None
            try:
                return (
                    CLIPTokenizer.from_pretrained(path, subfolder=sub) if sub else CLIPTokenizer.from_pretrained(path)
                )
            except OSError as e:
                raise CheckpointError(
                    f"cannot load a CLIP tokenizer from '{path}' ({str(e).splitlines()[0]}); set tokenizer.path"
                ) from None
        return P.build_clip_tokenizer(task.vocabulary(), max_length=16)

    @staticmethod
    def load_tokenizer(path: str | Path) -> Any:
        """The CLIP tokenizer of a saved pipeline directory (its `tokenizer/` folder), of a run's
        `tokenizer/` directory, or of a run directory holding one; None when there is none."""
        from transformers import CLIPTokenizer

        p = Path(path)
        if (p / "model_index.json").is_file() or (p / "tokenizer" / "tokenizer_config.json").is_file():
            return CLIPTokenizer.from_pretrained(str(p), subfolder="tokenizer")
        if (p / "tokenizer_config.json").is_file():
            return CLIPTokenizer.from_pretrained(str(p))
        return None

    @staticmethod
    def check_tokenizer_of(path: str, tokenizer: Any, name: str, compare_chat_template: bool = True) -> None:
        """Nothing to check: the frozen text encoders are compared when the model loads (`_adopt`)."""

    @staticmethod
    def claims_checkpoint(path: str | Path) -> bool:
        """A diffusers pipeline directory (it has `model_index.json`)."""
        return (Path(path) / "model_index.json").is_file()

    @staticmethod
    def check_checkpoint(path: str, name: str) -> None:
        """Pre-flight: a local checkpoint must be a diffusers pipeline directory with a transformer."""
        p = Path(path)
        if not p.exists():
            return  # a hub id, resolved by from_pretrained
        if not (p / "model_index.json").is_file():
            raise CheckpointError(
                f"models.{name}.path: '{path}' is not a diffusers pipeline directory (no model_index.json); give the folder save_pretrained wrote"
            )
        if not (p / "transformer" / "config.json").is_file():
            raise CheckpointError(
                f"models.{name}.path: '{path}' has no transformer/ folder; the flow adapter trains the pipeline's transformer"
            )

    def bind(self, task: Any) -> None:
        """Nothing to adopt: image size and latent shape come from the first pipeline loaded."""

    def load_model(self, cfg: ModelConfig, name: str = "model") -> torch.nn.Module:
        """The transformer of a pipeline (directory or hub id) or of a tiny random-init pipeline."""
        if cfg.kind != "checkpoint":
            raise ConfigError(
                f"models.{name}.kind: the diffusers_flow adapter has no model kind {cfg.kind!r}; remove the key (kind: checkpoint)"
            )
        if cfg.tiny is not None:
            tiny = cfg.tiny if isinstance(cfg.tiny, TinyFlowConfig) else TinyFlowConfig(**cfg.tiny)
            args = dataclasses.asdict(tiny)
            if args.pop("arch") == "flux":
                for k in ("vae", "patch_size", "shift"):
                    args.pop(k)
                args["num_single_layers"] = args["num_layers"]
                pipe = P.build_tiny_flux_pipeline([], tokenizer=self.tokenizer, **args)
            else:
                pipe = P.build_tiny_sd3_pipeline([], tokenizer=self.tokenizer, **args)
            pipe.set_progress_bar_config(disable=True)
            image_size = tiny.image_size
        else:
            assert cfg.path is not None
            fast = self._transformer_only(cfg, name)
            if fast is not None:
                return fast
            try:
                pipe = P.load_pipeline(cfg.path, torch_dtype=DTYPES[cfg.dtype])
            except FileNotFoundError as e:
                raise CheckpointError(
                    f"models.{name}.path: {e}; give a diffusers pipeline directory or hub id"
                ) from None
            except (OSError, ValueError) as e:
                raise CheckpointError(
                    f"models.{name}.path: cannot load a diffusers pipeline from '{cfg.path}' ({str(e).splitlines()[0]})"
                ) from None
            if P.is_flux(pipe):  # FluxPipeline's default resolution
                image_size = int(pipe.default_sample_size) * pipe.vae_scale_factor
            else:
                image_size = int(pipe.transformer.config.sample_size) * (
                    pipe.vae_scale_factor if pipe.vae is not None else 1
                )
        if type(pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            raise CompatibilityError(
                f"models.{name}: the flow adapter needs a FlowMatchEulerDiscreteScheduler; this pipeline has {type(pipe.scheduler).__name__}"
            )
        self._adopt(pipe, name, image_size)
        if cfg.path is not None and self._signature is None and Path(cfg.path).is_dir():
            self._signature = _frozen_signature(Path(cfg.path))
        transformer = pipe.transformer.to(self.device, DTYPES[cfg.dtype])
        if cfg.lora is not None:
            transformer = self.add_lora(transformer, cfg.lora)
        return transformer

    def _transformer_only(self, cfg: ModelConfig, name: str) -> Any:
        """When a local pipeline's frozen folders are byte-identical to the run's (same files as the
        first pipeline, or as the pipelines this run saved), load only its transformer: teachers and
        students of a large model then never load a second copy of the text encoders."""
        path = Path(str(cfg.path))
        if (
            self.pipe is None
            or self._signature is None
            or not path.is_dir()
            or _frozen_signature(path) != self._signature
        ):
            return None
        cls = type(P._base(self.pipe.transformer))
        transformer = cls.from_pretrained(str(path), subfolder="transformer", torch_dtype=DTYPES[cfg.dtype])
        transformer = transformer.to(self.device)
        return self.add_lora(transformer, cfg.lora) if cfg.lora is not None else transformer

    def _adopt(self, pipe: Any, name: str, image_size: int) -> None:
        """Keep the first pipeline's frozen parts; refuse models whose frozen parts differ."""
        prints = {
            k: _fingerprint(getattr(pipe, k, None)) for k in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
        }
        if self.pipe is None:
            for k in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
                m = getattr(pipe, k, None)
                if m is not None:
                    m.to(self.device).eval().requires_grad_(False)
            self.pipe, self.image_size, self._fingerprints = pipe, image_size, prints
            return
        for k, fp in prints.items():
            if fp != self._fingerprints[k]:
                raise CompatibilityError(
                    f"models.{name}: its {k} differs from the one of the run's first model; every model of a flow run "
                    "shares the frozen text encoders and VAE -- fine-tune teachers and students from one base pipeline "
                    "(for tiny models: the same tiny.text_seed and text sizes)"
                )
        if pipe.transformer.config.in_channels != self.pipe.transformer.config.in_channels:
            raise CompatibilityError(
                f"models.{name}: transformer with {pipe.transformer.config.in_channels} input channels, the run's latents have "
                f"{self.pipe.transformer.config.in_channels}; teacher and student must share the latent space"
            )

    def add_lora(self, transformer: Any, lora: LoraConfig) -> Any:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        targets = list(lora.target_modules or LORA_TARGETS)
        return get_peft_model(
            transformer,
            PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets),
        ).to(self.device)

    def prune_layers(
        self, model: Any, keep_layers: list[int], lora: LoraConfig | None = None, name: str = "model"
    ) -> Any:
        """A copy of the transformer keeping `keep_layers` of its blocks (layer dropping)."""
        base = copy.deepcopy(unwrap(model))
        if P.is_flux(base):
            raise ConfigError(
                f"models.{name}.prune: layer dropping is implemented for SD3 transformers only; use a tiny or checkpoint student for Flux"
            )
        blocks = base.transformer_blocks
        bad = [i for i in keep_layers if not -len(blocks) <= i < len(blocks)]
        if bad:
            raise ConfigError(
                f"models.{name}.prune.keep_layers: {bad} out of range for a transformer with {len(blocks)} blocks"
            )
        if keep_layers[-1] % len(blocks) != len(blocks) - 1:
            raise ConfigError(
                f"models.{name}.prune.keep_layers: keep the last block ({len(blocks) - 1}); SD3's last block is context-pre-only"
            )
        base.transformer_blocks = torch.nn.ModuleList([blocks[i] for i in keep_layers])
        base.register_to_config(num_layers=len(keep_layers))
        return self.add_lora(base, lora) if lora is not None else base.to(self.device)

    def save(self, model: Any, out_dir: Path) -> None:
        """A standard diffusers pipeline directory with this transformer and the run's frozen parts, which
        `DiffusionPipeline.from_pretrained(out_dir)` loads as it is (`pipelines.save_pipeline`)."""
        m = unwrap(model)
        if hasattr(m, "merge_and_unload"):  # peft: keep the adapter, save the merged transformer
            m.save_pretrained(str(Path(out_dir) / "lora_adapter"))
            m = copy.deepcopy(m).merge_and_unload()
        components = {k: v for k, v in self.pipe.components.items()}
        components["transformer"] = m
        P.save_pipeline(type(self.pipe)(**components), out_dir)
        if self._signature is None:  # later loads of this run's pipelines read only their transformer
            self._signature = _frozen_signature(Path(out_dir))

    def unwrap(self, model: Any) -> Any:
        """The bare transformer under accelerate / DDP wrappers (a peft model stays one)."""
        return unwrap(model)

    def stage_fingerprint(self, model: Any) -> str:
        """sha256 of the transformer's weights (names, dtypes, shapes and bytes, in name order)."""
        h = hashlib.sha256()
        for key, t in sorted(unwrap(model).state_dict().items()):
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{t.dtype}:{t.numel()};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ conditions and velocities

    def condition(self, prompts: list[str]) -> dict[str, Tensor]:
        """SD3 conditions `[B, ...]` (frozen text encoders, cached per prompt) and the empty prompt's."""
        missing = [p for p in dict.fromkeys(prompts + [""]) if p not in self._cond_cache]
        if missing:
            # pipelines without T5 get no zero T5 tokens (diffusers appends 256; they carry no information)
            if P.is_flux(self.pipe):
                t5 = self.pipe.tokenizer_2.model_max_length if self.pipe.tokenizer_2.model_max_length <= 512 else 512
            else:
                t5 = 0 if self.pipe.text_encoder_3 is None else 256
            c = P.encode_prompts(self.pipe, missing, max_sequence_length=t5)
            for i, p in enumerate(missing):
                self._cond_cache[p] = (c["prompt_embeds"][i], c["pooled_prompt_embeds"][i])
        pe = torch.stack([self._cond_cache[p][0] for p in prompts])
        ppe = torch.stack([self._cond_cache[p][1] for p in prompts])
        npe, nppe = self._cond_cache[""]
        B = len(prompts)
        return {
            "prompt_embeds": pe,
            "pooled_prompt_embeds": ppe,
            "negative_prompt_embeds": npe.expand(B, *npe.shape).clone(),
            "negative_pooled_prompt_embeds": nppe.expand(B, *nppe.shape).clone(),
        }

    def velocity_fn(self, model: Any, tags: list[str] | None = None) -> Any:
        """A `VelocityFn` of one transformer, or of a dict {tag: transformer} routed by each row's tag."""
        T = self.pipe.scheduler.config.num_train_timesteps
        if not isinstance(model, dict):
            return P.velocity_fn(model, T)
        names = list(model)
        if tags is None:
            raise ValueError("routing several teachers needs each prompt's tag")
        unknown = sorted(set(tags) - set(names))
        if unknown:
            raise ConfigError(
                f"prompts tagged {unknown} have no teacher; the stage's teachers are {names} -- add one per task tag"
            )
        alpha_B_K = one_hot_alpha(torch.tensor([names.index(t) for t in tags]), len(names))

        def routed(x: Tensor, sigma_B: Tensor, cond: dict[str, Tensor], g: float) -> Tensor:
            # v_target = sum_k alpha_k(c) v_k, each teacher evaluated only on the rows it weighs
            out = None
            a_B_K = alpha_B_K.to(x.device)
            for k, name in enumerate(names):
                rows = a_B_K[:, k].nonzero().flatten()
                if rows.numel() == 0:
                    continue
                sub = {key: val[rows] for key, val in cond.items()}
                v = P.velocity(model[name], x[rows], sigma_B[rows], sub, g, T)
                if out is None:
                    out = v.new_zeros(x.shape)
                out[rows] += a_B_K[rows, k].reshape(-1, *[1] * (x.dim() - 1)).to(v.dtype) * v
            return out

        return routed

    # ------------------------------------------------------------------ rollouts

    def rollout(
        self, request: RolloutRequest, student: Any, teacher: Any, task: Any, problems: list, gen: torch.Generator
    ) -> Rollout:
        """SDE trajectories scored by the task's rewards (kind "trajectory") or noised clean images with
        flow-matching targets (kind "forward_process"), as `request` asks; settings from `request.settings`."""
        rc = request.settings
        if not isinstance(rc, FlowRolloutConfig):
            raise ConfigError(f"rollout: the diffusers_flow adapter reads a FlowRolloutConfig; got {type(rc).__name__}")
        for key, value in (
            ("mixture_beta", request.mixture_beta),
            ("privileged_template", request.privileged_template),
            ("guidance", request.guidance),
        ):
            if value is not None:
                raise ConfigError(
                    f"objective: the diffusers_flow adapter cannot serve a rollout with {key} (text objectives only); choose a flow objective"
                )
        if request.kind == "forward_process":
            if request.source == "dataset":
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device))
                x0 = P.encode_images(
                    self.pipe, torch.from_numpy(task.render(problems, seed=seed, size=self.image_size)).to(self.device)
                )
            else:  # cold start: clean samples of the (routed) teacher
                model = teacher if request.source == "teacher" else student
                x0 = self.sample(model, problems, rc.num_steps, rc.guidance_scale, 0.0, "sum", gen).extras["x0_B_C_H_W"]
            return self.flow_matching_rollout(problems, x0, gen, request.cond_dropout, request.sigma_sampling)
        if request.kind != "trajectory":
            raise ConfigError(
                f"objective: rollout kind {request.kind!r} is unknown to the diffusers_flow adapter; use 'trajectory' or 'forward_process'"
            )
        if request.source == "dataset":
            raise ConfigError(
                "objective.source: 'dataset' has no denoising trajectories; use flow_matching for dataset images, or source student / teacher"
            )
        model = student if request.source == "student" else teacher
        rollout = self.sample(model, problems, rc.num_steps, rc.guidance_scale, rc.noise_level, rc.logprob_reduce, gen)
        images = P.decode_latents(self.pipe, rollout.extras["x0_B_C_H_W"])
        rewards = task.rewards(problems, images)
        rewards_B = torch.as_tensor(task.train_reward(problems, rewards), dtype=torch.float32, device=self.device)
        return replace(rollout, rewards_B=rewards_B)

    @torch.no_grad()
    def sample(
        self,
        model: Any,
        problems: list,
        num_steps: int,
        guidance_scale: float,
        noise_level: float,
        logprob_reduce: str,
        gen: Any,
    ) -> Rollout:
        prompts = [p.prompt for p in problems]
        cond = self.condition(prompts)
        noise = torch.randn(
            (len(prompts), *P.latent_shape(self.pipe, self.image_size)), generator=gen, device=self.device
        )
        sigmas = P.pipeline_sigmas(self.pipe, num_steps, self.image_size).to(self.device)
        vfn = self.velocity_fn(model, [p.tag for p in problems] if isinstance(model, dict) else None)
        return sample_sde(
            vfn,
            noise,
            sigmas,
            cond,
            guidance_scale=guidance_scale,
            noise_level=noise_level,
            logprob_reduce=logprob_reduce,
            generator=gen,
            context=list(problems),
        )

    def flow_matching_rollout(
        self,
        problems: list,
        x0_B_C_H_W: Tensor,
        gen: Any,
        cond_dropout: float = 0.0,
        sigma_sampling: str = "logit_normal",
    ) -> Rollout:
        """One noised state per image: x_s = (1 - s) x0 + s eps at a random s (logit-normal or uniform),
        target velocity eps - x0; a fraction `cond_dropout` of the rows gets the empty prompt's condition."""
        if sigma_sampling not in ("logit_normal", "uniform"):
            raise ConfigError(f"objective.sigma_sampling: {sigma_sampling!r} is not one of ['logit_normal', 'uniform']")
        B = x0_B_C_H_W.shape[0]
        u = torch.randn(B, generator=gen, device=self.device) if sigma_sampling == "logit_normal" else None
        s_B = torch.sigmoid(u) if u is not None else torch.rand(B, generator=gen, device=self.device)
        eps = torch.randn(x0_B_C_H_W.shape, generator=gen, device=self.device)
        x0 = x0_B_C_H_W.float()
        x_s = (1 - s_B[:, None, None, None]) * x0 + s_B[:, None, None, None] * eps
        cond = self.condition([p.prompt for p in problems])
        if cond_dropout > 0:  # train the unconditional velocity too, so classifier-free guidance works
            d_B = torch.rand(B, generator=gen, device=self.device) < cond_dropout
            cond["prompt_embeds"] = torch.where(
                d_B[:, None, None], cond["negative_prompt_embeds"], cond["prompt_embeds"]
            )
            cond["pooled_prompt_embeds"] = torch.where(
                d_B[:, None], cond["negative_pooled_prompt_embeds"], cond["pooled_prompt_embeds"]
            )
        steps = FlowSteps(
            x_t_B_T_D=x_s.reshape(B, 1, -1),
            sigma_B_T=s_B[:, None],
            sigma_next_B_T=s_B[:, None],
            latent_shape=tuple(x0.shape[1:]),
            cond=cond,
            guidance_scale=1.0,
            noise_level=0.0,
            sigma_cap=0.0,
        )
        target = (eps - x0).reshape(B, 1, -1)
        return Rollout(
            context=list(problems),
            steps=steps,
            actions=target,
            mask_B_T=torch.ones(B, 1, device=self.device),
            behavior_logp_B_T=torch.zeros(B, 1, device=self.device),
            extras={"target_v_B_T_D": target},
        )

    # ------------------------------------------------------------------ re-scoring

    def step_dist(self, model: Any, rollout: Rollout, temperature: float = 1.0) -> VelocityStepDist:
        """The model's velocities on the rollout's states and, for SDE rollouts, its step Gaussians."""
        s: FlowSteps = rollout.steps
        tags = [p.tag for p in rollout.context] if isinstance(model, dict) else None
        v_B_T_D = step_velocities(self.velocity_fn(model, tags), rollout)
        if s.noise_level > 0:
            return VelocityStepDist(
                v_B_T_D, step_dists(rollout, v_B_T_D), s.kl_weight_B_T(), s.dt_B_T, rollout.mask_B_T, s.logprob_reduce
            )
        return VelocityStepDist(v_B_T_D, None, None, s.dt_B_T, rollout.mask_B_T, s.logprob_reduce)

    def dist_metrics(self, dist: Any, rollout: Rollout) -> dict[str, float]:
        """No extra per-step metrics for flow models (the objectives report velocity distances)."""
        return {}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(
        self,
        model: Any,
        task: Any,
        cfg: FlowEvalConfig,
        seed: int = 0,
        out_dir: Path | None = None,
        tag: str = "eval",
        show: int = 3,
    ) -> dict[str, Any]:
        """Euler ODE samples (`eval.num_steps`, `eval.guidance_scale`) for held-out prompts, the same
        noise for every model; mean of every task reward; a sample grid of `eval.grid` images in
        `out_dir/tag.png` (images are shown there, so `show` is not used).
        The caller puts the model in eval mode (the training loop does, around in-loop evaluations)."""
        problems = task.problems(cfg.split, cfg.n, seed=seed)
        sums: dict[str, float] = {}
        grid: list[tuple[np.ndarray, str, dict[str, float]]] = []
        for start in range(0, len(problems), cfg.batch_size):
            batch = problems[start : start + cfg.batch_size]
            gen = torch.Generator(device=self.device).manual_seed(10_007 + seed + start)
            r = self.sample(model, batch, cfg.num_steps, cfg.guidance_scale, 0.0, "sum", gen)
            images = P.decode_latents(self.pipe, r.extras["x0_B_C_H_W"])
            rewards = task.rewards(batch, images)
            for k, v in rewards.items():
                sums[k] = sums.get(k, 0.0) + float(np.sum(v))
            for i in range(min(len(batch), cfg.grid - len(grid))):
                grid.append(
                    (
                        images[i].permute(1, 2, 0).cpu().numpy(),
                        batch[i].prompt,
                        {k: float(v[i]) for k, v in rewards.items()},
                    )
                )
        n = len(problems)
        out: dict[str, Any] = {"n": n, **{f"{k}_reward": v / max(n, 1) for k, v in sums.items()}}
        if out_dir is not None and grid:
            path = Path(out_dir) / f"{tag}.png"
            save_grid(grid, path)
            out["grid"] = str(path)
        return out


def save_grid(items: list[tuple[np.ndarray, str, dict[str, float]]], path: Path) -> None:
    """Images with their prompt and rewards as titles, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, prompt, rewards) in zip(axes.flat, items):
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
        words = prompt.split()
        title = " ".join(words[: len(words) // 2]) + "\n" + " ".join(words[len(words) // 2 :])
        title += "\n" + " ".join(f"{k[:3]} {v:.2f}" for k, v in rewards.items())
        ax.set_title(title, fontsize=6.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
