"""Data parallelism for the training loop, on top of the process group accelerate sets up.

Every rank draws the same global batch of problems from the step's seed, then rolls out only its own
shards of it.  A global batch is cut into `S` shards of whole prompt groups (`train.rollout_shards`,
default: the number of processes); shard `s` samples from its own generator, seeded from (seed, stage,
step, s), so a run's numbers depend on S and not on how many processes share the shards: one process
with S = 2 and two processes with S = 2 train the same model up to float summation order.  Losses are
normalised by the global step count (an all-reduce), and gradients are summed across ranks with one
all-reduce per optimizer step, so the update equals the one-process update on the whole batch.

    accelerate launch --multi_gpu --num_processes 2 -m mmdistill train configs/text/quickstart.yaml
    mmdistill train --num-processes 2 configs/text/quickstart.yaml
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist


def active(world: int) -> bool:
    return world > 1 and dist.is_available() and dist.is_initialized()


def local_shards(num_shards: int, world: int, rank: int) -> list[int]:
    """The shards rank `rank` rolls out: every world-th one, starting at its rank."""
    return [s for s in range(num_shards) if s % world == rank]


def all_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    """Element-wise sum of a list of floats over ranks (float64, so counts stay exact)."""
    if not active(world):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (a NaN on one rank skips the step everywhere)."""
    if not active(world):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_dicts(d: dict[str, float], world: int) -> dict[str, float]:
    """Key-wise sum of every rank's dict (keys missing on a rank count as 0), in rank 0's key order."""
    if not active(world):
        return d
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, d)
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def gather_tensor(x: torch.Tensor, world: int) -> torch.Tensor:
    """Rows of `x` from every rank, concatenated in rank order (rows may differ in number)."""
    if not active(world):
        return x
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, x.detach().cpu())
    return torch.cat(parts).to(x.device)


def broadcast(obj: Any, world: int) -> Any:
    """Rank 0's `obj` on every rank (evaluation results, the early-stop decision)."""
    if not active(world):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: int) -> None:
    if active(world):
        dist.barrier()


@torch.no_grad()
def broadcast_parameters(params: Iterable[torch.Tensor], world: int) -> None:
    """Every rank starts from rank 0's weights (they are equal by seed; this makes it a guarantee)."""
    if not active(world):
        return
    for p in params:
        dist.broadcast(p.data, src=0)


@torch.no_grad()
def sum_gradients(params: list[torch.Tensor], world: int) -> None:
    """Sum every parameter's gradient over ranks, one flat all-reduce per dtype.  A parameter no rank
    produced a gradient for keeps `grad = None`, as on one process (the optimizer then skips it)."""
    if not active(world):
        return
    device = params[0].device if params else torch.device("cpu")
    had_P = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=device)
    dist.all_reduce(had_P)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p, had in zip(params, had_P.tolist()):
        if had == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n
