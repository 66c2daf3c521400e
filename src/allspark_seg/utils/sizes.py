"""Sizes given as one int or a ``(height, width)`` pair."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from allspark_seg.errors import ConfigError

__all__ = ["to_pair"]


def to_pair(value: int | Sequence[int] | np.ndarray, name: str | None = None) -> tuple[int, int]:
    """Turn ``n`` or ``(h, w)`` into ``(h, w)`` ints.

    Args:
        value: an int (numpy integers too) or two of them (a sequence or array).
        name: how an error names the value, e.g. ``"Option 'window'"``. With a name the value is checked: both
            numbers must be positive integers (not bools). Without one it is trusted (already validated).

    Returns:
        ``(h, w)``.

    Raises:
        ConfigError: with ``name``, a value that is not a positive int or a pair of them.
    """
    if isinstance(value, (numbers.Integral, np.integer)):
        pair: tuple[Any, ...] = (value, value)
    elif isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str):
        pair = tuple(value)
    else:
        pair = ()
    if name is not None and (
        len(pair) != 2
        or not all(isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool) and v > 0 for v in pair)
    ):
        raise ConfigError(f"{name} must be a positive integer or a (height, width) pair of them, got {value!r}.")
    h, w = pair
    return int(h), int(w)
