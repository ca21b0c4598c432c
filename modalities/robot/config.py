"""The robot adapter's own config sections: `rollout:`, `eval:` and `models.NAME.tiny` of a
`adapter: robot_policy` run, each checked by its own `__post_init__` (the core prefixes the key
path, e.g. `stages.rkl_opd.rollout.`).

    python -c "from mmdistill.modalities.robot.config import RobotEvalConfig; RobotEvalConfig(n=0)"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


def _at_least(name: str, value: float | int, low: float | int) -> None:
    if value < low:
        raise ValueError(f"{name}: {value} is below the smallest allowed value {low}")


@dataclass
class TinyPolicyConfig:
    """A policy built from this section: a Gaussian MLP or small vision student, or a scripted
    expert (`scripted_reach` for the point mass, `scripted_pick_place` for LIBERO; `funnel_pick_place` is the LIBERO
    expert that recovers from a student's states: funnel descent, wider closing box, re-grasp, orientation)."""

    kind: Literal[
        "gaussian_mlp",
        "vision_gaussian",
        "scripted_reach",
        "scripted_pick_place",
        "funnel_pick_place",
        "lerobot_act",
        "tokenized_lm",
    ] = "gaussian_mlp"
    hidden: int = 64
    layers: int = 2
    channels: int = 32  # vision_gaussian; lerobot_act: its transformer width (dim_model)
    init_log_std: float = -0.5
    chunk_size: int = 1  # actions per decision (rendering happens only at decisions)
    gain: float = 10.0  # scripted experts
    std: float = 0.1  # scripted experts
    grasp_dz: float = 0.02  # scripted_pick_place: grasp height above the object's origin (m)
    bins: int = 32  # tokenized_lm: action / state bins
    seed: int = 0


@dataclass
class RobotRolloutConfig:
    """`rollout:` of a robot stage: episodes from training initial states, one per row.

    group_size:   episodes per initial state (GRPO groups)
    temperature:  must stay 1.0: a policy samples at its own noise (a Gaussian head's std, a flow
                  head's `noise_level`, a tokenised LM's logits); the key exists because every
                  adapter's rollout section has it
    noise_level:  SDE noise `a` of flow action heads (SmolVLA) when sampling; 0 is the Euler ODE
    """

    group_size: int = 1
    temperature: float = 1.0
    noise_level: float = 0.7

    def __post_init__(self) -> None:
        _at_least("group_size", self.group_size, 1)
        if self.temperature != 1.0:
            raise ValueError(
                f"temperature: {self.temperature} is not supported by robot policies (they sample at their own noise: "
                f"a Gaussian head's std, a flow head's rollout.noise_level); remove rollout.temperature"
            )
        _at_least("noise_level", self.noise_level, 0.0)


@dataclass
class RobotEvalConfig:
    """`eval:` of a robot stage: the policy's mean action from `n` evaluation initial states.

    n:           episodes; LIBERO refuses more than the split holds (no cycling)
    batch_size:  kept for configs that set it; all `n` episodes run as one batch
    split:       "official" (alias "test": the evaluation states), "heldout_layouts" (LIBERO: our own sampled
                 layouts, never official or trained on; needs task.num_heldout > 0) or "train" (training states)
    grid:        episodes in the video written at every evaluation (0: none)
    """

    n: int = 200
    batch_size: int = 200
    split: str = "test"
    grid: int = 16

    def __post_init__(self) -> None:
        _at_least("n", self.n, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("grid", self.grid, 0)
        if self.split not in ("official", "test", "heldout_layouts", "train"):
            raise ValueError(
                f"split: {self.split!r} is not a split of robot tasks; use official (alias test), heldout_layouts "
                "or train"
            )
