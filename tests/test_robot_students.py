"""Robot students that fit the robot: the arm + gripper head as ONE decision per chunk, its std bounds, the
experts' matching step distribution, OPD's per-state baseline by hand, and closed-form reverse KL on the
student's own states improving a student end to end (a fake gripper-reach environment, no simulator).

    OMP_NUM_THREADS=1 python -m pytest tests/test_robot_students.py -q
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, Normal

from mmdistill.interfaces import ObjectiveBatch, RolloutRequest
from mmdistill.modalities.robot.adapter import RobotPolicyAdapter
from mmdistill.modalities.robot.config import RobotEvalConfig, TinyPolicyConfig
from mmdistill.modalities.robot.envs import point_mass_initial_states
from mmdistill.modalities.robot.policies import (
    FunnelPickPlaceExpert,
    GaussianMLPPolicy,
    StateFeatures,
    VisionGaussianPolicy,
)
from mmdistill.objectives.opd import OPD
from mmdistill.objectives.reverse_kl import ReverseKL
from mmdistill.stepdist import Gaussian, GaussianBernoulli

LIBERO_SHIFT = [-0.06, 0.0, 0.15, 0.0, 0.0, 0.0, 0.032, -0.032]
LIBERO_SCALE = [0.05, 0.15, 0.06, 1.0, 1.0, 1.0, 0.005, 0.005]


def _libero_states(B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, 8, generator=g) * 0.05
    s[..., 3] += math.pi  # a gripper pointing down: axis-angle near (pi, 0, 0)
    return s


# ----------------------------------------------------------------------------- one decision per chunk


def test_the_chunk_is_one_decision_of_seven_numbers_repeated():
    K, B, T = 4, 3, 5
    policy = GaussianMLPPolicy(8, 7, hidden=16, chunk_size=K, head="gaussian_bernoulli", std_mode="state")
    assert policy.gb_head.out.out_features == 7  # 6 arm means + 1 gripper logit, not 28 free numbers
    assert policy.gb_head.std_out.out_features == 6
    mask = torch.ones(B, T)
    d = policy.dist(_libero_states(B, T), mask)
    assert isinstance(d, GaussianBernoulli) and d.repeat == K
    for a in (d.mode(), d.sample(torch.Generator().manual_seed(1)), d.from_noise(torch.randn(B, T, K * 7))):
        assert a.shape == (B, T, K * 7)
        copies = a.unflatten(-1, (K, 7))
        assert torch.equal(copies, copies[..., :1, :].expand_as(copies))  # K identical actions
    # the log-prob of a repeated chunk is the log-density of its one decision (brute force: torch.distributions)
    a = d.sample(torch.Generator().manual_seed(2))
    one = a[..., :7]
    ref = Independent(Normal(d.mean_B_T_D, d.std_B_T_D), 1).log_prob(one[..., :6]) + Bernoulli(
        logits=d.gripper_logit_B_T
    ).log_prob((one[..., 6] > 0).float())
    torch.testing.assert_close(d.log_prob(a), ref)
    # a chunk of independent draws is read as its average (arm) and the side of its mean gripper value
    noisy = a + 0.01 * torch.randn(a.shape, generator=torch.Generator().manual_seed(3))
    avg = noisy.unflatten(-1, (K, 7)).mean(-2)
    single = GaussianBernoulli(d.mean_B_T_D, d.std_B_T_D, d.gripper_logit_B_T, mask)
    torch.testing.assert_close(d.log_prob(noisy), single.log_prob(avg))
    with pytest.raises(ValueError, match="repeat \\* \\(D \\+ 1\\)"):
        d.log_prob(a[..., :7])
    # KLs are per decision: repeating does not multiply them
    other = GaussianBernoulli(d.mean_B_T_D + 0.3, d.std_B_T_D * 1.5, -d.gripper_logit_B_T, mask, repeat=K)
    torch.testing.assert_close(
        d.kl(other), single.kl(GaussianBernoulli(other.mean_B_T_D, other.std_B_T_D, other.gripper_logit_B_T, mask))
    )
    with pytest.raises(ValueError, match="chunk_size"):
        d.kl(GaussianBernoulli(d.mean_B_T_D, d.std_B_T_D, d.gripper_logit_B_T, mask, repeat=2))


def test_from_noise_draws_the_product_distribution():
    n = 200_000
    mean = torch.tensor([[[0.3, -0.5]]]).expand(n, 1, 2)
    std = torch.tensor([[[0.2, 0.7]]]).expand(n, 1, 2)
    logit = torch.full((n, 1), 0.8)
    d = GaussianBernoulli(mean, std, logit, torch.ones(n, 1), repeat=2)
    a = d.from_noise(torch.randn(n, 1, 5, generator=torch.Generator().manual_seed(0)))
    arm, closed = a[:, 0, :2], a[:, 0, 2] > 0
    se_mean = 0.7 / math.sqrt(n)
    assert (arm.mean(0) - torch.tensor([0.3, -0.5])).abs().max() < 4 * se_mean
    assert (arm.std(0) - torch.tensor([0.2, 0.7])).abs().max() < 4 * 0.7 / math.sqrt(2 * n)
    p = torch.sigmoid(torch.tensor(0.8))
    assert abs(float(closed.float().mean()) - float(p)) < 4 * math.sqrt(float(p * (1 - p)) / n)


# ----------------------------------------------------------------------------- std bounds


@pytest.mark.parametrize("std_mode", ["param", "state"])
def test_std_starts_at_its_initial_value_and_stays_inside_its_bounds(std_mode):
    lo, hi, init = -3.0, 0.2, -1.2
    policy = GaussianMLPPolicy(
        8,
        7,
        hidden=16,
        chunk_size=2,
        head="gaussian_bernoulli",
        std_mode=std_mode,
        init_log_std=init,
        log_std_min=lo,
        log_std_max=hi,
    )
    obs = _libero_states(4, 6)
    d = policy.dist(obs, torch.ones(4, 6))
    torch.testing.assert_close(d.std_B_T_D, torch.full_like(d.std_B_T_D, math.exp(init)))  # sane, state-free start
    with torch.no_grad():
        for p in policy.gb_head.parameters():
            p.copy_(torch.randn(p.shape) * 200)  # wild weights
    d = policy.dist(obs, torch.ones(4, 6))
    log_std = d.std_B_T_D.log()
    assert float(log_std.min()) >= lo - 1e-5 and float(log_std.max()) <= hi + 1e-5
    with torch.no_grad():
        for p in policy.gb_head.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    spread = float(policy.dist(obs, torch.ones(4, 6)).std_B_T_D.log().std(dim=(0, 1)).max())
    if std_mode == "state":  # a state-dependent std varies with the state; a parameter does not
        assert spread > 0.01
    else:
        assert spread == 0.0
    # the squashed std has a gradient everywhere inside the bounds (no dead clamp at the start)
    fresh = GaussianMLPPolicy(8, 7, hidden=16, head="gaussian_bernoulli", std_mode=std_mode, init_log_std=init)
    fresh.dist(obs, torch.ones(4, 6)).entropy().sum().backward()
    grads = [p.grad for n, p in fresh.gb_head.named_parameters() if "std" in n]
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    with pytest.raises(ValueError, match="strictly inside"):
        GaussianMLPPolicy(8, 7, head="gaussian_bernoulli", init_log_std=1.0, log_std_max=0.5)
    with pytest.raises(ValueError, match="std_mode: state needs head"):
        GaussianMLPPolicy(8, 7, std_mode="state")


def test_state_features_normalise_and_feed_the_axis_angle_as_a_continuous_rotation():
    f = StateFeatures(8, LIBERO_SHIFT, LIBERO_SCALE, axis_angle=3)
    assert f.dim == 14
    n = torch.tensor([0.6, 0.8, 0.0])
    s1, s2 = torch.zeros(8), torch.zeros(8)
    s1[3:6], s2[3:6] = (math.pi - 1e-3) * n, -(math.pi - 1e-3) * n  # the same rotation, opposite axis-angles
    s1[0] = s2[0] = 0.04
    x1, x2 = f(s1), f(s2)
    assert float((s1[3:6] - s2[3:6]).norm()) > 6.0  # the raw input jumps by 2 pi - 2e-3
    assert float((x1 - x2).abs().max()) < 1e-2  # the features do not
    assert x1[0] == pytest.approx((0.04 - LIBERO_SHIFT[0]) / LIBERO_SCALE[0])
    R = x1[3:12].view(3, 3)
    torch.testing.assert_close(R @ R.T, torch.eye(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="obs_scale"):
        StateFeatures(8, None, [1.0] * 7)
    # a low-dimensional state student: chosen entries of the privileged vector appended (object, basket)
    low = StateFeatures(8, None, [1.0] * 8 + [0.1] * 6, axis_angle=3, env_entries=[7, 8, 9, 10, 11, 12])
    env = torch.arange(13.0)
    x = low({"observation.state": s1, "observation.environment_state": env})
    assert low.dim == 20 and x.shape == (20,)
    torch.testing.assert_close(x[-6:], env[7:13] / 0.1)
    with pytest.raises(ValueError, match="environment_state"):
        low({"observation.state": s1})


def test_the_vision_student_has_the_same_head():
    policy = VisionGaussianPolicy(
        8, 7, chunk_size=4, channels=8, hidden=16, head="gaussian_bernoulli", std_mode="state"
    )
    obs = {
        "observation.images.image": torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8),
        "observation.state": _libero_states(2, 3),
    }
    d = policy.dist(obs, torch.ones(2, 3))
    assert isinstance(d, GaussianBernoulli) and d.repeat == 4 and d.mean_B_T_D.shape == (2, 3, 6)
    assert d.mode().shape == (2, 3, 28)
    legacy = VisionGaussianPolicy(8, 7, chunk_size=4, channels=8, hidden=16)
    assert isinstance(legacy.dist(obs, torch.ones(2, 3)), Gaussian)


# ----------------------------------------------------------------------------- experts


def _privileged(N: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    priv = torch.zeros(N, 13)
    priv[:, 0:3] = torch.tensor([0.0, 0.0, 0.2]) + 0.05 * torch.randn(N, 3, generator=g)
    priv[:, 3:5] = torch.tensor([0.04, -0.04])
    priv[:, 7:10] = torch.tensor([-0.12, -0.24, 0.04])
    priv[:, 10:13] = torch.tensor([0.0, 0.26, -0.005])
    return priv


def test_experts_expose_a_gaussian_arm_and_a_sharp_gripper_bernoulli_from_their_label():
    K, N = 4, 6
    gauss = FunnelPickPlaceExpert(std=0.15, chunk_size=K)
    gb = FunnelPickPlaceExpert(std=0.15, chunk_size=K, head="gaussian_bernoulli", gripper_logit=7.0)
    obs = {"observation.environment_state": _privileged(N).view(N, 1, 13), "observation.state": _libero_states(N, 1)}
    mask = torch.ones(N, 1)
    dg, db = gauss.dist(obs, mask), gb.dist(obs, mask)
    label = dg.mean_B_T_D[..., :7]  # the label of the Gaussian head (repeated K times there)
    assert isinstance(db, GaussianBernoulli) and db.repeat == K
    torch.testing.assert_close(db.mean_B_T_D, label[..., :6])
    torch.testing.assert_close(db.std_B_T_D, torch.full_like(db.std_B_T_D, 0.15))
    torch.testing.assert_close(db.gripper_logit_B_T, torch.where(label[..., 6] > 0, 7.0, -7.0))
    torch.testing.assert_close(db.mode(), dg.mean_B_T_D)  # the same action executed
    # a student with the same head: closed-form KLs against the expert are defined and finite
    student = GaussianMLPPolicy(8, 7, hidden=16, chunk_size=K, head="gaussian_bernoulli")
    ds = student.dist(obs, mask)
    assert torch.isfinite(ds.divergence(db, 1.0)).all() and torch.isfinite(ds.divergence(db, 0.0)).all()
    assert gb.config["head"] == "gaussian_bernoulli" and "head" not in gauss.config
    assert FunnelPickPlaceExpert(**{k: v for k, v in gb.config.items() if k != "kind"}).config == gb.config


# ----------------------------------------------------------------------------- OPD's per-state baseline


def test_opd_per_state_baseline_by_hand():
    """Student N(0, 1), teacher N(1, 1), actions 0.5 and -1 at two states (first pass: rho = 1).
    log pi_S(a) - log pi_T(a) = (1 - 2a) / 2: 0 and 1.5; the closed-form KL(S || T) = 0.5 at both states.
    Per-state baseline: advantages -(0 - 0.5) = 0.5 and -(1.5 - 0.5) = -1.0; loss -(0.5 - 1.0) / 2 = 0.25;
    d loss / d mu = -(1/2) sum_t A_t (a_t - mu) = -(0.5 * 0.5 + (-1.0) * (-1.0)) / 2 = -0.625.
    No baseline: advantages 0 and -1.5; loss 0.75; d loss / d mu = -(0 + 1.5) / 2 = -0.75."""
    actions = torch.tensor([[[0.5], [-1.0]]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    teacher = Gaussian(torch.ones(1, 2, 1, dtype=torch.float64), torch.ones(1, 2, 1, dtype=torch.float64), mask)
    for baseline, want_loss, want_grad, want_adv in (
        ("per_state", 0.25, -0.625, (0.5, -1.0)),
        ("none", 0.75, -0.75, (0.0, -1.5)),
    ):
        mu = torch.zeros((), dtype=torch.float64, requires_grad=True)
        student = Gaussian(mu.expand(1, 2, 1), torch.ones(1, 2, 1, dtype=torch.float64), mask)
        from mmdistill.interfaces import Rollout

        behavior = student.log_prob(actions).detach()
        r = Rollout(context=[0], steps={}, actions=actions, mask_B_T=mask, behavior_logp_B_T=behavior)
        loss, metrics = OPD(baseline=baseline)(ObjectiveBatch(r, student, teacher, normalizer=2.0))
        loss.backward()
        assert float(loss) == pytest.approx(want_loss, abs=1e-12)
        assert float(mu.grad) == pytest.approx(want_grad, abs=1e-12)
        assert metrics["advantage_mean"] == pytest.approx(sum(want_adv) / 2, abs=1e-12)
        assert metrics["advantage_std"] == pytest.approx(abs(want_adv[0] - want_adv[1]) / 2, abs=1e-12)
        if baseline == "per_state":
            assert metrics["baseline_mean"] == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="gamma 0"):
        OPD(gamma=0.9, baseline="per_state")
    with pytest.raises(ValueError, match="baseline"):
        OPD(baseline="group")


# ----------------------------------------------------------------------------- end to end: a fake gripper reach


class GripperReachEnv:
    """A point mass that must reach its goal disc and close its gripper there: observation `[x, y, gx, gy]`,
    action `[vx, vy, gripper]` (closed when > 0), success when within `radius` with the gripper closed."""

    obs_dim, action_dim = 4, 3

    def __init__(self, states, max_steps: int = 24, radius: float = 0.12):
        self.states, self.max_steps, self.radius = states, max_steps, radius

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.pos, self.goal]).astype(np.float32)

    def reset(self, i: int) -> np.ndarray:
        self.pos, self.goal, self.t = self.states.starts_N_2[i].copy(), self.states.goals_N_2[i].copy(), 0
        return self._obs()

    def step(self, chunk: np.ndarray):
        success = False
        for a in np.asarray(chunk, np.float32).reshape(-1, 3):
            self.pos = np.clip(self.pos + 0.1 * np.clip(a[:2], -1, 1), -1.5, 1.5)
            self.t += 1
            success = bool(np.linalg.norm(self.pos - self.goal) < self.radius and a[2] > 0)
            if success or self.t >= self.max_steps:
                break
        done = success or self.t >= self.max_steps
        return self._obs(), float(success), done, {"success": success}


class GripperReachTask:
    obs_dim, action_dim, max_steps, num_workers = 4, 3, 24, 0

    def __init__(self):
        self.states = point_mass_initial_states(240, 40, seed=7)

    def make_env(self) -> GripperReachEnv:
        return GripperReachEnv(self.states, self.max_steps)

    def sample_train(self, rng: random.Random) -> int:
        return rng.choice(self.states.train_ids)

    def problems(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[int]:
        pool = self.states.eval_ids if split in ("test", "official") else self.states.train_ids
        return pool[: n or len(pool)]


class GripperReachExpert(nn.Module):
    """Proportional controller toward the goal, the gripper closing inside the disc: GaussianBernoulli."""

    chunk_size = 2

    def dist(self, obs, mask_B_T):
        s = obs["observation.state"] if isinstance(obs, dict) else obs
        pos, goal = s[..., :2], s[..., 2:4]
        mean = (10 * (goal - pos)).clamp(-1, 1)
        logit = torch.where((goal - pos).norm(dim=-1) < 0.1, 6.0, -6.0)
        return GaussianBernoulli(mean, torch.full_like(mean, 0.1), logit, mask_B_T, repeat=self.chunk_size)


@pytest.fixture
def one_thread():
    """Tiny per-decision forwards: a second thread only adds contention on a shared 2-core box (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_closed_form_reverse_kl_on_the_students_own_states_improves_a_student(one_thread):
    torch.manual_seed(0)
    task = GripperReachTask()
    adapter = RobotPolicyAdapter()
    adapter.bind(task)
    teacher = GripperReachExpert()
    student = GaussianMLPPolicy(
        4, 3, hidden=64, chunk_size=2, head="gaussian_bernoulli", std_mode="state", init_log_std=-1.0
    )
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    objective = ReverseKL()
    eval_states = task.problems("test")

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            r = adapter.run_episodes(student, eval_states, None, sample=False)
            ref = adapter.run_episodes(teacher, eval_states, torch.Generator().manual_seed(9), sample=True)
            kl = adapter.step_dist(student, ref).kl(adapter.step_dist(teacher, ref))
        return float(r.rewards_B.mean()), float((kl * ref.mask_B_T).sum() / ref.mask_B_T.sum())

    success0, kl0 = measure()
    rng = random.Random(0)
    for step in range(75):
        problems = [task.sample_train(rng) for _ in range(12)]
        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            r = adapter.rollout(RolloutRequest(source="student"), student, teacher, task, problems, gen)
        for _ in range(8):
            batch = ObjectiveBatch(
                r, adapter.step_dist(student, r), adapter.step_dist(teacher, r), normalizer=float(r.num_steps())
            )
            loss, _ = objective(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    success1, kl1 = measure()
    assert success0 < 0.2  # a random student rarely closes the gripper at the goal
    assert success1 >= success0 + 0.6, (success0, success1)  # measured 0.0 -> 1.0
    assert kl1 < 0.05 * kl0, (kl0, kl1)  # measured 85 -> 1.1 nats per decision
    metrics = adapter.dist_metrics(adapter.step_dist(student, r), r)
    assert {"entropy", "std_d0", "std_d1", "p_close"} <= set(metrics)


def test_evaluation_reports_sampled_success_entropy_per_dim_and_kl_to_a_teacher(tmp_path):
    """`eval.sampled` and `eval.kl_teacher` on the point mass (a Gaussian head: no gripper, so no per-dim dict)."""
    from mmdistill.modalities.robot.task import ReachTask

    task = ReachTask(num_states=60, num_eval=10, max_steps=12)
    adapter = RobotPolicyAdapter()
    adapter.bind(task)
    student = adapter.tiny_policy(TinyPolicyConfig(kind="gaussian_mlp", hidden=16, seed=3))
    cfg = RobotEvalConfig(
        n=10, grid=0, sampled=True, kl_teacher={"kind": "scripted_reach", "std": 0.2}, kl_split="train", kl_episodes=4
    )
    ev = adapter.evaluate(student, task, cfg, seed=0)
    assert 0.0 <= ev["sampled_success_rate"] <= 1.0 and ev["success_ci95_low"] <= ev["success_rate"]
    teacher = adapter.tiny_policy(TinyPolicyConfig(kind="scripted_reach", std=0.2))
    visited = adapter.run_episodes(teacher, task.problems("train", 4), torch.Generator().manual_seed(0), sample=True)
    ref = adapter.step_dist(student, visited).kl(adapter.step_dist(teacher, visited))
    assert ev["kl_to_teacher_reverse"] == pytest.approx(float(ref.sum() / visited.mask_B_T.sum()), rel=1e-5)
    assert adapter.evaluate(teacher, task, cfg, seed=0)["kl_to_teacher_reverse"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown keys"):
        RobotEvalConfig(kl_teacher={"kind": "scripted_reach", "bogus": 1})


def test_env_deltas_append_relative_positions_and_survive_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    deltas = [[0, 7], [1, 8], [2, 9], [7, 10]]
    f = StateFeatures(8, None, [1.0] * 8 + [0.5] * 2 + [0.02] * 4, env_entries=[7, 8], env_deltas=deltas)
    env = torch.randn(3, 13, generator=torch.Generator().manual_seed(0))
    x = f({"observation.state": torch.zeros(3, 8), "observation.environment_state": env})
    assert f.dim == 14 and x.shape == (3, 14)
    torch.testing.assert_close(x[:, 8:10], env[:, 7:9] / 0.5)
    want = torch.stack([env[:, i] - env[:, j] for i, j in deltas], -1) / 0.02
    torch.testing.assert_close(x[:, 10:], want)
    with pytest.raises(ValueError, match="env_deltas"):
        StateFeatures(8, env_deltas=[[0, 7, 1]])
    with pytest.raises(ValueError, match="obs_scale"):  # one scale per appended entry
        StateFeatures(8, None, [1.0] * 10, env_entries=[7, 8], env_deltas=deltas)
    # a student reading them saves its features in config.json and loads back to the same distribution
    ad = RobotPolicyAdapter()
    ad.task = type("T", (), {"obs_dim": 8, "action_dim": 7})()
    tiny = TinyPolicyConfig(
        kind="gaussian_mlp", chunk_size=4, head="gaussian_bernoulli", env_entries=[7, 8], env_deltas=deltas, seed=3
    )
    policy = ad.tiny_policy(tiny)
    assert policy.config["env_deltas"] == deltas
    import json

    (tmp_path / "config.json").write_text(json.dumps(policy.config))
    save_file(policy.state_dict(), str(tmp_path / "model.safetensors"))
    conf = {k: v for k, v in json.loads((tmp_path / "config.json").read_text()).items() if k != "kind"}
    again = GaussianMLPPolicy(**conf)
    from safetensors.torch import load_file

    again.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    obs = {"observation.state": _libero_states(2, 3), "observation.environment_state": torch.randn(2, 3, 13)}
    torch.testing.assert_close(
        again.dist(obs, torch.ones(2, 3)).mean_B_T_D, policy.dist(obs, torch.ones(2, 3)).mean_B_T_D
    )
