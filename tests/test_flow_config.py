"""The flow adapter's own config sections and the members of the `Adapter` contract that need no
training loop: spec, checkpoint claims, tokenizers, fingerprints, and the requests it refuses.

    python -m pytest tests/test_flow_config.py -q -o addopts=""
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")

from mmdistill.config import ModelConfig, TokenizerConfig  # noqa: E402
from mmdistill.errors import ConfigError  # noqa: E402
from mmdistill.interfaces import Adapter, RolloutRequest, TeacherGuidance  # noqa: E402
from mmdistill.modalities.flow.adapter import FlowAdapter  # noqa: E402
from mmdistill.modalities.flow.config import FlowEvalConfig, FlowRolloutConfig, TinyFlowConfig  # noqa: E402
from mmdistill.modalities.flow.task import ShapesTask  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=8, num_layers=1, num_attention_heads=2, attention_head_dim=8, text_hidden_size=16, text_layers=1)


def make_adapter() -> FlowAdapter:
    return FlowAdapter(FlowAdapter.build_tokenizer(TokenizerConfig(), ShapesTask(), {}))


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (FlowRolloutConfig, {"num_steps": 0}, "num_steps: 0 is below the smallest allowed value 1"),
        (FlowRolloutConfig, {"noise_level": -0.5}, "noise_level: -0.5 is below the smallest allowed value 0.0"),
        (FlowRolloutConfig, {"group_size": 0}, "group_size: 0 is below"),
        (FlowRolloutConfig, {"logprob_reduce": "max"}, "logprob_reduce: 'max' is not one of"),
        (FlowEvalConfig, {"n": 0}, "n: 0 is below"),
        (FlowEvalConfig, {"grid": -1}, "grid: -1 is below"),
        (FlowEvalConfig, {"batch_size": 0}, "batch_size: 0 is below"),
        (TinyFlowConfig, {"arch": "unet"}, "arch: 'unet' is not one of"),
        (TinyFlowConfig, {"shift": 0.0}, "shift: 0.0 must be > 0"),
    ],
)
def test_config_sections_check_their_ranges(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_defaults_are_the_former_core_defaults():
    assert FlowRolloutConfig() == FlowRolloutConfig(
        group_size=1, temperature=1.0, num_steps=10, guidance_scale=1.0, noise_level=0.7, logprob_reduce="sum"
    )
    assert FlowEvalConfig() == FlowEvalConfig(
        n=200, split="test", batch_size=200, num_steps=10, guidance_scale=1.0, grid=16
    )


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "flow").glob("*.yaml")))
def test_every_packaged_flow_section_builds(name):
    raw = yaml.safe_load((REPO / "configs" / "flow" / name).read_text())
    for st in raw["stages"]:
        FlowRolloutConfig(**{**raw.get("rollout", {}), **st.get("rollout", {})})
        FlowEvalConfig(**{**raw.get("eval", {}), **st.get("eval", {})})
    for m in raw["models"].values():
        if "tiny" in m:
            TinyFlowConfig(**m["tiny"])


def test_the_adapter_declares_its_spec_and_meets_the_protocol():
    spec = FlowAdapter.spec
    assert (spec.rollout_config, spec.eval_config, spec.tiny_config) == (
        FlowRolloutConfig,
        FlowEvalConfig,
        TinyFlowConfig,
    )
    assert spec.supports_routing and spec.needs_tokenizer and spec.default_task == "shapes" and spec.model_kinds == ()
    assert isinstance(make_adapter(), Adapter)


def test_checkpoint_claims_tokenizers_unwrap_and_fingerprints(tmp_path):
    adapter = make_adapter()
    student = adapter.load_model(ModelConfig(tiny=TinyFlowConfig(**TINY, seed=1)), "s")
    adapter.save(student, tmp_path / "pipe")
    assert FlowAdapter.claims_checkpoint(tmp_path / "pipe") and not FlowAdapter.claims_checkpoint(tmp_path)
    adapter.tokenizer.save_pretrained(str(tmp_path / "run" / "tokenizer"))
    prompt = ShapesTask().problems("test", 1)[0].prompt
    for path in (tmp_path / "pipe", tmp_path / "run", tmp_path / "run" / "tokenizer"):
        assert FlowAdapter.load_tokenizer(path)(prompt).input_ids == adapter.tokenizer(prompt).input_ids, path
    assert FlowAdapter.load_tokenizer(tmp_path / "nothing") is None
    assert FlowAdapter.check_tokenizer_of(str(tmp_path / "pipe"), adapter.tokenizer, "s") is None
    assert adapter.unwrap(student) is student and adapter.dist_metrics(None, None) == {}
    fingerprint = adapter.stage_fingerprint(student)
    assert len(fingerprint) == 64 and fingerprint == adapter.stage_fingerprint(student)
    assert fingerprint != adapter.stage_fingerprint(
        adapter.load_model(ModelConfig(tiny=TinyFlowConfig(**TINY, seed=2)), "t")
    )
    with pytest.raises(ConfigError, match="models.x.kind"):
        adapter.load_model(ModelConfig(tiny=TinyFlowConfig(**TINY), kind="cross_tokenizer"), "x")


@pytest.mark.parametrize(
    "request_, fragment",
    [
        (RolloutRequest(source="student", guidance=TeacherGuidance(), settings=FlowRolloutConfig()), "guidance"),
        (RolloutRequest(source="student", mixture_beta=0.5, settings=FlowRolloutConfig()), "mixture_beta"),
        (
            RolloutRequest(source="student", privileged_template="{solution}", settings=FlowRolloutConfig()),
            "privileged_template",
        ),
        (RolloutRequest(source="dataset", settings=FlowRolloutConfig()), "dataset"),
        (RolloutRequest(source="student"), "FlowRolloutConfig"),
    ],
)
def test_requests_the_adapter_cannot_serve_are_refused(request_, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make_adapter().rollout(request_, None, None, ShapesTask(), [], torch.Generator())
