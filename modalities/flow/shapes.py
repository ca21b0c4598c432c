"""The built-in synthetic text-to-image task `shapes`: two coloured shapes and a spatial relation.

Prompts: "a {colour} {shape} {relation} a {colour} {shape}" with colours {red, green,
blue, yellow} (the two objects differ in colour, so pixels tell them apart), shapes
{circle, square} and relations {on the left of, on the right of, above, below}:
4 * 3 * 2 * 2 * 4 = 192 prompts.  The train/test split is by a stable hash (sha256) of
the prompt's canonical scene, so "a red circle on the left of a blue square" and "a blue
square on the right of a red circle" always land in the same split.

`render` draws the (image, caption) training pairs with numpy: a black background and
the two shapes with random size and position jitter, images `[3, H, W]` in [0, 1].
Rewards read pixels only (batched, no model; `count` is reported, not trained on by the recipes):
- `color_reward`: each named colour covers at least `min_area` of the image, and no
  unnamed palette colour does;
- `position_reward`: the centroids of the two colours are displaced along the relation's
  axis by at least a quarter of the image (0 if a colour is missing);
- `count_reward`: each named colour forms exactly one object (one connected region), not fragments.

    python -c "from mmdistill.modalities.flow.shapes import *; p = split_prompts('train')[0]; print(p.text, color_reward(render(p)[None], [p]))"
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "COLORS",
    "SHAPES",
    "RELATIONS",
    "VOCABULARY",
    "ShapesPrompt",
    "all_prompts",
    "parse_prompt",
    "split_of",
    "split_prompts",
    "sample_prompts",
    "render",
    "render_batch",
    "color_reward",
    "position_reward",
    "count_reward",
    "rewards",
]

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
SHAPES = ("circle", "square")
RELATIONS = ("on the left of", "on the right of", "above", "below")
VOCABULARY = sorted({"a", *COLORS, *SHAPES, *" ".join(RELATIONS).split()})
_PALETTE_K_3 = np.array(list(COLORS.values()), dtype=np.float32)
_COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}
_CONVERSE = {
    "on the left of": "on the right of",
    "on the right of": "on the left of",
    "above": "below",
    "below": "above",
}

Split = Literal["train", "test"]


@dataclass(frozen=True)
class ShapesPrompt:
    color1: str
    shape1: str
    relation: str
    color2: str
    shape2: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("color1", self.color1, COLORS),
            ("color2", self.color2, COLORS),
            ("shape1", self.shape1, SHAPES),
            ("shape2", self.shape2, SHAPES),
            ("relation", self.relation, RELATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}; got {value!r}")
        if self.color1 == self.color2:
            raise ValueError(
                f"the two objects need different colours (rewards tell them apart by colour); got {self.color1!r} twice"
            )

    @property
    def text(self) -> str:
        return f"a {self.color1} {self.shape1} {self.relation} a {self.color2} {self.shape2}"

    def canonical(self) -> ShapesPrompt:
        """The same scene written with relation 'on the left of' or 'above'."""
        if self.relation in ("on the left of", "above"):
            return self
        return ShapesPrompt(self.color2, self.shape2, _CONVERSE[self.relation], self.color1, self.shape1)


def all_prompts() -> list[ShapesPrompt]:
    return [
        ShapesPrompt(c1, s1, r, c2, s2)
        for c1 in COLORS
        for s1 in SHAPES
        for r in RELATIONS
        for c2 in COLORS
        for s2 in SHAPES
        if c1 != c2
    ]


def parse_prompt(text: str) -> ShapesPrompt:
    """Inverse of `ShapesPrompt.text`."""
    words = text.strip().split()
    for rel in RELATIONS:
        n = len(rel.split())
        if len(words) == 3 + n + 3 and " ".join(words[3 : 3 + n]) == rel and words[0] == "a" and words[3 + n] == "a":
            return ShapesPrompt(words[1], words[2], rel, words[4 + n], words[5 + n])
    raise ValueError(f"not a shapes prompt: {text!r}; expected e.g. 'a red circle on the left of a blue square'")


def split_of(prompt: ShapesPrompt, test_fraction: float = 0.25) -> Split:
    """'test' for about `test_fraction` of the scenes, by sha256 of the canonical prompt (stable across runs)."""
    digest = hashlib.sha256(prompt.canonical().text.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def split_prompts(split: Split, test_fraction: float = 0.25) -> list[ShapesPrompt]:
    """Every prompt of one split ("train" or "test"), in `all_prompts` order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    return [p for p in all_prompts() if split_of(p, test_fraction) == split]


