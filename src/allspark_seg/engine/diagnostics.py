"""Semi-supervised diagnostics and collapse checks, computed at logging steps and validations.

Pseudo-label statistics are accumulated as additive counts (:func:`pseudo_label_counts`: fixed-size scatters on the
device, no boolean indexing or ``bincount``, so no host synchronisation) over every micro-step of a logging window,
summed across processes, and turned into shares (:func:`stats_from_counts`) when a record is written. The collapse
checks of the guard are small pure functions: :func:`miou_drop`, :func:`collapsed_classes` and
:func:`dominant_class`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from ..models.memory import SemanticMemory
from ..utils.sizes import to_pair
from .evaluate import Size2, sliding_windows

__all__ = [
    "collapsed_classes",
    "dominant_class",
    "labeled_class_share",
    "largest_crop_share",
    "loss_ratio",
    "memory_diversity",
    "miou_drop",
    "pseudo_label_counts",
    "pseudo_label_stats",
    "stats_from_counts",
]


def pseudo_label_counts(
    pseudo: torch.Tensor, confidence: torch.Tensor, num_classes: int, target: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Additive counts of one batch of pseudo-labels (sum them over steps and processes).

    Args:
        pseudo: ``(B, H, W)`` int64, 255 where ignored (below the threshold or padding).
        confidence: ``(B, H, W)`` teacher top probability.
        num_classes: K.
        target: Optional ground truth ``(B, H, W)`` of the same images.

    Every output has a fixed shape (no data-dependent indexing), so on CUDA nothing waits for the device.

    Returns:
        ``count (K,)`` kept pixels per class, ``conf_sum (K,)`` their summed confidence, ``kept`` and ``pixels``
        (scalars) and, with ``target``, ``correct`` and ``checked`` (kept pixels with a non-ignored ground truth).
    """
    kept = pseudo != IGNORE_INDEX
    valid = kept & (pseudo >= 0) & (pseudo < num_classes)
    bins = pseudo.where(valid, num_classes).reshape(-1)  # class, or the spill bin K: fixed-size scatter
    count = torch.zeros(num_classes + 1, dtype=torch.long, device=pseudo.device)
    count = count.scatter_add_(0, bins, torch.ones_like(bins))[:num_classes].float()
    conf_sum = torch.zeros(num_classes + 1, device=pseudo.device)
    conf_sum = conf_sum.scatter_add_(0, bins, confidence.reshape(-1).float())[:num_classes]
    counts = {
        "count": count,
        "conf_sum": conf_sum,
        "kept": kept.sum().float(),
        "pixels": kept.new_full((), pseudo.numel(), dtype=torch.float32),
    }
    if target is not None:
        checked = kept & (target != IGNORE_INDEX)
        counts["correct"] = (checked & (pseudo == target)).sum().float()
        counts["checked"] = checked.sum().float()
    return counts


