"""Pictures for people: prediction grids (PIL), training curves and per-class IoU charts (matplotlib), index.html.

Every curve chart of the package (the demo's, the experiment's) is drawn by :func:`plot_panels` from
:class:`Panel` and :class:`Curve` values.

Prediction grids need only Pillow. The charts use matplotlib, the optional ``viz`` extra
(``pip install 'allspark-seg[viz]'``); without it :func:`plot_curves` and :func:`plot_per_class_iou` return False and
the page says how to get them. Matplotlib is used through its object-oriented API (``Figure`` + Agg canvas), so no
global pyplot state is touched.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "VIZ_HINT",
    "Curve",
    "HtmlSection",
    "Panel",
    "has_matplotlib",
    "plot_curves",
    "plot_panels",
    "plot_per_class_iou",
    "prediction_grid",
    "write_index_html",
]

log = logging.getLogger(__name__)

VIZ_HINT = "pip install 'allspark-seg[viz]'"

#: Line/bar colours of the recipes, in order (colour-blind friendly).
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


def has_matplotlib() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def _fit(tile: np.ndarray, size: int, nearest: bool) -> Image.Image:
    image = Image.fromarray(tile)
    h, w = tile.shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return image.resize(new, resample)


def prediction_grid(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    *,
    tile: int = 160,
    nearest: Sequence[bool] | None = None,
    pad: int = 4,
    legend: Sequence[tuple[str, Sequence[int]]] = (),
) -> Image.Image:
    """Lay images out in a grid with a title above each column.

    Args:
        rows: One row per sample, each a sequence of ``(H, W, 3)`` uint8 RGB tiles (e.g. image, ground truth in
            colour, predictions in colour).
        titles: One title per column.
        tile: Long side of every tile in pixels.
        nearest: Per column, resize with nearest neighbour (masks) instead of bilinear (photos); default: all
            columns but the first.
        pad: Gap between tiles.
        legend: ``(name, (r, g, b))`` swatches drawn under the grid, e.g. the class colours.

    Returns:
        The grid as an RGB image on a white background.
    """
    if not rows or any(len(r) != len(titles) for r in rows):
        raise ValueError("prediction_grid needs at least one row, each with one tile per title")
    nearest = [i > 0 for i in range(len(titles))] if nearest is None else list(nearest)
    font = _font(max(12, tile // 10))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header = max(probe.textbbox((0, 0), t, font=font)[3] for t in titles) + 2 * pad
    width = len(titles) * (tile + pad) + pad
    height = header + len(rows) * (tile + pad)
    line = header - pad  # height of one legend line
    entries = _legend_layout(legend, probe, font, width, pad, line)
    rows_of_legend = 1 + max((y for _, _, y in entries), default=-1)
    canvas = Image.new("RGB", (width, height + rows_of_legend * (line + pad) + (pad if entries else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    for (name, color), x, y in entries:
        top = height + pad + y * (line + pad)
        draw.rectangle([x, top, x + line - 1, top + line - 1], fill=tuple(int(c) for c in color), outline="gray")
        draw.text((x + line + pad, top), name, fill="black", font=font)
    for c, title in enumerate(titles):
        box = draw.textbbox((0, 0), title, font=font)
        x = pad + c * (tile + pad) + (tile - (box[2] - box[0])) // 2
        draw.text((x, pad), title, fill="black", font=font)
    for r, row in enumerate(rows):
        for c, array in enumerate(row):
            image = _fit(np.asarray(array, dtype=np.uint8), tile, nearest[c])
            x = pad + c * (tile + pad) + (tile - image.width) // 2
            y = header + r * (tile + pad) + (tile - image.height) // 2
            canvas.paste(image, (x, y))
    return canvas


def _legend_layout(
    legend: Sequence[tuple[str, Sequence[int]]],
    probe: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    width: int,
    pad: int,
    line: int,
) -> list[tuple[tuple[str, Sequence[int]], int, int]]:
    """Place legend entries left to right, wrapping at ``width``: ``[(entry, x, row), ...]``."""
    placed, x, row = [], pad, 0
    for entry in legend:
        size = line + pad + probe.textbbox((0, 0), entry[0], font=font)[2] + 3 * pad
        if x + size > width and x > pad:
            x, row = pad, row + 1
        placed.append((entry, x, row))
        x += size
    return placed


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(history: Sequence[Mapping[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in history:
        value = record.get(key)
        if record.get("type") == kind and isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


@dataclass(frozen=True)
class Curve:
    """One line of a chart: ``values`` over ``steps``, with an optional shaded ``± band`` (e.g. a std over seeds).

    ``style`` is a matplotlib format (``"-"``, ``"--"``, ``"o-"``); ``color`` None takes the next colour of the
    axes' cycle.
    """

    label: str
    steps: Sequence[int]
    values: Sequence[float]
    band: Sequence[float] | None = None
    style: str = "-"
    color: str | None = None
    markersize: float | None = None


@dataclass(frozen=True)
class Panel:
    """One axes of a chart: its curves, labels, y range and legend (``legend`` None: no legend)."""

    curves: Sequence[Curve]
    title: str = ""
    ylabel: str = ""
    xlabel: str = "iteration"
    ylim: tuple[float | None, float | None] | None = None
    legend: Mapping[str, Any] | None = field(default_factory=lambda: {"fontsize": 8})


def plot_panels(
    grid: Sequence[Sequence[Panel]], path: str | Path, *, panel_size: tuple[float, float], dpi: int = 100
) -> bool:
    """Draw a rows x columns grid of :class:`Panel` into a PNG.

    Args:
        grid: rows of panels (every row as long as the first).
        path: PNG file to write.
        panel_size: ``(width, height)`` of one panel in inches.
        dpi: pixels per inch.

    Returns:
        False (nothing written) when matplotlib is missing.
    """
    if not has_matplotlib():
        return False
    rows, cols = len(grid), len(grid[0])
    fig = _figure(panel_size[0] * cols, panel_size[1] * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, row in enumerate(grid):
        for c, panel in enumerate(row):
            ax = axes[r][c]
            for curve in panel.curves:
                extra = {} if curve.markersize is None else {"markersize": curve.markersize}
                (line,) = ax.plot(curve.steps, curve.values, curve.style, color=curve.color, label=curve.label, **extra)
                if curve.band is not None:
                    low = [v - d for v, d in zip(curve.values, curve.band, strict=True)]
                    high = [v + d for v, d in zip(curve.values, curve.band, strict=True)]
                    ax.fill_between(curve.steps, low, high, color=line.get_color(), alpha=0.12)
            ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
            if panel.ylim is not None:
                ax.set_ylim(*panel.ylim)
            ax.grid(alpha=0.3)
            if panel.legend is not None and ax.get_legend_handles_labels()[0]:
                ax.legend(**panel.legend)
    fig.savefig(str(path), dpi=dpi)
    return True


def plot_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> bool:
    """Training losses and validation mIoU over iterations, one colour per run.

    Args:
        histories: Run name -> its ``metrics.jsonl`` records (``type`` ``train`` with ``loss_x``/``loss_u``,
            ``type`` ``eval`` with ``miou``).
        path: PNG file to write.

    Returns:
        False (nothing written) when matplotlib is missing.
    """
    losses, mious = [], []
    for i, (name, history) in enumerate(histories.items()):
        color = COLORS[i % len(COLORS)]
        for key, style, label in (("loss_x", "-", "labeled loss"), ("loss_u", "--", "unlabeled loss")):
            steps, values = _series(history, "train", key)
            if steps:
                losses.append(Curve(f"{name}: {label}", steps, values, style=style, color=color))
        steps, values = _series(history, "eval", "miou")
        if steps:
            mious.append(Curve(name, steps, [100 * v for v in values], style="o-", color=color, markersize=4))
    loss_panel = Panel(losses, "Training losses", "cross-entropy", ylim=(0, None))
    miou_panel = Panel(mious, "Validation mIoU", "mIoU (%)")
    return plot_panels([[loss_panel, miou_panel]], path, panel_size=(5.5, 4))


def plot_per_class_iou(
    ious: Mapping[str, Sequence[float | None]], class_names: Sequence[str], path: str | Path
) -> bool:
    """Grouped bars of per-class IoU (percent), one colour per run; absent classes are left empty.

    Args:
        ious: Run name -> K IoUs as fractions (None or NaN for absent classes).
        class_names: K names.
        path: PNG file to write.

    Returns:
        False (nothing written) when matplotlib is missing.
    """
    if not has_matplotlib():
        return False
    k, runs = len(class_names), len(ious)
    fig = _figure(max(6.0, 0.9 * k * max(1, runs) / 2 + 2), 4)
    ax = fig.subplots()
    width = 0.8 / max(1, runs)
    x = np.arange(k)
    for i, (name, values) in enumerate(ious.items()):
        heights = [100 * v if v is not None and math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(x + (i - (runs - 1) / 2) * width, heights, width, label=name, color=COLORS[i % len(COLORS)])
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(x, class_names, rotation=30 if k > 8 else 0, ha="right" if k > 8 else "center")
    ax.set(title="Per-class IoU on the validation set", ylabel="IoU (%)", ylim=(0, 105))
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.savefig(str(path))
    return True


@dataclass(frozen=True)
class HtmlSection:
    """One block of the page: a heading, an optional paragraph, an optional table (first row = header), an optional
    image (path relative to the page) and an optional preformatted text."""

    title: str
    text: str = ""
    image: str | None = None
    pre: str | None = None
    table: Sequence[Sequence[str]] = ()


def write_index_html(path: str | Path, title: str, sections: Sequence[HtmlSection], *, intro: str = "") -> Path:
    """A self-contained page (inline CSS, relative image links) showing the sections in order.

    Args:
        path: The ``index.html`` to write.
        title: Page title and heading.
        sections: Blocks shown top to bottom.
        intro: Paragraph under the heading.

    Returns:
        The path written.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "img{max-width:100%;border:1px solid #ddd}pre{background:#f6f8fa;padding:1em;overflow-x:auto;"
        "font-size:13px}h2{border-bottom:1px solid #eee;padding-bottom:.2em}.note{color:#555}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ddd;padding:.3em .8em;text-align:right}"
        "td:first-child,th:first-child{text-align:left}th{background:#f6f8fa}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f'<p class="note">{html.escape(section.text)}</p>')
        if section.table:
            parts.append(_html_table(section.table))
        if section.pre is not None:
            parts.append(f"<pre>{html.escape(section.pre)}</pre>")
        if section.image is not None:
            parts.append(f'<p><img src="{html.escape(section.image)}" alt="{html.escape(section.title)}"></p>')
    parts.append("</body></html>")
    out = Path(path)
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out


def _html_table(rows: Sequence[Sequence[str]]) -> str:
    head, *body = rows
    cells = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    lines = [f"<table><thead><tr>{cells}</tr></thead><tbody>"]
    for row in body:
        lines.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)
