"""Named LIBERO evaluation protocols: what each published evaluation script does, as plain records.

A protocol fixes everything outside the policy that changes a LIBERO success rate: the step
limit per suite, the no-op "settle" steps after `reset + set_init_state` and their action, the
environment seed, which initial states are used, the cameras and their resolution, the image
preprocessing, the state layout and the post-processing of the policy's action.  Each number
below cites the file it was read from (repository + path); a field marked `[unverified]` in a
record's `unverified` tuple could not be confirmed from source and is our best reading.

    protocol:  openvla | openpi | lerobot | rlinf | libero     (task: {type: libero, protocol: openvla})

`postprocess_action(protocol, action, stats)` is the protocol's action post-processing, in one place
(un-normalisation from a checkpoint's dataset statistics when given, gripper binarise / invert,
clipping); `LEROBOT_IMAGE_KEYS` names each camera's observation key (LeRobot's LIBERO convention,
whatever the original script called it); `wilson_interval(k, n)` is the binomial 95% interval
reported with every success rate.

    python -m mmdistill.modalities.robot.protocols            # prints every protocol's record
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType

import numpy as np

from mmdistill.errors import ConfigError

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
NUM_INIT_STATES = 50  # LIBERO's `.pruned_init` files hold 50 initial states per task
NOOP_OPEN = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # no motion, gripper commanded open
NOOP_ZERO = (0.0,) * 7  # no motion, gripper command 0
STATE_8D = ("eef_pos[3]", "eef_axis_angle[3]", "gripper_qpos[2]")
# LeRobot's LIBERO environment (huggingface/lerobot src/lerobot/envs/libero.py, camera_name_mapping
# agentview_image -> image, robot0_eye_in_hand_image -> image2, prefixed `observation.images.`):
# the keys our environment serves whatever the protocol's own script called them (`image_keys`)
LEROBOT_IMAGE_KEYS: Mapping[str, str] = MappingProxyType(
    {"agentview": "observation.images.image", "robot0_eye_in_hand": "observation.images.image2"}
)
RESIZE_FILTERS = ("bilinear", "lanczos")


class FrozenSteps(dict):
    """A read-only `{suite: steps}` that pickles (environment workers receive the task by pickle)."""

    def _read_only(self, *args, **kwargs):
        raise TypeError("protocol step limits are read-only; override with task.max_steps")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _read_only  # type: ignore[assignment]

    def __reduce__(self):
        return (FrozenSteps, (dict(self),))

    def __hash__(self) -> int:  # frozen dataclasses hash their fields
        return hash(tuple(self.items()))


def _steps(spatial: int, obj: int, goal: int, long: int, ninety: int) -> Mapping[str, int]:
    return FrozenSteps(zip(SUITES, (spatial, obj, goal, long, ninety)))


@dataclass(frozen=True)
class EvalProtocol:
    """One evaluation protocol (see the module docstring); `source` names the files read.

    max_steps:          policy steps per episode, per suite (settle steps not counted)
    settle_steps:       no-op steps after `reset()` + `set_init_state(state)`, before the policy acts
    settle_action:      the 7-D action sent during those steps
    env_seed:           `env.seed(...)` (LIBERO: `np.random.seed`) at environment creation
    global_seed:        the script's seed for the policy's own sampling (None: not set)
    init_states:        "official": LIBERO's `.pruned_init` states, episode i uses state i
    episodes_per_task:  the script's default (50: every official state once)
    cameras:            robosuite camera names, in the order the policy's image keys use
    image_keys:         the observation key of each camera in the protocol's own script (our environment
                        serves LeRobot's keys instead: `LEROBOT_IMAGE_KEYS`)
    render_size:        square render resolution (px)
    flip_180:           images rotated 180 degrees (`img[::-1, ::-1]`) before the policy
    policy_image_size:  resize for the policy (None: as rendered)
    resize_filter:      the resampling filter of that resize (bilinear or lanczos)
    image_preprocessing: what happens to the image between render and policy, in words
    state_layout:       the proprioceptive vector the policy reads (empty: none)
    action_unnormalize: how the policy's output becomes an environment action
    gripper_binarize:   gripper mapped [0, 1] -> [-1, 1] then to its sign
    gripper_invert:     gripper sign flipped (dataset: 0 = close, env: -1 = open)
    replan_steps:       actions executed from each predicted chunk (None: the policy's chunk)
    success:            when an episode counts as a success
    """

    name: str
    source: tuple[str, ...]
    max_steps: Mapping[str, int]
    settle_steps: int
    settle_action: tuple[float, ...]
    env_seed: int
    global_seed: int | None
    init_states: str
    episodes_per_task: int
    cameras: tuple[str, ...]
    image_keys: tuple[str, ...]
    render_size: int
    flip_180: bool
    policy_image_size: int | None
    image_preprocessing: str
    state_layout: tuple[str, ...]
    action_unnormalize: str
    gripper_binarize: bool
    gripper_invert: bool
    replan_steps: int | None = None
    resize_filter: str = "bilinear"
    success: str = "env.check_success() after every environment step; the episode stops at the first success"
    unverified: tuple[str, ...] = field(default=())

    def steps_for(self, suite: str) -> int:
        if suite not in self.max_steps:
            raise ConfigError(
                f"task.suite: {suite!r} has no step limit in protocol {self.name}; choose one of {SUITES}"
            )
        return self.max_steps[suite]

    def record(self) -> dict:
        """A JSON-ready copy (for report.json)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {
            k: dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v for k, v in out.items()
        }


# OpenVLA: openvla/openvla experiments/robot/libero/run_libero_eval.py (max_steps per suite, with
# "longest training demo" comments; num_steps_wait 10; num_trials_per_task 50; seed 7 through
# set_seed_everywhere; episode i uses initial_states[i]; get_libero_env(..., resolution=256);
# normalize_gripper_action(binarize=True) then invert_gripper_action; unnorm_key = suite) and
# experiments/robot/libero/libero_utils.py (env.seed(0); dummy action [0]*6 + [-1]; agentview only,
# img[::-1, ::-1]).
OPENVLA = EvalProtocol(
    name="openvla",
    source=(
        "openvla/openvla experiments/robot/libero/run_libero_eval.py",
        "openvla/openvla experiments/robot/libero/libero_utils.py",
    ),
    max_steps=_steps(220, 280, 300, 520, 400),
    settle_steps=10,
    settle_action=NOOP_OPEN,
    env_seed=0,
    global_seed=7,
    init_states="official",
    episodes_per_task=NUM_INIT_STATES,
    cameras=("agentview",),
    image_keys=("observation.images.image",),
    render_size=256,
    flip_180=True,
    policy_image_size=224,
    image_preprocessing="flip 180, JPEG round-trip and lanczos3 resize to 224 (Octo/RLDS scheme); center crop "
    "(0.9 area) when the checkpoint was trained with image augmentation",
    state_layout=(),  # the script builds the 8-D state but OpenVLA does not read proprioception
    action_unnormalize="bounds_q99: the checkpoint's norm_stats[unnorm_key] (q01/q99 per dimension)",
    gripper_binarize=True,
    gripper_invert=True,
    resize_filter="lanczos",
    unverified=(
        "image_preprocessing (JPEG round-trip, lanczos3; our environment resizes with PIL's lanczos, no JPEG)",
        "action_unnormalize (q01/q99 bounds)",
    ),
)

# openpi: Physical-Intelligence/openpi examples/libero/main.py (the same max_steps table;
# LIBERO_DUMMY_ACTION [0]*6 + [-1]; num_steps_wait 10; LIBERO_ENV_RESOLUTION 256; env.seed(seed)
# and np.random.seed(seed) with seed 7; agentview + robot0_eye_in_hand flipped 180 and
# resize_with_pad to 224; state eef_pos + axis-angle + gripper_qpos; replan_steps 5; the
# client executes the server's actions as returned).
OPENPI = EvalProtocol(
    name="openpi",
    source=("Physical-Intelligence/openpi examples/libero/main.py",),
    max_steps=_steps(220, 280, 300, 520, 400),
    settle_steps=10,
    settle_action=NOOP_OPEN,
    env_seed=7,
    global_seed=7,
    init_states="official",
    episodes_per_task=NUM_INIT_STATES,
    cameras=("agentview", "robot0_eye_in_hand"),
    image_keys=("observation/image", "observation/wrist_image"),
    render_size=256,
    flip_180=True,
    policy_image_size=224,
    image_preprocessing="flip 180, resize_with_pad to 224 (aspect kept, zero padding), uint8",
    state_layout=STATE_8D,
    action_unnormalize="policy server: the checkpoint's norm stats (un-normalised before returning)",
    gripper_binarize=False,
    gripper_invert=False,
    replan_steps=5,
    unverified=("action_unnormalize (done server-side, not in main.py)",),
)

# LeRobot: huggingface/lerobot src/lerobot/envs/libero.py (TASK_SUITE_MAX_STEPS: spatial 280,
# object 280, goal 300, 10 520, 90 400; num_steps_wait 10; get_libero_dummy_action [0]*6 + [-1];
# cameras agentview_image -> image, robot0_eye_in_hand_image -> image2 at 256; env.seed(seed)
# from reset(seed=...); init state `init_state_id % len(states)`, i.e. it wraps) and
# src/lerobot/processor/env_processor.py (LiberoProcessorStep: every `observation.images.*` key,
# the wrist camera too, flipped in H and W; 8-D state eef pos + axis-angle + gripper qpos).
LEROBOT = EvalProtocol(
    name="lerobot",
    source=(
        "huggingface/lerobot src/lerobot/envs/libero.py",
        "huggingface/lerobot src/lerobot/processor/env_processor.py",
    ),
    max_steps=_steps(280, 280, 300, 520, 400),
    settle_steps=10,
    settle_action=NOOP_OPEN,
    env_seed=1000,
    global_seed=1000,
    init_states="official",
    episodes_per_task=NUM_INIT_STATES,
    cameras=("agentview", "robot0_eye_in_hand"),
    image_keys=("observation.images.image", "observation.images.image2"),
    render_size=256,
    flip_180=True,
    policy_image_size=None,
    image_preprocessing="flip 180 (LiberoProcessorStep); the policy's own preprocessor resizes "
    "(SmolVLA: resize_with_pad to 512)",
    state_layout=STATE_8D,
    action_unnormalize="policy postprocessor: the dataset's action stats (SmolVLA: mean/std)",
    gripper_binarize=False,
    gripper_invert=False,
    unverified=(
        "env_seed/global_seed 1000 (lerobot-eval's default seed)",
        "image_preprocessing (SmolVLA resize 512)",
        "action_unnormalize (mean/std)",
    ),
)

# RLinf: RLinf/RLinf examples/embodiment/config/env/eval/libero_{spatial,object,goal,10}.yaml
# (max_episode_steps 512, seed 0, camera_heights/widths 256, num_images_in_input 1,
# only_eval with fixed ordered reset state ids) and rlinf/envs/libero/libero_env.py (seed =
# cfg.seed + rank; 10 steps of np.zeros((num_envs, 7)) after reset; state eef_pos + axis-angle +
# gripper_qpos; ignore_terminations: success counted once reached, "success_once").
RLINF = EvalProtocol(
    name="rlinf",
    source=(
        "RLinf/RLinf examples/embodiment/config/env/eval/libero_spatial.yaml (and _object, _goal, _10)",
        "RLinf/RLinf rlinf/envs/libero/libero_env.py",
    ),
    max_steps=_steps(512, 512, 512, 512, 512),
    settle_steps=10,
    settle_action=NOOP_ZERO,
    env_seed=0,
    global_seed=None,
    init_states="official",
    episodes_per_task=NUM_INIT_STATES,
    cameras=("agentview",),
    image_keys=("full_image",),
    render_size=256,
    flip_180=True,
    policy_image_size=224,
    image_preprocessing="flip 180 (get_libero_image), the model's processor resizes to 224",
    state_layout=STATE_8D,
    action_unnormalize="model side (OpenVLA-OFT: q01/q99 bounds of the LIBERO dataset)",
    gripper_binarize=True,
    gripper_invert=True,
    success="success_once: any environment step's success within max_steps (terminations ignored)",
    unverified=(
        "max_steps libero_90 (no eval config for it found; 512 assumed)",
        "flip_180 and policy_image_size (rlinf libero_utils not read)",
        "action_unnormalize, gripper_binarize, gripper_invert (model-side, OpenVLA-OFT convention)",
    ),
)

# LIBERO's own lifelong-learning evaluation: Lifelong-Robot-Learning/LIBERO
# libero/configs/eval/default.yaml (max_steps 600, n_eval 20), libero/configs/data/default.yaml
# (img_h = img_w = 128, agentview_rgb + eye_in_hand_rgb, low_dim gripper_states + joint_states)
# and libero/lifelong/metric.py (env.seed(cfg.seed); init states `arange % 50`; 5 steps of
# np.zeros(7) after set_init_state; success = env done).
LIBERO = EvalProtocol(
    name="libero",
    source=(
        "Lifelong-Robot-Learning/LIBERO libero/configs/eval/default.yaml",
        "Lifelong-Robot-Learning/LIBERO libero/configs/data/default.yaml",
        "Lifelong-Robot-Learning/LIBERO libero/lifelong/metric.py",
    ),
    max_steps=_steps(600, 600, 600, 600, 600),
    settle_steps=5,
    settle_action=NOOP_ZERO,
    env_seed=10_000,
    global_seed=10_000,
    init_states="official",
    episodes_per_task=20,
    cameras=("agentview", "robot0_eye_in_hand"),
    image_keys=("agentview_rgb", "eye_in_hand_rgb"),
    render_size=128,
    flip_180=False,
    policy_image_size=None,
    image_preprocessing="none: the raw 128 px renders",
    state_layout=("gripper_qpos[2]", "joint_pos[7]"),
    action_unnormalize="none: actions in the environment's [-1, 1] range",
    gripper_binarize=False,
    gripper_invert=False,
    unverified=("env_seed/global_seed 10000 (the lifelong scripts' training seed)", "flip_180 (raw images)"),
)

PROTOCOLS: Mapping[str, EvalProtocol] = MappingProxyType({p.name: p for p in (OPENVLA, OPENPI, LEROBOT, RLINF, LIBERO)})
DEFAULT_PROTOCOL = "openvla"  # object 280 steps, 10 open-gripper no-ops, env.seed(0): the packaged configs' behaviour


def get_protocol(name: str) -> EvalProtocol:
    """The protocol called `name`; a ConfigError that lists the known ones otherwise."""
    if name not in PROTOCOLS:
        raise ConfigError(
            f"task.protocol: unknown evaluation protocol {name!r}; choose one of {', '.join(PROTOCOLS)} "
            f"(e.g. task.protocol={DEFAULT_PROTOCOL})"
        )
    return PROTOCOLS[name]


def state_dim(layout: tuple[str, ...]) -> int:
    """The size of a state layout: the sum of its `name[n]` entries (`STATE_8D` -> 8)."""
    try:
        return sum(int(part.rsplit("[", 1)[1].rstrip("]")) for part in layout)
    except (IndexError, ValueError):
        raise ValueError(f"state layout entries must read name[size]; got {layout}") from None


def unnormalize_action(action_A: np.ndarray, stats: Mapping[str, object]) -> np.ndarray:
    """A normalised action `[..., A]` in environment units, from one checkpoint's action statistics:
    `q01`/`q99` (OpenVLA's bounds_q99: `0.5 * (a + 1) * (q99 - q01) + q01`, only where `mask` is true:
    LIBERO's gripper is not normalised), `min`/`max` (the same with min/max) or `mean`/`std`
    (`a * std + mean`)."""
    a = np.asarray(action_A, dtype=np.float64)
    for low_key, high_key in (("q01", "q99"), ("min", "max")):
        if low_key in stats and high_key in stats:
            low, high = (np.asarray(stats[k], dtype=np.float64) for k in (low_key, high_key))
            mask = np.asarray(stats.get("mask", np.ones_like(low)), dtype=bool)
            return np.where(mask, 0.5 * (a + 1.0) * (high - low) + low, a)
    if "mean" in stats and "std" in stats:
        return a * np.asarray(stats["std"], dtype=np.float64) + np.asarray(stats["mean"], dtype=np.float64)
    raise ConfigError(
        f"task.action_stats: needs q01/q99 (OpenVLA), min/max or mean/std per action dimension; got {sorted(stats)}"
    )


def postprocess_action(
    protocol: EvalProtocol, action_A: np.ndarray, stats: Mapping[str, object] | None = None
) -> np.ndarray:
    """The protocol's post-processing of a policy's actions `[..., 7]`, in the order the published
    scripts apply it: un-normalisation with the checkpoint's action `stats` (only when given: LeRobot
    policies un-normalise themselves), the gripper binarised (maps [0, 1] to [-1, 1], then takes its
    sign: OpenVLA's normalize_gripper_action(binarize=True)) and inverted (flips the sign: dataset
    1 = open, environment -1 = open), then clipped to the environment's [-1, 1]."""
    a = np.array(action_A, dtype=np.float64, copy=True)
    if stats is not None:
        a = unnormalize_action(a, stats)
    if protocol.gripper_binarize:
        a[..., -1] = np.sign(2.0 * a[..., -1] - 1.0)
    if protocol.gripper_invert:
        a[..., -1] = -a[..., -1]
    return a.clip(-1.0, 1.0)


def wilson_interval(k: int | float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% at the default z): `k` successes of `n`."""
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be >= 1 episodes; got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: successes k={k} must lie in 0..n={n}")
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def success_summary(successes: list[float]) -> dict:
    """`{"success": k/n, "k": k, "n": n, "ci95": [low, high]}` of a list of 0/1 episode outcomes."""
    n, k = len(successes), int(round(sum(successes)))
    lo, hi = wilson_interval(k, n)
    return {"success": k / n, "k": k, "n": n, "ci95": [round(lo, 4), round(hi, 4)]}


if __name__ == "__main__":
    import json

    for p in PROTOCOLS.values():
        print(json.dumps(p.record(), indent=1))
