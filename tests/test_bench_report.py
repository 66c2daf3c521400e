"""The benchmark report (``bench/run.py``): ratios, targets, labels, with the official rows present or missing."""

from __future__ import annotations

import json
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
OFFICIAL_INFO = {
    **INFO,
    "bf16_units": ["avx512_bf16"],
    "official": {"path": "/src/AllSpark", "commit": None, "sha256": "0123456789ab"},
}
OFFICIAL = bench.official_variant("/src/AllSpark")


def record(task: bench.Task, result: dict, load: tuple[float, float] = (0.2, 0.3)) -> dict:
    return {"kind": task.kind, "kwargs": task.kwargs, "label": task.label, "load": list(load), "result": result}


def pair(base: dict, other: dict, classes: int, seconds: tuple[float, float], ratio: float, head: int = 768) -> dict:
    task = bench.pair_task(base, other, "mit_b0", 257, classes, head_dim=head)
    result = {"base": {"median": seconds[0]}, "other": {"median": seconds[1]}, "ratio": ratio}
    return record(task, result)


def memory(variant: dict, classes: int, peak_mb: float) -> dict:
    return record(bench.memory_task(variant, "mit_b0", 257, classes), {"peak_rss_mb": peak_mb})


def memory_update(baseline: str, base_s: float, ours_s: float) -> dict:
    result = {
        "baseline": baseline,
        "base": {"median": base_s},
        "ours": {"median": ours_s},
        "same_state": True,
        "shape": {"K": 81, "B_u": 4, "C": 512, "N": 289},
    }
    return record(bench.Task("memory_update", {}, "memory update"), result, (0.1, 0.1))


def inference(baseline: str | None, ours_ms: float, base_ms: float | None = None) -> dict:
    latency = {"ours fp32": {"median": ours_ms / 1e3}}
    if baseline:
        latency[f"{baseline} fp32"] = {"median": base_ms / 1e3}
    result = {"latency": latency, "checks": {}, "size": 512, "encoder": "mit_b0", "classes": 21, "baseline": baseline}
    return record(bench.Task("inference", {"encoder": "mit_b0"}, "inference B0 512"), result)


def components(impl: str, ms: tuple[float, float]) -> dict:
    parts = {
        "head fwd+bwd": {"median": ms[0] / 1e3, "flops": 2e9},
        "SGD step": {"median": ms[1] / 1e3, "flops": 0},
        "peak_rss_mb": 100.0,
    }
    result = {"parts": parts, "params": 10, "impl": impl, "encoder": "mit_b0", "crop": 257, "classes": 81}
    return record(bench.Task("components", {"impl": impl}, f"components {impl}"), result)


def test_report_against_the_official_code():
    bf16_cl = {**bench.OURS, "precision": "bf16", "channels_last": True}
    records = [
        memory_update("official", 0.030, 0.002),
        inference("official", 250.0, 700.0),
        pair(OFFICIAL, bench.OURS, 81, (4.0, 1.0), 0.26),  # median of paired ratios, not 1.0 / 4.0
        memory(OFFICIAL, 81, 2000.0),
        memory(bench.OURS, 81, 1300.0),
        pair(OFFICIAL, bench.OURS, 21, (3.0, 1.2), 0.4),
        pair(bench.OURS, bf16_cl, 21, (1.2, 1.8), 1.5),
        pair(OFFICIAL, bench.OURS, 21, (2.0, 1.0), 0.52, head=256),
        components("official", (400.0, 10.0)),
        components("ours", (100.0, 20.0)),
    ]
    report = bench.render(records, OFFICIAL_INFO, max_load=1.5)
    assert "bf16 units: avx512_bf16" in report
    assert (
        "Baseline: the official code from `/src/AllSpark` (no git metadata; model files sha256 0123456789ab)" in report
    )
    assert "not measured" not in report and "restatement" not in report.lower()
    assert "| B0 | 257 | 81 | 768 | 4.00 | 1.00 | 0.26 | 2000 | 1300 | 0.65 | 0.2-0.3 |" in report
    assert "| B0 | 257 | 21 | 256 | 2.00 | 1.00 | 0.52 | - | - | - | 0.2-0.3 |" in report
    assert "| training B0 257 K=81 fp32: time <= 0.5x | 0.26x | yes |" in report
    assert "| training B0 257 K=81 fp32: peak memory <= 0.6x | 0.65x | NO |" in report
    assert "| training B0 257 K=21 bf16 + channels-last: time <= 0.5x | 0.60x | NO |" in report  # 0.4 * 1.5
    assert "| B0 | 257 | 21 | 768 | bf16 + channels-last | 1.80 | 1.50 | 0.60 | - | - | 0.2-0.3 |" in report
    assert "| official (per-sample, per-class loop) | ours (one scatter) | speed-up | same final state |" in report
    assert "| memory update K=81: >= 10x faster | 15x | yes |" in report
    assert "| B0 K=21 | 512 | fp32 | 700 | 250 | 0.36 |" in report
    assert "| inference B0 512 fp32: latency <= 0.7x | 0.36x | yes |" in report
    assert "| part | official ms | ours ms | ratio | official GFLOP | ours GFLOP |" in report
    assert "| head fwd+bwd | 400 | 100 | 0.25 | 2.0 | 2.0 |" in report
    assert "timings unreliable" not in report


