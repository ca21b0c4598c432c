"""A flow-matching action head (LeRobot SmolVLA) on the robot loop: each decision's chunk is the end
of an SDE denoising chain, and objectives see the chain's per-step Gaussians (the same math as
the flow modality), scored by a flow-head teacher.

    python -m pytest tests/test_robot_flow_head.py -q -o addopts=""
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("lerobot")

from robot_camera_env import CameraTask  # noqa: E402

from mmdistill.modalities.robot.adapter import RobotPolicyAdapter  # noqa: E402
from mmdistill.modalities.robot.lerobot import SmolVLAFlowPolicy, tiny_smolvla, write_tiny_smolvlm  # noqa: E402
from mmdistill.objectives.opd import opd_loss  # noqa: E402

torch.set_num_threads(1)
STATS = {
    "observation.state": {"mean": np.zeros(8), "std": np.ones(8)},
    "action": {"mean": np.zeros(7), "std": np.ones(7)},
}


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    vlm = write_tiny_smolvlm(tmp_path_factory.mktemp("vlm"), image_size=32)

    def make(seed):
        return SmolVLAFlowPolicy(
            tiny_smolvla(8, 7, 2, STATS, vlm, image_shape=(3, 32, 32), num_steps=3, seed=seed), chunk_size=2
        )

    return make(0), make(1)


def test_flow_head_rollout_is_scored_per_denoising_step(policies):
    student, teacher = policies
    adapter = RobotPolicyAdapter()
    adapter.bind(CameraTask())
    r = adapter.run_episodes(student, [0, 1], torch.Generator().manual_seed(0))
    T, S, D = 3, 3, 2 * 32  # decisions (6 steps / chunk 2), denoising steps, flow state (chunk x max_action_dim)
    assert r.actions.shape == (2, T * S, D) and r.mask_B_T.shape == (2, T * S)
    assert r.steps["decision_actions"].shape == (2, T, 14)
    s_dist = adapter.step_dist(student, r)
    # re-scoring the chains reproduces the behaviour log-probs
    torch.testing.assert_close(s_dist.log_prob(r.actions), r.behavior_logp_B_T, rtol=1e-4, atol=1e-3)
    # the teacher scores the student's own chains; against itself the reward is exactly zero
    logp = s_dist.log_prob(r.actions)
    _, m = opd_loss(logp, r.behavior_logp_B_T, logp.detach(), r.mask_B_T)
    assert m["reverse_kl"] == 0.0
    assert float(s_dist.divergence(adapter.step_dist(student, r), beta=1.0).abs().max()) == 0.0
    t_dist = adapter.step_dist(teacher, r)
    kl = s_dist.divergence(t_dist, beta=1.0)
    assert torch.isfinite(kl).all() and float(kl.sum()) > 0
    # a closed-form step KL equals the Gaussian KL of the two step distributions
    torch.testing.assert_close(kl, s_dist.gaussian.divergence(t_dist.gaussian, beta=1.0), rtol=1e-4, atol=1e-4)


def test_flow_head_student_refuses_a_gaussian_teacher(policies):
    from mmdistill.errors import CompatibilityError
    from mmdistill.modalities.robot.policies import ScriptedPickPlaceExpert

    student, _ = policies
    adapter = RobotPolicyAdapter()
    adapter.bind(CameraTask())
    r = adapter.run_episodes(student, [0], torch.Generator().manual_seed(0))
    with pytest.raises(CompatibilityError, match="flow-head teacher"):
        adapter.step_dist(ScriptedPickPlaceExpert(chunk_size=2), r)


def test_flow_head_evaluation_is_deterministic(policies):
    from mmdistill.modalities.robot.config import RobotEvalConfig

    student, _ = policies
    adapter = RobotPolicyAdapter()
    task = CameraTask()
    adapter.bind(task)
    a = adapter.run_episodes(student, [0, 1], None, sample=False)
    b = adapter.run_episodes(student, [0, 1], None, sample=False)
    torch.testing.assert_close(a.steps["decision_actions"], b.steps["decision_actions"])
    ev = adapter.evaluate(student, task, RobotEvalConfig(n=2, grid=0))
    assert ev["success_rate"] == 0.0 and ev["n"] == 2


def test_flow_head_episodes_in_chunks_equal_one_batch(policies):
    from mmdistill.modalities.robot.adapter import _concat

    student, _ = policies
    adapter = RobotPolicyAdapter()
    adapter.bind(CameraTask())
    sampled = torch.zeros(2, 3, 14)  # not None: sample the chains with noise (flow heads ignore the values)
    whole = adapter._episodes(student, [0, 1], sampled, None, chain_seed=0)
    parts = [adapter._episodes(student, [p], sampled[:1], None, chain_seed=0) for p in (0, 1)]
    joined = _concat(parts)
    assert joined.actions.shape == whole.actions.shape
    assert joined.steps["chains"]["0"].steps.x_t_B_T_D.shape == whole.steps["chains"]["0"].steps.x_t_B_T_D.shape
    assert joined.steps["obs"]["task"] == whole.steps["obs"]["task"]
    # re-scoring the joined chains still reproduces their behaviour log-probs
    torch.testing.assert_close(
        adapter.step_dist(student, joined).log_prob(joined.actions), joined.behavior_logp_B_T, rtol=1e-4, atol=1e-3
    )
