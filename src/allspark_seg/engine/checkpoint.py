"""Checkpoint files: the names of the old module path, now in :mod:`allspark_seg.engine.state` (the training state).

``atomic_save``, ``load_checkpoint``, ``find_resume``, ``capture_rng``, ``restore_rng``, ``LAST`` and ``BEST`` stay
importable from here.
"""

from __future__ import annotations

from .state import BEST, LAST, atomic_save, capture_rng, find_resume, load_checkpoint, restore_rng

__all__ = ["BEST", "LAST", "atomic_save", "capture_rng", "find_resume", "load_checkpoint", "restore_rng"]
