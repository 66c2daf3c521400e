"""Multi-setting, multi-seed studies: ``allspark-seg experiment``.

A study is a base config (a YAML file plus ``--set`` overrides) and a list of *settings*, each trained with several
seeds, one after the other, each run in its own folder. Settings are the product of the named *variants* and the
*grid*:

- ``--grid KEY=V1,V2,...`` (repeatable): one axis per option; several ``--grid`` give their product. Commas inside
  brackets or quotes do not split (``--grid 'eval.scales=[1.0],[0.75,1.0]'``).
- ``--variant 'NAME:KEY=VALUE KEY=VALUE'`` (repeatable): a named row, e.g. an ablation
  ``--variant 'no-memory:method=allspark+ model.allspark.memory=false'``; the overrides after the colon are split like
  a shell command line. ``NAME@K:...`` trains that row with the first ``K`` seeds only (a one-seed row of a study
  whose key rows get three). Without variants every setting is the base config plus its grid values.
- ``--jobs N``: N runs at a time, each in its own process with ``cores / N`` PyTorch threads (on a 2-core CPU two
  one-thread runs finish sooner than one two-thread run after the other).

Overrides apply in this order (a later one wins): the config file, ``--set``, the variant, the grid values, then
``train.seed``. ``{seed}`` in an override is the run's seed, e.g. a frozen teacher trained with the same seed:
``--variant 'round1:method=fixmatch semi.teacher_checkpoint=OUT/runs/labels-only/seed{seed}/best.pt'`` (the teacher
must be finished before the run starts: train it first). The base config should leave the ``semi.*`` preset keys
unset when the grid or the variants change ``method``, so that each method gets its own presets.

Layout of ``OUT``::

    OUT/runs/<setting>/seed<k>/   a training run (config.yaml, metrics.jsonl, last.pt, best.pt, results.json,
                                  train.log) and run.json, written when the run is over; a run with a run.json is
                                  skipped when the command is run again, an unfinished one resumes from last.pt
    OUT/data/<hash>/              the synthetic dataset shared by the runs that describe the same one
    OUT/results.json, results.csv the per-run results and the per-setting summary
    OUT/curves.png                validation mIoU and training loss over iterations, mean +- std over seeds
    OUT/report.md                 the table, the curves, the commands and the failed runs

Standard deviations are sample standard deviations (``ddof = 1``) over seeds; seeds vary ``train.seed`` (model
initialisation, data order and augmentation), not the data split.
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__, viz
from .config import RunConfig, load_config
from .engine import train as training
from .engine.data import ensure_synthetic
from .engine.guard import TrainingCollapsed
from .engine.train import TrainingDiverged
from .errors import ConfigError
from .utils.logs import file_handler

__all__ = [
    "ExperimentResult",
    "add_experiment_parser",
    "cmd_experiment",
    "RunSpec",
    "Setting",
    "expand_settings",
    "parse_grid",
    "parse_seeds",
    "parse_variant",
    "run_experiment",
    "summarize",
]

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


@dataclass(frozen=True)
class Setting:
    """One row of the study.

    Attributes:
        name: Unique readable name (variant, then ``key=value`` of each grid axis).
        overrides: ``key=value`` overrides on top of the base config.
        labels: Column values of the results table: ``variant`` and one entry per grid key.
        num_seeds: Train only the first ``num_seeds`` seeds of the study (None: all).
    """

    name: str
    overrides: tuple[str, ...]
    labels: tuple[tuple[str, str], ...] = ()
    num_seeds: int | None = None


@dataclass(frozen=True)
class RunSpec:
    """One training run: a setting with a seed, in its folder."""

    setting: Setting
    seed: int
    folder: Path
    overrides: tuple[str, ...]


@dataclass
class ExperimentResult:
    """What ``run_experiment`` produced.

    Attributes:
        out_dir: The study folder.
        runs: One record per run (the content of its ``run.json``; status ``done``, ``stopped`` or ``diverged``).
        summary: One row per setting: labels, ``runs``, ``best_mean``, ``best_std``, ``final_mean``, ``final_std``
            (mIoU in percent), ``seconds_mean``.
        files: Written files by role (``report``, ``results``, ``csv``, ``curves``).
        seconds: Wall time of this call.
    """

    out_dir: Path
    runs: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------- parsing
def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets, braces and quotes."""
    parts, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_grid(text: str) -> tuple[str, list[str]]:
    """``"method=supervised,allspark"`` -> ``("method", ["supervised", "allspark"])``.

    Raises:
        ConfigError: No ``=``, an empty key or an empty value.
    """
    key, sep, values = text.partition("=")
    items = _split_top_level(values) if sep else []
    if not key.strip() or not items or any(not v for v in items):
        raise ConfigError(f"--grid '{text}' must look like KEY=VALUE1,VALUE2 (e.g. method=supervised,allspark).")
    return key.strip(), items


