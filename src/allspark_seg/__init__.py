"""allspark-seg: semi-supervised semantic segmentation with AllSpark (CVPR 2024).

``allspark_seg.load(checkpoint)`` returns a :class:`~allspark_seg.predictor.Predictor` (imported on first use, so
``import allspark_seg`` stays light); ``build_model`` builds a segmentor for training code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .models import AllSparkSegmentor, build_model

if TYPE_CHECKING:
    from .predictor import Predictor, load

__all__ = ["AllSparkSegmentor", "Predictor", "__version__", "build_model", "load"]

_LAZY = ("Predictor", "load")  # from .predictor, which imports the engine, data and config modules


def __getattr__(name: str) -> Any:
    """Import :mod:`allspark_seg.predictor` when ``load`` or ``Predictor`` is first used."""
    if name in _LAZY:
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
