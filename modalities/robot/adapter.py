"""The `robot_policy` adapter: students act in the environment, teachers score the visited states.

A rollout runs one episode per row (vectorised over rows; finished episodes are masked).  Each
decision the policy sees an observation dict (LeRobot key names, `[B, T, ...]` in
`steps["obs"]`) and emits a chunk of K actions, flattened to `actions [B, T, K * A]`; the
environment executes the chunk and renders only at the next decision.  `mask_B_T` marks the
decisions taken, `rewards_B` is success.  Re-scoring (`step_dist`) gives each policy's step
distribution on those observations: the student's with gradient, the teacher's without (teacher
actions are never executed in a student rollout):

- Gaussian heads (MLP, vision, ACT, scripted experts): one `Gaussian` per decision;
- chained policies (`sample_chunk` / `step_dist`): a SmolVLA flow head's chunk ends an SDE
  denoising chain (`VelocityStepDist` per denoising step), a tokenised LM's chunk is K x A action
  tokens (`HiddenCategorical` per token, or a Gaussian teacher's `BinnedGaussian`); then the
  rollout's steps are `[B, T * S]` and `steps["decision_actions"]` holds the executed chunks.

Evaluation runs the policy's mean (greedy, noise-free) action from every evaluation initial
state and reports the success rate (per task too), the entropy per decision and a GIF.

    mmdistill train configs/vla/libero_object_opd.yaml
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mmdistill.config import ModelConfig, TokenizerConfig
from mmdistill.errors import CheckpointError, CompatibilityError, ConfigError
from mmdistill.modalities.robot.policies import (
    GaussianMLPPolicy,
    ScriptedPickPlaceExpert,
    ScriptedReachExpert,
    VisionGaussianPolicy,
)
from mmdistill.registry import ADAPTERS
from mmdistill.rollout import Rollout
from mmdistill.stepdist import Gaussian, HiddenCategorical, VelocityStepDist

POLICIES = {"gaussian_mlp": GaussianMLPPolicy, "scripted_reach": ScriptedReachExpert,
            "vision_gaussian": VisionGaussianPolicy, "scripted_pick_place": ScriptedPickPlaceExpert}


@dataclass
class TinyPolicyConfig:
    """A policy built from this section: a Gaussian MLP or small vision student, or a scripted
    expert (`scripted_reach` for the point mass, `scripted_pick_place` for LIBERO)."""

    kind: Literal["gaussian_mlp", "vision_gaussian", "scripted_reach", "scripted_pick_place", "lerobot_act", "tokenized_lm"] = "gaussian_mlp"
    hidden: int = 64
    layers: int = 2
    channels: int = 32  # vision_gaussian; lerobot_act: its transformer width (dim_model)
    init_log_std: float = -0.5
    chunk_size: int = 1  # actions per decision (rendering happens only at decisions)
    gain: float = 10.0  # scripted experts
    std: float = 0.1  # scripted experts
    grasp_dz: float = 0.02  # scripted_pick_place: grasp height above the object's origin (m)
    bins: int = 32  # tokenized_lm: action / state bins
    seed: int = 0


def _policy_stats(task: Any) -> dict[str, dict[str, Any]]:
    """Normalisation statistics for LeRobot policies built here: the task's own when it has them,
    else actions in [-1, 1] and unit-scale states."""
    if hasattr(task, "policy_stats"):
        return task.policy_stats()
    return {"observation.state": {"mean": np.zeros(task.obs_dim), "std": np.ones(task.obs_dim)},
            "action": {"min": -np.ones(task.action_dim), "max": np.ones(task.action_dim)}}


def _stack_obs(obs: list[dict[str, np.ndarray]], device: torch.device) -> dict[str, Tensor]:
    return {k: torch.as_tensor(np.stack([o[k] for o in obs]), device=device) for k in obs[0]}


def cat_step_dists(dists: list[Any]) -> Any:
    """Per-decision step distributions `[B, S, ...]` (denoising chains or action tokens) -> one
    `[B, T * S, ...]` distribution of the same kind."""
    first = dists[0]
    if isinstance(first, HiddenCategorical):
        return HiddenCategorical(torch.cat([d.hidden_B_T_H for d in dists], 1), first.head_weight_V_H, torch.cat([d.mask_B_T for d in dists], 1),
                                 vocab_size=first.vocab_size, temperature=first.temperature, chunk_size=first.chunk_size,
                                 head_bias_V=first.head_bias_V)
    g = [d.gaussian for d in dists]
    gaussian = None if g[0] is None else Gaussian(torch.cat([x.mean_B_T_D for x in g], 1), torch.cat([x.std_B_T_D for x in g], 1),
                                                   torch.cat([x.mask_B_T for x in g], 1))
    kl_w = None if first.kl_weight_B_T is None else torch.cat([d.kl_weight_B_T for d in dists], 1)
    return VelocityStepDist(torch.cat([d.velocity_B_T_D for d in dists], 1), gaussian, kl_w, torch.cat([d.dt_B_T for d in dists], 1),
                            torch.cat([d.mask_B_T for d in dists], 1), first.logprob_reduce)


def _concat(parts: list[Any]) -> Any:
    """Rollouts (and everything batch-major inside them: observation dicts, flow chains) of the same
    horizon, stacked along the batch."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, Tensor):
        return torch.cat(parts) if first.dim() > 0 else first
    if isinstance(first, list):
        return [x for p in parts for x in p]
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: _concat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(first)})
    return first  # scalars and settings shared by all parts


