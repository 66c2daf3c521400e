"""Readers (VOC, Cityscapes, COCO, folder) on tiny trees written to tmp_path, and the torch datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from allspark_seg import data
from allspark_seg.constants import IGNORE_INDEX
from allspark_seg.data.datasets import CITYSCAPES_ID_TO_TRAINID
from allspark_seg.data.palette import palette_image, voc_colormap
from allspark_seg.errors import ConfigError, DataError

H, W = 12, 16


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (H, W)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3)).astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def write_mask(path: Path, mask: np.ndarray, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = palette_image(mask, voc_colormap(256)) if palette else Image.fromarray(mask.astype(np.uint8))
    image.save(path)
    return path


def class_mask(value: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.full(size, value, dtype=np.uint8)
    mask[0, :] = 255
    mask[1, 0] = 0
    return mask


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ trees


def voc_tree(root: Path, mask_folder: str = "SegmentationClass") -> Path:
    ids = ["2007_000032", "2007_000039", "2007_000063", "2007_000121"]
    for i, name in enumerate(ids):
        write_image(root / "JPEGImages" / f"{name}.jpg", i)
        write_mask(root / mask_folder / f"{name}.png", class_mask(i + 1), palette=True)
    write_lines(root / "ImageSets" / "Segmentation" / "train.txt", ids[:3])
    write_lines(root / "ImageSets" / "Segmentation" / "val.txt", ids[3:])
    lines = [f"JPEGImages/{n}.jpg SegmentationClass/{n}.png" for n in ids]
    write_lines(root / "splits" / "92" / "labeled.txt", lines[:1])
    write_lines(root / "splits" / "92" / "unlabeled.txt", lines[1:3])
    return root


def cityscapes_tree(root: Path) -> Path:
    label_ids = np.array([[7, 8, 11, 26], [33, 0, 1, 24], [23, 31, 32, 4]], dtype=np.uint8)
    label_ids = np.kron(label_ids, np.ones((4, 4), np.uint8))  # (12, 16)
    for subset, city, frame, train_ids in [
        ("train", "aachen", "aachen_000000_000019", True),
        ("train", "bochum", "bochum_000000_000313", False),
        ("val", "frankfurt", "frankfurt_000000_000294", False),
    ]:
        write_image(root / "leftImg8bit" / subset / city / f"{frame}_leftImg8bit.png")
        gt = root / "gtFine" / subset / city
        write_mask(gt / f"{frame}_gtFine_labelIds.png", label_ids)
        if train_ids:
            lut = np.asarray(CITYSCAPES_ID_TO_TRAINID + (255,) * (256 - 34), dtype=np.uint8)
            write_mask(gt / f"{frame}_gtFine_labelTrainIds.png", lut[label_ids])
    return root


def coco_tree(root: Path) -> Path:
    for subset, names in [("train2017", ["000000000009", "000000000025"]), ("val2017", ["000000000139"])]:
        for i, name in enumerate(names):
            write_image(root / subset / f"{name}.jpg", i)
            write_mask(root / "masks" / subset / f"{name}.png", class_mask(80 - i))
    write_lines(
        root / "splits" / "1_512" / "labeled.txt", ["train2017/000000000009.jpg masks/train2017/000000000009.png"]
    )
    write_lines(root / "splits" / "1_512" / "unlabeled.txt", ["train2017/000000000025.jpg"])
    return root


def folder_tree(root: Path, num_classes: int = 3, unlabeled_masks: bool = False) -> Path:
    for i, name in enumerate(["a", "b", "c"]):
        write_image(root / "labeled" / "images" / f"{name}.jpg", i)
        write_mask(root / "labeled" / "masks" / f"{name}.png", class_mask(i % num_classes), palette=i == 1)
    for i, ext in enumerate(["jpg", "jpeg", "png", "bmp", "tif", "tiff"]):
        write_image(root / "unlabeled" / f"u{i}.{ext}", 10 + i)
        if unlabeled_masks and i < 2:
            write_mask(root / "unlabeled_masks" / f"u{i}.png", class_mask(1))
    (root / "unlabeled" / "notes.txt").write_text("not an image")
    write_image(root / "val" / "images" / "v.png", 20)
    write_mask(root / "val" / "masks" / "v.png", class_mask(num_classes - 1))
    return root


# ---------------------------------------------------------------------------------------------- readers


def test_formats_registry() -> None:
    assert {"voc", "cityscapes", "coco", "folder", "synthetic"} <= set(data.FORMATS)
    assert [data.FORMATS[k].num_classes for k in ("voc", "cityscapes", "coco", "folder")] == [21, 19, 81, None]
    assert data.FORMATS["voc"].palette_array().shape == (21, 3)
    assert tuple(data.FORMATS["cityscapes"].palette_array()[0]) == (128, 64, 128)
    assert data.FORMATS["coco"].palette_array().shape == (81, 3)
    assert data.FORMATS["folder"].palette_array(5).shape == (5, 3)
    assert data.get_format("pascal") is data.FORMATS["voc"]
    assert data.palette_for(200).shape == (200, 3) and len({tuple(c) for c in data.palette_for(200)}) == 200
    with pytest.raises(ConfigError, match="Unknown dataset format"):
        data.get_format("ade20k")


def test_voc_reader(tmp_path: Path) -> None:
    root = voc_tree(tmp_path)
    labeled = data.open_split("voc", root, "labeled", split_file=root / "splits/92/labeled.txt")
    unlabeled = data.open_split("voc", root, "unlabeled", split_file=root / "splits/92/unlabeled.txt")
    val = data.open_split("voc", root, "val")
    full = data.open_split("voc", root, "labeled")  # ImageSets/Segmentation/train.txt
    assert [i.name for i in labeled] == ["2007_000032"]
    assert [i.name for i in unlabeled] == ["2007_000039", "2007_000063"]
    assert all(i.mask is not None for i in unlabeled)  # the SBD masks exist: kept as diagnostics
    assert [i.name for i in val] == ["2007_000121"] and len(full) == 3
    mask = data.load_mask(labeled[0].mask)
    assert mask.dtype == np.uint8 and mask[5, 5] == 1 and mask[0, 0] == 255  # palette indices are the ids
    no_gt = data.open_split(
        "voc", root, "unlabeled", split_file=root / "splits/92/unlabeled.txt", unlabeled_masks=False
    )
    assert all(i.mask is None for i in no_gt)


def test_voc_reader_accepts_the_segmentationclassaug_folder(tmp_path: Path) -> None:
    root = voc_tree(tmp_path, mask_folder="SegmentationClassAug")
    labeled = data.open_split("voc", root, "labeled", split_file=root / "splits/92/labeled.txt")
    assert labeled[0].mask == root / "SegmentationClassAug" / "2007_000032.png"
    assert data.open_split("voc", root, "val")[0].mask.parent.name == "SegmentationClassAug"


def test_voc_unlabeled_needs_a_split_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="split file"):
        data.open_split("voc", voc_tree(tmp_path), "unlabeled")


def test_cityscapes_reader_prefers_train_ids_and_maps_label_ids(tmp_path: Path) -> None:
    root = cityscapes_tree(tmp_path)
    train = data.open_split("cityscapes", root, "labeled")
    assert [i.name for i in train] == ["aachen_000000_000019", "bochum_000000_000313"]
    assert train[0].mask.name.endswith("_labelTrainIds.png") and train[0].mask_encoding == "ids"
    assert train[1].mask.name.endswith("_labelIds.png") and train[1].mask_encoding == "cityscapes_label_ids"
    direct = data.load_mask(train[0].mask, train[0].mask_encoding)
    mapped = data.load_mask(train[1].mask, train[1].mask_encoding)
    expected = np.array([[0, 1, 2, 13], [18, 255, 255, 11], [10, 16, 17, 255]], dtype=np.uint8)
    assert (mapped[::4, ::4] == expected).all() and (direct == mapped).all()
    val = data.open_split("cityscapes", root, "val")
    assert [i.name for i in val] == ["frankfurt_000000_000294"]
    split = write_lines(
        root / "splits" / "1_16" / "labeled.txt",
        [
            "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png "
            "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png"
        ],
    )
    from_split = data.open_split("cityscapes", root, "labeled", split_file=split)
    assert from_split[0].mask_encoding == "cityscapes_label_ids"  # labelTrainIds missing: labelIds mapped


def test_cityscapes_table_matches_the_official_labels() -> None:
    table = dict(enumerate(CITYSCAPES_ID_TO_TRAINID))
    assert len(CITYSCAPES_ID_TO_TRAINID) == 34
    assert {i: t for i, t in table.items() if t != 255} == {
        7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
        28: 15, 31: 16, 32: 17, 33: 18,
    }  # fmt: skip


def test_coco_reader(tmp_path: Path) -> None:
    root = coco_tree(tmp_path)
    labeled = data.open_split("coco", root, "labeled", split_file=root / "splits/1_512/labeled.txt")
    unlabeled = data.open_split("coco", root, "unlabeled", split_file=root / "splits/1_512/unlabeled.txt")
    val = data.open_split("coco", root, "val")
    assert [i.name for i in labeled] == ["000000000009"] and data.load_mask(labeled[0].mask)[5, 5] == 80
    assert unlabeled[0].mask is None and [i.name for i in val] == ["000000000139"]
    assert val[0].mask == root / "masks" / "val2017" / "000000000139.png"


def test_folder_reader(tmp_path: Path) -> None:
    root = folder_tree(tmp_path)
    labeled = data.open_split("folder", root, "labeled", num_classes=3)
    unlabeled = data.open_split("folder", root, "unlabeled", num_classes=3)
    val = data.open_split("folder", root, "val", num_classes=3)
    assert [i.name for i in labeled] == ["a", "b", "c"]
    assert sorted(i.image.suffix for i in unlabeled) == sorted([".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"])
    assert all(i.mask is None for i in unlabeled) and val[0].name == "v"
    assert data.load_mask(labeled[1].mask)[5, 5] == 1  # the palette mask


def test_folder_reader_picks_up_optional_unlabeled_ground_truth(tmp_path: Path) -> None:
    root = folder_tree(tmp_path, unlabeled_masks=True)
    unlabeled = data.open_split("folder", root, "unlabeled", num_classes=3)
    assert {i.name for i in unlabeled if i.mask is not None} == {"u0", "u1"}


def test_folder_unlabeled_images_subfolder(tmp_path: Path) -> None:
    write_image(tmp_path / "unlabeled" / "images" / "x.png")
    assert [i.name for i in data.open_split("folder", tmp_path, "unlabeled", num_classes=2)] == ["x"]


def test_number_of_classes(tmp_path: Path) -> None:
    root = folder_tree(tmp_path)
    with pytest.raises(ConfigError, match="num_classes"):
        data.open_split("folder", root, "labeled")
    (root / "classes.txt").write_text("background\ncat\ndog\n\n")
    assert data.resolve_num_classes("folder", root) == 3
    info = data.describe_dataset("folder", root)
    assert info.class_names == ("background", "cat", "dog") and info.palette.shape == (3, 3)
    assert len(data.open_split("folder", root, "labeled")) == 3
    with pytest.raises(ConfigError, match=r"classes.txt lists 3 classes, but num_classes=4"):
        data.open_split("folder", root, "labeled", num_classes=4)
    with pytest.raises(ConfigError, match="21 classes"):
        data.resolve_num_classes("voc", root, 19)
    assert data.describe_dataset("cityscapes", root).class_names[0] == "road"


def test_folder_with_a_split_file(tmp_path: Path) -> None:
    root = folder_tree(tmp_path)
    split = write_lines(root / "split.txt", ["labeled/images/b.jpg labeled/masks/b.png"])
    assert [i.name for i in data.open_split("folder", root, "labeled", num_classes=3, split_file=split)] == ["b"]


def test_list_train_items_feeds_make_split(tmp_path: Path) -> None:
    root = voc_tree(tmp_path)
    items = data.list_train_items("voc", root)
    lab, unl = data.make_split(items, 1, None, 0, tmp_path / "s", root=root)
    assert lab.read_text().count("\n") == 1 and unl.read_text().count("\n") == 2
    assert data.open_split("voc", root, "labeled", split_file=lab)[0].mask is not None


# --------------------------------------------------------------------------------------------- datasets


def test_train_dataset_is_deterministic_per_seed_epoch_index(tmp_path: Path) -> None:
    items = data.open_split("folder", folder_tree(tmp_path), "labeled", num_classes=3)
    ds = data.TrainDataset(items, role="labeled", crop_size=16, seed=5, num_classes=3)
    a, b, c = ds[(1, 2)], ds[(1, 2)], ds[(1, 3)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])
    assert torch.equal(ds[1]["image"], ds[(1, 0)]["image"])
    other_seed = data.TrainDataset(items, role="labeled", crop_size=16, seed=6, num_classes=3)
    assert not torch.equal(a["image"], other_seed[(1, 2)]["image"])
    assert a["mask"].dtype == torch.int64 and set(a["mask"].unique().tolist()) <= {0, 1, 2, 255}


def test_train_dataset_length_repeats_the_ids(tmp_path: Path) -> None:
    items = data.open_split("folder", folder_tree(tmp_path), "labeled", num_classes=3)
    ds = data.TrainDataset(items, role="labeled", crop_size=8, seed=0, num_classes=3, length=7)
    assert len(ds) == 7
    assert [ds.item_at(i).name for i in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    assert ds.item_at(7).name == "a" and ds.item_at(8).name == "b"  # the sampler's extra laps wrap around
    with pytest.raises(IndexError):
        ds.item_at(-1)


def test_train_dataset_unlabeled_outputs(tmp_path: Path) -> None:
    root = folder_tree(tmp_path, unlabeled_masks=True)
    items = data.open_split("folder", root, "unlabeled", num_classes=3)
    for pipeline in data.PIPELINES:
        ds = data.TrainDataset(items, role="unlabeled", crop_size=24, pipeline=pipeline, seed=0, num_classes=3)
        with_gt = ds[(0, 0)]  # u0 has ground truth
        assert with_gt["ignore"].dtype == torch.bool and with_gt["ignore"].any()  # 12x16 image padded to 24
        assert (with_gt["mask"] != IGNORE_INDEX).any()
    images_only = data.open_split("folder", root, "unlabeled", num_classes=3, unlabeled_masks=False)
    ds = data.TrainDataset(images_only, role="unlabeled", crop_size=8, pipeline="unimatch", seed=0, num_classes=3)
    assert set(ds[2]) == {"image", "image_s1", "image_s2", "cutmix_box1", "cutmix_box2", "ignore"}


def test_unlabeled_ground_truth_of_some_images_gives_every_sample_a_mask(tmp_path: Path) -> None:
    """``unlabeled_masks/`` half filled: the images without one get an all-ignore mask (same augmentation), so
    every batch collates in any order and the accuracy diagnostics count only the images with ground truth."""
    root = folder_tree(tmp_path, unlabeled_masks=True)  # masks for u0 and u1 of u0..u5
    items = data.open_split("folder", root, "unlabeled", num_classes=3)
    images_only = data.open_split("folder", root, "unlabeled", num_classes=3, unlabeled_masks=False)
    for pipeline in data.PIPELINES:
        kwargs = {"role": "unlabeled", "crop_size": 8, "pipeline": pipeline, "seed": 0, "num_classes": 3}
        ds, plain = data.TrainDataset(items, **kwargs), data.TrainDataset(images_only, **kwargs)
        without = ds[(2, 0)]
        assert without["mask"].shape == (8, 8) and bool((without["mask"] == IGNORE_INDEX).all())
        for key, value in plain[(2, 0)].items():
            assert torch.equal(without[key], value), key
        for order in ([0, 2], [2, 0]):
            batch = torch.utils.data.default_collate([ds[(i, 0)] for i in order])
            assert batch["mask"].shape == (2, 8, 8)


def test_train_dataset_rejects_bad_arguments(tmp_path: Path) -> None:
    root = folder_tree(tmp_path)
    unlabeled = data.open_split("folder", root, "unlabeled", num_classes=3)
    with pytest.raises(DataError, match="has no mask"):
        data.TrainDataset(unlabeled, role="labeled", crop_size=8, seed=0, num_classes=3)
    with pytest.raises(ConfigError, match="pipeline"):
        data.TrainDataset(unlabeled, role="unlabeled", crop_size=8, pipeline="x", seed=0, num_classes=3)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="empty"):
        data.TrainDataset([], role="unlabeled", crop_size=8, seed=0, num_classes=3)


def test_val_dataset(tmp_path: Path) -> None:
    items = data.open_split("folder", folder_tree(tmp_path), "val", num_classes=3)
    sample = data.ValDataset(items, 3)[0]
    assert sample["image"].shape == (3, H, W) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (H, W) and sample["mask"].dtype == torch.int64 and sample["name"] == "v"
    batch = next(iter(data.build_val_loader(data.ValDataset(items, 3))))
    assert batch["image"].shape == (1, 3, H, W) and batch["name"] == ["v"]
