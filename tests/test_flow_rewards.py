"""CLIP score through open_clip with weights from a local file, and the prompt-file task.

python -m pytest tests/test_flow_rewards.py -q -o addopts=""
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from mmdistill.errors import CheckpointError  # noqa: E402
from mmdistill.modalities.flow.rewards import ClipScore  # noqa: E402
from mmdistill.modalities.flow.task import PromptsTask  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None, force_image_size=64)
    path = tmp_path_factory.mktemp("clip") / "vit_s32.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_clip_score_is_the_cosine_of_the_models_embeddings(clip_file):
    model, path = clip_file
    reward = ClipScore("ViT-S-32", weights=str(path), force_image_size=64, scale=2.5)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square", "a green circle above a red square"]
    got = reward(images, prompts)
    # brute force with the original model: resize, normalise, encode, cosine
    x = torch.nn.functional.interpolate(images, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = (
        torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1),
        torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image((x - mean) / std), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer("ViT-S-32")(prompts)), dim=-1)
    np.testing.assert_allclose(got, 2.5 * (img * txt).sum(-1).clamp(min=0).numpy(), rtol=1e-4, atol=1e-5)
    assert got.shape == (3,) and got.dtype == np.float32


def test_missing_clip_weights_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ClipScore("ViT-S-32", weights=str(tmp_path / "nope.bin"))


def test_prompts_task_reads_files_splits_and_scores_by_tag(clip_file, tmp_path):
    _, path = clip_file
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"a photo of thing {i}", "tag": "clip"}) for i in range(40)))
    task = PromptsTask(str(f), rewards={"clip": {"arch": "ViT-S-32", "weights": str(path), "force_image_size": 64}})
    train, test = task.problems("train"), task.problems("test")
    assert train and test and not {p.prompt for p in train} & {p.prompt for p in test}
    images = torch.rand(2, 3, 16, 16)
    r = task.rewards(test[:2] if len(test) >= 2 else test * 2, images)
    assert r["clip"].shape == (2,)
    np.testing.assert_allclose(task.train_reward(test[:2] if len(test) >= 2 else test * 2, r), r["clip"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        PromptsTask(str(bad))
