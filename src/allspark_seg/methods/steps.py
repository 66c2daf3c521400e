"""The training steps of the methods: the forward passes and the loss of one micro-step, and their pieces.

A step takes the labeled and unlabeled batches and returns the loss to back-propagate (the loop does backward and
the optimiser). :mod:`allspark_seg.methods.registry` says which method runs which step.

:func:`supervised_step`: labeled images only. :func:`self_training_step` (``selftrain`` and ``allspark``, the
official recipe, method doc 1.1): a teacher pass of the same model in eval mode on the unlabeled batch, hard argmax
pseudo-labels, one student forward on labeled plus unlabeled images, ``loss = (loss_x + loss_u) / 2``; for
``allspark`` the teacher logits drive the channel grouping and memory update, and the memory is read after the
warm-up. Options on top (off for the faithful recipes): EMA teacher, confidence threshold, ignoring padded pixels,
per-image teacher predictions.

:func:`weak_to_strong_step` (``fixmatch``, ``unimatch`` and ``allspark+``, UniMatch's weak-to-strong consistency):
the teacher (EMA model, or the student in eval mode) labels the weak view; the student learns those pseudo-labels on
``semi.strong_views`` strong views, each CutMixed with its batch neighbour (``torch.roll`` by one along the batch
stands in for UniMatch's second unlabeled loader), and optionally on the weak view decoded from perturbed features
(``semi.feature_perturbation``). With the AllSpark block (``allspark+``) the teacher logits, mixed exactly as the
images are, are the guide maps of the channel grouping, so the memory groups each channel against maps aligned with
the image the student sees. See ``docs/recipes.md``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import IGNORE_INDEX
from ..utils import upcast

if TYPE_CHECKING:  # annotations only: the config package imports this one
    from ..config.schema import RunConfig, SemiConfig

__all__ = [
    "EMA_BUFFERS",
    "Batch",
    "Step",
    "StepContext",
    "StepOutput",
    "class_thresholds",
    "cutmix",
    "ema_update",
    "make_ema",
    "oversized_classes",
    "pseudo_labels",
    "reads_memory",
    "self_training_step",
    "semi_loss",
    "supervised_step",
    "teacher_logits",
    "unsup_loss",
    "unsup_scale",
    "weak_to_strong_step",
]

#: A batch from the data loaders: ``image``, ``mask``, the strong views and CutMix boxes, ``ignore`` (padding).
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
        step: The optimiser step being taken (set by the loop; drives ``semi.unsup_start``/``unsup_rampup``).
        area_cap: ``(K,)`` per-class share above which an image's pseudo-labels of the class are ignored
            (``semi.area_cap`` times :func:`~allspark_seg.engine.diagnostics.largest_crop_share`), or None.
    """

    cfg: RunConfig
    net: nn.Module
    teacher: nn.Module | None
    criterion_l: nn.Module
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    channels_last: bool = False
    step: int = 0
    area_cap: torch.Tensor | None = None

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


class Step(Protocol):
    """A method's training step: one micro-step's forwards and loss (``use_memory``: the warm-up is over)."""

    def __call__(self, ctx: StepContext, batch_l: Batch, batch_u: Batch | None, *, use_memory: bool) -> StepOutput:
        """Forward the batches and return the loss with its logs."""
        ...


def supervised_step(ctx: StepContext, batch_l: Batch, batch_u: Batch | None, *, use_memory: bool) -> StepOutput:
    """Labeled images only (the paper's SupBaseline)."""
    x, y = ctx.images(batch_l), batch_l["mask"].to(ctx.device, non_blocking=True)
    with ctx.autocast():
        logits, _ = ctx.net(x)
    loss = ctx.criterion_l(upcast(logits), y)
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
            return upcast(net(x_u, coupled=not ctx.cfg.semi.per_image_teacher))
    finally:
        net.train(was_training)


