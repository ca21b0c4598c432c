"""LeRobot 0.3.2 policies and datasets, offline on CPU with tiny random-init models: ACT as a Gaussian
policy, SmolVLA's flow under the SDE sampler, Diffusion Policy as an actor, LeRobot's own
save_pretrained / from_pretrained format, compatibility checks, recorded datasets read back.

    python -m pytest tests/test_robot_lerobot.py -q -o addopts=""
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lerobot")

from mmdistill.errors import CheckpointError, CompatibilityError  # noqa: E402
from mmdistill.modalities.robot.lerobot import (  # noqa: E402
    WRAPPER_WEIGHTS,
    ACTGaussianPolicy,
    DiffusionPolicyWrapper,
    SmolVLAFlowPolicy,
    flatten_time,
    load_lerobot_policy,
    save_lerobot_policy,
    set_normalization_stats,
    tiny_act,
    tiny_diffusion,
    tiny_smolvla,
    write_tiny_smolvlm,
)
from mmdistill.modalities.robot.policies import gaussian_log_prob  # noqa: E402
from mmdistill.modalities.robot.record import record_lerobot_dataset  # noqa: E402

torch.set_num_threads(1)
S, A, K, IMG = 8, 7, 4, (3, 32, 32)
IMAGE, STATE = "observation.images.image", "observation.state"


def _stats(seed: int = 0, kind: str = "mean_std") -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "mean_std":
        return {
            STATE: {"mean": torch.randn(S, generator=g), "std": torch.rand(S, generator=g) + 0.5},
            "action": {"mean": torch.randn(A, generator=g), "std": torch.rand(A, generator=g) + 0.5},
        }
    return {
        STATE: {"min": -torch.ones(S), "max": torch.ones(S)},
        "action": {"min": -2 * torch.ones(A), "max": torch.ones(A)},
    }


def _obs(*lead: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B = lead[0]
    return {
        STATE: torch.randn(*lead, S, generator=g),
        IMAGE: torch.randint(0, 256, (*lead, *IMG), generator=g, dtype=torch.uint8),
        "task": ["put the bowl on the plate", "open the drawer"][:B] + ["pick up the ketchup"] * max(0, B - 2),
    }


def _lerobot_batch(obs: dict) -> dict:
    """What LeRobot's own predict_action_chunk reads: float images in [0, 1]."""
    return {STATE: obs[STATE], IMAGE: obs[IMAGE].float() / 255, "task": obs["task"]}


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return write_tiny_smolvlm(tmp_path_factory.mktemp("smolvlm") / "vlm")


@pytest.fixture(scope="module")
def act_policy():
    return tiny_act(S, A, K, _stats())


