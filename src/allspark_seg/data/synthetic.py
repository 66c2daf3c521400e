"""The built-in synthetic segmentation dataset: shapes on textured backgrounds, generated from a seed.

Each image shows a few objects whose class is carried by their SHAPE (disc, square, triangle, ring, cross, star,
hexagon, ellipse, crescent); every object's colour and fill (solid, gradient or stripes) is drawn from the same
distribution whatever its class, so colour carries no information. Objects have random size, position and rotation
and may occlude each other; backgrounds are noise, stripes, gradients or checkerboards. Masks are exact (the image is
painted with the same pixel sets as the mask), and class 0 is the background.

The dataset is written by :mod:`allspark_seg.data.generated` in the folder layout, plus the ground truth of the
unlabeled images in ``ROOT/unlabeled_masks/`` (for diagnostics such as pseudo-label accuracy only) and a
``manifest.json``; an existing dataset with the same manifest is reused. Sample ``i`` of each subset depends only on
``(seed, subset, i)``, so changing one size does not change the other images. :func:`generate_synthetic` is the one
entry point for every ``kind``: the tasks built from real images are in :mod:`allspark_seg.data.realtasks`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from allspark_seg.data.generated import SYNTHETIC_VERSION, make_manifest, subset_rng, write_dataset
from allspark_seg.data.realtasks import TASKS, generate_real_task
from allspark_seg.errors import ConfigError
from allspark_seg.utils import to_pair

__all__ = ["SHAPES", "SYNTHETIC_KINDS", "SYNTHETIC_VERSION", "class_names", "generate_synthetic", "render_sample"]

#: Foreground shapes; class k (k >= 1) is ``SHAPES[k - 1]``.
SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross", "star", "hexagon", "ellipse", "crescent")

#: The values of ``data.synthetic.kind``: the shapes of this module, then the tasks built from real images.
SYNTHETIC_KINDS: tuple[str, ...] = ("shapes", *TASKS)


def class_names(num_classes: int) -> tuple[str, ...]:
    """``("background", SHAPES[0], ...)`` for ``num_classes`` classes."""
    _check_classes(num_classes)
    return ("background",) + SHAPES[: num_classes - 1]


def _check_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= len(SHAPES) + 1:
        raise ConfigError(f"The synthetic dataset supports 2 to {len(SHAPES) + 1} classes, got {num_classes}.")


# ------------------------------------------------------------------------------------------------ shapes


def _polygon(vertices: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of the points (u, v) against ``(n, 2)`` vertices."""
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = vertices[-1]
    for x1, y1 in vertices:
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
        x0, y0 = x1, y1
    return inside


