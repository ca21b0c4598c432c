"""The `stored_logits` teacher kind ("Lightning OPD: Efficient Post-Training for Large Reasoning Models with
Offline On-Policy Distillation", arXiv 2604.13010; docs/objectives.md section 8.13): a teacher that is its stored
top-k log-probs, written once by a `precompute` stage, so no teacher model is loaded while the
student trains.  It scores only the states it stored, i.e. its own completions, so the stage trains
on them: `objective: {type: reverse_kl, source: dataset}` over a `teacher_shards` task of the same
shards.  The ordinary divergence objectives score the `TopKCategorical` it yields.

    models:
      teacher_stored:
        kind: stored_logits
        path: runs/lightning_opd/teacher_logprobs/shards        # the precompute stage's output
        options: {checkpoint: runs/lightning_opd/teacher_sft/final}   # teacher consistency (optional)

Checked when it loads: the manifest is complete (each sample's sha256; damaged samples are kept
aside and refused by name if a rollout asks for one), the run's tokenizer is the one the shards were
written with, and (`options.checkpoint`) that checkpoint's sha256 is the teacher that wrote them.
Checked when it scores: every row is a stored sample (`problem.meta["key"]`) whose completion the
rollout reproduces token for token, at the shards' `score_temperature`.

    mmdistill train configs/text/lightning_opd.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmdistill.config import ModelConfig, from_dict
from mmdistill.errors import CheckpointError, CompatibilityError, ConfigError
from mmdistill.interfaces import Rollout
from mmdistill.modalities.text import shards
from mmdistill.modalities.text.config import StoredLogitsOptions
from mmdistill.modalities.text.precompute import local_checkpoint
from mmdistill.modalities.text.rollouts import Context
from mmdistill.stepdist import TopKCategorical


class StoredLogitsTeacher(torch.nn.Module):
    """Stored teacher top-k + tail per token, by sample key; no weights (a module only so that the
    loop can call `.eval()` / `.requires_grad_(False)` / `.to()` on it like any teacher)."""

    def __init__(
        self, shards_dir: Path, manifest: dict, samples: dict[str, dict[str, np.ndarray]], name: str = "teacher"
    ):
        super().__init__()
        self.shards_dir, self.manifest, self.samples, self.name = Path(shards_dir), manifest, samples, name
        self.damaged: dict[str, shards.Damage] = {}  # samples whose stored bytes fail their check, by key

    @classmethod
    def load(cls, cfg: ModelConfig, adapter: Any, name: str = "teacher") -> StoredLogitsTeacher:
        """The shards at `cfg.path`, checked against the run's tokenizer and `cfg.options.checkpoint`."""
        where = f"models.{name}"
        opt = from_dict(StoredLogitsOptions, dict(cfg.options), f"{where}.options")
        if cfg.path is None:
            raise ConfigError(
                f"{where}.path: a stored_logits teacher reads the shards a precompute stage wrote; set path to that directory"
            )
        if cfg.lora is not None:
            raise ConfigError(f"{where}.lora: a stored_logits teacher has no weights; remove lora")
        m = shards.read_manifest(Path(cfg.path), f"{where}.path")
        if shards.tokenizer_hash(adapter.tokenizer) != m["tokenizer_hash"]:
            raise CompatibilityError(
                f"{where}.path: the shards in {cfg.path} were written with another tokenizer (ids would mean other tokens); "
                "re-run the precompute stage in this run"
            )
        if opt.checkpoint is not None:
            ours = shards.checkpoint_hash(local_checkpoint(opt.checkpoint, None, f"{where}.options.checkpoint"))
            if ours != m["teacher_hash"]:
                raise CompatibilityError(
                    f"{where}.options.checkpoint: '{opt.checkpoint}' (sha256 {ours[:12]}) is not the teacher that wrote {cfg.path} "
                    f"('{m['teacher']}', sha256 {m['teacher_hash'][:12]}); name that checkpoint or re-run the precompute stage with this one"
                )
        good, bad = shards.read_shards(Path(cfg.path), m)  # the task decides whether damage stops the run
        teacher = cls(Path(cfg.path), m, {key: arrays for key, _, arrays in good}, name)
        teacher.damaged = {d.key: d for d in bad}
        return teacher

    def cannot_generate(self) -> CompatibilityError:
        return CompatibilityError(
            f"models.{self.name} is a stored_logits teacher: it holds top-k log-probs of its own completions and cannot "
            "generate; use it only as the teacher of a divergence objective with source: dataset on a teacher_shards task"
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise self.cannot_generate()

    def fingerprint(self) -> str:
        """The sha256 of the teacher checkpoint that wrote the shards."""
        return self.manifest["teacher_hash"]

    @torch.no_grad()
    def step_dist(self, adapter: Any, rollout: Rollout, temperature: float = 1.0) -> TopKCategorical:
        """The stored top-k + tail of every trained step of the rollout's rows (looked up by sample key)."""
        where = f"models.{self.name}"
        stored_t = self.manifest["score_temperature"]
        if abs(temperature - stored_t) > 1e-9:
            raise ConfigError(
                f"{where}: the shards in {self.shards_dir} hold log-probs at score_temperature {stored_t}, but the objective scores "
                f"at temperature {temperature}; set the objective's temperature to {stored_t} (or re-run the precompute stage)"
            )
        keys = rollout.context.keys if isinstance(rollout.context, Context) else None
        if keys is None or any(k is None for k in keys):
            raise CompatibilityError(
                f"{where} is a stored_logits teacher: it scores only its own stored completions; train with objective "
                f"source: dataset on a task of type teacher_shards over {self.shards_dir}"
            )
        mask_B_T = rollout.mask_B_T
        lens = mask_B_T.sum(1).long().tolist()
        rows = []
        for b, (key, n) in enumerate(zip(keys, lens)):
            s = self.samples.get(key)
            if key in self.damaged:
                raise CheckpointError(
                    shards.damage_line(self.shards_dir, self.manifest, [self.damaged[key]], "task.damaged")
                )
            if s is None:
                raise CompatibilityError(
                    f"{where}: the rollout's sample {key!r} is not in {self.shards_dir}; point the task's shards and "
                    f"{where}.path at the same precompute output"
                )
            ids = rollout.actions[b, :n].cpu()
            if n != len(s["completion_ids"]) or not torch.equal(ids, torch.from_numpy(s["completion_ids"]).long()):
                raise CompatibilityError(
                    f"{where}: row {b} (sample {key!r}) is not the completion stored in {self.shards_dir}; the teacher scores "
                    "only its own stored completions (objective source: dataset on the same shards)"
                )
            rows.append(s)
        device = mask_B_T.device
        K = int(self.manifest["k"])

        def cat(name: str, dtype: torch.dtype, tail: tuple = ()) -> torch.Tensor:
            parts = [r[name] for r in rows]
            flat = np.concatenate(parts) if parts else np.zeros((0, *tail))
            return torch.from_numpy(flat).to(device=device, dtype=dtype)

        return TopKCategorical(
            cat("topk_idx", torch.long, (K,)),
            cat("topk_logp", torch.float32, (K,)),
            cat("tail_logp", torch.float32),
            mask_B_T,
        )
