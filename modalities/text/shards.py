"""The teacher-shard format of Lightning OPD (arXiv 2604.13010; docs/objectives.md section 8.13): a
teacher's own completions of training prompts with its top-k log-probs (plus one tail bucket) per
token, stored once as webdataset-style tar shards beside a manifest that indexes every sample.

    DIR/shard-000000.tar ...   one sample per completion, members `KEY.json` (question, answer, solution,
                               teacher reward) and four arrays `KEY.completion_ids.npy [T] int32`,
                               `KEY.topk_idx.npy [T, K] int32`, `KEY.topk_logp.npy [T, K] float32`,
                               `KEY.tail_logp.npy [T] float32` (any webdataset reader reads them)
    DIR/shard-000000.index.json   written when that shard is complete: its manifest entry plus the
                               settings that wrote it (a killed precompute resumes after the last one)
    DIR/manifest.json          written last: format, the teacher's name and `teacher_hash` (sha256 of its
                               safetensors weights), `tokenizer_hash`, k, n, score_temperature, the rollout
                               settings, task, seed, and every shard's name, size, sha256 and sample index:
                               each sample's key, the byte range of each member and a sha256 over the key
                               and the members' bytes

Written by the `precompute` stage kind (`precompute.py`); read by the `teacher_shards` task (the
prompts and stored completions) and the `stored_logits` teacher kind (the top-k per token).  The
reader seeks each sample by its index and checks its sha256, so damage (a truncated shard, flipped
bytes, a missing shard, a manifest that does not match the data) costs exactly the damaged samples:
every other sample is read once with its own data, and each damaged one is named (shard, key, cause).

    python -m pytest tests/test_lightning.py tests/test_corrupt_shards.py -q
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmdistill.errors import CheckpointError, ConfigError

FORMAT = "mmdistill.lightning/v2"
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-%06d.tar"
INDEX_SUFFIX = ".index.json"  # shard-000000.tar -> shard-000000.index.json
ARRAYS = ("completion_ids", "topk_idx", "topk_logp", "tail_logp")  # one .npy member each per sample
MEMBERS = ("json", *(f"{a}.npy" for a in ARRAYS))  # the order of a sample's members and of its index
DAMAGED_POLICIES = ("error", "skip")

Sample = tuple[str, dict, dict[str, np.ndarray]]  # (key, meta, {array name: array})


# ----------------------------------------------------------------------------- hashes


def sha256_file(path: Path, h: Any = None) -> Any:
    """`h` (a new sha256 by default) updated with the bytes of `path`."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def checkpoint_hash(path: str | Path) -> str:
    """sha256 over a checkpoint's `*.safetensors` files (names, sizes, bytes; sorted by name):
    the same for any copy of the weights, whatever the directory's name or mtimes."""
    root = Path(path)
    files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(
            f"'{root}' holds no *.safetensors weights to hash; point the teacher at a checkpoint saved with safe_serialization=True"
        )
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + p.stat().st_size.to_bytes(8, "little"))
        sha256_file(p, h)
    return h.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of what turns a question into token ids: vocabulary, end token, chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "eos": tokenizer.eos_token,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def sample_hash(key: str, members: list[bytes]) -> str:
    """sha256 over a sample's key and its members' sizes and bytes (in `MEMBERS` order): a sample
    read under another key, or with any byte changed, does not match."""
    h = hashlib.sha256(key.encode() + b"\0")
    for data in members:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# ----------------------------------------------------------------------------- writing


def encode_sample(meta: dict, arrays: dict[str, np.ndarray]) -> list[bytes]:
    """A sample's member bytes in `MEMBERS` order: the JSON, then each array as `.npy`."""
    out = [json.dumps(meta, sort_keys=True).encode()]
    for name, dtype in zip(ARRAYS, (np.int32, np.int32, np.float32, np.float32)):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arrays[name], dtype=dtype), allow_pickle=False)
        out.append(buf.getvalue())
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Writes one shard: samples go to `NAME.tar.tmp`, which `finish` syncs and renames to `NAME.tar`,
    so a shard under its final name is always complete.  The tar is reproducible (mtime 0, no owner)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.samples: list[dict] = []

    def write(self, key: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        members = encode_sample(meta, arrays)
        ranges = []
        for ext, data in zip(MEMBERS, members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self.tar.addfile(info, io.BytesIO(data))
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            ranges.append([self.tar.offset - padded, len(data)])  # the data sits just before the padding
        self.samples.append({"key": key, "sha256": sample_hash(key, members), "members": ranges})

    def finish(self) -> dict:
        """Close, sync and rename the shard; its manifest entry (name, bytes, sha256, sample index)."""
        self.tar.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        return {
            "name": self.path.name,
            "bytes": self.path.stat().st_size,
            "sha256": sha256_file(self.path).hexdigest(),
            "samples": self.samples,
        }


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".tar") + INDEX_SUFFIX)


# ----------------------------------------------------------------------------- manifest


def read_manifest(shards_dir: Path, where: str = "task.shards") -> dict:
    """The manifest of `shards_dir`, or a CheckpointError saying which stage writes it."""
    path = Path(shards_dir) / MANIFEST
    if not path.exists():
        raise CheckpointError(
            f"{where}: no {MANIFEST} in '{shards_dir}'; run the precompute stage that writes it "
            f"(its precompute.out, default RUN_DIR/STAGE/shards) or fix {where}"
        )
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}); delete '{shards_dir}' and re-run the precompute stage"
        ) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else None
        raise CheckpointError(f"{path} is not a {FORMAT} manifest (format {got!r}); re-run the precompute stage")
    return m


