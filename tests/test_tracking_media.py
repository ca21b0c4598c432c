"""Evaluation media reach TensorBoard: a real accelerate TensorBoard tracker gets a png grid, a gif
video and text samples through `mmdistill.tracking.log_media`; TensorBoard's own reader
(EventAccumulator) reads back the same image bytes, the frames and the text table; a failing
tracker costs one warning line; only the main process logs.

    python -m pytest tests/test_tracking_media.py -q
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest

from mmdistill.tracking import log_media, samples_markdown

SAMPLES = [
    {"question": "2 + 3", "completion": "5", "answer": "5", "correct": True},
    {"question": "a | b", "completion": "x\ny", "answer": "7", "correct": False},
]
TABLE = (  # written by hand: pipes escaped, newlines as <br>
    "| # | question | completion | answer | correct |\n"
    "|---|---|---|---|---|\n"
    "| 0 | 2 + 3 | 5 | 5 | True |\n"
    "| 1 | a \\| b | x<br>y | 7 | False |"
)


@pytest.fixture
def media(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    grid = tmp_path / "step_000004.png"
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(grid)
    frames = [Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)) for _ in range(3)]
    video = tmp_path / "step_000004.gif"
    frames[0].save(video, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {"n": 4, "accuracy": 0.5, "grid": str(grid), "video": str(video), "samples": SAMPLES}


def _tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path / "tracking"))
    acc.init_trackers("run")
    return acc


def _read(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tracking" / "run"), size_guidance={"images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_markdown_table_by_hand():
    assert samples_markdown(SAMPLES) == TABLE


def test_tensorboard_reads_back_grid_video_and_samples(tmp_path, media):
    from PIL import Image

    acc = _tensorboard(tmp_path)
    sent = log_media(acc, media, "student", 4)
    acc.end_training()
    assert sent == [
        "tensorboard:student/eval_grid",
        "tensorboard:student/eval_video",
        "tensorboard:student/eval_samples",
    ]
    ea = _read(tmp_path)
    (grid,) = ea.Images("student/eval_grid")
    assert grid.step == 4 and (grid.width, grid.height) == (40, 24)
    assert grid.encoded_image_string == open(media["grid"], "rb").read()  # the png's own bytes
    read = np.asarray(Image.open(io.BytesIO(grid.encoded_image_string)))
    assert np.array_equal(read, np.asarray(Image.open(media["grid"])))
    (video,) = ea.Images("student/eval_video")
    assert video.step == 4 and (video.width, video.height) == (20, 16)
    assert video.encoded_image_string == open(media["video"], "rb").read()
    assert Image.open(io.BytesIO(video.encoded_image_string)).n_frames == 3
    (text,) = ea.Tensors("student/eval_samples/text_summary")
    assert text.step == 4 and text.tensor_proto.string_val[0].decode() == TABLE


def test_a_failing_tracker_is_one_warning_line(tmp_path, media, capsys):
    acc = _tensorboard(tmp_path)
    writer = acc.get_tracker("tensorboard", unwrap=True)

    def broken(*args, **kwargs):
        raise OSError("disk full\nsecond line")

    writer.add_text = broken
    sent = log_media(acc, media, "student", 2)  # no exception
    acc.end_training()
    assert sent == ["tensorboard:student/eval_grid", "tensorboard:student/eval_video"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: tracker tensorboard: could not log student/eval_samples at step 2 (OSError: disk full); training goes on"
    ]
    assert [e.step for e in _read(tmp_path).Images("student/eval_grid")] == [2]


def test_nothing_to_send(tmp_path, media):
    worker = SimpleNamespace(is_main_process=False, trackers=[object()])
    assert log_media(worker, media, "student", 1) == []  # only the main process logs
    assert log_media(None, media, "student", 1) == []  # no tracker configured
    acc = _tensorboard(tmp_path)
    text_only = {"n": 4, "accuracy": 1.0, "samples": [], "grid": str(tmp_path / "missing.png")}
    assert log_media(acc, text_only, "student", 1) == []  # no samples shown, no file written
    acc.end_training()
