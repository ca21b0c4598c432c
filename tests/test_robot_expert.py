"""The recovering (funnel) pick-and-place teacher: from off-path states a student visits (off in
xy at several heights, a yaw error, the gripper closed on nothing after a drop, a held object off
the target) its labels point back toward the grasp; no simulator, privileged states built by hand.

    python -m pytest tests/test_robot_expert.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.spatial.transform import Rotation

from mmdistill.modalities.robot.policies import FunnelPickPlaceExpert, ScriptedPickPlaceExpert, gaussian_log_prob

torch.set_num_threads(1)

OBJ, TGT = (-0.12, -0.24, 0.038), (0.015, 0.25, -0.005)  # LIBERO-Object task 0: the can and the basket
GRASP = (OBJ[0], OBJ[1], OBJ[2] + 0.02)
DOWN = Rotation.from_rotvec([math.pi, 0.0, 0.0])  # the gripper pointing down, LIBERO's start


def _priv(eef, obj=OBJ, tgt=TGT, width=0.08, qvel=0.0):
    """A privileged state vector in `libero.PRIVILEGED` order."""
    return torch.tensor([*eef, width / 2, -width / 2, qvel, -qvel, *obj, *tgt], dtype=torch.float32)


def _act(expert, priv, rotvec=None):
    rv = None if rotvec is None else torch.tensor(rotvec, dtype=torch.float32).view(1, 3)
    return expert.action(priv.view(1, -1), rv)[0] if rv is not None else expert.action(priv.view(1, -1))[0]


def _offsets():
    """xy offsets of 2-5 cm from the grasp point in several directions."""
    for r in (0.02, 0.035, 0.05):
        for k in range(6):
            th = 2 * math.pi * k / 6 + 0.3
            yield r * math.cos(th), r * math.sin(th)


@pytest.mark.parametrize("dz", [0.0, 0.01, 0.03, 0.06])
def test_off_in_xy_moves_back_toward_the_grasp_without_climbing_to_the_approach(dz):
    ex, old = FunnelPickPlaceExpert(), ScriptedPickPlaceExpert()
    climbs_old = 0
    for dx, dy in _offsets():
        eef = (GRASP[0] + dx, GRASP[1] + dy, GRASP[2] + dz)
        a = _act(ex, _priv(eef))
        err = torch.tensor([-dx, -dy])
        assert float(a[:2] @ err) > 0, f"xy label {a[:2].tolist()} does not reduce the xy error {err.tolist()}"
        # the z label aims at the funnel's height for this xy error, well below the approach height
        h = ex.p["funnel_slope"] * (math.hypot(dx, dy) - ex.p["funnel_free"])
        target_z = eef[2] + float(a[2]) / ex.p["gain"]
        assert target_z < GRASP[2] + ex.p["approach"] - 0.02
        if dz > h + 0.005:  # inside the funnel (above its surface): descend, never climb
            assert a[2] < 0
        if math.hypot(dx, dy) > ex.p["close_xy"] + 1e-3 or dz > ex.p["close_dz"] + 1e-3:
            assert a[6] == -1  # outside the closing box: stay open
        climbs_old += bool(_act(old, _priv(eef))[2] > 0.5)
    if dz <= 0.03:  # the old expert climbs back toward the approach height from these states
        assert climbs_old >= 12


def test_closes_inside_the_wider_box_and_keeps_closing_around_the_object():
    ex, old = FunnelPickPlaceExpert(), ScriptedPickPlaceExpert()
    eef = (GRASP[0] + 0.012, GRASP[1] - 0.008, GRASP[2] + 0.01)  # 1.4 cm off in xy, 1 cm above the grasp
    assert _act(ex, _priv(eef))[6] == 1 and _act(old, _priv(eef))[6] == -1
    # fingers closing on the can (width 0.07, still moving), drifted 2.5 cm: keep closing, stay low
    eef = (GRASP[0] + 0.025, GRASP[1], GRASP[2])
    a = _act(ex, _priv(eef, width=0.07, qvel=0.2))
    assert a[6] == 1 and a[0] < 0 and a[2] < 0.5


def test_regrasps_after_a_drop():
    ex = FunnelPickPlaceExpert()
    # closed on nothing at the grasp point (the fingers touch): open, rise toward the approach height
    a = _act(ex, _priv(GRASP, width=0.0))
    assert a[6] == -1 and a[2] > 0
    # closed, lifted, and the object stayed on the table: open, go back over it
    eef = (GRASP[0] + 0.01, GRASP[1] - 0.01, GRASP[2] + 0.08)
    a = _act(ex, _priv(eef, width=0.063))
    assert a[6] == -1 and a[0] < 0 and a[1] > 0 and a[2] >= 0
    # dropped on the way to the basket (closed on nothing, far away): open, head back to the object
    eef = (0.0, 0.0, 0.2)
    a = _act(ex, _priv(eef, obj=(-0.05, 0.02, 0.03), width=0.0))
    assert a[6] == -1 and a[0] < 0 and a[1] > 0
    # once open again: descend in the funnel toward the object and close there
    a = _act(ex, _priv((GRASP[0] + 0.03, GRASP[1], GRASP[2] + 0.1)))
    assert a[6] == -1 and a[0] < 0 and a[2] < 0
    assert _act(ex, _priv(GRASP))[6] == 1


def test_held_object_off_the_target_is_placed_through_a_funnel():
    ex, old = FunnelPickPlaceExpert(), ScriptedPickPlaceExpert()
    # the can held 3 cm off the basket, at the lowering height: move toward it, do not climb to carry height
    obj = (TGT[0] + 0.03, TGT[1] - 0.01, TGT[2] + 0.12)
    eef = (obj[0], obj[1], obj[2] + 0.022)
    a = _act(ex, _priv(eef, obj=obj, width=0.063))
    assert a[0] < 0 and a[1] > 0 and a[2] < 0.2 and a[6] == 1
    assert _act(old, _priv(eef, obj=obj, width=0.063))[2] > 0.5  # the old one climbs to the carry height
    # 2 cm off and low enough over the basket: open
    obj = (TGT[0] + 0.02, TGT[1], TGT[2] + 0.11)
    assert _act(ex, _priv((obj[0], obj[1], obj[2] + 0.022), obj=obj, width=0.063))[6] == -1


@pytest.mark.parametrize("yaw", [0.4, -0.4, 1.2, -0.1])
def test_orientation_error_is_corrected_with_the_right_sign(yaw):
    ex = FunnelPickPlaceExpert()
    far = _priv((0.0, 0.0, 0.25))
    # world-frame yaw error: the label rotates back about +z by -yaw, no roll or pitch
    cur = Rotation.from_rotvec([0.0, 0.0, yaw]) * DOWN
    a = _act(ex, far, cur.as_rotvec())
    assert math.copysign(1, float(a[5])) == -math.copysign(1, yaw) and a[3:5].abs().max() < 1e-4
    assert abs(float(a[5])) == pytest.approx(min(ex.p["rot_gain"] * abs(yaw), 1.0), abs=1e-4)
    # a mixed error (tilt and yaw): applying the world-frame label as a rotation shrinks the error
    cur = Rotation.from_rotvec([0.2, -0.15, yaw]) * DOWN
    a = _act(ex, far, cur.as_rotvec())
    after = Rotation.from_rotvec(0.5 * a[3:6].numpy()) * cur
    assert (DOWN * after.inv()).magnitude() < (DOWN * cur.inv()).magnitude()
    # at the reference orientation (axis-angle near pi, either sign): no rotation
    for rv in ([math.pi, 0.0, 0.0], [-math.pi + 1e-4, 0.0, 0.0]):
        assert _act(ex, far, rv)[3:6].abs().max() < 1e-3


def test_distribution_is_gaussian_around_the_labels_with_the_given_std():
    g = torch.Generator().manual_seed(0)
    priv = torch.rand(2, 3, 13, generator=g) * 0.3
    state = torch.cat([priv[..., :3], torch.randn(2, 3, 3, generator=g), priv[..., 3:5]], -1)
    ex = FunnelPickPlaceExpert(std=0.2, chunk_size=4)
    d = ex.dist({"observation.environment_state": priv, "observation.state": state}, torch.ones(2, 3))
    mean = ex.action(priv.view(6, 13), state[..., 3:6].reshape(6, 3)).view(2, 3, 1, 7).expand(2, 3, 4, 7)
    mean = mean.reshape(2, 3, 28)
    torch.testing.assert_close(d.mean_B_T_D, mean)
    torch.testing.assert_close(d.std_B_T_D, torch.full_like(mean, 0.2))
    a = torch.randn(2, 3, 28, generator=g)
    torch.testing.assert_close(d.log_prob(a), gaussian_log_prob(mean, torch.full_like(mean, 0.2), a))
    # without the proprioceptive state it still scores (no rotation), as the base expert
    d0 = ex.dist({"observation.environment_state": priv}, torch.ones(2, 3))
    assert d0.mean_B_T_D.view(2, 3, 4, 7)[..., 3:6].abs().max() == 0
    assert ex.config["kind"] == "funnel_pick_place" and ex.config["std"] == 0.2


def test_config_round_trips_through_json():
    import json

    ex = FunnelPickPlaceExpert(std=0.3, chunk_size=2, funnel_slope=2.0, rot_gain=0.5)
    conf = json.loads(json.dumps(ex.config))
    assert conf.pop("kind") == "funnel_pick_place"
    again = FunnelPickPlaceExpert(**conf)
    assert again.config == ex.config
    priv = torch.rand(5, 13)
    rv = torch.randn(5, 3)
    torch.testing.assert_close(again.action(priv, rv), ex.action(priv, rv))


def test_the_adapter_builds_saves_and_reloads_the_funnel_expert(tmp_path):
    from mmdistill.config import ModelConfig
    from mmdistill.modalities.robot.adapter import RobotPolicyAdapter
    from mmdistill.modalities.robot.config import TinyPolicyConfig
    from mmdistill.modalities.robot.policies import FunnelPickPlaceExpert
    from mmdistill.modalities.robot.task import LiberoTask

    adapter = RobotPolicyAdapter(None)
    adapter.bind(LiberoTask(suite="libero_object", tasks=[0], num_eval=2, num_train=2, render="none"))
    model = adapter.load_model(ModelConfig(tiny=TinyPolicyConfig(kind="funnel_pick_place", std=0.2, chunk_size=4)))
    assert isinstance(model, FunnelPickPlaceExpert)
    adapter.save(model, tmp_path / "expert")
    again = adapter.load_model(ModelConfig(path=str(tmp_path / "expert")))
    assert isinstance(again, FunnelPickPlaceExpert)
