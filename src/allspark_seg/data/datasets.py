"""Dataset readers (Pascal VOC, Cityscapes, COCO, plain folders), the opening scan, and the torch datasets.

The readers only list files: :func:`open_split` returns :class:`Item` paths for one role ("labeled",
"unlabeled" or "val") and, with ``check=True``, scans every file once so that bad input fails when the dataset is
opened with one :class:`~allspark_seg.errors.DataError` naming the file, never in the middle of training. Loading
happens in :class:`TrainDataset` and :class:`ValDataset`.

Folder layout (the default for custom data)::

    ROOT/labeled/images/NAME.{jpg,jpeg,png,bmp,tif,tiff}
    ROOT/labeled/masks/NAME.png            single-channel class ids or palette PNG, 255 = ignore
    ROOT/unlabeled/*.{jpg,...}             images only (or ROOT/unlabeled/images/)
    ROOT/unlabeled_masks/NAME.png          optional ground truth of unlabeled images, for diagnostics only
    ROOT/val/images/NAME.*, ROOT/val/masks/NAME.png
    ROOT/classes.txt                       optional, one class name per line
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from allspark_seg.data import palette as pal
from allspark_seg.data.splits import IMAGE_EXTENSIONS, Item, read_split_file, sample_name
from allspark_seg.data.transforms import PIPELINES, ROLE_STREAMS, apply_pipeline, normalize, sample_rng
from allspark_seg.errors import ConfigError, DataError

__all__ = [
    "CITYSCAPES_ID_TO_TRAINID",
    "FORMATS",
    "ROLES",
    "DatasetInfo",
    "FormatSpec",
    "Item",
    "ScanReport",
    "TrainDataset",
    "ValDataset",
    "describe_dataset",
    "get_format",
    "list_train_items",
    "load_image",
    "load_mask",
    "open_split",
    "read_class_names",
    "resolve_num_classes",
    "scan_items",
]

log = logging.getLogger(__name__)

Role = Literal["labeled", "unlabeled", "val"]
ROLES: tuple[str, ...] = ("labeled", "unlabeled", "val")
IGNORE_INDEX = 255

# ----------------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class FormatSpec:
    """What a dataset format fixes.

    Attributes:
        name: registry key.
        num_classes: K, or None when the data decides (folder: ``classes.txt`` or the caller).
        class_names: names of the K classes, or None.
        palette: K RGB colours, or None (then :func:`~allspark_seg.data.palette.palette_for` is used).
        description: one line for ``--help`` texts.
    """

    name: str
    num_classes: int | None
    class_names: tuple[str, ...] | None
    palette: tuple[tuple[int, int, int], ...] | None
    description: str

    def palette_array(self, num_classes: int | None = None) -> np.ndarray:
        """The ``(K, 3)`` uint8 palette (a generated one when the format has none)."""
        if self.palette is not None:
            return np.asarray(self.palette, dtype=np.uint8)
        k = self.num_classes if num_classes is None else num_classes
        if k is None:
            raise ConfigError(f"The {self.name} format needs num_classes to build a palette.")
        return pal.palette_for(k)


def _tuples(array: np.ndarray) -> tuple[tuple[int, int, int], ...]:
    return tuple((int(r), int(g), int(b)) for r, g, b in array)


#: Dataset formats by name (read-only). "synthetic" is read as "folder" after generation.
FORMATS: Mapping[str, FormatSpec] = MappingProxyType(
    {
        "voc": FormatSpec(
            "voc", 21, pal.VOC_CLASSES, _tuples(pal.voc_colormap(21)), "Pascal VOC 2012 (JPEGImages + palette PNGs)"
        ),
        "cityscapes": FormatSpec(
            "cityscapes", 19, pal.CITYSCAPES_CLASSES, pal.CITYSCAPES_COLORS, "Cityscapes (leftImg8bit + gtFine)"
        ),
        "coco": FormatSpec("coco", 81, pal.COCO_CLASSES, None, "COCO 2017, 80 things + background (masks/*.png)"),
        "folder": FormatSpec("folder", None, None, None, "ROOT/{labeled,unlabeled,val} folders (custom data)"),
        "synthetic": FormatSpec("synthetic", None, None, None, "built-in generated shapes, folder layout"),
    }
)
_ALIASES: Mapping[str, str] = MappingProxyType({"pascal": "voc", "custom": "folder"})


def get_format(name: str) -> FormatSpec:
    """Look up a format by name (``pascal`` is an alias of ``voc``, ``custom`` of ``folder``)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        raise ConfigError(f"Unknown dataset format {name!r}; expected one of {sorted(FORMATS)}.")
    return FORMATS[key]


