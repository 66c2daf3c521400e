"""Fit a run's config to its data and its machine once the data is opened, before the model is built.

- ``data.crop_size: auto`` becomes a size from the training images: the median long side, rounded up to a multiple
  of 32 and kept within 32..512. The long side is what the augmentation rescales (to 0.5..2 times itself, as the
  official code does with crop 513 on Pascal's 500-pixel images), so the crop covers a typical image at scale 1.
  The model's Semantic Memory grid depends on the crop, which is why this runs before the model is built.
- An explicit crop more than twice the images' median long side gets one warning: even at the augmentation's
  largest scale those images do not fill a crop, and the padding costs time and memory.
- ``data.num_workers`` is lowered when the loader workers of all training processes on the machine would outnumber
  the usable cores minus one per process (each process trains on a core of its own; on two cores, worker processes
  only compete with it, see ``docs/demo.md``).
- PyTorch's intra-op threads (:func:`choose_threads`, applied when training starts): the cores left after the loader
  workers, so the main process's OpenMP threads do not contend with the workers (on two cores with one worker, two
  threads made a step 1.9x slower than one). ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set, or fewer threads set
  with ``torch.set_num_threads``, are kept.

The returned config holds the values used, so ``OUT/config.yaml`` and the checkpoints rebuild the same model.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import AUTO, RunConfig, crop_hw, resolve_config
from ..errors import DataError

__all__ = [
    "AUTO_CROP_MAX",
    "AUTO_CROP_MULTIPLE",
    "SIZE_SAMPLE",
    "adapt_to_data",
    "auto_crop_size",
    "choose_threads",
    "image_sizes",
    "intra_op_threads",
    "local_processes",
    "median_long_side",
    "usable_cores",
    "worker_limit",
]

log = logging.getLogger(__name__)

#: ``data.crop_size: auto`` is a multiple of this (the encoders' largest stride) ...
AUTO_CROP_MULTIPLE = 32
#: ... at most this (the paper's Pascal crop is 513; larger images are cropped, as Cityscapes' 801 crops are) ...
AUTO_CROP_MAX = 512
#: ... and at least this (the smallest crop a config accepts).
AUTO_CROP_MIN = 32
#: Images whose header is read to measure the sizes (evenly spaced over the training list).
SIZE_SAMPLE = 256
#: The augmentation's largest rescale of the long side (``data.transforms.random_rescale``).
MAX_RESCALE = 2.0


def image_sizes(paths: Sequence[Path], limit: int = SIZE_SAMPLE) -> list[tuple[int, int]]:
    """``(height, width)`` of up to ``limit`` images evenly spaced over ``paths``, from their headers only.

    Raises:
        DataError: An image that cannot be opened.
    """
    n = len(paths)
    picked = [paths[i * n // limit] for i in range(limit)] if n > limit else list(paths)
    sizes = []
    for path in picked:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"Image {path} cannot be read to measure its size ({error}).") from error
        sizes.append((height, width))
    return sizes


def median_long_side(sizes: Sequence[tuple[int, int]]) -> float:
    """Median over images of ``max(height, width)``."""
    return float(np.median([max(h, w) for h, w in sizes]))


def auto_crop_size(long_side: float) -> int:
    """The ``auto`` crop for images of this (median) long side: rounded up to a multiple of 32, within 32..512."""
    side = math.ceil(long_side / AUTO_CROP_MULTIPLE) * AUTO_CROP_MULTIPLE
    return int(min(AUTO_CROP_MAX, max(AUTO_CROP_MIN, side)))


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and ``taskset`` restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_processes() -> int:
    """Training processes on this machine (``LOCAL_WORLD_SIZE``, which torchrun sets; 1 otherwise)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def worker_limit(cores: int, loaders: int, processes: int = 1) -> int:
    """Most workers per loader such that ``processes * loaders * workers <= cores - processes``.

    Args:
        cores: Usable cores of the machine.
        loaders: Training loaders per process (2 for the semi-supervised methods, 1 for ``supervised``).
        processes: Training processes on the machine.
    """
    return max(0, (cores - processes) // (loaders * processes))


def intra_op_threads(cores: int, loaders: int, workers: int, processes: int = 1) -> int:
    """PyTorch intra-op threads per training process: the cores left after the loader workers, at least one.

    ``max(1, (cores - processes * loaders * workers) // processes)``; with the workers :func:`worker_limit` allows,
    threads and workers of all processes fit in the cores.

    Args:
        cores: Usable cores of the machine.
        loaders: Training loaders per process.
        workers: Workers per loader (``data.num_workers``).
        processes: Training processes on the machine.
    """
    return max(1, (cores - processes * loaders * workers) // processes)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def choose_threads(
    current: int, cores: int, loaders: int, workers: int, processes: int, environ: Mapping[str, str]
) -> tuple[int, str]:
    """The intra-op threads training should use, and why (for the log).

    :func:`intra_op_threads`, unless ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set (the user's choice: kept) or
    the process already has fewer threads (set by the caller with ``torch.set_num_threads``: kept, never raised).

    Args:
        current: ``torch.get_num_threads()``.
        cores: Usable cores of the machine.
        loaders: Training loaders per process.
        workers: Workers per loader.
        processes: Training processes on the machine.
        environ: The environment (``os.environ``).
    """
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if environ.get(name):
            return current, f"{name} is set"
    threads = intra_op_threads(cores, loaders, workers, processes)
    left = f"{_plural(cores, 'usable core')} - {_plural(processes * loaders * workers, 'loader worker')}"
    why = left if processes == 1 else f"({left}) / {processes} processes"
    if threads > current:
        return current, f"kept: at most {threads} = {why}"
    return threads, why


def adapt_to_data(
    cfg: RunConfig,
    train_images: Sequence[Path],
    *,
    cores: int | None = None,
    processes: int | None = None,
) -> RunConfig:
    """Decide ``data.crop_size: auto``, warn about a crop far larger than the images, cap ``data.num_workers``.

    Args:
        cfg: Resolved config (``data.crop_size`` may be ``auto``).
        train_images: The labeled and unlabeled training images.
        cores: Usable cores; default :func:`usable_cores`.
        processes: Training processes on this machine; default :func:`local_processes`.

    Returns:
        The config with a concrete crop (and the evaluation window derived from it) and the workers used.
    """
    data = cfg.data
    median = median_long_side(image_sizes(train_images))
    if data.crop_size == AUTO:
        crop = auto_crop_size(median)
        log.info(
            "data.crop_size auto: %d (median long side of the training images %d pixels, rounded up to a multiple "
            "of %d, at most %d)",
            crop,
            round(median),
            AUTO_CROP_MULTIPLE,
            AUTO_CROP_MAX,
        )
        data = replace(data, crop_size=crop)
    elif min(crop_hw(cfg)) > MAX_RESCALE * median:
        log.warning(
            "data.crop_size %s is more than twice the long side of the training images (median %d pixels): even "
            "rescaled to twice their size (the augmentation's largest scale) they do not fill a crop, and the "
            "padding costs time and memory; data.crop_size=auto would use %d.",
            data.crop_size,
            round(median),
            auto_crop_size(median),
        )
    loaders = 1 if cfg.method == "supervised" else 2
    procs = processes if processes is not None else local_processes()
    available = cores if cores is not None else usable_cores()
    limit = worker_limit(available, loaders, procs)
    if data.num_workers > limit:
        log.info(
            "data.num_workers %d -> %d: %d loader%s x %d process%s on %d usable core%s, one core kept per process",
            data.num_workers,
            limit,
            loaders,
            "s" if loaders > 1 else "",
            procs,
            "es" if procs > 1 else "",
            available,
            "s" if available > 1 else "",
        )
        data = replace(data, num_workers=limit)
    return resolve_config(replace(cfg, data=data))
