"""The OpenVLA-style tokenised-action policy: action bins as LM tokens, sampled and re-scored by
the text adapter, scored by a Gaussian teacher through its bin masses.

    python -m pytest tests/test_robot_tokenized.py -q -o addopts=""
"""

from __future__ import annotations

import math

import pytest
import torch
from robot_camera_env import CameraTask

from mmdistill.config import ModelConfig
from mmdistill.modalities.robot.adapter import RobotPolicyAdapter
from mmdistill.modalities.robot.config import TinyPolicyConfig
from mmdistill.modalities.robot.policies import GaussianMLPPolicy
from mmdistill.modalities.robot.tokenized import BinnedGaussian, bin_centers, bin_index
from mmdistill.objectives.opd import opd_loss

torch.set_num_threads(1)


def test_binned_gaussian_is_the_gaussian_mass_of_each_bin():
    n, first = 8, 100
    mean, std = torch.tensor([[0.1, -0.7]]), torch.tensor([[0.3, 0.2]])
    d = BinnedGaussian(mean, std, torch.ones(1, 2), first, n, eps=0.0)
    total = torch.zeros(1, 2)
    for k in range(n):
        lp = d.log_prob(torch.full((1, 2), first + k))
        lo, hi = -1 + 2 * k / n, -1 + 2 * (k + 1) / n
        lo = -math.inf if k == 0 else lo
        hi = math.inf if k == n - 1 else hi
        ref = [
            0.5 * (math.erf((hi - m) / (s * math.sqrt(2))) - math.erf((lo - m) / (s * math.sqrt(2))))
            for m, s in zip(mean[0].tolist(), std[0].tolist())
        ]
        torch.testing.assert_close(lp.exp()[0], torch.tensor(ref), atol=1e-6, rtol=1e-5)
        total += lp.exp()
    torch.testing.assert_close(total, torch.ones(1, 2))  # the end bins take the tails
    assert d.mode().tolist() == [
        [first + int(bin_index(torch.tensor(0.1), n)), first + int(bin_index(torch.tensor(-0.7), n))]
    ]
    assert float(
        BinnedGaussian(mean, std, torch.ones(1, 2), first, n).log_prob(torch.tensor([[3, 5]])).max()
    ) == pytest.approx(math.log(1e-6))
    assert torch.allclose(bin_centers(4), torch.tensor([-0.75, -0.25, 0.25, 0.75]))


def _setup():
    adapter = RobotPolicyAdapter()
    task = CameraTask()
    adapter.bind(task)
    student = adapter.load_model(
        ModelConfig(tiny=TinyPolicyConfig(kind="tokenized_lm", chunk_size=2, hidden=32, layers=1, bins=16)), "s"
    )
    teacher = GaussianMLPPolicy(8, 7, chunk_size=2, init_log_std=-1.0)
    return adapter, task, student, teacher


def test_tokenized_rollout_is_rescored_by_the_text_adapter_and_scored_by_a_gaussian_teacher():
    adapter, task, student, teacher = _setup()
    r = adapter.run_episodes(student, [0, 1], torch.Generator().manual_seed(0))
    assert r.actions.shape == (2, 3 * 14) and r.steps["decision_actions"].shape == (2, 3, 14)
    s_dist = adapter.step_dist(student, r)
    torch.testing.assert_close(s_dist.log_prob(r.actions), r.behavior_logp_B_T, rtol=1e-4, atol=1e-4)
    t_dist = adapter.step_dist(teacher, r)
    assert isinstance(t_dist, BinnedGaussian)
    # the teacher's bins follow the decision each token belongs to
    mean_B_T_D = teacher.dist(r.steps["obs"], torch.ones(2, 3)).mean_B_T_D
    torch.testing.assert_close(t_dist.mean_B_T, mean_B_T_D.reshape(2, -1))
    logp = s_dist.log_prob(r.actions)
    loss, m = opd_loss(logp, r.behavior_logp_B_T, t_dist.log_prob(r.actions), r.mask_B_T, clip_eps=0.2)
    loss.backward()
    assert math.isfinite(m["reverse_kl"]) and unwrap_grad(student) > 0
    # decoded actions are the bin centres of the sampled tokens
    torch.testing.assert_close(r.steps["decision_actions"].reshape(2, -1), student.decode(r.actions))


def unwrap_grad(policy) -> float:
    return float(sum(p.grad.abs().sum() for p in policy.lm.parameters() if p.grad is not None))


def test_tokenized_student_learns_the_teachers_bins_by_dagger():
    adapter, task, student, teacher = _setup()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)

    def teacher_logp() -> float:
        r = adapter.run_episodes(student, [0, 1], None, sample=False)
        return float(adapter.step_dist(teacher, r).log_prob(r.actions).sum() / r.mask_B_T.sum())

    before = teacher_logp()
    for step in range(30):
        r = adapter.run_episodes(student, [0, 1], torch.Generator().manual_seed(step))
        target = adapter.step_dist(teacher, r).mode()
        nll = -(adapter.step_dist(student, r).log_prob(target) * r.mask_B_T).sum() / r.mask_B_T.sum()
        opt.zero_grad()
        nll.backward()
        opt.step()
    assert teacher_logp() > before + 2.0  # greedy actions moved into the teacher's likely bins


def test_tokenized_policy_saves_and_loads(tmp_path):
    adapter, task, student, _ = _setup()
    adapter.save(student, tmp_path)
    other = RobotPolicyAdapter()
    other.bind(task)
    loaded = other.load_model(ModelConfig(path=str(tmp_path)), "s")
    a = adapter.run_episodes(student, [0], None, sample=False)
    b = other.run_episodes(loaded, [0], None, sample=False)
    assert torch.equal(a.actions, b.actions)
