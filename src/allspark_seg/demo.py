"""The demo: supervised vs AllSpark on the built-in synthetic data, with a table, pictures and a web page.

``run_demo(out_dir)`` generates the synthetic dataset into ``OUT/data``, trains the ``supervised`` and the
``allspark`` recipes with the same labeled images, model, seed and number of iterations (``OUT/supervised``,
``OUT/allspark``), and writes:

- ``OUT/predictions.png``: validation images, their ground truth and each recipe's prediction;
- ``OUT/curves.png``: training losses and validation mIoU over iterations (needs matplotlib);
- ``OUT/per_class_iou.png``: per-class IoU of both recipes (needs matplotlib);
- ``OUT/summary.json`` and ``OUT/index.html``: the comparison table and everything above on one page.

The settings are :data:`DEMO_CONFIG` (the same as ``configs/synthetic_demo.yaml``); ``quick=True`` applies
:data:`QUICK_OVERRIDES`. Each run starts from scratch: files a previous demo left in ``OUT/supervised`` and
``OUT/allspark`` are replaced, the generated dataset is reused.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import data as D
from . import viz
from .config import RunConfig, load_config
from .engine.predict import load_trained_model, predict_image
from .engine.train import fit

__all__ = [
    "DEMO_CONFIG",
    "DEMO_RECIPES",
    "QUICK_OVERRIDES",
    "DemoResult",
    "RecipeResult",
    "comparison_table",
    "demo_config",
    "run_demo",
]

log = logging.getLogger(__name__)

DEMO_RECIPES: tuple[str, ...] = ("supervised", "allspark")

#: The demo's run config (``method`` is replaced by each recipe). Kept equal to ``configs/synthetic_demo.yaml``.
DEMO_CONFIG: Mapping[str, Any] = {
    "method": "allspark",
    "model": {
        "encoder": "mit_b0",
        "embed_dims": [16, 32, 64, 128],
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 2, 4, 8],
        "head_dim": 128,
        "drop_path": 0.0,
    },
    "data": {
        "format": "synthetic",
        "crop_size": 96,
        "num_workers": 0,
        "synthetic": {
            "num_labeled": 24,
            "num_unlabeled": 400,
            "num_val": 100,
            "image_size": 96,
            "num_classes": 6,
            "seed": 0,
        },
    },
    "train": {
        "iterations": 1500,
        "batch_size": 4,
        "seed": 0,
        "optimizer": "adamw",
        "lr": 0.001,
        "lr_multi": 1.0,
        "weight_decay": 0.01,
        "log_every": 25,
        "eval_every": 250,
        "checkpoint_every": 100000,
    },
    "semi": {"warmup_iterations": 250},
}

#: What ``--quick`` changes.
QUICK_OVERRIDES: tuple[str, ...] = (
    "train.iterations=300",
    "train.eval_every=100",
    "data.synthetic.num_unlabeled=200",
    "data.synthetic.num_val=50",
    "semi.warmup_iterations=50",
)

#: Validation images shown in the prediction grid.
GRID_SAMPLES = 6


def demo_config(method: str, *, quick: bool = False, overrides: Sequence[str] = ()) -> RunConfig:
    """The resolved config of one demo recipe.

    Args:
        method: ``supervised`` or ``allspark`` (any method works).
        quick: Apply :data:`QUICK_OVERRIDES`.
        overrides: Further ``key=value`` overrides (after the quick ones).
    """
    base = json.loads(json.dumps(DEMO_CONFIG))  # a deep, mutable copy
    base["method"] = method
    return load_config(base, [*(QUICK_OVERRIDES if quick else ()), *overrides])


@dataclass
class RecipeResult:
    """One trained recipe.

    Attributes:
        method: Recipe name.
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


@dataclass
class DemoResult:
    """Everything the demo produced: results per recipe, the table, and the files written."""

    out_dir: Path
    runs: dict[str, RecipeResult]
    class_names: tuple[str, ...]
    table: str
    files: dict[str, Path]
    seconds: float


def _fresh_run_dir(run_dir: Path) -> None:
    """Remove what an earlier demo run left in ``run_dir`` (only the files training writes)."""
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "results.json"):
        (run_dir / name).unlink(missing_ok=True)


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_recipe(cfg: RunConfig, run_dir: Path) -> RecipeResult:
    """Train one recipe from scratch in ``run_dir``."""
    _fresh_run_dir(run_dir)
    log.info("demo: training %s (%d iterations)", cfg.method, cfg.train.iterations or 0)
    result = fit(cfg, run_dir)
    assert result.final is not None
    return RecipeResult(
        method=cfg.method,
        miou=result.final.miou,
        best_miou=result.best_miou,
        best_step=result.best_step,
        iou=list(result.final.iou),
        seconds=result.seconds,
        history=_read_history(run_dir / "metrics.jsonl"),
        run_dir=run_dir,
    )


