"""The shared on-policy rollout type: one batch of experience, any modality.

A rollout is what every objective sees.  Text, robot and image adapters all
fill the same fields; only `context` and `steps` are modality specific.

    python -c "from mmdistill.rollout import Rollout; help(Rollout)"
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rollout:
    """One batch of on-policy experience.

    context:            what the episode was conditioned on (prompts, captions, observations)
    steps:              what the adapter needs to re-score each step (for text: the token ids)
    actions:            the actions taken (tokens_B_T for text)
    mask_B_T:           1.0 where a step is trained (completion tokens before and at EOS)
    behavior_logp_B_T:  log-prob of each action under the policy that sampled it
    rewards_B:          verifier / simulator / reward-model scores, if any
    group_ids_B:        rollouts of the same context share an id (GRPO-style groups)
    extras:             adapter specific tensors (attention masks, decoded texts, ...)
    """

    context: Any
    steps: Any
    actions: Tensor
    mask_B_T: Tensor
    behavior_logp_B_T: Tensor
    rewards_B: Tensor | None = None
    group_ids_B: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.actions.shape[0])

    def num_steps(self) -> int:
        """Number of trained steps (the token count for text)."""
        return int(self.mask_B_T.sum().item())

    def with_rewards(self, rewards_B: Tensor) -> "Rollout":
        return replace(self, rewards_B=rewards_B)

    def select(self, sl: "slice | Tensor") -> "Rollout":
        """Rows `sl` (a slice, or a 1-D tensor of row indices) of the batch: micro-batches, routed sub-batches."""
        B = self.batch_size
        return Rollout(**{f: _take(getattr(self, f), sl, B) for f in self.__dataclass_fields__})

    def teacher_view(self) -> "Rollout":
        """The rollout as the teacher sees it: the same actions after another context when the adapter
        stored one in `extras["teacher_steps"]` (privileged context: OPSD), else the rollout itself."""
        if "teacher_steps" not in self.extras:
            return self
        return replace(self, steps=self.extras["teacher_steps"])

    def to(self, device: torch.device | str) -> "Rollout":
        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, Tensor) else x

        return replace(
            self,
            steps=move(self.steps),
            actions=move(self.actions),
            mask_B_T=move(self.mask_B_T),
            behavior_logp_B_T=move(self.behavior_logp_B_T),
            rewards_B=move(self.rewards_B),
            group_ids_B=move(self.group_ids_B),
            extras={k: move(v) for k, v in self.extras.items()},
        )


def _take(x: Any, sl: slice, B: int) -> Any:
    """Slice every batch-major thing inside x: tensors and lists of length B, dicts, dataclasses."""
    if isinstance(x, Tensor):
        return x[sl] if x.dim() > 0 and x.shape[0] == B else x
    if isinstance(x, list) and len(x) == B:
        return [x[i] for i in sl.tolist()] if isinstance(sl, Tensor) else x[sl]
    if isinstance(x, dict):
        return {k: _take(v, sl, B) for k, v in x.items()}
    if hasattr(x, "__dataclass_fields__") and not isinstance(x, type):
        return replace(x, **{f: _take(getattr(x, f), sl, B) for f in x.__dataclass_fields__})
    return x


@dataclass
class TeacherGuidance:
    """What an objective asks the adapter for besides the student's rollout: teacher rollouts
    appended to the batch (BRTS: always, the best of `n`; AMPO: only for prompts where every
    student rollout failed).  Candidates rank correct first, then by the student's mean
    log-prob of them; the top `keep` join their prompt's group, flagged extras["from_teacher_B"]."""

    n: int = 2  # teacher samples per chosen prompt
    keep: int = 1  # how many of them join the batch
    when: str = "always"  # "always" or "all_failed"
    threshold: float = 0.5  # reward that counts as correct
    only_correct: bool = False  # drop selected teacher rollouts that are wrong

    def __post_init__(self) -> None:
        if self.when not in ("always", "all_failed"):
            raise ValueError(f"objective: teacher guidance `when` must be 'always' or 'all_failed', got {self.when!r}")
        if not 1 <= self.keep <= self.n:
            raise ValueError(f"objective: keep={self.keep} teacher rollouts must lie in 1..n={self.n}")


def select_guidance(correct_G_n: Tensor, align_G_n: Tensor, keep: int, only_correct: bool = False) -> list[list[int]]:
    """For each of G prompts, the indices (into its n candidates) of the `keep` teacher rollouts
    to use: correct ones first, ties broken by the student's alignment (higher first)."""
    picked = []
    for correct_n, align_n in zip(correct_G_n.bool().tolist(), align_G_n.tolist()):
        order = sorted(range(len(correct_n)), key=lambda i: (not correct_n[i], -align_n[i]))[:keep]
        picked.append([i for i in order if correct_n[i] or not only_correct])
    return picked