def test_act_gaussian_log_prob_matches_brute_force(act_policy):
    policy = ACTGaussianPolicy(act_policy, init_log_std=-0.7)
    with torch.no_grad():
        policy.log_std.copy_(torch.linspace(-1.0, 0.3, K * A))
    B, T = 2, 3
    obs, mask = _obs(B, T), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    d = policy.dist(obs, mask)
    assert d.mean_B_T_D.shape == (B, T, K * A)

    # the mean is LeRobot's own chunk (its normalise / unnormalise path), the first K actions
    ref_mean = act_policy.predict_action_chunk(_lerobot_batch(flatten_time(obs, B, T)))[:, :K].reshape(B, T, K * A)
    torch.testing.assert_close(d.mean_B_T_D.detach(), ref_mean)
    actions = torch.randn(B, T, K * A, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    ref_lp = gaussian_log_prob(ref_mean, policy.log_std.detach().exp().expand_as(ref_mean), actions) * mask
    torch.testing.assert_close(d.log_prob(actions).detach(), ref_lp)

    # gradient reaches ACT's head and log_std; train mode keeps the dist deterministic (ACT stays in eval)
    d.log_prob(actions).sum().backward()
    assert act_policy.model.action_head.weight.grad.abs().sum() > 0 and policy.log_std.grad.abs().sum() > 0
    act_policy.zero_grad()
    policy.train()
    assert not act_policy.training
    torch.testing.assert_close(policy.dist(obs, mask).mean_B_T_D, policy.dist(obs, mask).mean_B_T_D)


@pytest.mark.parametrize("kind", ["act", "diffusion", "smolvla"])
def test_save_then_lerobot_from_pretrained_round_trip(kind, tmp_path, vlm_dir):
    from lerobot.policies.factory import get_policy_class

    obs = _obs(2)
    if kind == "act":
        wrapper = ACTGaussianPolicy(tiny_act(S, A, K, _stats()))
        with torch.no_grad():
            wrapper.log_std.copy_(torch.linspace(-2.0, 0.5, K * A))
    elif kind == "diffusion":
        wrapper = DiffusionPolicyWrapper(tiny_diffusion(S, A, K, _stats(kind="min_max")))
    else:
        wrapper = SmolVLAFlowPolicy(tiny_smolvla(S, A, K, _stats(), vlm_dir))
    out = save_lerobot_policy(wrapper, tmp_path / kind)

    def outputs(inner):  # LeRobot's own inference path, same noise for both models
        if kind == "diffusion":
            return DiffusionPolicyWrapper(inner).act(obs, torch.Generator().manual_seed(0))
        kwargs = (
            {"noise": torch.randn(2, K, 32, generator=torch.Generator().manual_seed(0))} if kind == "smolvla" else {}
        )
        inner.reset()
        return inner.predict_action_chunk(_lerobot_batch(obs), **kwargs)

    reloaded = get_policy_class(kind).from_pretrained(out)  # plain LeRobot, no mmdistill involved
    torch.testing.assert_close(outputs(reloaded), outputs(wrapper.lerobot), rtol=0, atol=0)
    torch.testing.assert_close(reloaded.state_dict(), wrapper.lerobot.state_dict(), rtol=0, atol=0)

    loaded = load_lerobot_policy(out, expect_action_dim=A, expect_chunk=K)
    assert type(loaded) is type(wrapper) and loaded.config == wrapper.config
    torch.testing.assert_close(dict(loaded.named_parameters()), dict(wrapper.named_parameters()), rtol=0, atol=0)
    if kind == "act":
        assert (out / WRAPPER_WEIGHTS).is_file()
        mask = torch.ones(2, 1)
        obs_t = {k: (v.unsqueeze(1) if isinstance(v, torch.Tensor) else v) for k, v in obs.items()}
        torch.testing.assert_close(
            loaded.dist(obs_t, mask).mean_B_T_D, wrapper.dist(obs_t, mask).mean_B_T_D, rtol=0, atol=0
        )


def test_compatibility_checks_refuse_with_one_line(act_policy, tmp_path):
    from lerobot.policies.act.modeling_act import ACTPolicy

    out = save_lerobot_policy(ACTGaussianPolicy(act_policy), tmp_path / "act")
    with pytest.raises(CompatibilityError, match=r"outputs 7-D actions, the environment takes 6-D"):
        load_lerobot_policy(out, expect_action_dim=6, expect_chunk=K)
    with pytest.raises(CompatibilityError, match=r"chunk 5 requested, the act policy predicts 4"):
        load_lerobot_policy(out, expect_action_dim=A, expect_chunk=K + 1)
    with pytest.raises(CompatibilityError, match=r"log_std has shape \(28,\), this wrapper needs \(14,\)"):
        load_lerobot_policy(out, expect_action_dim=A, expect_chunk=2)  # a shorter chunk than log_std was trained for
    with pytest.raises(CheckpointError, match="no LeRobot config.json"):
        load_lerobot_policy(tmp_path / "nothing", expect_action_dim=A, expect_chunk=K)

    # the config checks come before any weight is read
    (out / "model.safetensors").rename(tmp_path / "weights.safetensors")
    with pytest.raises(CompatibilityError, match="6-D"):
        load_lerobot_policy(out, expect_action_dim=6, expect_chunk=K)
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_lerobot_policy(out, expect_action_dim=A, expect_chunk=K)

    # a checkpoint saved without dataset statistics (LeRobot's inf placeholders)
    bare = ACTPolicy(act_policy.config)
    bare.save_pretrained(tmp_path / "no_stats")
    with pytest.raises(
        CompatibilityError, match=r"normalisation statistic normalize_inputs\.buffer_observation_state\.mean is missing"
    ):
        load_lerobot_policy(tmp_path / "no_stats", expect_action_dim=A, expect_chunk=K)
    with pytest.raises(CompatibilityError, match="normalisation statistic"):
        ACTGaussianPolicy(bare)
    with pytest.raises(ValueError, match=r"stats\['action'\] needs \('mean', 'std'\)"):
        set_normalization_stats(bare, {STATE: _stats()[STATE], "action": {"min": torch.zeros(A), "max": torch.ones(A)}})

    lines = []
    for call in (lambda: load_lerobot_policy(out, 6, K), lambda: ACTGaussianPolicy(bare)):
        with pytest.raises(CompatibilityError) as info:
            call()
        lines.append(str(info.value))
    assert all("\n" not in line for line in lines)


def test_smolvla_sde_at_noise_zero_is_smolvla_sampler_and_self_kl_is_zero(vlm_dir):
    smolvla = tiny_smolvla(S, A, K, _stats(), vlm_dir, num_steps=5)
    policy = SmolVLAFlowPolicy(smolvla)
    obs = _obs(3)
    noise = torch.randn(3, K, 32, generator=torch.Generator().manual_seed(4))

    actions, chain = policy.sample_chunk(obs, noise=noise, noise_level=0.0)
    smolvla.reset()
    own = smolvla.predict_action_chunk(_lerobot_batch(obs), noise=noise.clone())  # SmolVLA's Euler loop
    assert actions.shape == (3, K * A) and chain.actions.shape == (3, 5, K * 32)
    assert (actions - own.flatten(1)).abs().max() < 1e-5
    assert torch.equal(chain.steps.sigma_B_T[0, :2], torch.tensor([1.0, 0.8]))  # SmolVLA's time is our sigma

    actions, chain = policy.sample_chunk(obs, generator=torch.Generator().manual_seed(5), noise_level=0.7)
    d1, d2 = policy.step_dist(obs, chain), policy.step_dist(None, chain)  # None: the chain's own observations
    torch.testing.assert_close(d1.gaussian.kl(d2.gaussian), torch.zeros(3, 5), rtol=0, atol=0)
    torch.testing.assert_close(d1.log_prob(chain.actions), chain.behavior_logp_B_T, rtol=1e-5, atol=1e-3)
    assert d1.kl_weight_B_T.shape == (3, 5) and bool((d1.dt_B_T < 0).all())

    with torch.enable_grad():
        policy.step_dist(obs, chain).velocity_B_T_D.square().sum().backward()
    assert smolvla.model.action_out_proj.weight.grad.abs().sum() > 0

    other = SmolVLAFlowPolicy(tiny_smolvla(S, A, K, _stats(seed=1), vlm_dir, num_steps=5))
    with pytest.raises(CompatibilityError, match="other action statistics"):
        other.step_dist(obs, chain)
    with pytest.raises(NotImplementedError, match="sample_chunk"):
        policy.dist(_obs(3, 1), torch.ones(3, 1))


def test_diffusion_acts_trains_by_bc_and_refuses_dist():
    policy = DiffusionPolicyWrapper(tiny_diffusion(S, A, K, _stats(kind="min_max")))
    obs = _obs(2)
    chunk = policy.act(obs, torch.Generator().manual_seed(0))
    assert chunk.shape == (2, K * A) and torch.isfinite(chunk).all()
    torch.testing.assert_close(chunk, policy.act(obs, torch.Generator().manual_seed(0)), rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="no per-step action density"):
        policy.dist(_obs(2, 1), torch.ones(2, 1))

    n, h = policy.lerobot.config.n_obs_steps, policy.lerobot.config.horizon
    batch = {**_obs(2, n), "action": torch.randn(2, h, A), "action_is_pad": torch.zeros(2, h, dtype=torch.bool)}
    policy.train()
    loss, metrics = policy.bc_loss(batch)
    loss.backward()
    assert metrics["loss"] > 0 and policy.lerobot.diffusion.unet.final_conv[-1].weight.grad.abs().sum() > 0


def test_recorded_dataset_reads_back(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    g = torch.Generator().manual_seed(0)
    tasks = ["put the bowl on the plate", "open the drawer", "put the bowl on the plate"]
    episodes = [
        {
            "state": torch.randn(T, S, generator=g),
            "action": torch.randn(T, A, generator=g),
            "task": task,
            "image": torch.randint(0, 256, (T, 3, 16, 16), generator=g, dtype=torch.uint8).numpy(),
            "env_state": torch.randn(T, 5, generator=g),
        }
        for T, task in zip((5, 3, 4), tasks)
    ]
    root = record_lerobot_dataset(tmp_path / "ds", "local/libero_tiny", fps=10, episodes=episodes, robot_type="panda")
    ds = LeRobotDataset("local/libero_tiny", root=root)
    assert ds.num_episodes == 3 and len(ds) == 12 and ds.fps == 10
    frames = [ds[i] for i in range(len(ds))]
    for ep_index, ep in enumerate(episodes):
        start = int(ds.episode_data_index["from"][ep_index])
        for t in range(len(ep["action"])):
            f = frames[start + t]
            assert int(f["episode_index"]) == ep_index and int(f["frame_index"]) == t and f["task"] == ep["task"]
            torch.testing.assert_close(f["action"], ep["action"][t], rtol=0, atol=0)
            torch.testing.assert_close(f[STATE], ep["state"][t], rtol=0, atol=0)
            torch.testing.assert_close(f["observation.environment_state"], ep["env_state"][t], rtol=0, atol=0)
            assert torch.equal(
                (f[IMAGE] * 255).round().to(torch.uint8), torch.from_numpy(ep["image"][t])
            )  # PNG is lossless

    # the dataset's statistics are what the builders take
    assert json.loads((root / "meta" / "info.json").read_text())["features"][IMAGE]["dtype"] == "image"
    policy = tiny_act(S, A, K, ds.meta.stats, image_shape=(3, 16, 16))
    torch.testing.assert_close(
        policy.normalize_inputs.buffer_observation_state["mean"], torch.as_tensor(ds.meta.stats[STATE]["mean"]).float()
    )

    # state-only episodes; refusals name the cause
    root2 = record_lerobot_dataset(
        tmp_path / "ds2",
        "local/no_images",
        fps=20,
        episodes=[{"state": torch.zeros(2, S), "action": torch.ones(2, A), "task": "reach"}],
    )
    assert LeRobotDataset("local/no_images", root=root2).num_episodes == 1
    with pytest.raises(FileExistsError, match="fresh directory"):
        record_lerobot_dataset(root2, "local/no_images", fps=20, episodes=episodes)
    with pytest.raises(ValueError, match=r"episodes\[1\] has per-frame shapes"):
        record_lerobot_dataset(tmp_path / "ds3", "x/y", fps=10, episodes=[episodes[0], {**episodes[1], "image": None}])
    with pytest.raises(ValueError, match="same non-zero length"):
        record_lerobot_dataset(tmp_path / "ds4", "x/y", fps=10, episodes=[{**episodes[0], "action": torch.zeros(4, A)}])


def test_statistics_carried_in_processor_files_are_loaded(act_policy, tmp_path):
    """LeRobot >= 0.4 checkpoints keep dataset statistics in processor files beside the weights
    (`FEATURE.STAT` keys), not in the policy's buffers: they are read and the actions un-normalised."""
    from lerobot.policies.act.modeling_act import ACTPolicy
    from safetensors.torch import save_file

    from mmdistill.modalities.robot.lerobot.common import processor_stats

    out = tmp_path / "new_format"
    ACTPolicy(act_policy.config).save_pretrained(out)  # buffers at LeRobot's inf placeholders
    stats = _stats(seed=3)
    save_file(
        {f"{STATE}.{k}": v.contiguous() for k, v in stats[STATE].items()},
        str(out / "policy_preprocessor_step_3_normalizer_processor.safetensors"),
    )
    save_file(
        {f"action.{k}": v.contiguous() for k, v in stats["action"].items()},
        str(out / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"),
    )
    assert set(processor_stats(out)) == {STATE, "action"} and processor_stats(tmp_path) == {}
    loaded = load_lerobot_policy(out, expect_action_dim=A, expect_chunk=K)
    buffers = loaded.lerobot.unnormalize_outputs.buffer_action
    torch.testing.assert_close(buffers["mean"].flatten(), stats["action"]["mean"])
    torch.testing.assert_close(buffers["std"].flatten(), stats["action"]["std"])
    state = loaded.lerobot.normalize_inputs.buffer_observation_state
    torch.testing.assert_close(state["mean"].flatten(), stats[STATE]["mean"])
    (out / "policy_preprocessor_step_3_normalizer_processor.safetensors").unlink()
    with pytest.raises(ValueError, match=r"stats\['observation.state'\] needs \('mean', 'std'\)"):
        load_lerobot_policy(out, expect_action_dim=A, expect_chunk=K)  # half the statistics: refused, not guessed
