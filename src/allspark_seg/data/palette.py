"""Class names and colour palettes of the supported datasets.

Everything here is immutable (tuples); functions return fresh numpy arrays. A palette is a ``(K, 3)`` uint8 array
whose row ``k`` is the RGB colour of class ``k``; the ignore index 255 is drawn white by :func:`colorize`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from allspark_seg.constants import IGNORE_INDEX
from allspark_seg.errors import ConfigError

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_COLORS",
    "COCO_CLASSES",
    "MAX_CLASSES",
    "VOC_CLASSES",
    "colorize",
    "palette_for",
    "palette_image",
    "voc_colormap",
]

#: Masks are stored as uint8 with 255 = ignore, so at most 255 classes (ids 0..254).
MAX_CLASSES = 255

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

#: Colours of the 19 Cityscapes train ids, from cityscapesscripts ``helpers/labels.py``.
CITYSCAPES_COLORS: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

#: Background plus the 80 COCO "thing" categories in the order of their sorted category ids (1..90 with gaps).
COCO_CLASSES: tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


def voc_colormap(n: int = 256) -> np.ndarray:
    """The Pascal VOC colour map (bit-interleaved class index), also a good generic palette.

    Args:
        n: number of colours.

    Returns:
        ``(n, 3)`` uint8 array; row 0 is black, row 1 is (128, 0, 0), ... as in the VOC devkit.
    """
    ids = np.arange(n, dtype=np.int64)
    cmap = np.zeros((n, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (ids >> (3 * shift + channel)) & 1
            cmap[:, channel] |= bit << (7 - shift)
    return cmap.astype(np.uint8)


def palette_for(num_classes: int) -> np.ndarray:
    """A palette of distinct colours for any number of classes.

    Args:
        num_classes: K, between 1 and 255.

    Returns:
        ``(K, 3)`` uint8 array (the first K VOC colours, so class 0 is black).
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"num_classes must be between 1 and {MAX_CLASSES}, got {num_classes}.")
    return voc_colormap(num_classes)


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Paint a class-id mask with a palette.

    Args:
        mask: ``(H, W)`` integer class ids; 255 (or any id without a colour) is drawn white.
        palette: ``(K, 3)`` uint8 colours.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.
    """
    lut = np.full((256, 3), 255, dtype=np.uint8)
    k = min(len(palette), 255)
    lut[:k] = np.asarray(palette, dtype=np.uint8)[:k]
    return lut[np.clip(np.asarray(mask), 0, 255).astype(np.uint8)]


def palette_image(mask: np.ndarray, palette: np.ndarray) -> Image.Image:
    """Wrap a class-id mask as a palette ("P" mode) PIL image, the format of VOC's SegmentationClass PNGs.

    Args:
        mask: ``(H, W)`` class ids in [0, 255].
        palette: ``(K, 3)`` uint8 colours; index 255 is white.

    Returns:
        A "P" image whose pixel values are the class ids.
    """
    ids = np.ascontiguousarray(mask, dtype=np.uint8)
    image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    flat = np.zeros((256, 3), dtype=np.uint8)
    k = min(len(palette), 255)
    flat[:k] = np.asarray(palette, dtype=np.uint8)[:k]
    flat[IGNORE_INDEX] = 255
    image.putpalette(flat.ravel().tolist())
    return image
