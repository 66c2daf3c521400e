"""Values shared by every layer of the package (data, losses, metrics, models, engine)."""

from __future__ import annotations

__all__ = ["IGNORE_INDEX"]

#: Label of pixels that carry no class: masks' "ignore" value, padding, and rejected pseudo-labels.
IGNORE_INDEX = 255