def test_report_without_the_official_code():
    """The official rows are reported as not measured; the restatement appears only in the design-choice rows, and
    labelled so."""
    plan = bench.plan(quick=False, compile_model=False)
    by_label = {t.label: t for t in plan}
    records = [
        memory_update("literal", 0.030, 0.002),
        inference(None, 250.0),
        record(by_label["time ours fp32: mit_b0 crop 257 K=21"], {"median": 1.0}),
        record(by_label["memory ours fp32: mit_b0 crop 257 K=21"], {"peak_rss_mb": 900.0}),
        components("literal", (400.0, 10.0)),
        components("ours", (100.0, 20.0)),
    ]
    report = bench.render(records, INFO, max_load=1.5)
    assert bench.NOT_MEASURED in report
    assert "| B0 | 257 | 21 | 768 | - | 1.00 | - | - | 900 | - | 0.2-0.3 |" in report
    assert "Official not measured: ours alone." in report
    assert "| training B0 257 K=21 fp32: time <= 0.8x | not measured (needs `--official DIR`) | - |" in report
    assert "| inference B0 512 fp32: latency <= 0.7x | not measured (needs `--official DIR`) | - |" in report
    assert "| model | size | mode | ours ms |" in report and "| B0 K=21 | 512 | fp32 | 250 |" in report
    assert "| restatement (per-sample, per-class loop) |" in report
    assert "Restatement: isolates one design choice, the vectorised update." in report
    assert "| memory update K=81: >= 10x faster | 15x (restatement: isolates the update) | yes |" in report
    assert "| part | restatement ms | ours ms | ratio | restatement GFLOP | ours GFLOP |" in report
    assert "Restatement: each part row isolates one design choice" in report


def test_report_flags_a_loaded_machine():
    loaded = memory(bench.OURS, 81, 1000.0)
    loaded["load"] = [3.0, 4.2]
    loaded["busy"] = 0.4
    report = bench.render([loaded], INFO, max_load=1.5)
    assert "1-minute load average during the run: 3.00 to 4.20 **(above 1.5: timings unreliable)**" in report
    assert "CPU share used by other processes just before a measurement: 40% to 40%." in report


def test_plan_with_the_official_code():
    plan = bench.plan(quick=False, compile_model=False, official="/src/AllSpark")
    labels = {t.label for t in plan}
    for label in (
        "time official vs ours fp32: mit_b0 crop 257 K=21",
        "time ours fp32 vs ours bf16 + channels-last: mit_b0 crop 257 K=21",
        "time official vs ours fp32: mit_b0 crop 257 K=81",
        "time official vs ours fp32: mit_b0 crop 257 K=21 head 256",
        "time official vs ours fp32: mit_b0 crop 257 K=81 head 256",
        "time ours fp32 vs ours bf16: mit_b0 crop 257 K=21 head 256",
        "memory official: mit_b0 crop 257 K=81",
        "memory ours fp32: mit_b0 crop 257 K=81",
        "memory update K=81",
        "inference B0 512",
        "components official B2 513 K=21",
    ):
        assert label in labels
    assert not any("restatement" in label for label in labels)
    for task in plan:
        if task.kind in ("equivalence", "memory_update", "inference", "components", "flops_at"):
            assert task.kwargs["official"] == "/src/AllSpark", task.label
        if task.kind == "train_pair" and task.kwargs["base"]["impl"] == "official":
            assert task.kwargs["base"]["path"] == "/src/AllSpark"
    full = {t.label for t in bench.plan(quick=False, compile_model=False, full=True, official="/src/AllSpark")}
    assert "time official vs restatement: mit_b0 crop 257 K=21" in full


