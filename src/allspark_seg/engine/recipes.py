"""The training steps, as this module named them before they moved to :mod:`allspark_seg.methods` (re-exported).

Each method is one object there (:class:`allspark_seg.methods.Method`: its config defaults and its step); the steps
and their pieces are in :mod:`allspark_seg.methods.steps`.
"""

from __future__ import annotations

from ..constants import IGNORE_INDEX as IGNORE
from ..methods.registry import RECIPES
from ..methods.steps import (
    Batch,
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
from ..methods.steps import Step as Recipe

__all__ = [
    "IGNORE",
    "RECIPES",
    "Batch",
    "Recipe",
    "StepContext",
    "StepOutput",
    "class_thresholds",
    "cutmix",
    "ema_update",
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
