"""Image rewards for text-to-image training: a small interface and a CLIP score through open_clip.

A reward maps generated images `[B, 3, H, W]` in [0, 1] and their prompts to `[B]` scores.
The `shapes` task computes its rewards from pixels (`shapes.color_reward`, ...); `ClipScore`
scores image-text agreement with any `open_clip.create_model` architecture, weights read from
a local file (no download), as Flow-GRPO's and DanceGRPO's CLIP-score rewards do.

    from mmdistill.modalities.flow.rewards import ClipScore
    reward = ClipScore("ViT-B-32", weights="/models/open_clip_vit_b32.bin")
    scores_B = reward(images_B_3_H_W, ["a red circle", ...])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mmdistill.errors import CheckpointError, ConfigError


class Reward(Protocol):
    """`reward(images_B_3_H_W in [0, 1], prompts) -> [B]` float32 scores."""

    name: str

    def __call__(self, images_B_3_H_W: Tensor, prompts: Sequence[str]) -> np.ndarray: ...


class ClipScore:
    """`scale * max(cos(E_img(x), E_txt(c)), 0)` with an open_clip model (CLIPScore, Hessel et al.
    2021, uses scale 2.5; 1.0 gives the plain cosine).  Images are resized (bicubic) to the model's
    input size and normalised with its mean / std; the model is frozen and runs without gradient."""

    def __init__(
        self,
        arch: str = "ViT-B-32",
        weights: str | None = None,
        scale: float = 1.0,
        device: str | torch.device = "cpu",
        force_image_size: int | None = None,
        name: str = "clip",
    ):
        import open_clip

        if arch not in open_clip.list_models():
            raise ConfigError(
                f"unknown open_clip architecture '{arch}'; choose one of open_clip.list_models(), e.g. ViT-B-32"
            )
        if weights is not None and not Path(weights).is_file():
            raise CheckpointError(
                f"CLIP weights '{weights}' not found; give a local open_clip checkpoint file (downloads are not attempted)"
            )
        try:
            self.model = open_clip.create_model(
                arch, pretrained=weights, device=device, force_image_size=force_image_size
            )
        except RuntimeError as e:
            raise CheckpointError(
                f"cannot load CLIP weights '{weights}' into {arch} ({str(e).splitlines()[0]}); check the architecture"
            ) from None
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = self.model.visual.preprocess_cfg
        self.size = tuple(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
        self.scale, self.device, self.name = scale, torch.device(device), name
        self.randomly_initialised = weights is None

    @torch.no_grad()
    def embed_images(self, images_B_3_H_W: Tensor) -> Tensor:
        x = images_B_3_H_W.float().to(self.device).clamp(0, 1)
        x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False).clamp(0, 1)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def __call__(self, images_B_3_H_W: Tensor, prompts: Sequence[str]) -> np.ndarray:
        if len(prompts) != images_B_3_H_W.shape[0]:
            raise ValueError(f"one prompt per image: {images_B_3_H_W.shape[0]} images, {len(prompts)} prompts")
        cos_B = (self.embed_images(images_B_3_H_W) * self.embed_texts(prompts)).sum(-1)
        return (self.scale * cos_B.clamp(min=0)).cpu().numpy().astype(np.float32)
