"""Evaluation media for experiment trackers: the sample grid image (flow, `ev["grid"]`, a png), the
rollout video (robot, `ev["video"]`, a gif) and the text samples (`ev["samples"]`, a list of dicts)
of one evaluation, sent to every tracker accelerate opened (`tracker=tensorboard|trackio|wandb`)
from the main process only.  Scalars go through `accelerator.log` in the loop; this file only adds
media.  A tracker that cannot take a piece of media costs one warning line, never the run.

TensorBoard gets the files' own bytes (an image summary holding the png, or the gif, which
TensorBoard animates, as `add_video` would write without needing moviepy) and a markdown table of
the samples (`add_text`); trackio and W&B get their own Image / Video / Table objects.

    mmdistill train configs/flow/shapes_flow_opd.yaml tracker=tensorboard && tensorboard --logdir runs/shapes_flow_opd/tracking
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".gif",)  # what the robot adapter writes; TensorBoard animates a gif image summary


def media_of(ev: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """The media of one evaluation result: `{name: (kind, value)}` with kind image (a file path),
    video (a file path) or samples (a non-empty list of dicts)."""
    out: dict[str, tuple[str, Any]] = {}
    for name in ("grid", "video"):
        value = ev.get(name)
        if isinstance(value, str) and Path(value).is_file():
            suffix = Path(value).suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                out[name] = ("image", value)
            elif suffix in VIDEO_SUFFIXES:
                out[name] = ("video", value)
    samples = ev.get("samples")
    if isinstance(samples, list) and samples and all(isinstance(s, dict) for s in samples):
        out["samples"] = ("samples", samples)
    return out


def samples_markdown(samples: list[dict[str, Any]]) -> str:
    """The samples as a markdown table (one row each, columns in order of first appearance)."""
    columns: list[str] = []
    for s in samples:
        columns += [k for k in s if k not in columns]

    def cell(v: Any) -> str:
        return str(v).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

    lines = ["| # | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {i} | " + " | ".join(cell(s.get(c, "")) for c in columns) + " |" for i, s in enumerate(samples)]
    return "\n".join(lines)


def _tensorboard(writer: Any, tag: str, kind: str, value: Any, step: int) -> None:
    if kind == "samples":
        writer.add_text(tag, samples_markdown(value), global_step=step)
        return
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    data = Path(value).read_bytes()
    with Image.open(value) as im:
        width, height = im.size
        channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(im.mode, 3)
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=data)
    # the file's own bytes: a png shows as is, a gif animates (what add_video writes, without moviepy)
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    writer.flush()


def _media_objects(module_name: str):
    """A sender for trackers whose library has W&B-style Image / Video / Table classes (wandb, trackio)."""

    def send(tracker: Any, tag: str, kind: str, value: Any, step: int) -> None:
        import importlib

        lib = importlib.import_module(module_name)
        if kind == "samples":
            columns = list(dict.fromkeys(k for s in value for k in s))
            item = lib.Table(columns=columns, data=[[str(s.get(c, "")) for c in columns] for s in value])
        else:
            item = lib.Image(value) if kind == "image" else lib.Video(value)
        tracker.log({tag: item}, step=step)

    return send


SENDERS = {
    "tensorboard": lambda t: (_tensorboard, t.writer),
    "wandb": lambda t: (_media_objects("wandb"), t),
    "trackio": lambda t: (_media_objects("trackio"), t),
}


def log_media(accelerator: Any, ev: dict[str, Any] | None, stage: str, step: int) -> list[str]:
    """Send one evaluation's grid / video / samples to every open tracker as `STAGE/eval_NAME` at
    `step` (the step the loop passes to `accelerator.log`); main process only.  Returns the
    `tracker:tag` pairs sent; a failure is one warning line on stderr and the run goes on."""
    if accelerator is None or not accelerator.is_main_process or not ev:
        return []
    sent = []
    for name, (kind, value) in media_of(ev).items():
        tag = f"{stage}/eval_{name}"
        for tracker in accelerator.trackers:
            make = SENDERS.get(tracker.name)
            if make is None:
                continue
            try:
                send, target = make(tracker)
                send(target, tag, kind, value, step)
                sent.append(f"{tracker.name}:{tag}")
            except Exception as e:  # noqa: BLE001 - media are a convenience; a tracker's failure must not end training
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                print(
                    f"warning: tracker {tracker.name}: could not log {tag} at step {step} ({type(e).__name__}: {msg}); "
                    "training goes on",
                    file=sys.stderr,
                )
    return sent
