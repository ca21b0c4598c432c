"""Config loading, overrides and the one-line errors (message and exit code)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmdistill.cli import main
from mmdistill.config import RunConfig, config_from_raw, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, raw) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_loads_and_overrides(tmp_path, tiny_raw):
    cfg = load_config(
        write(tmp_path, tiny_raw), ["stages.student_opd.train.steps=7", "seed=3", "stages.student_opd.objective.topk=5"]
    )
    assert isinstance(cfg, RunConfig)
    opd = next(s for s in cfg.stages if s.name == "student_opd")
    assert opd.train.steps == 7 and cfg.seed == 3
    assert opd.objective == {"type": "reverse_kl", "topk": 5}
    assert opd.train.lr == pytest.approx(0.003)


def test_top_level_sections_are_stage_defaults(tmp_path, tiny_raw):
    tiny_raw["train"] = {"max_grad_norm": 0.5, "steps": 99}
    cfg = config_from_raw(tiny_raw)
    assert all(s.train.max_grad_norm == 0.5 for s in cfg.stages if s.kind == "train")
    assert [s.train.steps for s in cfg.stages if s.kind == "train"] == [4, 4]  # a stage's own keys win


def test_single_stage_config_without_stages(tmp_path, tiny_raw):
    raw = {k: v for k, v in tiny_raw.items() if k != "stages"}
    raw.update(student="student", teacher="teacher_init", objective={"type": "opd", "coef": 0.5})
    cfg = load_config(write(tmp_path, raw), ["objective.coef=0.25"])
    assert len(cfg.stages) == 1 and cfg.stages[0].objective == {"type": "opd", "coef": 0.25}


@pytest.mark.parametrize(
    "override, fragment",
    [
        (
            "stages.student_opd.train.stpes=3",
            "unknown config key 'stages.student_opd.train.stpes'; did you mean 'steps'?",
        ),
        ("stages.student_opd.train.lr=fast", "stages.student_opd.train.lr: expected a number, got 'fast'"),
        ("stages.student_opd.train.steps=1.5", "stages.student_opd.train.steps: expected an integer"),
        (
            "stages.student_opd.objective.topkk=1",
            "unknown config key 'stages.student_opd.objective.topkk'; did you mean 'topk'?",
        ),
        (
            "stages.student_opd.objective.type=reverse_kll",
            "unknown objective 'reverse_kll'; did you mean 'reverse_kl'?",
        ),
        (
            "stages.student_opd.teacher=nobody",
            "stages.student_opd.teacher: 'nobody' is neither a model nor an earlier stage",
        ),
        ("task.difficulty=two", "task.difficulty: expected an integer"),
        ("device=tpu", "device: 'tpu' is not one of"),
        ("models.student.path=/no/such/checkpoint", "models.student: give exactly one of 'path'"),
    ],
)
def test_bad_config_one_line_exit_2(tmp_path, tiny_raw, capsys, override, fragment):
    p = write(tmp_path, tiny_raw)
    code, err = run_cli(capsys, "train", str(p), override)
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err
    assert fragment in err, err


def test_opd_coef_override_reaches_objective(tmp_path, tiny_raw, capsys):
    tiny_raw["stages"][1]["objective"] = {"type": "opd"}
    cfg = load_config(write(tmp_path, tiny_raw), ["stages.student_opd.objective.coef=0.5"])
    assert cfg.stages[1].objective["coef"] == 0.5


def test_missing_checkpoint(tmp_path, tiny_raw, capsys):
    tiny_raw["models"]["teacher_init"] = {"path": str(tmp_path / "missing_ckpt")}
    code, err = run_cli(capsys, "train", str(write(tmp_path, tiny_raw)))
    assert code == 2 and "models.teacher_init.path: checkpoint" in err and "does not exist" in err


def test_missing_config_file(capsys, tmp_path):
    code, err = run_cli(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2 and "config file" in err and "not found" in err


def test_teacher_needed(tmp_path, tiny_raw, capsys):
    del tiny_raw["stages"][1]["teacher"]
    code, err = run_cli(capsys, "train", str(write(tmp_path, tiny_raw)))
    assert code == 2 and "needs a teacher" in err


def test_rejected_before_any_compute(tmp_path, tiny_raw, capsys):
    code, _ = run_cli(capsys, "train", str(write(tmp_path, tiny_raw)), "stages.student_opd.train.bogus=1")
    assert code == 2 and not Path(tiny_raw["run_dir"]).exists()


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_packaged_config_loads_and_builds(path, tmp_path):
    from mmdistill.train import build_objective, build_task

    raw = yaml.safe_load(path.read_text())
    overrides = []  # checkpoints another recipe writes (e.g. runs/xtoken_teacher/...): any existing directory will do here
    for name, m in (raw.get("models") or {}).items():
        if isinstance(m, dict) and str(m.get("path", "")).startswith("runs/"):
            (tmp_path / name).mkdir()
            overrides.append(f"models.{name}.path={tmp_path / name}")
    cfg = load_config(path, overrides)
    build_task(cfg.task)
    for st in cfg.stages:
        if st.kind == "train":
            build_objective(st.objective, st.name)
            if st.task:
                build_task(st.task)


def test_tokenizer_mismatch_refused_before_compute(tmp_path, tiny_raw, capsys):
    """A teacher checkpoint whose tokenizer differs from the run's: one line, exit 2, nothing trained."""
    from mmdistill.config import ModelConfig
    from mmdistill.modalities.text.adapter import CausalLMAdapter
    from mmdistill.modalities.text.config import TinyLMConfig
    from mmdistill.modalities.text.tokenizer import build_word_tokenizer

    other = CausalLMAdapter(build_word_tokenizer(["zebra", "quokka"]))
    ckpt = tmp_path / "foreign_teacher"
    other.save(
        other.load_model(ModelConfig(tiny=TinyLMConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1))),
        ckpt,
    )
    run_tok = tmp_path / "run_tok"
    build_word_tokenizer(["apples"]).save_pretrained(run_tok)
    tiny_raw["tokenizer"] = {"path": str(run_tok)}
    tiny_raw["models"]["teacher_init"] = {"path": str(ckpt)}
    code, err = run_cli(capsys, "train", str(write(tmp_path, tiny_raw)))
    assert code == 2 and "tokenizers differ" in err and "models.teacher_init" in err
    assert not (Path(tiny_raw["run_dir"]) / "teacher_sft").exists()


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("stages.student_opd.objective.type=jsd", None),
        ("rollout.group_size=0", "rollout.group_size: 0 is below the smallest allowed value 1"),
        ("stages.student_opd.train.log_every=0", "train.log_every: 0 is below"),
        ("eval.k=4", "eval.k: 4 samples per problem need temperature > 0"),
        ("stages.student_opd.train.micro_batch_size=3", "micro_batch_size=3 must divide train.batch_size=8"),
    ],
)
def test_values_checked_before_any_stage(tmp_path, tiny_raw, capsys, override, fragment):
    code, err = run_cli(
        capsys,
        "train",
        str(write(tmp_path, tiny_raw)),
        override,
        "stages.student_opd.objective.beta=1.5" if fragment is None else "seed=0",
    )
    assert code == 2 and "\n" not in err
    assert (fragment or "objective.beta must lie in [0, 1], got 1.5") in err, err
    assert not (Path(tiny_raw["run_dir"]) / "teacher_sft").exists()


