"""allspark-seg against the literal official AllSpark algorithm: time, memory and FLOP/s, side by side.

Usage::

    python bench/run.py [--quick | --full] [--out bench/results] [--threads 2] [--only TEXT] [--report-only]

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the Markdown tables. Every measurement runs in a fresh
subprocess with ``OMP_NUM_THREADS`` and ``torch.set_num_threads`` set to ``--threads`` (so a row's peak resident
memory is its own), in this order: matrix-multiply peak, equivalence checks, memory update, inference, training
iterations (literal then ours for each configuration), matrix-multiply peak again. Ratios are ours / literal.

Timings are only meaningful on an otherwise idle machine: the load average is recorded before and after every
measurement, and a run whose 1-minute load exceeded ``--max-load`` (default: threads + 0.75, since the benchmark's
own threads count in the load) is flagged. Oversubscribed OpenMP threads spin-wait, which can make a CPU run 10x
slower. The default run takes about 14 minutes on an idle 2-core Xeon, ``--full`` about 25; ``--quick`` (a tiny
subset, ~1 minute) is a smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "BENCH-RESULT "

# The issue's targets: (label, configuration key, kind, bound). Ratios are ours / literal.
TARGETS = [
    ("training B0 257 K=21 fp32: time <= 0.8x", ("mit_b0", 257, 21, "fp32", False), "time", 0.8),
    ("training B0 257 K=21 bf16 + channels-last: time <= 0.5x", ("mit_b0", 257, 21, "bf16", True), "time", 0.5),
    ("training B0 257 K=81 fp32: time <= 0.5x", ("mit_b0", 257, 81, "fp32", False), "time", 0.5),
    ("training B0 257 K=81 fp32: peak memory <= 0.6x", ("mit_b0", 257, 81, "fp32", False), "memory", 0.6),
]


# Scaling estimate: per-part times measured at the basis configuration, scaled by per-part FLOP ratios to the
# paper's settings (Pascal: B5 513 K=21; Cityscapes: B5 801 K=19; COCO: B5 513 K=81). MiT-B2 has B5's stage
# widths, so its AllSpark block and head have exactly B5's shapes at the same crop.
SCALING_BASIS = [("mit_b2", 513, 21)]
SCALING_TARGETS = [("mit_b5", 513, 21), ("mit_b5", 801, 19), ("mit_b5", 513, 81)]


@dataclass(frozen=True)
class Task:
    """One measurement, run in its own process.

    Attributes:
        kind: A function of ``workloads``: ``matmul_peak``, ``equivalence``, ``memory_update``, ``inference``,
            ``train_pair``, ``train_memory``, ``components`` or ``flops_at``.
        kwargs: Its keyword arguments.
        label: Short description for the progress lines.
    """

    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""


def variant_name(variant: dict[str, Any]) -> str:
    """``literal``, ``ours fp32``, ``ours bf16 + channels-last``, ..."""
    if variant["impl"] == "literal":
        return "literal"
    name = f"ours {variant.get('precision', 'fp32')}"
    return (
        name
        + (" + channels-last" if variant.get("channels_last") else "")
        + (" + compile" if variant.get("compile_model") else "")
    )


LITERAL = {"impl": "literal"}
OURS = {"impl": "ours", "precision": "fp32", "channels_last": False, "compile_model": False}


def pair_task(
    base: dict[str, Any], other: dict[str, Any], encoder: str, crop: int, classes: int, flops: bool = False
) -> Task:
    """Alternating timing of two variants in one process (1 untimed + 5 timed iterations each)."""
    kwargs = {
        "base": base,
        "other": other,
        "encoder": encoder,
        "crop": crop,
        "classes": classes,
        "warmup": 1,
        "repeats": 5,
        "flops": flops,
    }
    label = f"time {variant_name(base)} vs {variant_name(other)}: {encoder} crop {crop} K={classes}"
    return Task("train_pair", kwargs, label)


def memory_task(variant: dict[str, Any], encoder: str, crop: int, classes: int) -> Task:
    """Peak RSS of one variant alone in a fresh process (2 iterations)."""
    kwargs = {"variant": variant, "encoder": encoder, "crop": crop, "classes": classes}
    return Task("train_memory", kwargs, f"memory {variant_name(variant)}: {encoder} crop {crop} K={classes}")


def config_tasks(encoder: str, crop: int, classes: int, flops: bool = False, memory: bool = True) -> list[Task]:
    """Time (literal vs ours, alternating) and, with ``memory``, peak memory (each alone) of one configuration."""
    tasks = [pair_task(LITERAL, OURS, encoder, crop, classes, flops)]
    if memory:
        tasks += [memory_task(LITERAL, encoder, crop, classes), memory_task(OURS, encoder, crop, classes)]
    return tasks


def plan(quick: bool, compile_model: bool, full: bool = False) -> list[Task]:
    """The measurements, in order.

    Default (about 14 minutes on an idle 2-core CPU): B0 at crop 129 (K 21, 81; time only), 257 (K 21, 81, 150)
    and 513 (K 21), B2 at 257 (K 21), so iteration time can be plotted against the crop (K = 21) and against K
    (crop 257); the targets are B0 rows. ``full`` (about 25 minutes) adds peak memory at crop 129, B0 129 and 513
    with K = 150, B2 513 with K = 21 and fp32 + channels-last. The per-part breakdown at B2 513 is always run: it is
    the basis of the scaling estimate (MiT-B2 has B5's stage widths).
    """
    if quick:
        return [
            Task("matmul_peak", {"size": 1024}, "matmul peak"),
            Task("equivalence", {"encoder": "mit_b0", "crop": 65, "classes": 21, "steps": 1}, "equivalence"),
            Task("memory_update", {"repeats": 5}, "memory update"),
            Task("inference", {"size": 128, "repeats": 3, "onnx": False}, "inference 128"),
            *config_tasks("mit_b0", 129, 21, flops=True),
        ]
    tasks = [
        Task("matmul_peak", {"size": 4096, "dtype": "float32"}, "matmul peak fp32"),
        Task("matmul_peak", {"size": 2048, "dtype": "bfloat16"}, "matmul peak bf16"),
        Task("equivalence", {"encoder": "mit_b0", "crop": 129, "classes": 81}, "equivalence B0 129 K=81"),
        Task("memory_update", {}, "memory update K=81"),
        Task("inference", {"encoder": "mit_b0"}, "inference B0 512"),
        Task("inference", {"encoder": "mit_b2", "onnx": False, "bf16": False, "repeats": 5}, "inference B2 512"),
    ]
    grid = [("mit_b0", 129, 21), ("mit_b0", 129, 81)] + (full * [("mit_b0", 129, 150)])
    grid += [("mit_b0", 257, k) for k in (21, 81, 150)] + [("mit_b0", 513, 21)] + (full * [("mit_b0", 513, 150)])
    grid += [("mit_b2", 257, 21)] + (full * [("mit_b2", 513, 21)])
    for encoder, crop, classes in grid:
        flops = encoder == "mit_b0" and crop == 257
        tasks += config_tasks(encoder, crop, classes, flops=flops, memory=full or crop > 129)
        if encoder == "mit_b0" and crop == 257 and classes in (21, 81):
            variants = [{**OURS, "precision": "bf16", "channels_last": True}]
            if classes == 21:
                variants += full * [{**OURS, "channels_last": True}] + [{**OURS, "precision": "bf16"}]
                if compile_model:
                    variants.append({**OURS, "compile_model": True})
            for variant in variants:
                tasks.append(pair_task(OURS, variant, encoder, crop, classes))
                tasks.append(memory_task(variant, encoder, crop, classes))
    for impl in ("literal", "ours"):
        kwargs = {"impl": impl, "encoder": "mit_b0", "crop": 257, "classes": 81}
        tasks.append(Task("components", kwargs, f"components {impl} B0 257 K=81"))
    for impl in ("literal", "ours"):
        kwargs = {"impl": impl, "encoder": "mit_b2", "crop": 513, "classes": 21, "repeats": 1}
        tasks.append(Task("components", kwargs, f"components {impl} B2 513 K=21"))
    for encoder, crop, classes in SCALING_TARGETS:
        kwargs = {"encoder": encoder, "crop": crop, "classes": classes}
        tasks.append(Task("flops_at", kwargs, f"FLOPs {_enc(encoder)} {crop} K={classes}"))
    tasks.append(Task("matmul_peak", {"size": 4096, "dtype": "float32"}, "matmul peak fp32 (end)"))
    return tasks


# -- running ----------------------------------------------------------------------------------------------------------
def run_worker(spec: str, threads: int) -> None:
    """Inside the subprocess: run one task and print its result as one JSON line."""
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    import workloads

    task = json.loads(spec)
    kwargs = dict(task["kwargs"])
    if task["kind"] == "inference":
        kwargs["threads"] = threads
    result = getattr(workloads, task["kind"])(**kwargs)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_task(task: Task, threads: int, timeout: float) -> dict[str, Any]:
    """Run one task in a fresh process with ``threads`` OpenMP/MKL threads; record load, wall time and errors."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    spec = json.dumps({"kind": task.kind, "kwargs": task.kwargs})
    cmd = [sys.executable, str(HERE / "run.py"), "--worker", spec, "--threads", str(threads)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "load": [load_before, os.getloadavg()[0]]}
    wall = time.perf_counter() - start
    record: dict[str, Any] = {"wall_s": wall, "load": [load_before, os.getloadavg()[0]]}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        record["error"] = f"exit {proc.returncode}: " + " | ".join(tail)
        return record
    record["result"] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return record


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "commit": commit.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "gpu": "none (CPU run)",
    }


