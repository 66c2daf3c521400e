"""The benchmark report (bench/run.py) computes the ratios and target verdicts it prints from the raw records.

The measurements themselves are not run here (a full run takes ~15 minutes, ``--quick`` about one; see
docs/performance.md): the records are synthetic.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import run as bench  # noqa: E402

INFO = {
    "cpu": "test CPU",
    "cores": 2,
    "threads": 2,
    "torch": "x",
    "cpu_capability": "AVX512",
    "commit": "abc",
    "date": "today",
    "gpu": "none",
}


def record(task: bench.Task, result: dict, load: tuple[float, float] = (0.2, 0.3)) -> dict:
    return {"kind": task.kind, "kwargs": task.kwargs, "label": task.label, "load": list(load), "result": result}


def pair(base: dict, other: dict, classes: int, seconds: tuple[float, float], ratio: float) -> dict:
    task = bench.pair_task(base, other, "mit_b0", 257, classes)
    result = {"base": {"median": seconds[0]}, "other": {"median": seconds[1]}, "ratio": ratio}
    return record(task, result)


def memory(variant: dict, classes: int, peak_mb: float) -> dict:
    return record(bench.memory_task(variant, "mit_b0", 257, classes), {"peak_rss_mb": peak_mb})


def test_report_ratios_and_targets():
    bf16_cl = {**bench.OURS, "precision": "bf16", "channels_last": True}
    records = [
        pair(bench.LITERAL, bench.OURS, 81, (4.0, 1.0), 0.26),  # median of paired ratios, not 1.0 / 4.0
        memory(bench.LITERAL, 81, 2000.0),
        memory(bench.OURS, 81, 1300.0),
        pair(bench.LITERAL, bench.OURS, 21, (3.0, 1.2), 0.4),
        pair(bench.OURS, bf16_cl, 21, (1.2, 1.8), 1.5),
        {
            "kind": "memory_update",
            "kwargs": {},
            "label": "memory update",
            "load": [0.1, 0.1],
            "result": {
                "literal": {"median": 0.030},
                "ours": {"median": 0.002},
                "same_state": True,
                "shape": {"K": 81, "B_u": 4, "C": 512, "N": 289},
            },
        },
    ]
    report = bench.render(records, INFO, max_load=1.5)
    assert "| B0 | 257 | 81 | 4.00 | 1.00 | 0.26 | 2000 | 1300 | 0.65 |" in report
    assert "| training B0 257 K=81 fp32: time <= 0.5x | 0.26x | yes |" in report
    assert "| training B0 257 K=81 fp32: peak memory <= 0.6x | 0.65x | NO |" in report
    assert "| training B0 257 K=21 bf16 + channels-last: time <= 0.5x | 0.60x | NO |" in report  # 0.4 * 1.5
    assert "| B0 | 257 | 21 | bf16 + channels-last | 1.80 | 1.50 | 0.60 | - | - |" in report
    assert "| memory update K=81: >= 10x faster | 15x | yes |" in report
    assert "timings unreliable" not in report


def test_report_flags_a_loaded_machine():
    loaded = memory(bench.OURS, 81, 1000.0)
    loaded["load"] = [3.0, 4.2]
    assert "1-minute load average during the run: 3.00 to 4.20 **(above 1.5: timings unreliable)**" in bench.render(
        [loaded], INFO, max_load=1.5
    )


@pytest.mark.parametrize("quick", [True, False])
def test_plan_contains_every_target_row(quick):
    labels = {t.label for t in bench.plan(quick, compile_model=False)}
    assert "time literal vs ours fp32: mit_b0 crop 129 K=21" in labels
    if not quick:
        for label in (
            "time literal vs ours fp32: mit_b0 crop 257 K=21",
            "time ours fp32 vs ours bf16 + channels-last: mit_b0 crop 257 K=21",
            "time literal vs ours fp32: mit_b0 crop 257 K=81",
            "memory literal: mit_b0 crop 257 K=81",
            "memory ours fp32: mit_b0 crop 257 K=81",
            "memory update K=81",
            "inference B0 512",
        ):
            assert label in labels
