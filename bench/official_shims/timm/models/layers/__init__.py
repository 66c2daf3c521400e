"""``DropPath``, ``to_2tuple`` and ``trunc_normal_`` as timm defines them, in plain PyTorch."""

from __future__ import annotations

import collections.abc
from typing import Any

import torch
from torch import nn

__all__ = ["DropPath", "drop_path", "to_2tuple", "trunc_normal_"]

trunc_normal_ = nn.init.trunc_normal_  # same signature and default bounds (-2, 2) as timm's


def to_2tuple(x: Any) -> tuple:
    """``x`` as a tuple: an iterable (not a string) as is, anything else twice."""
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
        return tuple(x)
    return (x, x)


def drop_path(
    x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True
) -> torch.Tensor:
    """Stochastic depth: zero whole samples of ``x`` (B, ...) with probability ``drop_prob`` and rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """timm's ``DropPath`` module (``drop_prob`` is read at every call)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)