# -- tables -----------------------------------------------------------------------------------------------------------
def _config(kwargs: dict[str, Any]) -> tuple[str, int, int]:
    return kwargs["encoder"], kwargs["crop"], kwargs["classes"]


def _vkey(variant: dict[str, Any]) -> str:
    return variant_name(variant)


def train_tables(records: Iterable[dict[str, Any]]) -> tuple[dict, dict]:
    """``pairs[(config, base name, other name)]`` (with load) and ``memory[(config, name)]`` from the records."""
    pairs, memory = {}, {}
    for r in records:
        if "result" not in r:
            continue
        k = r["kwargs"]
        if r["kind"] == "train_pair":
            pairs[(_config(k), _vkey(k["base"]), _vkey(k["other"]))] = {**r["result"], "load": r["load"]}
        elif r["kind"] == "train_memory":
            memory[(_config(k), _vkey(k["variant"]))] = r["result"]
    return pairs, memory


def time_ratio(pairs: dict, config: tuple, name: str) -> float | None:
    """ours-variant / literal time: measured directly for ``ours fp32``, else through ``ours fp32``."""
    main = pairs.get((config, "literal", "ours fp32"))
    if main is None:
        return None
    if name == "ours fp32":
        return main["ratio"]
    via = pairs.get((config, "ours fp32", name))
    return None if via is None else main["ratio"] * via["ratio"]


