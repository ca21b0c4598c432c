"""The `shapes` task: prompts, stable disjoint splits, the renderer, and pixel rewards.

python -m pytest tests/test_flow_shapes.py -q -o addopts=""
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mmdistill.modalities.flow.shapes import (
    COLORS,
    VOCABULARY,
    ShapesPrompt,
    all_prompts,
    color_reward,
    parse_prompt,
    position_reward,
    render,
    render_batch,
    rewards,
    sample_prompts,
    split_of,
    split_prompts,
)

torch.set_num_threads(1)
SWAP = {"on the left of": "on the right of", "on the right of": "on the left of", "above": "below", "below": "above"}


def test_prompt_grammar_and_parsing():
    ps = all_prompts()
    assert len(ps) == 4 * 3 * 2 * 2 * 4 == len({p.text for p in ps})
    assert (
        ShapesPrompt("red", "circle", "on the left of", "blue", "square").text
        == "a red circle on the left of a blue square"
    )
    for p in ps:
        assert parse_prompt(p.text) == p
        assert set(p.text.split()) <= set(VOCABULARY)
    with pytest.raises(ValueError, match="not a shapes prompt"):
        parse_prompt("a red circle near a blue square")
    with pytest.raises(ValueError, match="different colours"):
        ShapesPrompt("red", "circle", "above", "red", "square")


def test_splits_are_disjoint_stable_and_keep_equivalent_scenes_together():
    train, test = split_prompts("train"), split_prompts("test")
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(all_prompts())
    assert 0.1 < len(test) / len(all_prompts()) < 0.4
    for p in all_prompts():  # "X left of Y" and "Y right of X" are one scene
        converse = ShapesPrompt(p.color2, p.shape2, SWAP[p.relation], p.color1, p.shape1)
        assert split_of(p) == split_of(converse), p.text
    # sha256, not Python's salted hash: these values never change between runs or machines
    assert [split_of(p) for p in all_prompts()[:8]] == [
        "test",
        "train",
        "train",
        "test",
        "train",
        "train",
        "test",
        "train",
    ]
    rng = random.Random(0)
    assert set(sample_prompts(rng, 50, "test")) <= set(test)


def test_tiny_clip_tokenizer_has_one_token_per_shapes_word():
    pytest.importorskip("transformers")
    from mmdistill.modalities.flow.pipelines import build_clip_tokenizer

    tok = build_clip_tokenizer(VOCABULARY)
    p = all_prompts()[5]
    assert tok.tokenize(p.text) == [w + "</w>" for w in p.text.split()]
    ids = tok(p.text, padding="max_length", max_length=16).input_ids
    assert ids[0] == tok.bos_token_id and ids[len(p.text.split()) + 1] == tok.eos_token_id


def test_rendered_images_earn_full_rewards_and_swapped_relations_earn_none():
    ps = all_prompts()
    imgs = render_batch(ps, seed=0)
    assert imgs.shape == (len(ps), 3, 32, 32) and imgs.dtype == np.float32 and imgs.min() >= 0 and imgs.max() <= 1
    np.testing.assert_array_equal(color_reward(imgs, ps), 1.0)
    np.testing.assert_array_equal(position_reward(imgs, ps), 1.0)
    swapped = [ShapesPrompt(p.color1, p.shape1, SWAP[p.relation], p.color2, p.shape2) for p in ps]
    np.testing.assert_array_equal(position_reward(imgs, swapped), 0.0)
    out = rewards(torch.from_numpy(imgs), [p.text for p in ps])  # tensors and strings work too
    np.testing.assert_array_equal(out["avg"], 1.0)
    assert np.array_equal(render_batch(ps[:4], seed=1), render_batch(ps[:4], seed=1))
    assert not np.array_equal(render_batch(ps[:4], seed=1), render_batch(ps[:4], seed=2))


def test_color_reward_needs_the_named_colours_and_no_others():
    p = ShapesPrompt("red", "circle", "on the left of", "blue", "square")
    img = render(p, np.random.default_rng(0))
    assert color_reward(np.zeros_like(img)[None], [p])[0] == 0.0
    assert position_reward(np.zeros_like(img)[None], [p])[0] == 0.0
    wrong = ShapesPrompt("green", "circle", "on the left of", "blue", "square")
    assert color_reward(img[None], [wrong])[0] == 0.0  # red is unnamed, green absent
    extra = img.copy()
    extra[:, 0:4, 0:4] = np.array(COLORS["yellow"], dtype=np.float32)[:, None, None]  # 16 px = 1.6 % of yellow
    assert 0.0 < color_reward(extra[None], [p])[0] < 1.0
    half = img.copy()
    half[:, img[2] > 0.5] = 0  # remove the blue square
    assert color_reward(half[None], [p])[0] == pytest.approx(0.5)
    assert position_reward(half[None], [p])[0] == 0.0


def test_rewards_of_arbitrary_images_lie_in_unit_interval():
    rng = np.random.default_rng(0)
    imgs = rng.uniform(0, 1, (16, 3, 32, 32)).astype(np.float32)
    ps = sample_prompts(random.Random(1), 16)
    for name, r in rewards(imgs, ps).items():
        assert r.shape == (16,) and ((0 <= r) & (r <= 1)).all(), name


def test_count_reward_counts_objects_not_fragments():
    from mmdistill.modalities.flow.shapes import count_reward, render, split_prompts

    p = split_prompts("train")[0]
    img = render(p, np.random.default_rng(0), size=32)[None]
    assert count_reward(img, [p])[0] == 1.0
    broken = img.copy()
    broken[:] = 0.0  # nothing drawn: no object of either colour
    assert count_reward(broken, [p])[0] == 0.0
    two = np.zeros((1, 3, 32, 32), np.float32)
    rgb1 = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}[p.color1]
    rgb2 = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}[p.color2]
    two[0, :, 2:8, 2:8] = np.array(rgb1, np.float32)[:, None, None]
    two[0, :, 20:26, 20:26] = np.array(rgb1, np.float32)[:, None, None]  # colour 1 twice: two objects
    two[0, :, 2:8, 20:26] = np.array(rgb2, np.float32)[:, None, None]
    assert count_reward(two, [p])[0] == 0.5
