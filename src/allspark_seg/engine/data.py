"""From a resolved config to datasets: generate the synthetic data if asked, open and scan every split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import data as D
from ..config import RunConfig, crop_hw
from .adapt import adapt_to_data
from .diagnostics import largest_crop_share

__all__ = ["DataBundle", "data_root", "prepare_data", "pseudo_label_area_cap"]

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """Datasets of a run and what describes their classes.

    Attributes:
        cfg: The config with ``data.root`` and ``data.num_classes`` filled in, ``data.crop_size`` decided and
            ``data.num_workers`` capped (:func:`~allspark_seg.engine.adapt.adapt_to_data`).
        labeled: Labeled training set (repeated to the unlabeled length for semi-supervised methods).
        unlabeled: Unlabeled training set, or None for ``supervised``.
        val: Validation set.
        class_names: K names.
        palette: ``(K, 3)`` uint8 colours.
    """

    cfg: RunConfig
    labeled: D.TrainDataset
    unlabeled: D.TrainDataset | None
    val: D.ValDataset
    class_names: tuple[str, ...]
    palette: np.ndarray


def data_root(cfg: RunConfig, out_dir: str | Path | None) -> Path:
    """The data root; the synthetic dataset defaults to ``OUT/data`` when ``data.root`` is empty."""
    if cfg.data.root:
        return Path(cfg.data.root).expanduser()
    if out_dir is None:
        raise ValueError("The synthetic dataset needs data.root or an output folder.")
    return Path(out_dir) / "data"


def ensure_synthetic(cfg: RunConfig, root: Path) -> None:
    """Generate (or reuse) the synthetic dataset described by ``cfg.data.synthetic`` in ``root``."""
    s = cfg.data.synthetic
    D.generate_synthetic(
        root,
        seed=s.seed,
        num_labeled=s.num_labeled,
        num_unlabeled=s.num_unlabeled,
        num_val=s.num_val,
        image_size=s.image_size,
        num_classes=s.num_classes,
        kind=s.kind,
    )


def _split(cfg: RunConfig, root: Path, name: str) -> Path | None:
    value = getattr(cfg.data, name)
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def prepare_data(cfg: RunConfig, out_dir: str | Path | None = None, *, rank: int = 0) -> DataBundle:
    """Open (and scan) the labeled, unlabeled and validation sets of a run.

    With several processes, rank 0 generates the synthetic dataset first; the others wait for it once.

    Raises:
        DataError: A missing, unreadable or inconsistent file (before anything is trained).
    """
    root = data_root(cfg, out_dir)
    fmt = cfg.data.format
    if fmt == "synthetic":
        if rank == 0:
            ensure_synthetic(cfg, root)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        fmt = "folder"
    info = D.describe_dataset(fmt, root, cfg.data.num_classes)
    k = info.num_classes
    cfg = replace(cfg, data=replace(cfg.data, root=str(root), num_classes=k))
    semi = cfg.method != "supervised"
    check = cfg.data.check
    labeled_items = D.open_split(
        fmt, root, "labeled", num_classes=k, split_file=_split(cfg, root, "labeled_split"), check=check
    )
    unlabeled_items = None
    if semi:
        unlabeled_items = D.open_split(
            fmt, root, "unlabeled", num_classes=k, split_file=_split(cfg, root, "unlabeled_split"), check=check
        )
    val_items = D.open_split(fmt, root, "val", num_classes=k, split_file=_split(cfg, root, "val_split"), check=check)
    cfg = adapt_to_data(cfg, [item.image for item in (*labeled_items, *(unlabeled_items or ()))])
    crop = crop_hw(cfg)
    common = {"crop_size": crop, "pipeline": cfg.data.pipeline, "seed": cfg.train.seed, "num_classes": k}
    length = len(unlabeled_items) if unlabeled_items else None  # official: labeled ids repeated to the unlabeled length
    labeled = D.TrainDataset(labeled_items, role="labeled", length=length, **common)
    unlabeled = D.TrainDataset(unlabeled_items, role="unlabeled", **common) if unlabeled_items else None
    val = D.ValDataset(val_items, k)
    log.info(
        "data: %d labeled, %s unlabeled, %d validation images, %d classes",
        len(labeled_items),
        len(unlabeled_items) if unlabeled_items else 0,
        len(val_items),
        k,
    )
    return DataBundle(cfg, labeled, unlabeled, val, tuple(info.class_names), info.palette)


def pseudo_label_area_cap(cfg: RunConfig, labeled: D.TrainDataset) -> torch.Tensor | None:
    """``(K,)`` ``semi.area_cap`` times each class's largest share of a crop of a labeled mask (the masks are read
    once), or None when the option is off or the method has no pseudo-labels."""
    if cfg.semi.area_cap <= 0 or cfg.method == "supervised":
        return None
    assert cfg.data.num_classes is not None
    masks = (D.load_mask(item.mask, item.mask_encoding) for item in labeled.items)
    cap = cfg.semi.area_cap * largest_crop_share(masks, cfg.data.num_classes, crop_hw(cfg))
    log.info("pseudo-label area caps (semi.area_cap): %s", " ".join(f"{100 * v:.0f}%" for v in cap.tolist()))
    return cap