def memory_ratio(memory: dict, config: tuple, name: str) -> float | None:
    lit, ours = memory.get((config, "literal")), memory.get((config, name))
    return None if lit is None or ours is None else ours["peak_rss_mb"] / lit["peak_rss_mb"]


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _enc(name: str) -> str:
    return name.replace("mit_", "").upper()


def render(records: list[dict[str, Any]], info: dict[str, Any], max_load: float) -> str:
    """The Markdown report."""
    out = ["# allspark-seg vs the literal official AllSpark algorithm", ""]
    out.append(
        f"{info['cpu']}, {info['cores']} cores, {info['threads']} threads, PyTorch {info['torch']} "
        f"({info['cpu_capability']}), commit {info['commit']}, {info['date']}. GPU: {info['gpu']}."
    )
    loads = [x for r in records for x in r.get("load", [])]
    if loads:
        flag = "" if max(loads) <= max_load else f" **(above {max_load}: timings unreliable)**"
        out.append(f"1-minute load average during the run: {min(loads):.2f} to {max(loads):.2f}{flag}.")
    out.append("")

    peaks = [r for r in records if r["kind"] == "matmul_peak" and "result" in r]
    fp32_peak = None
    if peaks:
        out += ["## Matrix-multiply peak", "", "| dtype | size | GFLOP/s |", "| --- | --- | --- |"]
        for r in peaks:
            res = r["result"]
            out.append(f"| {res['dtype']} | {res['size']} | {res['gflops']:.0f} |")
            if res["dtype"] == "float32":
                fp32_peak = max(fp32_peak or 0.0, res["gflops"])
        out.append("")

    for r in records:
        if r["kind"] == "equivalence" and "result" in r:
            out += equivalence_table(r["result"])

    for r in records:
        if r["kind"] == "memory_update" and "result" in r:
            res = r["result"]
            s = res["shape"]
            lit, ours = res["literal"]["median"], res["ours"]["median"]
            out += [
                f"## Memory update: K = {s['K']}, {s['B_u']} unlabeled images, C = {s['C']}, N = {s['N']}",
                "",
                "| literal (per-sample, per-class loop) | ours (one scatter) | speed-up | same final state |",
                "| --- | --- | --- | --- |",
                f"| {lit * 1e3:.2f} ms | {ours * 1e3:.3f} ms | {lit / ours:.0f}x | {res['same_state']} |",
                "",
            ]

    infer = [r for r in records if r["kind"] == "inference" and "result" in r]
    if infer:
        out += ["## Single-image inference latency", ""]
        out += ["| model | size | mode | literal ms | ours ms | ratio |", "| --- | --- | --- | --- | --- | --- |"]
        for r in infer:
            res = r["result"]
            lat = res["latency"]
            for mode in ("fp32", "bf16", "onnxruntime"):
                if f"ours {mode}" not in lat:
                    continue
                lit, ours = lat[f"literal {mode}"]["median"], lat[f"ours {mode}"]["median"]
                out.append(
                    f"| {_enc(res['encoder'])} K={res['classes']} | {res['size']} | {mode} | {lit * 1e3:.0f} | "
                    f"{ours * 1e3:.0f} | {ours / lit:.2f} |"
                )
        out.append("")
        for r in infer:
            checks = ", ".join(f"{k}: {v:.1e}" for k, v in r["result"]["checks"].items())
            out.append(f"Checks ({_enc(r['result']['encoder'])}, max relative difference): {checks}.")
        out.append("")

    pairs, memory = train_tables(records)
    out += training_tables(pairs, memory, fp32_peak)
    out += components_tables(records)
    out += scaling_table(records)
    out += targets_table(pairs, memory, records)
    errors = [r for r in records if "error" in r]
    if errors:
        out += ["## Failed measurements", ""] + [f"- {r['label']}: {r['error']}" for r in errors] + [""]
    return "\n".join(out)