@pytest.mark.parametrize("quick", [True, False])
def test_plan_without_the_official_code(quick):
    plan = bench.plan(quick, compile_model=False)
    labels = {t.label for t in plan}
    assert "time ours fp32: mit_b0 crop 129 K=21" in labels
    assert not any(label.startswith(("time official", "time restatement")) for label in labels)
    assert all("official" not in t.kwargs for t in plan)
    if not quick:
        assert {"components restatement B0 257 K=81", "components restatement B2 513 K=21"} <= labels
        assert "time ours fp32 vs ours bf16 + channels-last: mit_b0 crop 257 K=21" in labels


def test_main_rejects_a_folder_that_is_not_the_official_code(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--official", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"--official {tmp_path}: model/model_helper.py, model/backbone/mit.py, model/semseg/allspark.py not found"
        in err
    )
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def test_cpu_busy_and_wait_idle(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n")
    assert bench._cpu_times(str(stat)) == (150, 1000)  # busy: everything but idle and iowait
    assert bench._cpu_times(str(tmp_path / "none")) is None
    samples = iter([(150, 1000), (450, 1400)])
    monkeypatch.setattr(bench, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    assert bench.cpu_busy(1.0) == pytest.approx(0.75)
    shares = iter([0.9, 0.5, 0.1, 0.0])
    calls = []
    monkeypatch.setattr(bench, "cpu_busy", lambda interval=1.0: calls.append(interval) or next(shares))
    assert bench.wait_idle(60.0, busy_max=0.15) == 0.1
    assert len(calls) == 3
    calls.clear()
    assert bench.wait_idle(0.0) == 0.0  # no waiting: one sample, recorded
    assert len(calls) == 1


def test_plot_points_take_the_official_rows(tmp_path):
    import plot

    records = [
        pair(OFFICIAL, bench.OURS, 81, (4.0, 1.0), 0.26),
        pair(OFFICIAL, bench.OURS, 21, (2.0, 1.5), 0.75, head=256),  # not the AllSpark head width: left out
        memory(OFFICIAL, 81, 2048.0),
        memory(bench.OURS, 81, 1024.0),
        memory({**bench.OURS, "precision": "bf16"}, 81, 512.0),  # a variant: left out
        record(bench.time_task(bench.OURS, "mit_b0", 129, 21), {"median": 0.5}),  # ours alone
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"machine": INFO, "records": records}))
    assert plot.train_points(path) == {
        ("official", 257, 81): {"time": 4.0, "memory": 2.0},
        ("ours", 257, 81): {"time": 1.0, "memory": 1.0},
        ("ours", 129, 21): {"time": 0.5},
    }


def test_others_share_subtracts_the_measurement_itself():
    # 2 cores for 10 s; the machine was busy 15 CPU-seconds (1500 ticks), the measurement itself used 12
    assert bench.others_share((100, 0), (1600, 0), 12.0, 10.0, 2) == pytest.approx(0.15)
    assert bench.others_share((100, 0), (1100, 0), 12.0, 10.0, 2) == 0.0  # tick rounding never goes negative
    assert bench.others_share(None, (1100, 0), 12.0, 10.0, 2) is None


def test_measure_repeats_disturbed_runs_and_keeps_the_quietest(monkeypatch):
    runs = iter(
        [
            {"result": {"x": 1}, "others": 0.6},
            {"error": "exit 1"},
            {"result": {"x": 3}, "others": 0.3},
        ]
    )
    monkeypatch.setattr(bench, "run_task", lambda *args: next(runs))
    task = bench.Task("matmul_peak", {}, "m")
    kept = bench.measure(task, 2, 10.0, max_others=0.1, retries=2)
    assert kept == {"result": {"x": 3}, "others": 0.3, "tries": 3}
    monkeypatch.setattr(bench, "run_task", lambda *args: {"result": {"x": 4}, "others": 0.05})
    assert bench.measure(task, 2, 10.0, max_others=0.1)["tries"] == 1  # quiet enough: run once
    monkeypatch.setattr(bench, "run_task", lambda *args: {"result": {"x": 5}, "others": 0.9})
    assert bench.measure(task, 2, 10.0)["tries"] == 1  # no --max-others: never repeated