def test_sft_from_teacher_needs_teacher(tmp_path, tiny_raw, capsys):
    tiny_raw["stages"][0]["objective"] = {"type": "sft", "source": "teacher"}
    code, err = run_cli(capsys, "train", str(write(tmp_path, tiny_raw)))
    assert code == 2 and "stages.teacher_sft.teacher: objective 'sft' needs a teacher" in err


def test_policy_gradient_needs_positive_temperature(tmp_path, tiny_raw, capsys):
    tiny_raw["stages"][1]["objective"] = {"type": "opd"}
    code, err = run_cli(capsys, "train", str(write(tmp_path, tiny_raw)), "stages.student_opd.rollout.temperature=0")
    assert code == 2 and "needs temperature > 0" in err


def test_directory_instead_of_config(tmp_path, capsys):
    code, err = run_cli(capsys, "train", str(tmp_path))
    assert code == 2 and "is a directory" in err


def test_renamed_keys_name_the_new_key(tmp_path, tiny_raw, capsys):
    cfg_path = write(tmp_path, tiny_raw)
    code, err = run_cli(capsys, "train", str(cfg_path), "models.teacher_init.cross_tokenizer=true")
    assert code == 2 and "kind: cross_tokenizer" in err and "\n" not in err
    code, err = run_cli(capsys, "train", str(cfg_path), "stages.student_opd.objective.type=xtoken_kl")
    assert code == 2 and "kind: cross_tokenizer" in err and "reverse_kl" in err and "\n" not in err


def test_rollout_and_eval_sections_belong_to_the_adapter(tmp_path, tiny_raw, capsys):
    """The text adapter's rollout section has no flow keys: one line naming the key."""
    code, err = run_cli(capsys, "train", str(write(tmp_path, tiny_raw)), "stages.student_opd.rollout.noise_level=0.5")
    assert code == 2 and "unknown config key 'stages.student_opd.rollout.noise_level'" in err
    cfg = config_from_raw(tiny_raw)
    from mmdistill.registry import ADAPTERS

    spec = ADAPTERS.get("hf_causal_lm").spec
    assert all(isinstance(s.rollout, spec.rollout_config) and isinstance(s.eval, spec.eval_config) for s in cfg.stages)


def test_unknown_model_kind_and_stage_kind(tmp_path, tiny_raw, capsys):
    tiny_raw["models"]["teacher_init"]["kind"] = "telepathic"
    code, err = run_cli(capsys, "train", str(write(tmp_path, tiny_raw)))
    assert code == 2 and "models.teacher_init.kind: 'telepathic' is not a model kind" in err
    del tiny_raw["models"]["teacher_init"]["kind"]
    tiny_raw["stages"][-1]["kind"] = "celebrate"
    code, err = run_cli(capsys, "train", str(write(tmp_path, tiny_raw)))
    assert code == 2 and "unknown stage kind 'celebrate'" in err