def pseudo_labels(
    logits: torch.Tensor,
    conf_thresh: float = 0.0,
    ignore: torch.Tensor | None = None,
    class_thresh: bool = False,
    area_cap: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels from teacher logits.

    Args:
        logits: ``(B, K, H, W)``.
        conf_thresh: Pixels whose top probability is below it are marked 255.
        ignore: Optional ``(B, H, W)`` bool, True on padding; those pixels are marked 255.
        class_thresh: Threshold each pixel at its class's :func:`class_thresholds` instead of ``conf_thresh``.
        area_cap: Optional ``(K,)`` largest plausible share of an image per class (``semi.area_cap``): in an image
            where the teacher's arg max gives class ``c`` more of the valid pixels than ``area_cap[c]``, the pixels
            of ``c`` are marked 255.

    Returns:
        ``(labels (B, H, W) int64, confidence (B, H, W), valid (B, H, W) bool)`` where ``valid`` excludes only the
        padding (the denominator of the unlabeled loss).
    """
    confidence, labels = logits.softmax(dim=1).max(dim=1)
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore is None else ~ignore
    if conf_thresh <= 0:
        keep = valid
    elif class_thresh:
        thresholds = class_thresholds(confidence, labels, valid, conf_thresh, logits.shape[1])
        keep = valid & (confidence >= thresholds[labels])
    else:
        keep = valid & (confidence >= conf_thresh)
    if area_cap is not None:
        keep = keep & ~oversized_classes(labels, valid, area_cap).gather(1, labels.flatten(1)).view_as(labels)
    return labels.masked_fill(~keep, IGNORE_INDEX), confidence, valid


def oversized_classes(labels: torch.Tensor, valid: torch.Tensor, area_cap: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` bool: class ``c`` covers more than ``area_cap[c]`` of image ``b``'s valid pixels.

    Args:
        labels: ``(B, H, W)`` arg max classes.
        valid: ``(B, H, W)`` bool, False on padding.
        area_cap: ``(K,)`` shares.
    """
    num_classes = area_cap.shape[0]
    bins = torch.where(valid, labels, num_classes).flatten(1)
    counts = torch.zeros(labels.shape[0], num_classes + 1, device=labels.device).scatter_add_(
        1, bins, torch.ones_like(bins, dtype=torch.float32)
    )[:, :num_classes]
    share = counts / valid.flatten(1).sum(1, keepdim=True).clamp_min(1)
    return share > area_cap.to(share.device)


def class_thresholds(
    confidence: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, conf_thresh: float, num_classes: int
) -> torch.Tensor:
    """Per-class thresholds ``conf_thresh * m_c / max_k m_k`` (``semi.class_thresh``).

    ``m_c`` is the mean confidence of the valid pixels predicted as class ``c`` in the batch; a class predicted
    nowhere keeps ``conf_thresh``. Sync-free: fixed-size scatters, ignored pixels go to a spill bin.

    Args:
        confidence: ``(B, H, W)`` top softmax probability.
        labels: ``(B, H, W)`` argmax classes.
        valid: ``(B, H, W)`` bool, False on padding.
        conf_thresh: The global threshold.
        num_classes: K.

    Returns:
        ``(K,)`` thresholds, each in ``(0, conf_thresh]``.
    """
    bins = torch.where(valid, labels, num_classes).reshape(-1)
    conf = confidence.reshape(-1).float()
    sums = conf.new_zeros(num_classes + 1).scatter_add_(0, bins, conf)[:num_classes]
    counts = conf.new_zeros(num_classes + 1).scatter_add_(0, bins, torch.ones_like(conf))[:num_classes]
    mean = sums / counts.clamp_min(1.0)
    scaled = conf_thresh * mean / mean.max().clamp_min(torch.finfo(mean.dtype).tiny)
    return torch.where(counts > 0, scaled, torch.full_like(mean, conf_thresh))


def unsup_scale(semi: SemiConfig, step: int) -> float:
    """Multiplier of ``semi.unsup_weight`` at optimiser step ``step``.

    0 before ``semi.unsup_start``; then ``exp(-5 (1 - t)^2)`` with ``t`` rising linearly from 0 to 1 over
    ``semi.unsup_rampup`` steps (Laine & Aila's ramp, used by the mean teacher); 1 afterwards.
    """
    if step < semi.unsup_start:
        return 0.0
    if semi.unsup_rampup <= 0:
        return 1.0
    t = min(1.0, (step - semi.unsup_start) / semi.unsup_rampup)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def semi_loss(semi: SemiConfig, step: int, loss_x: torch.Tensor, loss_u: torch.Tensor) -> torch.Tensor:
    """The loss of a semi-supervised step: ``(loss_x + unsup_weight * unsup_scale * loss_u) / 2``.

    Before ``semi.unsup_start`` (labels only) it is ``loss_x``, the step of a supervised run, not half of it;
    ``loss_u`` stays in the graph with weight 0, so every parameter still gets a gradient (DDP) and a non-finite
    ``loss_u`` is still caught. From ``unsup_start`` on, the official ``/ 2`` (bit for bit when ``unsup_start`` is 0).

    Args:
        semi: The run's ``semi`` section.
        step: The optimiser step being taken.
        loss_x: Scalar labeled loss.
        loss_u: Scalar unlabeled loss.
    """
    if step < semi.unsup_start:
        return loss_x + 0.0 * loss_u
    return (loss_x + semi.unsup_weight * unsup_scale(semi, step) * loss_u) / 2


def unsup_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on pseudo-labels, summed over kept pixels and divided by the valid (non-padded) pixels.

    With every pixel kept this is the mean cross-entropy of the official code; with a confidence threshold it is
    UniMatch's normalisation (unconfident pixels count in the denominator).
    """
    per_pixel = F.cross_entropy(upcast(logits), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return per_pixel.sum() / valid.sum().clamp_min(1)


def self_training_step(ctx: StepContext, batch_l: Batch, batch_u: Batch | None, *, use_memory: bool) -> StepOutput:
    """The official AllSpark / self-training iteration (method doc 1.1) with the optional fixes."""
    assert batch_u is not None
    semi = ctx.cfg.semi
    x_l, y_l = ctx.images(batch_l), batch_l["mask"].to(ctx.device, non_blocking=True)
    x_u = ctx.images(batch_u)
    guide = teacher_logits(ctx, x_u)
    ignore = batch_u["ignore"].to(ctx.device) if semi.ignore_padding and "ignore" in batch_u else None
    labels, confidence, valid = pseudo_labels(guide, semi.conf_thresh, ignore, semi.class_thresh, ctx.area_cap)
    allspark = ctx.cfg.model.allspark.enabled
    with ctx.autocast():
        logits_l, logits_u = ctx.net(
            x_l, x_u, guide_logits=guide if allspark else None, use_memory=reads_memory(ctx.cfg, use_memory)
        )
    loss_x = ctx.criterion_l(upcast(logits_l), y_l)
    loss_u = unsup_loss(logits_u, labels, valid)
    loss = semi_loss(semi, ctx.step, loss_x, loss_u)
    logs = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach()}
    target_u = batch_u["mask"].to(ctx.device) if "mask" in batch_u else None
    return StepOutput(loss, logs, labels, confidence, target_u)


def reads_memory(cfg: RunConfig, use_memory: bool) -> bool:
    """Whether the student reads the Semantic Memory: after the warm-up, when the model has a block with memory."""
    block = cfg.model.allspark
    return bool(use_memory and block.enabled and block.memory)


def cutmix(box: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Paste each sample's batch neighbour inside its CutMix box (UniMatch's CutMix with a rolled mix partner).

    Sample ``i`` receives sample ``i - 1`` (``torch.roll(t, 1, 0)``; sample 0 receives the last one) where
    ``box[i]`` is True. Images, pseudo-labels, confidences, padding masks and guide maps mixed with the same box stay
    aligned. With a batch of one the partner is the sample itself and nothing changes.

    Args:
        box: ``(B, H, W)`` bool.
        *tensors: ``(B, H, W)`` or ``(B, C, H, W)`` tensors.

    Returns:
        The mixed tensors, in order.
    """
    mixed = []
    for t in tensors:
        where = box if t.ndim == 3 else box.unsqueeze(1)
        mixed.append(torch.where(where, t.roll(1, dims=0), t))
    return mixed


def weak_to_strong_step(ctx: StepContext, batch_l: Batch, batch_u: Batch | None, *, use_memory: bool) -> StepOutput:
    """FixMatch / UniMatch / AllSpark+ iteration on the ``unimatch`` pipeline's views.

    1. The teacher labels the weak view ``image``: logits ``g`` ``(B_u, K, H, W)``, pseudo-labels thresholded at
       ``semi.conf_thresh`` and padding ignored (``semi.ignore_padding``).
    2. Each of the ``semi.strong_views`` strong views ``image_s{v}`` is CutMixed with its batch neighbour inside
       ``cutmix_box{v}`` (``semi.cutmix``), and so are its pseudo-labels, padding mask and guide maps.
    3. One student forward on ``[x_l; (x_w); x_s1; (x_s2)]``; with ``semi.feature_perturbation`` the weak view is
       decoded from maps through ``Dropout2d(semi.fp_dropout)``. The AllSpark block, if any, gets the (mixed)
       teacher logits of exactly the unlabeled images it sees as guide maps.
    4. ``loss_u`` = mean over strong views of their losses, or ``(mean_strong + loss_fp) / 2`` with the perturbed
       stream (UniMatch V1: 0.25 / 0.25 / 0.5 with two views); ``loss = (loss_x + unsup_weight * loss_u) / 2``.
       Unlabeled losses use UniMatch's normalisation (:func:`unsup_loss`).
    """
    assert batch_u is not None
    semi = ctx.cfg.semi
    x_l, y_l = ctx.images(batch_l), batch_l["mask"].to(ctx.device, non_blocking=True)
    x_w = ctx.images(batch_u)
    guide = teacher_logits(ctx, x_w)  # (B_u, K, H, W)
    ignore = batch_u["ignore"].to(ctx.device) if semi.ignore_padding and "ignore" in batch_u else None
    labels, confidence, valid = pseudo_labels(guide, semi.conf_thresh, ignore, semi.class_thresh, ctx.area_cap)

    images, targets, guides = [], [], []
    if semi.feature_perturbation:
        images.append(x_w)
        targets.append((labels, valid))
        guides.append(guide)
    for v in range(1, semi.strong_views + 1):
        x_s, lab, val, g = ctx.images(batch_u, f"image_s{v}"), labels, valid, guide
        if semi.cutmix:
            box = batch_u[f"cutmix_box{v}"].to(ctx.device)
            x_s, lab, val, g = cutmix(box, x_s, lab, val, g)
        images.append(x_s)
        targets.append((lab, val))
        guides.append(g)

    allspark = ctx.cfg.model.allspark.enabled
    fp = x_w.shape[0] if semi.feature_perturbation else 0
    with ctx.autocast():
        logits_l, logits_u = ctx.net(
            x_l,
            torch.cat(images),
            guide_logits=torch.cat(guides) if allspark else None,
            use_memory=reads_memory(ctx.cfg, use_memory),
            fp_images=fp,
            fp_rate=semi.fp_dropout,
        )
    losses = [unsup_loss(lg, lab, val) for lg, (lab, val) in zip(logits_u.chunk(len(images)), targets, strict=True)]
    loss_x = ctx.criterion_l(upcast(logits_l), y_l)
    strong = torch.stack(losses[1:] if fp else losses).mean()
    loss_u = (strong + losses[0]) / 2 if fp else strong
    loss = semi_loss(semi, ctx.step, loss_x, loss_u)
    logs = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "loss_s": strong.detach()}
    if fp:
        logs["loss_fp"] = losses[0].detach()
    target_u = batch_u["mask"].to(ctx.device) if "mask" in batch_u else None
    return StepOutput(loss, logs, labels, confidence, target_u)


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of the (unwrapped) model to serve as EMA teacher."""
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema.eval()


#: ``semi.ema_buffers``: what the EMA teacher does with the student's buffers at each update.
EMA_BUFFERS: tuple[str, ...] = ("copy", "average")


def _norm_statistics(model: nn.Module) -> set[str]:
    """Names of the float running statistics of the normalisation layers (BatchNorm, SyncBatchNorm) of ``model``."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            names.update(f"{prefix}.{key}" if prefix else key for key in ("running_mean", "running_var"))
    return names


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int, buffers: str = "copy") -> float:
    """``ema = d * ema + (1 - d) * model`` with ``d = min(1 - 1 / (step + 1), decay)`` for the parameters.

    The warm-up of ``d`` (as in UniMatch V2 and the mean-teacher literature) lets the teacher follow the student
    closely in the first steps. Buffers (``semi.ema_buffers``): ``copy`` takes every buffer from the student (the
    default); ``average`` averages the BatchNorm running means and variances like the weights (as timm's ``ModelEma``
    and UniMatch V2 do) and copies the rest: the counters and the Semantic Memory, a queue of features that averaging
    would blur into maps no image has.

    Args:
        ema: The teacher, updated in place.
        model: The unwrapped student.
        decay: ``semi.ema_decay``.
        step: The optimiser step just taken.
        buffers: ``copy`` or ``average``.

    Returns:
        The decay used.
    """
    if buffers not in EMA_BUFFERS:
        raise ValueError(f"buffers={buffers!r}: choose one of {', '.join(EMA_BUFFERS)}")
    d = min(1.0 - 1.0 / (step + 1), decay)
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - d)
    averaged = _norm_statistics(ema) if buffers == "average" else set()
    for (name, e), b in zip(ema.named_buffers(), model.buffers(), strict=True):
        if name in averaged:
            e.lerp_(b, 1.0 - d)
        else:
            e.copy_(b)
    return d