def read_class_names(root: str | Path) -> tuple[str, ...] | None:
    """Class names from ``ROOT/classes.txt`` (one per line, blank lines skipped), or None when absent."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        return None
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names:
        raise DataError(f"{path} lists no class names.")
    if len(names) > pal.MAX_CLASSES:
        raise DataError(f"{path} lists {len(names)} classes; at most {pal.MAX_CLASSES} are supported.")
    return names


def resolve_num_classes(format: str, root: str | Path, num_classes: int | None = None) -> int:
    """The number of classes K: fixed by the format, else ``classes.txt``, else ``num_classes``.

    Raises:
        ConfigError: a conflicting or missing ``num_classes``.
    """
    spec = get_format(format)
    if spec.num_classes is not None:
        if num_classes is not None and num_classes != spec.num_classes:
            raise ConfigError(f"The {spec.name} format has {spec.num_classes} classes, but num_classes={num_classes}.")
        return spec.num_classes
    names = read_class_names(root)
    if names is not None:
        if num_classes is not None and num_classes != len(names):
            raise ConfigError(
                f"{Path(root) / 'classes.txt'} lists {len(names)} classes, but num_classes={num_classes}."
            )
        return len(names)
    if num_classes is None:
        raise ConfigError(
            f"Set num_classes: the {spec.name} format has no fixed class count and {Path(root) / 'classes.txt'} "
            "does not exist."
        )
    if not 1 <= num_classes <= pal.MAX_CLASSES:
        raise ConfigError(f"num_classes must be between 1 and {pal.MAX_CLASSES}, got {num_classes}.")
    return num_classes


@dataclass(frozen=True)
class DatasetInfo:
    """Classes of an opened dataset: ``num_classes``, ``class_names`` (K names), ``palette`` ((K, 3) uint8)."""

    num_classes: int
    class_names: tuple[str, ...]
    palette: np.ndarray


def describe_dataset(format: str, root: str | Path, num_classes: int | None = None) -> DatasetInfo:
    """Number of classes, class names and palette of a dataset (generic names ``class_k`` when unknown)."""
    spec = get_format(format)
    k = resolve_num_classes(format, root, num_classes)
    names = spec.class_names or read_class_names(root) or tuple(f"class_{i}" for i in range(k))
    return DatasetInfo(num_classes=k, class_names=names, palette=spec.palette_array(k))


# --------------------------------------------------------------------------------------- image/mask I/O

#: Official cityscapesscripts ``labels.py``: label id (0..33) -> train id (0..18), 255 for ignored labels.
CITYSCAPES_ID_TO_TRAINID: tuple[int, ...] = (
    255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9, 10, 11, 12, 13,
    14, 15, 255, 255, 16, 17, 18,
)  # fmt: skip

MASK_ENCODINGS: tuple[str, ...] = ("ids", "cityscapes_label_ids")


def _cityscapes_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[: len(CITYSCAPES_ID_TO_TRAINID)] = CITYSCAPES_ID_TO_TRAINID
    return lut


def _to_rgb(image: Image.Image) -> np.ndarray:
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


def _read_error(kind: str, path: Path, error: BaseException) -> DataError:
    if isinstance(error, FileNotFoundError):
        return DataError(f"{kind} {path} does not exist.")
    if isinstance(error, UnidentifiedImageError):
        return DataError(f"{kind} {path} is not an image file that Pillow can read.")
    reason = str(error).strip() or type(error).__name__
    return DataError(f"{kind} {path} cannot be read (truncated or corrupt?): {reason}.")


_READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


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
            return _to_rgb(image)
    except _READ_ERRORS as error:
        raise _read_error("Image", path, error) from error


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
    except _READ_ERRORS as error:
        raise _read_error("Mask", path, error) from error
    if encoding == "cityscapes_label_ids":
        return _cityscapes_lut()[mask]
    if encoding != "ids":
        raise ValueError(f"unknown mask encoding {encoding!r}")
    return np.ascontiguousarray(mask, dtype=np.uint8)


# --------------------------------------------------------------------------------------------- the scan


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
        _to_rgb(image)
    except ValueError as error:
        raise DataError(f"Image {path} has mode {image.mode}, which cannot be converted to RGB ({error}).") from error


def _check_image(path: Path) -> tuple[int, int]:
    """Open an image cheaply but completely enough to detect truncation; returns ``(width, height)``.

    PNG: every chunk's CRC is verified without decoding. JPEG: the header is parsed and the end-of-image marker
    looked for; without it the image is decoded at 1/8 scale, which fails on truncated data. Other formats, and
    rare modes (LAB, HSV, ...), are decoded (and converted once).
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
    except _READ_ERRORS as error:
        raise _read_error("Image", path, error) from error
    return size


