"""The one registry of dataset formats: what each format fixes (classes, names, palette) and how it lists files.

:data:`FORMATS` maps a format's name to its :class:`FormatSpec`; :func:`get_format` also accepts the aliases
(``pascal`` = ``voc``, ``custom`` = ``folder``). :data:`FORMAT_NAMES` and :data:`FORMAT_CLASSES` are the views the
config validation uses. The folder layouts behind ``list_items`` are in :mod:`allspark_seg.data.layouts`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from allspark_seg.data import layouts
from allspark_seg.data import palette as pal
from allspark_seg.data.splits import Item
from allspark_seg.errors import ConfigError, DataError

__all__ = [
    "FORMATS",
    "FORMAT_ALIASES",
    "FORMAT_CLASSES",
    "FORMAT_NAMES",
    "DatasetInfo",
    "FormatSpec",
    "ItemLister",
    "describe_dataset",
    "get_format",
    "list_items",
    "read_class_names",
    "resolve_num_classes",
]

#: Lists the samples of one role: ``(root, role, split_file or None) -> items`` (files are not checked).
ItemLister = Callable[[Path, layouts.Role, Path | None], list[Item]]


@dataclass(frozen=True)
class FormatSpec:
    """What a dataset format fixes.

    Attributes:
        name: registry key.
        num_classes: K, or None when the data decides (folder: ``classes.txt`` or the caller).
        class_names: names of the K classes, or None.
        palette: K RGB colours, or None (then :func:`~allspark_seg.data.palette.palette_for` is used).
        description: one line for ``--help`` texts.
        list_items: lists the samples of a role (see :data:`ItemLister`); the folder layout by default.
    """

    name: str
    num_classes: int | None
    class_names: tuple[str, ...] | None
    palette: tuple[tuple[int, int, int], ...] | None
    description: str
    list_items: ItemLister = field(default=layouts.folder_items, repr=False, compare=False)

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
            "voc",
            21,
            pal.VOC_CLASSES,
            _tuples(pal.voc_colormap(21)),
            "Pascal VOC 2012 (JPEGImages + palette PNGs)",
            layouts.voc_items,
        ),
        "cityscapes": FormatSpec(
            "cityscapes",
            19,
            pal.CITYSCAPES_CLASSES,
            pal.CITYSCAPES_COLORS,
            "Cityscapes (leftImg8bit + gtFine)",
            layouts.cityscapes_items,
        ),
        "coco": FormatSpec(
            "coco", 81, pal.COCO_CLASSES, None, "COCO 2017, 80 things + background (masks/*.png)", layouts.coco_items
        ),
        "folder": FormatSpec("folder", None, None, None, "ROOT/{labeled,unlabeled,val} folders (custom data)"),
        "synthetic": FormatSpec("synthetic", None, None, None, "built-in generated shapes, folder layout"),
    }
)

#: Other names accepted by :func:`get_format`.
FORMAT_ALIASES: Mapping[str, str] = MappingProxyType({"pascal": "voc", "custom": "folder"})

#: The format names, in registry order (the choices of the config key ``data.format``).
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)

#: K of the formats that fix it.
FORMAT_CLASSES: Mapping[str, int] = MappingProxyType(
    {name: spec.num_classes for name, spec in FORMATS.items() if spec.num_classes is not None}
)


def get_format(name: str) -> FormatSpec:
    """Look up a format by name (``pascal`` is an alias of ``voc``, ``custom`` of ``folder``)."""
    key = FORMAT_ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        raise ConfigError(f"Unknown dataset format {name!r}; expected one of {sorted(FORMATS)}.")
    return FORMATS[key]


def list_items(format: str, root: Path, role: layouts.Role, split_file: Path | None) -> list[Item]:
    """The samples of one role of a dataset: the split file's when given, else the format's layout.

    Files are not checked (see :func:`allspark_seg.data.datasets.open_split`).
    """
    return get_format(format).list_items(root, role, split_file)


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
