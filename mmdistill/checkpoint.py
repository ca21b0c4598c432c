"""Atomic checkpoints and exact resume.

A training checkpoint is a directory `step_NNNNNN/` holding the model
(safetensors), optimizer and scheduler states, RNG states and the data
position.  It is written under a temporary name and renamed into place, and
`latest.txt` is replaced atomically after it, so a run killed at any moment
leaves either the previous checkpoint or the new one, never half of one.

    mmdistill train --resume runs/quickstart
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmdistill.errors import CheckpointError


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_dir(final: Path):
    """Context manager: yields a temporary directory that is renamed to `final` on success."""
    return _AtomicDir(Path(final))


class _AtomicDir:
    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp")

    def __enter__(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _fsync_tree(self.tmp)
        if self.final.exists():  # replacing an older copy: move it away first, then drop it
            old = self.final.with_name(f".{self.final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    keep: int = 2,
    staged: list[Path] | tuple[Path, ...] = (),
) -> Path:
    """Write `ckpt_root/step_NNNNNN` atomically, point latest.txt at it, prune old ones.  `staged` files
    (each rank's replay buffer, see `stage_replay`) are moved inside before the rename."""
    final = Path(ckpt_root) / f"step_{step:06d}"
    with atomic_dir(final) as tmp:
        for f in staged:
            os.replace(f, tmp / f.name.split("_", 2)[-1])  # .replay_NNNNNN_rankR.pt -> rankR.pt
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(_dedupe_shared(state), str(tmp / "model.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
            tmp / "trainer_state.pt",
        )
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=1))
    atomic_write_text(Path(ckpt_root) / "latest.txt", final.name)
    old = sorted(p for p in Path(ckpt_root).glob("step_*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): clone the duplicates."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = Path(ckpt_root) / "latest.txt"
    if not pointer.exists():
        return None
    path = Path(ckpt_root) / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise CheckpointError(
            f"{pointer} points at '{path.name}', which is missing or incomplete; delete {pointer} to restart the stage"
        )
    return path


def load_training_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    try:
        weights = load_file(str(path / "model.safetensors"))
        trainer = torch.load(path / "trainer_state.pt", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except Exception as e:  # noqa: BLE001 - any failure here means a corrupt checkpoint
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"delete it and its latest.txt entry to resume from the one before"
        ) from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = _not_tied(model, missing, weights)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return state


def _not_tied(model: torch.nn.Module, missing: list[str], loaded: dict[str, torch.Tensor]) -> list[str]:
    """The missing keys that are not tied to a loaded one (a tied LM head shares the embedding's storage)."""
    state = model.state_dict()
    loaded_ptrs = {state[k].untyped_storage().data_ptr() for k in loaded if k in state}
    return [m for m in missing if state[m].untyped_storage().data_ptr() not in loaded_ptrs]


def stage_replay(ckpt_root: Path, step: int, replay: list[tuple[str, Any]], rank: int) -> Path:
    """Write this rank's replay buffer ((tag, Rollout) pairs) beside the checkpoint about to be saved;
    `save_training_state` moves it inside, so a checkpoint and its buffer appear together or not at all."""
    path = Path(ckpt_root) / f".replay_{step:06d}_replay-rank{rank}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(list(replay), tmp)
    os.replace(tmp, path)
    return path


def staged_replay_files(ckpt_root: Path, step: int, world: int) -> list[Path]:
    return [Path(ckpt_root) / f".replay_{step:06d}_replay-rank{r}.pt" for r in range(world)]


def load_replay(path: Path, world: int, rank: int) -> list[tuple[str, Any]]:
    """The replay chunks this rank holds: those of its shards (tag "STEP" or "STEP/SHARD", shard s on rank
    s % world), from every saved rank's file, so a run resumes at another process count.  The files are the
    run's own pickles (Rollouts hold arbitrary contexts), written by `stage_replay`."""
    chunks: list[tuple[str, Any]] = []
    files = sorted(Path(path).glob("replay-rank*.pt"))
    if not files:
        raise CheckpointError(
            f"checkpoint {path} has no replay buffer but train.replay_rounds > 0; it was saved without replay: "
            "resume with the replay_rounds it was trained with, or delete the checkpoints to restart the stage"
        )
    for f in files:
        chunks += torch.load(f, weights_only=False)  # noqa: S614 - our own file, written by stage_replay

    def key(tag: str) -> tuple[int, int]:
        step_s, _, shard_s = tag.partition("/")
        return int(step_s), int(shard_s or 0)

    mine = [(t, r) for t, r in chunks if key(t)[1] % world == rank]
    return [(t, r) for t, r in sorted(mine, key=lambda c: key(c[0]))]
