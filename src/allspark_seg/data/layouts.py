"""Where each dataset format keeps its files: listing the samples of one role (no file is opened).

Every lister takes ``(root, role, split_file)``; with a split file the samples are its lines (paths relative to
``root``), otherwise the format's standard layout:

- folder (and synthetic): ``ROOT/{labeled,val}/{images,masks}``, ``ROOT/unlabeled`` (or ``ROOT/unlabeled/images``)
  with optional ground truth in ``ROOT/unlabeled_masks``;
- voc: ``ImageSets/Segmentation/{train,val}.txt`` (id lists or split files), masks in ``SegmentationClass`` or
  ``SegmentationClassAug``;
- cityscapes: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` with ``gtFine`` train-id (or label-id) masks;
- coco: ``{train,val}2017/*.jpg`` with ``masks/[SUBSET/]NAME.png``.

Unlabeled data of voc, cityscapes and coco needs a split file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from allspark_seg.data.splits import IMAGE_EXTENSIONS, Item, read_split_file, sample_name
from allspark_seg.errors import ConfigError, DataError

__all__ = ["ROLES", "Role", "cityscapes_items", "coco_items", "folder_items", "voc_items"]

Role = Literal["labeled", "unlabeled", "val"]
ROLES: tuple[str, ...] = ("labeled", "unlabeled", "val")

_MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


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


def _from_split_file(split_file: Path, root: Path, role: Role) -> list[Item]:
    return read_split_file(split_file, root, require_masks=role != "unlabeled")


# ------------------------------------------------------------------------------------------------ folder


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


def folder_items(root: Path, role: Role, split_file: Path | None = None) -> list[Item]:
    """The folder layout (the default for custom data and the synthetic datasets)."""
    if split_file is not None:
        return _from_split_file(split_file, root, role)
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


# --------------------------------------------------------------------------------------------------- voc


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


def voc_items(root: Path, role: Role, split_file: Path | None = None) -> list[Item]:
    """Pascal VOC: ``ImageSets/Segmentation/{train,val}.txt`` by default; id lists and split files are accepted."""
    if split_file is None:
        if role == "unlabeled":
            raise ConfigError("The voc format needs a split file for unlabeled images.")
        split_file = root / "ImageSets" / "Segmentation" / ("train.txt" if role == "labeled" else "val.txt")
    items = _read_id_list(split_file, root) if _is_id_list(split_file) else _from_split_file(split_file, root, role)
    return [_voc_fix(item, root) for item in items]


# -------------------------------------------------------------------------------------------- cityscapes


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


def cityscapes_items(root: Path, role: Role, split_file: Path | None = None) -> list[Item]:
    """Cityscapes: ``leftImg8bit/{train,val}`` with ``gtFine`` masks by default."""
    if split_file is not None:
        return [_cityscapes_fix(item) for item in _from_split_file(split_file, root, role)]
    if role == "unlabeled":
        raise ConfigError("The cityscapes format needs a split file for unlabeled images.")
    subset = root / "leftImg8bit" / ("train" if role == "labeled" else "val")
    _require_dir(subset, "Cityscapes needs leftImg8bit/{train,val}/<city>/*_leftImg8bit.png")
    images = sorted(subset.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DataError(f"Folder {subset} has no */*_leftImg8bit.png images.")
    return [_cityscapes_mask_for(image, root) for image in images]


# -------------------------------------------------------------------------------------------------- coco


def _coco_mask_for(image: Path, root: Path, subset: str) -> Path:
    nested = root / "masks" / subset / f"{image.stem}.png"
    flat = root / "masks" / f"{image.stem}.png"
    return flat if not nested.exists() and flat.exists() else nested


def coco_items(root: Path, role: Role, split_file: Path | None = None) -> list[Item]:
    """COCO 2017: ``{train,val}2017/*.jpg`` with ``masks/`` by default."""
    if split_file is not None:
        return _from_split_file(split_file, root, role)
    if role == "unlabeled":
        raise ConfigError("The coco format needs a split file for unlabeled images.")
    subset = "train2017" if role == "labeled" else "val2017"
    folder = root / subset
    _require_dir(folder, f"COCO needs {subset}/*.jpg beside masks/")
    images = sorted(folder.glob("*.jpg"))
    if not images:
        raise DataError(f"Folder {folder} has no .jpg images.")
    return [Item(image=image, mask=_coco_mask_for(image, root, subset), name=image.stem) for image in images]