def unwrap(model: Any) -> Any:
    while hasattr(model, "module"):
        model = model.module
    return model


@ADAPTERS.register("robot_policy")
class RobotPolicyAdapter:
    """Robot policies acting in simulators (LIBERO, point mass): Gaussian, flow-head and tokenised policies; teachers score the student's states."""

    tiny_config = TinyPolicyConfig
    needs_tokenizer = False

    def __init__(self, tokenizer: Any = None, device: torch.device | str = "cpu", chunk_size: int = 1024):
        self.device = torch.device(device)
        self.chunk_size = chunk_size
        self.task: Any = None  # set by `bind`: the environment factory and action dimension
        self._pool: Any = None  # worker processes, when the task asks for them
        self._chunk: tuple[int, str] | None = None  # (chunk_size, model name) of the first policy loaded
        self.flow_noise_level = 0.7  # SDE noise of flow action heads when sampling (rollout.noise_level)

    @staticmethod
    def build_tokenizer(cfg: TokenizerConfig, task: Any, models: dict[str, ModelConfig]) -> None:
        return None  # state-based policies have no tokenizer

    @staticmethod
    def check_checkpoint(path: str, name: str) -> None:
        """Pre-flight: a policy directory written by a robot_policy stage (config.json naming a known kind)."""
        p = Path(path)
        if not (p / "config.json").is_file():
            raise CheckpointError(f"models.{name}.path: '{path}' has no config.json; give a directory written by a robot_policy stage")
        conf = json.loads((p / "config.json").read_text())
        if "type" in conf and "kind" not in conf:
            if conf["type"] not in ("act", "diffusion", "smolvla"):
                raise CheckpointError(f"models.{name}.path: LeRobot policy type {conf['type']!r} in {path} is not supported; use act, diffusion or smolvla")
            if not (p / "model.safetensors").is_file():
                raise CheckpointError(f"models.{name}.path: {path}/model.safetensors is missing; the LeRobot checkpoint is incomplete, save it again")
            return
        kind = conf.get("kind")
        if kind not in POLICIES and kind != "tokenized_lm":
            raise CheckpointError(f"models.{name}.path: unknown policy kind {kind!r} in {path}/config.json; known: {sorted(POLICIES)}")

    def bind(self, task: Any) -> None:
        self.task = task

    def load_model(self, cfg: ModelConfig, name: str = "model") -> torch.nn.Module:
        if self.task is None:
            raise RuntimeError("bind the adapter to a task first (the environment fixes the observation and action sizes)")
        obs_dim, action_dim = self.task.obs_dim, self.task.action_dim
        if cfg.lora is not None:
            raise ConfigError(f"models.{name}.lora: LoRA is not supported for state-based policies; train the full policy")
        if cfg.tiny is not None:
            t = cfg.tiny if isinstance(cfg.tiny, TinyPolicyConfig) else TinyPolicyConfig(**cfg.tiny)
            torch.manual_seed(t.seed)
            if t.kind == "scripted_reach":
                model = ScriptedReachExpert(t.gain, t.std)
            elif t.kind == "scripted_pick_place":
                model = ScriptedPickPlaceExpert(t.gain, t.std, chunk_size=t.chunk_size, grasp_dz=t.grasp_dz)
            elif t.kind == "tokenized_lm":  # OpenVLA-style: a causal LM over binned action tokens
                from mmdistill.modalities.robot.tokenized import tiny_tokenized_policy

                words = sorted({w for text in getattr(self.task, "languages", {}).values() for w in text.split()})
                model = tiny_tokenized_policy(words, action_dim, t.chunk_size, t.bins, t.hidden, t.layers, t.seed, str(self.device))
            elif t.kind == "lerobot_act":  # a random-init LeRobot ACT as a Gaussian head
                from mmdistill.modalities.robot.lerobot_policies import ACTGaussianPolicy, tiny_act

                size = int(getattr(self.task, "image_size", 0) or 0)
                act = tiny_act(obs_dim, action_dim, t.chunk_size, _policy_stats(self.task), image_shape=(3, size, size) if size else None,
                               dim_model=t.channels, seed=t.seed, device=str(self.device))
                model = ACTGaussianPolicy(act, t.chunk_size, t.init_log_std)
            elif t.kind == "vision_gaussian":
                model = VisionGaussianPolicy(obs_dim, action_dim, t.chunk_size, t.channels, t.hidden, t.init_log_std)
            else:
                model = GaussianMLPPolicy(obs_dim, action_dim, t.hidden, t.layers, t.init_log_std, t.chunk_size)
            return self._check_compatible(model.to(self.device), name)
        path = Path(cfg.path)
        self.check_checkpoint(str(path), name)
        conf = json.loads((path / "config.json").read_text())
        if "type" in conf and "kind" not in conf:  # a LeRobot checkpoint (ACT, Diffusion, SmolVLA)
            from mmdistill.modalities.robot.lerobot_policies import load_lerobot_policy

            chunk = self._chunk[0] if self._chunk else int(conf.get("n_action_steps", 1))
            model = load_lerobot_policy(path, expect_action_dim=action_dim, expect_chunk=chunk, device=str(self.device))
            return self._check_compatible(model, name)
        kind = conf.pop("kind")
        if kind == "tokenized_lm":
            from mmdistill.modalities.robot.tokenized import TokenizedActionPolicy

            return self._check_compatible(TokenizedActionPolicy.load(path, device=str(self.device)).to(self.device), name)
        model = POLICIES[kind](**conf)
        if (path / "model.safetensors").exists():
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(path / "model.safetensors")))
        c = getattr(model, "config", {})
        got_obs = c.get("obs_dim", c.get("state_dim", obs_dim))
        if c.get("action_dim", action_dim) != action_dim or got_obs != obs_dim:
            raise CompatibilityError(
                f"models.{name}: policy for obs {got_obs} / action {c.get('action_dim')} dims, "
                f"the environment has {obs_dim} / {action_dim}; teacher, student and environment must agree"
            )
        return self._check_compatible(model.to(self.device), name)

    def _check_compatible(self, model: Any, name: str) -> Any:
        """Every policy of a run acts in chunks of the same length (the KL is over whole chunks)."""
        k = int(getattr(model, "chunk_size", 1))
        if self._chunk is None:
            self._chunk = (k, name)
        elif k != self._chunk[0]:
            raise CompatibilityError(
                f"models.{name}: chunk_size {k}, but models.{self._chunk[1]} acts in chunks of {self._chunk[0]}; "
                "teacher and student must decide equally long action chunks (set tiny.chunk_size alike)"
            )
        return model

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        from safetensors.torch import save_file

        m = unwrap(model)
        out_dir = Path(out_dir)
        if hasattr(m, "save"):  # a policy with its own format (tokenised LM: HF model + tokenizer)
            m.save(out_dir)
            return
        if hasattr(m, "lerobot"):  # LeRobot's own format, loadable by its from_pretrained
            from mmdistill.modalities.robot.lerobot_policies import save_lerobot_policy

            save_lerobot_policy(m, out_dir)
            return
        (out_dir / "config.json").write_text(json.dumps(m.config, indent=1))
        state = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
        if state:
            save_file(state, str(out_dir / "model.safetensors"))

    # ------------------------------------------------------------------ rollouts

    def horizon(self, model: Any) -> int:
        """Decisions per episode: the task's environment steps over the policy's chunk length."""
        return math.ceil(self.task.max_steps / int(getattr(unwrap(model), "chunk_size", 1)))

    @torch.no_grad()
    def run_episodes(self, model: Any, init_states: list[Any], gen: torch.Generator | None, sample: bool = True) -> Rollout:
        """One episode per initial state, batched over episodes.  With `task.num_workers > 0` the
        environments run in worker processes (`vec.EnvPool`), in chunks of that many episodes; a
        chunk whose worker crashed is rerun from its initial states with the same policy noise."""
        workers = int(getattr(self.task, "num_workers", 0) or 0)
        # the policy noise of every episode is drawn up front, so chunking and reruns change nothing
        eps_B_T_D = None
        if sample:
            D = self.task.action_dim * int(getattr(unwrap(model), "chunk_size", 1))
            eps_B_T_D = torch.randn(len(init_states), self.horizon(model), D, generator=gen, device=self.device)
        # chained policies (flow heads, action tokens) sample from a generator seeded here (0: not sampling)
        chain_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device)) if sample and gen is not None else 0
        if workers <= 0:
            return self._episodes(model, init_states, eps_B_T_D, None, chain_seed)
        from mmdistill.modalities.robot.vec import EnvPool, WorkerCrashed

        if self._pool is None or len(self._pool.workers) != workers:
            self._pool = EnvPool(self.task.make_env, workers)
        parts = []
        for i in range(0, len(init_states), workers):
            chunk = init_states[i : i + workers]
            eps = eps_B_T_D[i : i + workers] if eps_B_T_D is not None else None
            for attempt in range(3):
                try:
                    parts.append(self._episodes(model, chunk, eps, self._pool, chain_seed + i))
                    break
                except WorkerCrashed as e:
                    if attempt == 2:
                        raise
                    print(f"[robot] {e}")
        return _concat(parts)

    def _episodes(self, model: Any, init_states: list[Any], eps_B_T_D: Tensor | None, pool: Any, chain_seed: int = 0) -> Rollout:
        """Episodes from `init_states`; each decision samples a chunk `mean + std * eps` (the mode
        when eps is None) that the environment executes before the next observation."""
        if pool is None:
            envs = [self.task.make_env() for _ in init_states]
            first = [e.reset(i) for e, i in zip(envs, init_states)]
        else:
            first = list(pool.reset(init_states))
        obs = [o if isinstance(o, dict) else {"observation.state": np.asarray(o)} for o in first]
        policy = unwrap(model)
        T, B = self.horizon(policy), len(init_states)
        D = self.task.action_dim * int(getattr(policy, "chunk_size", 1))
        obs_B_T: dict[str, Tensor] = {k: torch.zeros(B, T, *v.shape, dtype=torch.as_tensor(v).dtype, device=self.device) for k, v in obs[0].items()}
        act_B_T_D = torch.zeros(B, T, D, device=self.device)
        mask_B_T = torch.zeros(B, T, device=self.device)
        logp_B_T = torch.zeros(B, T, device=self.device)
        alive = np.ones(B, bool)
        success = np.zeros(B, np.float32)
        decisions = np.zeros(B, np.int64)
        language = [self.task.language(p) for p in init_states] if hasattr(self.task, "language") else None
        # a chained policy's chunk ends a sub-rollout: an SDE denoising chain (flow action heads) or
        # K x A action tokens (tokenised LMs); objectives see that sub-rollout's steps
        chained = hasattr(policy, "sample_chunk")
        chains: dict[str, Rollout] = {}
        chain_gen = torch.Generator(device=self.device).manual_seed(chain_seed)
        for t in range(T):
            if not alive.any() and not chained:  # chains keep the full horizon (all rows alike)
                break
            o = {k: v.unsqueeze(1) for k, v in _stack_obs(obs, self.device).items()}
            if language is not None:
                o["task"] = language
            keep = torch.as_tensor(alive, device=self.device, dtype=torch.float32)
            if chained:
                o_N = {k: (v[:, 0] if isinstance(v, Tensor) else v) for k, v in o.items()}
                a_N, chain = policy.sample_chunk(o_N, generator=chain_gen, noise_level=self.flow_noise_level if eps_B_T_D is not None else 0.0)
                chain.mask_B_T = chain.mask_B_T * keep[:, None]
                chains[str(t)] = chain
                a, lp = a_N.unsqueeze(1), chain.behavior_logp_B_T.sum(-1, keepdim=True)
            else:
                d = policy.dist(o, torch.ones(B, 1, device=self.device))
                a = d.mean_B_T_D + d.std_B_T_D * eps_B_T_D[:, t : t + 1] if eps_B_T_D is not None else d.mode()
                lp = d.log_prob(a)
            for k in obs_B_T:
                obs_B_T[k][:, t] = o[k][:, 0]
            act_B_T_D[:, t], mask_B_T[:, t], logp_B_T[:, t] = a[:, 0], keep, lp[:, 0] * keep
            a_np = a[:, 0].cpu().numpy()
            live = [int(b) for b in np.flatnonzero(alive)]
            if pool is None:
                results = {b: envs[b].step(a_np[b]) for b in live}
                results = {b: (o_, r_, d_, i_["success"]) for b, (o_, r_, d_, i_) in results.items()}
            else:
                results = pool.step(a_np, active=live)
            for b, (ob, _, done, ok) in results.items():
                obs[b] = ob if isinstance(ob, dict) else {"observation.state": np.asarray(ob)}
                decisions[b] += 1
                if ok:
                    success[b] = 1.0
                alive[b] = not done
        steps: dict[str, Any] = {"obs": dict(obs_B_T)}
        if language is not None:
            steps["obs"]["task"] = language
        if chained:  # objectives see the chains' steps: [B, T * S] (S denoising steps or action tokens)
            steps.update(chains=chains, decision_actions=act_B_T_D)
            parts = [chains[str(t)] for t in range(T)]
            return Rollout(
                context=list(init_states), steps=steps, actions=torch.cat([c.actions for c in parts], 1),
                mask_B_T=torch.cat([c.mask_B_T for c in parts], 1), behavior_logp_B_T=torch.cat([c.behavior_logp_B_T for c in parts], 1),
                rewards_B=torch.as_tensor(success, device=self.device), extras={"decisions_B": torch.as_tensor(decisions, device=self.device)},
            )
        return Rollout(
            context=list(init_states), steps=steps, actions=act_B_T_D, mask_B_T=mask_B_T,
            behavior_logp_B_T=logp_B_T, rewards_B=torch.as_tensor(success, device=self.device),
            extras={"decisions_B": torch.as_tensor(decisions, device=self.device)},
        )

    def rollout(self, source: str, student: Any, teacher: Any, task: Any, problems: list, rc: Any, gen: Any, objective: Any = None) -> Rollout:
        """Episodes from training initial states, acted by the student (or by the teacher, for warm-up)."""
        if source == "dataset":
            raise ConfigError("robot tasks have no dataset actions; warm up with objective sft and source: teacher")
        self.flow_noise_level = float(getattr(rc, "noise_level", self.flow_noise_level))
        return self.run_episodes(student if source == "student" else teacher, list(problems), gen, sample=True)

    def step_dist(self, model: Any, rollout: Rollout, temperature: float = 1.0) -> Gaussian:
        policy = unwrap(model)
        chains = rollout.steps.get("chains")
        if chains is None:
            return policy.dist(rollout.steps["obs"], rollout.mask_B_T)
        parts = [chains[str(t)] for t in range(len(chains))]
        if hasattr(policy, "step_dist"):
            return cat_step_dists([policy.step_dist(None, c) for c in parts])
        if "token_bins" in parts[0].extras and hasattr(policy, "dist"):  # a Gaussian teacher scoring action tokens
            from mmdistill.modalities.robot.tokenized import BinnedGaussian

            d = policy.dist(rollout.steps["obs"], torch.ones(rollout.steps["decision_actions"].shape[:2], device=self.device))
            B = d.mean_B_T_D.shape[0]
            first, n_bins = parts[0].extras["token_bins"]
            return BinnedGaussian(d.mean_B_T_D.reshape(B, -1), d.std_B_T_D.reshape(B, -1), rollout.mask_B_T, first, n_bins)
        raise CompatibilityError(
            "a flow-head student's rollout is scored per denoising step; this policy has no flow head (the scripted "
            "expert scores whole decisions) -- give a flow-head student a flow-head teacher (e.g. a SmolVLA checkpoint)"
        )

    @torch.no_grad()
    def dist_metrics(self, dist: Any, rollout: Rollout) -> dict[str, float]:
        """The policy's mean entropy per decision at the rollout's states (the entropy curves)."""
        if not hasattr(dist, "entropy"):
            return {}
        n = rollout.mask_B_T.sum().clamp(min=1)
        return {"entropy": float((dist.entropy() * rollout.mask_B_T).sum() / n)}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model: Any, task: Any, cfg: Any, seed: int = 0, out_dir: Path | None = None, tag: str = "eval") -> dict[str, Any]:
        """Success rate of the mean action from every evaluation initial state (overall and per
        task), the entropy of the policy's Gaussian per decision at the visited states, and a
        video of the first `eval.grid` episodes."""
        states = task.problems(cfg.split, cfg.n, seed=seed)
        r = self.run_episodes(model, states, None, sample=False)
        d = self.step_dist(model, r)
        n_steps = r.mask_B_T.sum().clamp(min=1)
        out: dict[str, Any] = {"n": len(states), "success_rate": float(r.rewards_B.mean()), "decisions": float(r.extras["decisions_B"].float().mean())}
        if hasattr(d, "entropy"):  # Gaussian heads; a flow head's chain has no closed-form action entropy
            out["entropy"] = float(d.entropy().sum() / n_steps)
        if hasattr(task, "group_of"):
            groups: dict[str, list[float]] = {}
            for p, ok in zip(states, r.rewards_B.tolist()):
                groups.setdefault(task.group_of(p), []).append(ok)
            if len(groups) > 1 or getattr(task, "always_group", False):
                out["success_by_task"] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
        if out_dir is not None and cfg.grid > 0 and hasattr(task, "render_episodes"):
            path = Path(out_dir) / f"{tag}.gif"
            task.render_episodes(r.select(slice(0, cfg.grid)), path)
            out["video"] = str(path)
        return out

    # ------------------------------------------------------------------ datasets

    def record(self, model: Any, task: Any, problems: list, root: Path, repo_id: str, sample: bool = True, seed: int = 0) -> dict[str, Any]:
        """Run one episode per problem and write them as a LeRobot dataset (modalities/robot/record.py).

        One frame per decision: the observation the policy saw and the action chunk it executed
        (`action` is `[K * A]`; with chunk_size 1 this is LeRobot's usual per-step format).
        """
        from mmdistill.modalities.robot.record import record_lerobot_dataset

        gen = torch.Generator(device=self.device).manual_seed(seed)
        r = self.run_episodes(model, problems, gen, sample=sample)
        obs = r.steps["obs"]
        language = obs.get("task") or [str(p) for p in problems]
        episodes = []
        for b in range(r.batch_size):
            n = int(r.mask_B_T[b].sum())
            ep: dict[str, Any] = {"state": obs["observation.state"][b, :n], "action": r.actions[b, :n], "task": language[b]}
            if "observation.images.image" in obs:
                ep["image"] = obs["observation.images.image"][b, :n]
            if "observation.environment_state" in obs:
                ep["env_state"] = obs["observation.environment_state"][b, :n]
            episodes.append(ep)
        chunk = int(getattr(unwrap(model), "chunk_size", 1))
        fps = max(1, round(getattr(task, "control_freq", 20) / chunk))
        record_lerobot_dataset(root, repo_id, fps, episodes, robot_type=getattr(task, "robot_type", None))
        return {"episodes": len(episodes), "frames": int(r.mask_B_T.sum()), "success_rate": float(r.rewards_B.mean()), "fps": fps, "root": str(root)}
