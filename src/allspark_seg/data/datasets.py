"""Opening a dataset split (listed by its format, scanned once) and the torch datasets that load its samples.

:func:`open_split` returns :class:`Item` paths for one role ("labeled", "unlabeled" or "val") and, with
``check=True``, scans every file once so that bad input fails when the dataset is opened with one
:class:`~allspark_seg.errors.DataError` naming the file, never in the middle of training. Loading happens in
:class:`TrainDataset` and :class:`ValDataset`.

The pieces live in their own modules and are re-exported here: the format registry (:mod:`.formats`), where each
format keeps its files (:mod:`.layouts`), reading image and mask files (:mod:`.files`) and the scan (:mod:`.scan`).

Folder layout (the default for custom data)::

    ROOT/labeled/images/NAME.{jpg,jpeg,png,bmp,tif,tiff}
    ROOT/labeled/masks/NAME.png            single-channel class ids or palette PNG, 255 = ignore
    ROOT/unlabeled/*.{jpg,...}             images only (or ROOT/unlabeled/images/)
    ROOT/unlabeled_masks/NAME.png          optional ground truth of unlabeled images, for diagnostics only
    ROOT/val/images/NAME.*, ROOT/val/masks/NAME.png
    ROOT/classes.txt                       optional, one class name per line
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from allspark_seg.constants import IGNORE_INDEX
from allspark_seg.data.files import CITYSCAPES_ID_TO_TRAINID, MASK_ENCODINGS, load_image, load_item, load_mask
from allspark_seg.data.formats import (
    FORMATS,
    DatasetInfo,
    FormatSpec,
    describe_dataset,
    get_format,
    list_items,
    read_class_names,
    resolve_num_classes,
)
from allspark_seg.data.layouts import ROLES, Role
from allspark_seg.data.scan import ScanReport, check_item, scan_items
from allspark_seg.data.splits import Item
from allspark_seg.data.transforms import PIPELINES, ROLE_STREAMS, apply_pipeline, normalize, sample_rng
from allspark_seg.errors import ConfigError, DataError

__all__ = [
    "CITYSCAPES_ID_TO_TRAINID",
    "FORMATS",
    "IGNORE_INDEX",
    "MASK_ENCODINGS",
    "ROLES",
    "DatasetInfo",
    "FormatSpec",
    "Item",
    "ScanReport",
    "TrainDataset",
    "ValDataset",
    "check_item",
    "describe_dataset",
    "get_format",
    "list_train_items",
    "load_image",
    "load_mask",
    "open_split",
    "read_class_names",
    "resolve_num_classes",
    "scan_items",
]

log = logging.getLogger(__name__)


def _warn_suspicious(report: ScanReport, num_classes: int, where: str) -> None:
    if num_classes >= 2 and report.ignore and not report.foreground:
        log.warning(
            "%s: the masks contain only class 0 and 255 (ignore). If 255 marks your foreground, save it as 1.", where
        )


def _check_exists(items: Sequence[Item], role: Role) -> list[Item]:
    """Missing images and labeled/val masks are errors; missing unlabeled masks are dropped (optional)."""
    checked = []
    for item in items:
        if not item.image.is_file():
            raise DataError(f"Image {item.image} does not exist.")
        if item.mask is not None and not item.mask.is_file():
            if role != "unlabeled":
                raise DataError(f"Mask {item.mask} does not exist (image {item.image}).")
            item = Item(item.image, None, item.name)
        checked.append(item)
    return checked


def open_split(
    format: str,
    root: str | Path,
    role: Role,
    *,
    num_classes: int | None = None,
    split_file: str | Path | None = None,
    check: bool = True,
    unlabeled_masks: bool = True,
    workers: int | None = None,
) -> list[Item]:
    """List (and by default scan) the samples of one role of a dataset.

    Sources: with ``split_file``, the split file (paths relative to ``root``). Otherwise voc: labeled from
    ``ImageSets/Segmentation/train.txt``, val from ``ImageSets/Segmentation/val.txt``; cityscapes:
    ``leftImg8bit/{train,val}``; coco: ``{train,val}2017``; folder/synthetic: the folder layout. Unlabeled data of
    voc/cityscapes/coco needs a split file.

    Args:
        format: a key of :data:`FORMATS` (or an alias).
        root: data root.
        role: "labeled", "unlabeled" or "val".
        num_classes: K when the format does not fix it and there is no ``classes.txt``.
        split_file: optional split file.
        check: scan every file (readable, not truncated, mask size and values); recommended.
        unlabeled_masks: keep existing masks of unlabeled items as diagnostic ground truth.
        workers: scan threads.

    Returns:
        Items with absolute paths; unlabeled items have ``mask=None`` unless ground truth exists.

    Raises:
        DataError: a missing, unreadable or inconsistent file, or an empty list.
        ConfigError: a bad format, role or number of classes.
    """
    if role not in ROLES:
        raise ConfigError(f"Unknown role {role!r}; expected one of {ROLES}.")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Data root {root} does not exist or is not a folder.")
    k = resolve_num_classes(format, root, num_classes)
    items = list_items(format, root, role, None if split_file is None else Path(split_file))
    items = _check_exists(items, role)
    if role == "unlabeled" and not unlabeled_masks:
        items = [Item(item.image, None, item.name) for item in items]
    if not items:
        raise DataError(f"No {role} images found in {root}.")
    if check:
        report = scan_items(items, k, workers=workers)
        if role != "unlabeled":
            _warn_suspicious(report, k, f"{root} ({role})")
    with_gt = sum(item.mask is not None for item in items)
    log.info("%s %s: %d images (%d with masks) in %s", get_format(format).name, role, len(items), with_gt, root)
    if role == "unlabeled" and 0 < with_gt < len(items):
        log.warning(
            "%d of %d unlabeled images in %s have ground truth: pseudo-label accuracy is measured on those only.",
            with_gt,
            len(items),
            root,
        )
    return items


def list_train_items(format: str, root: str | Path) -> list[Item]:
    """All standard training samples of a dataset, the list :func:`~allspark_seg.data.splits.make_split` draws from.

    voc: ``ImageSets/Segmentation/train.txt``; cityscapes: ``leftImg8bit/train``; coco: ``train2017``; folder:
    ``labeled/``. Files are not scanned.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Data root {root} does not exist or is not a folder.")
    return _check_exists(list_items(format, root, "labeled", None), "labeled")


