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
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmdistill.errors import CheckpointError, CompatibilityError, ConfigError
from mmdistill.interfaces import AdapterSpec, Rollout, RolloutRequest
from mmdistill.modalities.robot.config import RobotEvalConfig, RobotRolloutConfig, TinyPolicyConfig
from mmdistill.modalities.robot.lerobot import (
    WRAPPERS,
    ACTGaussianPolicy,
    LeRobotWrapper,
    load_lerobot_policy,
    save_lerobot_policy,
    tiny_act,
)
from mmdistill.modalities.robot.policies import (
    FunnelPickPlaceExpert,
    GaussianMLPPolicy,
    ScriptedPickPlaceExpert,
    ScriptedReachExpert,
    VisionGaussianPolicy,
)
from mmdistill.modalities.robot.protocols import wilson_interval
from mmdistill.modalities.robot.record import record_lerobot_dataset
from mmdistill.modalities.robot.task import LiberoTask
from mmdistill.modalities.robot.tokenized import BinnedGaussian, TokenizedActionPolicy, tiny_tokenized_policy
from mmdistill.modalities.robot.vec import EnvPool, WorkerCrashed
from mmdistill.registry import ADAPTERS
from mmdistill.stepdist import Gaussian, GaussianBernoulli, HiddenCategorical, VelocityStepDist

__all__ = ["RobotPolicyAdapter", "TinyPolicyConfig", "RobotRolloutConfig", "RobotEvalConfig", "cat_step_dists"]

POLICIES = {
    "gaussian_mlp": GaussianMLPPolicy,
    "scripted_reach": ScriptedReachExpert,
    "vision_gaussian": VisionGaussianPolicy,
    "scripted_pick_place": ScriptedPickPlaceExpert,
    "funnel_pick_place": FunnelPickPlaceExpert,
}
KINDS = (*POLICIES, TokenizedActionPolicy.kind)  # `kind` values of config.json in directories this adapter saves


def _policy_stats(task: Any) -> dict[str, dict[str, Any]]:
    """Normalisation statistics for LeRobot policies built here: the task's own when it has them,
    else actions in [-1, 1] and unit-scale states."""
    if hasattr(task, "policy_stats"):
        return task.policy_stats()
    return {
        "observation.state": {"mean": np.zeros(task.obs_dim), "std": np.ones(task.obs_dim)},
        "action": {"min": -np.ones(task.action_dim), "max": np.ones(task.action_dim)},
    }


def _stack_obs(obs: list[dict[str, np.ndarray]], device: torch.device) -> dict[str, Tensor]:
    return {k: torch.as_tensor(np.stack([o[k] for o in obs]), device=device) for k in obs[0]}


def cat_step_dists(dists: list[Any]) -> Any:
    """Per-decision step distributions `[B, S, ...]` (denoising chains or action tokens) -> one
    `[B, T * S, ...]` distribution of the same kind."""
    first = dists[0]
    if isinstance(first, HiddenCategorical):
        return HiddenCategorical(
            torch.cat([d.hidden_B_T_H for d in dists], 1),
            first.head_weight_V_H,
            torch.cat([d.mask_B_T for d in dists], 1),
            vocab_size=first.vocab_size,
            temperature=first.temperature,
            chunk_size=first.chunk_size,
            head_bias_V=first.head_bias_V,
        )
    g = [d.gaussian for d in dists]
    gaussian = (
        None
        if g[0] is None
        else Gaussian(
            torch.cat([x.mean_B_T_D for x in g], 1),
            torch.cat([x.std_B_T_D for x in g], 1),
            torch.cat([x.mask_B_T for x in g], 1),
        )
    )
    kl_w = None if first.kl_weight_B_T is None else torch.cat([d.kl_weight_B_T for d in dists], 1)
    return VelocityStepDist(
        torch.cat([d.velocity_B_T_D for d in dists], 1),
        gaussian,
        kl_w,
        torch.cat([d.dt_B_T for d in dists], 1),
        torch.cat([d.mask_B_T for d in dists], 1),
        first.logprob_reduce,
    )


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
        return dataclasses.replace(
            first, **{f.name: _concat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(first)}
        )
    return first  # scalars and settings shared by all parts