def stats_from_counts(counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shares and means from (summed) :func:`pseudo_label_counts`.

    Returns:
        ``pseudo_share (K,)`` (fraction of kept pixels per class, zeros when nothing is kept), ``pseudo_conf (K,)``
        (mean confidence per class, NaN where absent), ``kept_fraction`` (kept pixels / all pixels) and, when the
        counts have ground truth, ``pseudo_acc`` (accuracy over checked pixels, NaN when none).
    """
    count = counts["count"]
    stats = {
        "pseudo_share": count / count.sum().clamp_min(1),
        "pseudo_conf": counts["conf_sum"] / count.where(count > 0, torch.nan),
        "kept_fraction": counts["kept"] / counts["pixels"].clamp_min(1),
    }
    if "checked" in counts:
        checked = counts["checked"]
        stats["pseudo_acc"] = counts["correct"] / checked.where(checked > 0, torch.nan)
    return stats


def pseudo_label_stats(
    pseudo: torch.Tensor, confidence: torch.Tensor, num_classes: int, target: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Class shares and confidence of one batch of pseudo-labels (:func:`stats_from_counts` of its counts)."""
    return stats_from_counts(pseudo_label_counts(pseudo, confidence, num_classes, target))


def loss_ratio(loss_x: torch.Tensor, loss_u: torch.Tensor) -> torch.Tensor:
    """Labeled / unlabeled loss, NaN when the unlabeled loss is zero (every pseudo-label below the threshold).

    A ratio that climbs means the unlabeled loss vanishes (the student reproduces confident pseudo-labels, or none
    is confident); one that falls towards 0 means the labeled loss collapsed while the unlabeled one did not.
    """
    return loss_x / loss_u.where(loss_u > 0, torch.nan)


@torch.no_grad()
def memory_diversity(memory: SemanticMemory) -> torch.Tensor:
    """``(K,)`` mean pairwise cosine similarity of the written slots of each class (NaN with fewer than 2).

    Values near 1 mean a class's memory collapsed onto one pattern.
    """
    bank = F.normalize(memory.bank.float(), dim=-1)  # (K, L, N)
    filled = memory.filled.float()  # (K, L)
    gram = bank @ bank.transpose(1, 2)  # (K, L, L)
    pair = filled[:, :, None] * filled[:, None, :]
    pair = pair * (1 - torch.eye(pair.shape[-1], device=pair.device))
    n = pair.sum(dim=(1, 2))
    return (gram * pair).sum(dim=(1, 2)) / n.where(n > 0, torch.nan)


def labeled_class_share(masks: Iterable[np.ndarray], num_classes: int) -> torch.Tensor:
    """``(K,)`` share of each class among the non-ignored pixels of the labeled masks (zeros without pixels)."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for mask in masks:
        values = np.asarray(mask).reshape(-1)
        counts += np.bincount(values[values < num_classes], minlength=num_classes)[:num_classes]
    return torch.from_numpy(counts / max(counts.sum(), 1.0)).float()


def _window_sums(binary: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Counts of True pixels of ``binary (H, W)`` in each ``(y0, y1, x0, x1)`` row of ``boxes (N, 4)`` (summed-area
    table)."""
    table = np.pad(binary.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    y0, y1, x0, x1 = boxes.T
    return table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]


def largest_crop_share(masks: Iterable[np.ndarray], num_classes: int, crop: Size2) -> torch.Tensor:
    """``(K,)`` the largest share each class takes of a crop-sized window of a labeled mask (``semi.area_cap``).

    Windows of the crop's size (clipped to the mask) every half crop, edge windows shifted inside; a share counts
    the window's non-ignored pixels. A class absent from every mask gets 0. Crops of 128 pixels or more are measured
    on every ``step``-th pixel of the masks (``step = min(crop) // 64``, about 64 samples per crop side), which keeps
    a 1024 x 2048 mask at a few milliseconds and moves a share by a fraction of a point.
    """
    crop_h, crop_w = to_pair(crop)
    step = max(1, min(crop_h, crop_w) // 64)
    crop_h, crop_w = max(1, round(crop_h / step)), max(1, round(crop_w / step))
    best = np.zeros(num_classes, dtype=np.float64)
    for mask in masks:
        m = np.asarray(mask)[::step, ::step]
        wh, ww = min(crop_h, m.shape[0]), min(crop_w, m.shape[1])
        boxes = np.array(sliding_windows(m.shape[0], m.shape[1], (wh, ww), (max(1, wh // 2), max(1, ww // 2))))
        valid = np.maximum(_window_sums(m < num_classes, boxes), 1)
        for k in range(num_classes):
            best[k] = max(best[k], float((_window_sums(m == k, boxes) / valid).max()))
    return torch.from_numpy(best).float()


def miou_drop(best: float, current: float) -> float:
    """Points (percent) the current validation mIoU lies below the best; 0 before any best (``best < 0``)."""
    if best < 0 or current != current:
        return 0.0
    return max(0.0, 100.0 * (best - current))


def collapsed_classes(pseudo_share: torch.Tensor, labeled_share: torch.Tensor, min_share: float) -> list[int]:
    """Classes present in the labeled data whose pseudo-label share fell below ``min_share`` x their labeled share.

    Args:
        pseudo_share: ``(K,)`` share of kept pseudo-labels per class.
        labeled_share: ``(K,)`` share of labeled pixels per class.
        min_share: Fraction of the labeled share under which a class counts as collapsed (0 disables the check).

    Returns:
        Sorted class indices.
    """
    if min_share <= 0:
        return []
    pseudo_share, labeled_share = pseudo_share.float().cpu(), labeled_share.float().cpu()
    low = (labeled_share > 0) & (pseudo_share < min_share * labeled_share)
    return [int(k) for k in torch.nonzero(low).flatten()]


def dominant_class(
    pseudo_share: torch.Tensor,
    pseudo_conf: torch.Tensor,
    labeled_share: torch.Tensor,
    max_share: float,
    min_conf: float,
) -> int | None:
    """The class that took (almost) every pseudo-label at a high confidence although the labeled data say otherwise.

    Args:
        pseudo_share: ``(K,)`` share of kept pseudo-labels per class.
        pseudo_conf: ``(K,)`` mean teacher confidence of each class's kept pixels (NaN where absent).
        labeled_share: ``(K,)`` share of labeled pixels per class.
        max_share: Share of the kept pseudo-labels above which one class dominates (0 disables the check).
        min_conf: Mean confidence the dominant class needs (an unsure teacher that favours a class has not
            collapsed onto it).

    Returns:
        The class whose share exceeds ``max_share`` with a mean confidence of at least ``min_conf`` while its
        labeled share is below ``max_share``; None when there is none.
    """
    if max_share <= 0:
        return None
    pseudo_share, pseudo_conf = pseudo_share.float().cpu(), pseudo_conf.float().cpu()
    k = int(pseudo_share.argmax())
    conf = float(pseudo_conf[k])
    if pseudo_share[k] > max_share and conf >= min_conf and float(labeled_share[k]) < max_share:
        return k
    return None
