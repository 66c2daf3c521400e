"""Tiny training configs shared by the engine tests and the distributed test script."""

from __future__ import annotations

from typing import Any

from allspark_seg.config import RunConfig, load_config

TINY_MODEL = {
    "encoder": "mit_b0",
    "embed_dims": [8, 16, 32, 64],
    "depths": [1, 1, 1, 1],
    "num_heads": [1, 1, 2, 2],
    "head_dim": 32,
}


def tiny_data(data_root: str) -> dict[str, Any]:
    """The ``data`` section of :func:`tiny_config`: a small synthetic dataset, 96 px images, crop 48."""
    return {
        "format": "synthetic",
        "root": data_root,
        "crop_size": 48,
        "num_workers": 0,
        "synthetic": {"num_labeled": 8, "num_unlabeled": 16, "num_val": 4, "image_size": 96},
    }


def tiny_config(data_root: str, method: str = "allspark", overrides: tuple[str, ...] = (), **train: Any) -> RunConfig:
    """A run on a small synthetic dataset (96 px images, crop 48, so random rescaling never pads)."""
    train_section = {"iterations": 6, "batch_size": 2, "lr": 0.01, "log_every": 1, "checkpoint_every": 100}
    train_section.update(train)
    return load_config(
        {
            "method": method,
            "model": dict(TINY_MODEL),
            "data": tiny_data(data_root),
            "train": train_section,
        },
        overrides,
    )
