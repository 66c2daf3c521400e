"""Writing generated datasets (the synthetic shapes and the tasks built from real images) to disk.

A generated dataset is written in the folder layout (see :mod:`allspark_seg.data.layouts`), plus the ground truth
of the unlabeled images in ``ROOT/unlabeled_masks/`` (for diagnostics only), ``classes.txt`` and a
``manifest.json`` that describes it fully; an existing dataset with an equal manifest is reused. The dataset is
written to a temporary folder and moved into place, so an interrupted run never leaves half a dataset. Sample ``i``
of a subset is drawn from :func:`subset_rng` ``(seed, subset, i)`` only, so changing one size does not change the
other images.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from allspark_seg.errors import DataError

__all__ = ["SUBSETS", "SYNTHETIC_VERSION", "Renderer", "is_current", "make_manifest", "subset_rng", "write_dataset"]

log = logging.getLogger(__name__)

#: Version of the generated datasets, recorded in every manifest: bumped whenever the rendering of the shapes or
#: the written layout changes, so that stale datasets are regenerated.
SYNTHETIC_VERSION = 1

#: The subsets of a generated dataset and their index in the random seed.
SUBSETS: Mapping[str, int] = {"labeled": 0, "unlabeled": 1, "val": 2}

#: Renders sample ``i`` of a subset (``labeled``, ``unlabeled`` or ``val``): ``(H, W, 3)`` uint8 image, ``(H, W)`` mask.
Renderer = Callable[[str, int], tuple[np.ndarray, np.ndarray]]


def make_manifest(**fields: Any) -> dict[str, Any]:
    """A manifest: the format tag and :data:`SYNTHETIC_VERSION`, then ``fields`` in order."""
    return {"format": "allspark-seg synthetic", "version": SYNTHETIC_VERSION, **fields}


def subset_rng(seed: int, subset: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of a subset: ``np.random.default_rng([seed, SUBSETS[subset], index])``."""
    return np.random.default_rng([seed, SUBSETS[subset], index])


def _count(folder: Path) -> int:
    return len(os.listdir(folder)) if folder.is_dir() else -1


def is_current(root: Path, manifest: Mapping[str, Any]) -> bool:
    """True when ``root`` holds a complete dataset written with an equal manifest."""
    try:
        existing = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if existing != manifest:
        return False
    expected = {
        root / "labeled" / "images": manifest["num_labeled"],
        root / "labeled" / "masks": manifest["num_labeled"],
        root / "unlabeled": manifest["num_unlabeled"],
        root / "val" / "images": manifest["num_val"],
        root / "val" / "masks": manifest["num_val"],
    }
    if manifest["unlabeled_masks"]:
        expected[root / "unlabeled_masks"] = manifest["num_unlabeled"]
    return all(_count(folder) == n for folder, n in expected.items())


def _write_subset(subset: str, count: int, render: Renderer, image_dir: Path, mask_dir: Path | None) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    if mask_dir is not None:
        mask_dir.mkdir(parents=True, exist_ok=True)
    prefix = {"labeled": "l", "unlabeled": "u", "val": "v"}[subset]

    def write(i: int) -> None:
        image, mask = render(subset, i)
        name = f"{prefix}{i:05d}.png"
        Image.fromarray(image).save(image_dir / name, compress_level=1)
        if mask_dir is not None:
            Image.fromarray(mask).save(mask_dir / name, compress_level=1)

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(write, range(count)))


def write_dataset(root: Path, manifest: dict[str, Any], render: Renderer, names: Sequence[str], what: str) -> Path:
    """Write (or reuse) a generated dataset in the folder layout, atomically.

    Args:
        root: target folder; must be empty, absent, or a dataset written earlier by this module.
        manifest: the full description (with ``num_labeled``, ``num_unlabeled``, ``num_val`` and
            ``unlabeled_masks``); an existing dataset with an equal manifest is reused.
        render: draws sample ``i`` of a subset; it must depend only on its arguments.
        names: class names written to ``classes.txt``.
        what: the dataset's name in log messages.

    Returns:
        The dataset root.

    Raises:
        DataError: ``root`` holds other files.
    """
    if is_current(root, manifest):
        log.info("reusing the %s dataset in %s", what, root)
        return root
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / "manifest.json").is_file())):
        raise DataError(f"{root} exists and is not a synthetic dataset; choose an empty or new folder.")
    start = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_subset("labeled", manifest["num_labeled"], render, tmp / "labeled" / "images", tmp / "labeled" / "masks")
        _write_subset(
            "unlabeled",
            manifest["num_unlabeled"],
            render,
            tmp / "unlabeled",
            tmp / "unlabeled_masks" if manifest["unlabeled_masks"] else None,
        )
        _write_subset("val", manifest["num_val"], render, tmp / "val" / "images", tmp / "val" / "masks")
        (tmp / "classes.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "data")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_current(root, manifest):  # another process wrote the same dataset first
            return root
        raise
    log.info(
        "wrote the %s dataset (%d labeled, %d unlabeled, %d val, %d classes) to %s in %.1f s",
        what,
        manifest["num_labeled"],
        manifest["num_unlabeled"],
        manifest["num_val"],
        len(names),
        root,
        time.perf_counter() - start,
    )
    return root
