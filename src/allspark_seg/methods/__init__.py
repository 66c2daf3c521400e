"""Training methods: each method one object (:class:`Method`: its config defaults and its step), and the steps.

``registry``: :class:`Method`, :data:`METHODS`, :func:`get_method`. ``steps``: the training step of each method and
its pieces (pseudo-labels, class thresholds, CutMix, the unlabeled loss and its ramp, the EMA teacher).
"""

from __future__ import annotations

from .registry import METHODS, RECIPES, WEAK_TO_STRONG, Method, SemiDefaults, get_method
from .steps import (
    Batch,
    Step,
    StepContext,
    StepOutput,
    class_thresholds,
    cutmix,
    ema_update,
    make_ema,
    pseudo_labels,
    reads_memory,
    self_training_step,
    supervised_step,
    teacher_logits,
    unsup_loss,
    unsup_scale,
    weak_to_strong_step,
)

__all__ = [
    "METHODS",
    "RECIPES",
    "WEAK_TO_STRONG",
    "Batch",
    "Method",
    "SemiDefaults",
    "Step",
    "StepContext",
    "StepOutput",
    "class_thresholds",
    "cutmix",
    "ema_update",
    "get_method",
    "make_ema",
    "pseudo_labels",
    "reads_memory",
    "self_training_step",
    "supervised_step",
    "teacher_logits",
    "unsup_loss",
    "unsup_scale",
    "weak_to_strong_step",
]
