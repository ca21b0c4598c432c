"""The text benchmarks' correctness (no timing thresholds): the reverse-KL variants of text-loss-memory agree
with the naive full-logits loss in value and gradients, text-step's reverse-KL step trains the student through
the registered `reverse_kl` objective, both return their keys.

    python -m pytest tests/test_bench_text.py -q
"""

from __future__ import annotations

import sys

import pytest
import torch

from mmdistill.bench import text_loss_memory as M
from mmdistill.bench import text_step as S
from mmdistill.errors import MmdistillError
from mmdistill.modalities.text.config import TinyLMConfig

V, T, H = 37, 6, 8


def _loss_and_grads(x: dict, loss_fn) -> tuple[float, torch.Tensor, torch.Tensor]:
    for t in (x["student_hidden_B_T_H"], x["student_head_V_H"]):
        t.grad = None
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), x["student_hidden_B_T_H"].grad.clone(), x["student_head_V_H"].grad.clone()


LOSSES = {
    "chunked": lambda x: M.chunked_reverse_kl(x, chunk_size=5),  # 12 rows: three chunks, the last one short
    "topk_k_equals_V": lambda x: M.topk_reverse_kl(x, M.teacher_topk(x, k=V, chunk_size=5), chunk_size=5),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_variants_match_naive_in_value_and_gradients(name):
    x = M.loss_inputs(batch=2, seq_len=T, vocab_size=V, hidden=H, seed=3)
    ref_loss, ref_dh, ref_dw = _loss_and_grads(x, lambda: M.naive_reverse_kl(x))
    loss, dh, dw = _loss_and_grads(x, lambda: LOSSES[name](x))
    assert ref_loss > 0.01, f"reverse KL of two random heads should be clearly positive, got {ref_loss}"
    assert abs(loss - ref_loss) < 1e-5, f"{name}: loss {loss} vs naive {ref_loss}"
    torch.testing.assert_close(
        dh, ref_dh, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: d loss / d hidden differs: {m}"
    )
    torch.testing.assert_close(dw, ref_dw, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: d loss / d head differs: {m}")


def test_chunked_matches_naive_on_the_kept_tokens_under_a_partial_mask():
    x = M.loss_inputs(batch=2, seq_len=T, vocab_size=V, hidden=H, seed=4)
    x["mask_B_T"][0, 4:] = 0
    x["mask_B_T"][1, :1] = 0
    keep = x["mask_B_T"].bool()
    loss, dh, dw = _loss_and_grads(x, lambda: M.chunked_reverse_kl(x, chunk_size=4))
    # reference: the naive loss over only the kept tokens, as one sequence
    ref = dict(
        x,
        mask_B_T=torch.ones(1, int(keep.sum())),
        student_hidden_B_T_H=x["student_hidden_B_T_H"].detach()[keep][None].requires_grad_(),
        teacher_hidden_B_T_H=x["teacher_hidden_B_T_H"][keep][None],
    )
    ref_loss, ref_dh, ref_dw = _loss_and_grads(ref, lambda: M.naive_reverse_kl(ref))
    assert abs(loss - ref_loss) < 1e-5
    torch.testing.assert_close(dh[keep], ref_dh[0], atol=1e-6, rtol=1e-4)
    assert torch.all(dh[~keep] == 0), "masked positions get no gradient"
    torch.testing.assert_close(dw, ref_dw, atol=1e-6, rtol=1e-4)


def test_chunked_rows_are_capped_by_the_library_logits_budget():
    from mmdistill.kernels import LOGITS_BUDGET, rows_per_chunk

    assert rows_per_chunk(1024, 151_936) == LOGITS_BUDGET // 151_936 < 1024
    assert rows_per_chunk(1024, 4096) == 1024


def test_loss_worker_in_a_subprocess_reports_peak_and_seconds():
    row = M._run_loss_config(dict(method="chunked", batch=1, seq_len=16, vocab_size=4096, hidden=64, chunk_size=8))
    assert row["status"] == "ok", row
    assert row["peak_bytes"] > 0 and row["seconds"] > 0 and row["loss"] > 0


def test_naive_estimate_extends_the_measured_line():
    rows = [
        {"method": "naive", "status": "ok", "tokens": 1024, "peak_bytes": 3.0e9},
        {"method": "naive", "status": "ok", "tokens": 2048, "peak_bytes": 6.0e9},
    ]
    assert M._naive_estimate(rows, 4096, vocab_size=1000) == pytest.approx(12.0e9)
    assert M._naive_estimate([], 100, vocab_size=1000) == M.NAIVE_LOGIT_COPIES * 100 * 1000 * 4


def test_reverse_kl_step_changes_the_student_and_not_the_teacher():
    tiny_s = TinyLMConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, seed=1)
    tiny_t = TinyLMConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=0)
    s = S.build_step_setup(
        torch.device("cpu"), batch=2, max_new_tokens=5, vocab_size=128, student=tiny_s, teacher=tiny_t
    )
    before_s = {k: v.clone() for k, v in s.student.state_dict().items()}
    before_t = {k: v.clone() for k, v in s.teacher.state_dict().items()}
    loss = S.reverse_kl_step(s, S.make_optimizer(s.student, lr=1e-2), torch.Generator().manual_seed(0))
    assert loss > 0 and torch.isfinite(torch.tensor(loss))
    changed = [k for k, v in s.student.state_dict().items() if not torch.equal(v, before_s[k])]
    assert changed, "one reverse-KL step left every student weight unchanged"
    assert all(torch.equal(v, before_t[k]) for k, v in s.teacher.state_dict().items()), "the teacher must stay frozen"
    rollout = s.adapter.sample(s.student, s.questions, 5, 1.0, torch.Generator().manual_seed(1))
    assert rollout.mask_B_T.sum() == 2 * 5, "EOS is disabled: every row samples all new tokens"


