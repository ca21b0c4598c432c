"""Data-parallel training on 2 CPU processes (gloo) through `accelerate launch`: the text quickstart's tiny
twin, a flow smoke run and a robot smoke run each equal a 1-process run with the same global batch and the
same rollout shards.  Also: the minibatch split, and the checks of the new train keys.

    python -m pytest tests/test_distributed.py -m "slow or not slow"
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmdistill.config import config_from_raw
from mmdistill.errors import ConfigError
from mmdistill.interfaces import Rollout
from mmdistill.pipeline import run_pipeline
from mmdistill.train import minibatches

REPO = Path(__file__).resolve().parents[1]


def launch(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "mmdistill", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def final_weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    files = sorted((run / stage / "final").rglob("*.safetensors"))
    assert files, f"no weights in {run / stage / 'final'}"
    out = {}
    for f in files:
        out.update({f"{f.relative_to(run)}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def assert_same_run(run1: Path, run2: Path, stages: list[str], atol: float = 1e-5) -> None:
    for st in stages:
        w1, w2 = final_weights(run1, st), final_weights(run2, st)
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w1[k].float(), w2[k].float(), atol=atol, rtol=1e-4, msg=f"{st} {k}")
        m1 = [json.loads(x) for x in (run1 / st / "metrics.jsonl").read_text().splitlines()]
        m2 = [json.loads(x) for x in (run2 / st / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in m1] == [r["step"] for r in m2]
        for a, b in zip(m1, m2):
            assert abs(a["loss"] - b["loss"]) <= atol + 1e-4 * abs(a["loss"]), (st, a, b)
    r1, r2 = json.loads((run1 / "report.json").read_text()), json.loads((run2 / "report.json").read_text())
    for k, v in r1.items():
        if isinstance(v, float) and k != "seconds":
            assert abs(v - r2[k]) <= 1e-6, k


def two_vs_one(tmp_path: Path, raw: dict) -> tuple[Path, Path]:
    """Run `raw` on 2 processes (a subprocess) and on 1 with rollout_shards = 2 (in process)."""
    raw2 = copy.deepcopy(raw)
    raw2["run_dir"] = str(tmp_path / "two")
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(raw2))
    out = launch(["train", str(cfg), "--num-processes", "2", "--quiet"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    raw1 = copy.deepcopy(raw)
    raw1["run_dir"] = str(tmp_path / "one")
    for st in raw1["stages"]:
        if st.get("kind", "train") == "train":
            st.setdefault("train", {})["rollout_shards"] = 2
    run_pipeline(config_from_raw(raw1), quiet=True)
    return tmp_path / "one", tmp_path / "two"


def quickstart_raw() -> dict:
    """configs/text/quickstart.yaml with its models shrunk and 4 steps per stage (CPU-sized)."""
    raw = yaml.safe_load((REPO / "configs" / "text" / "quickstart.yaml").read_text())
    raw["device"] = "cpu"
    raw["models"]["teacher_init"]["tiny"].update(hidden_size=32, num_heads=2, num_kv_heads=1)  # 4 layers: prune [0, 3]
    raw["eval"] = {"n": 8, "batch_size": 8, "max_new_tokens": 12}
    raw["rollout"] = {"max_new_tokens": 12, "temperature": 1.0}
    for st in raw["stages"]:
        if st.get("kind", "train") == "train":
            st["train"].update(steps=4, batch_size=8, save_every=2, log_every=1, eval_every=2, warmup_steps=1)
    return raw


def test_text_two_processes_equal_one_process_with_the_same_shards(tmp_path):
    """The quickstart (SFT on the dataset, then on-policy reverse KL on sampled rollouts, evaluated every 2
    steps): weights, losses and the report agree."""
    raw = quickstart_raw()
    assert [s["name"] for s in raw["stages"]] == ["teacher_sft", "student_opd", "evaluate"]
    one, two = two_vs_one(tmp_path, raw)
    assert_same_run(one, two, ["teacher_sft", "student_opd"])
    assert (
        json.loads((two / "student_opd" / "checkpoints" / "step_000002" / "state.json").read_text())["rollout_shards"]
        == 2
    )


@pytest.mark.slow
def test_flow_two_processes_equal_one_process(tmp_path):
    pytest.importorskip("diffusers")
    from test_flow_adapter import raw_smoke

    raw = raw_smoke(tmp_path)
    one, two = two_vs_one(tmp_path, raw)
    stages = [s["name"] for s in raw["stages"] if s.get("kind", "train") == "train"]
    assert_same_run(one, two, stages, atol=1e-4)


@pytest.mark.slow
def test_robot_two_processes_equal_one_process(tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "vla" / "pointmass_opd.yaml").read_text())
    raw["device"] = "cpu"
    raw["stages"] = [s for s in raw["stages"] if s["name"] in ("warmup", "rkl_opd", "evaluate")]
    raw["stages"][0]["train"]["steps"] = 3
    raw["stages"][1]["train"]["steps"] = 3
    raw["stages"][-1]["evaluate"] = {"teacher": "teacher", "warmup": "warmup", "rkl_opd": "rkl_opd"}
    raw["eval"] = {**raw.get("eval", {}), "n": 8, "batch_size": 8, "grid": 0}
    one, two = two_vs_one(tmp_path, raw)
    assert_same_run(one, two, ["warmup", "rkl_opd"])


# ----------------------------------------------------------------------------- the pieces


def _rollout(B: int, groups: int) -> Rollout:
    return Rollout(
        context=[f"p{i}" for i in range(B)],
        steps=torch.arange(B),
        actions=torch.arange(B).float().unsqueeze(1),
        mask_B_T=torch.ones(B, 1),
        behavior_logp_B_T=torch.zeros(B, 1),
        group_ids_B=torch.arange(groups).repeat_interleave(B // groups),
    )


@pytest.mark.parametrize("whole_groups", [False, True])
def test_minibatches_cover_every_row_once_per_pass_and_keep_groups_whole(whole_groups):
    chunks = [("3/0", _rollout(8, 4)), ("3/1", _rollout(8, 4))]
    mbs = minibatches(chunks, 4, seed=0, stage="s", step=3, update=1, whole_groups=whole_groups)
    assert len(mbs) == 4 and all(len(parts) == 2 for parts in mbs)  # every minibatch takes a part of each chunk
    for c in range(2):
        rows = torch.cat([parts[c].steps for parts in mbs])
        assert sorted(rows.tolist()) == list(range(8))  # each row exactly once
        if whole_groups:
            for parts in mbs:
                gids = parts[c].group_ids_B
                assert all((gids == g).sum() == 2 for g in gids.unique())
    # the split of a chunk depends on its tag, pass and step only (not on the other chunks: any rank may hold it)
    alone = minibatches([chunks[1]], 4, seed=0, stage="s", step=3, update=1, whole_groups=whole_groups)
    assert [p[0].steps.tolist() for p in alone] == [p[1].steps.tolist() for p in mbs]
    other = minibatches(chunks, 4, seed=0, stage="s", step=3, update=2, whole_groups=whole_groups)
    assert [p[0].steps.tolist() for p in other] != [p[0].steps.tolist() for p in mbs]
    # one minibatch: every chunk whole, in order, no shuffle
    assert [r.steps.tolist() for r in minibatches(chunks, 1, 0, "s", 3, 0, whole_groups)[0]] == [list(range(8))] * 2


@pytest.mark.parametrize(
    "train, fragment",
    [
        ({"minibatch_size": 3}, "minibatch_size=3 must divide train.batch_size=8"),
        ({"replay_rounds": -1}, "replay_rounds: -1 is below the smallest allowed value 0"),
        ({"rollout_shards": 0}, "rollout_shards: 0 is below the smallest allowed value 1"),
    ],
)
def test_the_new_train_keys_are_checked(train, fragment, tiny_raw):
    tiny_raw["stages"][1]["train"].update(train)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        config_from_raw(tiny_raw)


def test_replay_is_refused_for_sampled_action_objectives(tiny_raw):
    tiny_raw["stages"] = tiny_raw["stages"][:2]
    tiny_raw["stages"][1]["objective"] = {"type": "opd"}
    tiny_raw["stages"][1]["train"]["replay_rounds"] = 2
    with pytest.raises(Exception, match="cannot be replayed"):
        run_pipeline(config_from_raw(tiny_raw), quiet=True)


def test_shards_that_do_not_divide_the_prompts_are_one_clear_error(tiny_raw):
    tiny_raw["stages"] = tiny_raw["stages"][:1]
    tiny_raw["stages"][0]["train"]["rollout_shards"] = 3
    with pytest.raises(ConfigError, match="cut into 3 rollout shards"):
        run_pipeline(config_from_raw(tiny_raw), quiet=True)
