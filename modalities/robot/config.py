"""The robot adapter's own config sections: `rollout:`, `eval:` and `models.NAME.tiny` of a
`adapter: robot_policy` run, each checked by its own `__post_init__` (the core prefixes the key
path, e.g. `stages.rkl_opd.rollout.`).

    python -c "from mmdistill.modalities.robot.config import RobotEvalConfig; RobotEvalConfig(n=0)"
"""

from __future__ import annotations

from dataclasses import dataclass, fields
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
    # gaussian_mlp, vision_gaussian and the pick-place experts: the step distribution's family
    head: Literal["gaussian", "gaussian_bernoulli"] = "gaussian"  # gaussian_bernoulli: arm x gripper, one decision
    std_mode: Literal["param", "state"] = "param"  # gaussian_bernoulli students: state-independent or state-dependent
    log_std_min: float = -4.0  # gaussian_bernoulli students: the log-std is squashed into [min, max]
    log_std_max: float = 0.5
    gripper_logit: float = 8.0  # pick-place experts with head gaussian_bernoulli: |logit| of their open/close label
    obs_shift: list[float] | None = None  # students: network input (state - shift) / scale, one number per entry
    obs_scale: list[float] | None = None
    axis_angle: int | None = None  # students: index of a 3-D axis-angle in the state, fed as its rotation matrix
    # students: entries of observation.environment_state appended to the state (LIBERO 7..12: object and basket
    # positions, a low-dimensional state student); None: proprioception only
    env_entries: list[int] | None = None
    # students: differences env[i] - env[j] of observation.environment_state appended after env_entries (relative
    # positions: LIBERO [[0, 7], [1, 8], [2, 9]] is the end effector relative to the object)
    env_deltas: list[list[int]] | None = None


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

    n:           episodes: the first n initial states of the split (default: all of them); more than the split
                 holds is refused (no cycling)
    batch_size:  kept for configs that set it; all `n` episodes run as one batch
    split:       "official" (alias "test": the evaluation states), "heldout_layouts" (LIBERO: our own sampled
                 layouts, never official or trained on; needs task.num_heldout > 0) or "train" (training states)
    grid:        episodes in the video written at every evaluation (0: none)
    sampled:     also run the policy's samples (not only its mean action) from the same states, noise
                 seeded by the run seed: `sampled_success_rate`
    kl_teacher:  a teacher as a `models.NAME.tiny` section (a scripted expert): its own sampled episodes from
                 the first `kl_episodes` initial states of `kl_split` (noise seeded by `kl_seed`) are a fixed
                 set of teacher-visited states, made once per run; every evaluation reports the closed-form
                 `kl_to_teacher_reverse` KL(pi || teacher) and `kl_to_teacher_forward` KL(teacher || pi)
                 per decision there
    """

    n: int | None = None
    batch_size: int = 200
    split: str = "test"
    grid: int = 16
    sampled: bool = False
    kl_teacher: dict | None = None
    kl_episodes: int = 8
    kl_split: str = "heldout_layouts"
    kl_seed: int = 0

    def __post_init__(self) -> None:
        if self.n is not None:
            _at_least("n", self.n, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("grid", self.grid, 0)
        _at_least("kl_episodes", self.kl_episodes, 1)
        for key in ("split", "kl_split"):
            if getattr(self, key) not in ("official", "test", "heldout_layouts", "train"):
                raise ValueError(
                    f"{key}: {getattr(self, key)!r} is not a split of robot tasks; use official (alias test), "
                    "heldout_layouts or train"
                )
        if self.kl_teacher is not None:
            if not isinstance(self.kl_teacher, dict):
                raise ValueError(f"kl_teacher: {self.kl_teacher!r} is not a mapping; give a tiny section {{kind: ...}}")
            known = {f.name for f in fields(TinyPolicyConfig)}
            unknown = sorted(set(self.kl_teacher) - known)
            if unknown:
                raise ValueError(f"kl_teacher: unknown keys {unknown}; a tiny section takes {sorted(known)}")