def parse_variant(text: str) -> Setting:
    """``"no-memory:method=allspark+ model.allspark.memory=false"`` -> a named setting; ``"NAME@1:..."`` limits it
    to the study's first seed.

    Raises:
        ConfigError: No name, an override without ``=``, or a seed count that is not a positive integer.
    """
    name, sep, rest = text.partition(":")
    name, at, count = name.strip().partition("@")
    name = name.strip()
    if not sep or not name or "/" in name or (at and not count.strip().isdigit()) or (at and int(count) < 1):
        raise ConfigError(
            f"--variant '{text}' must look like NAME:KEY=VALUE [KEY=VALUE ...] or NAME@SEEDS:... (e.g. "
            "'no-memory@1:model.allspark.memory=false'), with a name without '/' and a positive seed count."
        )
    try:
        overrides = tuple(shlex.split(rest))
    except ValueError as error:
        raise ConfigError(f"--variant '{text}': {error}.") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"--variant '{text}': '{bad[0]}' is not a KEY=VALUE override.")
    return Setting(name, overrides, (("variant", name),), int(count) if at else None)


def parse_seeds(text: str | int) -> list[int]:
    """``3`` -> ``[0, 1, 2]``; ``"1,5,7"`` -> ``[1, 5, 7]``."""
    text = str(text).strip()
    try:
        seeds = [int(s) for s in text.split(",")] if "," in text else list(range(int(text)))
    except ValueError:
        raise ConfigError(f"--seeds '{text}' must be a count (3) or a list of seeds (0,1,2).") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds '{text}' must give at least one distinct non-negative seed.")
    return seeds


