"""The `diffusers_flow` adapter in the training loop: loading, routing, merging, saving, the shapes
task, config errors, the smoke pipeline and the sampling benchmark.

    python -m pytest tests/test_flow_adapter.py -q -o addopts=""
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("diffusers")

from mmdistill.cli import main  # noqa: E402
from mmdistill.config import ModelConfig, TokenizerConfig, config_from_raw, load_config  # noqa: E402
from mmdistill.errors import CompatibilityError  # noqa: E402
from mmdistill.interfaces import ObjectiveBatch  # noqa: E402
from mmdistill.modalities.flow import shapes as S  # noqa: E402
from mmdistill.modalities.flow.adapter import FlowAdapter  # noqa: E402
from mmdistill.modalities.flow.config import FlowRolloutConfig, TinyFlowConfig  # noqa: E402
from mmdistill.modalities.flow.task import ShapesProblem, ShapesTask  # noqa: E402
from mmdistill.pipeline import run_pipeline  # noqa: E402
from mmdistill.train import build_objective, merge_weights  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=8, num_layers=1, num_attention_heads=2, attention_head_dim=8, text_hidden_size=16, text_layers=1)


def make_adapter() -> FlowAdapter:
    return FlowAdapter(FlowAdapter.build_tokenizer(TokenizerConfig(), ShapesTask(), {}))


def tiny(adapter: FlowAdapter, seed: int, text_seed: int = 0) -> torch.nn.Module:
    return adapter.load_model(ModelConfig(tiny=TinyFlowConfig(**TINY, seed=seed, text_seed=text_seed)), f"m{seed}")


RC = FlowRolloutConfig(
    num_steps=3, guidance_scale=1.0, noise_level=0.7, logprob_reduce="sum"
)  # the stage's rollout section


def rollout_of(adapter, objective, student, teacher, probs, seed=0):
    """What the loop does: the objective's request with the stage's settings, then prepare."""
    request = replace(objective.request(0, 1, random.Random(0)), settings=RC)
    r = adapter.rollout(request, student, teacher, ShapesTask(), probs, torch.Generator().manual_seed(seed))
    return objective.prepare(r)


def problems(tags: list[str]) -> list[ShapesProblem]:
    pool = S.split_prompts("train")
    return [ShapesProblem(pool[i], t) for i, t in enumerate(tags)]


def test_routing_one_hot_gives_each_prompt_its_tags_teacher():
    adapter = make_adapter()
    student, t_color, t_pos = tiny(adapter, 1), tiny(adapter, 2), tiny(adapter, 3)
    probs = problems(["color", "position", "position", "color"])
    rollout = rollout_of(adapter, build_objective({"type": "flow_opd", "mar_coef": 0.0}, "s"), student, None, probs)
    with torch.no_grad():
        routed = adapter.step_dist({"color": t_color, "position": t_pos}, rollout).velocity_B_T_D
        v_color = adapter.step_dist(t_color, rollout).velocity_B_T_D
        v_pos = adapter.step_dist(t_pos, rollout).velocity_B_T_D
    torch.testing.assert_close(routed[[0, 3]], v_color[[0, 3]])
    torch.testing.assert_close(routed[[1, 2]], v_pos[[1, 2]])
    assert not torch.allclose(v_color, v_pos)
    with pytest.raises(Exception, match="no teacher"):
        adapter.step_dist({"color": t_color}, rollout)


def test_flow_opd_step_through_the_adapter_on_a_saved_and_reloaded_pipeline(tmp_path):
    adapter = make_adapter()
    student = tiny(adapter, 1)
    adapter.save(student, tmp_path / "student")
    assert (tmp_path / "student" / "model_index.json").exists()
    reloaded = adapter.load_model(ModelConfig(path=str(tmp_path / "student")), "student")
    for (k, a), b in zip(student.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k
    teachers = {"color": tiny(adapter, 2).requires_grad_(False), "position": tiny(adapter, 3).requires_grad_(False)}
    anchor = tiny(adapter, 4).requires_grad_(False)
    obj = build_objective({"type": "flow_opd", "variant": "gkd", "mar_coef": 0.04}, "s")
    rollout = rollout_of(adapter, obj, reloaded, None, problems(["color", "position"]))
    assert rollout.rewards_B.shape == (2,) and rollout.actions.shape == (2, 3, 3 * 8 * 8)
    s = adapter.step_dist(reloaded, rollout)
    with torch.no_grad():
        t, a = adapter.step_dist(teachers, rollout), adapter.step_dist(anchor, rollout)
    loss, metrics = obj(ObjectiveBatch(rollout, s, t, None, float(rollout.num_steps()), a))
    assert metrics["reward"] < 0 and metrics["mar"] > 0
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in reloaded.parameters() if p.grad is not None) > 0


def test_teacher_with_other_text_encoders_is_refused():
    adapter = make_adapter()
    tiny(adapter, 1, text_seed=0)
    with pytest.raises(CompatibilityError, match="text_encoder"):
        tiny(adapter, 2, text_seed=5)


def test_merge_is_the_weighted_average():
    adapter = make_adapter()
    a, b = tiny(adapter, 1), tiny(adapter, 2)
    sa = {k: v.clone() for k, v in a.state_dict().items()}
    sb = {k: v.clone() for k, v in b.state_dict().items()}
    merged = merge_weights([a, b], [0.25, 0.75], "m").state_dict()
    for k in sa:
        torch.testing.assert_close(merged[k], 0.25 * sa[k] + 0.75 * sb[k])


def test_flow_matching_rollout_targets_and_cond_dropout():
    adapter = make_adapter()
    student = tiny(adapter, 1)
    obj = build_objective({"type": "flow_matching", "cond_dropout": 0.5}, "s")
    probs = problems(["color"] * 64)
    r = rollout_of(adapter, obj, student, None, probs)
    s = r.steps
    x_s, target = s.x_t_B_T_D[:, 0], r.extras["target_v_B_T_D"][:, 0]
    sigma = s.sigma_B_T[:, :1]
    # x_s = (1 - s) x0 + s eps and v = eps - x0  =>  x0 = x_s - s v, which must be an image in [-1, 1]
    x0 = x_s - sigma * target
    assert float(x0.min()) >= -1 - 1e-5 and float(x0.max()) <= 1 + 1e-5
    dropped = (s.cond["prompt_embeds"] == s.cond["negative_prompt_embeds"]).flatten(1).all(1)
    assert 10 < int(dropped.sum()) < 54  # about half
    loss, m = obj(ObjectiveBatch(r, adapter.step_dist(student, r), None, None, float(r.num_steps())))
    assert loss > 0 and m["fm_loss"] == pytest.approx(float(loss.detach()), rel=1e-5)


def test_shapes_task_rewards_by_tag():
    task = ShapesTask(reward="tag")
    probs = problems(["color", "position"])
    images = task.render(probs, seed=0, size=16)
    rewards = task.rewards(probs, images)
    assert rewards["color"].min() > 0.9 and rewards["position"].min() > 0.9  # the renderer satisfies its prompts
    flipped = images[:, :, :, ::-1].copy()  # mirror: left/right relations break, colours do not
    r2 = task.rewards(probs, flipped)
    np.testing.assert_allclose(task.train_reward(probs, r2), [r2["color"][0], r2["position"][1]])
    assert {p.tag for p in (task.sample_train(random.Random(i)) for i in range(20))} == {"color", "position"}
    test = {p.scene for p in task.problems("test")}
    assert test and not test & set(S.split_prompts("train"))
    with pytest.raises(ValueError, match="tags"):
        ShapesTask(tags=["ocr"])


def raw_smoke(tmp_path: Path) -> dict:
    raw = yaml.safe_load((REPO / "configs" / "flow" / "shapes_flow_opd.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "run")
    raw["device"] = "cpu"
    raw["models"]["base_init"]["tiny"].update(TINY)
    raw["rollout"].update(num_steps=3, group_size=2)
    raw["eval"].update(n=8, batch_size=8, num_steps=3, grid=4)
    for st in raw["stages"]:
        if st.get("kind") != "eval":
            st["train"].update(steps=2, batch_size=4, eval_every=1, save_every=1)
    return raw


def test_flow_opd_pipeline_smoke_writes_the_report_and_grids_and_resumes(tmp_path, capsys):
    """The CI variant of configs/flow/shapes_flow_opd.yaml: every stage, two steps each."""
    raw = raw_smoke(tmp_path)
    report = run_pipeline(config_from_raw(raw), quiet=True)
    for key in ("base", "teacher_color", "teacher_position", "grpo_mix", "flow_opd"):
        assert 0.0 <= report[key]["color_reward"] <= 1.0 and 0.0 <= report[key]["position_reward"] <= 1.0, key
    run = Path(raw["run_dir"])
    assert json.loads((run / "report.json").read_text())["flow_opd"] == report["flow_opd"]
    for png in (
        "evaluate/base.png",
        "evaluate/flow_opd.png",
        "flow_opd/samples/step_000001.png",
        "flow_opd/samples/final.png",
        "report.png",
    ):
        assert (run / png).stat().st_size > 1000, png
    assert (run / "flow_opd" / "final" / "model_index.json").exists()
    rows = [json.loads(line) for line in (run / "teacher_color" / "metrics.jsonl").read_text().splitlines()]
    assert "eval_color_reward" in rows[0] and "student_reward" in rows[0]
    # resuming a finished run recomputes nothing and reports the same numbers
    assert run_pipeline(load_config(run / "config.yaml"), run_dir=run, quiet=True)["flow_opd"] == report["flow_opd"]
    # `mmdistill eval` reads the saved diffusers pipeline
    assert main(["eval", str(run / "flow_opd" / "final"), "--n", "4", "--num-steps", "2", "--device", "cpu"]) == 0
    assert "color_reward" in capsys.readouterr().out


def test_cold_start_by_sft_on_routed_teacher_samples(tmp_path):
    raw = raw_smoke(tmp_path)
    raw["stages"] = [s for s in raw["stages"] if s["name"] in ("base", "teacher_color", "teacher_position")]
    raw["stages"].append(
        {
            "name": "sft_cold",
            "student": "base",
            "teachers": {"color": "teacher_color", "position": "teacher_position"},
            "objective": {"type": "flow_matching", "source": "teacher"},
            "train": {"steps": 2, "batch_size": 4, "log_every": 1},
        }
    )
    run_pipeline(config_from_raw(raw), quiet=True)
    rows = [json.loads(line) for line in (Path(raw["run_dir"]) / "sft_cold" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["fm_loss"] > 0 for r in rows)
    assert (Path(raw["run_dir"]) / "sft_cold" / "final" / "model_index.json").exists()


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda r: r["stages"][4].update(anchor=None), "needs an anchor"),
        (lambda r: r["models"]["base_init"]["tiny"].update(bogus=1), "models.base_init.tiny.bogus"),
        (lambda r: r["stages"][4]["teachers"].update(color="nope"), "teachers.color"),
        (lambda r: r["models"]["cold_start"]["merge"].update(sources=["teacher_color"]), "at least two"),
        (lambda r: r["stages"][4].update(teacher="teacher_color"), "not both"),
    ],
)
def test_flow_config_errors_are_one_line(tmp_path, capsys, change, fragment):
    raw = yaml.safe_load((REPO / "configs" / "flow" / "shapes_flow_opd.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "run")
    change(raw)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_pipeline_is_refused_before_any_stage(tmp_path, capsys):
    raw = yaml.safe_load((REPO / "configs" / "flow" / "shapes_flow_opd.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "run")
    (tmp_path / "notapipe").mkdir()
    (tmp_path / "notapipe" / "config.json").write_text("{}")
    raw["models"]["base_init"] = {"path": str(tmp_path / "notapipe")}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a diffusers pipeline directory" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "base").exists()


def test_bench_flow_sampling_writes_ratio_and_matches_diffusers(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "flow-sampling", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ratio"] > 0 and res["euler_seconds"] > 0 and res["logprob_finite"]
    assert res["ode_max_abs_diff"] < 1e-5  # our loop at noise_level 0 is diffusers' Euler sampler


# ----------------------------------------------------------------------------- Flux and LoRA


def test_flux_noise_level_zero_reproduces_flux_pipeline():
    from mmdistill.modalities.flow import pipelines as P
    from mmdistill.sde import sample_sde

    pipe = P.build_tiny_flux_pipeline(["a", "red", "circle"], image_size=16)
    pipe.set_progress_bar_config(disable=True)
    cond = P.encode_prompts(pipe, ["a red circle", "a circle"], max_sequence_length=16)
    noise = torch.randn((2, *P.latent_shape(pipe, 16)), generator=torch.Generator().manual_seed(0))
    sigmas = P.pipeline_sigmas(pipe, 4, 16)  # linspace(1, 1/N) shifted by the resolution's mu
    ours = sample_sde(P.velocity_fn(pipe.transformer), noise, sigmas, cond, guidance_scale=3.5, noise_level=0.0)
    theirs = pipe(
        prompt_embeds=cond["prompt_embeds"],
        pooled_prompt_embeds=cond["pooled_prompt_embeds"],
        latents=P.pack_latents(noise),
        num_inference_steps=4,
        guidance_scale=3.5,
        height=16,
        width=16,
        output_type="latent",
    ).images
    torch.testing.assert_close(P.pack_latents(ours.extras["x0_B_C_H_W"]), theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(P.unpack_latents(P.pack_latents(noise), 8, 8), noise)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_lora_student_trains_only_lora_and_saves_a_merged_pipeline(tmp_path, arch):
    from mmdistill.config import LoraConfig

    adapter = make_adapter()
    cfg = TinyFlowConfig(**{**TINY, "image_size": 8 if arch == "sd3" else 16}, arch=arch, seed=1)
    student = adapter.load_model(ModelConfig(tiny=cfg, lora=LoraConfig(r=4, alpha=8)), "student")
    teacher = adapter.load_model(
        ModelConfig(tiny=TinyFlowConfig(**{**dataclass_dict(cfg), "seed": 2})), "teacher"
    ).requires_grad_(False)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    obj = build_objective({"type": "flow_opd", "variant": "gkd", "mar_coef": 0.0}, "s")
    r = rollout_of(adapter, obj, student, None, problems(["color", "position"]))
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        t = adapter.step_dist(teacher, r)
    loss, _ = obj(ObjectiveBatch(r, adapter.step_dist(student, r), t, None, float(r.num_steps())))
    loss.backward()
    opt.step()
    adapter.save(student, tmp_path / "s")
    assert (tmp_path / "s" / "lora_adapter" / "adapter_config.json").exists()
    merged = make_adapter().load_model(ModelConfig(path=str(tmp_path / "s")), "merged")
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.step_dist(merged, r).velocity_B_T_D,
            adapter.step_dist(student, r).velocity_B_T_D,
            rtol=1e-4,
            atol=1e-5,
        )
        assert not torch.allclose(adapter.step_dist(merged, r).velocity_B_T_D, t.velocity_B_T_D)


def dataclass_dict(cfg):
    import dataclasses

    return dataclasses.asdict(cfg)


def test_stop_at_ends_a_stage_when_the_eval_metric_reaches_the_target(tmp_path):
    raw = raw_smoke(tmp_path)
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0]["train"].update(steps=5, eval_every=1, stop_at={"color_reward": 0.0}, log_every=1)
    report = run_pipeline(config_from_raw(raw), quiet=True)
    rows = [json.loads(line) for line in (Path(raw["run_dir"]) / "base" / "metrics.jsonl").read_text().splitlines()]
    assert report["stages"]["base"]["steps"] == 1 and rows[-1]["stopped_early"] == 1.0 and len(rows) == 1
    raw["stages"][0]["train"]["eval_every"] = 0
    with pytest.raises(Exception, match="stop_at needs train.eval_every"):
        config_from_raw(raw)


def test_flat_reward_scale_is_the_mean_squared_velocity_difference():
    from mmdistill.objectives.flow_opd import velocity_distance

    g = torch.Generator().manual_seed(0)
    v, u = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    w, dt = torch.rand(2, 3, generator=g) * 10, -torch.rand(2, 3, generator=g)
    torch.testing.assert_close(velocity_distance(v, u, w, dt, "flat"), (v - u).square().mean(-1))


def test_interrupted_flow_grpo_stage_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Stop a Flow-GRPO stage after its 2nd checkpoint (as a kill would), rerun: the final
    transformer equals the one of an uninterrupted run, bit for bit."""
    from safetensors.torch import load_file

    def raw(run: str) -> dict:
        r = raw_smoke(tmp_path)
        r["run_dir"] = str(tmp_path / run)
        r["stages"] = [
            {
                "name": "g",
                "student": "base_init",
                "objective": {"type": "flow_grpo", "kl_beta": 0.04, "timestep_fraction": 0.5},
                "train": {"steps": 4, "batch_size": 4, "lr": 0.001, "save_every": 1, "log_every": 1},
            }
        ]
        return r

    run_pipeline(config_from_raw(raw("straight")), quiet=True)
    calls = {"n": 0}
    original = FlowAdapter.rollout

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, *a, **k)

    monkeypatch.setattr(FlowAdapter, "rollout", dying)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config_from_raw(raw("killed")), quiet=True)
    assert not (tmp_path / "killed" / "g" / "final").exists()
    resumed_calls = {"n": 0}

    def counting(self, *a, **k):
        resumed_calls["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(FlowAdapter, "rollout", counting)
    run_pipeline(load_config(tmp_path / "killed" / "config.yaml"), run_dir=tmp_path / "killed", quiet=True)
    assert resumed_calls["n"] == 2  # steps 3 and 4 only: it continued from the step-2 checkpoint
    a = load_file(tmp_path / "straight" / "g" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "killed" / "g" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pipelines_saved_by_the_run_reload_only_their_transformer(tmp_path, monkeypatch):
    from mmdistill.modalities.flow import pipelines as P

    adapter = make_adapter()
    student = tiny(adapter, 1)
    adapter.save(student, tmp_path / "a")
    adapter.save(tiny(adapter, 2), tmp_path / "b")
    monkeypatch.setattr(P, "load_pipeline", lambda *a, **k: pytest.fail("the whole pipeline was loaded again"))
    b = adapter.load_model(ModelConfig(path=str(tmp_path / "b")), "b")
    ref = tiny(make_adapter(), 2)
    for (k, x), y in zip(b.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(x, y), k


# ----------------------------------------------------------------------------- the saved format: plain diffusers


def index_of(path: Path) -> dict:
    return json.loads((path / "model_index.json").read_text())


def test_a_saved_pixel_pipeline_loads_with_plain_diffusers_and_samples_as_the_run_does(tmp_path):
    """`DiffusionPipeline.from_pretrained(dir)` with no arguments gives a PIL image; without the T5
    stand-in and with no T5 tokens it reproduces the adapter's Euler samples."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    from mmdistill.modalities.flow import pipelines as P

    adapter = make_adapter()
    student = tiny(adapter, 1)
    adapter.save(student, tmp_path / "s")
    index = index_of(tmp_path / "s")
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"] and index["vae"] == [
        "diffusers",
        "AutoencoderKL",
    ]
    assert index["tokenizer_3"][0] == "transformers"
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "s"))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2).images[0]
    assert isinstance(image, Image.Image) and image.size == (8, 8)
    # the T5 stand-in gives exactly the zeros diffusers appends without T5, max_sequence_length of them
    bare = P.load_pipeline(tmp_path / "s")
    assert bare.text_encoder_3 is None and bare.tokenizer_3 is None and bare.vae is None
    for n in (1, 5):
        ours = bare.encode_prompt("a red circle", None, None, do_classifier_free_guidance=False, max_sequence_length=n)
        theirs = pipe.encode_prompt(
            "a red circle", None, None, do_classifier_free_guidance=False, max_sequence_length=n
        )
        assert ours[0].shape[1] == 16 + n
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
    # the README's as-trained call: the adapter's evaluation samples (same noise), decoded by the passthrough VAE
    problems_ = [ShapesProblem(S.split_prompts("test")[0], "color")]
    r = adapter.sample(student, problems_, 3, 1.0, 0.0, "sum", torch.Generator().manual_seed(5))
    noise = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    as_trained = DiffusionPipeline.from_pretrained(str(tmp_path / "s"), text_encoder_3=None, tokenizer_3=None)
    as_trained.set_progress_bar_config(disable=True)
    kw = dict(latents=noise, num_inference_steps=3, guidance_scale=1.0, max_sequence_length=0)
    latents = as_trained(problems_[0].prompt, output_type="latent", **kw).images
    torch.testing.assert_close(latents, r.extras["x0_B_C_H_W"], rtol=0, atol=1e-5)
    pixels = as_trained(problems_[0].prompt, output_type="pt", **kw).images
    torch.testing.assert_close(pixels, P.decode_latents(adapter.pipe, r.extras["x0_B_C_H_W"]), rtol=0, atol=1e-4)


def test_the_passthrough_vae_is_the_identity_and_is_recognised():
    from mmdistill.modalities.flow import pipelines as P

    vae = P.build_passthrough_vae(8)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 6 - 3
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(x).sample, x, rtol=0, atol=2e-5)
        torch.testing.assert_close(vae.encode(x).latent_dist.mode(), x, rtol=0, atol=2e-5)
    assert P.is_passthrough_vae(vae) and P.is_passthrough_vae(P.build_passthrough_vae(8).to(torch.bfloat16))
    assert not P.is_passthrough_vae(P._tiny_vae(8, 3, 8, 1))
    assert P.is_null_t5(P.build_null_t5(32)) and not P.is_null_t5(None)


def test_real_t5_and_vae_are_saved_and_loaded_as_they_are_and_old_null_directories_still_load(tmp_path):
    """A pipeline with its own T5 and VAE (an SD3.5 checkpoint) gets no stand-in; a latent-space tiny
    pipeline gets only the T5 one; directories an older save wrote with null entries still load."""
    from diffusers import DiffusionPipeline
    from transformers import T5Config, T5EncoderModel

    from mmdistill.modalities.flow import pipelines as P

    words = ["a", "red", "circle"]
    pipe = P.build_tiny_sd3_pipeline(words, image_size=8, vae=True, num_layers=1, text_hidden_size=16, text_layers=1)
    torch.manual_seed(0)
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(pipe.tokenizer), d_model=32, d_kv=16, d_ff=32, num_layers=1, num_heads=2)
    )
    full = type(pipe)(**{**pipe.components, "text_encoder_3": t5, "tokenizer_3": pipe.tokenizer})
    P.save_pipeline(full, tmp_path / "full")
    vae_files = sorted(f.name for f in (tmp_path / "full" / "vae").iterdir())
    loaded = P.load_pipeline(tmp_path / "full")
    assert loaded.text_encoder_3 is not None and not P.is_null_t5(loaded.text_encoder_3)
    for (k, a), b in zip(t5.state_dict().items(), loaded.text_encoder_3.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(pipe.vae.state_dict().items(), loaded.vae.state_dict().values()):
        assert torch.equal(a, b), k
    assert index_of(tmp_path / "full")["tokenizer_3"] == ["transformers", "CLIPTokenizer"]

    P.save_pipeline(pipe, tmp_path / "latent")  # no T5: only the T5 stand-in
    assert sorted(f.name for f in (tmp_path / "latent" / "vae").iterdir()) == vae_files
    plain = DiffusionPipeline.from_pretrained(str(tmp_path / "latent"))
    assert P.is_null_t5(plain.text_encoder_3) and not P.is_passthrough_vae(plain.vae)
    assert P.load_pipeline(tmp_path / "latent").text_encoder_3 is None

    pixel = P.build_tiny_sd3_pipeline(words, image_size=8, num_layers=1, text_hidden_size=16, text_layers=1)
    pixel.save_pretrained(str(tmp_path / "old"))  # the former format: T5 and VAE recorded as null
    assert index_of(tmp_path / "old")["vae"] == [None, None]
    old = P.load_pipeline(tmp_path / "old")
    assert old.vae is None and old.text_encoder_3 is None
