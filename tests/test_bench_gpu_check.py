"""The GPU check (``bench/gpu_check.py``): its refusal without CUDA, its plan, its report, and a CPU dry run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402

INFO = {
    "gpu": "NVIDIA H100 80GB HBM3",
    "capability": "9.0",
    "gpu_memory_gib": 79.1,
    "torch": "2.13.0+cu128",
    "cuda": "12.8",
    "commit": "abc1234",
    "date": "2026-12-01 10:00:00",
    "cpu": "AMD EPYC",
    "official": {"path": "/src/AllSpark", "commit": None, "sha256": "0123456789ab"},
}


def row(variant: dict, median: float, ratio: float, peak_mb: float) -> dict:
    return {"variant": variant, "median": median, "ratio": ratio, "first": 2 * median, "peak_mb": peak_mb}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_says_so_in_one_sentence_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gpu_check.main(["--out", str(tmp_path / "gpu")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == gpu_check.NO_CUDA
    assert "CUDA" in gpu_check.NO_CUDA and gpu_check.NO_CUDA.count(". ") == 0  # one sentence
    assert not (tmp_path / "gpu").exists()


def test_plan_times_the_baseline_and_ours_in_three_precisions() -> None:
    tasks = gpu_check.plan("/src/AllSpark", dry_run=False)
    assert [t.label for t in tasks] == ["B0 crop 257 K=21", "B0 crop 257 K=81", "B2 crop 513 K=21"]
    for task in tasks:
        assert task.kind == "device_train" and task.kwargs["device"] == "cuda"
        variants = task.kwargs["variants"]
        assert variants[0] == {"impl": "official", "path": "/src/AllSpark"}
        assert [v["precision"] for v in variants[1:]] == ["fp32", "bf16", "fp16"]
        assert (task.kwargs["warmup"], task.kwargs["repeats"], task.kwargs["head_dim"]) == (3, 10, 768)
    (dry,) = gpu_check.plan(None, dry_run=True)
    assert dry.kwargs["device"] == "cpu" and dry.kwargs["variants"][0] == {"impl": "literal"}
    assert dry.kwargs["crop"] // 32 + 1 == math.ceil(dry.kwargs["crop"] / 32)  # the official memory grid is right


def test_report_of_a_gpu_run() -> None:
    official = {"impl": "official", "path": "/src/AllSpark"}
    rows = [
        row(official, 0.20, 1.0, 4000.0),
        row({"impl": "ours", "precision": "fp32"}, 0.08, 0.4, 2000.0),
        row({"impl": "ours", "precision": "bf16"}, 0.05, 0.25, 1200.0),
        row({"impl": "ours", "precision": "fp16"}, 0.06, 0.3, 1300.0),
    ]
    records = [
        {"label": "B0 crop 257 K=21", "result": {"results": rows}},
        {"label": "B2 crop 513 K=21", "error": "exit 1: CUDA out of memory"},
    ]
    tests = {"command": "pytest -m cuda tests/test_cuda.py", "summary": "8 passed", "returncode": 0}
    report = gpu_check.render(records, INFO, tests, dry_run=False)
    assert "Device: NVIDIA H100 80GB HBM3 (compute 9.0, 79.1 GiB); PyTorch 2.13.0+cu128 (CUDA 12.8)" in report
    assert "Baseline: the official code from `/src/AllSpark`" in report
    assert "Tests: `pytest -m cuda tests/test_cuda.py`: 8 passed (exit 0)." in report
    assert "| B0 crop 257 K=21 | official fp32 | 0.2000 | 1.00 | 4000 | 1.00 |" in report
    assert "|  | ours bf16 | 0.0500 | 0.25 | 1200 | 0.30 |" in report
    assert "| B2 crop 513 K=21 | failed: exit 1: CUDA out of memory |" in report
    without = gpu_check.render(records, {**INFO, "official": None}, None, dry_run=False)
    assert "the restatement `tests/official_reference.py` (not the official code" in without
    assert "Tests:" not in without


@pytest.mark.slow
def test_cpu_dry_run_measures_every_variant(tmp_path: Path) -> None:
    """The measurement code end to end on the CPU (tiny sizes, a worker process as on the GPU; ~20 s)."""
    out = tmp_path / "dry"
    assert gpu_check.main(["--out", str(out), "--cpu-dry-run", "--no-tests", "--threads", "1"]) == 0
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["dry_run"] and saved["tests"] is None
    (record,) = saved["records"]
    rows = record["result"]["results"]
    names = [gpu_check.variant_name(r["variant"]) for r in rows]
    assert names == ["restatement", "ours fp32", "ours bf16", "ours fp16"]
    for r in rows:
        assert len(r["times"]) == gpu_check.DRY_TIMING["repeats"] and r["median"] > 0 and r["peak_rss_mb"] > 0
        assert math.isfinite(r["last_loss"])
    assert rows[0]["ratio"] == 1.0
    assert "| B0 crop 33 K=5 | restatement fp32 |" in (out / "gpu_check.md").read_text()
