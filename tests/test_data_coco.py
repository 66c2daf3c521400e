"""COCO mask conversion: the missing-extra message and the painting rules, with a fake COCO object."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from allspark_seg.data.coco import category_map, coco_to_masks, load_coco, paint_mask
from allspark_seg.errors import MissingExtraError


class FakeCoco:
    """The small part of pycocotools' COCO API the converter uses; masks are boxes [x, y, w, h]."""

    def __init__(self, images: list[dict[str, Any]], annotations: list[dict[str, Any]], cat_ids: list[int]) -> None:
        self.images = {img["id"]: img for img in images}
        self.annotations = {ann["id"]: ann for ann in annotations}
        self.cat_ids = cat_ids

    def getCatIds(self) -> list[int]:
        return list(self.cat_ids)

    def getImgIds(self) -> list[int]:
        return list(self.images)

    def loadImgs(self, ids: list[int]) -> list[dict[str, Any]]:
        return [self.images[i] for i in ids]

    def getAnnIds(self, imgIds: list[int], iscrowd: bool | None = None) -> list[int]:
        return [a["id"] for a in self.annotations.values() if a["image_id"] in imgIds]

    def loadAnns(self, ids: list[int]) -> list[dict[str, Any]]:
        return [self.annotations[i] for i in ids]

    def annToMask(self, ann: dict[str, Any]) -> np.ndarray:
        img = self.images[ann["image_id"]]
        mask = np.zeros((img["height"], img["width"]), np.uint8)
        x, y, w, h = ann["bbox"]
        mask[y : y + h, x : x + w] = 1
        return mask


def test_missing_pycocotools_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # behave as if it were not installed
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'allspark-seg\[coco\]'"):
        load_coco(tmp_path / "instances_val2017.json")
    with pytest.raises(MissingExtraError, match="Converting COCO annotations needs the 'pycocotools' package"):
        coco_to_masks(tmp_path / "instances_val2017.json", tmp_path, tmp_path / "masks")


def test_category_ids_map_in_sorted_order() -> None:
    coco_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    mapping = category_map(reversed(coco_ids))
    assert len(mapping) == 80 and mapping[1] == 1 and mapping[90] == 80 and mapping[13] == 12


def test_later_annotations_paint_over_earlier_ones_and_crowds_are_ignored() -> None:
    anns = [
        {"id": 1, "category_id": 5, "iscrowd": 0, "box": (0, 0, 4, 4)},
        {"id": 2, "category_id": 9, "iscrowd": 0, "box": (2, 2, 4, 4)},
        {"id": 3, "category_id": 5, "iscrowd": 1, "box": (5, 0, 1, 2)},
    ]

    def to_mask(ann: dict[str, Any]) -> np.ndarray:
        m = np.zeros((6, 7), np.uint8)
        x, y, w, h = ann["box"]
        m[y : y + h, x : x + w] = 1
        return m

    mask = paint_mask(anns, 6, 7, {5: 1, 9: 2}, to_mask)
    assert mask[0, 0] == 1 and mask[3, 3] == 2 and mask[5, 5] == 2 and mask[0, 5] == 255 and mask[5, 0] == 0


def test_coco_to_masks_with_a_fake_coco(tmp_path: Path) -> None:
    images = [
        {"id": 9, "file_name": "000000000009.jpg", "height": 5, "width": 6},
        {"id": 25, "file_name": "000000000025.jpg", "height": 4, "width": 4},
        {"id": 30, "file_name": "000000000030.jpg", "height": 4, "width": 4},  # not downloaded
    ]
    annotations = [
        {"id": 1, "image_id": 9, "category_id": 90, "iscrowd": 0, "bbox": [0, 0, 3, 3]},
        {"id": 2, "image_id": 9, "category_id": 1, "iscrowd": 1, "bbox": [4, 4, 2, 1]},
        {"id": 3, "image_id": 30, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1]},
    ]
    image_dir = tmp_path / "train2017"
    image_dir.mkdir()
    for name in ("000000000009.jpg", "000000000025.jpg"):
        (image_dir / name).write_bytes(b"")
    fake = FakeCoco(images, annotations, [1, 90])
    out = tmp_path / "masks" / "train2017"
    assert coco_to_masks(None, image_dir, out, coco=fake) == 2
    first = np.asarray(Image.open(out / "000000000009.png"))
    assert first.shape == (5, 6) and first[0, 0] == 2 and first[4, 4] == 255 and first[3, 0] == 0
    assert (np.asarray(Image.open(out / "000000000025.png")) == 0).all()
    assert not (out / "000000000030.png").exists()
