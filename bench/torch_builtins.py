"""Hand-written kernels against torch built-ins: the head's row batch norm and the AllSpark cross-attention.

Usage::

    python bench/torch_builtins.py [--out bench/results] [--quick] [--threads 1] [--repeats N]

Two comparisons, each at the sizes the models use, in float32 and with bf16 autocast on the CPU:

- **Row batch norm.** The SegFormer head normalises its fused map as channels-last rows ``(B * H * W, E)``: the
  hand-written ``_RowBatchNorm`` (``models/head.py``: ``_hand_row_batch_norm``) against ``F.batch_norm`` on the same
  rows (``_builtin_row_batch_norm``: a 2-D input, normalised per column, running statistics updated by the kernel).
- **Cross-attention.** ``blocked_attention`` (``models/attention.py``) on the psi-scaled query rows ``(B * 2C, N)``
  against ``F.scaled_dot_product_attention`` with the same rows as queries, ``scale=1`` and the keys and values as
  ``(S, N)`` rows (transposed copies made inside the timed call: a drop-in replacement). psi standardises each
  labeled sample's whole ``(2C, S)`` logit matrix by one mean and one standard deviation (InstanceNorm over a
  one-channel map, method doc 1.5), so ``softmax(psi(A)) = softmax(s A)`` with ``s = rsqrt(var(A) + eps)`` per
  sample: the mean cancels under the row softmax and ``s`` is folded into the queries (``psi_scale``, from
  ``N x N`` Gram matrices). The fold is exact, so SDPA computes the same function; what differs is the kernel. With
  ``dropout_p > 0`` (training, 0.1 officially) PyTorch's CPU dispatcher does not take its flash kernel and runs the
  math path, which materialises the ``(M, S)`` weights; that case is timed too, with the bytes each side saves for
  backward.

Each case times the candidates alternately in one loop (hand-written, built-in, hand-written, ...) after a warm-up;
the table gives each median and the median of the per-round ratios built-in / hand-written. Precision: each
candidate's output and gradients against a float64 computation of the same inputs (the textbook formula with
autograd), norm-wise ``||x - ref|| / ||ref||`` and worst element ``max |x - ref| / max |ref|``. The 1-minute load
average is recorded before and after each case: on a shared machine the medians move, the paired ratios much less.
Writes ``OUT/torch_builtins.json`` and ``OUT/torch_builtins.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from allspark_seg.models.attention import blocked_attention, psi_scale, sdpa_attention
from allspark_seg.models.head import _builtin_row_batch_norm, _hand_row_batch_norm

__all__ = [
    "AttentionCase",
    "BatchNormCase",
    "attention_candidates",
    "attention_inputs",
    "attention_precision",
    "batch_norm_candidates",
    "batch_norm_inputs",
    "batch_norm_precision",
    "reference_attention",
    "reference_batch_norm",
    "main",
    "paired_times",
    "render_markdown",
    "run",
    "saved_for_backward_mb",
    "sdpa_kernel",
    "sdpa_in_autocast",
    "verdicts",
    "write_report",
]

HEAD_DIM = 768  # the SegFormer head width of every AllSpark configuration
EPS = 1e-5
HAND = "hand-written"
AS_PRECISE = 1.25  # "as precise": norm-wise errors within this factor of the hand-written ones (repeat-to-repeat
# spread of an error measurement between kernels of the same rounding, not a systematic loss)


# -- the cases --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchNormCase:
    """The head's fused map at one crop and batch: ``rows = batch * grid**2`` rows of ``channels``."""

    label: str
    batch: int
    grid: int  # the stride-4 map's side
    channels: int = HEAD_DIM

    @property
    def rows(self) -> int:
        return self.batch * self.grid * self.grid


@dataclass(frozen=True)
class AttentionCase:
    """The labeled cross-attention reading the memory: ``batch`` samples of ``2C`` query channels over ``N``
    positions against ``S = K * 2C`` shared key channels."""

    label: str
    batch: int  # labeled samples
    width: int  # 2C
    positions: int  # N = stage-4 grid side squared
    keys: int  # S


