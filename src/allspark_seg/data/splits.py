"""Split files in the UniMatch/AllSpark format, and seeded labeled/unlabeled splits.

A split file has one sample per line, ``image_path mask_path``, both relative to the data root, e.g.
``JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png``. Unlabeled lists may give the image alone. Blank
lines are skipped. Paths containing spaces are supported when both paths end in an image extension.

Paths are normalised lexically (``..`` collapsed, symlinks not followed, so a data root made of symlinked folders
works) and must stay inside the data root. A file referenced twice in one split file is an error.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allspark_seg.errors import ConfigError, DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Item",
    "make_split",
    "parse_split_line",
    "read_split_file",
    "sample_name",
    "write_split_file",
]

log = logging.getLogger(__name__)

#: File extensions read as images (lower case, with the dot).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

#: Suffixes removed from a file stem to name a sample (Cityscapes file names).
_NAME_SUFFIXES = ("_leftImg8bit",)


@dataclass(frozen=True)
class Item:
    """One sample on disk.

    Attributes:
        image: path of the image file.
        mask: path of the mask file, or None (unlabeled images without ground truth).
        name: short sample name (the file stem), used for saved predictions.
        mask_encoding: "ids" (pixel values, or palette indices, are class ids) or "cityscapes_label_ids"
            (Cityscapes ``*_labelIds.png`` mapped to the 19 train ids when read).
    """

    image: Path
    mask: Path | None
    name: str
    mask_encoding: str = "ids"


def sample_name(path: str | Path) -> str:
    """Name a sample after its image file: the stem, without Cityscapes' ``_leftImg8bit`` suffix."""
    stem = Path(path).stem
    for suffix in _NAME_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _has_image_ext(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def parse_split_line(line: str) -> tuple[str, str | None] | None:
    """Split one line into ``(image, mask or None)``; None for a blank line.

    The line is split at the first space where both halves end in an image extension (``image mask``, also with
    paths containing spaces); a line without such a space is one image path.
    """
    line = line.strip().replace("\\", "/")
    if not line:
        return None
    if len(line.split()) == 1:
        return line, None
    for i, char in enumerate(line):
        if char == " ":
            left, right = line[:i].strip(), line[i + 1 :].strip()
            if _has_image_ext(left) and _has_image_ext(right):
                return left, right
    return line, None


def _root_path(root: str | Path) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(root)))


def _inside(root_abs: str, rel: str, where: str) -> Path:
    full = os.path.normpath(os.path.join(root_abs, rel))
    if os.path.commonpath([root_abs, full]) != root_abs:
        raise DataError(f"{where}: '{rel}' points outside the data root {root_abs}.")
    return Path(full)