def sample_prompts(
    rng: random.Random, n: int, split: Split = "train", test_fraction: float = 0.25
) -> list[ShapesPrompt]:
    """`n` prompts drawn with replacement from one split."""
    pool = split_prompts(split, test_fraction)
    return [rng.choice(pool) for _ in range(n)]


# ----------------------------------------------------------------------------- rendering


def _draw(img_3_H_W: np.ndarray, shape: str, color: str, cy: float, cx: float, r: float) -> None:
    H, W = img_3_H_W.shape[1:]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    if shape == "circle":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    else:  # a square of the circle's area
        half = r * np.sqrt(np.pi) / 2
        inside = (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    img_3_H_W[:, inside] = np.array(COLORS[color], dtype=np.float32)[:, None]


def render(prompt: ShapesPrompt, rng: np.random.Generator | None = None, size: int = 32) -> np.ndarray:
    """An image `[3, size, size]` float32 in [0, 1] that satisfies the prompt.

    Object 1 sits in the first quarter-to-third of the relation's axis, object 2 in the last;
    radius 12-18 % of the image, positions jittered; the shapes never overlap."""
    rng = rng if rng is not None else np.random.default_rng()
    img = np.zeros((3, size, size), dtype=np.float32)
    r1, r2 = rng.uniform(0.12, 0.18, 2) * size
    near, far = rng.uniform(0.22, 0.32) * size, rng.uniform(0.68, 0.78) * size
    across1, across2 = rng.uniform(0.3, 0.7, 2) * size
    first_is_near = prompt.relation in ("on the left of", "above")
    a1, a2 = (near, far) if first_is_near else (far, near)
    horizontal = prompt.relation in ("on the left of", "on the right of")
    (y1, x1), (y2, x2) = ((across1, a1), (across2, a2)) if horizontal else ((a1, across1), (a2, across2))
    _draw(img, prompt.shape1, prompt.color1, y1, x1, r1)
    _draw(img, prompt.shape2, prompt.color2, y2, x2, r2)
    return img


def render_batch(prompts: Sequence[ShapesPrompt], seed: int = 0, size: int = 32) -> np.ndarray:
    """`[B, 3, size, size]` training images, one per prompt, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return np.stack([render(p, rng, size) for p in prompts])


# ----------------------------------------------------------------------------- rewards


def _as_numpy(images) -> np.ndarray:
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1]; got shape {images.shape}")
    return images


def _prompts(prompts: Sequence[ShapesPrompt | str]) -> list[ShapesPrompt]:
    return [parse_prompt(p) if isinstance(p, str) else p for p in prompts]


def _color_masks(images_B_3_H_W: np.ndarray, tolerance: float) -> np.ndarray:
    """`[B, K, H, W]`: pixels within `tolerance` (Euclidean, RGB) of each palette colour."""
    d = images_B_3_H_W[:, None] - _PALETTE_K_3[None, :, :, None, None]
    return np.sqrt((d**2).sum(2)) <= tolerance


def color_reward(
    images_B_3_H_W, prompts: Sequence[ShapesPrompt | str], min_area: float = 0.02, tolerance: float = 0.4
) -> np.ndarray:
    """`[B]` in [0, 1]: mean over the two named colours of min(1, area / min_area), times
    1 - min(1, area of the unnamed palette colours / min_area).  Areas are fractions of the image."""
    images, ps = _as_numpy(images_B_3_H_W), _prompts(prompts)
    area_B_K = _color_masks(images, tolerance).mean((2, 3))
    idx1 = np.array([_COLOR_INDEX[p.color1] for p in ps])
    idx2 = np.array([_COLOR_INDEX[p.color2] for p in ps])
    rows = np.arange(len(ps))
    named = np.zeros_like(area_B_K, dtype=bool)
    named[rows, idx1] = named[rows, idx2] = True
    present = (np.minimum(area_B_K[rows, idx1] / min_area, 1) + np.minimum(area_B_K[rows, idx2] / min_area, 1)) / 2
    extra = np.where(named, 0.0, area_B_K).sum(1)
    return (present * (1 - np.minimum(extra / min_area, 1))).astype(np.float32)


def position_reward(
    images_B_3_H_W,
    prompts: Sequence[ShapesPrompt | str],
    min_area: float = 0.02,
    tolerance: float = 0.4,
    margin: float = 0.25,
) -> np.ndarray:
    """`[B]` in [0, 1]: clip(d / margin, 0, 1), d the displacement of colour 2's centroid from
    colour 1's along the relation (x for left/right, y for above/below; +: as the prompt says),
    in image widths.  0 when either colour covers less than min_area / 4."""
    images, ps = _as_numpy(images_B_3_H_W), _prompts(prompts)
    B, _, H, W = images.shape
    masks = _color_masks(images, tolerance).astype(np.float32)
    rows = np.arange(B)
    m1 = masks[rows, [_COLOR_INDEX[p.color1] for p in ps]]
    m2 = masks[rows, [_COLOR_INDEX[p.color2] for p in ps]]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5

    def centroid(m_B_H_W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = m_B_H_W.sum((1, 2))
        safe = np.maximum(n, 1)
        return (m_B_H_W * yy).sum((1, 2)) / safe / H, (m_B_H_W * xx).sum((1, 2)) / safe / W, n / (H * W)

    y1, x1, a1 = centroid(m1)
    y2, x2, a2 = centroid(m2)
    sign = np.array([1.0 if p.relation in ("on the left of", "above") else -1.0 for p in ps])
    horizontal = np.array([p.relation in ("on the left of", "on the right of") for p in ps])
    d = sign * np.where(horizontal, x2 - x1, y2 - y1)
    ok = (a1 >= min_area / 4) & (a2 >= min_area / 4)
    return np.where(ok, np.clip(d / margin, 0, 1), 0.0).astype(np.float32)


def _components(mask_H_W: np.ndarray, min_pixels: int) -> int:
    """Number of 4-connected components of at least `min_pixels` pixels (an iterative flood fill)."""
    H, W = mask_H_W.shape
    seen = np.zeros_like(mask_H_W, dtype=bool)
    count = 0
    for y0, x0 in zip(*np.nonzero(mask_H_W)):
        if seen[y0, x0]:
            continue
        stack, size = [(y0, x0)], 0
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            size += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < H and 0 <= xx < W and mask_H_W[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        count += size >= min_pixels
    return count


def count_reward(
    images_B_3_H_W, prompts: Sequence[ShapesPrompt | str], min_area: float = 0.02, tolerance: float = 0.4
) -> np.ndarray:
    """`[B]` in [0, 1]: half a point for each named colour that forms exactly one object (one
    4-connected region of at least min_area / 4 of the image) -- two objects, not fragments."""
    images, ps = _as_numpy(images_B_3_H_W), _prompts(prompts)
    B, _, H, W = images.shape
    masks = _color_masks(images, tolerance)
    min_pixels = max(2, int(round(min_area / 4 * H * W)))
    out = np.zeros(B, np.float32)
    for b, p in enumerate(ps):
        for c in (p.color1, p.color2):
            out[b] += 0.5 * (_components(masks[b, _COLOR_INDEX[c]], min_pixels) == 1)
    return out


def rewards(images_B_3_H_W, prompts: Sequence[ShapesPrompt | str]) -> dict[str, np.ndarray]:
    """Every pixel reward by name, plus their mean as "avg" (one reward per GRPO teacher)."""
    out = {"color": color_reward(images_B_3_H_W, prompts), "position": position_reward(images_B_3_H_W, prompts)}
    out["avg"] = (out["color"] + out["position"]) / 2
    return out
