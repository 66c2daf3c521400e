"""Tiny training configs shared by the engine tests and the distributed test script."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from allspark_seg.config import RunConfig, load_config
from allspark_seg.data import build_train_loader
from allspark_seg.data.transforms import ROLE_STREAMS

if TYPE_CHECKING:
    from allspark_seg.engine.train import Trainer

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


def epoch_iterators(trainer: Trainer, epoch: int, start: int) -> tuple[Iterator[dict], Iterator[dict] | None]:
    """The labeled and unlabeled batch iterators of one epoch from ``start`` (the per-epoch loaders, which the
    trainer's run loaders concatenate); the unlabeled one is None when the trainer's method uses no unlabeled images."""
    t = trainer.cfg.train

    def one(dataset: Any, batch_size: int, role: str) -> Iterator[dict]:
        loader = build_train_loader(
            dataset,
            batch_size,
            seed=t.seed,
            epoch=epoch,
            rank=trainer.env.rank,
            world_size=trainer.env.world_size,
            grad_accum=t.grad_accum,
            start_step=start,
            steps=trainer.plan.steps_per_epoch,
            stream=ROLE_STREAMS[role],
            num_workers=trainer.cfg.data.num_workers,
        )
        return iter(loader)

    it_l = one(trainer.bundle.labeled, t.batch_size, "labeled")
    it_u = one(trainer.bundle.unlabeled, t.unlabeled_batch_size, "unlabeled") if trainer._uses_unlabeled() else None
    return it_l, it_u