def read_split_file(path: str | Path, root: str | Path, *, require_masks: bool = False) -> list[Item]:
    """Read a split file.

    Args:
        path: the split file.
        root: data root the paths are relative to.
        require_masks: raise when a line has no mask path (labeled and validation lists).

    Returns:
        Items in file order, with absolute paths; ``mask`` is None for one-path lines and for the
        ``image image`` workaround some users wrote for unlabeled lists.

    Raises:
        DataError: missing or empty file, a path outside the root, a file referenced twice, a missing mask path.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Split file {path} does not exist.")
    root_abs = _root_path(root)
    items: list[Item] = []
    seen: dict[Path, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            parsed = parse_split_line(line)
            if parsed is None:
                continue
            where = f"Split file {path}, line {number}"
            image_rel, mask_rel = parsed
            image = _inside(root_abs, image_rel, where)
            mask = None if mask_rel is None else _inside(root_abs, mask_rel, where)
            if mask == image:
                mask = None
            if mask is None and require_masks:
                raise DataError(f"{where}: '{line.strip()}' has no mask path, but this list must be labeled.")
            for file, rel in ((image, image_rel), (mask, mask_rel)):
                if file is None:
                    continue
                if file in seen:
                    raise DataError(
                        f"{where}: '{rel}' was already referenced on line {seen[file]}; each file may appear once."
                    )
                seen[file] = number
            items.append(Item(image=image, mask=mask, name=sample_name(image)))
    if not items:
        raise DataError(f"Split file {path} lists no images.")
    return items


def _relative(file: Path, root_abs: str, what: str) -> str:
    full = os.path.normpath(os.path.abspath(file))
    if os.path.commonpath([root_abs, full]) != root_abs:
        raise DataError(f"Cannot write {what} {file} to a split file: it is outside the data root {root_abs}.")
    return Path(os.path.relpath(full, root_abs)).as_posix()


def write_split_file(path: str | Path, items: Sequence[Item], root: str | Path) -> Path:
    """Write items as a split file (``image mask`` or ``image`` per line, relative to ``root``).

    Args:
        path: file to write; parent folders are created.
        items: samples with paths inside ``root``.
        root: data root.

    Returns:
        The path written.
    """
    path = Path(path)
    root_abs = _root_path(root)
    lines = []
    for item in items:
        fields = [_relative(item.image, root_abs, "image")]
        if item.mask is not None:
            fields.append(_relative(item.mask, root_abs, "mask"))
        lines.append(" ".join(fields))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _raw_lines(source: str | Path) -> list[str]:
    path = Path(source)
    if not path.is_file():
        raise DataError(f"List file {path} does not exist.")
    entries: list[str] = []
    seen: dict[tuple[str, str | None], int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            parsed = parse_split_line(line)
            if parsed is None:
                continue
            if parsed in seen:
                raise DataError(f"List file {path}, line {number}: repeats line {seen[parsed]}.")
            seen[parsed] = number
            entries.append(line.strip())
    return entries


def _labeled_count(total: int, n_labeled: int | None, fraction: float | None) -> int:
    if (n_labeled is None) == (fraction is None):
        raise ConfigError("Give exactly one of n_labeled and fraction to make a split.")
    if fraction is not None:
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"fraction must be in (0, 1), got {fraction}.")
        n_labeled = max(1, math.ceil(total * fraction - 1e-9))  # 1/16 of 10582 -> 662, as the published splits
    assert n_labeled is not None
    if not 1 <= n_labeled < total:
        raise ConfigError(f"n_labeled must be between 1 and {total - 1} (the list has {total} lines), got {n_labeled}.")
    return n_labeled


def make_split(
    source: str | Path | Sequence[Item],
    n_labeled: int | None,
    fraction: float | None,
    seed: int,
    out_dir: str | Path,
    *,
    root: str | Path | None = None,
) -> tuple[Path, Path]:
    """Draw a seeded labeled/unlabeled split and write ``labeled.txt`` and ``unlabeled.txt``.

    The entries are sorted first, so the result depends only on the set of entries, ``n`` and ``seed``; the two
    files are disjoint, together cover the input, and keep the sorted order. Lines of a list file are copied
    unchanged. The number of labeled images is ``n_labeled`` or ``ceil(fraction * N)`` (the published
    1/16..1/2 splits follow this rounding).

    Args:
        source: a split/list file (lines copied as they are) or items (written relative to ``root``).
        n_labeled: number of labeled images, or None when ``fraction`` is given.
        fraction: labeled fraction in (0, 1), or None.
        seed: seed of the draw (``np.random.default_rng(seed)``).
        out_dir: folder receiving the two files.
        root: data root, required when ``source`` is a list of items.

    Returns:
        ``(labeled_path, unlabeled_path)``.
    """
    out = Path(out_dir)
    if isinstance(source, (str, Path)):
        entries = sorted(_raw_lines(source))
        if not entries:
            raise DataError(f"List file {source} lists no images.")
    else:
        if root is None:
            raise ConfigError("make_split needs the data root to write items as relative paths.")
        root_abs = _root_path(root)
        entries = []
        for item in source:
            fields = [_relative(item.image, root_abs, "image")]
            if item.mask is not None:
                fields.append(_relative(item.mask, root_abs, "mask"))
            entries.append(" ".join(fields))
        entries = sorted(set(entries))
        if len(entries) != len(source):
            raise DataError("The items given to make_split contain duplicates.")
        if not entries:
            raise DataError("make_split got no items.")
    count = _labeled_count(len(entries), n_labeled, fraction)
    chosen = np.zeros(len(entries), dtype=bool)
    chosen[np.random.default_rng(seed).permutation(len(entries))[:count]] = True
    labeled = [e for e, c in zip(entries, chosen, strict=True) if c]
    unlabeled = [e for e, c in zip(entries, chosen, strict=True) if not c]
    out.mkdir(parents=True, exist_ok=True)
    labeled_path, unlabeled_path = out / "labeled.txt", out / "unlabeled.txt"
    labeled_path.write_text("".join(e + "\n" for e in labeled), encoding="utf-8")
    unlabeled_path.write_text("".join(e + "\n" for e in unlabeled), encoding="utf-8")
    log.info("wrote %d labeled and %d unlabeled entries to %s", len(labeled), len(unlabeled), out)
    return labeled_path, unlabeled_path
