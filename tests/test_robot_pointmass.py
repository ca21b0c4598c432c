"""Robot modality groundwork: the point-mass environment, the scripted expert, Gaussian
divergences, and the full warm-up + on-policy distillation loop.

    python -m pytest tests/test_robot_pointmass.py -q -o addopts=""
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml

from mmdistill.config import config_from_raw
from mmdistill.modalities.robot.policies import GaussianMLPPolicy, ScriptedReachExpert, gaussian_log_prob
from mmdistill.modalities.robot.task import ReachTask
from mmdistill.objectives.opd import opd_loss
from mmdistill.pipeline import run_pipeline
from mmdistill.stepdist import Gaussian

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def test_scripted_expert_log_prob_matches_brute_force():
    obs = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    expert = ScriptedReachExpert(gain=10.0, std=0.2)
    d = expert.dist(obs, torch.ones(3, 5))
    a = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(1))
    mean = (10.0 * (obs[..., 2:] - obs[..., :2])).clamp(-1, 1)
    torch.testing.assert_close(d.log_prob(a), gaussian_log_prob(mean, torch.full_like(mean, 0.2), a))
    torch.testing.assert_close(d.log_prob(a), torch.distributions.Normal(mean, 0.2).log_prob(a).sum(-1))


def test_gaussian_reverse_and_forward_kl_match_monte_carlo():
    g = torch.Generator().manual_seed(0)
    s = Gaussian(torch.randn(1, 1, 2, generator=g), torch.rand(1, 1, 2, generator=g) + 0.5, torch.ones(1, 1))
    t = Gaussian(torch.randn(1, 1, 2, generator=g), torch.rand(1, 1, 2, generator=g) + 0.5, torch.ones(1, 1))
    n = 200_000
    xs = s.mean_B_T_D + s.std_B_T_D * torch.randn(n, 1, 2, generator=g)
    rkl_mc = (s.log_prob(xs) - t.log_prob(xs)).mean()
    xt = t.mean_B_T_D + t.std_B_T_D * torch.randn(n, 1, 2, generator=g)
    fkl_mc = (t.log_prob(xt) - s.log_prob(xt)).mean()
    assert float(s.divergence(t, beta=1.0)) == pytest.approx(float(rkl_mc), rel=0.03, abs=0.01)
    assert float(s.divergence(t, beta=0.0)) == pytest.approx(float(fkl_mc), rel=0.03, abs=0.01)
    with pytest.raises(ValueError, match="closed form"):
        s.divergence(t, beta=0.5)


def test_reverse_kl_reward_is_zero_when_student_equals_teacher():
    policy = GaussianMLPPolicy(4, 2)
    obs = torch.randn(2, 6, 4)
    mask = torch.ones(2, 6)
    d = policy.dist(obs, mask)
    a = d.mean_B_T_D.detach() + d.std_B_T_D.detach() * torch.randn(2, 6, 2)
    logp = d.log_prob(a)
    loss, m = opd_loss(logp, logp.detach(), logp.detach(), mask)  # teacher log-probs == student's
    assert float(d.divergence(policy.dist(obs, mask), beta=1.0).abs().max()) == 0.0
    assert m["reverse_kl"] == 0.0 and float(loss.detach()) == 0.0


def test_evaluation_initial_states_are_never_trained_on():
    task = ReachTask(num_states=60, num_eval=10)
    drawn = {task.sample_train(random.Random(i)) for i in range(2000)}
    assert drawn and not drawn & set(task.problems("test"))
    assert set(task.problems("test")) == set(range(10))


def test_pointmass_warmup_then_on_policy_distillation_learns(tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "vla" / "pointmass_opd.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "run")
    raw["stages"] = [s for s in raw["stages"] if s["name"] in ("warmup", "rkl_opd", "evaluate")]
    raw["stages"][1]["train"]["steps"] = 60
    raw["stages"][-1]["evaluate"] = {"teacher": "teacher", "warmup": "warmup", "rkl_opd": "rkl_opd"}
    report = run_pipeline(config_from_raw(raw), quiet=True)
    assert report["teacher"]["success_rate"] >= 0.9
    assert report["rkl_opd"]["success_rate"] >= report["warmup"]["success_rate"] + 0.3
    assert (tmp_path / "run" / "rkl_opd" / "final" / "model.safetensors").exists()
    assert (tmp_path / "run" / "evaluate" / "teacher.gif").stat().st_size > 1000  # episode video
    # the stage's own final evaluation is reused (same settings, same task), its video copied
    assert Path(report["rkl_opd"]["video"]) == tmp_path / "run" / "evaluate" / "rkl_opd.gif"
    assert (
        Path(report["rkl_opd"]["video"]).read_bytes()
        == (tmp_path / "run" / "rkl_opd" / "samples" / "final.gif").read_bytes()
    )


# ----------------------------------------------------------------------------- the environment pool


class _CrashOnce:
    """A picklable factory whose environment kills its process on the 3rd step of the episode from
    initial state 0, the first time only (a flag file remembers it)."""

    def __init__(self, flag_path: str):
        self.flag_path = flag_path

    def __call__(self):
        import os

        from mmdistill.modalities.robot.envs import PointMassEnv

        flag = self.flag_path

        class Env(PointMassEnv):
            def reset(self, init_state):
                self.init_state = init_state
                return super().reset(init_state)

            def step(self, action):
                if self.init_state == 0 and self.t == 2 and not os.path.exists(flag):
                    open(flag, "w").close()
                    os._exit(1)  # a simulator segfault, as the parent sees it
                return super().step(action)

        return Env()


def test_pool_matches_a_single_environment_for_the_same_initial_states():
    import numpy as np

    from mmdistill.modalities.robot.envs import PointMassEnv
    from mmdistill.modalities.robot.vec import EnvPool

    task = ReachTask()
    actions = np.random.default_rng(0).uniform(-1, 1, (5, 3, 2)).astype(np.float32)
    with EnvPool(task.make_env, num_workers=3) as pool:
        obs = pool.reset([0, 7, 9])
        stepped = [pool.step(actions[t]) for t in range(5)]
    for i, s in enumerate([0, 7, 9]):
        env = task.make_env()
        np.testing.assert_array_equal(env.reset(s), obs[i])
        for t in range(5):
            o, r, done, info = env.step(actions[t, i])
            np.testing.assert_array_equal(o, stepped[t][i][0])
            assert (r, done, info["success"]) == stepped[t][i][1:]
    assert isinstance(PointMassEnv(), PointMassEnv)


def test_a_killed_worker_is_replaced(tmp_path):
    import numpy as np

    from mmdistill.modalities.robot.vec import EnvPool, WorkerCrashed

    with EnvPool(_CrashOnce(str(tmp_path / "crashed")), num_workers=2) as pool:
        pool.reset([0, 1])
        a = np.zeros((2, 2), np.float32)
        pool.step(a)
        pool.step(a)
        with pytest.raises(WorkerCrashed) as err:
            pool.step(a)
        assert err.value.slots == [0] and pool.restarts == 1
        obs = pool.reset([0, 1])  # the replacements run the episodes again
        assert obs.shape == (2, 4)
        for _ in range(4):
            pool.step(a)


def test_episodes_in_worker_processes_equal_in_process_episodes():
    from mmdistill.config import ModelConfig
    from mmdistill.modalities.robot.adapter import RobotPolicyAdapter
    from mmdistill.modalities.robot.config import TinyPolicyConfig

    rollouts = []
    for workers in (0, 3):
        adapter = RobotPolicyAdapter()
        adapter.bind(ReachTask(num_workers=workers))
        policy = adapter.load_model(ModelConfig(tiny=TinyPolicyConfig(seed=3)), "p")
        rollouts.append(adapter.run_episodes(policy, [0, 5, 9, 11, 13], torch.Generator().manual_seed(0)))
        if adapter._pool is not None:
            adapter._pool.close()
    a, b = rollouts
    for field in ("actions", "mask_B_T", "behavior_logp_B_T", "rewards_B"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field))
    torch.testing.assert_close(a.steps["obs"]["observation.state"], b.steps["obs"]["observation.state"])


def test_a_policy_for_another_action_size_is_refused_before_training(tmp_path, capsys):
    import json

    from mmdistill.cli import main

    bad = tmp_path / "bad_teacher"
    bad.mkdir()
    (bad / "config.json").write_text(
        json.dumps({"kind": "gaussian_mlp", "obs_dim": 4, "action_dim": 7, "hidden": 8, "layers": 1})
    )
    raw = yaml.safe_load((REPO / "configs" / "vla" / "pointmass_opd.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "run")
    raw["models"]["teacher"] = {"path": str(bad)}
    raw["stages"] = [
        {
            "name": "opd",
            "student": "student_init",
            "teacher": "teacher",
            "objective": {"type": "reverse_kl"},
            "train": {"steps": 1},
        }
    ]
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert "action 7" in err and "must agree" in err and len(err.splitlines()) == 1
    (bad / "config.json").write_text(json.dumps({"kind": "transformer"}))
    assert main(["train", str(p), "--overwrite"]) == 2
    assert "unknown policy kind" in capsys.readouterr().err


class _BimodalTeacher:
    """A 1-D mixture 0.6 N(-1, 0.2^2) + 0.4 N(1, 0.2^2): log_prob for every step, its mode (-1)."""

    def __init__(self, mask_B_T):
        self.mask_B_T = mask_B_T

    def log_prob(self, a_B_T_D):
        comps = (
            torch.distributions.Normal(torch.tensor([-1.0, 1.0]), 0.2).log_prob(a_B_T_D[..., :1])
            + torch.tensor([0.6, 0.4]).log()
        )
        return torch.logsumexp(comps, -1) * self.mask_B_T

    def mode(self):
        return torch.full((*self.mask_B_T.shape, 1), -1.0)

    def sample(self, n, g):
        pick = (torch.rand(n, generator=g) < 0.4).float() * 2 - 1
        return (pick + 0.2 * torch.randn(n, generator=g)).view(n, 1, 1)


def test_on_a_bimodal_teacher_entropy_orders_fkl_above_rkl_above_hard_ce():
    """docs/objectives.md section 4: forward KL covers both modes, reverse KL seeks one, hard CE to
    the teacher's mode collapses -- with the registered objectives and a Gaussian student."""
    from mmdistill.interfaces import ObjectiveBatch, Rollout
    from mmdistill.objectives.hard_ce import HardCE
    from mmdistill.objectives.opd import OPD
    from mmdistill.objectives.sft import SFT

    entropies = {}
    for name, objective in (("fkl", SFT(source="teacher")), ("rkl", OPD(coef=1.0, gamma=0.0)), ("hard_ce", HardCE())):
        g = torch.Generator().manual_seed(0)
        mean, log_std = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([mean, log_std], lr=0.03)
        n = 256
        mask = torch.ones(n, 1)
        for _ in range(400):
            student = Gaussian(mean.expand(n, 1, 1), log_std.exp().expand(n, 1, 1), mask)
            teacher = _BimodalTeacher(mask)
            if name == "fkl":  # behaviour cloning on teacher samples = forward KL up to a constant
                actions = teacher.sample(n, g)
            else:  # the student's own samples
                actions = (mean + log_std.exp() * torch.randn(n, 1, 1, generator=g)).detach()
            rollout = Rollout(
                context=None,
                steps=None,
                actions=actions,
                mask_B_T=mask,
                behavior_logp_B_T=student.log_prob(actions).detach(),
            )
            loss, _ = objective(ObjectiveBatch(rollout, student, teacher, None, float(n)))
            opt.zero_grad()
            loss.backward()
            opt.step()
        entropies[name] = float(Gaussian(mean.view(1, 1, 1), log_std.exp().view(1, 1, 1), torch.ones(1, 1)).entropy())
    assert entropies["fkl"] > entropies["rkl"] > entropies["hard_ce"], entropies
    assert entropies["fkl"] > 1.0 and entropies["hard_ce"] < 0.0  # std ~1 (both modes) vs collapsing


