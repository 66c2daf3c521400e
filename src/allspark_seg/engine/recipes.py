"""The training steps, as this module named them before they moved to :mod:`allspark_seg.methods` (re-exported).

Each method is one object there (:class:`allspark_seg.methods.Method`: its config defaults and its step); the steps
and their pieces are in :mod:`allspark_seg.methods.steps`.
"""

from __future__ import annotations

from ..constants import IGNORE_INDEX as IGNORE
from ..methods import steps
from ..methods.registry import RECIPES
from ..methods.steps import *  # noqa: F403 (the names this module had)
from ..methods.steps import Step as Recipe

__all__ = ["IGNORE", "RECIPES", "Recipe", *steps.__all__]
