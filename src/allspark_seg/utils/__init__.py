"""Small helpers shared across the package."""

from __future__ import annotations

import torch

from allspark_seg.utils.sizes import to_pair

__all__ = ["to_pair", "upcast"]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32: half precision (autocast) is upcast, float32 and float64 are kept as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