def _short(key: str, keys: Sequence[str]) -> str:
    """The last component of a dotted key, or the whole key when that would be ambiguous."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def expand_settings(variants: Sequence[Setting], grids: Sequence[tuple[str, list[str]]]) -> list[Setting]:
    """The product of the variants (or the base config) and the grid axes, variants outermost.

    Raises:
        ConfigError: Two settings with the same name (a repeated variant name or grid value).
    """
    keys = [k for k, _ in grids]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid repeats a key: {', '.join(keys)}.")
    rows = list(variants) or [Setting("", ())]
    settings = []
    for row, combo in itertools.product(rows, itertools.product(*(values for _, values in grids))):
        pairs = list(zip(keys, combo, strict=True))
        parts = ([row.name] if row.name else []) + [f"{_short(k, keys)}={v}" for k, v in pairs]
        labels = row.labels + tuple((_short(k, keys), v) for k, v in pairs)
        overrides = row.overrides + tuple(f"{k}={v}" for k, v in pairs)
        settings.append(Setting(" ".join(parts) or "base", overrides, labels, row.num_seeds))
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ConfigError(f"The settings of this study do not have distinct names: {', '.join(names)}.")
    return settings


def _slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "._=+-" else "_" for c in name.replace(" ", "__"))
    return keep or "base"


# ------------------------------------------------------------------------------------------------- running
def _synthetic_root(cfg: RunConfig, out_dir: Path) -> Path:
    """A shared folder per synthetic dataset description."""
    s = cfg.data.synthetic
    values = [s.num_labeled, s.num_unlabeled, s.num_val, s.image_size, s.num_classes, s.seed]
    key = json.dumps(values if s.kind == "shapes" else [*values, s.kind])  # the shapes' folders keep their names
    return out_dir / "data" / hashlib.sha1(key.encode()).hexdigest()[:10]


def plan_runs(
    config: str | Path | None,
    out_dir: Path,
    settings: Sequence[Setting],
    seeds: Sequence[int],
    overrides: Sequence[str] = (),
) -> list[RunSpec]:
    """Every run of the study, seed-major (all settings for the first seed first), each config validated.

    Raises:
        ConfigError: Any run's config is invalid (nothing has been trained then).
    """
    runs = []
    for (k, seed), setting in itertools.product(enumerate(seeds), settings):
        if setting.num_seeds is not None and k >= setting.num_seeds:
            continue
        full = tuple(o.replace("{seed}", str(seed)) for o in (*overrides, *setting.overrides, f"train.seed={seed}"))
        shared = full[: len(overrides)]
        try:
            cfg = load_config(config, full)
        except ConfigError as error:
            raise ConfigError(f"Setting '{setting.name}': {error}") from None
        if cfg.data.format == "synthetic" and not load_config(config, shared).data.root and not _sets_root(full):
            full = (*full, f"data.root={_synthetic_root(cfg, out_dir)}")
        runs.append(RunSpec(setting, seed, out_dir / "runs" / _slug(setting.name) / f"seed{seed}", full))
    return runs


def _sets_root(overrides: Sequence[str]) -> bool:
    return any(o.split("=", 1)[0].strip() == "data.root" for o in overrides)


def train_command(config: str | Path | None, run: RunSpec) -> str:
    """The ``allspark-seg train`` command line that reproduces one run."""
    parts = ["allspark-seg", "train"]
    if config is not None:
        parts += ["--config", str(config)]
    parts += ["--out", str(run.folder)]
    if run.overrides:
        parts += ["--set", *run.overrides]
    return shlex.join(parts)


def _run_one(config: str | Path | None, run: RunSpec) -> dict[str, Any]:
    """Train one run (resuming if it was interrupted) and write its ``run.json``."""
    run.folder.mkdir(parents=True, exist_ok=True)
    handler = file_handler(run.folder / "train.log")
    package_logger = logging.getLogger("allspark_seg")
    package_logger.addHandler(handler)
    record: dict[str, Any] = {
        "setting": run.setting.name,
        "labels": dict(run.setting.labels),
        "seed": run.seed,
        "overrides": list(run.overrides),
        "command": train_command(config, run),
    }
    start = time.perf_counter()
    try:
        result = training.fit(load_config(config, run.overrides), run.folder)  # looked up per run: tests script it
        record.update(status="done", step=result.step, best_miou=result.best_miou, best_step=result.best_step)
        record["final_miou"] = None if result.final is None else result.final.miou
    except (TrainingCollapsed, TrainingDiverged) as error:
        record.update(status="stopped" if isinstance(error, TrainingCollapsed) else "diverged", message=str(error))
        results = run.folder / "results.json"
        if results.is_file():
            saved = json.loads(results.read_text())
            record.update(step=saved["step"], best_miou=saved["best_miou"], best_step=saved["best_step"])
            record["final_miou"] = saved["final"].get("miou")
        log.warning("run %s seed %d: %s", run.setting.name, run.seed, error)
    finally:
        package_logger.removeHandler(handler)
        handler.close()
    record["seconds"] = time.perf_counter() - start
    tmp = run.folder / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(run.folder / RUN_FILE)
    return record


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(settings: Sequence[Setting], runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-setting mean and sample standard deviation (percent) of the best and the final validation mIoU.

    Runs without a number (diverged before any evaluation) count in ``runs`` but not in the statistics.
    """
    rows = []
    for setting in settings:
        mine = [r for r in runs if r["setting"] == setting.name]
        best = _mean_std([100 * r["best_miou"] if r.get("best_miou") is not None else None for r in mine])
        final = _mean_std([100 * r["final_miou"] if r.get("final_miou") is not None else None for r in mine])
        seconds = _mean_std([r["seconds"] for r in mine])[0]
        rows.append(
            {
                "setting": setting.name,
                **dict(setting.labels),
                "runs": len(mine),
                "failed": sum(r["status"] != "done" for r in mine),
                "best_mean": best[0],
                "best_std": best[1],
                "final_mean": final[0],
                "final_std": final[1],
                "seconds_mean": seconds,
            }
        )
    return rows


