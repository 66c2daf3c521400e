"""How long opening a large folder dataset and augmenting one sample take.

Usage::

    python bench/data_speed.py [--num 10000] [--size 375x500] [--root DIR] [--out FILE.json]

Writes a folder dataset of ``--num`` labeled JPEG images with PNG masks (synthetic shapes, VOC-like 500 x 375 by
default) into ``--root`` (a temporary folder by default, removed at the end), then measures:

- ``open_split`` with the full scan (every image header and mask read and checked) and listing alone, best of 3;
- the per-sample cost of each training pipeline at crop 513 (transforms alone, and with the decoding of the files
  as ``TrainDataset`` does it), one thread.

Prints a Markdown table and, with ``--out``, writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from allspark_seg import data
from allspark_seg.data.synthetic import render_sample
from allspark_seg.data.transforms import apply_pipeline, sample_rng

NUM_CLASSES = 6
CROP = 513
PIPELINES = [("allspark", "labeled"), ("allspark", "unlabeled"), ("unimatch", "labeled"), ("unimatch", "unlabeled")]


def write_dataset(root: Path, num: int, size: tuple[int, int]) -> float:
    """Write ``num`` labeled images (JPEG, quality 90) and masks (PNG); returns the seconds it took."""
    (root / "labeled/images").mkdir(parents=True, exist_ok=True)
    (root / "labeled/masks").mkdir(parents=True, exist_ok=True)
    names = ["background", "disc", "square", "triangle", "cross", "ring"]
    (root / "classes.txt").write_text("\n".join(names[:NUM_CLASSES]) + "\n")
    base = [render_sample(np.random.default_rng(i), size, NUM_CLASSES) for i in range(16)]

    def write(i: int) -> None:
        image, mask = base[i % 16]
        Image.fromarray(np.roll(image, i, axis=1)).save(root / f"labeled/images/{i:05d}.jpg", quality=90)
        Image.fromarray(np.roll(mask, i, axis=1)).save(root / f"labeled/masks/{i:05d}.png")

    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(num)))
    return time.perf_counter() - start


def best_of(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, float]:
    """Best wall time of ``repeats`` calls, with the process CPU time of that call (seconds)."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best = min(best, (wall, cpu))
    return best


def per_sample_ms(fn: Callable[[int], Any], count: int = 60, warmup: int = 3) -> float:
    """Mean milliseconds of ``fn(i)`` over ``count`` indices after ``warmup`` calls."""
    for i in range(warmup):
        fn(i)
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return (time.perf_counter() - start) / count * 1e3


def pipeline_costs(pipeline: str, role: str, items: list[data.Item]) -> dict[str, float]:
    """Per-sample milliseconds of one pipeline: transforms alone (first image) and with decoding (as training)."""
    image = data.load_image(items[0].image)
    mask = data.load_mask(items[0].mask) if role == "labeled" else None
    alone = per_sample_ms(lambda i: apply_pipeline(pipeline, role, image, mask, sample_rng(0, 0, i), CROP))
    if role == "unlabeled":
        items = [data.Item(it.image, None, it.name) for it in items]
    dataset = data.TrainDataset(items, role=role, crop_size=CROP, pipeline=pipeline, seed=0, num_classes=NUM_CLASSES)
    return {"transforms_ms": alone, "with_decode_ms": per_sample_ms(lambda i: dataset[(i, 0)])}


def measure(root: Path) -> dict[str, Any]:
    """Open/scan times and per-sample transform costs on the dataset in ``root``."""
    scan = best_of(lambda: data.open_split("folder", root, "labeled", check=True))
    listing = best_of(lambda: data.open_split("folder", root, "labeled", check=False))
    items = data.open_split("folder", root, "labeled", check=False)[:60]
    transforms = {f"{pipeline} {role}": pipeline_costs(pipeline, role, items) for pipeline, role in PIPELINES}
    return {
        "scan": {"wall_s": scan[0], "cpu_s": scan[1]},
        "listing": {"wall_s": listing[0], "cpu_s": listing[1]},
        "transforms": transforms,
        "decode_jpeg_ms": per_sample_ms(lambda i: data.load_image(items[i % len(items)].image)),
        "image_shape": list(data.load_image(items[0].image).shape),
    }


def render(num: int, result: dict[str, Any], written_s: float) -> str:
    """The results as Markdown."""
    h, w = result["image_shape"][:2]
    lines = [
        f"{num} labeled {w} x {h} JPEG images + PNG masks (written in {written_s:.1f} s)",
        "",
        "| operation | wall s | CPU s |",
        "| --- | --- | --- |",
        f"| open with the full scan | {result['scan']['wall_s']:.2f} | {result['scan']['cpu_s']:.2f} |",
        f"| listing only (`check=False`) | {result['listing']['wall_s']:.2f} | {result['listing']['cpu_s']:.2f} |",
        "",
        f"| pipeline, role (crop {CROP}, 1 thread) | transforms ms/sample | with decoding ms/sample |",
        "| --- | --- | --- |",
    ]
    for name, row in result["transforms"].items():
        lines.append(f"| {name} | {row['transforms_ms']:.1f} | {row['with_decode_ms']:.1f} |")
    lines += ["", f"JPEG decoding alone: {result['decode_jpeg_ms']:.1f} ms per image."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=10000, help="number of labeled images")
    parser.add_argument("--size", default="375x500", help="image size HxW")
    parser.add_argument("--root", default=None, help="dataset folder (kept); default: a temporary folder")
    parser.add_argument("--out", default=None, help="JSON file for the numbers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    h, w = (int(v) for v in args.size.lower().split("x"))
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="allspark_data_speed_"))
    try:
        written = write_dataset(root, args.num, (h, w))
        result = measure(root)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    print(render(args.num, result, written))
    if args.out:
        Path(args.out).write_text(json.dumps({"num": args.num, "written_s": written, **result}, indent=1))


if __name__ == "__main__":
    main()
