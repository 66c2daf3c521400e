"""Convert COCO ``instances_*.json`` annotations to the 81-class masks used by the UniMatch/AllSpark family.

Category ids (1..90 with gaps) are mapped in sorted order to classes 1..80; 0 is the background. Annotations are
painted in file order, later ones over earlier ones; crowd regions are painted 255 (ignore). Masks are written as
single-channel PNGs named after the image, e.g. ``masks/train2017/000000000009.png``.

pycocotools is an optional dependency (``pip install 'allspark-seg[coco]'``); it is imported only when converting
from a JSON file. The painting only needs a small part of its API (``getCatIds``, ``getImgIds``, ``loadImgs``,
``getAnnIds``, ``loadAnns``, ``annToMask``), so any object providing it can be passed as ``coco``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from allspark_seg.constants import IGNORE_INDEX
from allspark_seg.errors import DataError, MissingExtraError

__all__ = ["CocoLike", "category_map", "coco_to_masks", "load_coco", "paint_mask"]

log = logging.getLogger(__name__)


class CocoLike(Protocol):
    """The part of ``pycocotools.coco.COCO`` used here."""

    def getCatIds(self) -> list[int]: ...

    def getImgIds(self) -> list[int]: ...

    def loadImgs(self, ids: Sequence[int]) -> list[dict[str, Any]]: ...

    def getAnnIds(self, imgIds: Sequence[int], iscrowd: bool | None = None) -> list[int]: ...

    def loadAnns(self, ids: Sequence[int]) -> list[dict[str, Any]]: ...

    def annToMask(self, ann: dict[str, Any]) -> np.ndarray: ...


def load_coco(ann_json: str | Path) -> CocoLike:
    """Load an annotation file with pycocotools.

    Raises:
        MissingExtraError: pycocotools is not installed.
        DataError: the file does not exist.
    """
    try:
        from pycocotools.coco import COCO
    except ImportError as error:
        raise MissingExtraError("pycocotools", "coco", "Converting COCO annotations") from error
    path = Path(ann_json)
    if not path.is_file():
        raise DataError(f"COCO annotation file {path} does not exist.")
    return COCO(str(path))


def category_map(category_ids: Iterable[int]) -> dict[int, int]:
    """Map COCO category ids, in sorted order, to classes 1..N (0 is the background)."""
    return {cat: k + 1 for k, cat in enumerate(sorted(set(category_ids)))}


def paint_mask(
    annotations: Sequence[Mapping[str, Any]],
    height: int,
    width: int,
    classes: Mapping[int, int],
    ann_to_mask: Callable[[Mapping[str, Any]], np.ndarray],
) -> np.ndarray:
    """Paint the annotations of one image.

    Args:
        annotations: COCO annotation dicts (``category_id``, ``iscrowd``, segmentation), painted in order.
        height: image height.
        width: image width.
        classes: category id -> class id.
        ann_to_mask: returns an annotation's ``(H, W)`` binary mask (pycocotools ``annToMask``).

    Returns:
        ``(H, W)`` uint8: 0 background, 1..N classes, 255 crowd regions.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    for ann in annotations:
        region = np.asarray(ann_to_mask(ann)) > 0
        if region.shape != mask.shape:
            raise DataError(
                f"COCO annotation {ann.get('id')} has a {region.shape[1]}x{region.shape[0]} mask for a "
                f"{width}x{height} image."
            )
        mask[region] = IGNORE_INDEX if ann.get("iscrowd", 0) else classes[int(ann["category_id"])]
    return mask


def coco_to_masks(
    ann_json: str | Path | None,
    image_dir: str | Path | None,
    out_dir: str | Path,
    *,
    coco: CocoLike | None = None,
) -> int:
    """Write one mask PNG per annotated image.

    Args:
        ann_json: ``instances_train2017.json`` or ``instances_val2017.json`` (ignored when ``coco`` is given).
        image_dir: the matching image folder; images missing there are skipped (None: write every image).
        out_dir: output folder, e.g. ``ROOT/masks/train2017``.
        coco: an already loaded COCO object (or anything with the same small API).

    Returns:
        The number of masks written.

    Raises:
        MissingExtraError: pycocotools is needed and not installed.
        DataError: a missing annotation file, or none of its images in ``image_dir``.
    """
    if coco is None:
        if ann_json is None:
            raise DataError("coco_to_masks needs an annotation file or a COCO object.")
        coco = load_coco(ann_json)
    classes = category_map(coco.getCatIds())
    if len(classes) != 80:
        log.warning("the annotations have %d categories (COCO has 80); classes are 1..%d", len(classes), len(classes))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = Path(image_dir) if image_dir is not None else None
    written = skipped = 0
    for info in coco.loadImgs(sorted(coco.getImgIds())):
        file_name = str(info["file_name"])
        if images is not None and not (images / file_name).is_file():
            skipped += 1
            continue
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]], iscrowd=None))
        mask = paint_mask(annotations, int(info["height"]), int(info["width"]), classes, coco.annToMask)
        Image.fromarray(mask).save(out / f"{Path(file_name).stem}.png")
        written += 1
    if written == 0 and skipped:
        raise DataError(f"None of the {skipped} annotated images is in {images}.")
    if skipped:
        log.warning("%d annotated images are not in %s and were skipped", skipped, images)
    log.info("wrote %d COCO masks to %s", written, out)
    return written
