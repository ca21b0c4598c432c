"""What a text rollout carries besides tensors (`Context`), and joining two rollouts (`cat_rollouts`).

A text `Rollout` has `steps = {"prompt_ids", "prompt_attn"}` (left-padded prompts), `actions` the
completion tokens (right-padded), and `context` a `Context`: the question texts, each problem's
routing tag and, for stored teacher rollouts, each sample's shard key.

    python -m pytest tests/test_text_adapter.py -q
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdistill.interfaces import Rollout


@dataclass
class Context:
    """What a text rollout was conditioned on."""

    questions: list[str]
    prompt_len: int  # P: prompts are left-padded to this length
    tags: list[str | None] | None = None  # each problem's routing tag (problem.meta["tag"]), for multi-teacher routing
    # each problem's stored-sample key (problem.meta["key"]), for stored-logits teachers
    keys: list[str | None] | None = None


def cat_rollouts(a: Rollout, b: Rollout, pad_id: int) -> Rollout:
    """Rows of `b` after rows of `a`: prompts re-left-padded, completions right-padded to a common length."""
    P = max(a.steps["prompt_ids"].shape[1], b.steps["prompt_ids"].shape[1])
    T = max(a.actions.shape[1], b.actions.shape[1])

    def left(x: Tensor, value: int) -> Tensor:
        return F.pad(x, (P - x.shape[1], 0), value=value)

    def right(x: Tensor, value: float) -> Tensor:
        return F.pad(x, (0, T - x.shape[1]), value=value)

    def both(fa: Any, fb: Any) -> Any:  # batch-major extras; per-step ones are right-padded
        if not (isinstance(fa, Tensor) and isinstance(fb, Tensor)) or fa.dim() == 0:
            return None
        if fa.dim() == 2 and fa.shape[1] == a.actions.shape[1] and fb.shape[1] == b.actions.shape[1]:
            return torch.cat([right(fa, 0), right(fb, 0)])
        return torch.cat([fa, fb]) if fa.shape[1:] == fb.shape[1:] else None

    def joined(xa: list | None, xb: list | None) -> list | None:
        return None if xa is None or xb is None else xa + xb

    ctx_a, ctx_b = a.context, b.context
    extras = {k: both(a.extras[k], b.extras[k]) for k in a.extras.keys() & b.extras.keys()}
    rewards = None if a.rewards_B is None or b.rewards_B is None else torch.cat([a.rewards_B, b.rewards_B])
    groups = None if a.group_ids_B is None or b.group_ids_B is None else torch.cat([a.group_ids_B, b.group_ids_B])
    return Rollout(
        context=Context(
            ctx_a.questions + ctx_b.questions, P, joined(ctx_a.tags, ctx_b.tags), joined(ctx_a.keys, ctx_b.keys)
        ),
        steps={
            "prompt_ids": torch.cat([left(a.steps["prompt_ids"], pad_id), left(b.steps["prompt_ids"], pad_id)]),
            "prompt_attn": torch.cat([left(a.steps["prompt_attn"], 0), left(b.steps["prompt_attn"], 0)]),
        },
        actions=torch.cat([right(a.actions, pad_id), right(b.actions, pad_id)]),
        mask_B_T=torch.cat([right(a.mask_B_T, 0.0), right(b.mask_B_T, 0.0)]),
        behavior_logp_B_T=torch.cat([right(a.behavior_logp_B_T, 0.0), right(b.behavior_logp_B_T, 0.0)]),
        rewards_B=rewards,
        group_ids_B=groups,
        extras={k: v for k, v in extras.items() if v is not None},
    )
