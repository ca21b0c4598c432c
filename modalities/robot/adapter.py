"""The `robot_policy` adapter: students act in the environment, teachers score the visited states.

A rollout runs one episode per row (vectorised over rows; finished episodes are masked), with
`steps = {"obs_B_T_O": ...}`, `actions [B, T, A]`, `mask_B_T` (steps taken), behaviour log-probs
and `rewards_B` = success.  Re-scoring (`step_dist`) gives each policy's `Gaussian` on those
observations: the student's with gradient, the teacher's without (teacher actions are never
executed in a student rollout).  Evaluation runs the policy's mean action from every evaluation
initial state and reports the success rate and the policy's entropy.

    mmdistill train configs/vla/pointmass_opd.yaml
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mmdistill.config import LoraConfig, ModelConfig, TokenizerConfig
from mmdistill.errors import CheckpointError, CompatibilityError, ConfigError
from mmdistill.modalities.robot.policies import GaussianMLPPolicy, ScriptedReachExpert
from mmdistill.registry import ADAPTERS
from mmdistill.rollout import Rollout
from mmdistill.stepdist import Gaussian

POLICIES = {"gaussian_mlp": GaussianMLPPolicy, "scripted_reach": ScriptedReachExpert}


@dataclass
class TinyPolicyConfig:
    """A policy built from this section: a Gaussian MLP student or the scripted expert."""

    kind: Literal["gaussian_mlp", "scripted_reach"] = "gaussian_mlp"
    hidden: int = 64
    layers: int = 2
    init_log_std: float = -0.5
    gain: float = 10.0  # scripted expert
    std: float = 0.1  # scripted expert
    seed: int = 0


def _concat(parts: list[Rollout]) -> Rollout:
    """Rollouts of the same horizon, stacked along the batch."""
    if len(parts) == 1:
        return parts[0]
    return Rollout(
        context=[c for p in parts for c in p.context],
        steps={"obs_B_T_O": torch.cat([p.steps["obs_B_T_O"] for p in parts])},
        actions=torch.cat([p.actions for p in parts]), mask_B_T=torch.cat([p.mask_B_T for p in parts]),
        behavior_logp_B_T=torch.cat([p.behavior_logp_B_T for p in parts]), rewards_B=torch.cat([p.rewards_B for p in parts]),
    )


def unwrap(model: Any) -> Any:
    while hasattr(model, "module"):
        model = model.module
    return model


@ADAPTERS.register("robot_policy")
class RobotPolicyAdapter:
    tiny_config = TinyPolicyConfig
    needs_tokenizer = False

    def __init__(self, tokenizer: Any = None, device: torch.device | str = "cpu", chunk_size: int = 1024):
        self.device = torch.device(device)
        self.chunk_size = chunk_size
        self.task: Any = None  # set by `bind`: the environment factory and action dimension
        self._pool: Any = None  # worker processes, when the task asks for them

    @staticmethod
    def build_tokenizer(cfg: TokenizerConfig, task: Any, models: dict[str, ModelConfig]) -> None:
        return None  # state-based policies have no tokenizer

    @staticmethod
    def check_checkpoint(path: str, name: str) -> None:
        """Pre-flight: a policy directory written by a robot_policy stage (config.json naming a known kind)."""
        p = Path(path)
        if not (p / "config.json").is_file():
            raise CheckpointError(f"models.{name}.path: '{path}' has no config.json; give a directory written by a robot_policy stage")
        kind = json.loads((p / "config.json").read_text()).get("kind")
        if kind not in POLICIES:
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
            else:
                model = GaussianMLPPolicy(obs_dim, action_dim, t.hidden, t.layers, t.init_log_std)
            return model.to(self.device)
        path = Path(cfg.path)
        self.check_checkpoint(str(path), name)
        conf = json.loads((path / "config.json").read_text())
        kind = conf.pop("kind")
        model = POLICIES[kind](**conf)
        if (path / "model.safetensors").exists():
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(path / "model.safetensors")))
        if getattr(model, "config", {}).get("action_dim", action_dim) != action_dim or getattr(model, "config", {}).get("obs_dim", obs_dim) != obs_dim:
            raise CompatibilityError(
                f"models.{name}: policy for obs {model.config.get('obs_dim')} / action {model.config.get('action_dim')} dims, "
                f"the environment has {obs_dim} / {action_dim}; teacher, student and environment must agree"
            )
        return model.to(self.device)

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        from safetensors.torch import save_file

        m = unwrap(model)
        out_dir = Path(out_dir)
        (out_dir / "config.json").write_text(json.dumps(m.config, indent=1))
        state = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
        if state:
            save_file(state, str(out_dir / "model.safetensors"))

    # ------------------------------------------------------------------ rollouts

    @torch.no_grad()
    def run_episodes(self, model: Any, init_states: list[int], gen: torch.Generator | None, sample: bool = True) -> Rollout:
        """One episode per initial state, batched over episodes.  With `task.num_workers > 0` the
        environments run in worker processes (`vec.EnvPool`), in chunks of that many episodes; a
        chunk whose worker crashed is rerun from its initial states with the same policy noise."""
        workers = int(getattr(self.task, "num_workers", 0) or 0)
        # the policy noise of every episode is drawn up front, so chunking and reruns change nothing
        eps_B_T_A = None
        if sample:
            eps_B_T_A = torch.randn(len(init_states), self.task.max_steps, self.task.action_dim, generator=gen, device=self.device)
        if workers <= 0:
            return self._episodes(model, init_states, eps_B_T_A, None)
        from mmdistill.modalities.robot.vec import EnvPool, WorkerCrashed

        if self._pool is None or len(self._pool.workers) != workers:
            self._pool = EnvPool(self.task.make_env, workers)
        parts = []
        for i in range(0, len(init_states), workers):
            chunk = init_states[i : i + workers]
            eps = eps_B_T_A[i : i + workers] if eps_B_T_A is not None else None
            for attempt in range(3):
                try:
                    parts.append(self._episodes(model, chunk, eps, self._pool))
                    break
                except WorkerCrashed as e:
                    if attempt == 2:
                        raise
                    print(f"[robot] {e}")
        return _concat(parts)

    def _episodes(self, model: Any, init_states: list[int], eps_B_T_A: Tensor | None, pool: Any) -> Rollout:
        """Episodes from `init_states`; actions `mean + std * eps` (the mode when eps is None)."""
        if pool is None:
            envs = [self.task.make_env() for _ in init_states]
            obs = np.stack([e.reset(i) for e, i in zip(envs, init_states)])
        else:
            obs = pool.reset(init_states)
        T = self.task.max_steps
        B, O, A = len(init_states), obs.shape[1], self.task.action_dim
        obs_B_T_O = torch.zeros(B, T, O, device=self.device)
        act_B_T_A = torch.zeros(B, T, A, device=self.device)
        mask_B_T = torch.zeros(B, T, device=self.device)
        logp_B_T = torch.zeros(B, T, device=self.device)
        alive = np.ones(B, bool)
        success = np.zeros(B, np.float32)
        policy = unwrap(model)
        for t in range(T):
            if not alive.any():
                break
            o = torch.as_tensor(obs, device=self.device).view(B, 1, O)
            d = policy.dist(o, torch.ones(B, 1, device=self.device))
            if eps_B_T_A is not None:
                a = d.mean_B_T_D + d.std_B_T_D * eps_B_T_A[:, t : t + 1]
            else:
                a = d.mode()
            lp = d.log_prob(a)
            keep = torch.as_tensor(alive, device=self.device, dtype=torch.float32)
            obs_B_T_O[:, t], act_B_T_A[:, t], mask_B_T[:, t], logp_B_T[:, t] = o[:, 0], a[:, 0], keep, lp[:, 0] * keep
            a_np = a[:, 0].cpu().numpy()
            live = [int(b) for b in np.flatnonzero(alive)]
            if pool is None:
                results = {b: envs[b].step(a_np[b]) for b in live}
                results = {b: (o_, r_, d_, i_["success"]) for b, (o_, r_, d_, i_) in results.items()}
            else:
                results = pool.step(a_np, active=live)
            for b, (ob, _, done, ok) in results.items():
                obs[b] = ob
                if ok:
                    success[b] = 1.0
                alive[b] = not done
        return Rollout(
            context=list(init_states), steps={"obs_B_T_O": obs_B_T_O}, actions=act_B_T_A, mask_B_T=mask_B_T,
            behavior_logp_B_T=logp_B_T, rewards_B=torch.as_tensor(success, device=self.device),
        )

    def rollout(self, source: str, student: Any, teacher: Any, task: Any, problems: list, rc: Any, gen: Any, objective: Any = None) -> Rollout:
        """Episodes from training initial states, acted by the student (or by the teacher, for warm-up)."""
        if source == "dataset":
            raise ConfigError("robot tasks have no dataset actions; warm up with objective sft and source: teacher")
        return self.run_episodes(student if source == "student" else teacher, list(problems), gen, sample=True)

    def step_dist(self, model: Any, rollout: Rollout, temperature: float = 1.0) -> Gaussian:
        return unwrap(model).dist(rollout.steps["obs_B_T_O"], rollout.mask_B_T)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model: Any, task: Any, cfg: Any, seed: int = 0, out_dir: Path | None = None, tag: str = "eval") -> dict[str, Any]:
        """Success rate of the mean action from every evaluation initial state, and the entropy of the
        policy's Gaussian at the visited states."""
        states = task.problems(cfg.split, cfg.n, seed=seed)
        r = self.run_episodes(model, states, None, sample=False)
        d = self.step_dist(model, r)
        n_steps = r.mask_B_T.sum().clamp(min=1)
        out: dict[str, Any] = {"n": len(states), "success_rate": float(r.rewards_B.mean()), "entropy": float(d.entropy().sum() / n_steps)}
        if out_dir is not None and cfg.grid > 0 and hasattr(task, "render_episodes"):
            path = Path(out_dir) / f"{tag}.gif"
            task.render_episodes(r.steps["obs_B_T_O"][: cfg.grid].cpu().numpy(), r.mask_B_T[: cfg.grid].cpu().numpy(),
                                 r.rewards_B[: cfg.grid].cpu().numpy(), path)
            out["video"] = str(path)
        return out