def _regular(n: int, radius: float = 1.0, start: float = -np.pi / 2) -> np.ndarray:
    angles = start + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular(5, 1.0), _regular(5, 0.42, -np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(10, 2)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels inside a unit-size shape, in rotated coordinates normalised by the object radius."""
    rho2 = u * u + v * v
    if shape == "disc":
        return rho2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":
        return _polygon(_regular(3), u, v)
    if shape == "ring":
        return (rho2 <= 1.0) & (rho2 >= 0.55**2)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if shape == "star":
        return _polygon(_star(), u, v)
    if shape == "hexagon":
        return _polygon(_regular(6, 0.95), u, v)
    if shape == "ellipse":
        return u * u + (v / 0.45) ** 2 <= 1.0
    if shape == "crescent":
        return (rho2 <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.8**2)
    raise ValueError(f"unknown shape {shape!r}")


# ------------------------------------------------------------------------------------------------ fills


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _pattern(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, kind: str, scale: float) -> np.ndarray:
    """A [0, 1] blending field over the pixel grid (ys, xs) of the given kind."""
    angle = rng.uniform(0, 2 * np.pi)
    proj = xs * np.cos(angle) + ys * np.sin(angle)
    if kind == "gradient":
        span = max(float(proj.max() - proj.min()), 1e-6)
        return (proj - proj.min()) / span
    if kind == "stripes":
        period = rng.uniform(0.08, 0.3) * scale
        return 0.5 + 0.5 * np.sin(2 * np.pi * proj / period + rng.uniform(0, 2 * np.pi))
    if kind == "checker":
        cell = max(2, int(rng.uniform(0.06, 0.2) * scale))
        return (((ys.astype(np.int64) // cell) + (xs.astype(np.int64) // cell)) % 2).astype(np.float64)
    if kind == "noise":
        cells = int(rng.integers(3, 10))
        coarse = (rng.uniform(0, 255, size=(cells, cells))).astype(np.uint8)
        h, w = ys.shape
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)
        return field / 255.0
    return np.zeros(ys.shape)


def _fill(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, kinds: tuple[str, ...], scale: float) -> np.ndarray:
    """An ``(h, w, 3)`` float colour field blending two random colours with a random pattern."""
    kind = kinds[int(rng.integers(len(kinds)))]
    a, b = _random_color(rng), _random_color(rng)
    t = _pattern(rng, ys, xs, kind, scale)[..., None]
    return a * (1 - t) + b * t


# ----------------------------------------------------------------------------------------------- samples


def render_sample(
    rng: np.random.Generator, image_size: int | tuple[int, int] = 96, num_classes: int = 6, max_objects: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image and its exact mask.

    Args:
        rng: random generator (the sample's only source of randomness).
        image_size: int or ``(h, w)``.
        num_classes: K, background included (2..10).
        max_objects: at most this many objects (at least 2 are drawn when possible).

    Returns:
        ``(H, W, 3)`` uint8 image and ``(H, W)`` uint8 mask of class ids in [0, K).
    """
    _check_classes(num_classes)
    h, w = to_pair(image_size)
    scale = float(min(h, w))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    image = _fill(rng, ys, xs, ("gradient", "stripes", "checker", "noise"), scale)
    mask = np.zeros((h, w), dtype=np.uint8)
    count = int(rng.integers(min(2, max_objects), max_objects + 1))
    for _ in range(count):
        cls = int(rng.integers(1, num_classes))
        radius = rng.uniform(0.09, 0.24) * scale
        cy, cx = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
        theta = rng.uniform(0, 2 * np.pi)
        extent = 1.2 * radius  # every shape fits in a disc of radius 1.2 (the square's corners reach 1.13)
        y0, y1 = max(0, int(cy - extent) - 1), min(h, int(cy + extent) + 2)
        x0, x1 = max(0, int(cx - extent) - 1), min(w, int(cx + extent) + 2)
        dy, dx = ys[y0:y1, x0:x1] - cy, xs[y0:y1, x0:x1] - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / radius
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / radius
        inside = _shape_mask(SHAPES[cls - 1], u, v)
        colour = _fill(rng, ys[y0:y1, x0:x1], xs[y0:y1, x0:x1], ("solid", "gradient", "stripes"), radius * 2)
        background = image[y0:y1, x0:x1][inside].mean(axis=0) if inside.any() else None
        if background is not None and np.linalg.norm(colour.mean(axis=(0, 1)) - background) < 60:
            colour = 255.0 - colour  # keep objects visible against what they cover
        region = image[y0:y1, x0:x1]
        region[inside] = colour[inside]
        mask[y0:y1, x0:x1][inside] = cls
    image += rng.normal(0.0, 6.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


# ---------------------------------------------------------------------------------------------- dataset


def generate_synthetic(
    root: str | Path,
    *,
    seed: int = 0,
    num_labeled: int = 24,
    num_unlabeled: int = 400,
    num_val: int = 100,
    image_size: int = 96,
    num_classes: int = 6,
    unlabeled_masks: bool = True,
    max_objects: int | None = None,
    kind: str = "shapes",
) -> Path:
    """Write (or reuse) the synthetic dataset in the folder layout.

    Args:
        root: target folder; must be empty, absent, or a synthetic dataset written earlier.
        seed: non-negative seed.
        num_labeled: labeled images (``ROOT/labeled``).
        num_unlabeled: unlabeled images (``ROOT/unlabeled``; masks in ``ROOT/unlabeled_masks`` if asked).
        num_val: validation images (``ROOT/val``).
        image_size: side of the square images in pixels.
        num_classes: K including the background (2..10).
        unlabeled_masks: also write the ground truth of the unlabeled images (diagnostics only).
        max_objects: most objects per image; null = the kind's default (5 shapes, 3 digits).
        kind: ``shapes`` (this module), or a task built from real images (``digits``, ``cells``: see
            :mod:`allspark_seg.data.realtasks`).

    Returns:
        The dataset root.

    Raises:
        DataError: ``root`` holds other files, or the source package of a real-image task is not installed.
        ConfigError: bad sizes or kind.
    """
    if kind != "shapes":
        return generate_real_task(
            root,
            task=kind,
            seed=seed,
            num_labeled=num_labeled,
            num_unlabeled=num_unlabeled,
            num_val=num_val,
            image_size=image_size,
            num_classes=num_classes,
            unlabeled_masks=unlabeled_masks,
            max_objects=max_objects,
        )
    _check_classes(num_classes)
    max_objects = 5 if max_objects is None else max_objects
    if seed < 0 or min(num_labeled, num_unlabeled, num_val) < 1 or image_size < 8 or max_objects < 1:
        raise ConfigError(
            "The synthetic dataset needs seed >= 0, at least one image per subset, image_size >= 8 and "
            f"max_objects >= 1; got seed={seed}, sizes=({num_labeled}, {num_unlabeled}, {num_val}), "
            f"image_size={image_size}, max_objects={max_objects}."
        )
    root = Path(root)
    sizes = {"num_labeled": num_labeled, "num_unlabeled": num_unlabeled, "num_val": num_val}
    manifest = make_manifest(
        seed=seed,
        **sizes,
        image_size=image_size,
        num_classes=num_classes,
        unlabeled_masks=unlabeled_masks,
        max_objects=max_objects,
    )

    def render(subset: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        return render_sample(subset_rng(seed, subset, i), image_size, num_classes, max_objects)

    return write_dataset(root, manifest, render, class_names(num_classes), "synthetic")
