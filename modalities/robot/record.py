"""Write robot episodes as a LeRobot dataset (the v2.1 format lerobot 0.3.2 reads), offline.

Each episode is a dict of per-frame arrays::

    {"state": [T, S] float, "action": [T, A] float, "task": str,
     "image": [T, 3, H, W] uint8 (optional), "env_state": [T, P] float (optional)}

stored under LeRobot's keys `observation.state`, `action`, `observation.images.image`,
`observation.environment_state`, with LeRobot's own `LeRobotDataset.create` / `add_frame` /
`save_episode`.  Images are stored as PNG files by default: lerobot can encode AV1 videos here
(PyAV), but reading them back needs torchcodec's FFmpeg libraries or torchvision's removed
`VideoReader`, neither of which this environment has.

    python -m pytest tests/test_robot_lerobot.py -q -o addopts="" -k dataset
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EPISODE_KEYS", "record_lerobot_dataset"]

# episode dict key -> LeRobot feature key
EPISODE_KEYS = {
    "state": "observation.state",
    "action": "action",
    "image": "observation.images.image",
    "env_state": "observation.environment_state",
}


def _arrays(episode: Mapping[str, Any], index: int) -> dict[str, np.ndarray]:
    for key in ("state", "action", "task"):
        if key not in episode:
            raise ValueError(
                f"episodes[{index}] has no {key!r}; each episode needs state [T, S], action [T, A] and a task string"
            )
    if not isinstance(episode["task"], str) or not episode["task"]:
        raise ValueError(
            f"episodes[{index}]['task'] must be the episode's language instruction (a non-empty str); got {episode['task']!r}"
        )
    unknown = set(episode) - set(EPISODE_KEYS) - {"task"}
    if unknown:
        raise ValueError(
            f"episodes[{index}] has unknown keys {sorted(unknown)}; allowed: {sorted(EPISODE_KEYS)} and 'task'"
        )
    out = {}
    for key in EPISODE_KEYS:
        if key not in episode or episode[key] is None:
            continue
        value = episode[key]
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        if key == "image":
            if value.dtype != np.uint8 or value.ndim != 4 or value.shape[1] != 3:
                raise ValueError(
                    f"episodes[{index}]['image'] must be uint8 [T, 3, H, W]; got {value.dtype} {list(value.shape)}"
                )
        else:
            if value.ndim != 2:
                raise ValueError(f"episodes[{index}][{key!r}] must be [T, dim]; got shape {list(value.shape)}")
            value = value.astype(np.float32)
        out[key] = value
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"episodes[{index}]: every per-frame array needs the same non-zero length T; got {lengths}")
    return out


def _features(
    first: Mapping[str, np.ndarray], state_names: Sequence[str] | None, action_names: Sequence[str] | None
) -> dict[str, dict]:
    names = {
        "state": list(state_names) if state_names else None,
        "action": list(action_names) if action_names else None,
    }
    features = {}
    for key, value in first.items():
        if key == "image":
            features[EPISODE_KEYS[key]] = {
                "dtype": "image",
                "shape": tuple(value.shape[1:]),
                "names": ["channels", "height", "width"],
            }
        else:
            features[EPISODE_KEYS[key]] = {"dtype": "float32", "shape": (value.shape[1],), "names": names.get(key)}
    return features


def record_lerobot_dataset(
    root: str | Path,
    repo_id: str,
    fps: int,
    episodes: Sequence[Mapping[str, Any]],
    *,
    robot_type: str | None = None,
    state_names: Sequence[str] | None = None,
    action_names: Sequence[str] | None = None,
    use_videos: bool = False,
) -> Path:
    """Write `episodes` to a new LeRobot dataset at `root` and return `root`.

    Read it back with `LeRobotDataset(repo_id, root=root)`.  All episodes must carry the same keys
    and per-frame shapes (they share one feature schema).  `root` must not exist yet.
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # lazy: lerobot is an optional, heavy dependency

    root = Path(root)
    if root.exists():
        raise FileExistsError(
            f"{root} exists; LeRobot writes a new dataset into a fresh directory -- pick another root or delete it"
        )
    if not episodes:
        raise ValueError("episodes is empty; record at least one episode")
    if fps <= 0:
        raise ValueError(f"fps must be > 0 (the control frequency; timestamps are frame / fps); got {fps}")
    arrays = [_arrays(ep, i) for i, ep in enumerate(episodes)]
    features = _features(arrays[0], state_names, action_names)
    for i, ep in enumerate(arrays):
        shapes = {EPISODE_KEYS[k]: tuple(v.shape[1:]) for k, v in ep.items()}
        want = {k: tuple(f["shape"]) for k, f in features.items()}
        if shapes != want:
            raise ValueError(
                f"episodes[{i}] has per-frame shapes {shapes}, episode 0 has {want}; one dataset holds one schema"
            )
    if use_videos:
        for f in features.values():
            if f["dtype"] == "image":
                f["dtype"] = "video"
    dataset = LeRobotDataset.create(
        repo_id, fps=int(fps), features=features, root=root, robot_type=robot_type, use_videos=use_videos
    )
    for episode, ep in zip(episodes, arrays):
        for t in range(len(ep["action"])):
            dataset.add_frame({EPISODE_KEYS[k]: v[t] for k, v in ep.items()}, task=episode["task"])
        dataset.save_episode()
    return root