def training_tables(pairs: dict, memory: dict, fp32_peak: float | None) -> list[str]:
    """Training time and memory, literal vs ours; the variants; achieved FLOP/s."""
    main = {key[0]: v for key, v in pairs.items() if key[1:] == ("literal", "ours fp32")}
    if not main:
        return []
    out = [
        "## Training iteration (teacher pass + student forward on 2 + 2 images + backward + SGD step)",
        "",
        "Time: literal and ours alternate in one process (1 untimed + 5 timed iterations each); medians, and the "
        "median of the 5 paired ratios. Peak RSS: each alone in a fresh process over 2 iterations.",
        "",
        "| encoder | crop | K | literal s | ours s | time ratio | literal peak MB | ours peak MB | memory ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for config, pair in main.items():
        encoder, crop, classes = config
        lit_mem, ours_mem = memory.get((config, "literal")), memory.get((config, "ours fp32"))
        out.append(
            f"| {_enc(encoder)} | {crop} | {classes} | {pair['base']['median']:.2f} | {pair['other']['median']:.2f} | "
            f"{pair['ratio']:.2f} | {_fmt(lit_mem and lit_mem['peak_rss_mb'], '.0f')} | "
            f"{_fmt(ours_mem and ours_mem['peak_rss_mb'], '.0f')} | {_fmt(memory_ratio(memory, config, 'ours fp32'))} |"
        )
    out.append("")
    variants = [(key, v) for key, v in pairs.items() if key[1] == "ours fp32"]
    if variants:
        out += [
            "### Precision, memory format and compilation (ours)",
            "",
            "Time ratio against ours fp32 measured alternately in one process; against the literal fp32 baseline "
            "through ours fp32 (product of the two paired ratios).",
            "",
            "| encoder | crop | K | variant | s | vs ours fp32 | vs literal | peak MB | memory vs literal |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for (config, _, name), pair in variants:
            encoder, crop, classes = config
            mem = memory.get((config, name))
            out.append(
                f"| {_enc(encoder)} | {crop} | {classes} | {name.removeprefix('ours ')} | "
                f"{pair['other']['median']:.2f} | {pair['ratio']:.2f} | {_fmt(time_ratio(pairs, config, name))} | "
                f"{_fmt(mem and mem['peak_rss_mb'], '.0f')} | {_fmt(memory_ratio(memory, config, name))} |"
            )
        out.append("")
    flop_rows = [(config, pair) for config, pair in main.items() if "flops" in pair["base"]]
    if flop_rows:
        peak_text = f"{fp32_peak:.0f} GFLOP/s" if fp32_peak else "n/a"
        out += [
            f"### Achieved FLOP/s (matrix products and convolutions, backward included; fp32 matmul peak {peak_text})",
            "",
            "| encoder | crop | K | impl | GFLOP / iteration | GFLOP/s | % of peak | literal's GFLOP / our time |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for (encoder, crop, classes), pair in flop_rows:
            for impl, side in (("literal", pair["base"]), ("ours", pair["other"])):
                rate = side["flops"] / side["median"] / 1e9
                pct = f"{100 * rate / fp32_peak:.0f}" if fp32_peak else "-"
                useful = pair["base"]["flops"] / side["median"] / 1e9
                out.append(
                    f"| {_enc(encoder)} | {crop} | {classes} | {impl} | {side['flops'] / 1e9:.1f} | {rate:.0f} | "
                    f"{pct} | {useful:.0f} |"
                )
        out.append("")
    return out


def equivalence_table(res: dict[str, Any]) -> list[str]:
    """float64: ours vs literal must agree to rounding (1e-10); float32: logits within 1e-5, and gradients
    compared with each implementation's own float64 run."""
    out = [
        f"## Equivalence: {_enc(res['encoder'])}, crop {res['crop']}, K = {res['classes']}, same weights, dropout off, "
        f"memory read, {res['steps']} SGD steps",
        "",
        "| quantity | max relative difference | bar | within |",
        "| --- | --- | --- | --- |",
    ]
    for name, value in res["max_rel"].items():
        if name.endswith("pointers differ"):
            out.append(
                f"| {name.replace(' differ', '')} | {'DIFFERENT' if value else 'identical'} | identical | "
                f"{'NO' if value else 'yes'} |"
            )
            continue
        if name.startswith("float64"):
            bar = 1e-10
        elif "literal vs float64" in name or "state after" in name:
            bar = None  # the literal code's own rounding, reported for reference
        else:
            bar = 1e-5
        text = "-" if bar is None else f"{bar:.0e}"
        ok = "-" if bar is None else ("yes" if value < bar else "NO")
        if name == "float32: gradients, ours vs float64" and value >= 1e-5:
            # a gradient whose float32 rounding error exceeds 1e-5 in both implementations (sums with cancellation)
            own = res["literal_error_at_ours_worst"]
            text = "1e-5 or the literal code's own error on it"
            ok = "yes" if value <= max(1e-5, own) else f"NO (literal {own:.1e})"
        out.append(f"| {name} | {value:.1e} | {text} | {ok} |")
    worst = res["worst_parameter"]
    out += [
        "",
        "Worst gradients: "
        + "; ".join(f"{k.split(': ')[1]}: `{v}`" for k, v in worst.items())
        + f". The literal code's float32 error on ours' worst gradient: {res['literal_error_at_ours_worst']:.1e}.",
        "",
    ]
    return out


def _results(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r["result"] for r in records if r["kind"] == kind and "result" in r]


def components_tables(records: list[dict[str, Any]]) -> list[str]:
    """Per-part time and FLOPs of a training iteration, literal next to ours."""
    comps = _results(records, "components")
    configs = sorted({(c["encoder"], c["crop"], c["classes"]) for c in comps})
    out = []
    for encoder, crop, classes in configs:
        config = (encoder, crop, classes)
        by_impl = {c["impl"]: c["parts"] for c in comps if (c["encoder"], c["crop"], c["classes"]) == config}
        if set(by_impl) != {"literal", "ours"}:
            continue
        lit, ours = by_impl["literal"], by_impl["ours"]
        out += [
            f"## Where the time goes: {_enc(encoder)}, crop {crop}, K = {classes} (each part alone, fwd + bwd)",
            "",
            "| part | literal ms | ours ms | ratio | literal GFLOP | ours GFLOP |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        names = [n for n in lit if isinstance(lit[n], dict)]
        for name in names:
            a, b = lit[name], ours[name]
            out.append(
                f"| {name} | {a['median'] * 1e3:.0f} | {b['median'] * 1e3:.0f} | {b['median'] / a['median']:.2f} | "
                f"{a['flops'] / 1e9:.1f} | {b['flops'] / 1e9:.1f} |"
            )
        ta = sum(lit[n]["median"] for n in names)
        tb = sum(ours[n]["median"] for n in names)
        fa = sum(lit[n]["flops"] for n in names) / 1e9
        fb = sum(ours[n]["flops"] for n in names) / 1e9
        out += [f"| **sum** | {ta * 1e3:.0f} | {tb * 1e3:.0f} | {tb / ta:.2f} | {fa:.1f} | {fb:.1f} |", ""]
    return out


def scale_parts(
    parts: dict[str, Any],
    basis_flops: dict[str, Any],
    target_flops: dict[str, Any],
    pixel_ratio: float,
    params_ratio: float,
) -> dict[str, float]:
    """Per-part seconds at a target size: measured seconds times the part's FLOP ratio (loss: pixels x classes
    ratio; optimizer: parameter ratio)."""
    out = {}
    for name, part in parts.items():
        if not isinstance(part, dict):
            continue
        if basis_flops.get(name):
            factor = target_flops[name] / basis_flops[name]
        elif name.startswith("loss"):
            factor = pixel_ratio
        else:
            factor = params_ratio
        out[name] = part["median"] * factor
    return out


def scaling_table(records: list[dict[str, Any]]) -> list[str]:
    """Estimated iteration time and attention memory at the paper's settings from the measured parts."""
    results = _results(records, "components")
    comps = {(c["impl"], c["encoder"], c["crop"], c["classes"]): c for c in results}
    counted = {(f["encoder"], f["crop"], f["classes"]): f for f in _results(records, "flops_at")}
    basis = SCALING_BASIS[0]
    if any((impl, *basis) not in comps for impl in ("literal", "ours")):
        return []
    out = [
        f"## Scaling estimate to the paper's settings (per process: 2 labeled + 2 unlabeled; basis: measured parts "
        f"at {_enc(basis[0])} {basis[1]} K={basis[2]})",
        "",
        "| setting | literal TFLOP | ours TFLOP | literal s (est.) | ours s (est.) | time ratio | cross-attention "
        "weights per labeled image | literal attention tensors | ours attention state |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for target in SCALING_TARGETS:
        if target not in counted:
            continue
        t = counted[target]
        pixel_ratio = (target[1] ** 2 * target[2]) / (basis[1] ** 2 * basis[2])
        est = {}
        for impl in ("literal", "ours"):
            measured = comps[(impl, *basis)]
            parts = {k: v for k, v in measured["parts"].items() if isinstance(v, dict)}
            basis_flops = {k: v["flops"] for k, v in parts.items()}
            params_ratio = t["params"] / measured["params"]
            est[impl] = sum(scale_parts(parts, basis_flops, t["flops"][impl], pixel_ratio, params_ratio).values())
        channels = 512 if target[0] == "mit_b0" else 1024  # 2C: C = 256 for MiT-B0, 512 for B1..B5
        n = math.ceil(target[1] / 32) ** 2
        weights = channels * target[2] * channels  # 2C x K * 2C per labeled image
        literal_mb = 2 * weights * 4 * 4 / 2**20  # 2 labeled images, ~4 float32 copies kept for backward
        ours_mb = 2 * weights / 2**20  # 1-byte dropout keep mask
        out.append(
            f"| {_enc(target[0])} crop {target[1]} K={target[2]} (N={n}) | "
            f"{sum(t['flops']['literal'].values()) / 1e12:.1f} | {sum(t['flops']['ours'].values()) / 1e12:.1f} | "
            f"{est['literal']:.0f} | {est['ours']:.0f} | {est['ours'] / est['literal']:.2f} | {weights / 1e6:.0f} M | "
            f"{literal_mb:.0f} MB | {ours_mb:.0f} MB |"
        )
    out += [
        "",
        "Seconds are for this CPU (for the ratio, not the absolute time); attention memory: the literal code keeps "
        "about four float32 copies of the weights of both labeled images for backward (psi, softmax, dropout, "
        "product), ours a one-byte dropout mask plus a few 16 MiB blocks.",
        "",
    ]
    return out


def targets_table(pairs: dict, memory: dict, records: list[dict[str, Any]]) -> list[str]:
    """The issue's targets with the measured ratios."""
    lines = ["## Targets (ratios ours / literal, medians)", "", "| target | measured | met |", "| --- | --- | --- |"]
    lines += targets_extra(records)
    for label, (encoder, crop, classes, precision, cl), kind, bound in TARGETS:
        config = (encoder, crop, classes)
        name = variant_name({**OURS, "precision": precision, "channels_last": cl})
        ratio = time_ratio(pairs, config, name) if kind == "time" else memory_ratio(memory, config, name)
        if ratio is not None:
            lines.append(f"| {label} | {ratio:.2f}x | {'yes' if ratio <= bound else 'NO'} |")
    return [*lines, ""]


def targets_extra(records: list[dict[str, Any]]) -> list[str]:
    """Memory-update and inference targets (need their own records)."""
    lines = []
    for r in records:
        if "result" not in r:
            continue
        res = r["result"]
        if r["kind"] == "memory_update":
            speedup = res["literal"]["median"] / res["ours"]["median"]
            lines.append(f"| memory update K=81: >= 10x faster | {speedup:.0f}x | {'yes' if speedup >= 10 else 'NO'} |")
        if r["kind"] == "inference" and res["encoder"] == "mit_b0" and res["size"] == 512:
            lat = res["latency"]
            ratio = lat["ours fp32"]["median"] / lat["literal fp32"]["median"]
            met = "yes" if ratio <= 0.7 else "NO"
            lines.append(f"| inference B0 512 fp32: latency <= 0.7x | {ratio:.2f}x | {met} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny subset (smoke test, ~1 minute)")
    parser.add_argument("--full", action="store_true", help="more configurations (~25 minutes instead of ~14)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.md from OUT/results.json")
    parser.add_argument("--out", default=str(HERE / "results"), help="output folder (results.json, results.md)")
    parser.add_argument("--threads", type=int, default=2, help="OpenMP/MKL/torch threads per measurement")
    parser.add_argument("--only", default="", help="run only the tasks whose label contains one of these (a,b,...)")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd training iteration")
    parser.add_argument(
        "--max-load", type=float, default=None, help="flag timings above this 1-minute load (threads + 0.75)"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.threads)
        return 0
    # The benchmark's own threads count in the load average: flag only what other processes add on top.
    max_load = args.max_load if args.max_load is not None else args.threads + 0.75
    out_dir = Path(args.out)
    if args.report_only:
        saved = json.loads((out_dir / "results.json").read_text())
        report = render(saved["records"], saved["machine"], max_load)
        (out_dir / "results.md").write_text(report + "\n")
        print(report)
        return 0
    filters = [f.strip() for f in args.only.split(",")]
    tasks = [t for t in plan(args.quick, args.compile, args.full) if any(f in t.label for f in filters)]
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.threads)
    print(f"{len(tasks)} measurements, {args.threads} threads; load average now {os.getloadavg()[0]:.2f}", flush=True)
    records = []
    start = time.perf_counter()
    for i, task in enumerate(tasks, start=1):
        record = {"kind": task.kind, "kwargs": task.kwargs, "label": task.label}
        record.update(run_task(task, args.threads, args.timeout))
        records.append(record)
        status = record.get("error") or _progress(record)
        elapsed = time.perf_counter() - start
        print(f"[{i}/{len(tasks)} {elapsed:5.0f} s] {task.label}: {status} (load {record['load'][1]:.2f})", flush=True)
        (out_dir / "results.json").write_text(json.dumps({"machine": info, "records": records}, indent=1))
    report = render(records, info, max_load)
    (out_dir / "results.md").write_text(report + "\n")
    print()
    print(report)
    return 0


def _progress(record: dict[str, Any]) -> str:
    res = record["result"]
    if record["kind"] == "train_pair":
        return f"{res['base']['median']:.3f} vs {res['other']['median']:.3f} s/it, ratio {res['ratio']:.2f}"
    if record["kind"] == "train_memory":
        return f"peak RSS {res['peak_rss_mb']:.0f} MB"
    if record["kind"] == "matmul_peak":
        return f"{res['gflops']:.0f} GFLOP/s"
    if record["kind"] == "memory_update":
        return f"literal {res['literal']['median'] * 1e3:.2f} ms, ours {res['ours']['median'] * 1e3:.3f} ms"
    if record["kind"] == "inference":
        return ", ".join(f"{k} {v['median'] * 1e3:.0f} ms" for k, v in res["latency"].items())
    if record["kind"] == "equivalence":
        m = res["max_rel"]
        f64 = max(v for k, v in m.items() if k.startswith("float64"))
        return (
            f"float64 max {f64:.1e}; float32 logits {m['float32: training logits, ours vs literal']:.1e}; float32 "
            f"gradients vs float64: ours {m['float32: gradients, ours vs float64']:.1e}, literal "
            f"{m['float32: gradients, literal vs float64']:.1e}"
        )
    if record["kind"] in ("components", "flops_at"):
        return "done"
    return "done"


if __name__ == "__main__":
    sys.exit(main())
