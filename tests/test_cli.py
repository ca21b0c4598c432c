"""The CLI verbs: list, eval --json, sample, --help, resume errors."""

from __future__ import annotations

import json

import pytest

from mmdistill.cli import main
from mmdistill.config import config_from_raw
from mmdistill.pipeline import run_pipeline
from mmdistill.registry import ADAPTERS, OBJECTIVES, TASKS


def test_list_shows_every_registered_name(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for reg in (OBJECTIVES, ADAPTERS, TASKS):
        for name in reg.names():
            assert f"  {name} " in out
    assert "configs/text/quickstart.yaml" in out
    assert {
        "opd",
        "reverse_kl",
        "forward_kl",
        "jsd",
        "gkd",
        "sft",
        "grpo",
        "hard_ce",
        "scope",
        "kepo",
        "sod",
        "uniopd",
    } <= set(OBJECTIVES.names())


@pytest.mark.parametrize("verb", ["train", "eval", "sample", "list"])
def test_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0 and "usage: mmdistill" in capsys.readouterr().out


def test_eval_json_and_sample(tiny_raw, capsys):
    tiny_raw["stages"] = tiny_raw["stages"][:1]
    run_pipeline(config_from_raw(tiny_raw), quiet=True)
    ckpt = f"{tiny_raw['run_dir']}/teacher_sft/final"
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                ckpt,
                "--task",
                "arith",
                "--set",
                "max_value=9",
                "--n",
                "6",
                "--k",
                "3",
                "--temperature",
                "1.0",
                "--json",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 6 and 0 <= res["pass@1"] <= res["pass@3"] <= 1
    assert main(["sample", ckpt, "--task", "arith", "--set", "max_value=9", "--n", "2", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("question: ") == 2 and out.count("answer: ") == 2 and out.count("correct: ") == 2


def test_eval_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "is not a saved checkpoint of any adapter" in capsys.readouterr().err


def test_resume_without_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_existing_run_dir_is_not_clobbered(tiny_raw, tmp_path, capsys):
    import yaml

    tiny_raw["stages"] = tiny_raw["stages"][:1]
    tiny_raw["stages"][0]["train"]["steps"] = 1
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    assert main(["train", str(p), "--quiet"]) == 0
    assert main(["train", str(p), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