# ------------------------------------------------------------------------------------------ torch datasets


def _split_key(key: int | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
    if isinstance(key, (tuple, list)):
        index, epoch = key
        return int(index), int(epoch)
    return int(key), 0


class TrainDataset(Dataset):
    """Augmented training samples, keyed by ``(index, epoch)``.

    The id list is repeated and truncated to ``length`` (the official code repeats the labeled ids to the length of
    the unlabeled list). ``index`` may exceed ``len(self)``: it wraps around, and the extra laps (used by the
    sampler when a dataset is smaller than a global batch) get fresh augmentations since the random generator is
    ``np.random.default_rng([seed, epoch, index, stream])``, where the stream is the role's (0 unlabeled, 1 labeled:
    ``transforms.ROLE_STREAMS``), so labeled and unlabeled sample ``j`` get different crops, flips and scales.

    Args:
        items: samples from :func:`open_split`.
        role: "labeled" (items need masks) or "unlabeled".
        crop_size: int or ``(h, w)``.
        pipeline: "allspark" or "unimatch" (see :mod:`allspark_seg.data.transforms`).
        seed: non-negative base seed.
        num_classes: K (mask values are checked when the dataset is opened).
        length: dataset length, default ``len(items)``.
        ignore_index: label of padded pixels.
    """

    def __init__(
        self,
        items: Sequence[Item],
        *,
        role: Literal["labeled", "unlabeled"],
        crop_size: int | tuple[int, int],
        pipeline: Literal["allspark", "unimatch"] = "allspark",
        seed: int,
        num_classes: int,
        length: int | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if role not in ("labeled", "unlabeled"):
            raise ConfigError(f"TrainDataset role must be 'labeled' or 'unlabeled', got {role!r}.")
        if pipeline not in PIPELINES:
            raise ConfigError(f"Unknown augmentation pipeline {pipeline!r}; expected one of {PIPELINES}.")
        if not items:
            raise DataError(f"The {role} training set is empty.")
        if role == "labeled":
            unlabeled = [item for item in items if item.mask is None]
            if unlabeled:
                raise DataError(f"Labeled image {unlabeled[0].image} has no mask.")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}.")
        if length is not None and length < 1:
            raise ConfigError(f"length must be positive, got {length}.")
        self.items = tuple(items)
        self.role = role
        self.crop_size = crop_size
        self.pipeline = pipeline
        self.seed = seed
        self.num_classes = num_classes
        self.length = len(self.items) if length is None else length
        self.ignore_index = ignore_index
        # Ground truth of some unlabeled images only (``unlabeled_masks/`` half filled): the others get an all-ignore
        # mask, so every sample of the set has the same keys (batches collate, processes log the same diagnostics)
        # and pseudo-label accuracy is measured on the images that have ground truth.
        self.fill_missing_masks = role == "unlabeled" and any(item.mask is not None for item in self.items)

    def __len__(self) -> int:
        return self.length

    def item_at(self, index: int) -> Item:
        """The sample behind ``index`` (wrapping around ``len(self)`` and then the item list)."""
        if index < 0:
            raise IndexError(f"negative index {index}")
        return self.items[(index % self.length) % len(self.items)]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """One augmented sample; ``key`` is ``(index, epoch)`` or an index (epoch 0). See ``apply_pipeline``."""
        index, epoch = _split_key(key)
        image, mask = load_item(self.item_at(index))
        if mask is None and self.fill_missing_masks:
            mask = np.full(image.shape[:2], self.ignore_index, dtype=np.uint8)
        rng = sample_rng(self.seed, epoch, index, ROLE_STREAMS[self.role])
        return apply_pipeline(self.pipeline, self.role, image, mask, rng, self.crop_size, self.ignore_index)


class ValDataset(Dataset):
    """Full-size validation samples: ``image (3, H, W) float32`` normalised, ``mask (H, W) int64``, ``name``.

    Sizes vary between images, so use batch size 1 (as the official evaluation) or a collate that pads.
    """

    def __init__(self, items: Sequence[Item], num_classes: int) -> None:
        if not items:
            raise DataError("The validation set is empty.")
        missing = [item for item in items if item.mask is None]
        if missing:
            raise DataError(f"Validation image {missing[0].image} has no mask.")
        self.items = tuple(items)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        image, mask = load_item(item)
        assert mask is not None
        return {"image": normalize(image), "mask": torch.from_numpy(mask.astype(np.int64)), "name": item.name}
