"""The README's runnable snippets, run as written on tiny runs made here, so a README promise that breaks fails CI.

A python block runs when the line before its fence is an HTML comment `<!-- test: NAME -->`; only its
run directory (`runs/quickstart`, `runs/shapes_flow_opd`) is replaced by a run this file trains for a
step or two with the library (the same configs, tiny models).  Unmarked blocks are not run.  The
scripts in examples/ run here too, with the arguments their docstrings show.

    python -m pytest tests/test_readme.py -q -o addopts=""
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmdistill.config import config_from_raw
from mmdistill.pipeline import run_pipeline

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"^<!-- test: ([\w-]+) -->\n```python\n(.*?)^```$", re.M | re.S)
# marker -> the run directory its block reads (replaced by a tiny run of the same config)
RUN_DIRS = {
    "text-loading": "runs/quickstart",
    "flow-loading": "runs/shapes_flow_opd",
    "flow-loading-as-trained": "runs/shapes_flow_opd",
}


def readme_blocks() -> dict[str, str]:
    blocks: dict[str, str] = {}
    for name, code in MARKED.findall((REPO / "README.md").read_text(encoding="utf-8")):
        assert name not in blocks, f"README.md: two blocks are marked `<!-- test: {name} -->`; give each its own name"
        blocks[name] = code
    return blocks


def test_the_loading_snippets_are_marked():
    """Removing a marker would silently stop testing its promise."""
    assert set(readme_blocks()) >= set(RUN_DIRS), (
        f"README.md lacks markers {sorted(set(RUN_DIRS) - set(readme_blocks()))}"
    )


def test_every_marked_block_has_a_run():
    unknown = sorted(set(readme_blocks()) - set(RUN_DIRS))
    assert not unknown, f"README.md marks {unknown}; add each to RUN_DIRS in tests/test_readme.py (the run it reads)"


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    """configs/text/quickstart.yaml with a tiny teacher, one step per stage, a 4-problem evaluation."""
    raw = yaml.safe_load((REPO / "configs" / "text" / "quickstart.yaml").read_text())
    run = tmp_path_factory.mktemp("readme_text") / "quickstart"
    raw.update(run_dir=str(run), device="cpu")
    raw["models"]["teacher_init"]["tiny"].update(hidden_size=32, num_heads=2, num_kv_heads=1)
    raw["eval"].update(n=4, batch_size=4, max_new_tokens=4)
    raw["rollout"].update(max_new_tokens=4)
    for stage in raw["stages"]:
        if stage.get("kind") != "eval":
            stage["train"].update(steps=1, batch_size=2, warmup_steps=0, save_every=1, log_every=1)
            stage["train"].pop("eval_every", None)
    run_pipeline(config_from_raw(raw), quiet=True)
    assert (run / "student_opd" / "final").is_dir()
    return run


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory) -> Path:
    """configs/flow/shapes_flow_opd.yaml cut to its `flow_opd` stage (routed teachers, anchor) from the
    tiny base model, one step, a pipeline of 8 x 8 pixels."""
    pytest.importorskip("diffusers")
    raw = yaml.safe_load((REPO / "configs" / "flow" / "shapes_flow_opd.yaml").read_text())
    run = tmp_path_factory.mktemp("readme_flow") / "shapes_flow_opd"
    raw.update(run_dir=str(run), device="cpu")
    raw["models"] = {"base_init": raw["models"]["base_init"]}
    raw["models"]["base_init"]["tiny"].update(
        image_size=8, num_layers=1, num_attention_heads=2, attention_head_dim=8, text_hidden_size=16, text_layers=1
    )
    raw["rollout"].update(num_steps=2, group_size=2)
    raw["eval"].update(n=2, batch_size=2, num_steps=2, grid=2)
    stage = next(s for s in raw["stages"] if s["name"] == "flow_opd")
    stage.update(student="base_init", teachers={"color": "base_init", "position": "base_init"}, anchor="base_init")
    stage["train"].update(steps=1, batch_size=2, save_every=1, log_every=1)
    stage["train"].pop("eval_every", None)
    raw["stages"] = [stage]
    run_pipeline(config_from_raw(raw), quiet=True)
    assert (run / "flow_opd" / "final" / "model_index.json").is_file()
    return run


def run_block(name: str, run: Path, cwd: Path, monkeypatch) -> dict:
    """Execute the README block `name` as written, its run directory replaced by `run`, in `cwd`."""
    code = readme_blocks()[name]
    assert RUN_DIRS[name] in code, f"README block {name!r} no longer reads {RUN_DIRS[name]}; update RUN_DIRS"
    monkeypatch.chdir(cwd)
    namespace: dict = {"__name__": f"readme_{name.replace('-', '_')}"}
    exec(compile(code.replace(RUN_DIRS[name], str(run)), f"README.md:{name}", "exec"), namespace)
    return namespace


def test_text_loading_snippet_runs_as_written(text_run, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    ns = run_block("text-loading", text_run, tmp_path, monkeypatch)
    models = [v for v in ns.values() if isinstance(v, PreTrainedModel)]
    assert models, "the text-loading block loads no transformers model"
    tokenizers = [v for v in ns.values() if hasattr(v, "convert_tokens_to_ids")]
    assert tokenizers, "the text-loading block loads no tokenizer"
    ids = tokenizers[0]("Q: 1 + 1 ?", return_tensors="pt").input_ids
    assert models[0](ids).logits.shape[-1] >= len(tokenizers[0])


@pytest.mark.parametrize("name", ["flow-loading", "flow-loading-as-trained"])
def test_flow_loading_snippets_run_as_written_and_give_an_image(flow_run, tmp_path, monkeypatch, name):
    from PIL import Image

    ns = run_block(name, flow_run, tmp_path, monkeypatch)
    images = [v for v in ns.values() if isinstance(v, Image.Image)]
    assert images, f"the {name} block produces no PIL image"
    assert images[0].size == (8, 8) and images[0].mode == "RGB"
    for png in tmp_path.glob("*.png"):  # what the block saved opens as the same image
        assert Image.open(png).size == (8, 8)


def test_examples_load_the_saved_checkpoints_without_mmdistill(text_run, flow_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    question = "Ann has 6 marbles . She gets 6 more . How many marbles does Ann have ?"
    monkeypatch.setattr(sys, "argv", ["load_with_transformers.py", str(text_run / "student_opd" / "final"), question])
    runpy.run_path(str(REPO / "examples" / "load_with_transformers.py"), run_name="__main__")
    capsys.readouterr()
    out = tmp_path / "sample.png"
    ckpt = str(flow_run / "flow_opd" / "final")
    monkeypatch.setattr(
        sys, "argv", ["load_with_diffusers.py", ckpt, "a red circle on the left of a blue square", str(out)]
    )
    runpy.run_path(str(REPO / "examples" / "load_with_diffusers.py"), run_name="__main__")
    assert capsys.readouterr().out.strip() == f"{out}: 8x8 RGB" and out.stat().st_size > 0
