"""Reading image and mask files, and the cheap complete check of an image file used by the opening scan.

Every failure is a :class:`~allspark_seg.errors.DataError` naming the file: a missing, unreadable, truncated or
corrupt file, a mask with several channels, or a mask whose size differs from its image's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from allspark_seg.constants import IGNORE_INDEX
from allspark_seg.data.splits import Item
from allspark_seg.errors import DataError

__all__ = [
    "CITYSCAPES_ID_TO_TRAINID",
    "MASK_ENCODINGS",
    "READ_ERRORS",
    "check_image",
    "load_image",
    "load_item",
    "load_mask",
    "read_error",
    "to_rgb",
]

#: Official cityscapesscripts ``labels.py``: label id (0..33) -> train id (0..18), 255 for ignored labels.
CITYSCAPES_ID_TO_TRAINID: tuple[int, ...] = (
    255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9, 10, 11, 12, 13,
    14, 15, 255, 255, 16, 17, 18,
)  # fmt: skip

MASK_ENCODINGS: tuple[str, ...] = ("ids", "cityscapes_label_ids")

#: What Pillow raises for a missing, unreadable, truncated or oversized file.
READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)


def _cityscapes_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[: len(CITYSCAPES_ID_TO_TRAINID)] = CITYSCAPES_ID_TO_TRAINID
    return lut


def to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode to ``(H, W, 3)`` uint8; 16-bit and 32-bit gray are rescaled to 8 bits."""
    if image.mode == "RGB":
        return np.asarray(image)
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image).astype(np.float64)
        peak = float(values.max()) if values.size else 0.0
        if image.mode.startswith("I;16") or 255 < peak <= 65535:
            values = values / 257.0
        elif image.mode == "F" and peak <= 1.0:
            values = values * 255.0
        elif peak > 65535:
            values = values * (255.0 / peak)
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def read_error(kind: str, path: Path, error: BaseException) -> DataError:
    """The one-sentence error for a file Pillow failed on (``kind`` is "Image" or "Mask")."""
    if isinstance(error, FileNotFoundError):
        return DataError(f"{kind} {path} does not exist.")
    if isinstance(error, UnidentifiedImageError):
        return DataError(f"{kind} {path} is not an image file that Pillow can read.")
    reason = str(error).strip() or type(error).__name__
    return DataError(f"{kind} {path} cannot be read (truncated or corrupt?): {reason}.")


def load_image(path: str | Path) -> np.ndarray:
    """Read an image as RGB.

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16/32-bit images are converted.

    Returns:
        ``(H, W, 3)`` uint8.

    Raises:
        DataError: missing, unreadable or truncated file.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except READ_ERRORS as error:
        raise read_error("Image", path, error) from error


def _mask_array(image: Image.Image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode in ("L", "P"):
        return np.asarray(image)
    if mode == "1":
        return np.asarray(image).astype(np.uint8)
    if mode == "PA":
        return np.asarray(image)[..., 0]
    if mode.startswith("I"):
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise DataError(
                f"Mask {path} has values up to {int(values.max())}; class ids must be below 255 (255 = ignore)."
            )
        return values.astype(np.uint8)
    raise DataError(
        f"Mask {path} has {len(image.getbands())} channels (mode {mode}) and is not a palette image; "
        "masks must be single-channel PNGs of class ids or palette PNGs."
    )


def load_mask(path: str | Path, encoding: str = "ids") -> np.ndarray:
    """Read a mask as class ids.

    Args:
        path: single-channel or palette PNG (palette indices are the ids).
        encoding: "ids", or "cityscapes_label_ids" to map Cityscapes label ids to train ids.

    Returns:
        ``(H, W)`` uint8 class ids, 255 = ignore.

    Raises:
        DataError: missing, unreadable or multi-channel non-palette file.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mask = _mask_array(image, path)
    except READ_ERRORS as error:
        raise read_error("Mask", path, error) from error
    if encoding == "cityscapes_label_ids":
        return _cityscapes_lut()[mask]
    if encoding != "ids":
        raise ValueError(f"unknown mask encoding {encoding!r}")
    return np.ascontiguousarray(mask, dtype=np.uint8)


def load_item(item: Item) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a sample: ``(H, W, 3)`` uint8 image and ``(H, W)`` uint8 mask (None without a mask).

    Raises:
        DataError: a file cannot be read, or the mask's size differs from the image's.
    """
    image = load_image(item.image)
    if item.mask is None:
        return image, None
    mask = load_mask(item.mask, item.mask_encoding)
    if mask.shape != image.shape[:2]:
        raise DataError(
            f"Mask {item.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {item.image} is "
            f"{image.shape[1]}x{image.shape[0]}."
        )
    return image, mask


# ------------------------------------------------------------------------------------------ the cheap check


def _jpeg_has_end_marker(path: Path) -> bool:
    """True when the JPEG end-of-image marker is in the last 4 KiB (it is missing from truncated files)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 4096))
        return b"\xff\xd9" in f.read()


_COMMON_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F"})


def _check_convertible(image: Image.Image, path: Path) -> None:
    image.load()
    try:
        to_rgb(image)
    except ValueError as error:
        raise DataError(f"Image {path} has mode {image.mode}, which cannot be converted to RGB ({error}).") from error


def check_image(path: Path) -> tuple[int, int]:
    """Open an image cheaply but completely enough to detect truncation; returns ``(width, height)``.

    PNG: every chunk's CRC is verified without decoding. JPEG: the header is parsed and the end-of-image marker
    looked for; without it the image is decoded at 1/8 scale, which fails on truncated data. Other formats, and
    rare modes (LAB, HSV, ...), are decoded (and converted once).

    Raises:
        DataError: naming the file and the problem.
    """
    try:
        with Image.open(path) as image:
            size = image.size
            if image.mode not in _COMMON_MODES and not image.mode.startswith("I;16"):
                _check_convertible(image, path)  # rare modes (LAB, HSV, ...): decode and convert once
            elif image.format == "PNG":
                image.verify()
            elif image.format == "JPEG":
                if not _jpeg_has_end_marker(path):
                    image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
                    image.load()
            else:
                image.load()
    except READ_ERRORS as error:
        raise read_error("Image", path, error) from error
    return size