def test_reverse_kl_loss_is_the_token_mean_of_the_full_distribution_reverse_kl():
    tiny_s = TinyLMConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, seed=1)
    tiny_t = TinyLMConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=0)
    s = S.build_step_setup(
        torch.device("cpu"), batch=2, max_new_tokens=4, vocab_size=128, student=tiny_s, teacher=tiny_t
    )
    assert s.objective.registry_name == "reverse_kl"
    rollout = s.adapter.sample(s.student, s.questions, 4, 1.0, torch.Generator().manual_seed(2))
    teacher = S.score_teacher(s, rollout)
    loss = S.reverse_kl_loss(s, teacher, rollout)
    with torch.no_grad():
        d_B_T = s.adapter.step_dist(s.student, rollout).divergence(teacher, beta=1.0)  # beta 1: KL(S || T)
    expected = (d_B_T * rollout.mask_B_T).sum() / rollout.mask_B_T.sum()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)


def test_missing_trl_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.setitem(sys.modules, "trl.experimental.gkd", None)
    with pytest.raises(MmdistillError, match=r"pip install -e \.\[bench\]"):
        S._import_trl()


def test_text_step_quick_returns_required_keys(tmp_path):
    pytest.importorskip("trl")
    res = S.text_step(device="cpu", quick=True)
    for key in (
        "trl_step_seconds",
        "mmdistill_step_seconds",
        "ratio_vs_trl",
        "parts_seconds",
        "parts_sum_seconds",
        "ratio_vs_parts",
        "method",
        "setup",
    ):
        assert key in res, f"text-step result lacks {key!r}"
    assert set(res["parts_seconds"]) == {"generate", "teacher_scoring", "student_forward_backward_optimizer"}
    assert res["parts_sum_seconds"] == pytest.approx(sum(res["parts_seconds"].values()))
    assert res["ratio_vs_trl"] == pytest.approx(res["mmdistill_step_seconds"] / res["trl_step_seconds"])
    assert {"torch", "transformers", "trl", "threads", "device"} <= set(res["setup"])
    S.plot_text_step(res, tmp_path / "step.png")
    assert (tmp_path / "step.png").stat().st_size > 0


def test_text_loss_memory_quick_runs_the_library_path(tmp_path):
    from mmdistill.kernels import rows_per_chunk

    res = M.text_loss_memory(device="cpu", quick=True)
    V_quick = res["setup"]["vocab_size"]
    assert set(res["methods"]) == set(M.LOSS_METHODS) == {"chunked", "topk", "naive"}
    assert {r["method"] for r in res["rows"]} == set(M.LOSS_METHODS) and all(
        r["status"] == "ok" for r in res["rows"]
    ), res["rows"]
    for r in res["rows"]:
        assert r["rows_per_chunk"] == (None if r["method"] == "naive" else rows_per_chunk(1024, V_quick))
    losses = {r["method"]: r["loss"] for r in res["rows"] if r["batch"] == 1}
    assert losses["chunked"] == pytest.approx(losses["naive"], rel=1e-5)
    assert res["ratio_chunked_vs_naive"] is not None and "ratio_fused_vs_naive" not in res
    M.plot_loss_memory(res, tmp_path / "mem.png")
    assert (tmp_path / "mem.png").stat().st_size > 0


def test_loss_memory_plot_draws_measured_and_estimated_rows(tmp_path):
    rows = [
        {"method": m, "batch": b, "role": "grid", "status": "ok", "peak_gib": 1.0 * b, "seconds": 2.0 * b}
        for m in M.LOSS_METHODS
        for b in (1, 2)
        if not (m == "naive" and b == 2)
    ]
    rows.append({"method": "naive", "batch": 2, "role": "grid", "status": "skipped", "estimated_peak_gib": 9.0})
    res = {
        "rows": rows,
        "setup": {"seq_len": 8, "vocab_size": V, "hidden": H, "device": "cpu", "threads": 1, "batches": [1, 2]},
    }
    M.plot_loss_memory(res, tmp_path / "mem.png")
    assert (tmp_path / "mem.png").stat().st_size > 0


def test_cli_knows_the_text_benchmarks(capsys):
    from mmdistill.cli import main

    assert main(["bench", "no-such-bench"]) == 2
    err = capsys.readouterr().err
    assert "text-step" in err and "text-loss-memory" in err and "flow-sampling" in err
