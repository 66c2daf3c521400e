"""The opening scan: every file of a split checked once, so that bad input fails when the dataset is opened.

:func:`scan_items` checks each :class:`~allspark_seg.data.splits.Item` in a thread pool (readable, not truncated,
mask of the image's size with values in ``[0, K)`` or the ignore value 255) and raises one
:class:`~allspark_seg.errors.DataError` for the first bad file, never in the middle of training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allspark_seg.constants import IGNORE_INDEX
from allspark_seg.data.files import check_image, load_mask
from allspark_seg.data.splits import Item
from allspark_seg.errors import DataError

__all__ = ["ScanReport", "check_item", "scan_items"]


@dataclass(frozen=True)
class ScanReport:
    """What a scan saw: ``items`` checked, ``masks`` checked, whether any mask has a class in [1, K)
    (``foreground``) and whether any has the ignore value (``ignore``)."""

    items: int
    masks: int
    foreground: bool
    ignore: bool


def _check_mask_values(mask: np.ndarray, num_classes: int, path: Path) -> tuple[bool, bool]:
    """Raise for values outside [0, K) that are not 255; return (has a class in [1, K), has 255)."""
    top = int(mask.max()) if mask.size else 0
    if top < num_classes:
        return top > 0, False
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        values = np.unique(mask[bad])
        shown = ", ".join(str(int(v)) for v in values[:8]) + (" ..." if values.size > 8 else "")
        raise DataError(
            f"Mask {path} has values {shown} outside [0, {num_classes}) that are not the ignore value 255 "
            f"(num_classes is {num_classes})."
        )
    return bool(((mask > 0) & (mask < num_classes)).any()), True


def check_item(item: Item, num_classes: int) -> tuple[bool, bool] | None:
    """Check one item: readable image, readable mask of the same size with values in [0, K) or 255.

    Returns:
        For an item with a mask, whether it has a class in [1, K) and whether it has 255; otherwise None.

    Raises:
        DataError: naming the file and the problem.
    """
    width, height = check_image(item.image)
    if item.mask is None:
        return None
    mask = load_mask(item.mask, item.mask_encoding)
    if mask.shape != (height, width):
        raise DataError(
            f"Mask {item.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {item.image} is {width}x{height}."
        )
    return _check_mask_values(mask, num_classes, item.mask)


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def scan_items(items: Sequence[Item], num_classes: int, *, workers: int | None = None) -> ScanReport:
    """Check every item (in a thread pool) and raise one error for the first bad file.

    Args:
        items: samples to check.
        num_classes: K.
        workers: threads; default ``min(8, cpu_count)`` (Pillow decodes without the GIL).

    Returns:
        A :class:`ScanReport`.

    Raises:
        DataError: the first problem in item order, with the number of other bad files.
    """

    def safe(item: Item) -> tuple[str | None, tuple[bool, bool] | None]:
        try:
            return None, check_item(item, num_classes)
        except DataError as error:
            return str(error), None

    workers = workers or _default_workers()
    if workers > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(safe, items))
    else:
        results = [safe(item) for item in items]
    problems = [problem for problem, _ in results if problem is not None]
    if problems:
        more = f" ({len(problems) - 1} other files have problems too.)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    flags = [flag for _, flag in results if flag is not None]
    return ScanReport(
        items=len(items),
        masks=len(flags),
        foreground=any(fg for fg, _ in flags),
        ignore=any(ig for _, ig in flags),
    )
