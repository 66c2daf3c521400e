"""The GPU check: allspark-seg's CUDA tests, then its training iteration against the official code on the same GPU.

Usage::

    python bench/gpu_check.py --out bench/results/gpu --official DIR   # DIR: a checkout of xmed-lab/AllSpark
    python bench/gpu_check.py --out bench/results/gpu                  # baseline: the restatement instead
    python bench/gpu_check.py --out /tmp/gpu-dry --cpu-dry-run         # the same code on the CPU, tiny sizes

In order (a few minutes on one GPU; it prints what it is doing):

1. ``pytest -m cuda tests/test_cuda.py`` (log: ``OUT/pytest.txt``): ``allspark-seg train`` on CUDA in fp32, bf16 and
   fp16 (GradScaler), SIGKILLed mid-run and resumed, compared with an uninterrupted run; ``eval``, ``predict`` and
   ONNX ``export`` of the CUDA checkpoint; a one-process ``torchrun`` run over NCCL with ``nn.SyncBatchNorm``; the
   Semantic Memory update and a whole training step after the warm-up under ``torch.cuda.set_sync_debug_mode``.
2. For each configuration (MiT-B0 crop 257 K=21 and K=81, MiT-B2 crop 513 K=21; 2 labeled + 2 unlabeled images, head
   width 768, SGD, the memory read), in a fresh process (``run.run_task`` -> ``workloads.device_train``): the peak
   GPU memory of each variant alone (``torch.cuda.max_memory_allocated`` over 2 iterations) and the seconds per
   iteration of all variants in turn (median of 10 after 3 warm-ups, ``torch.cuda.synchronize`` around each). The
   variants: the baseline in fp32 (the official code with ``--official DIR``, imported as ``bench/run.py`` does;
   without it the restatement ``tests/official_reference.py``, labelled as such), ours in fp32, in bf16 (autocast)
   and in fp16 (autocast and a gradient scaler). Ratios are ours / baseline (medians of the per-round ratios).
3. ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (the tables, also printed).

Without CUDA it says so in one sentence and exits with status 2. ``--cpu-dry-run`` runs steps 1-3 on the CPU with one
tiny configuration (the CUDA tests then report themselves skipped), so the script itself can be tried anywhere; its
numbers mean nothing. Exit status: 0 when the tests passed and every measurement ran, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import run
from run import HEAD_DIM, LITERAL, OURS, Task, official_variant, variant_name

REPO = run.HERE.parent
TESTS = ("tests/test_cuda.py",)
PRECISIONS = ("fp32", "bf16", "fp16")
# (encoder, crop, classes): the benchmark's key configurations and the paper's crop on MiT-B2 (B5's stage widths).
CONFIGS = (("mit_b0", 257, 21), ("mit_b0", 257, 81), ("mit_b2", 513, 21))
TIMING = {"warmup": 3, "repeats": 10, "head_dim": HEAD_DIM, "memory_iterations": 2}
DRY_CONFIGS = (("mit_b0", 33, 5),)  # crop 33: a 2 x 2 stage-4 grid, as the official memory formula gives
DRY_TIMING = {"warmup": 1, "repeats": 2, "head_dim": 32, "memory_iterations": 1}
NO_CUDA = (
    "No CUDA device: torch.cuda.is_available() is False (no GPU, or a CPU-only PyTorch build), so there is nothing to "
    "check here; run this on a machine with an NVIDIA GPU, or pass --cpu-dry-run to try the script on the CPU."
)


def plan(official: str | None, dry_run: bool) -> list[Task]:
    """One ``device_train`` task per configuration: the baseline in fp32, then ours in each precision."""
    base = official_variant(official) if official else LITERAL
    variants = [base] + [{**OURS, "precision": p} for p in PRECISIONS]
    timing = DRY_TIMING if dry_run else TIMING
    device = "cpu" if dry_run else "cuda"
    tasks = []
    for encoder, crop, classes in DRY_CONFIGS if dry_run else CONFIGS:
        kwargs = {"variants": variants, "encoder": encoder, "crop": crop, "classes": classes, "device": device}
        tasks.append(Task("device_train", {**kwargs, **timing}, f"{run._enc(encoder)} crop {crop} K={classes}"))
    return tasks


def run_tests(out_dir: Path) -> dict[str, Any]:
    """``pytest -m cuda`` on the CUDA tests, its output shown and written to ``OUT/pytest.txt``."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", *TESTS, "-p", "no:cacheprovider", "-v", "-rfEs"]
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")}
    print(f"[tests] pytest -m cuda {' '.join(TESTS)} (log: {out_dir / 'pytest.txt'})", flush=True)
    start = time.perf_counter()
    lines = []
    with (
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc,
        (out_dir / "pytest.txt").open("w") as log,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            lines.append(line.rstrip())
        code = proc.wait()
    summary = next((m.group(1) for m in map(re.compile(r"^=+ (.+) in [\d.]+s").match, reversed(lines)) if m), "")
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary)}
    return {
        "command": f"pytest -m cuda {' '.join(TESTS)}",
        "returncode": code,
        "summary": summary,
        "counts": counts,
        "seconds": time.perf_counter() - start,
        "log": "pytest.txt",
    }


