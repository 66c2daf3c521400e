"""Plots for docs/performance.md from a ``bench/run.py`` results file.

Usage::

    python bench/plot.py bench/results/results.json --out docs

Writes ``perf_vs_crop.png`` (iteration time and peak memory against the crop, B0, one line per K and
implementation: the official code and ours) and ``perf_vs_classes.png`` (the same against K, one line per crop).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "official": {"linestyle": "--", "marker": "o"},
    "restatement": {"linestyle": ":", "marker": "^"},
    "ours": {"linestyle": "-", "marker": "s"},
}
BASELINES = {"official": "official", "literal": "restatement"}


def train_points(path: Path, encoder: str = "mit_b0") -> dict[tuple[str, int, int], dict[str, float]]:
    """``(impl, crop, K) -> {"time", "memory"}`` (seconds, GiB) for the fp32 rows of one encoder at the AllSpark head
    width 768: the baseline (``official``, or ``restatement`` in older files) against ours, and ours alone when the
    official code was not measured."""
    records = json.loads(path.read_text())["records"]
    points: dict[tuple[str, int, int], dict[str, float]] = {}
    for r in records:
        k = r["kwargs"]
        if "result" not in r or k.get("encoder") != encoder or k.get("head_dim", 768) != 768:
            continue
        if r["kind"] == "train_pair" and k["base"]["impl"] in BASELINES and k["other"]["impl"] == "ours":
            for impl, side in ((BASELINES[k["base"]["impl"]], "base"), ("ours", "other")):
                points.setdefault((impl, k["crop"], k["classes"]), {})["time"] = r["result"][side]["median"]
        elif r["kind"] == "train_time" and k["variant"]["impl"] == "ours":
            points.setdefault(("ours", k["crop"], k["classes"]), {})["time"] = r["result"]["median"]
        elif r["kind"] == "train_memory":
            v = k["variant"]
            if v["impl"] in BASELINES or (v.get("precision") == "fp32" and not v.get("channels_last")):
                key = (BASELINES.get(v["impl"], v["impl"]), k["crop"], k["classes"])
                points.setdefault(key, {})["memory"] = r["result"]["peak_rss_mb"] / 1024
    return points


def _panel(ax: Any, points: dict, x_index: int, group_index: int, metric: str, xlabel: str, group: str) -> None:
    groups = sorted({key[group_index] for key in points})
    for impl in STYLE:
        for g in groups:
            selected = [
                (key, v) for key, v in points.items() if key[0] == impl and key[group_index] == g and metric in v
            ]
            rows = sorted((key[x_index], v[metric]) for key, v in selected)
            if rows:
                xs, ys = zip(*rows, strict=True)
                ax.plot(xs, ys, label=f"{impl}, {group} = {g}", **STYLE[impl])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds / iteration" if metric == "time" else "peak RSS (GiB)")
    ax.grid(alpha=0.3)


def plot(results: Path, out: Path, encoder: str = "mit_b0") -> list[Path]:
    """Write the two figures; returns their paths."""
    points = train_points(results, encoder)
    out.mkdir(parents=True, exist_ok=True)
    name = encoder.replace("mit_", "").upper()
    paths = []
    for stem, x_index, group_index, xlabel, group in (
        ("perf_vs_crop", 1, 2, "crop (pixels)", "K"),
        ("perf_vs_classes", 2, 1, "number of classes K", "crop"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, metric in zip(axes, ("time", "memory"), strict=True):
            _panel(ax, points, x_index, group_index, metric, xlabel, group)
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=7)
        baselines = sorted({key[0] for key in points} - {"ours"})
        against = f"{' / '.join(baselines)} vs " if baselines else ""
        fig.suptitle(f"MiT-{name} allspark training iteration (2 + 2 images, memory read): {against}allspark-seg")
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="results.json written by bench/run.py")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for the PNG files")
    parser.add_argument("--encoder", default="mit_b0")
    args = parser.parse_args()
    for path in plot(args.results, args.out, args.encoder):
        print(path)


if __name__ == "__main__":
    main()
