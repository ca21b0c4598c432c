"""Run directories that never cost a user a file.

A run directory is claimed with a marker file, `.mmdistill-run`, that only mmdistill writes. It
holds the run's identity (an id, when and from which config it was started) and the top-level
names the run writes (`config.yaml`, `report.json`, `tokenizer/`, one folder per stage, ...).

- A run starts only in a directory that does not exist, is empty, or carries the marker of a run
  whose start failed before any stage wrote anything.
- `--overwrite` deletes only in a directory that carries the marker, and there only the names the
  marker lists: a user's own files beside them are kept, and the directory (with its marker) stays.
- `--resume` continues only a directory that carries the marker (or, for runs made before the
  marker existed, a `config.yaml` written by mmdistill).

    mmdistill train configs/text/quickstart.yaml --overwrite
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from mmdistill.checkpoint import atomic_write_text
from mmdistill.errors import ConfigError

MARKER = ".mmdistill-run"
REPORT_NAMES = ("config.yaml", "report.json", "report.png", "tokenizer", "datasets", "tracking")


def expand(path: str | os.PathLike) -> Path:
    """`~` and `$VARS` expanded, as everywhere a path is read."""
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / MARKER
    if not p.is_file():
        return None
    try:
        marker = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("tool") == "mmdistill" else None


def check_usable(run_dir: Path) -> None:
    """Refuse paths that can never be a run directory: a file, or a directory we cannot write."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"run_dir: '{run_dir}' is a file, not a directory; choose a new directory, e.g. run_dir=runs/NAME"
        )


def claim_check(run_dir: Path) -> None:
    """Raise a ConfigError, touching nothing, unless `claim(run_dir, ...)` would succeed."""
    run_dir = Path(run_dir)
    check_usable(run_dir)
    marker = read_marker(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if marker is None:
            raise ConfigError(
                f"run_dir: '{run_dir}' is not empty and is not an mmdistill run directory; mmdistill never writes into "
                "a folder it did not create: choose a new or empty directory, e.g. run_dir=runs/NAME"
            )
        if marker.get("status") != "starting" or _stage_outputs(run_dir, marker):
            raise ConfigError(
                f"run directory {run_dir} already holds a run; continue it with `mmdistill train --resume {run_dir}`, "
                "or pass --overwrite / a new run_dir=..."
            )


def claim(run_dir: Path, names: list[str], config_path: str | None) -> dict[str, Any]:
    """Make `run_dir` this run's own: create it (or take an empty one) and write the marker.

    Raises a ConfigError, touching nothing, when the directory holds anything that is not a run
    of mmdistill's own, or holds a run that already started its stages."""
    run_dir = Path(run_dir)
    claim_check(run_dir)
    marker = read_marker(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = {
        "tool": "mmdistill",
        "run_id": uuid.uuid4().hex,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config_path,
        "status": "starting",
        "names": sorted(set(REPORT_NAMES) | set(names) | set((marker or {}).get("names", []))),
    }
    write_marker(run_dir, marker)
    return marker


def write_marker(run_dir: Path, marker: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / MARKER, json.dumps(marker, indent=1))


def mark_running(run_dir: Path, names: list[str]) -> None:
    """The run's stages have started: the directory now holds a run to resume (names: stages to list)."""
    marker = read_marker(run_dir)
    if marker is None:  # a run from before the marker existed: adopt it
        marker = {"tool": "mmdistill", "run_id": uuid.uuid4().hex, "started": None, "config": None, "names": []}
    marker["status"] = "running"
    marker["names"] = sorted(set(marker.get("names", [])) | set(REPORT_NAMES) | set(names))
    write_marker(run_dir, marker)


def wipe(run_dir: Path) -> list[str]:
    """`--overwrite`: delete what the run in `run_dir` wrote, and nothing else; returns what was removed."""
    run_dir = Path(run_dir)
    check_usable(run_dir)
    if not run_dir.exists():
        return []
    marker = read_marker(run_dir)
    if marker is None:
        if any(run_dir.iterdir()):
            raise ConfigError(
                f"--overwrite: '{run_dir}' has no {MARKER} marker, so it is not a run directory mmdistill created "
                "(or one from a version before the marker); refusing to delete anything in it: choose another run_dir, "
                "or delete the folder yourself"
            )
        return []
    removed = []
    for name in marker.get("names", []):
        if not _plain_name(name):
            continue  # a hand-edited marker cannot point outside the directory
        p = run_dir / name
        for q in (p, p.with_name(f".{name}.tmp"), p.with_name(f".{name}.old")):
            if q.is_symlink() or q.is_file():
                q.unlink()
                removed.append(q.name)
            elif q.is_dir():
                shutil.rmtree(q)
                removed.append(q.name)
    write_marker(run_dir, {**marker, "status": "starting"})  # still ours: the next start may reuse it
    return removed


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and os.sep not in name


def _stage_outputs(run_dir: Path, marker: dict[str, Any]) -> bool:
    """Whether any listed name other than the start-up files exists (a stage has written something)."""
    startup = {"config.yaml", "tokenizer", MARKER}
    return any((run_dir / n).exists() for n in marker.get("names", []) if _plain_name(n) and n not in startup)