def run_experiment(
    config: str | Path | None,
    out_dir: str | Path,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    overrides: Sequence[str] = (),
    grids: Sequence[str] = (),
    variants: Sequence[str] = (),
    train: bool = True,
    command: str | None = None,
    jobs: int = 1,
) -> ExperimentResult:
    """Run (or resume) a study and write its table, curves and report.

    Args:
        config: Base YAML config (None for the defaults).
        out_dir: Study folder.
        seeds: Training seeds of every setting.
        overrides: ``--set`` overrides shared by all runs.
        grids: ``KEY=V1,V2`` axes (see :func:`parse_grid`).
        variants: ``NAME:KEY=VALUE ...`` rows (see :func:`parse_variant`).
        train: False only reports the runs already finished (``--report-only``).
        command: The command line to quote in the report.
        jobs: Runs trained at a time, each in its own process (see :func:`run_pending`).

    Returns:
        The per-run records, the summary and the written files.

    Raises:
        ConfigError: A bad grid, variant, seed list or run config (before anything is trained).
    """
    start = time.perf_counter()
    out = Path(out_dir)
    settings = expand_settings([parse_variant(v) for v in variants], [parse_grid(g) for g in grids])
    runs = plan_runs(config, out, settings, list(seeds), overrides)
    finished = {run.folder: json.loads((run.folder / RUN_FILE).read_text()) for run in runs if _finished(run)}
    if train:
        finished |= run_pending(config, [run for run in runs if run.folder not in finished], jobs)
    records = [finished[run.folder] for run in runs if run.folder in finished]
    summary = summarize(settings, records)
    files = write_outputs(out, config, settings, runs, records, summary, command)
    return ExperimentResult(out, records, summary, files, time.perf_counter() - start)


def _finished(run: RunSpec) -> bool:
    return (run.folder / RUN_FILE).is_file()


