"""A new objective, adapter and task written outside the package, each one file, plug into the
loop through the contract in `mmdistill.interfaces` without touching a core file.

    python -m pytest tests/test_extension.py -q
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OBJECTIVE_FILE = '''
"""REINFORCE on a one-step bandit: loss -(r - mean r) log pi(a)."""
import random

import torch

from mmdistill.interfaces import Needs, ObjectiveBatch, Rollout, RolloutRequest
from mmdistill.registry import OBJECTIVES


@OBJECTIVES.register("toy_reinforce")
class ToyReinforce:
    """REINFORCE with a batch-mean baseline (test objective)."""

    temperature = 1.0

    def __init__(self, coef: float = 1.0):
        if coef <= 0:
            raise ValueError(f"objective.coef must be > 0, got {coef}")
        self.coef = coef
        self.needs = Needs(rewards=True, sampled_actions=True)

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        return RolloutRequest(source="student")

    def prepare(self, rollout: Rollout) -> Rollout:
        rollout.extras["advantage_B"] = rollout.rewards_B - rollout.rewards_B.mean()
        return rollout

    def __call__(self, b: ObjectiveBatch):
        logp_B_T = b.student.log_prob(b.rollout.actions)
        adv_B = b.rollout.extras["advantage_B"]
        loss = -self.coef * (adv_B[:, None] * logp_B_T * b.rollout.mask_B_T).sum() / b.normalizer
        return loss, {"reward": float(b.rollout.rewards_B.mean())}
'''

ADAPTER_FILE = '''
"""A K-armed bandit 'modality': the model is a logit vector; arm `target` pays 1."""
import dataclasses
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmdistill.interfaces import AdapterSpec, Rollout, RolloutRequest
from mmdistill.registry import ADAPTERS, TASKS
from mmdistill.stepdist import Categorical


@dataclasses.dataclass
class BanditRollout:
    group_size: int = 1
    temperature: float = 1.0


@dataclasses.dataclass
class BanditEval:
    n: int = 1
    split: str = "test"


@dataclasses.dataclass
class TinyBandit:
    arms: int = 4


@TASKS.register("toy_bandit")
class BanditTask:
    """Pull the paying arm."""

    def __init__(self, target: int = 2):
        self.target = target

    def problems(self, split, n=None, seed=0):
        return [self.target] * (n or 1)

    def sample_train(self, rng: random.Random):
        return self.target

    def summary(self) -> str:
        return f"bandit, arm {self.target} pays"


class Bandit(torch.nn.Module):
    def __init__(self, arms: int):
        super().__init__()
        self.logits_K = torch.nn.Parameter(torch.zeros(arms))


@ADAPTERS.register("toy_bandit")
class BanditAdapter:
    """Logit-vector policies (test adapter)."""

    spec = AdapterSpec(rollout_config=BanditRollout, eval_config=BanditEval, tiny_config=TinyBandit,
                       needs_tokenizer=False, default_task="toy_bandit")

    def __init__(self, tokenizer=None, device="cpu", chunk_size=1024):
        self.device, self.chunk_size = torch.device(device), chunk_size

    @staticmethod
    def claims_checkpoint(path: str) -> bool:
        return (Path(path) / "bandit.safetensors").is_file()

    @staticmethod
    def check_checkpoint(path: str, name: str) -> None:
        pass

    @staticmethod
    def build_tokenizer(cfg, task, models):
        return None

    @staticmethod
    def load_tokenizer(path: str):
        return None

    @staticmethod
    def check_tokenizer_of(path, tokenizer, name, compare_chat_template=True) -> None:
        pass

    def bind(self, task) -> None:
        pass

    def load_model(self, cfg, name="model"):
        if cfg.tiny is not None:
            return Bandit(cfg.tiny.arms).to(self.device)
        state = load_file(str(Path(cfg.path) / "bandit.safetensors"))
        model = Bandit(state["logits_K"].shape[0])
        model.load_state_dict(state)
        return model.to(self.device)

    def prune_layers(self, model, keep_layers, lora=None, name="model"):
        raise ValueError("bandits have no layers")

    def add_lora(self, model, lora):
        raise ValueError("bandits have no LoRA")

    def save(self, model, out_dir: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(Path(out_dir) / "bandit.safetensors"))

    def unwrap(self, model):
        return model

    def rollout(self, request: RolloutRequest, student, teacher, task, problems, gen) -> Rollout:
        B = len(problems)
        logits_B_1_K = student.logits_K.detach().expand(B, 1, -1) / request.settings.temperature
        actions_B_1 = torch.multinomial(logits_B_1_K[:, 0].softmax(-1), 1, generator=gen)
        mask = torch.ones(B, 1)
        behavior = Categorical(logits_B_1_K, mask).log_prob(actions_B_1)
        rewards_B = (actions_B_1[:, 0] == torch.tensor(problems)).float()
        return Rollout(context=list(problems), steps=None, actions=actions_B_1, mask_B_T=mask,
                       behavior_logp_B_T=behavior, rewards_B=rewards_B)

    def step_dist(self, model, rollout, temperature=1.0):
        B = rollout.batch_size
        return Categorical(model.logits_K.expand(B, 1, -1), rollout.mask_B_T, temperature)

    def dist_metrics(self, dist, rollout):
        return {"entropy": float(dist.entropy().detach().mean())}

    def stage_fingerprint(self, model) -> str:
        import hashlib

        return hashlib.sha256(model.logits_K.detach().numpy().tobytes()).hexdigest()

    def evaluate(self, model, task, cfg, seed=0, out_dir=None, tag="eval", show=3):
        target = task.problems(cfg.split, cfg.n)[0]
        return {"n": cfg.n, "accuracy": float(model.logits_K.argmax() == target),
                "p_target": float(model.logits_K.softmax(-1)[target])}
'''


def test_new_objective_and_adapter_train_one_step(tmp_path):
    pkg = tmp_path / "myext"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "toy_objective.py").write_text(textwrap.dedent(OBJECTIVE_FILE))
    (pkg / "toy_bandit.py").write_text(textwrap.dedent(ADAPTER_FILE))
    before = subprocess.run(
        ["git", "status", "--porcelain", "mmdistill"], cwd=ROOT, capture_output=True, text=True
    ).stdout

    sys.path.insert(0, str(tmp_path))
    try:
        importlib.import_module("myext.toy_objective")
        importlib.import_module("myext.toy_bandit")
        from mmdistill.config import config_from_raw
        from mmdistill.pipeline import run_pipeline

        cfg = config_from_raw(
            {
                "run_dir": str(tmp_path / "run"),
                "device": "cpu",
                "adapter": "toy_bandit",
                "task": {"type": "toy_bandit", "target": 2},
                "models": {"student": {"tiny": {"arms": 4}}},
                "stages": [
                    {
                        "name": "pg",
                        "student": "student",
                        "objective": {"type": "toy_reinforce", "coef": 1.0},
                        "train": {"steps": 1, "batch_size": 64, "lr": 0.5, "log_every": 1},
                    }
                ],
            }
        )
        report = run_pipeline(cfg, quiet=True)
    finally:
        sys.path.remove(str(tmp_path))
        for m in [m for m in sys.modules if m.startswith("myext")]:
            del sys.modules[m]

    # one REINFORCE step from uniform logits raises the paying arm's probability above 1/4
    assert report["stages"]["pg"]["p_target"] > 0.25
    assert (tmp_path / "run" / "pg" / "final" / "bandit.safetensors").is_file()
    assert '"entropy"' in (tmp_path / "run" / "pg" / "metrics.jsonl").read_text()
    assert len(report["stages"]["pg"]["weights_sha256"]) == 64
    after = subprocess.run(
        ["git", "status", "--porcelain", "mmdistill"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert before == after, "the extension touched a core file"
