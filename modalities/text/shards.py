"""The teacher-shard format of Lightning OPD (arXiv 2604.13010; docs/objectives.md section 8.13): a
teacher's own completions of training prompts with its top-k log-probs (plus one tail bucket) per
token, stored once as webdataset tar shards beside a manifest.

    DIR/shard-000000.tar ...   one sample per completion: `json` (question, answer, solution, teacher
                               reward) and four arrays `completion_ids.npy [T] int32`, `topk_idx.npy
                               [T, K] int32`, `topk_logp.npy [T, K] float32`, `tail_logp.npy [T] float32`
    DIR/manifest.json          format, the teacher's name and `teacher_hash` (sha256 of its safetensors
                               weights), `tokenizer_hash`, k, n, score_temperature, the rollout settings,
                               task, seed, and every shard's name, size and sha256

Written by the `precompute` stage kind (`precompute.py`); read by the `teacher_shards` task (the
prompts and stored completions) and the `stored_logits` teacher kind (the top-k per token).  Any
damage raises one line naming the shard and the fix.  Needs the `data` extra (webdataset).

    python -m pytest tests/test_lightning.py -q
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from mmdistill.errors import CheckpointError, MmdistillError

FORMAT = "mmdistill.lightning/v1"
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-%06d.tar"
ARRAYS = ("completion_ids", "topk_idx", "topk_logp", "tail_logp")  # one .npy member each per sample


def webdataset() -> Any:
    """The webdataset module, or one line saying how to install it."""
    try:
        import webdataset
    except ImportError:
        raise MmdistillError(
            "Lightning OPD shards need the webdataset package; install it with pip install 'mmdistill[data]'"
        ) from None
    return webdataset


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
    if m.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a {FORMAT} manifest (format {m.get('format')!r}); re-run the precompute stage"
        )
    return m


def read_manifest_quiet(shards_dir: Path) -> dict | None:
    """The manifest of `shards_dir`, or None when it is missing, unreadable or of another format."""
    try:
        m = json.loads((Path(shards_dir) / MANIFEST).read_text())
        return m if m.get("format") == FORMAT else None
    except (OSError, ValueError):
        return None


def shards_intact(shards_dir: Path, manifest: dict) -> bool:
    """True when every shard the manifest lists is present with its recorded sha256."""
    try:
        return all(sha256_file(Path(shards_dir) / s["name"]).hexdigest() == s["sha256"] for s in manifest["shards"])
    except (OSError, KeyError, TypeError):
        return False


def shard_entries(shards_dir: Path) -> list[dict]:
    """`{"name", "bytes", "sha256"}` of every written shard in `shards_dir`, sorted by name (for the manifest)."""
    return [
        {"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p).hexdigest()}
        for p in sorted(Path(shards_dir).glob("shard-*.tar"))
    ]


# ----------------------------------------------------------------------------- samples


def sample_record(
    key: str, meta: dict, completion_ids: np.ndarray, topk_idx: np.ndarray, topk_logp: np.ndarray, tail_logp: np.ndarray
) -> dict[str, Any]:
    """One sample as a webdataset record (what `ShardWriter.write` takes)."""
    return {
        "__key__": key,
        "json": meta,
        "completion_ids.npy": completion_ids.astype(np.int32),
        "topk_idx.npy": topk_idx.astype(np.int32),
        "topk_logp.npy": topk_logp.astype(np.float32),
        "tail_logp.npy": tail_logp.astype(np.float32),
    }


def read_shard(path: Path, sha256: str) -> list[tuple[str, dict, dict[str, np.ndarray]]]:
    """One shard's samples as `(key, meta, {array name: array})`, after checking its sha256 against
    the manifest; any damage raises CheckpointError naming the shard and the fix."""
    wds = webdataset()
    fix = f"re-run the precompute stage that wrote '{path.parent}' (delete that directory and its stage's result.json)"
    try:
        digest = sha256_file(path).hexdigest()
    except OSError as e:
        raise CheckpointError(
            f"teacher shard {path} cannot be read ({e.strerror or type(e).__name__}); {fix}"
        ) from None
    if digest != sha256:
        raise CheckpointError(
            f"teacher shard {path} is corrupt (sha256 {digest[:12]} != manifest {sha256[:12]}); {fix}"
        )
    out = []
    try:
        for s in wds.WebDataset(
            str(path), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        ):
            arrays = {k: np.lib.format.read_array(io.BytesIO(s[f"{k}.npy"]), allow_pickle=False) for k in ARRAYS}
            out.append((s["__key__"], json.loads(s["json"]), arrays))
    except Exception as e:  # noqa: BLE001 - a tar, JSON or array error all mean a damaged shard
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"teacher shard {path} is unreadable ({type(e).__name__}: {first}); {fix}") from None
    return out


def read_samples(shards_dir: Path, manifest: dict) -> list[tuple[str, dict, dict[str, np.ndarray]]]:
    """Every sample of the manifest's shards, in order; the count must match the manifest's `n`."""
    samples = [x for s in manifest["shards"] for x in read_shard(Path(shards_dir) / s["name"], s["sha256"])]
    if len(samples) != manifest["n"]:
        raise CheckpointError(
            f"'{shards_dir}' holds {len(samples)} samples, its manifest says {manifest['n']}; "
            f"re-run the precompute stage {manifest.get('stage', '')!r}"
        )
    return samples