def run_pending(
    config: str | Path | None, runs: Sequence[RunSpec], jobs: int = 1, threads: int | None = None
) -> dict[Path, dict[str, Any]]:
    """Train ``runs`` (resuming unfinished ones); returns their records by folder.

    With ``jobs > 1`` the runs go to a pool of ``jobs`` fresh processes (spawned, so no state is shared), each with
    ``threads`` PyTorch threads (default ``max(1, cores // jobs)``); the synthetic datasets are generated here first,
    so that no two processes write the same one.

    Raises:
        ConfigError: ``jobs`` is not positive.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be a positive number of parallel runs, got {jobs}.")
    records: dict[Path, dict[str, Any]] = {}
    if jobs == 1 or len(runs) <= 1:
        for i, run in enumerate(runs, start=1):
            log.info("run %d/%d: %s, seed %d -> %s", i, len(runs), run.setting.name, run.seed, run.folder)
            records[run.folder] = _run_one(config, run)
            gc.collect()
        return records
    for root, cfg in {cfg.data.root: cfg for cfg in (load_config(config, r.overrides) for r in runs)}.items():
        if cfg.data.format == "synthetic":
            ensure_synthetic(cfg, Path(root))
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_run_one, config, run): run for run in runs}
        for i, future in enumerate(as_completed(futures), start=1):
            run = futures[future]
            records[run.folder] = future.result()
            log.info("run %d/%d done: %s, seed %d -> %s", i, len(runs), run.setting.name, run.seed, run.folder)
    return records


def _init_worker(threads: int) -> None:
    """A pool process: its PyTorch threads, and the package's INFO records for each run's ``train.log``."""
    torch.set_num_threads(threads)
    logging.getLogger("allspark_seg").setLevel(logging.INFO)


# ------------------------------------------------------------------------------------------------- outputs
def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def results_table(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (mIoU in percent, mean ± sample std over seeds)."""
    label_keys = [k for k in summary[0] if k not in _SUMMARY_KEYS] if summary else []
    head = [*label_keys, "runs", "best mIoU", "final mIoU", "min / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary:
        runs = f"{row['runs']}" + (f" ({row['failed']} stopped)" if row["failed"] else "")
        minutes = "–" if row["seconds_mean"] is None else f"{row['seconds_mean'] / 60:.1f}"
        cells = [str(row.get(k, "")) for k in label_keys]
        cells += [runs, _fmt(row["best_mean"], row["best_std"]), _fmt(row["final_mean"], row["final_std"]), minutes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_SUMMARY_KEYS = ("setting", "runs", "failed", "best_mean", "best_std", "final_mean", "final_std", "seconds_mean")


def _curves(folder: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Validation mIoU (percent) and training loss by iteration of one run."""
    miou, loss = {}, {}
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return miou, loss
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["type"] == "eval" and not record.get("rollback"):
            miou[record["step"]] = 100 * record["miou"]
        elif record["type"] == "train" and "loss" in record:
            loss[record["step"]] = record["loss"]
    return miou, loss


def _mean_curve(curves: Sequence[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    means, stds = [], []
    for s in steps:
        mean, std = _mean_std([c[s] for c in curves])
        means.append(mean if mean is not None else math.nan)
        stds.append(std or 0.0)
    return steps, means, stds


def _panel_and_line(setting: Setting, with_variants: bool) -> tuple[str, str]:
    """Panel title and line label of a setting in the curves figure."""
    grid = [f"{k}={v}" for k, v in setting.labels if k != "variant"]
    if with_variants:
        variant = " ".join(v for k, v in setting.labels if k == "variant")
        return " ".join(grid) or "all runs", variant or setting.name
    return " ".join(grid[1:]) or "all runs", (grid[0] if grid else setting.name)


def _curve_panels(settings: Sequence[Setting], runs: Sequence[RunSpec]) -> list[list[viz.Panel]]:
    """Validation mIoU (top row) and training loss (bottom row), mean ± std over seeds. With variants: one column of
    panels per grid combination, one line per variant; without: one column per value of the grid axes after the
    first, one line per value of the first."""
    with_variants = any(k == "variant" for s in settings for k, _ in s.labels)
    panels: dict[str, list[tuple[Setting, str]]] = {}
    for s in settings:
        title, label = _panel_and_line(s, with_variants)
        panels.setdefault(title, []).append((s, label))
    styles = ["-", "--", ":", "-."]
    miou_row, loss_row = [], []
    for title, members in panels.items():
        lines: tuple[list[viz.Curve], list[viz.Curve]] = ([], [])
        for i, (s, label) in enumerate(members):
            per_run = [_curves(r.folder) for r in runs if r.setting.name == s.name]
            for row, curves in enumerate(([m for m, _ in per_run if m], [lo for _, lo in per_run if lo])):
                steps, mean, std = _mean_curve(curves)
                if steps:
                    lines[row].append(viz.Curve(label, steps, mean, band=std, style=styles[(i // 10) % len(styles)]))
        legend = {"fontsize": 7, "ncol": 2, "loc": "lower right"}
        miou_row.append(viz.Panel(lines[0], title, "validation mIoU (%)", legend=legend))
        loss_row.append(viz.Panel(lines[1], "", "training loss", legend=None))
    return [miou_row, loss_row]


def plot_study_curves(settings: Sequence[Setting], runs: Sequence[RunSpec], path: Path) -> Path | None:
    """The study's curves (see :func:`_curve_panels`) as a PNG; None without matplotlib."""
    if not viz.plot_panels(_curve_panels(settings, runs), path, panel_size=(6.5, 4.5), dpi=110):
        log.info("matplotlib is not installed: no curves (%s)", viz.VIZ_HINT)
        return None
    return path


def write_outputs(
    out: Path,
    config: str | Path | None,
    settings: Sequence[Setting],
    runs: Sequence[RunSpec],
    records: Sequence[dict[str, Any]],
    summary: Sequence[dict[str, Any]],
    command: str | None,
) -> dict[str, Path]:
    """``results.json``, ``results.csv``, ``curves.png`` (with matplotlib) and ``report.md``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": out / "results.json", "csv": out / "results.csv", "report": out / "report.md"}
    files["results"].write_text(json.dumps({"summary": list(summary), "runs": list(records)}, indent=2))
    with files["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["setting", "seed", "status", "best_miou", "best_step", "final_miou", "step", "seconds"])
        for r in records:
            writer.writerow(
                [r["setting"], r["seed"], r["status"]]
                + [r.get(k) for k in ("best_miou", "best_step", "final_miou", "step", "seconds")]
            )
    curves = plot_study_curves(settings, runs, out / "curves.png")
    if curves is not None:
        files["curves"] = curves
    files["report"].write_text(_report(config, settings, runs, records, summary, command, curves))
    return files


def _report(
    config: str | Path | None,
    settings: Sequence[Setting],
    runs: Sequence[RunSpec],
    records: Sequence[dict[str, Any]],
    summary: Sequence[dict[str, Any]],
    command: str | None,
    curves: Path | None,
) -> str:
    seeds = sorted({r.seed for r in runs})
    done = len(records)
    total_minutes = sum(r["seconds"] for r in records) / 60
    lines = [
        "# Experiment report",
        "",
        f"{len(settings)} settings x {len(seeds)} seeds ({', '.join(map(str, seeds))}): {done} of {len(runs)} runs "
        f"finished, {total_minutes:.0f} min of training in total. Validation mIoU in percent, mean ± sample standard "
        "deviation over seeds; *best* is the best validation of a run, *final* its last.",
        "",
    ]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += [
        f"Base config: `{config}`; allspark-seg {__version__}, torch {torch.__version__}, "
        f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} threads.",
        "",
        results_table(summary),
        "",
    ]
    if curves is not None:
        lines += [f"![curves]({curves.name})", ""]
    failed = [r for r in records if r["status"] != "done"]
    if failed:
        lines += ["Runs that did not finish normally:", ""]
        lines += [f"- {r['setting']} seed {r['seed']}: {r['status']}: {r.get('message', '')}" for r in failed]
        lines.append("")
    lines += ["Each setting's first seed as a `train` command (other seeds: change `train.seed` and `--out`):", ""]
    for setting in settings:
        first = next(r for r in runs if r.setting.name == setting.name)
        lines += [f"- {setting.name}:", "  ```", f"  {train_command(config, first)}", "  ```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- command line
def add_experiment_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``allspark-seg experiment`` on the CLI's subparsers."""
    p = sub.add_parser(
        "experiment",
        help="train several settings x seeds and write a results table, curves and a report",
        description=(
            "Settings = variants x grid. Example: allspark-seg experiment -c base.yaml --out runs/study --seeds 3 "
            "--grid method=supervised,allspark --grid data.synthetic.num_labeled=8,32 "
            "--variant 'no-memory:method=allspark+ model.allspark.memory=false'. Finished runs are skipped and "
            "unfinished ones resume when the command is run again."
        ),
    )
    p.add_argument("--config", "-c", default=None, help="base YAML config (default: the built-in defaults)")
    p.add_argument("--out", "-o", required=True, help="study folder (runs/, results.json, curves.png, report.md)")
    p.add_argument("--seeds", default="3", help="number of seeds (3 -> 0,1,2) or a list (0,5,7); default 3")
    p.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="overrides shared by all runs"
    )
    p.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2", help="an axis of the study; repeat for a product"
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'NAME:KEY=V ...'",
        help="a named setting (e.g. an ablation row); repeatable; crossed with the grid; {seed} is the run's seed",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs trained at a time, each in its own process (default 1)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from the finished runs")
    p.set_defaults(func=cmd_experiment)
    return p


def cmd_experiment(args: argparse.Namespace) -> int:
    """``experiment``: run or resume the study, then write the table (stdout) and the report."""
    result = run_experiment(
        args.config,
        args.out,
        seeds=parse_seeds(args.seeds),
        overrides=args.set,
        grids=args.grid,
        variants=args.variant,
        train=not args.report_only,
        jobs=args.jobs,
        command=shlex.join(["allspark-seg", *sys.argv[1:]]) if sys.argv[1:2] == ["experiment"] else None,
    )
    if result.summary:
        sys.stdout.write(results_table(result.summary) + "\n")
    sys.stdout.write(f"Report: {result.files['report']} ({len(result.runs)} runs, {result.seconds / 60:.1f} min).\n")
    return 0
