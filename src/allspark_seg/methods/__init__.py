"""Training methods: each method one object (:class:`Method`: its config defaults and its step), and the steps.

``registry``: :class:`Method`, :data:`METHODS`, :func:`get_method`. ``steps``: the training step of each method and
its pieces (pseudo-labels, class thresholds, CutMix, the unlabeled loss and its ramp, the EMA teacher).
"""

from __future__ import annotations

from . import registry, steps
from .registry import *  # noqa: F403
from .steps import *  # noqa: F403

__all__ = [*registry.__all__, *steps.__all__]