@dataclass(frozen=True)
class ScanReport:
    """What a scan saw: ``items`` checked, ``masks`` checked, whether any mask has a class in [1, K)
    (``foreground``) and whether any has the ignore value (``ignore``)."""

    items: int
    masks: int
    foreground: bool
    ignore: bool


def _check_mask_values(mask: np.ndarray, num_classes: int, path: Path) -> tuple[bool, bool]:
    """Raise for values outside [0, K) that are not 255; return (has a class in [1, K), has 255)."""
    top = int(mask.max()) if mask.size else 0
    if top < num_classes:
        return top > 0, False
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        values = np.unique(mask[bad])
        shown = ", ".join(str(int(v)) for v in values[:8]) + (" ..." if values.size > 8 else "")
        raise DataError(
            f"Mask {path} has values {shown} outside [0, {num_classes}) that are not the ignore value 255 "
            f"(num_classes is {num_classes})."
        )
    return bool(((mask > 0) & (mask < num_classes)).any()), True


def check_item(item: Item, num_classes: int) -> tuple[bool, bool] | None:
    """Check one item: readable image, readable mask of the same size with values in [0, K) or 255.

    Returns:
        For an item with a mask, whether it has a class in [1, K) and whether it has 255; otherwise None.

    Raises:
        DataError: naming the file and the problem.
    """
    width, height = _check_image(item.image)
    if item.mask is None:
        return None
    mask = load_mask(item.mask, item.mask_encoding)
    if mask.shape != (height, width):
        raise DataError(
            f"Mask {item.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {item.image} is {width}x{height}."
        )
    return _check_mask_values(mask, num_classes, item.mask)


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def scan_items(items: Sequence[Item], num_classes: int, *, workers: int | None = None) -> ScanReport:
    """Check every item (in a thread pool) and raise one error for the first bad file.

    Args:
        items: samples to check.
        num_classes: K.
        workers: threads; default ``min(8, cpu_count)`` (Pillow decodes without the GIL).

    Returns:
        A :class:`ScanReport`.

    Raises:
        DataError: the first problem in item order, with the number of other bad files.
    """

    def safe(item: Item) -> tuple[str | None, tuple[bool, bool] | None]:
        try:
            return None, check_item(item, num_classes)
        except DataError as error:
            return str(error), None

    workers = workers or _default_workers()
    if workers > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(safe, items))
    else:
        results = [safe(item) for item in items]
    problems = [problem for problem, _ in results if problem is not None]
    if problems:
        more = f" ({len(problems) - 1} other files have problems too.)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    flags = [flag for _, flag in results if flag is not None]
    return ScanReport(
        items=len(items),
        masks=len(flags),
        foreground=any(fg for fg, _ in flags),
        ignore=any(ig for _, ig in flags),
    )


