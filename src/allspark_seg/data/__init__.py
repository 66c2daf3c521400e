"""Data: dataset formats and readers, split files, transforms, the synthetic datasets and loaders.

Modules: ``formats`` (the registry of dataset formats), ``layouts`` (where each format keeps its files),
``files`` (reading images and masks), ``scan`` (the opening scan), ``datasets`` (``open_split`` and the torch
datasets), ``splits`` (split files), ``transforms``, ``loaders``, ``palette``, ``synthetic`` and ``realtasks``
(generated datasets, written by ``generated``), ``coco`` (painting COCO masks).

Typical use by the engine::

    from allspark_seg import data

    root = data.generate_synthetic("data/synthetic", seed=0)          # only for the synthetic format
    labeled = data.open_split("folder", root, "labeled")                # scanned once, errors are DataError
    unlabeled = data.open_split("folder", root, "unlabeled")
    k = data.resolve_num_classes("folder", root)
    train_l = data.TrainDataset(labeled, role="labeled", crop_size=65, seed=0, num_classes=k,
                                length=len(unlabeled))
    loader = data.build_train_loader(train_l, 2, seed=0, epoch=0, stream=1)

``pycocotools`` is needed only by :mod:`allspark_seg.data.coco`, which is not imported here.
"""

from __future__ import annotations

from allspark_seg.data.datasets import ROLES, TrainDataset, ValDataset, list_train_items, open_split
from allspark_seg.data.files import CITYSCAPES_ID_TO_TRAINID, load_image, load_mask
from allspark_seg.data.formats import (
    FORMATS,
    DatasetInfo,
    FormatSpec,
    describe_dataset,
    get_format,
    read_class_names,
    resolve_num_classes,
)
from allspark_seg.data.loaders import (
    GlobalBatchSampler,
    RunBatchSampler,
    ShardSampler,
    build_run_loader,
    build_train_loader,
    build_val_loader,
    epoch_order,
    global_batches,
    shard_indices,
    steps_per_epoch,
    worker_init_fn,
)
from allspark_seg.data.palette import colorize, palette_for, palette_image
from allspark_seg.data.scan import scan_items
from allspark_seg.data.splits import IMAGE_EXTENSIONS, Item, make_split, read_split_file, write_split_file
from allspark_seg.data.synthetic import generate_synthetic, render_sample
from allspark_seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PIPELINES, apply_pipeline, normalize

__all__ = [
    "CITYSCAPES_ID_TO_TRAINID",
    "FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "PIPELINES",
    "ROLES",
    "DatasetInfo",
    "FormatSpec",
    "GlobalBatchSampler",
    "Item",
    "RunBatchSampler",
    "ShardSampler",
    "TrainDataset",
    "ValDataset",
    "apply_pipeline",
    "build_run_loader",
    "build_train_loader",
    "build_val_loader",
    "colorize",
    "describe_dataset",
    "epoch_order",
    "generate_synthetic",
    "get_format",
    "global_batches",
    "list_train_items",
    "load_image",
    "load_mask",
    "make_split",
    "normalize",
    "open_split",
    "palette_for",
    "palette_image",
    "read_class_names",
    "read_split_file",
    "render_sample",
    "resolve_num_classes",
    "scan_items",
    "shard_indices",
    "steps_per_epoch",
    "worker_init_fn",
    "write_split_file",
]