# ----------------------------------------------------------------------------- the adapter contract


def test_robot_config_sections_check_their_ranges_bare_key_first():
    from mmdistill.modalities.robot.config import RobotEvalConfig, RobotRolloutConfig

    with pytest.raises(ValueError, match=r"^n: 0 is below the smallest allowed value 1$"):
        RobotEvalConfig(n=0)
    with pytest.raises(ValueError, match=r"^grid: -1 is below the smallest allowed value 0$"):
        RobotEvalConfig(grid=-1)
    with pytest.raises(ValueError, match=r"^split: 'val' is not a split"):
        RobotEvalConfig(split="val")
    with pytest.raises(ValueError, match=r"^group_size: 0 is below the smallest allowed value 1$"):
        RobotRolloutConfig(group_size=0)
    with pytest.raises(ValueError, match=r"^noise_level: -0.1 is below the smallest allowed value 0.0$"):
        RobotRolloutConfig(noise_level=-0.1)
    with pytest.raises(ValueError, match=r"^temperature: 0.5 is not supported by robot policies"):
        RobotRolloutConfig(temperature=0.5)


def test_the_robot_adapter_implements_the_adapter_protocol(tmp_path):
    import json

    from mmdistill.config import ModelConfig
    from mmdistill.errors import ConfigError
    from mmdistill.interfaces import Adapter, RolloutRequest
    from mmdistill.modalities.robot.adapter import RobotPolicyAdapter
    from mmdistill.modalities.robot.config import RobotRolloutConfig, TinyPolicyConfig

    adapter = RobotPolicyAdapter()
    assert isinstance(adapter, Adapter) and adapter.spec.default_task == "reach" and adapter.spec.can_record
    task = ReachTask()
    adapter.bind(task)
    policy = adapter.load_model(ModelConfig(tiny=TinyPolicyConfig(seed=3)), "p")
    adapter.save(policy, tmp_path / "p")
    assert RobotPolicyAdapter.claims_checkpoint(tmp_path / "p")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "type": "x"}))
    assert not RobotPolicyAdapter.claims_checkpoint(tmp_path / "hf") and not RobotPolicyAdapter.claims_checkpoint(
        tmp_path
    )
    assert (
        RobotPolicyAdapter.load_tokenizer(tmp_path / "p") is None
        and RobotPolicyAdapter.build_tokenizer(None, task, {}) is None
    )

    # the rollout reads its settings from the request and equals the episodes it stands for
    settings = RobotRolloutConfig()
    r = adapter.rollout(
        RolloutRequest(source="student", settings=settings),
        policy,
        None,
        task,
        [0, 5],
        torch.Generator().manual_seed(0),
    )
    ref = adapter.run_episodes(policy, [0, 5], torch.Generator().manual_seed(0))
    torch.testing.assert_close(r.actions, ref.actions)
    with pytest.raises(ConfigError, match="no dataset actions"):
        adapter.rollout(RolloutRequest(source="dataset", settings=settings), policy, None, task, [0], torch.Generator())
    with pytest.raises(ConfigError, match="mixture_beta=0.5"):
        adapter.rollout(RolloutRequest(mixture_beta=0.5, settings=settings), policy, None, task, [0], torch.Generator())
    with pytest.raises(ConfigError, match="prune"):
        adapter.prune_layers(policy, [0], name="student")
    with pytest.raises(ConfigError, match="LoRA"):
        adapter.add_lora(policy, None)

    before = adapter.stage_fingerprint(policy)
    assert before == adapter.stage_fingerprint(adapter.load_model(ModelConfig(path=str(tmp_path / "p")), "q"))
    with torch.no_grad():
        policy.log_std.add_(1.0)
    assert adapter.stage_fingerprint(policy) != before


def test_evaluation_without_n_uses_every_state_of_the_split(tmp_path):
    from mmdistill.modalities.robot.adapter import RobotPolicyAdapter
    from mmdistill.modalities.robot.config import RobotEvalConfig

    cfg = RobotEvalConfig(grid=0)
    assert cfg.n is None
    task = ReachTask(num_states=60, num_eval=7, max_steps=3)
    adapter = RobotPolicyAdapter()
    adapter.bind(task)
    torch.manual_seed(0)
    out = adapter.evaluate(GaussianMLPPolicy(4, 2), task, cfg, seed=0, out_dir=tmp_path, tag="t", show=0)
    assert out["n"] == 7  # every evaluation state once, not 200 refused or wrapped around
    with pytest.raises(Exception, match="eval.n: 8 episodes"):
        adapter.evaluate(GaussianMLPPolicy(4, 2), task, RobotEvalConfig(n=8, grid=0), out_dir=tmp_path, tag="u")