# Stride-4 sides: 24 (crop 96), 65 (257), 129 (513); stage-4 sides 3, 9, 17. Every encoder (MiT-B0..B5,
# mobilenet_v2) feeds a 768-wide head. Attention widths 2C: 512 (B0), 640 (mobilenet_v2), 1024 (B1..B5); K = 21.
BN_CASES = [
    BatchNormCase("crop 96, batch 8", 8, 24),
    BatchNormCase("crop 257, batch 4 (2 + 2)", 4, 65),
    BatchNormCase("crop 513, batch 2", 2, 129),
]
ATTENTION_CASES = [
    AttentionCase("MiT-B0, crop 96, 8 labeled, K = 21", 8, 512, 9, 21 * 512),
    AttentionCase("MiT-B0, crop 257, 2 labeled, K = 21", 2, 512, 81, 21 * 512),
    AttentionCase("mobilenet_v2, crop 257, 2 labeled, K = 21", 2, 640, 81, 21 * 640),
    AttentionCase("MiT-B1..B5, crop 513, 2 labeled, K = 21", 2, 1024, 289, 21 * 1024),
]
QUICK_BN_CASES = [BatchNormCase("crop 96, batch 2", 2, 24)]
QUICK_ATTENTION_CASES = [AttentionCase("MiT-B0, crop 96, 2 labeled, K = 6", 2, 512, 9, 6 * 512)]


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU for ``precision == "bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _errors(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Norm-wise and worst-element relative error of ``x`` against the float64 ``ref``."""
    d = x.detach().double() - ref
    return {
        "norm": float(d.norm() / ref.norm().clamp_min(1e-300)),
        "max": float(d.abs().max() / ref.abs().max().clamp_min(1e-300)),
    }


def _worst(errors: list[dict[str, float]]) -> dict[str, float]:
    return {"norm": max(e["norm"] for e in errors), "max": max(e["max"] for e in errors)}


# -- row batch norm ---------------------------------------------------------------------------------------------------
def batch_norm_candidates() -> dict[str, Callable[[nn.BatchNorm2d, torch.Tensor], torch.Tensor]]:
    """``name -> fn(bn, rows)``: the head's two row batch norms, the hand-written ``_RowBatchNorm`` and
    ``F.batch_norm`` on the rows (``_batch_norm_rows`` picks one by the rows' dtype)."""
    return {HAND: _hand_row_batch_norm, "F.batch_norm": _builtin_row_batch_norm}


def batch_norm_inputs(
    rows: int, channels: int, precision: str, offset: float = 2.0, seed: int = 0
) -> tuple[nn.BatchNorm2d, torch.Tensor, torch.Tensor]:
    """A BatchNorm2d with random affine parameters, rows ``(R, C)`` and an upstream gradient.

    The rows have per-channel standard deviations in [0.5, 2] and means ``offset`` x N(0, 1) (the fused map carries
    the projections' biases). Under ``bf16`` the rows and the gradient are bfloat16, as the head's autocast product
    makes them; the module's parameters stay float32.
    """
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=gen) * 1.5 + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=gen))
    std = torch.rand(channels, generator=gen) * 1.5 + 0.5
    x = torch.randn(rows, channels, generator=gen) * std + offset * torch.randn(channels, generator=gen)
    grad = torch.randn(rows, channels, generator=gen)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return bn, x.to(dtype), grad.to(dtype)