def _warn_suspicious(report: ScanReport, num_classes: int, where: str) -> None:
    if num_classes >= 2 and report.ignore and not report.foreground:
        log.warning(
            "%s: the masks contain only class 0 and 255 (ignore). If 255 marks your foreground, save it as 1.", where
        )


# ----------------------------------------------------------------------------------------------- readers


def _files_by_stem(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in extensions:
            continue
        if path.stem in found:
            raise DataError(f"{found[path.stem]} and {path} have the same name; rename one of them.")
        found[path.stem] = path
    return found


def _require_dir(folder: Path, hint: str) -> None:
    if not folder.is_dir():
        raise DataError(f"Folder {folder} does not exist ({hint}).")


_MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


def _folder_pairs(images_dir: Path, masks_dir: Path) -> list[Item]:
    _require_dir(images_dir, "the folder layout needs images/ and masks/ folders")
    _require_dir(masks_dir, "the folder layout needs images/ and masks/ folders")
    images = _files_by_stem(images_dir, IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"Folder {images_dir} has no images ({', '.join(IMAGE_EXTENSIONS)}).")
    masks = _files_by_stem(masks_dir, _MASK_EXTENSIONS + (".jpg", ".jpeg"))
    items = []
    for name, image in images.items():
        mask = masks.get(name)
        if mask is None:
            raise DataError(f"Mask {masks_dir / (name + '.png')} is missing for image {image}.")
        if mask.suffix.lower() in (".jpg", ".jpeg"):
            raise DataError(f"Mask {mask} is a JPEG; masks must be lossless PNGs of class ids.")
        items.append(Item(image=image, mask=mask, name=name))
    extra = sorted(set(masks) - set(images))
    if extra:
        raise DataError(f"Mask {masks[extra[0]]} has no image in {images_dir} ({len(extra)} masks without images).")
    return items


def _folder_items(root: Path, role: Role) -> list[Item]:
    if role == "labeled":
        return _folder_pairs(root / "labeled" / "images", root / "labeled" / "masks")
    if role == "val":
        return _folder_pairs(root / "val" / "images", root / "val" / "masks")
    folder = root / "unlabeled"
    _require_dir(folder, "the folder layout keeps unlabeled images in ROOT/unlabeled")
    if (folder / "images").is_dir():
        folder = folder / "images"
    images = _files_by_stem(folder, IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"Folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}).")
    masks_dir = root / "unlabeled_masks"
    masks = _files_by_stem(masks_dir, _MASK_EXTENSIONS) if masks_dir.is_dir() else {}
    return [Item(image=image, mask=masks.get(name), name=name) for name, image in images.items()]


def _voc_mask_dir(root: Path) -> Path:
    for name in ("SegmentationClass", "SegmentationClassAug"):
        if (root / name).is_dir():
            return root / name
    return root / "SegmentationClass"


def _read_id_list(path: Path, root: Path) -> list[Item]:
    """A VOC ``ImageSets/Segmentation/*.txt`` list of ids."""
    if not path.is_file():
        raise DataError(f"List file {path} does not exist.")
    mask_dir = _voc_mask_dir(root)
    items, seen = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name in seen:
            raise DataError(f"List file {path}, line {number}: '{name}' was already listed on line {seen[name]}.")
        seen[name] = number
        items.append(Item(image=root / "JPEGImages" / f"{name}.jpg", mask=mask_dir / f"{name}.png", name=name))
    if not items:
        raise DataError(f"List file {path} lists no images.")
    return items


def _is_id_list(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            token = line.strip()
            if token:
                return " " not in token and "/" not in token and "." not in token
    return False


def _voc_fix(item: Item, root: Path) -> Item:
    """Accept ``SegmentationClass/`` lines when the masks live in ``SegmentationClassAug/`` (and vice versa)."""
    if item.mask is None or item.mask.exists():
        return item
    rel = Path(os.path.relpath(item.mask, root))
    parts = rel.parts
    swap = {"SegmentationClass": "SegmentationClassAug", "SegmentationClassAug": "SegmentationClass"}
    if parts and parts[0] in swap:
        other = root.joinpath(swap[parts[0]], *parts[1:])
        if other.exists():
            return Item(image=item.image, mask=other, name=item.name)
    return item


def _voc_items(root: Path, role: Role, split_file: Path | None) -> list[Item]:
    if split_file is None:
        if role == "unlabeled":
            raise ConfigError("The voc format needs a split file for unlabeled images.")
        split_file = root / "ImageSets" / "Segmentation" / ("train.txt" if role == "labeled" else "val.txt")
    if _is_id_list(split_file):
        items = _read_id_list(split_file, root)
    else:
        items = read_split_file(split_file, root, require_masks=role != "unlabeled")
    return [_voc_fix(item, root) for item in items]


def _cityscapes_mask_for(image: Path, root: Path) -> Item:
    rel = Path(os.path.relpath(image, root / "leftImg8bit"))
    stem = sample_name(image)
    folder = root / "gtFine" / rel.parent
    item = Item(image=image, mask=folder / f"{stem}_gtFine_labelTrainIds.png", name=stem)
    return _cityscapes_fix(item)


def _cityscapes_fix(item: Item) -> Item:
    """Use ``*_labelIds.png`` (mapped to train ids) when ``*_labelTrainIds.png`` is absent."""
    if item.mask is None:
        return item
    name = item.mask.name
    if name.endswith("_labelIds.png"):
        return Item(item.image, item.mask, item.name, "cityscapes_label_ids")
    if name.endswith("_labelTrainIds.png") and not item.mask.exists():
        other = item.mask.with_name(name.replace("_labelTrainIds.png", "_labelIds.png"))
        if other.exists():
            return Item(item.image, other, item.name, "cityscapes_label_ids")
    return item


def _cityscapes_items(root: Path, role: Role, split_file: Path | None) -> list[Item]:
    if split_file is not None:
        items = read_split_file(split_file, root, require_masks=role != "unlabeled")
        return [_cityscapes_fix(item) for item in items]
    if role == "unlabeled":
        raise ConfigError("The cityscapes format needs a split file for unlabeled images.")
    subset = root / "leftImg8bit" / ("train" if role == "labeled" else "val")
    _require_dir(subset, "Cityscapes needs leftImg8bit/{train,val}/<city>/*_leftImg8bit.png")
    images = sorted(subset.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DataError(f"Folder {subset} has no */*_leftImg8bit.png images.")
    return [_cityscapes_mask_for(image, root) for image in images]


def _coco_mask_for(image: Path, root: Path, subset: str) -> Path:
    nested = root / "masks" / subset / f"{image.stem}.png"
    flat = root / "masks" / f"{image.stem}.png"
    return flat if not nested.exists() and flat.exists() else nested


def _coco_items(root: Path, role: Role, split_file: Path | None) -> list[Item]:
    if split_file is not None:
        return read_split_file(split_file, root, require_masks=role != "unlabeled")
    if role == "unlabeled":
        raise ConfigError("The coco format needs a split file for unlabeled images.")
    subset = "train2017" if role == "labeled" else "val2017"
    folder = root / subset
    _require_dir(folder, f"COCO needs {subset}/*.jpg beside masks/")
    images = sorted(folder.glob("*.jpg"))
    if not images:
        raise DataError(f"Folder {folder} has no .jpg images.")
    return [Item(image=image, mask=_coco_mask_for(image, root, subset), name=image.stem) for image in images]


def _list_items(format: str, root: Path, role: Role, split_file: Path | None) -> list[Item]:
    key = get_format(format).name
    if key == "voc":
        return _voc_items(root, role, split_file)
    if key == "cityscapes":
        return _cityscapes_items(root, role, split_file)
    if key == "coco":
        return _coco_items(root, role, split_file)
    if split_file is not None:
        return read_split_file(split_file, root, require_masks=role != "unlabeled")
    return _folder_items(root, role)


def _check_exists(items: Sequence[Item], role: Role) -> list[Item]:
    """Missing images and labeled/val masks are errors; missing unlabeled masks are dropped (optional)."""
    checked = []
    for item in items:
        if not item.image.is_file():
            raise DataError(f"Image {item.image} does not exist.")
        if item.mask is not None and not item.mask.is_file():
            if role != "unlabeled":
                raise DataError(f"Mask {item.mask} does not exist (image {item.image}).")
            item = Item(item.image, None, item.name)
        checked.append(item)
    return checked


def open_split(
    format: str,
    root: str | Path,
    role: Role,
    *,
    num_classes: int | None = None,
    split_file: str | Path | None = None,
    check: bool = True,
    unlabeled_masks: bool = True,
    workers: int | None = None,
) -> list[Item]:
    """List (and by default scan) the samples of one role of a dataset.

    Sources: with ``split_file``, the split file (paths relative to ``root``). Otherwise voc: labeled from
    ``ImageSets/Segmentation/train.txt``, val from ``ImageSets/Segmentation/val.txt``; cityscapes:
    ``leftImg8bit/{train,val}``; coco: ``{train,val}2017``; folder/synthetic: the folder layout. Unlabeled data of
    voc/cityscapes/coco needs a split file.

    Args:
        format: a key of :data:`FORMATS` (or an alias).
        root: data root.
        role: "labeled", "unlabeled" or "val".
        num_classes: K when the format does not fix it and there is no ``classes.txt``.
        split_file: optional split file.
        check: scan every file (readable, not truncated, mask size and values); recommended.
        unlabeled_masks: keep existing masks of unlabeled items as diagnostic ground truth.
        workers: scan threads.

    Returns:
        Items with absolute paths; unlabeled items have ``mask=None`` unless ground truth exists.

    Raises:
        DataError: a missing, unreadable or inconsistent file, or an empty list.
        ConfigError: a bad format, role or number of classes.
    """
    if role not in ROLES:
        raise ConfigError(f"Unknown role {role!r}; expected one of {ROLES}.")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Data root {root} does not exist or is not a folder.")
    k = resolve_num_classes(format, root, num_classes)
    items = _list_items(format, root, role, None if split_file is None else Path(split_file))
    items = _check_exists(items, role)
    if role == "unlabeled" and not unlabeled_masks:
        items = [Item(item.image, None, item.name) for item in items]
    if not items:
        raise DataError(f"No {role} images found in {root}.")
    if check:
        report = scan_items(items, k, workers=workers)
        if role != "unlabeled":
            _warn_suspicious(report, k, f"{root} ({role})")
    with_gt = sum(item.mask is not None for item in items)
    log.info("%s %s: %d images (%d with masks) in %s", get_format(format).name, role, len(items), with_gt, root)
    return items


def list_train_items(format: str, root: str | Path) -> list[Item]:
    """All standard training samples of a dataset, the list :func:`~allspark_seg.data.splits.make_split` draws from.

    voc: ``ImageSets/Segmentation/train.txt``; cityscapes: ``leftImg8bit/train``; coco: ``train2017``; folder:
    ``labeled/``. Files are not scanned.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Data root {root} does not exist or is not a folder.")
    return _check_exists(_list_items(format, root, "labeled", None), "labeled")


# ------------------------------------------------------------------------------------------ torch datasets


def _load_pair(item: Item) -> tuple[np.ndarray, np.ndarray | None]:
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


def _split_key(key: int | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
    if isinstance(key, (tuple, list)):
        index, epoch = key
        return int(index), int(epoch)
    return int(key), 0


class TrainDataset(Dataset):
    """Augmented training samples, keyed by ``(index, epoch)``.

    The id list is repeated and truncated to ``length`` (the official code repeats the labeled ids to the length of
    the unlabeled list). ``index`` may exceed ``len(self)``: it wraps around, and the extra laps (used by the
    sampler when a dataset is smaller than a global batch) get fresh augmentations since the random generator is
    ``np.random.default_rng([seed, epoch, index, stream])``, where the stream is the role's (0 unlabeled, 1 labeled:
    ``transforms.ROLE_STREAMS``), so labeled and unlabeled sample ``j`` get different crops, flips and scales.

    Args:
        items: samples from :func:`open_split`.
        role: "labeled" (items need masks) or "unlabeled".
        crop_size: int or ``(h, w)``.
        pipeline: "allspark" or "unimatch" (see :mod:`allspark_seg.data.transforms`).
        seed: non-negative base seed.
        num_classes: K (mask values are checked when the dataset is opened).
        length: dataset length, default ``len(items)``.
        ignore_index: label of padded pixels.
    """

    def __init__(
        self,
        items: Sequence[Item],
        *,
        role: Literal["labeled", "unlabeled"],
        crop_size: int | tuple[int, int],
        pipeline: Literal["allspark", "unimatch"] = "allspark",
        seed: int,
        num_classes: int,
        length: int | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if role not in ("labeled", "unlabeled"):
            raise ConfigError(f"TrainDataset role must be 'labeled' or 'unlabeled', got {role!r}.")
        if pipeline not in PIPELINES:
            raise ConfigError(f"Unknown augmentation pipeline {pipeline!r}; expected one of {PIPELINES}.")
        if not items:
            raise DataError(f"The {role} training set is empty.")
        if role == "labeled":
            unlabeled = [item for item in items if item.mask is None]
            if unlabeled:
                raise DataError(f"Labeled image {unlabeled[0].image} has no mask.")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}.")
        if length is not None and length < 1:
            raise ConfigError(f"length must be positive, got {length}.")
        self.items = tuple(items)
        self.role = role
        self.crop_size = crop_size
        self.pipeline = pipeline
        self.seed = seed
        self.num_classes = num_classes
        self.length = len(self.items) if length is None else length
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return self.length

    def item_at(self, index: int) -> Item:
        """The sample behind ``index`` (wrapping around ``len(self)`` and then the item list)."""
        if index < 0:
            raise IndexError(f"negative index {index}")
        return self.items[(index % self.length) % len(self.items)]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """One augmented sample; ``key`` is ``(index, epoch)`` or an index (epoch 0). See ``apply_pipeline``."""
        index, epoch = _split_key(key)
        image, mask = _load_pair(self.item_at(index))
        rng = sample_rng(self.seed, epoch, index, ROLE_STREAMS[self.role])
        return apply_pipeline(self.pipeline, self.role, image, mask, rng, self.crop_size, self.ignore_index)


class ValDataset(Dataset):
    """Full-size validation samples: ``image (3, H, W) float32`` normalised, ``mask (H, W) int64``, ``name``.

    Sizes vary between images, so use batch size 1 (as the official evaluation) or a collate that pads.
    """

    def __init__(self, items: Sequence[Item], num_classes: int) -> None:
        if not items:
            raise DataError("The validation set is empty.")
        missing = [item for item in items if item.mask is None]
        if missing:
            raise DataError(f"Validation image {missing[0].image} has no mask.")
        self.items = tuple(items)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        image, mask = _load_pair(item)
        assert mask is not None
        return {"image": normalize(image), "mask": torch.from_numpy(mask.astype(np.int64)), "name": item.name}
