"""allspark-seg: semi-supervised semantic segmentation with AllSpark (CVPR 2024)."""

from __future__ import annotations

__version__ = "0.1.0"

from .models import AllSparkSegmentor, build_model

__all__ = ["AllSparkSegmentor", "__version__", "build_model"]