def reference_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    grad: torch.Tensor,
    momentum: float,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Textbook batch norm of the rows ``(R, C)`` in ``dtype`` with autograd: output, gradients of the input, weight
    and bias, and the running statistics after one update from (0, 1)."""
    x, w, b = (t.detach().to(dtype).requires_grad_() for t in (x, weight, bias))
    n = x.shape[0]
    mean = x.mean(dim=0)
    var = (x - mean).square().mean(dim=0)
    y = (x - mean) * torch.rsqrt(var + EPS) * w + b
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), grad.to(dtype))
    running_mean = momentum * mean.detach()
    running_var = (1 - momentum) + momentum * var.detach() * n / (n - 1)
    return {"output": y.detach(), "grad input": gx, "grad weight": gw, "grad bias": gb,
            "running mean": running_mean, "running var": running_var}  # fmt: skip


def batch_norm_precision(rows: int, channels: int, precision: str, offset: float = 2.0) -> dict[str, Any]:
    """Each candidate against float64: errors of the output, the gradients (input, weight, bias; the worst is
    ``gradients``) and the running statistics after one step from (0, 1)."""
    out: dict[str, Any] = {}
    for name, fn in batch_norm_candidates().items():
        bn, x, grad = batch_norm_inputs(rows, channels, precision, offset)
        ref = reference_batch_norm(x, bn.weight, bn.bias, grad, bn.momentum)
        x = x.requires_grad_()
        with _autocast(precision):
            y = fn(bn, x)
        gx, gw, gb = torch.autograd.grad(y, (x, bn.weight, bn.bias), grad)
        out[name] = {
            "output": _errors(y, ref["output"]),
            "gradients": _worst([_errors(g, ref[k]) for g, k in ((gx, "grad input"), (gw, "grad weight"),
                                                                   (gb, "grad bias"))]),
            "running stats": _worst([_errors(bn.running_mean, ref["running mean"]),
                                     _errors(bn.running_var, ref["running var"])]),
            "dtype": str(y.dtype).removeprefix("torch."),
        }  # fmt: skip
    return out


def _batch_norm_closures(case: BatchNormCase, precision: str, backward: bool) -> dict[str, Callable[[], Any]]:
    closures = {}
    for name, fn in batch_norm_candidates().items():
        bn, x, grad = batch_norm_inputs(case.rows, case.channels, precision)
        x = x.requires_grad_(backward)

        def call(fn: Callable = fn, bn: nn.BatchNorm2d = bn, x: torch.Tensor = x, grad: torch.Tensor = grad) -> Any:
            with _autocast(precision):
                y = fn(bn, x)
            if backward:
                return torch.autograd.grad(y, (x, bn.weight, bn.bias), grad)
            return y

        closures[name] = call
    return closures


# -- cross-attention --------------------------------------------------------------------------------------------------
def sdpa_in_autocast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as a drop-in for ``blocked_attention`` that lets autocast choose its dtype
    (bfloat16 under bf16 autocast; without autocast the same as the model's ``sdpa_attention``).

    psi is already folded into ``q`` (so ``scale=1``); ``k`` and ``v`` ``(N, S)`` are transposed into contiguous
    ``(S, N)`` rows inside the call (the copies are part of the measured time).
    """
    k_rows, v_rows = k.T.contiguous(), v.T.contiguous()
    out = F.scaled_dot_product_attention(q[None, None], k_rows[None, None], v_rows[None, None], dropout_p=dropout_p,
                                         scale=1.0)  # fmt: skip
    return out[0, 0]


def sdpa_kernel(fn: Callable[[], Any]) -> str:
    """The SDPA kernel that ``fn()`` runs, read from the profiler: ``FLASH_ATTENTION`` (keeps no weights),
    ``MATH`` (materialises the ``(M, S)`` weights) or ``none``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    kernels = {"FLASH_ATTENTION": "flash_attention", "MATH": "attention_math"}
    found = [k for k, tag in kernels.items() if any(tag in n for n in names)]
    return "+".join(found) or "none"


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def attention_candidates(precision: str) -> dict[str, AttentionFn]:
    """``name -> fn(q (M, N), k (N, S), v (N, S), p)``: the hand-written blocked attention and SDPA: in float32 the
    model's ``sdpa_attention``; under bf16 autocast SDPA as autocast runs it (in bfloat16) and, as ``SDPA in fp32``,
    the model's ``sdpa_attention`` (computed in float32, as the blocked attention is)."""
    out: dict[str, AttentionFn] = {
        HAND: lambda q, k, v, p: blocked_attention(q, k, v, None, p),
        "SDPA": sdpa_attention,
    }
    if precision == "bf16":
        out["SDPA"] = sdpa_in_autocast
        out["SDPA in fp32"] = sdpa_attention
    return out