def read_manifest_quiet(shards_dir: Path) -> dict | None:
    """The manifest of `shards_dir`, or None when it is missing, unreadable or of another format."""
    try:
        m = json.loads((Path(shards_dir) / MANIFEST).read_text())
        return m if isinstance(m, dict) and m.get("format") == FORMAT else None
    except (OSError, ValueError):
        return None


def rerun_fix(manifest: dict) -> str:
    """How to rewrite damaged shards: the precompute stage rewrites only those that fail their check."""
    stage, run_dir = manifest.get("stage", "?"), manifest.get("run_dir")
    if run_dir is None:
        return f"re-run the precompute stage {stage!r} (it rewrites only the damaged shards)"
    return (
        f"delete {Path(run_dir) / stage / 'result.json'} and run `mmdistill train --resume {run_dir}` "
        f"(the precompute stage {stage!r} rewrites only the damaged shards)"
    )


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Damage:
    """One sample that cannot be read as written: its shard, key and the cause."""

    shard: str
    key: str
    cause: str


def _decode(members: list[bytes]) -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads(members[0])
    arrays = {a: np.lib.format.read_array(io.BytesIO(b), allow_pickle=False) for a, b in zip(ARRAYS, members[1:])}
    return meta, arrays


def _read_shard(path: Path, entry: dict) -> tuple[list[Sample], list[Damage]]:
    good, bad = [], []
    try:
        f = open(path, "rb")
    except OSError as e:
        cause = "shard missing" if isinstance(e, FileNotFoundError) else f"shard unreadable ({e.strerror})"
        return [], [Damage(entry["name"], s["key"], cause) for s in entry["samples"]]
    with f:
        for s in entry["samples"]:
            key, members = s["key"], []
            for off, size in s["members"]:
                f.seek(off)
                members.append(f.read(size))
            if any(len(m) != size for m, (_, size) in zip(members, s["members"])):
                bad.append(Damage(entry["name"], key, "truncated"))
            elif sample_hash(key, members) != s["sha256"]:
                bad.append(Damage(entry["name"], key, "sha256 mismatch"))
            else:
                try:
                    good.append((key, *_decode(members)))
                except Exception as e:  # noqa: BLE001 - bytes that match their hash but do not decode
                    bad.append(Damage(entry["name"], key, f"undecodable: {type(e).__name__}"))
    return good, bad


def read_shards(shards_dir: Path, manifest: dict) -> tuple[list[Sample], list[Damage]]:
    """Every intact sample of the manifest's shards in order, and every damaged one (never raised):
    each sample is read from its own byte ranges and checked against its own sha256."""
    try:
        entries = [(Path(shards_dir) / e["name"], e) for e in manifest["shards"]]
        keys = [s["key"] for _, e in entries for s in e["samples"]]
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"{Path(shards_dir) / MANIFEST} has no sample index ({type(e).__name__}: {e}); {rerun_fix(manifest)}"
        ) from None
    if len(keys) != manifest.get("n") or len(set(keys)) != len(keys):
        raise CheckpointError(
            f"{Path(shards_dir) / MANIFEST} indexes {len(keys)} samples ({len(set(keys))} distinct keys), "
            f"its n is {manifest.get('n')}; the manifest does not match its shards; {rerun_fix(manifest)}"
        )
    good, bad = [], []
    for path, e in entries:
        try:
            g, b = _read_shard(path, e)
        except (KeyError, TypeError, ValueError, OSError) as err:  # an index entry that is not [offset, size] pairs
            raise CheckpointError(
                f"{Path(shards_dir) / MANIFEST}: the index of {e.get('name')} is malformed ({type(err).__name__}); "
                f"{rerun_fix(manifest)}"
            ) from None
        good += g
        bad += b
    return good, bad


def damage_line(shards_dir: Path, manifest: dict, bad: list[Damage], where: str) -> str:
    """One line naming the first damaged sample, how many more there are, and both fixes."""
    first = bad[0]
    shards_hit = sorted({d.shard for d in bad})
    more = ""
    if len(bad) > 1:
        more = f" (and {len(bad) - 1} more damaged samples; {len(bad)} in {', '.join(shards_hit)})"
    return (
        f"teacher shard {Path(shards_dir) / first.shard}: sample '{first.key}' is damaged ({first.cause}){more}; "
        f"{rerun_fix(manifest)}, or set {where}: skip to train on the intact samples only ({len(bad)} left out)"
    )


def read_samples(
    shards_dir: Path, manifest: dict, damaged: str = "error", where: str = "task.damaged"
) -> tuple[list[Sample], list[Damage]]:
    """The intact samples and the damaged ones; with `damaged: error` any damage raises one line
    (shard, sample, cause, fix); with `damaged: skip` the damaged samples are only returned."""
    if damaged not in DAMAGED_POLICIES:
        raise ConfigError(f"{where}: {damaged!r} is not one of {', '.join(DAMAGED_POLICIES)}")
    good, bad = read_shards(shards_dir, manifest)
    if bad and damaged == "error":
        raise CheckpointError(damage_line(shards_dir, manifest, bad, where))
    return good, bad


def shard_ok(shards_dir: Path, entry: dict) -> bool:
    """True when the shard is present with its recorded sha256 (used by precompute to keep it)."""
    try:
        path = Path(shards_dir) / entry["name"]
        return path.stat().st_size == entry["bytes"] and sha256_file(path).hexdigest() == entry["sha256"]
    except (OSError, KeyError, TypeError):
        return False
