"""Experiment tracking: `tracker=tensorboard` writes event files that TensorBoard's own reader
parses with the same scalars as metrics.jsonl.

    python -m pytest tests/test_tracking.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdistill.cli import main
from mmdistill.config import config_from_raw
from mmdistill.pipeline import run_pipeline


def test_tensorboard_events_hold_the_metrics(tiny_raw):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_raw["tracker"] = "tensorboard"
    tiny_raw["eval"] = {"n": 4, "batch_size": 4, "max_new_tokens": 6}
    run_pipeline(config_from_raw(tiny_raw), quiet=True)
    run = Path(tiny_raw["run_dir"])
    events = sorted((run / "tracking").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    scalars: dict[str, dict[int, float]] = {}
    for ev in events:
        acc = EventAccumulator(str(ev.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    compared = 0
    for stage in ("teacher_sft", "student_opd"):
        for row in (json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()):
            for k, v in row.items():
                if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                assert scalars[f"{stage}/{k}"][row["step"]] == pytest.approx(v, rel=1e-6, abs=1e-6), (stage, k)
                compared += 1
    assert compared >= 8 * 5  # 4 logged steps x 2 stages, several scalars each
    # media: each stage's final evaluation sends its text samples (rank 0 only), as the run's samples
    texts = {}
    for ev in events:
        acc = EventAccumulator(str(ev.parent), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            texts[tag] = acc.Tensors(tag)[-1]
    for stage in ("teacher_sft", "student_opd"):
        tag = f"{stage}/eval_samples/text_summary"
        assert tag in texts, sorted(texts)
        table = texts[tag].tensor_proto.string_val[0].decode()
        result = json.loads((run / stage / "result.json").read_text())
        assert texts[tag].step == 4 and result["eval"]["samples"][0]["question"] in table


def test_unknown_or_missing_tracker_is_one_line(tmp_path, tiny_raw, capsys):
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    assert main(["train", str(p), "tracker=tensorbored"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tracker: 'tensorbored' is not one of" in err and "\n" not in err
