"""Prompt groups: the rollouts of one prompt share a `group_ids_B` id (docs/objectives.md).

Plain helpers for the objectives that read verifier rewards and normalise over whole groups
(SCOPE, KEPO, SOD, Uni-OPD): teaching errors when a rollout lacks rewards or group ids, and the
whole-group check.  SCOPE and Uni-OPD normalise over whole prompt groups, so each micro-batch
must hold whole groups: `train.micro_batch_size` a multiple of `rollout.group_size`.  `prepare`
records every row's full group size before micro-batching; `check_whole_groups` compares.

    python -m pytest tests/test_objectives_text_methods.py -q -k groups
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from mmdistill.interfaces import ObjectiveBatch, Rollout
from mmdistill.objectives.opd import sampled_logps

__all__ = ["rewards_of", "group_ids_of", "with_group_sizes", "check_whole_groups", "whole_group_loss"]


def rewards_of(r: Rollout, name: str) -> Tensor:
    """The verifier rewards `[B]`, or an error naming the objective."""
    if r.rewards_B is None:
        raise ValueError(
            f"objective '{name}' needs verifier rewards but the rollout has none; use a task with a verifier"
        )
    return r.rewards_B


def group_ids_of(r: Rollout, name: str) -> Tensor:
    """The group ids `[B]`, or an error naming the objective."""
    if r.group_ids_B is None:
        raise ValueError(f"objective '{name}' needs rollout.group_ids_B (rollouts of one prompt share an id)")
    return r.group_ids_B


def with_group_sizes(rollout: Rollout, name: str) -> Rollout:
    """Before micro-batching: the rollout with `extras["group_size_B"]`, how many rollouts each row's group has."""
    ids_B = group_ids_of(rollout, name)
    _, group_B, count_G = torch.unique(ids_B, return_inverse=True, return_counts=True)
    return replace(rollout, extras={**rollout.extras, "group_size_B": count_G[group_B]})


def check_whole_groups(r: Rollout, name: str) -> None:
    """Raise if this micro-batch holds only part of a prompt group."""
    if "group_size_B" not in r.extras:  # called without prepare(): the batch is the whole rollout
        return
    _, group_B, count_G = torch.unique(group_ids_of(r, name), return_inverse=True, return_counts=True)
    here_B, full_B = count_G[group_B], r.extras["group_size_B"].to(count_G.device)
    if not torch.equal(here_B, full_B):
        raise ValueError(
            f"objective '{name}' normalises over whole prompt groups, but a micro-batch holds {int(here_B.min())} of "
            f"{int(full_B.max())} rollouts of a group; set train.micro_batch_size to a multiple of rollout.group_size"
        )


def whole_group_loss(
    b: ObjectiveBatch, name: str, reward_threshold: float, loss_fn: Any, **hyper: Any
) -> tuple[Tensor, dict[str, float]]:
    """`loss_fn(logp, behavior, teacher, mask, correct_B, group_ids_B, normalizer=..., **hyper)` on a micro-batch
    of whole prompt groups (SCOPE, Uni-OPD), with the mean reward added to its metrics."""
    r = b.rollout
    check_whole_groups(r, name)
    correct_B = rewards_of(r, name) >= reward_threshold
    logp_B_T, teacher_logp_B_T = sampled_logps(b)
    loss, metrics = loss_fn(
        logp_B_T,
        r.behavior_logp_B_T,
        teacher_logp_B_T,
        r.mask_B_T,
        correct_B,
        group_ids_of(r, name),
        normalizer=b.normalizer,
        **hyper,
    )
    metrics["reward"] = float(r.rewards_B.float().mean())
    return loss, metrics
