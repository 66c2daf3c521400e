"""Shared fixtures: tiny models that run in milliseconds on a CPU."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from allspark_seg import build_model
from allspark_seg.models import AllSparkSegmentor

# Tiny models are fastest on one thread, and several test processes (torchrun workers, subprocesses) must not
# oversubscribe the CPU: OpenMP threads that spin-wait on a busy 2-core machine slow everything down tenfold.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

TINY_ENCODER = {"embed_dims": (8, 16, 32, 64), "num_heads": (1, 1, 2, 2), "depths": (1, 1, 1, 1)}


def tiny_model(num_classes: int = 5, crop_size: int | tuple[int, int] = 64, **kwargs: Any) -> AllSparkSegmentor:
    """A MiT with widths 8..64 and one block per stage, head width 32."""
    options = {"encoder_options": TINY_ENCODER, "head_dim": 32}
    options.update(kwargs)
    return build_model("mit_b0", num_classes=num_classes, crop_size=crop_size, **options)


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout-like module's rate to 0 (dropout, Dropout2d, DropPath)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return model


@pytest.fixture
def model_factory():
    """Factory for tiny seeded models."""

    def make(seed: int = 0, **kwargs: Any) -> AllSparkSegmentor:
        torch.manual_seed(seed)
        return tiny_model(**kwargs)

    return make