def unwrap(model: Any) -> Any:
    """The bare policy under accelerate / DDP wrappers (which keep it as `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _refuse_unserved(request: RolloutRequest) -> None:
    """A ConfigError for each request field that robot episodes cannot serve."""
    if request.source == "dataset":
        raise ConfigError("robot tasks have no dataset actions; warm up with objective sft and source: teacher")
    if request.kind != "trajectory":
        raise ConfigError(
            f"objective: rollout kind {request.kind!r} is for flow image models; robot policies act in episodes (trajectory)"
        )
    for key, value, asked in (
        ("mixture_beta", request.mixture_beta, bool(request.mixture_beta)),
        ("privileged_template", request.privileged_template, request.privileged_template is not None),
        ("guidance", request.guidance, request.guidance is not None),
        ("cond_dropout", request.cond_dropout, request.cond_dropout > 0),
    ):
        if asked:
            raise ConfigError(
                f"objective: asks robot episodes for {key}={value!r}, which the robot_policy adapter cannot serve (text "
                f"and flow rollouts can); use an objective without it (opd, reverse_kl, forward_kl, hard_ce, sft, grpo)"
            )


def _success_interval(prefix: str, rewards_B: Tensor) -> dict[str, float]:
    """`PREFIX_ci95_low` / `PREFIX_ci95_high`: the Wilson 95% interval of binary episode successes."""
    lo, hi = wilson_interval(int(round(float(rewards_B.sum()))), len(rewards_B))
    return {f"{prefix}_ci95_low": round(lo, 4), f"{prefix}_ci95_high": round(hi, 4)}


@ADAPTERS.register("robot_policy")
class RobotPolicyAdapter:
    """Robot policies acting in simulators (LIBERO, point mass): Gaussian, flow-head and tokenised policies; teachers score the student's states."""

    spec = AdapterSpec(
        rollout_config=RobotRolloutConfig,
        eval_config=RobotEvalConfig,
        tiny_config=TinyPolicyConfig,
        needs_tokenizer=False,
        supports_routing=False,
        can_record=True,
        default_task="reach",
    )

    def __init__(self, tokenizer: Any = None, device: torch.device | str = "cpu", chunk_size: int = 1024):
        self.device = torch.device(device)
        self.chunk_size = chunk_size
        self.task: Any = None  # set by `bind`: the environment factory and action dimension
        self._pool: Any = None  # worker processes, when the task asks for them
        self._chunk: tuple[int, str] | None = None  # (chunk_size, model name) of the first policy loaded
        self._kl_states: dict[str, Any] = {}  # eval.kl_teacher: the teacher-visited states and its distribution

    # ------------------------------------------------------------------ checkpoints and tokenizers (class-level)

    @staticmethod
    def claims_checkpoint(path: str | Path) -> bool:
        """A directory written by a robot_policy stage (config.json naming a policy `kind`) or a LeRobot
        policy (config.json with LeRobot's `type` and no transformers `model_type`)."""
        conf_path = Path(path) / "config.json"
        if (Path(path) / "model_index.json").exists() or not conf_path.is_file():
            return False
        try:
            conf = json.loads(conf_path.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(conf, dict):
            return False
        if "kind" in conf:
            return conf["kind"] in KINDS
        return "type" in conf and "model_type" not in conf

    @staticmethod
    def check_checkpoint(path: str, name: str) -> None:
        """Pre-flight: a policy directory written by a robot_policy stage (config.json naming a known kind)."""
        p = Path(path)
        if not (p / "config.json").is_file():
            raise CheckpointError(
                f"models.{name}.path: '{path}' has no config.json; give a directory written by a robot_policy stage"
            )
        conf = json.loads((p / "config.json").read_text())
        if "type" in conf and "kind" not in conf:
            if conf["type"] not in WRAPPERS:
                raise CheckpointError(
                    f"models.{name}.path: LeRobot policy type {conf['type']!r} in {path} is not supported; use act, diffusion or smolvla"
                )
            if not (p / "model.safetensors").is_file():
                raise CheckpointError(
                    f"models.{name}.path: {path}/model.safetensors is missing; the LeRobot checkpoint is incomplete, save it again"
                )
            return
        kind = conf.get("kind")
        if kind not in KINDS:
            raise CheckpointError(
                f"models.{name}.path: unknown policy kind {kind!r} in {path}/config.json; known: {sorted(KINDS)}"
            )

    @staticmethod
    def build_tokenizer(cfg: Any, task: Any, models: dict[str, Any]) -> None:
        return None  # robot policies have no run tokenizer (a tokenised LM saves its own beside its weights)

    @staticmethod
    def load_tokenizer(path: str | Path) -> None:
        return None

    @staticmethod
    def check_tokenizer_of(path: str | Path, tokenizer: Any, name: str, compare_chat_template: bool = True) -> None:
        return None

    # ------------------------------------------------------------------ models

    def bind(self, task: Any) -> None:
        self.task = task

    def load_model(self, cfg: Any, name: str = "model") -> torch.nn.Module:
        if self.task is None:
            raise RuntimeError(
                "bind the adapter to a task first (the environment fixes the observation and action sizes)"
            )
        obs_dim, action_dim = self.task.obs_dim, self.task.action_dim
        if cfg.options:
            raise ConfigError(
                f"models.{name}.options: robot policies take no options (got {sorted(cfg.options)}); remove models.{name}.options"
            )
        if cfg.lora is not None:
            raise ConfigError(
                f"models.{name}.lora: LoRA is not supported for state-based policies; train the full policy"
            )
        if cfg.tiny is not None:
            t = cfg.tiny if isinstance(cfg.tiny, TinyPolicyConfig) else TinyPolicyConfig(**cfg.tiny)
            return self._check_compatible(self.tiny_policy(t).to(self.device), name)
        path = Path(cfg.path)
        self.check_checkpoint(str(path), name)
        conf = json.loads((path / "config.json").read_text())
        if "type" in conf and "kind" not in conf:  # a LeRobot checkpoint (ACT, Diffusion, SmolVLA)
            chunk = self._chunk[0] if self._chunk else int(conf.get("n_action_steps", 1))
            model = load_lerobot_policy(path, expect_action_dim=action_dim, expect_chunk=chunk, device=str(self.device))
            return self._check_compatible(model, name)
        kind = conf.pop("kind")
        if kind == "tokenized_lm":
            return self._check_compatible(
                TokenizedActionPolicy.load(path, device=str(self.device)).to(self.device), name
            )
        model = POLICIES[kind](**conf)
        if (path / "model.safetensors").exists():
            model.load_state_dict(load_file(str(path / "model.safetensors")))
        c = getattr(model, "config", {})
        got_obs = c.get("obs_dim", c.get("state_dim", obs_dim))
        if c.get("action_dim", action_dim) != action_dim or got_obs != obs_dim:
            raise CompatibilityError(
                f"models.{name}: policy for obs {got_obs} / action {c.get('action_dim')} dims, "
                f"the environment has {obs_dim} / {action_dim}; teacher, student and environment must agree"
            )
        return self._check_compatible(model.to(self.device), name)

    def tiny_policy(self, t: TinyPolicyConfig) -> torch.nn.Module:
        """A policy built from a `tiny` section (random init seeded by `t.seed`, or a scripted expert)."""
        obs_dim, action_dim = self.task.obs_dim, self.task.action_dim
        torch.manual_seed(t.seed)
        student_head = dict(
            head=t.head,
            std_mode=t.std_mode,
            log_std_min=t.log_std_min,
            log_std_max=t.log_std_max,
            obs_shift=t.obs_shift,
            obs_scale=t.obs_scale,
            axis_angle=t.axis_angle,
            env_entries=t.env_entries,
            env_deltas=t.env_deltas,
        )
        expert_head = dict(head=t.head, gripper_logit=t.gripper_logit)
        if t.kind == "scripted_reach":
            return ScriptedReachExpert(t.gain, t.std)
        if t.kind == "scripted_pick_place":
            return ScriptedPickPlaceExpert(t.gain, t.std, chunk_size=t.chunk_size, grasp_dz=t.grasp_dz, **expert_head)
        if t.kind == "funnel_pick_place":
            return FunnelPickPlaceExpert(t.gain, t.std, chunk_size=t.chunk_size, grasp_dz=t.grasp_dz, **expert_head)
        if t.kind == "tokenized_lm":  # OpenVLA-style: a causal LM over binned action tokens
            words = sorted({w for text in getattr(self.task, "languages", {}).values() for w in text.split()})
            return tiny_tokenized_policy(
                words, action_dim, t.chunk_size, t.bins, t.hidden, t.layers, t.seed, str(self.device)
            )
        if t.kind == "lerobot_act":  # a random-init LeRobot ACT as a Gaussian head
            size = int(getattr(self.task, "image_size", 0) or 0)
            act = tiny_act(
                obs_dim,
                action_dim,
                t.chunk_size,
                _policy_stats(self.task),
                image_shape=(3, size, size) if size else None,
                dim_model=t.channels,
                seed=t.seed,
                device=str(self.device),
            )
            return ACTGaussianPolicy(act, t.chunk_size, t.init_log_std)
        if t.kind == "vision_gaussian":
            return VisionGaussianPolicy(
                obs_dim, action_dim, t.chunk_size, t.channels, t.hidden, t.init_log_std, **student_head
            )
        return GaussianMLPPolicy(obs_dim, action_dim, t.hidden, t.layers, t.init_log_std, t.chunk_size, **student_head)

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

    def prune_layers(self, model: Any, keep_layers: list[int], lora: Any = None, name: str = "model") -> Any:
        raise ConfigError(
            f"models.{name}.prune: layer pruning is for transformer LMs; robot policies are built whole -- give "
            f"models.{name} a 'tiny' section (a smaller student) or a 'path'"
        )

    def add_lora(self, model: Any, lora: Any) -> Any:
        raise ConfigError(
            "models.NAME.lora: LoRA is not supported for robot policies; remove the lora section and train the full policy"
        )

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        m = unwrap(model)
        out_dir = Path(out_dir)
        if isinstance(m, TokenizedActionPolicy):  # its own format: HF model + tokenizer
            m.save(out_dir)
            return
        if isinstance(m, LeRobotWrapper):  # LeRobot's own format, loadable by its from_pretrained
            save_lerobot_policy(m, out_dir)
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(m.config, indent=1))
        state = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
        if state:
            save_file(state, str(out_dir / "model.safetensors"))

    def unwrap(self, model: Any) -> Any:
        return unwrap(model)

    def stage_fingerprint(self, model: Any) -> str:
        """sha256 (first 16 hex digits) of the policy's parameter and buffer bytes, in name order."""
        h = hashlib.sha256()
        for key, value in sorted(unwrap(model).state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ rollouts

    def horizon(self, model: Any) -> int:
        """Decisions per episode: the task's environment steps over the policy's chunk length."""
        return math.ceil(self.task.max_steps / int(getattr(unwrap(model), "chunk_size", 1)))

    @torch.no_grad()
    def run_episodes(
        self,
        model: Any,
        init_states: list[Any],
        gen: torch.Generator | None,
        sample: bool = True,
        noise_level: float = 0.7,
    ) -> Rollout:
        """One episode per initial state, batched over episodes.  With `task.num_workers > 0` the
        environments run in worker processes (`vec.EnvPool`), in chunks of that many episodes; a
        chunk whose worker crashed is rerun from its initial states with the same policy noise.
        `noise_level` is the SDE noise of flow action heads when sampling (`rollout.noise_level`)."""
        workers = int(getattr(self.task, "num_workers", 0) or 0)
        # the policy noise of every episode is drawn up front, so chunking and reruns change nothing
        eps_B_T_D = None
        if sample:
            D = self.task.action_dim * int(getattr(unwrap(model), "chunk_size", 1))
            eps_B_T_D = torch.randn(len(init_states), self.horizon(model), D, generator=gen, device=self.device)
        # chained policies (flow heads, action tokens) sample from a generator seeded here (0: not sampling)
        chain_seed = (
            int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device))
            if sample and gen is not None
            else 0
        )
        if workers <= 0:
            return self._episodes(model, init_states, eps_B_T_D, None, chain_seed, noise_level)
        if self._pool is None or len(self._pool.workers) != workers:
            self._pool = EnvPool(self.task.make_env, workers)
        parts = []
        for i in range(0, len(init_states), workers):
            chunk = init_states[i : i + workers]
            eps = eps_B_T_D[i : i + workers] if eps_B_T_D is not None else None
            for attempt in range(3):
                try:
                    parts.append(self._episodes(model, chunk, eps, self._pool, chain_seed + i, noise_level))
                    break
                except WorkerCrashed as e:
                    if attempt == 2:
                        raise
                    print(f"[robot] {e}")
        return _concat(parts)

    def _episodes(
        self,
        model: Any,
        init_states: list[Any],
        eps_B_T_D: Tensor | None,
        pool: Any,
        chain_seed: int = 0,
        noise_level: float = 0.7,
    ) -> Rollout:
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
        obs_B_T: dict[str, Tensor] = {
            k: torch.zeros(B, T, *v.shape, dtype=torch.as_tensor(v).dtype, device=self.device)
            for k, v in obs[0].items()
        }
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
                a_N, chain = policy.sample_chunk(
                    o_N, generator=chain_gen, noise_level=noise_level if eps_B_T_D is not None else 0.0
                )
                chain.mask_B_T = chain.mask_B_T * keep[:, None]
                chains[str(t)] = chain
                a, lp = a_N.unsqueeze(1), chain.behavior_logp_B_T.sum(-1, keepdim=True)
            else:
                d = policy.dist(o, torch.ones(B, 1, device=self.device))
                if eps_B_T_D is None:
                    a = d.mode()
                elif isinstance(d, GaussianBernoulli):  # arm and gripper drawn from the pre-drawn noise
                    a = d.from_noise(eps_B_T_D[:, t : t + 1])
                else:
                    a = d.mean_B_T_D + d.std_B_T_D * eps_B_T_D[:, t : t + 1]
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
                context=list(init_states),
                steps=steps,
                actions=torch.cat([c.actions for c in parts], 1),
                mask_B_T=torch.cat([c.mask_B_T for c in parts], 1),
                behavior_logp_B_T=torch.cat([c.behavior_logp_B_T for c in parts], 1),
                rewards_B=torch.as_tensor(success, device=self.device),
                extras={"decisions_B": torch.as_tensor(decisions, device=self.device)},
            )
        return Rollout(
            context=list(init_states),
            steps=steps,
            actions=act_B_T_D,
            mask_B_T=mask_B_T,
            behavior_logp_B_T=logp_B_T,
            rewards_B=torch.as_tensor(success, device=self.device),
            extras={"decisions_B": torch.as_tensor(decisions, device=self.device)},
        )

    def rollout(
        self, request: RolloutRequest, student: Any, teacher: Any, task: Any, problems: list[Any], gen: torch.Generator
    ) -> Rollout:
        """Episodes from training initial states, acted by the student (or by the teacher, for warm-up);
        `request.settings` is the stage's `RobotRolloutConfig` (flow heads sample at its noise_level)."""
        _refuse_unserved(request)
        settings = request.settings if request.settings is not None else RobotRolloutConfig()
        actor = student if request.source == "student" else teacher
        return self.run_episodes(actor, list(problems), gen, sample=True, noise_level=settings.noise_level)

    def step_dist(self, model: Any, rollout: Rollout, temperature: float = 1.0) -> Any:
        """Any policy's step distributions on the rollout's states: a `Gaussian` per decision, or per
        chained step (`VelocityStepDist` per denoising step, `HiddenCategorical` per action token, a
        Gaussian teacher's `BinnedGaussian`).  Policies sample at their own noise: `temperature` is unused."""
        policy = unwrap(model)
        chains = rollout.steps.get("chains")
        if chains is None:
            return policy.dist(rollout.steps["obs"], rollout.mask_B_T)
        parts = [chains[str(t)] for t in range(len(chains))]
        if hasattr(policy, "step_dist"):
            return cat_step_dists([policy.step_dist(None, c) for c in parts])
        if "token_bins" in parts[0].extras and hasattr(policy, "dist"):  # a Gaussian teacher scoring action tokens
            d = policy.dist(
                rollout.steps["obs"], torch.ones(rollout.steps["decision_actions"].shape[:2], device=self.device)
            )
            B = d.mean_B_T_D.shape[0]
            first, n_bins = parts[0].extras["token_bins"]
            return BinnedGaussian(
                d.mean_B_T_D.reshape(B, -1), d.std_B_T_D.reshape(B, -1), rollout.mask_B_T, first, n_bins
            )
        raise CompatibilityError(
            "a flow-head student's rollout is scored per denoising step; this policy has no flow head (the scripted "
            "expert scores whole decisions) -- give a flow-head student a flow-head teacher (e.g. a SmolVLA checkpoint)"
        )

    @torch.no_grad()
    def dist_metrics(self, dist: Any, rollout: Rollout) -> dict[str, float]:
        """The policy's mean entropy per decision at the rollout's states (the entropy curves); for an arm +
        gripper head also the mean std of each arm dimension (`std_d0`, ...) and P(close) (`p_close`)."""
        if isinstance(dist, VelocityStepDist):  # a flow head's chain has no closed-form action entropy
            return {}
        m = rollout.mask_B_T
        n = m.sum().clamp(min=1)
        out = {"entropy": float((dist.entropy() * m).sum() / n)}
        if isinstance(dist, GaussianBernoulli):
            std_D = (dist.std_B_T_D * m.unsqueeze(-1)).sum((0, 1)) / n
            out.update({f"std_d{i}": float(v) for i, v in enumerate(std_D)})
            out["p_close"] = float((torch.sigmoid(dist.gripper_logit_B_T) * m).sum() / n)
        return out

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(
        self,
        model: Any,
        task: Any,
        cfg: RobotEvalConfig,
        seed: int = 0,
        out_dir: Path | None = None,
        tag: str = "eval",
        show: int = 3,
    ) -> dict[str, Any]:
        """Success rate of the mean action from every evaluation initial state (overall and per
        task), the entropy of the policy's Gaussian per decision at the visited states, and a
        video of the first `eval.grid` episodes (`show`, the text samples kept, has no analogue here)."""
        states = task.problems(cfg.split, cfg.n, seed=seed)
        r = self.run_episodes(model, states, None, sample=False)
        d = self.step_dist(model, r)
        n_steps = r.mask_B_T.sum().clamp(min=1)
        out: dict[str, Any] = {
            "n": len(states),
            "success_rate": float(r.rewards_B.mean()),
            "decisions": float(r.extras["decisions_B"].float().mean()),
        }
        out.update(_success_interval("success", r.rewards_B))
        if not isinstance(
            d, VelocityStepDist
        ):  # Gaussian heads, action tokens; a flow head's chain has no closed-form action entropy
            out["entropy"] = float(d.entropy().sum() / n_steps)
        if isinstance(d, GaussianBernoulli):  # entropy of each arm dimension and of the gripper, per decision
            h_D = (d.entropy_per_dim() * r.mask_B_T.unsqueeze(-1)).sum((0, 1)) / n_steps
            out["entropy_by_dim"] = {f"d{i}": round(float(v), 4) for i, v in enumerate(h_D[:-1])} | {
                "gripper": round(float(h_D[-1]), 4)
            }
        if cfg.sampled:  # the policy's own samples from the same states, noise seeded by the run seed
            gen = torch.Generator(device=self.device).manual_seed(1_000_003 * (seed + 1))
            rs = self.run_episodes(model, states, gen, sample=True)
            out["sampled_success_rate"] = int(round(float(rs.rewards_B.sum()))) / len(states)
            out.update(_success_interval("sampled_success", rs.rewards_B))
        if cfg.kl_teacher is not None:
            out.update(self.kl_to_teacher(model, task, cfg))
        if hasattr(task, "group_of"):
            groups: dict[str, list[float]] = {}
            for p, ok in zip(states, r.rewards_B.tolist()):
                groups.setdefault(task.group_of(p), []).append(ok)
            if len(groups) > 1 or getattr(task, "always_group", False):
                out["success_by_task"] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
        if isinstance(task, LiberoTask):  # split, protocol, per-task / per-suite success with Wilson 95% intervals
            out.update(task.success_report(states, r.rewards_B.tolist(), cfg.split))
        if out_dir is not None and cfg.grid > 0 and hasattr(task, "render_episodes"):
            path = Path(out_dir) / f"{tag}.gif"
            task.render_episodes(r.select(slice(0, cfg.grid)), path)
            out["video"] = str(path)
        return out

    @torch.no_grad()
    def kl_to_teacher(self, model: Any, task: Any, cfg: RobotEvalConfig) -> dict[str, float]:
        """Closed-form KL(model || teacher) and KL(teacher || model) per decision, averaged over a fixed set of
        teacher-visited states: the sampled episodes of `cfg.kl_teacher` from the first `cfg.kl_episodes`
        initial states of `cfg.kl_split` (noise from `cfg.kl_seed`), run once per adapter and kept."""
        key = json.dumps([cfg.kl_teacher, cfg.kl_split, cfg.kl_episodes, cfg.kl_seed], sort_keys=True)
        if key not in self._kl_states:
            teacher = self.tiny_policy(TinyPolicyConfig(**cfg.kl_teacher)).to(self.device).eval()
            states = task.problems(cfg.kl_split, cfg.kl_episodes, seed=cfg.kl_seed)
            gen = torch.Generator(device=self.device).manual_seed(cfg.kl_seed)
            visited = self.run_episodes(teacher, states, gen, sample=True)
            self._kl_states[key] = (visited, self.step_dist(teacher, visited))
        visited, teacher_dist = self._kl_states[key]
        d = self.step_dist(model, visited)
        m = visited.mask_B_T
        n = m.sum().clamp(min=1)
        try:
            reverse, forward = d.divergence(teacher_dist, 1.0), d.divergence(teacher_dist, 0.0)
        except ValueError as e:
            raise ConfigError(f"eval.kl_teacher: {e}") from e
        return {
            "kl_to_teacher_reverse": float((reverse * m).sum() / n),
            "kl_to_teacher_forward": float((forward * m).sum() / n),
            "kl_states": float(n),
        }

    # ------------------------------------------------------------------ datasets

    def record(
        self, model: Any, task: Any, problems: list, root: Path, repo_id: str, sample: bool = True, seed: int = 0
    ) -> dict[str, Any]:
        """Run one episode per problem and write them as a LeRobot dataset (modalities/robot/record.py).

        One frame per decision: the observation the policy saw and the action chunk it executed
        (`action` is `[K * A]`; with chunk_size 1 this is LeRobot's usual per-step format).
        """
        gen = torch.Generator(device=self.device).manual_seed(seed)
        r = self.run_episodes(model, problems, gen, sample=sample)
        obs = r.steps["obs"]
        language = obs.get("task") or [str(p) for p in problems]
        episodes = []
        for b in range(r.batch_size):
            n = int(r.mask_B_T[b].sum())
            ep: dict[str, Any] = {
                "state": obs["observation.state"][b, :n],
                "action": r.actions[b, :n],
                "task": language[b],
            }
            if "observation.images.image" in obs:
                ep["image"] = obs["observation.images.image"][b, :n]
            if "observation.environment_state" in obs:
                ep["env_state"] = obs["observation.environment_state"][b, :n]
            episodes.append(ep)
        chunk = int(getattr(unwrap(model), "chunk_size", 1))
        fps = max(1, round(getattr(task, "control_freq", 20) / chunk))
        record_lerobot_dataset(root, repo_id, fps, episodes, robot_type=getattr(task, "robot_type", None))
        return {
            "episodes": len(episodes),
            "frames": int(r.mask_B_T.sum()),
            "success_rate": float(r.rewards_B.mean()),
            "fps": fps,
            "root": str(root),
        }