def attention_inputs(case: AttentionCase, precision: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The attention's inputs as the model makes them: psi-scaled query rows ``q (B * 2C, N)`` (unit-variance
    logits per sample), keys and values ``(N, S)``, and an upstream gradient ``(M, N)``.

    Under ``bf16`` the projections are bfloat16 (autocast linear layers) and the rows float32 (bfloat16 queries
    times the float32 psi scale), as in ``ChannelCrossAttention._fused_cross_attention``.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    queries = torch.randn(case.batch, case.positions, case.width, generator=gen).to(dtype)
    k = torch.randn(case.positions, case.keys, generator=gen).to(dtype)
    v = torch.randn(case.positions, case.keys, generator=gen).to(dtype)
    scale = psi_scale(queries, k)  # (B,) float32
    q = (queries * scale[:, None, None]).transpose(1, 2).reshape(-1, case.positions)
    grad = torch.randn(q.shape, generator=gen)
    return {"q": q, "k": k, "v": v, "grad": grad}


def reference_attention(inputs: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Materialised ``softmax(q k) v^T`` in ``dtype`` with autograd: output and the gradients of q, k, v."""
    q, k, v = (inputs[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v"))
    out = torch.softmax(q @ k, dim=-1) @ v.T
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), inputs["grad"].to(dtype))
    return {"output": out.detach(), "grad q": gq, "grad k": gk, "grad v": gv}


def attention_precision(case: AttentionCase, precision: str) -> dict[str, Any]:
    """Each candidate (no dropout) against float64: errors of the output (also rounded to bfloat16) and the worst
    of the q, k, v gradients."""
    inputs = attention_inputs(case, precision)
    ref = reference_attention(inputs)
    out: dict[str, Any] = {}
    for name, fn in attention_candidates(precision).items():
        q, k, v = (inputs[n].detach().clone().requires_grad_() for n in ("q", "k", "v"))
        with _autocast(precision):
            y = fn(q, k, v, 0.0)
        gq, gk, gv = torch.autograd.grad(y, (q, k, v), inputs["grad"].to(y.dtype))
        out[name] = {
            "output": _errors(y, ref["output"]),
            "output as bf16": _errors(y.to(torch.bfloat16), ref["output"]),
            "gradients": _worst([_errors(gq, ref["grad q"]), _errors(gk, ref["grad k"]), _errors(gv, ref["grad v"])]),
            "dtype": str(y.dtype).removeprefix("torch."),
        }
    return out


def _attention_closures(
    case: AttentionCase, precision: str, mode: str, dropout_p: float
) -> dict[str, Callable[[], Any]]:
    """Closures of every candidate: ``mode`` = ``forward`` (no grad), ``record`` (forward with autograd on, no
    backward: what it saves) or ``backward`` (forward and backward)."""
    inputs = attention_inputs(case, precision)
    leaves = [inputs[n].requires_grad_(mode != "forward") for n in ("q", "k", "v")]
    closures = {}
    for name, fn in attention_candidates(precision).items():

        def call(fn: AttentionFn = fn) -> Any:
            with _autocast(precision), torch.set_grad_enabled(mode != "forward"):
                y = fn(*leaves, dropout_p)
            if mode == "backward":
                return torch.autograd.grad(y, leaves, inputs["grad"].to(y.dtype))
            return y

        closures[name] = call
    return closures


# -- timing -----------------------------------------------------------------------------------------------------------
def paired_times(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Time the candidates alternately, round after round, so they see the same machine conditions.

    Returns:
        ``{"median_s": {name: s}, "times": {name: [s, ...]}, "ratio": {name: median of the per-round ratios
        name / first}}`` (the first candidate is the baseline).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        order = list(fns.items())
        if r % 2:  # alternate who goes first: a candidate never always follows the same one
            order.reverse()
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = next(iter(fns))
    return {
        "median_s": {n: statistics.median(t) for n, t in times.items()},
        "times": times,
        "ratio": {n: statistics.median(a / b for a, b in zip(t, times[base], strict=True)) for n, t in times.items()},
    }


def saved_for_backward_mb(fn: Callable[[], Any]) -> float:
    """MiB of the distinct storages autograd saves for backward during ``fn()`` (inputs included)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def _load() -> float:
    return os.getloadavg()[0]


# -- the run ----------------------------------------------------------------------------------------------------------
def run(
    quick: bool = False,
    repeats: int | None = None,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    bn_cases: list[BatchNormCase] | None = None,
    attn_cases: list[AttentionCase] | None = None,
) -> dict:
    """Measure every case (default: the model sizes, or the quick ones); returns the JSON-able results."""
    if bn_cases is None:
        bn_cases = QUICK_BN_CASES if quick else BN_CASES
    if attn_cases is None:
        attn_cases = QUICK_ATTENTION_CASES if quick else ATTENTION_CASES
    reps = repeats if repeats is not None else (3 if quick else 11)
    results: dict[str, Any] = {"info": _machine(), "repeats": reps, "batch_norm": [], "attention": []}
    for case in bn_cases:
        for precision in precisions:
            load = [_load()]
            record: dict[str, Any] = {"label": case.label, "rows": case.rows, "channels": case.channels,
                                      "precision": precision}  # fmt: skip
            record["precision_offset_2"] = batch_norm_precision(case.rows, case.channels, precision, 2.0)
            record["precision_offset_0"] = batch_norm_precision(case.rows, case.channels, precision, 0.0)
            for mode, backward in (("forward", False), ("forward+backward", True)):
                record[mode] = paired_times(_batch_norm_closures(case, precision, backward), reps)
            record["load"] = [*load, _load()]
            results["batch_norm"].append(record)
    for case in attn_cases:
        big = case.batch * case.width * case.keys * case.positions > 2e9  # the B1..B5 513 case: fewer repeats
        case_reps = max(3, reps // 3) if big else reps
        for precision in precisions:
            load = [_load()]
            record = {"label": case.label, "shape": [case.batch * case.width, case.positions, case.keys],
                      "precision": precision, "repeats": case_reps}  # fmt: skip
            record["backend"] = {  # what each SDPA candidate runs, forward with autograd on
                f"{name}, dropout {p:g}": sdpa_kernel(fn)
                for p in (0.0, 0.1)
                for name, fn in _attention_closures(case, precision, "record", p).items()
                if name != HAND
            }
            record["precision_errors"] = attention_precision(case, precision)
            modes = (("forward (no grad, dropout 0)", "forward", 0.0), ("forward+backward, dropout 0", "backward", 0.0),
                     ("forward+backward, dropout 0.1", "backward", 0.1))  # fmt: skip
            record["saved_mb"] = {}
            for mode, kind, p in modes:
                if kind == "backward":
                    record["saved_mb"][mode] = {
                        n: saved_for_backward_mb(f)
                        for n, f in _attention_closures(case, precision, "record", p).items()
                    }
                record[mode] = paired_times(_attention_closures(case, precision, kind, p), case_reps)
            record["load"] = [*load, _load()]
            results["attention"].append(record)
    return results


def _machine() -> dict[str, Any]:
    flags = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = f.read()
    cpu = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")), "?")
    return {
        "cpu": cpu or platform.processor(),
        "bf16_units": [u for u in ("avx512_bf16", "amx_bf16") if u in flags],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


# -- the report -------------------------------------------------------------------------------------------------------
def _builtin_wins(
    records: list[dict], modes: list[str], errors: list[str], name: str, quantities: tuple[str, ...]
) -> tuple[bool, str]:
    """Whether the built-in ``name`` is as fast (every median paired ratio <= 1) and as precise (every norm-wise
    error of ``quantities`` within ``AS_PRECISE`` x the hand-written one) in ``records``; with the reason."""
    ratios = [r[m]["ratio"][name] for r in records for m in modes]
    worst = 0.0
    for r in records:
        for key in errors:
            for q in quantities:
                hand, other = r[key][HAND][q]["norm"], r[key][name][q]["norm"]
                worst = max(worst, other / max(hand, 1e-300))
    fast, precise = max(ratios) <= 1.0, worst <= AS_PRECISE
    why = f"time ratio {min(ratios):.2f}-{max(ratios):.2f}, error up to {worst:.2g}x the hand-written one"
    return fast and precise, why


def verdicts(results: dict) -> dict[str, str]:
    """One line per (kernel, precision, use): which implementation the measurements favour, and why."""
    out = {}
    for precision in ("fp32", "bf16"):
        bn = [r for r in results["batch_norm"] if r["precision"] == precision]
        if bn:
            wins, why = _builtin_wins(bn, ["forward", "forward+backward"],
                                      ["precision_offset_0", "precision_offset_2"], "F.batch_norm",
                                      ("output", "gradients"))  # fmt: skip
            out[f"row batch norm, {precision}"] = ("F.batch_norm" if wins else HAND) + f" ({why})"
        attn = [r for r in results["attention"] if r["precision"] == precision]
        if not attn:
            continue
        names = [n for n in attn[0]["precision_errors"] if n != HAND]
        uses = {
            "teacher pass and inference (no grad, dropout 0)": ["forward (no grad, dropout 0)"],
            "training with attn_dropout=0": ["forward+backward, dropout 0"],
            "training (dropout 0.1)": ["forward+backward, dropout 0.1"],
        }
        for use, modes in uses.items():
            lines = []
            best = HAND
            for name in names:
                # under bf16 the next layer (an autocast linear) rounds the attention's output to bfloat16 anyway
                output = "output as bf16" if precision == "bf16" else "output"
                wins, why = _builtin_wins(attn, modes, ["precision_errors"], name, (output, "gradients"))
                lines.append(f"{name}: {why}")
                if wins and best == HAND:
                    best = name
            out[f"attention, {precision}, {use}"] = f"{best} ({'; '.join(lines)})"
    return out


def _ms(x: float) -> str:
    return f"{x * 1e3:.3g}" if x < 10 else f"{x * 1e3:.0f}"


def _err(e: dict[str, float]) -> str:
    return f"{e['norm']:.1e} / {e['max']:.1e}"


def render_markdown(results: dict) -> str:
    """The report: machine, timing and precision tables, verdicts."""
    info = results["info"]
    lines = [
        "# Hand-written kernels vs torch built-ins",
        "",
        f"{info['cpu']} ({', '.join(info['bf16_units']) or 'no bf16 units'}, {info['cpu_capability']}), "
        f"{info['threads']} thread(s), torch {info['torch']}, {info['date']}; {results['repeats']} paired rounds "
        "(fewer for the largest attention). Times are medians in ms; ratio = median of the per-round ratios "
        "built-in / hand-written. Errors against float64: norm-wise / worst element, relative.",
        "",
        "## Row batch norm (training mode, rows x 768)",
        "",
        "| case | rows | precision | fwd hand | fwd F.bn | ratio | fwd+bwd hand | fwd+bwd F.bn | ratio | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["batch_norm"]:
        f, fb = r["forward"], r["forward+backward"]
        lines.append(
            f"| {r['label']} | {r['rows']} | {r['precision']} | {_ms(f['median_s'][HAND])} | "
            f"{_ms(f['median_s']['F.batch_norm'])} | {f['ratio']['F.batch_norm']:.2f} | {_ms(fb['median_s'][HAND])} | "
            f"{_ms(fb['median_s']['F.batch_norm'])} | {fb['ratio']['F.batch_norm']:.2f} | "
            f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |"
        )
    lines += [
        "",
        "| case | precision | channel means | impl | output | gradients (worst of x, weight, bias) | running stats |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["batch_norm"]:
        for offset in (0, 2):
            for name, e in r[f"precision_offset_{offset}"].items():
                lines.append(
                    f"| {r['label']} | {r['precision']} | {offset} x N(0,1) | {name} | {_err(e['output'])} | "
                    f"{_err(e['gradients'])} | {_err(e['running stats'])} |"
                )
    lines += ["", "## Cross-attention (psi-scaled query rows M x N against S keys)", ""]
    lines += [
        "SDPA kernels (profiled): FLASH_ATTENTION keeps no weights, MATH materialises them. Saved MB: what autograd "
        "keeps for backward (inputs included), hand / SDPA / SDPA in fp32.",
        "",
        "| case | M x N x S | precision | mode | kernels | hand | SDPA | ratio | SDPA in fp32 | ratio | saved MB "
        "| load |",
        "| " + " | ".join(["---"] * 12) + " |",
    ]
    for r in results["attention"]:
        for mode in ("forward (no grad, dropout 0)", "forward+backward, dropout 0", "forward+backward, dropout 0.1"):
            t = r[mode]
            names = [n for n in t["median_s"] if n != HAND]
            dropout = "0.1" if "0.1" in mode else "0"
            kernels = "; ".join(f"{n}: {r['backend'][f'{n}, dropout {dropout}']}" for n in names)
            cells = [f"{_ms(t['median_s'][n])} | {t['ratio'][n]:.2f}" for n in names] + (
                [" | "] if len(names) < 2 else []
            )
            saved = r["saved_mb"].get(mode)
            saved_s = " / ".join(f"{saved[n]:.3g}" for n in [HAND, *names]) if saved else ""
            lines.append(
                f"| {r['label']} | {' x '.join(map(str, r['shape']))} | {r['precision']} | {mode} | {kernels} | "
                f"{_ms(t['median_s'][HAND])} | {' | '.join(cells)} | {saved_s} | "
                f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |"
            )
    lines += ["", "| case | precision | impl | output dtype | output | output rounded to bf16 | gradients (worst of "
              "q, k, v) |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results["attention"]:
        for name, e in r["precision_errors"].items():
            lines.append(
                f"| {r['label']} | {r['precision']} | {name} | {e['dtype']} | {_err(e['output'])} | "
                f"{_err(e['output as bf16'])} | {_err(e['gradients'])} |"
            )
    lines += ["", "## Verdicts", "", f"A built-in wins where every paired ratio is <= 1 and its worst norm-wise "
              f"error is within {AS_PRECISE:g}x the hand-written one (under bf16, the attention's output rounded to "
              "bfloat16, as the next autocast layer does).", ""]  # fmt: skip
    lines += [f"- **{what}**: {v}" for what, v in verdicts(results).items()]
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: Path) -> tuple[Path, Path]:
    """Write ``out/torch_builtins.json`` and ``out/torch_builtins.md``; returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "torch_builtins.json", out / "torch_builtins.md"
    json_path.write_text(json.dumps({**results, "verdicts": verdicts(results)}, indent=1))
    md_path.write_text(render_markdown(results))
    return json_path, md_path


def main(argv: list[str] | None = None) -> None:
    """Command line: measure, write the report, print the Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds: a smoke test (seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPUs are shared)")
    parser.add_argument("--repeats", type=int, default=None, help="paired rounds (default 11, quick 3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(quick=args.quick, repeats=args.repeats)
    _, md_path = write_report(results, args.out)
    print(md_path.read_text())  # noqa: T201 (a command-line tool's output)


if __name__ == "__main__":
    main()
