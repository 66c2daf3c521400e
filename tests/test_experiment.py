"""The experiment command: grid and variant syntax, a tiny 2 x 2 study, its table, resumption and the CLI."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import yaml

from allspark_seg import experiment as E
from allspark_seg.cli import main
from allspark_seg.engine import train as train_module
from allspark_seg.errors import ConfigError
from train_utils import TINY_MODEL


def test_grid_variant_and_seed_syntax():
    assert E.parse_grid("method=supervised,allspark+") == ("method", ["supervised", "allspark+"])
    assert E.parse_grid("eval.scales=[1.0],[0.75, 1.0]") == ("eval.scales", ["[1.0]", "[0.75, 1.0]"])
    variant = E.parse_variant("no-memory:method=allspark+ model.allspark.memory=false")
    assert variant.name == "no-memory"
    assert variant.overrides == ("method=allspark+", "model.allspark.memory=false")
    assert E.parse_variant("base:").overrides == ()
    assert E.parse_seeds("3") == [0, 1, 2] and E.parse_seeds("4,1") == [4, 1]
    for bad in ("method", "method=", "=a,b", "a=x,,y"):
        with pytest.raises(ConfigError, match="--grid"):
            E.parse_grid(bad)
    for bad in ("no-name", ":a=b", "x:novalue"):
        with pytest.raises(ConfigError, match="--variant"):
            E.parse_variant(bad)
    with pytest.raises(ConfigError, match="--seeds"):
        E.parse_seeds("0,0")
    settings = E.expand_settings(
        [variant, E.parse_variant("ema-off:method=allspark+ semi.ema=false")],
        [E.parse_grid("data.synthetic.num_labeled=8,32"), E.parse_grid("train.lr=0.1,0.2")],
    )
    assert [s.name for s in settings][:3] == [
        "no-memory num_labeled=8 lr=0.1",
        "no-memory num_labeled=8 lr=0.2",
        "no-memory num_labeled=32 lr=0.1",
    ]
    assert settings[0].overrides == (
        "method=allspark+",
        "model.allspark.memory=false",
        "data.synthetic.num_labeled=8",
        "train.lr=0.1",
    )
    assert settings[-1].labels == (("variant", "ema-off"), ("num_labeled", "32"), ("lr", "0.2"))
    with pytest.raises(ConfigError, match="distinct names"):
        E.expand_settings([variant, variant], [])


@pytest.fixture
def base_config(tmp_path):
    """A tiny unresolved config (no semi.* keys, so every method gets its own presets)."""
    config = {
        "model": dict(TINY_MODEL),
        "data": {
            "format": "synthetic",
            "crop_size": 48,
            "num_workers": 0,
            "synthetic": {"num_labeled": 4, "num_unlabeled": 8, "num_val": 2, "image_size": 64},
        },
        "train": {"iterations": 2, "batch_size": 2, "lr": 0.01, "log_every": 1, "eval_every": 1},
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_tiny_study_writes_the_table_with_mean_and_std(tmp_path, base_config, monkeypatch):
    out = tmp_path / "study"
    argv = ["experiment", "-c", str(base_config), "--out", str(out), "--seeds", "2", "--grid", "method=supervised"]
    argv += ["--variant", "fast:train.lr=0.05", "--variant", "slow:train.lr=0.001", "--set", "train.iterations=3"]
    assert main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    runs = summary["runs"]
    assert len(runs) == 4 and {r["status"] for r in runs} == {"done"}
    assert sorted((r["setting"], r["seed"]) for r in runs) == [
        ("fast method=supervised", 0),
        ("fast method=supervised", 1),
        ("slow method=supervised", 0),
        ("slow method=supervised", 1),
    ]
    for row in summary["summary"]:
        mine = [r for r in runs if r["setting"] == row["setting"]]
        best = [100 * r["best_miou"] for r in mine]
        final = [100 * r["final_miou"] for r in mine]
        assert row["runs"] == 2 and row["variant"] in ("fast", "slow") and row["method"] == "supervised"
        assert row["best_mean"] == pytest.approx(statistics.mean(best))
        assert row["best_std"] == pytest.approx(statistics.stdev(best))  # sample std over seeds
        assert row["final_mean"] == pytest.approx(statistics.mean(final))
        assert row["final_std"] == pytest.approx(statistics.stdev(final))
    # Each run is a real training run with the merged overrides, sharing one generated dataset.
    run_dir = out / "runs" / "fast__method=supervised" / "seed1"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (config["method"], config["train"]["lr"], config["train"]["seed"], config["train"]["iterations"]) == (
        "supervised",
        0.05,
        1,
        3,
    )
    assert len(list((out / "data").iterdir())) == 1
    assert (run_dir / "train.log").read_text().count("eval @") == 3
    report = (out / "report.md").read_text()
    row = next(r for r in summary["summary"] if r["variant"] == "fast")
    assert f"| fast | supervised | 2 | {row['best_mean']:.2f} ± {row['best_std']:.2f} |" in report
    assert "allspark-seg train --config" in report and "train.seed=0" in report
    assert (out / "curves.png").stat().st_size > 0
    assert len((out / "results.csv").read_text().splitlines()) == 5

    # Running again trains nothing (finished runs are skipped) and rebuilds the same table.
    monkeypatch.setattr(train_module, "fit", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = E.run_experiment(
        base_config,
        out,
        seeds=[0, 1],
        overrides=["train.iterations=3"],
        grids=["method=supervised"],
        variants=["fast:train.lr=0.05", "slow:train.lr=0.001"],
    )
    assert again.summary == summary["summary"]


@pytest.mark.slow
def test_stopped_runs_are_recorded_and_reports_rebuilt(tmp_path, base_config, monkeypatch, capsys):
    original = train_module.fit

    def fit(cfg, out_dir, **kwargs):
        if cfg.train.seed == 1:
            raise train_module.TrainingCollapsed("scripted collapse")
        return original(cfg, out_dir, **kwargs)

    monkeypatch.setattr(train_module, "fit", fit)
    out = tmp_path / "study"
    result = E.run_experiment(base_config, out, seeds=[0, 1], grids=["method=supervised,selftrain"])
    assert [r["status"] for r in result.runs] == ["done", "done", "stopped", "stopped"]
    row = result.summary[0]
    assert (row["runs"], row["failed"], row["best_std"]) == (2, 1, None)  # one number: no std
    assert math.isclose(row["best_mean"], 100 * result.runs[0]["best_miou"])
    report = (out / "report.md").read_text()
    assert "selftrain seed 1: stopped: scripted collapse" in report.replace("method=", "")
    assert "| supervised | 2 (1 stopped) |" in report
    # --report-only trains nothing and reports what is there.
    monkeypatch.setattr(train_module, "fit", lambda *a, **k: pytest.fail("--report-only trained"))
    assert main(["experiment", "-c", str(base_config), "--out", str(out), "--seeds", "0,1", "--report-only"]) == 0
    assert "Report:" in capsys.readouterr().out


def test_bad_settings_fail_before_training(tmp_path, base_config, monkeypatch):
    monkeypatch.setattr(train_module, "fit", lambda *a, **k: pytest.fail("trained with a bad setting"))
    with pytest.raises(ConfigError, match="Setting 'method=nosuch'"):
        E.run_experiment(base_config, tmp_path / "x", seeds=[0], grids=["method=supervised,nosuch"])


def test_variant_seed_counts_limit_a_row_to_the_first_seeds(tmp_path, base_config):
    one = E.parse_variant("probe@1:method=supervised train.lr=0.05")
    assert (one.name, one.num_seeds, one.overrides) == ("probe", 1, ("method=supervised", "train.lr=0.05"))
    assert E.parse_variant("key:method=supervised").num_seeds is None
    for bad in ("probe@:method=supervised", "probe@0:x=1", "probe@two:x=1"):
        with pytest.raises(ConfigError, match="--variant"):
            E.parse_variant(bad)
    settings = E.expand_settings([one, E.parse_variant("key:method=supervised")], [("train.lr", ["0.1", "0.2"])])
    runs = E.plan_runs(base_config, tmp_path, settings, [4, 7, 9])
    count = {s.name: [r.seed for r in runs if r.setting == s] for s in settings}
    assert count == {"probe lr=0.1": [4], "probe lr=0.2": [4], "key lr=0.1": [4, 7, 9], "key lr=0.2": [4, 7, 9]}
    assert all(r.folder.parent.name.startswith(("probe", "key")) and "@" not in str(r.folder) for r in runs)


@pytest.mark.slow
def test_parallel_jobs_give_the_same_runs_as_one_after_the_other(tmp_path, base_config):
    """Two spawned one-thread processes train exactly what the sequential loop trains (same records, same order)."""
    kw = {"seeds": [0, 1], "grids": ["method=supervised,selftrain"]}
    sequential = E.run_experiment(base_config, tmp_path / "one", **kw)
    settings = E.expand_settings([], [E.parse_grid(g) for g in kw["grids"]])
    runs = E.plan_runs(base_config, tmp_path / "two", settings, kw["seeds"])
    parallel = E.run_pending(base_config, runs, jobs=2, threads=1)
    assert set(parallel) == {r.folder for r in runs}
    ordered = [parallel[r.folder] for r in runs]
    keys = ("setting", "seed", "status", "best_miou", "best_step", "final_miou", "step")
    assert [{k: r[k] for k in keys} for r in ordered] == [{k: r[k] for k in keys} for r in sequential.runs]
    for run in runs:
        assert "iteration" in (run.folder / "train.log").read_text()  # the worker's INFO records reach the run log
    with pytest.raises(ConfigError, match="--jobs"):
        E.run_pending(base_config, runs, jobs=0)


def test_seed_placeholder_in_overrides_is_each_runs_seed(tmp_path, base_config):
    """``{seed}`` points a run at the same seed's run of another row (a frozen teacher)."""
    row = E.parse_variant("round1:method=fixmatch semi.teacher_checkpoint=OUT/runs/labels-only/seed{seed}/best.pt")
    runs = E.plan_runs(base_config, tmp_path, E.expand_settings([row], []), [2, 5], overrides=["train.lr={seed}e-3"])
    assert [r.seed for r in runs] == [2, 5]
    for run in runs:
        assert f"semi.teacher_checkpoint=OUT/runs/labels-only/seed{run.seed}/best.pt" in run.overrides
        assert f"train.lr={run.seed}e-3" in run.overrides and "{seed}" not in " ".join(run.overrides)
