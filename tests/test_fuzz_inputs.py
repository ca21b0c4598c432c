"""Property tests: generated configs, overrides and task files thrown at the loader.

Whatever comes in, the loader either returns a config or raises an `MmdistillError` (one line,
exit 2 at the CLI): never another exception, never a traceback.  About 700 generated inputs per
run (derandomized, so CI is reproducible; raise the counts locally to search further).

    python -m pytest tests/test_fuzz_inputs.py -q
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import yaml
from conftest import TINY_RAW
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmdistill.cli import main
from mmdistill.config import apply_override, config_from_raw
from mmdistill.errors import MmdistillError

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KEYS = [
    "seed",
    "device",
    "adapter",
    "run_dir",
    "task.type",
    "task.difficulty",
    "task.max_value",
    "tokenizer.level",
    "models.student.tiny.hidden_size",
    "models.student.path",
    "models.student.kind",
    "models.student.dtype",
    "models.student.lora.r",
    "models.teacher_init.prune.keep_layers",
    "rollout.max_new_tokens",
    "rollout.temperature",
    "rollout.group_size",
    "eval.n",
    "eval.k",
    "eval.temperature",
    "eval.split",
    "train.lr",
    "train.steps",
    "stages.teacher_sft.train.lr",
    "stages.teacher_sft.train.batch_size",
    "stages.teacher_sft.train.micro_batch_size",
    "stages.student_opd.objective.type",
    "stages.student_opd.objective.beta",
    "stages.student_opd.objective.topk",
    "stages.student_opd.teacher",
    "stages.student_opd.kind",
    "stages.evaluate.evaluate.x",
    "stages.nope.train.lr",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["~", "", "-1", ".nan", ".inf", "1e400", "[1, 2]", "{a: 1}", "reverse_kl"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


def _load(raw: dict) -> None:
    try:
        config_from_raw(raw)
    except MmdistillError:
        pass


@FUZZ
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=20)), values), max_size=4))
def test_generated_overrides_never_raise_anything_else(pairs):
    raw = copy.deepcopy(TINY_RAW)
    for key, value in pairs:
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
        if isinstance(value, float) and not math.isfinite(value):
            text = ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
        try:
            apply_override(raw, f"{key}={text}")
        except MmdistillError:
            return
    _load(raw)


@FUZZ
@given(
    st.dictionaries(st.sampled_from([k.split(".")[0] for k in KEYS] + ["stages", "models", "zzz"]), values, max_size=5)
)
def test_generated_documents_never_raise_anything_else(doc):
    raw = copy.deepcopy(TINY_RAW)
    raw.update(doc)
    _load(raw)


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.dictionaries(
                st.sampled_from(["question", "answer", "solution", "problem", "q"]), scalars, max_size=3
            ).map(lambda d: json.dumps(d, default=str).encode()),
        ),
        max_size=5,
    ),
    st.sampled_from([b"", b"\xef\xbb\xbf"]),
)
def test_generated_jsonl_files_never_raise_anything_else(tmp_path, lines, bom):
    path = tmp_path / "data.jsonl"
    path.write_bytes(bom + b"\n".join(lines))
    raw = copy.deepcopy(TINY_RAW)
    raw["task"] = {"type": "jsonl_math", "path": str(path), "test_fraction": 0.5}
    _load(raw)


@pytest.mark.parametrize(
    "text", ["\x00", "stages: [1, 2", "- a\n- b", "run_dir: !!python/object:os.system x", "&a [*a]", "a: " + "[" * 200]
)
def test_broken_yaml_files_are_one_line(tmp_path, capsys, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
