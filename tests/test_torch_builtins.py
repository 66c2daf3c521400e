"""The hand-written vs torch built-in benchmark (``bench/torch_builtins.py``) at tiny sizes.

Both formulations of each kernel (the head's row batch norm and ``F.batch_norm``; the blocked attention and SDPA on
psi-scaled queries) are checked against float64 with the textbook formula's own float32 error as the bound
(``tests/numerics.py``), the psi fold into the queries against the literal psi in float64, the paired timing and the
verdicts on made-up numbers, and the report files.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import torch_builtins as tb  # noqa: E402

import allspark_seg.models.allspark as allspark_module  # noqa: E402
import allspark_seg.models.head as head_module  # noqa: E402
from allspark_seg.models.allspark import ChannelCrossAttention  # noqa: E402
from allspark_seg.models.attention import psi_scale, sdpa_attention  # noqa: E402
from allspark_seg.models.layers import standardize  # noqa: E402
from numerics import check32, rel_norm  # noqa: E402

ROWS, CHANNELS = 96, 8
TINY_ATTENTION = tb.AttentionCase("tiny", batch=2, width=6, positions=4, keys=3 * 6)
TINY_BN = tb.BatchNormCase("tiny", batch=2, grid=4, channels=CHANNELS)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["hand-written", "F.batch_norm"])
def test_both_row_batch_norms_are_as_close_to_float64_as_the_textbook_formula(name, precision):
    fn = tb.batch_norm_candidates()[name]
    bn, x, grad = tb.batch_norm_inputs(ROWS, CHANNELS, precision)
    low = x.dtype  # float32, or bfloat16 as the head's autocast product makes the rows
    ref64 = tb.reference_batch_norm(x, bn.weight, bn.bias, grad, bn.momentum)
    literal = tb.reference_batch_norm(x, bn.weight, bn.bias, grad, bn.momentum, dtype=low)
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        y = fn(bn, x)
    gx, gw, gb = torch.autograd.grad(y, (x, bn.weight, bn.bias), grad)
    assert y.dtype == low
    floor_ulps = 8 if precision == "fp32" else 1
    check32(f"{name} output", y, literal["output"], ref64["output"], floor_ulps=floor_ulps)
    check32(f"{name} grad input", gx, literal["grad input"], ref64["grad input"], floor_ulps=floor_ulps)
    for got, key in ((gw, "grad weight"), (gb, "grad bias"), (bn.running_mean, "running mean")):
        check32(f"{name} {key}", got.to(low), literal[key].to(low), ref64[key], floor_ulps=floor_ulps)
    check32(f"{name} running var", bn.running_var.to(low), literal["running var"], ref64["running var"])
    assert int(bn.num_batches_tracked) == 1


def test_builtin_row_batch_norm_matches_the_hand_written_one_in_float64():
    bn, x, grad = tb.batch_norm_inputs(ROWS, CHANNELS, "fp32")
    bn, x, grad = bn.double(), x.double(), grad.double()
    outs = {}
    for name, fn in tb.batch_norm_candidates().items():
        b = type(bn)(CHANNELS).double()
        b.load_state_dict(bn.state_dict())
        xi = x.clone().requires_grad_()
        y = fn(b, xi)
        outs[name] = (y, *torch.autograd.grad(y, (xi, b.weight, b.bias), grad), b.running_mean, b.running_var)
    for a, b in zip(outs["hand-written"], outs["F.batch_norm"], strict=True):
        assert rel_norm(a, b) < 1e-13


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_head_normalises_half_precision_rows_with_float32_statistics(dtype):
    """Under autocast the head's rows are float16/bfloat16: ``_batch_norm_rows`` gives them to ``F.batch_norm``,
    which accumulates in float32. (The hand-written kernel's float16 sum of squares overflows here: variance inf,
    output = bias.)"""
    gen = torch.Generator().manual_seed(5)
    rows, channels = 2048, 4
    x = torch.randn(rows, channels, generator=gen) * 8 + 3  # sum of squares ~1.5e5 > float16's 65504
    bn = torch.nn.BatchNorm2d(channels)
    ref = tb.reference_batch_norm(x.to(dtype), bn.weight, bn.bias, torch.ones(rows, channels), bn.momentum)
    y = head_module._batch_norm_rows(bn, x.to(dtype), (2, 32, 32))
    assert y.dtype == dtype
    eps = torch.finfo(dtype).eps  # the output's own rounding is eps / 2 relative per element
    assert rel_norm(y, ref["output"]) < 2 * eps
    assert rel_norm(bn.running_var, ref["running var"]) < 2 * eps
    assert rel_norm(bn.running_mean, ref["running mean"]) < 2 * eps


def test_the_head_picks_the_row_batch_norm_by_dtype():
    bn, x, _ = tb.batch_norm_inputs(ROWS, CHANNELS, "fp32")
    for rows, expected in ((x, head_module._hand_row_batch_norm), (x.bfloat16(), head_module._builtin_row_batch_norm)):
        a, b = copy.deepcopy(bn), copy.deepcopy(bn)
        assert torch.equal(head_module._batch_norm_rows(a, rows, (2, 6, 8)), expected(b, rows))
        assert torch.equal(a.running_var, b.running_var) and torch.equal(a.num_batches_tracked, b.num_batches_tracked)


def test_batch_norm_precision_reports_the_errors_of_each_candidate():
    report = tb.batch_norm_precision(ROWS, CHANNELS, "fp32", offset=2.0)
    bn, x, grad = tb.batch_norm_inputs(ROWS, CHANNELS, "fp32", offset=2.0)
    ref = tb.reference_batch_norm(x, bn.weight, bn.bias, grad, bn.momentum)
    y = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.1, bn.eps)
    assert set(report) == {"hand-written", "F.batch_norm"}
    assert report["F.batch_norm"]["output"]["norm"] == pytest.approx(rel_norm(y, ref["output"]), rel=1e-9)
    for errors in report.values():
        assert errors["dtype"] == "float32"
        for what in ("output", "gradients", "running stats"):
            assert 0 < errors[what]["norm"] <= errors[what]["max"] * ROWS * CHANNELS
            assert errors[what]["norm"] < 1e-5


def test_sdpa_on_psi_scaled_queries_is_the_literal_psi_attention_in_float64():
    """psi standardises each sample's whole (2C, S) logit matrix: the mean cancels in the row softmax and the
    standard deviation folds into the queries, so SDPA with ``scale=1`` computes the literal psi attention."""
    gen = torch.Generator().manual_seed(3)
    b, n, d, s = 2, 5, 6, 21
    queries = torch.randn(b, n, d, generator=gen, dtype=torch.float64) + 0.7  # a mean that psi removes
    k = torch.randn(n, s, generator=gen, dtype=torch.float64) - 0.4
    v = torch.randn(n, s, generator=gen, dtype=torch.float64)
    literal = standardize(queries.transpose(1, 2) @ k, 1e-5).softmax(dim=-1) @ v.T  # (B, D, N)
    rows = (queries * psi_scale(queries, k)[:, None, None]).transpose(1, 2).reshape(b * d, n)
    out = sdpa_attention(rows, k, v).view(b, d, n)
    assert rel_norm(out, literal) < 1e-13
    hand = tb.attention_candidates("fp32")["hand-written"](rows, k, v, 0.0).view(b, d, n)
    assert rel_norm(hand, literal) < 1e-13


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_model_sdpa_runs_the_flash_kernel_and_keeps_no_weights(dtype):
    """SDPA's CPU flash kernel needs rows of unit last stride: a transposed view would send it to the math kernel,
    which keeps the (M, S) weights for backward."""
    m, n, s = 64, 2, 256
    q = torch.randn(m, n).requires_grad_()
    k, v = (torch.randn(n, s).to(dtype).requires_grad_() for _ in range(2))
    assert tb.sdpa_kernel(lambda: sdpa_attention(q, k, v)) == "FLASH_ATTENTION"
    assert tb.saved_for_backward_mb(lambda: sdpa_attention(q, k, v)) * 2**20 < m * s  # not even 1 byte per weight
    assert tb.sdpa_kernel(lambda: sdpa_attention(q, k, v, 0.5)) == "MATH"  # dropout: the math kernel


@pytest.mark.parametrize("name", ["hand-written", "SDPA"])
def test_both_attentions_are_as_close_to_float64_as_the_materialised_attention(name):
    inputs = tb.attention_inputs(TINY_ATTENTION, "fp32")
    ref64, literal = tb.reference_attention(inputs), tb.reference_attention(inputs, torch.float32)
    q, k, v = (inputs[n].detach().clone().requires_grad_() for n in ("q", "k", "v"))
    y = tb.attention_candidates("fp32")[name](q, k, v, 0.0)
    grads = torch.autograd.grad(y, (q, k, v), inputs["grad"])
    check32(f"{name} output", y, literal["output"], ref64["output"])
    for g, key in zip(grads, ("grad q", "grad k", "grad v"), strict=True):
        check32(f"{name} {key}", g, literal[key], ref64[key])


def test_attention_precision_covers_every_candidate_in_its_dtype():
    fp32 = tb.attention_precision(TINY_ATTENTION, "fp32")
    bf16 = tb.attention_precision(TINY_ATTENTION, "bf16")
    assert set(fp32) == {"hand-written", "SDPA"} and set(bf16) == {"hand-written", "SDPA", "SDPA in fp32"}
    assert bf16["SDPA"]["dtype"] == "bfloat16"  # autocast runs SDPA in bfloat16
    assert bf16["hand-written"]["dtype"] == bf16["SDPA in fp32"]["dtype"] == "float32"
    eps = torch.finfo(torch.float32).eps
    for errors in fp32.values():
        assert errors["output"]["norm"] < 64 * eps and errors["gradients"]["norm"] < 64 * eps
        assert errors["output as bf16"]["norm"] < torch.finfo(torch.bfloat16).eps  # rounding to bf16 dominates


@pytest.mark.parametrize(
    ("training", "grad", "autocast", "expected"),
    [
        (False, False, True, "sdpa"),  # a bf16 run's teacher pass and inference
        (False, False, False, "blocked"),  # float32: SDPA has up to 1.9x the error (benchmark)
        (False, True, True, "blocked"),  # with autograd: not faster everywhere
        (True, False, True, "blocked"),  # dropout: SDPA's CPU kernel would materialise the weights
    ],
)
def test_the_cross_attention_uses_sdpa_only_where_it_was_measured_to_win(
    monkeypatch, training, grad, autocast, expected
):
    calls: list[str] = []
    for name, label in (("sdpa_attention", "sdpa"), ("blocked_attention", "blocked")):
        original = getattr(allspark_module, name)
        monkeypatch.setattr(allspark_module, name, lambda *a, f=original, lb=label: calls.append(lb) or f(*a))
    torch.manual_seed(0)
    attn = ChannelCrossAttention(8, 2, 3, (2, 2), memory=False).train(training)
    z_l, keys, values = torch.randn(2, 4, 8), torch.randn(4, 48), torch.randn(4, 48)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = attn.cross_attention(z_l, keys, values)
    assert calls == [expected] and out.shape == (2, 4, 8)


def test_the_sdpa_path_matches_the_blocked_path_under_autocast():
    torch.manual_seed(0)
    attn = ChannelCrossAttention(8, 2, 3, (2, 2), memory=False).eval()
    z_l, keys, values = torch.randn(2, 4, 8), torch.randn(4, 48), torch.randn(4, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blocked = attn.cross_attention(z_l, keys, values)  # autograd on: the blocked attention
        with torch.no_grad():
            fused = attn.cross_attention(z_l, keys, values)
    # both attend in float32 on the same bfloat16 projections; the output projection rounds to bfloat16
    assert fused.dtype == blocked.dtype == torch.bfloat16
    assert rel_norm(fused, blocked) <= torch.finfo(torch.bfloat16).eps


def test_paired_times_alternate_and_take_the_median_of_the_per_round_ratios(monkeypatch):
    clock = [0.0]
    calls: list[str] = []

    def make(name: str, cost: float):
        def fn() -> None:
            calls.append(name)
            clock[0] += cost

        return fn

    monkeypatch.setattr(tb.time, "perf_counter", lambda: clock[0])
    out = tb.paired_times({"a": make("a", 1.0), "b": make("b", 3.0)}, repeats=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then the order alternates
    assert out["median_s"] == {"a": 1.0, "b": 3.0}
    assert out["ratio"] == {"a": 1.0, "b": 3.0}
    assert out["times"]["b"] == [3.0] * 4


def test_saved_for_backward_counts_the_dropout_mask_of_the_blocked_attention():
    inputs = tb.attention_inputs(TINY_ATTENTION, "fp32")
    q, k, v = (inputs[n].requires_grad_() for n in ("q", "k", "v"))
    fn = tb.attention_candidates("fp32")["hand-written"]
    without = tb.saved_for_backward_mb(lambda: fn(q, k, v, 0.0))
    with_mask = tb.saved_for_backward_mb(lambda: fn(q, k, v, 0.5))
    m, s = q.shape[0], k.shape[1]
    assert with_mask - without == pytest.approx(m * s / 2**20)  # one byte per weight


def _fake_record(ratio: float, error: float) -> dict:
    timing = {"median_s": {"hand-written": 1.0, "F.batch_norm": ratio}, "ratio": {"F.batch_norm": ratio}}
    errors = {
        "hand-written": {q: {"norm": 1e-7, "max": 2e-7} for q in ("output", "gradients", "running stats")},
        "F.batch_norm": {q: {"norm": error, "max": 2 * error} for q in ("output", "gradients", "running stats")},
    }
    return {"precision": "fp32", "forward": timing, "forward+backward": timing,
            "precision_offset_0": errors, "precision_offset_2": errors}  # fmt: skip


@pytest.mark.parametrize(
    ("ratio", "error", "winner"),
    [(0.8, 1e-7, "F.batch_norm"), (1.1, 1e-7, "hand-written"), (0.5, 1e-6, "hand-written")],
)
def test_a_builtin_wins_only_when_as_fast_and_as_precise(ratio, error, winner):
    results = {"batch_norm": [_fake_record(ratio, error)], "attention": []}
    assert tb.verdicts(results)["row batch norm, fp32"].startswith(winner + " (")


def test_the_report_is_written(tmp_path):
    torch.set_num_threads(1)
    results = tb.run(repeats=1, precisions=("fp32", "bf16"), bn_cases=[TINY_BN], attn_cases=[TINY_ATTENTION])
    json_path, md_path = tb.write_report(results, tmp_path)
    data = json.loads(json_path.read_text())
    assert [r["precision"] for r in data["batch_norm"]] == ["fp32", "bf16"]
    assert [r["precision"] for r in data["attention"]] == ["fp32", "bf16"]
    fp32 = data["attention"][0]
    assert fp32["backend"] == {"SDPA, dropout 0": "FLASH_ATTENTION", "SDPA, dropout 0.1": "MATH"}
    assert data["attention"][1]["backend"]["SDPA in fp32, dropout 0"] == "FLASH_ATTENTION"
    assert (
        fp32["saved_mb"]["forward+backward, dropout 0.1"]["SDPA"]
        > fp32["saved_mb"]["forward+backward, dropout 0"]["SDPA"]
    )  # the math path keeps the weights
    for record in data["batch_norm"] + data["attention"]:
        assert len(record["load"]) == 2
    assert all(t > 0 for r in data["batch_norm"] for t in r["forward"]["median_s"].values())
    uses = ("teacher pass and inference (no grad, dropout 0)", "training with attn_dropout=0", "training (dropout 0.1)")
    assert set(data["verdicts"]) == {
        *(f"row batch norm, {p}" for p in ("fp32", "bf16")),
        *(f"attention, {p}, {use}" for p in ("fp32", "bf16") for use in uses),
    }
    md = md_path.read_text()
    assert md.startswith("# Hand-written kernels vs torch built-ins")
    assert "| tiny | 32 | fp32 |" in md and "## Verdicts" in md
    assert all(f"**{what}**" in md for what in data["verdicts"])