def machine(threads: int, official: str | None, dry_run: bool) -> dict[str, Any]:
    """``run.machine_info`` plus the GPU: name, compute capability, memory, CUDA and cuDNN versions."""
    import torch

    info = run.machine_info(threads, official)
    info["cuda"] = torch.version.cuda
    if dry_run:
        info["gpu"] = "none (CPU dry run)"
        return info
    props = torch.cuda.get_device_properties(0)
    info["gpu"] = props.name
    info["capability"] = f"{props.major}.{props.minor}"
    info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    info["cudnn"] = torch.backends.cudnn.version()
    return info


def _memory(row: dict[str, Any]) -> float | None:
    return row.get("peak_mb", row.get("peak_rss_mb"))


def render(records: list[dict[str, Any]], info: dict[str, Any], tests: dict[str, Any] | None, dry_run: bool) -> str:
    """The Markdown report: the device, the tests' outcome, one table of time and peak memory."""
    official = info.get("official")
    if official:
        base = f"the official code from `{official['path']}` (commit {official['commit']}, sha256 {official['sha256']})"
    else:
        base = "the restatement `tests/official_reference.py` (not the official code: no `--official DIR`)"
    if dry_run:
        device = f"CPU dry run on {info['cpu']} (tiny sizes: the numbers mean nothing)"
    else:
        device = f"{info['gpu']} (compute {info['capability']}, {info['gpu_memory_gib']} GiB)"
    out = [
        "# GPU check",
        "",
        f"Device: {device}; PyTorch {info['torch']} (CUDA {info['cuda']}), commit {info['commit']}, {info['date']}. "
        f"Baseline: {base}.",
        "",
    ]
    if tests is not None:
        out += [f"Tests: `{tests['command']}`: {tests['summary'] or 'no summary'} (exit {tests['returncode']}).", ""]
    if dry_run:
        memory, how = "peak RSS MB", "the process's peak resident memory (cumulative over the variants)"
    else:
        memory, how = "peak GPU memory MB", "`torch.cuda.max_memory_allocated` above what was allocated before"
    out += [
        "2 labeled + 2 unlabeled images, SGD, the memory read. s/iteration: median of the timed iterations, the "
        "variants in turn; time ratio: ours / baseline, the median of the per-round ratios. Peak memory: each variant "
        f"alone, {how}.",
        "",
        f"| configuration | variant | s/iteration | time ratio | {memory} | memory ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for record in records:
        label = record["label"]
        if "result" not in record:
            out.append(f"| {label} | failed: {record.get('error', '?')} | | | | |")
            continue
        rows = record["result"]["results"]
        ref = _memory(rows[0])
        for i, row in enumerate(rows):
            name = variant_name(row["variant"]) + (" fp32" if i == 0 else "")
            mem = _memory(row)
            ratio = "-" if dry_run or not ref or mem is None else f"{mem / ref:.2f}"
            out.append(
                f"| {label if i == 0 else ''} | {name} | {row['median']:.4f} | {row['ratio']:.2f} | "
                f"{run._fmt(mem, '.0f')} | {ratio} |"
            )
    return "\n".join(out)


def _progress(record: dict[str, Any]) -> str:
    if "result" not in record:
        return f"failed: {record.get('error')}"
    rows = record["result"]["results"]
    return ", ".join(f"{variant_name(r['variant'])} {r['median']:.4f} s ({r['ratio']:.2f}x)" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (gpu_check.json, gpu_check.md, pytest.txt)")
    parser.add_argument("--official", metavar="DIR", help="checkout of xmed-lab/AllSpark: the baseline")
    parser.add_argument("--cpu-dry-run", action="store_true", help="run the same code on the CPU, tiny sizes")
    parser.add_argument("--no-tests", action="store_true", help="skip pytest, measure only")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="CPU threads per worker")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    from official import official_dir_arg

    official = official_dir_arg(parser, args.official)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine(args.threads, official, args.cpu_dry_run)
    print(f"gpu check on {info['gpu']}, PyTorch {info['torch']}; writing to {out_dir}", flush=True)
    start = time.perf_counter()
    tests = None if args.no_tests else run_tests(out_dir)
    tasks = plan(official, args.cpu_dry_run)
    records: list[dict[str, Any]] = []
    for i, task in enumerate(tasks, start=1):
        names = ", ".join(variant_name(v) for v in task.kwargs["variants"])
        print(f"[{i}/{len(tasks)}] {task.label}: memory, then time of {names} ...", flush=True)
        record = {"kind": task.kind, "kwargs": task.kwargs, "label": task.label}
        record.update(run.run_task(task, args.threads, args.timeout))
        records.append(record)
        print(f"[{i}/{len(tasks)} {time.perf_counter() - start:5.0f} s] {task.label}: {_progress(record)}", flush=True)
        saved = {"machine": info, "dry_run": args.cpu_dry_run, "tests": tests, "records": records}
        (out_dir / "gpu_check.json").write_text(json.dumps(saved, indent=1))
    report = render(records, info, tests, args.cpu_dry_run)
    (out_dir / "gpu_check.md").write_text(report + "\n")
    print()
    print(report)
    failed = (tests is not None and tests["returncode"] != 0) or any("result" not in r for r in records)
    print(f"\ngpu check {'FAILED' if failed else 'passed'} in {time.perf_counter() - start:.0f} s.", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