def _pct(value: float) -> str:
    return "absent" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def comparison_table(runs: Mapping[str, RecipeResult], class_names: Sequence[str]) -> str:
    """Side-by-side text table: final and best mIoU, per-class IoU (percent) and training time per recipe."""
    names = list(runs)
    rows: list[tuple[str, list[str]]] = [
        ("mIoU (final)", [_pct(runs[n].miou) for n in names]),
        ("mIoU (best @ iteration)", [f"{_pct(runs[n].best_miou)} @ {runs[n].best_step}" for n in names]),
    ]
    rows += [(f"  IoU {c}", [_pct(runs[n].iou[k]) for n in names]) for k, c in enumerate(class_names)]
    rows.append(("training time (s)", [f"{runs[n].seconds:.0f}" for n in names]))
    first = max(len(r[0]) for r in rows)
    widths = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    header = f"{'':<{first}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
    lines = [header, "-" * len(header)]
    for label, values in rows:
        lines.append(f"{label:<{first}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths, strict=True)))
    return "\n".join(lines)


def _grid(runs: Mapping[str, RecipeResult], val_dir: Path, palette: np.ndarray, count: int) -> Image.Image:
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
    return viz.prediction_grid(rows, ["image", "ground truth", *models])


def _legend(class_names: Sequence[str], palette: np.ndarray) -> str:
    return ", ".join(f"{name} = rgb{tuple(int(c) for c in palette[k])}" for k, name in enumerate(class_names))


def run_demo(
    out_dir: str | Path,
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    recipes: Sequence[str] = DEMO_RECIPES,
) -> DemoResult:
    """Train the demo recipes on the synthetic data and write the table, pictures and ``index.html``.

    Args:
        out_dir: Output folder.
        quick: The short variant (:data:`QUICK_OVERRIDES`), a few minutes on a laptop CPU.
        overrides: ``key=value`` overrides applied to every recipe (e.g. ``train.iterations=500``).
        recipes: Methods to compare.

    Returns:
        The results, the comparison table and the files written.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_root = (out / "data").resolve()
    configs = {m: demo_config(m, quick=quick, overrides=[*overrides, f"data.root={data_root}"]) for m in recipes}
    runs = {m: train_recipe(cfg, out / m) for m, cfg in configs.items()}
    first = next(iter(configs.values()))
    info = D.describe_dataset("folder", data_root, first.data.num_classes)
    table = comparison_table(runs, info.class_names)

    files = {"predictions": out / "predictions.png"}
    _grid(runs, data_root / "val", info.palette, GRID_SAMPLES).save(files["predictions"])
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
            m: {"miou": r.miou, "best_miou": r.best_miou, "best_step": r.best_step, "iou": r.iou, "seconds": r.seconds}
            for m, r in runs.items()
        },
        "config": first.to_dict(),
    }
    files["summary"] = out / "summary.json"
    files["summary"].write_text(json.dumps(summary, indent=2, allow_nan=True))
    files["index"] = _write_page(out, runs, info, table, first, charts, quick)
    return DemoResult(out, runs, tuple(info.class_names), table, files, seconds)


def _write_page(
    out: Path,
    runs: Mapping[str, RecipeResult],
    info: D.DatasetInfo,
    table: str,
    cfg: RunConfig,
    charts: bool,
    quick: bool,
) -> Path:
    s, t = cfg.data.synthetic, cfg.train
    setting = (
        f"{s.num_labeled} labeled, {s.num_unlabeled} unlabeled and {s.num_val} validation images of "
        f"{s.image_size}x{s.image_size} pixels, {s.num_classes} classes; a MiT with widths "
        f"{cfg.model.embed_dims} trained from scratch for {t.iterations} iterations with batch {t.batch_size} "
        f"(+ {t.unlabeled_batch_size} unlabeled for allspark), crop {cfg.data.crop_size}, seed {t.seed}"
        f"{' (quick variant)' if quick else ''}. The supervised recipe sees only the labeled images."
    )
    sections = [
        viz.HtmlSection("Results on the validation set", setting, pre=table),
        viz.HtmlSection(
            "Predictions",
            "Validation images, ground truth and each recipe's prediction (final model). Colours: "
            + _legend(info.class_names, info.palette)
            + ".",
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
        "The same model, labeled images, seed and number of iterations, trained with labels only (supervised) and "
        "with the unlabeled images too (allspark)."
    )
    return viz.write_index_html(
        out / "index.html", "allspark-seg demo: the value of unlabeled images", sections, intro=intro
    )
