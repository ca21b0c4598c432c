"""The recovering (funnel) pick-and-place teacher: from off-path states a student visits (off in
xy at several heights, a yaw error, the gripper closed on nothing after a drop, a held object off
the target) its labels point back toward the grasp; no simulator, privileged states built by hand.

    python -m pytest tests/test_robot_expert.py -q
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from mmdistill.modalities.robot.libero import PRIVILEGED, PRIVILEGED_DIM, collision_geoms, object_extent
from mmdistill.modalities.robot.policies import (
    FunnelPickPlaceExpert,
    ScriptedPickPlaceExpert,
    carry_lift,
    gaussian_log_prob,
    grasp_height,
)

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


# ---------------------------------------------------------------------------- the grasp per object


def _fake_sim(half_N_3, centre_N_3, geom_R_N_3_3, geom_pos_N_3, body_z, bodies=None, contype=None):
    """A MuJoCo model / data pair with only what `collision_geoms` and `object_extent` read."""
    n = len(half_N_3)
    bodies = [1] * n if bodies is None else bodies
    model = SimpleNamespace(
        ngeom=n,
        geom_bodyid=np.asarray(bodies),
        body_parentid=np.array([0, 0, 1, 0]),  # world, the object, its child, another object
        geom_contype=np.ones(n, dtype=int) if contype is None else np.asarray(contype),
        geom_conaffinity=np.zeros(n, dtype=int),
        geom_aabb=np.concatenate([np.asarray(centre_N_3, float), np.asarray(half_N_3, float)], -1),
    )
    data = SimpleNamespace(
        geom_xmat=np.asarray(geom_R_N_3_3, float).reshape(n, 9),
        geom_xpos=np.asarray(geom_pos_N_3, float),
        xpos=np.array([[0, 0, 0], [0.1, -0.1, body_z], [0, 0, 0], [0, 0, 0]], float),
    )
    return model, data


def test_collision_geoms_are_the_body_subtree_s_colliding_geoms():
    eye = np.eye(3)[None].repeat(5, 0)
    model, _ = _fake_sim(
        np.ones((5, 3)), np.zeros((5, 3)), eye, np.zeros((5, 3)), 0.0, bodies=[1, 2, 3, 1, 2], contype=[1, 1, 1, 0, 1]
    )
    # geom 3 is visual only (no contype / conaffinity), geom 2 belongs to another object
    assert collision_geoms(model, 1).tolist() == [0, 1, 4]


def test_object_extent_is_the_highest_and_lowest_box_corner_around_the_body():
    # a flat box (the cream cheese: 8.1 x 4.3 x 1.8 cm) centred on its body, upright
    half = [[0.0405, 0.0215, 0.0089]]
    model, data = _fake_sim(half, [[0, 0, 0]], np.eye(3)[None], [[0.1, -0.1, 0.0089]], 0.0089)
    top, bottom = object_extent(model, data, 1, np.array([0]))
    assert top == pytest.approx(0.0089, abs=1e-12) and bottom == pytest.approx(0.0089, abs=1e-12)
    # two geoms, one rotated 90 degrees about x and offset in its own frame: brute force over corners
    R = Rotation.from_rotvec([math.pi / 2, 0, 0]).as_matrix()
    halves, centres = [[0.01, 0.03, 0.02], [0.02, 0.02, 0.05]], [[0, 0, 0.01], [0, 0.0, 0.0]]
    rots, pos = [np.eye(3), R], [[0.1, -0.1, 0.50], [0.1, -0.08, 0.52]]
    model, data = _fake_sim(halves, centres, rots, pos, 0.49)
    zs = [
        (np.asarray(rot) @ (np.asarray(c) + np.asarray(s) * np.asarray(h)))[2] + p[2]
        for h, c, rot, p in zip(halves, centres, rots, pos)
        for s in [(a, b, d) for a in (-1, 1) for b in (-1, 1) for d in (-1, 1)]
    ]
    top, bottom = object_extent(model, data, 1, np.array([0, 1]))
    assert top == pytest.approx(max(zs) - 0.49) and bottom == pytest.approx(0.49 - min(zs))
    assert top == pytest.approx(0.52 + 0.02 - 0.49)  # rotated: its 5 cm half size lies along y, 2 cm along z
    assert bottom == pytest.approx(0.49 - (0.50 + 0.01 - 0.02))


def _priv_geo(eef, obj, top, bottom, width=0.08, qvel=0.0, tgt=TGT):
    return torch.cat([_priv(eef, obj, tgt, width, qvel), torch.tensor([top, bottom])])


CREAM = (0.046, -0.103, 0.0089)  # LIBERO-Object task 1: the cream cheese box's position, 0.89 cm above the table


def test_a_flat_box_is_grasped_below_the_fixed_grasp_height_as_its_geometry_says():
    ex = FunnelPickPlaceExpert()
    top = bottom = 0.0089
    dz = grasp_height(_priv_geo(CREAM, CREAM, top, bottom).view(1, -1), 0.02, 0.01, 0.025, 0.10)
    assert float(dz) == pytest.approx(top - ex.p["top_depth"])  # 1 cm below the box's top, under the old 2 cm
    assert float(dz) < ex.p["grasp_dz"]
    # at the old grasp point (2 cm above the box's position): the 13-D expert closes there, in the air
    # above the 1.8 cm box; with the geometry the label keeps descending, open
    old_grasp = (CREAM[0], CREAM[1], CREAM[2] + 0.02)
    assert _act(ex, _priv(old_grasp, CREAM))[6] == 1
    a = _act(ex, _priv_geo(old_grasp, CREAM, top, bottom))
    assert a[6] == -1 and a[2] < 0 and float(a[2]) == pytest.approx(ex.p["gain"] * (float(dz) - 0.02))
    # at the new grasp point: close
    new_grasp = (CREAM[0], CREAM[1], CREAM[2] + float(dz))
    assert _act(ex, _priv_geo(new_grasp, CREAM, top, bottom))[6] == 1


def test_a_tall_bottle_is_grasped_high_and_carried_higher():
    ex = FunnelPickPlaceExpert()
    bottle, top, bottom = (0.05, -0.1, 0.073), 0.073, 0.073  # the salad dressing: 14.6 cm tall
    dz = float(grasp_height(_priv_geo(bottle, bottle, top, bottom).view(1, -1), 0.02, 0.01, 0.025, 0.10))
    assert dz == pytest.approx(top - ex.p["hand_room"]) and dz > ex.p["grasp_dz"]
    lift = float(carry_lift(_priv_geo(bottle, bottle, top, bottom).view(1, -1), ex.p["tall"]))
    assert lift == pytest.approx(top + bottom - ex.p["tall"])
    # held 1 cm beside the basket, 3 cm above where a can is lowered to (the bottle's bottom 4.3 cm
    # under the can's there): the 13-D label lowers it, the label with the geometry raises it to
    # the can's bottom height (`lift` higher)
    obj = (TGT[0] + 0.01, TGT[1], TGT[2] + ex.p["drop"] + 0.03)
    eef = (obj[0], obj[1], obj[2] + dz)
    a_old = _act(ex, _priv(eef, obj, width=0.05))
    a_new = _act(ex, _priv_geo(eef, obj, top, bottom, width=0.05))
    assert float(a_old[2]) == pytest.approx(-ex.p["gain"] * 0.03, abs=1e-5)
    assert float(a_new[2]) == pytest.approx(ex.p["gain"] * (lift - 0.03), abs=1e-5) and a_new[2] > 0
    # a can 3 cm above its lowering height is held; the bottle there is lower than its release height
    # (its bottom lower than a released can's): open
    assert a_old[6] == 1 and a_new[6] == -1


def test_the_task0_can_keeps_exactly_the_13d_actions_at_any_tilt():
    """The alphabet soup can (7.6 cm tall, 6.3 cm wide): upright, tilted or lying, its extent never
    changes a label, so the expert LIBERO-Object task-0 students learn from is unchanged."""
    g = torch.Generator().manual_seed(0)
    ex = FunnelPickPlaceExpert()
    half_h, radius = 0.038, 0.0315
    for tilt in torch.linspace(0, math.pi / 2, 7).tolist():  # the can's own bounding-box extent at a tilt
        top = bottom = half_h * math.cos(tilt) + radius * math.sin(tilt)
        priv13 = torch.rand(64, 13, generator=g) * 0.3 - 0.15
        priv13[:16, :3] = priv13[:16, 7:10] + torch.tensor([0.0, 0.0, 0.02])  # some at the grasp point
        priv15 = torch.cat([priv13, torch.full((64, 1), top), torch.full((64, 1), bottom)], -1)
        rv = torch.randn(64, 3, generator=g)
        assert torch.equal(ex.action(priv15, rv), ex.action(priv13, rv)), f"tilt {tilt:.2f}"
    # NaN entries (an environment with no known geometry) read as absent
    nan = torch.cat([priv13, torch.full((64, 2), math.nan)], -1)
    assert torch.equal(ex.action(nan, rv), ex.action(priv13, rv))


def test_the_privileged_vector_only_grew_at_its_end():
    """Students read entries by index (7..12: the object and the basket): the geometry is appended."""
    sizes = dict(eef_pos=3, gripper_qpos=2, gripper_qvel=2, object_pos=3, target_pos=3, object_top=1, object_bottom=1)
    assert PRIVILEGED[:5] == ("eef_pos", "gripper_qpos", "gripper_qvel", "object_pos", "target_pos")
    assert PRIVILEGED[5:] == ("object_top", "object_bottom")
    assert PRIVILEGED_DIM == sum(sizes[k] for k in PRIVILEGED) == 15
