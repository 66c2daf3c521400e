"""Confusion matrix and IoU metrics for semantic segmentation.

Conventions:

- The confusion matrix is ``(K, K)`` int64 with **rows = ground truth, columns = prediction**.
- Every metric in :class:`SegMetrics` is a **fraction in [0, 1]**; only :meth:`SegMetrics.table` prints
  percentages (two decimals), as the papers report them.
- A class is *absent* when it appears neither in the ground truth nor in the prediction (union = 0). Its IoU is
  NaN, it is excluded from the mean, and the table shows it as ``absent``. The official AllSpark/UniMatch value,
  where every class counts and IoU = I / (U + 1e-10) (so an absent class counts as 0), is also reported as
  :attr:`SegMetrics.miou_official` for comparison with published numbers.
- Pixels whose target equals ``ignore_index`` are skipped. Pixels whose target or prediction is outside
  ``[0, K)`` (and not ignored) are not counted either; their number is reported as ``invalid_pixels`` and a warning
  is logged, since it usually means a wrong ``num_classes`` or label encoding.

Accumulation stays on the device of the inputs and never synchronises with the host: ``torch.bincount`` on the
CPU, and an atomic ``index_add_`` elsewhere (CUDA's ``bincount`` reads the input's min and max back to the host).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from allspark_seg.constants import IGNORE_INDEX
from allspark_seg.errors import ConfigError, DataError

__all__ = ["ConfusionMatrix", "SegMetrics", "metrics_from_confusion"]

logger = logging.getLogger(__name__)

# Extra counters stored after the K*K cells, so one all-reduce moves everything.
_IGNORED, _INVALID, _IMAGES = 0, 1, 2
_NUM_EXTRA = 3


@dataclass(frozen=True)
class SegMetrics:
    """Segmentation metrics computed from a confusion matrix; all values are fractions in [0, 1].

    Attributes:
        iou: per-class IoU, NaN for absent classes (in neither ground truth nor prediction).
        present: per-class flag, True when the class is in the ground truth or the prediction.
        miou: mean IoU over present classes (NaN when no class is present).
        miou_official: official AllSpark/UniMatch mIoU: mean over all K classes of I / (U + 1e-10).
        pixel_acc: correctly classified pixels / counted pixels.
        mean_acc: mean over classes with ground-truth pixels of the per-class recall.
        fw_iou: frequency-weighted IoU, sum over classes of (ground-truth share) x IoU.
        confusion: ``(K, K)`` int64 CPU tensor, rows = ground truth, columns = prediction.
        num_pixels: counted pixels (neither ignored nor invalid).
        ignored_pixels: pixels whose target was ``ignore_index``.
        invalid_pixels: non-ignored pixels with a target or prediction outside ``[0, K)``.
        num_images: images seen by :meth:`ConfusionMatrix.update`.
    """

    iou: tuple[float, ...]
    present: tuple[bool, ...]
    miou: float
    miou_official: float
    pixel_acc: float
    mean_acc: float
    fw_iou: float
    confusion: torch.Tensor
    num_pixels: int
    ignored_pixels: int
    invalid_pixels: int
    num_images: int

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.iou)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict:
        """JSON-serialisable summary (fractions; absent classes as ``None``).

        Args:
            class_names: K names used as keys of ``per_class``; defaults to the class indices as strings.

        Returns:
            A dict with the scalar metrics, ``per_class`` IoUs, the confusion matrix as nested lists and counts.
        """
        names = _check_names(class_names, self.num_classes)
        return {
            "miou": _json_float(self.miou),
            "miou_official": _json_float(self.miou_official),
            "pixel_acc": _json_float(self.pixel_acc),
            "mean_acc": _json_float(self.mean_acc),
            "fw_iou": _json_float(self.fw_iou),
            "per_class": {n: _json_float(v) for n, v in zip(names, self.iou, strict=True)},
            "absent_classes": [n for n, p in zip(names, self.present, strict=True) if not p],
            "num_pixels": self.num_pixels,
            "ignored_pixels": self.ignored_pixels,
            "invalid_pixels": self.invalid_pixels,
            "num_images": self.num_images,
            "confusion": self.confusion.tolist(),
        }

    def table(self, class_names: Sequence[str] | None = None) -> str:
        """Plain-text table of per-class IoU and the summary metrics, in percent with two decimals.

        Args:
            class_names: K names; defaults to the class indices.

        Returns:
            A multi-line string; absent classes read ``absent``.
        """
        names = _check_names(class_names, self.num_classes)
        width = max([len("official mIoU (absent = 0)")] + [len(n) for n in names])
        lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
        for name, iou, present in zip(names, self.iou, self.present, strict=True):
            value = f"{100.0 * iou:7.2f}" if present else " absent"
            lines.append(f"{name:<{width}}  {value}")
        lines.append("-" * (width + 9))
        n_absent = self.present.count(False)
        summary = [
            (f"mIoU ({self.num_classes - n_absent}/{self.num_classes} cls)", self.miou),
            ("official mIoU (absent = 0)", self.miou_official),
            ("pixel accuracy", self.pixel_acc),
            ("mean class accuracy", self.mean_acc),
            ("frequency-weighted IoU", self.fw_iou),
        ]
        lines += [f"{label:<{width}}  {_pct(value)}" for label, value in summary]
        return "\n".join(lines)


def _pct(value: float) -> str:
    return "    nan" if math.isnan(value) else f"{100.0 * value:7.2f}"


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _check_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ConfigError(f"{len(class_names)} class names were given for {num_classes} classes.")
    return [str(n) for n in class_names]


def metrics_from_confusion(
    confusion: torch.Tensor, ignored_pixels: int = 0, invalid_pixels: int = 0, num_images: int = 0
) -> SegMetrics:
    """Compute :class:`SegMetrics` from a confusion matrix.

    Args:
        confusion: ``(K, K)`` integer tensor, rows = ground truth, columns = prediction.
        ignored_pixels: reported as is.
        invalid_pixels: reported as is.
        num_images: reported as is.

    Returns:
        The metrics, as fractions, computed in float64.
    """
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square matrix, got shape {tuple(confusion.shape)}")
    cm = confusion.detach().to("cpu", torch.int64)
    m = cm.double()
    tp = m.diagonal()
    gt = m.sum(1)
    pred = m.sum(0)
    union = gt + pred - tp
    total = m.sum()
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    nan = math.nan
    miou = iou[present].mean().item() if bool(present.any()) else nan
    miou_official = (tp / (union + 1e-10)).mean().item()
    has_gt = gt > 0
    mean_acc = (tp[has_gt] / gt[has_gt]).mean().item() if bool(has_gt.any()) else nan
    pixel_acc = (tp.sum() / total).item() if total > 0 else nan
    fw_iou = (gt[present] / total * iou[present]).sum().item() if total > 0 else nan
    return SegMetrics(
        iou=tuple(iou.tolist()),
        present=tuple(bool(p) for p in present.tolist()),
        miou=miou,
        miou_official=miou_official,
        pixel_acc=pixel_acc,
        mean_acc=mean_acc,
        fw_iou=fw_iou,
        confusion=cm,
        num_pixels=int(total.item()),
        ignored_pixels=int(ignored_pixels),
        invalid_pixels=int(invalid_pixels),
        num_images=int(num_images),
    )


def _bincount_into(counts: torch.Tensor, index: torch.Tensor) -> None:
    """``counts[i] += (index == i).sum()`` with ``torch.bincount`` (CPU; syncs on CUDA)."""
    counts += torch.bincount(index, minlength=counts.numel())


def _index_add_into(counts: torch.Tensor, index: torch.Tensor) -> None:
    """``counts[i] += (index == i).sum()`` with an atomic ``index_add_`` (no host sync on any device)."""
    counts.index_add_(0, index, torch.ones((), dtype=counts.dtype, device=counts.device).expand_as(index))


class ConfusionMatrix:
    """A ``(K, K)`` int64 confusion matrix accumulated on the device of its inputs.

    Args:
        num_classes: K.
        ignore_index: target value that is skipped.
        device: where to keep the counts; by default the device of the first :meth:`update`'s inputs.

    Example:
        >>> cm = ConfusionMatrix(3)
        >>> cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 2]]))
        >>> cm.compute().pixel_acc
        0.5
    """

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None
    ) -> None:
        if int(num_classes) < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self._device = torch.device(device) if device is not None else None
        self._counts: torch.Tensor | None = None
        self._reduced = False

    @property
    def device(self) -> torch.device | None:
        """Device of the counts (None until the first update when no device was given)."""
        return self._device

    def _buffer(self, device: torch.device) -> torch.Tensor:
        if self._counts is None:
            self._device = self._device or device
            size = self.num_classes * self.num_classes + _NUM_EXTRA
            # A normal tensor even under torch.inference_mode(), so it can be updated or reduced outside it later.
            with torch.inference_mode(False):
                self._counts = torch.zeros(size, dtype=torch.int64, device=self._device)
        return self._counts

    def _counts_or_zeros(self) -> torch.Tensor:
        if self._counts is not None:
            return self._counts
        return torch.zeros(self.num_classes * self.num_classes + _NUM_EXTRA, dtype=torch.int64, device=self._device)

    def reset(self) -> None:
        """Forget everything accumulated so far (keeps the device)."""
        self._counts = None
        self._reduced = False

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predictions.

        Args:
            pred: ``(B, H, W)`` or ``(H, W)`` integer class ids.
            target: same shape, integer class ids with ``ignore_index`` for unlabeled pixels.
        """
        if self._reduced:
            raise RuntimeError("ConfusionMatrix.update() called after all_reduce(); call reset() first")
        if pred.shape != target.shape:
            raise DataError(
                f"prediction shape {tuple(pred.shape)} does not match mask shape {tuple(target.shape)}; "
                "an image and its mask must have the same size."
            )
        if pred.dim() not in (2, 3):
            raise ValueError(f"pred must be (B, H, W) or (H, W), got shape {tuple(pred.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must hold integer class ids, not floats")
        num_images = pred.shape[0] if pred.dim() == 3 else 1
        counts = self._buffer(target.device)
        k = self.num_classes
        pred = pred.to(counts.device, torch.int64).reshape(-1)
        target = target.to(counts.device, torch.int64).reshape(-1)
        ignored = target == self.ignore_index
        in_range = (target >= 0) & (target < k) & (pred >= 0) & (pred < k)
        # Each pixel goes to its cell, or to one of the extra bins after the K*K cells.
        index = torch.where(in_range, target * k + pred, k * k + _INVALID)
        index = torch.where(ignored, k * k + _IGNORED, index)
        if counts.device.type == "cpu":
            _bincount_into(counts, index)
        else:
            _index_add_into(counts, index)
        counts[k * k + _IMAGES] += num_images

    @property
    def matrix(self) -> torch.Tensor:
        """The ``(K, K)`` int64 counts on their device (rows = ground truth, columns = prediction); a view."""
        k = self.num_classes
        return self._counts_or_zeros()[: k * k].view(k, k)

    def all_reduce(self) -> None:
        """Sum the counts over all processes when ``torch.distributed`` is initialised; a no-op otherwise.

        Call it once per evaluation, after the last update and on every process (it is a collective).
        """
        if self._reduced:
            raise RuntimeError("ConfusionMatrix.all_reduce() called twice; the counts would be summed again")
        counts = self._buffer(self._device or torch.device("cpu"))
        self._reduced = True
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        if dist.get_backend() == "nccl" and counts.device.type != "cuda":
            moved = counts.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            counts.copy_(moved)
        else:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)

    def compute(self) -> SegMetrics:
        """Metrics of everything accumulated so far (one device-to-host copy).

        Returns:
            :class:`SegMetrics` with fractions in [0, 1]; a warning is logged when invalid pixels were seen.
        """
        k = self.num_classes
        counts = self._counts_or_zeros().cpu()
        extra = counts[k * k :].tolist()
        if extra[_INVALID]:
            logger.warning(
                "%d pixels had a target or prediction outside [0, %d) and were not counted; check num_classes "
                "and the label encoding (ignore_index is %d).",
                extra[_INVALID],
                k,
                self.ignore_index,
            )
        return metrics_from_confusion(
            counts[: k * k].view(k, k),
            ignored_pixels=extra[_IGNORED],
            invalid_pixels=extra[_INVALID],
            num_images=extra[_IMAGES],
        )
