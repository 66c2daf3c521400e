"""Segmentation losses: cross-entropy with an ignore index, and the official OHEM cross-entropy.

Both losses take logits ``(B, K, H, W)`` and an int64 target ``(B, H, W)`` and return a scalar mean over the
pixels they keep. Unlike ``torch.nn.functional.cross_entropy``, they return 0 (with a gradient path to the
logits, all gradients zero) instead of NaN when every pixel is ignored, which happens with small crops of
sparsely labeled images. Neither synchronises with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from allspark_seg.constants import IGNORE_INDEX
from allspark_seg.errors import ConfigError

__all__ = ["LOSSES", "CrossEntropy", "OhemCrossEntropy", "build_loss", "cross_entropy", "ohem_keep_mask"]

LOSSES = ("ce", "ohem")


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose target is not ``ignore_index``.

    Args:
        logits: ``(B, K, H, W)`` raw scores.
        target: ``(B, H, W)`` int64 class ids.
        ignore_index: target value that is skipped.
        keep: optional ``(B, H, W)`` bool mask; pixels where it is False are skipped too.

    Returns:
        A scalar; 0 (not NaN), still attached to ``logits``, when no pixel is counted.
    """
    if keep is not None:
        target = target.masked_fill(~keep, ignore_index)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # a sum over millions of pixels needs float32 accumulation
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum()
    return total / count.clamp(min=1).to(total.dtype)


def ohem_keep_mask(
    logits: torch.Tensor,
    target: torch.Tensor,
    thresh: float = 0.7,
    min_kept: int = 200000,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Pixels selected by the official ``ProbOhemCrossEntropy2d`` (UniMatch/AllSpark ``util/ohem.py``).

    With p the softmax probability of the ground-truth class of each valid pixel and n the number of valid pixels:

    - if ``min_kept > n``: keep every valid pixel;
    - else if ``min_kept <= 0``: keep every valid pixel (the official code then skips the selection);
    - else: t = the ``min_kept``-th smallest p; threshold = t if t > ``thresh`` else ``thresh``; keep valid
      pixels with p <= threshold.

    The selection is over the whole batch, computed in float32 without a gradient and without host syncs.

    Args:
        logits: ``(B, K, H, W)`` raw scores.
        target: ``(B, H, W)`` int64 class ids.
        thresh: probability threshold.
        min_kept: minimum number of hardest pixels kept.
        ignore_index: target value that is skipped.

    Returns:
        ``(B, H, W)`` bool mask of the kept pixels (a subset of the valid ones).
    """
    with torch.no_grad():
        valid = target != ignore_index
        num_valid = valid.sum()
        probs = logits.detach().float().softmax(dim=1)
        # Ignored pixels get p = 1, as in the official code, so they sort last.
        p_gt = probs.gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1).masked_fill(~valid, 1.0)
        if min_kept <= 0:
            return valid
        flat = p_gt.reshape(-1)
        kth = torch.kthvalue(flat, min(flat.numel(), int(min_kept))).values
        threshold = torch.where(kth > thresh, kth, torch.full_like(kth, float(thresh)))
        keep_all = num_valid < min_kept
        return valid & (keep_all | (p_gt <= threshold))


def _check_ohem(thresh: float, min_kept: int) -> None:
    if not 0.0 <= float(thresh) <= 1.0:
        raise ConfigError(f"OHEM thresh must be a probability in [0, 1], got {thresh}.")
    if int(min_kept) != min_kept or min_kept < 0:
        raise ConfigError(f"OHEM min_kept must be a non-negative integer, got {min_kept}.")


class CrossEntropy(nn.Module):
    """Module form of :func:`cross_entropy`.

    Args:
        ignore_index: target value that is skipped.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``(B, K, H, W)`` logits against a ``(B, H, W)`` target; a scalar."""
        return cross_entropy(logits, target, self.ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"


class OhemCrossEntropy(nn.Module):
    """OHEM cross-entropy exactly as the official ``ProbOhemCrossEntropy2d`` (no class weights).

    The kept pixels are chosen by :func:`ohem_keep_mask`; the loss is the mean cross-entropy over them
    (0 when none is kept, where the official code returns NaN).

    Args:
        thresh: probability threshold (official Cityscapes value 0.7).
        min_kept: minimum number of hardest pixels kept per batch (official 200000).
        ignore_index: target value that is skipped.
    """

    def __init__(self, thresh: float = 0.7, min_kept: int = 200000, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        _check_ohem(thresh, min_kept)
        self.thresh = float(thresh)
        self.min_kept = int(min_kept)
        self.ignore_index = int(ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``(B, K, H, W)`` logits against a ``(B, H, W)`` target; a scalar."""
        keep = ohem_keep_mask(logits, target, self.thresh, self.min_kept, self.ignore_index)
        return cross_entropy(logits, target, self.ignore_index, keep=keep)

    def extra_repr(self) -> str:
        return f"thresh={self.thresh}, min_kept={self.min_kept}, ignore_index={self.ignore_index}"


def build_loss(name: str, ignore_index: int = IGNORE_INDEX, thresh: float = 0.7, min_kept: int = 200000) -> nn.Module:
    """Build a loss module by name.

    Args:
        name: ``"ce"`` (cross-entropy) or ``"ohem"`` (OHEM cross-entropy).
        ignore_index: target value that is skipped.
        thresh: OHEM probability threshold (ignored for ``"ce"``).
        min_kept: OHEM minimum number of kept pixels (ignored for ``"ce"``).

    Returns:
        A module called as ``loss(logits (B, K, H, W), target (B, H, W)) -> scalar``.
    """
    if name == "ce":
        return CrossEntropy(ignore_index)
    if name == "ohem":
        return OhemCrossEntropy(thresh, min_kept, ignore_index)
    raise ConfigError(f"unknown loss {name!r}; valid losses are {', '.join(repr(n) for n in LOSSES)}.")
