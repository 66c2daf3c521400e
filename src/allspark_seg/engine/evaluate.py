"""Inference (whole image, sliding window, flip and multi-scale TTA) and evaluation on a validation loader.

Every inference function returns softmax **probabilities** ``(B, K, H, W)`` in float32 at the input size.

Sliding window, two variants (method doc 1.12, Q18):

- ``shift_edges=True`` (default): windows start every ``stride`` pixels and the last one in each direction is
  shifted back inside the image, so every window has the full window size (one window covering the image when
  the image is smaller than the window). Probabilities are averaged over the windows that cover each pixel.
- ``shift_edges=False``: the official UniMatch/AllSpark windows: starts at 0, stride, 2*stride, ... while the start
  is inside the image, each window cut at the image border (edge windows shrink; on 1024x2048 with window 801
  and stride 534 there are 2x4 windows, the last ones 490 and 446 pixels wide).

The official code sums the probabilities without dividing by the per-pixel window count; since the count is the
same for every class of a pixel, the argmax, hence every metric, is identical.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from allspark_seg.constants import IGNORE_INDEX
from allspark_seg.errors import ConfigError, DataError
from allspark_seg.metrics import ConfusionMatrix, SegMetrics
from allspark_seg.utils import to_pair

__all__ = [
    "EVAL_MODES",
    "EvalResult",
    "evaluate",
    "infer",
    "slide_inference",
    "sliding_windows",
    "whole_inference",
]

logger = logging.getLogger(__name__)

EVAL_MODES = ("whole", "slide")

Size2 = int | tuple[int, int]


def _starts(size: int, window: int, stride: int, shift_edges: bool) -> list[tuple[int, int]]:
    """(start, end) of the windows along one axis."""
    if not shift_edges:
        return [(s, min(size, s + window)) for s in range(0, size, stride)]
    if size <= window:
        return [(0, size)]
    count = -(-(size - window) // stride) + 1  # ceil((size - window) / stride) + 1
    return [(min(i * stride, size - window), min(i * stride, size - window) + window) for i in range(count)]


def sliding_windows(
    h: int, w: int, window: Size2, stride: Size2, shift_edges: bool = True
) -> list[tuple[int, int, int, int]]:
    """Window coordinates of a sliding-window pass, row-major.

    Args:
        h: image height.
        w: image width.
        window: window size, an int or (height, width).
        stride: stride, an int or (height, width); must not exceed the window (no pixel left uncovered).
        shift_edges: shift the last windows back inside the image (full-size windows); False reproduces the
            official shrinking edge windows.

    Returns:
        ``[(y0, y1, x0, x1), ...]`` half-open ranges covering every pixel at least once.
    """
    wh, ww = to_pair(window, "the sliding window size")
    sh, sw = to_pair(stride, "the sliding window stride")
    if sh > wh or sw > ww:
        raise ConfigError(f"the sliding window stride {(sh, sw)} must not exceed the window {(wh, ww)}.")
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    rows = _starts(h, wh, sh, shift_edges)
    cols = _starts(w, ww, sw, shift_edges)
    return [(y0, y1, x0, x1) for y0, y1 in rows for x0, x1 in cols]


def _probs(model: nn.Module, image: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """Float32 softmax of the model's logits, resized to the input size if needed; ``(B, K, h, w)``."""
    logits = model(image)
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ConfigError(f"the model predicts {logits.shape[1]} classes but num_classes is {num_classes}.")
    if logits.shape[-2:] != image.shape[-2:]:
        logits = F.interpolate(logits.float(), size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits.float().softmax(dim=1)


def whole_inference(model: nn.Module, image: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Whole-image inference.

    Args:
        model: segmentor in eval mode, ``model(x (B, 3, H, W)) -> logits (B, K, H, W)``.
        image: ``(B, 3, H, W)`` normalised images.
        num_classes: expected K, checked when given.

    Returns:
        ``(B, K, H, W)`` float32 probabilities.
    """
    return _probs(model, image, num_classes)


def slide_inference(
    model: nn.Module,
    image: torch.Tensor,
    num_classes: int,
    window: Size2,
    stride: Size2,
    shift_edges: bool = True,
) -> torch.Tensor:
    """Sliding-window inference, one window (of the whole batch) per forward.

    Args:
        model: segmentor in eval mode.
        image: ``(B, 3, H, W)`` normalised images.
        num_classes: K.
        window: window size, int or (height, width).
        stride: stride, int or (height, width).
        shift_edges: see :func:`sliding_windows`.

    Returns:
        ``(B, K, H, W)`` float32 probabilities averaged over the windows covering each pixel.
    """
    b, _, h, w = image.shape
    total = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for y0, y1, x0, x1 in sliding_windows(h, w, window, stride, shift_edges):
        total[:, :, y0:y1, x0:x1] += _probs(model, image[:, :, y0:y1, x0:x1], num_classes)
        count[:, :, y0:y1, x0:x1] += 1.0
    return total / count


def infer(
    model: nn.Module,
    image: torch.Tensor,
    num_classes: int,
    mode: str = "whole",
    window: Size2 | None = None,
    stride: Size2 | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    shift_edges: bool = True,
) -> torch.Tensor:
    """Inference with optional test-time augmentation (horizontal flip and multi-scale).

    For each scale the image is resized (bilinear, ``align_corners=False``; side = round(side * scale)), inferred
    (and inferred flipped when ``flip``), and the probabilities are resized back to the input size; the result is
    the mean over all ``len(scales) * (1 + flip)`` passes.

    Args:
        model: segmentor in eval mode.
        image: ``(B, 3, H, W)`` normalised images.
        num_classes: K.
        mode: ``"whole"`` or ``"slide"``.
        window: sliding window size (slide mode).
        stride: sliding window stride (slide mode).
        flip: add horizontally flipped passes.
        scales: image scale factors.
        shift_edges: see :func:`sliding_windows`.

    Returns:
        ``(B, K, H, W)`` float32 averaged probabilities.
    """
    _check_mode(mode, window, stride, scales)
    h, w = image.shape[-2:]
    total: torch.Tensor | None = None
    passes = 0
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            if mode == "slide":
                probs = slide_inference(model, x, num_classes, window, stride, shift_edges)
            else:
                probs = whole_inference(model, x, num_classes)
            if flipped:
                probs = probs.flip(-1)
            if size != (h, w):
                probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
            total = probs if total is None else total + probs
            passes += 1
    return total / passes


def _check_mode(mode: str, window: Size2 | None, stride: Size2 | None, scales: Sequence[float]) -> None:
    if mode not in EVAL_MODES:
        raise ConfigError(f"unknown evaluation mode {mode!r}; valid modes are {', '.join(map(repr, EVAL_MODES))}.")
    if mode == "slide" and (window is None or stride is None):
        raise ConfigError("sliding-window evaluation needs both a window size and a stride.")
    if len(scales) == 0 or any(s <= 0 for s in scales):
        raise ConfigError(f"test-time scales must be a non-empty list of positive numbers, got {list(scales)}.")


@dataclass(frozen=True)
class EvalResult:
    """Outcome of :func:`evaluate`.

    Attributes:
        metrics: the metrics, all-reduced over processes.
        num_images: images evaluated (over all processes).
        seconds: wall time of the evaluation on this process.
    """

    metrics: SegMetrics
    num_images: int
    seconds: float


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    num_classes: int,
    *,
    mode: str = "whole",
    window: Size2 | None = None,
    stride: Size2 | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    shift_edges: bool = True,
    device: torch.device | str | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> EvalResult:
    """Evaluate a segmentor on a validation loader.

    The model is put in eval mode (its previous mode is restored afterwards) and run under
    ``torch.inference_mode()``. Predictions are the argmax of :func:`infer`'s probabilities. The confusion matrix
    stays on ``device`` and is all-reduced once at the end when ``torch.distributed`` is initialised, so every
    process must call this with its own shard of the validation set; the returned metrics are global.

    Args:
        model: segmentor; a ``DistributedDataParallel`` wrapper is looked through (its forward would run
            collectives per image).
        loader: yields dicts with ``image (B, 3, H, W)`` float and ``mask (B, H, W)`` integer (255 = ignore);
            B is usually 1, larger batches need images of the same size.
        num_classes: K.
        mode: ``"whole"`` or ``"slide"``.
        window: sliding window size (slide mode).
        stride: sliding window stride (slide mode).
        flip: horizontal-flip TTA.
        scales: multi-scale TTA factors.
        shift_edges: see :func:`sliding_windows`.
        device: where to run; defaults to the device of the model's parameters.
        ignore_index: mask value that is skipped.

    Returns:
        :class:`EvalResult` with the metrics, the number of images and the seconds taken.
    """
    _check_mode(mode, window, stride, scales)
    if mode == "slide":
        sliding_windows(1, 1, window, stride)  # validate window and stride before the first batch
    if isinstance(model, nn.parallel.DistributedDataParallel):
        # Its forward may broadcast buffers (a collective per image), which hangs on uneven validation shards.
        model = model.module
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in loader:
                if not isinstance(batch, Mapping) or "image" not in batch or "mask" not in batch:
                    raise DataError("validation batches must be dicts with an 'image' and a 'mask'.")
                image = batch["image"].to(device, non_blocking=True)
                mask = batch["mask"].to(device, non_blocking=True)
                if image.dim() == 3:  # an unbatched sample
                    image = image.unsqueeze(0)
                if mask.dim() == 2:
                    mask = mask.unsqueeze(0)
                probs = infer(model, image, num_classes, mode, window, stride, flip, scales, shift_edges)
                confusion.update(probs.argmax(dim=1), mask.long())
            confusion.all_reduce()
            metrics = confusion.compute()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    tta = f", flip={flip}, scales={tuple(scales)}" if flip or tuple(scales) != (1.0,) else ""
    logger.info(
        "evaluated %d images in %.1f s (%s%s): mIoU %.2f%%",
        metrics.num_images,
        seconds,
        mode,
        tta,
        100.0 * metrics.miou,
    )
    return EvalResult(metrics=metrics, num_images=metrics.num_images, seconds=seconds)
