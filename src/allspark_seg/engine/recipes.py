"""One training step per method: the forward passes and the loss (the loop does backward and the optimiser).

``supervised``: labeled images only. ``selftrain`` and ``allspark`` (the official recipe, method doc 1.1): a teacher
pass of the same model in eval mode on the unlabeled batch, hard argmax pseudo-labels, one student forward on
labeled plus unlabeled images, ``loss = (loss_x + loss_u) / 2``; for ``allspark`` the teacher logits drive the
channel grouping and memory update, and the memory is read after the warm-up. Options on top (off for the
faithful recipes): EMA teacher, confidence threshold, ignoring padded pixels, per-image teacher predictions.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig

__all__ = [
    "RECIPES",
    "StepContext",
    "StepOutput",
    "ema_update",
    "make_ema",
    "pseudo_labels",
    "self_training_step",
    "supervised_step",
    "teacher_logits",
    "unsup_loss",
]

IGNORE = 255
Batch = dict[str, Any]


@dataclass
class StepContext:
    """What a step needs.

    Attributes:
        cfg: The resolved run config.
        net: The module to call for training forwards (DDP-wrapped when distributed).
        teacher: EMA teacher (unwrapped), or None when the student itself (in eval mode) is the teacher.
        criterion_l: Labeled loss, ``(logits, target) -> scalar``.
        autocast: Factory of the mixed-precision context.
        device: Where tensors go.
        channels_last: Move images to channels-last memory format.
    """

    cfg: RunConfig
    net: nn.Module
    teacher: nn.Module | None
    criterion_l: nn.Module
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    channels_last: bool = False

    def images(self, batch: Batch, key: str = "image") -> torch.Tensor:
        """An image batch on the device (and in channels-last when asked)."""
        x = batch[key].to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass
class StepOutput:
    """Result of one micro-step.

    Attributes:
        loss: The scalar to back-propagate.
        logs: Detached scalar tensors to log (no host synchronisation until the loop logs them).
        pseudo: Pseudo-labels ``(B_u, H, W)`` int64 with 255 where ignored, for diagnostics.
        confidence: Teacher confidence ``(B_u, H, W)``.
        target_u: Ground truth of the unlabeled images ``(B_u, H, W)`` when the dataset has it (diagnostics only).
    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    pseudo: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    target_u: torch.Tensor | None = None


def supervised_step(ctx: StepContext, batch_l: Batch, batch_u: Batch | None, *, use_memory: bool) -> StepOutput:
    """Labeled images only (the paper's SupBaseline)."""
    x, y = ctx.images(batch_l), batch_l["mask"].to(ctx.device, non_blocking=True)
    with ctx.autocast():
        logits, _ = ctx.net(x)
    loss = ctx.criterion_l(logits.float(), y)
    return StepOutput(loss, {"loss": loss.detach(), "loss_x": loss.detach()})


@torch.no_grad()
def teacher_logits(ctx: StepContext, x_u: torch.Tensor) -> torch.Tensor:
    """Teacher prediction on the unlabeled batch: the EMA model or the student itself, in eval mode.

    Batch-coupled (official) unless ``semi.per_image_teacher`` is on.
    """
    net = ctx.teacher if ctx.teacher is not None else ctx.net
    was_training = net.training
    net.eval()
    try:
        with ctx.autocast():
            return net(x_u, coupled=not ctx.cfg.semi.per_image_teacher).float()
    finally:
        net.train(was_training)


def pseudo_labels(
    logits: torch.Tensor, conf_thresh: float = 0.0, ignore: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels from teacher logits.

    Args:
        logits: ``(B, K, H, W)``.
        conf_thresh: Pixels whose top probability is below it are marked 255.
        ignore: Optional ``(B, H, W)`` bool, True on padding; those pixels are marked 255.

    Returns:
        ``(labels (B, H, W) int64, confidence (B, H, W), valid (B, H, W) bool)`` where ``valid`` excludes only the
        padding (the denominator of the unlabeled loss).
    """
    confidence, labels = logits.softmax(dim=1).max(dim=1)
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore is None else ~ignore
    keep = valid & (confidence >= conf_thresh) if conf_thresh > 0 else valid
    return labels.masked_fill(~keep, IGNORE), confidence, valid


def unsup_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on pseudo-labels, summed over kept pixels and divided by the valid (non-padded) pixels.

    With every pixel kept this is the mean cross-entropy of the official code; with a confidence threshold it is
    UniMatch's normalisation (unconfident pixels count in the denominator).
    """
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
    return per_pixel.sum() / valid.sum().clamp_min(1)


def self_training_step(ctx: StepContext, batch_l: Batch, batch_u: Batch | None, *, use_memory: bool) -> StepOutput:
    """The official AllSpark / self-training iteration (method doc 1.1) with the optional fixes."""
    assert batch_u is not None
    semi = ctx.cfg.semi
    x_l, y_l = ctx.images(batch_l), batch_l["mask"].to(ctx.device, non_blocking=True)
    x_u = ctx.images(batch_u)
    guide = teacher_logits(ctx, x_u)
    ignore = batch_u["ignore"].to(ctx.device) if semi.ignore_padding and "ignore" in batch_u else None
    labels, confidence, valid = pseudo_labels(guide, semi.conf_thresh, ignore)
    allspark = ctx.cfg.model.allspark.enabled
    with ctx.autocast():
        logits_l, logits_u = ctx.net(
            x_l, x_u, guide_logits=guide if allspark else None, use_memory=use_memory and allspark
        )
    loss_x = ctx.criterion_l(logits_l.float(), y_l)
    loss_u = unsup_loss(logits_u, labels, valid)
    loss = (loss_x + semi.unsup_weight * loss_u) / 2
    logs = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach()}
    target_u = batch_u["mask"].to(ctx.device) if "mask" in batch_u else None
    return StepOutput(loss, logs, labels, confidence, target_u)


Recipe = Callable[..., StepOutput]
RECIPES: dict[str, Recipe] = {
    "supervised": supervised_step,
    "selftrain": self_training_step,
    "allspark": self_training_step,
}


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of the (unwrapped) model to serve as EMA teacher."""
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema.eval()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> float:
    """``ema = d * ema + (1 - d) * model`` with ``d = min(1 - 1 / (step + 1), decay)``; buffers are copied.

    The warm-up of ``d`` (as in UniMatch V2 and the mean-teacher literature) lets the teacher follow the student
    closely in the first steps. Returns the decay used.
    """
    d = min(1.0 - 1.0 / (step + 1), decay)
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - d)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)
    return d
