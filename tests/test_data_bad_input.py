"""Every bad input gets one DataError naming the file when the dataset is opened; odd but valid input works."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from allspark_seg import data
from allspark_seg.errors import ConfigError, DataError

H, W = 12, 16


def write_image(path: Path, size: tuple[int, int] = (H, W), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3)).astype(np.uint8)).save(path)
    return path


def write_mask(path: Path, size: tuple[int, int] = (H, W), value: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def folder(root: Path, n: int = 3, ext: str = "png") -> Path:
    for i in range(n):
        write_image(root / "labeled" / "images" / f"s{i}.{ext}", seed=i)
        write_mask(root / "labeled" / "masks" / f"s{i}.png", value=i % 3)
        write_image(root / "unlabeled" / f"u{i}.{ext}", seed=10 + i)
        write_image(root / "val" / "images" / f"v{i}.{ext}", seed=20 + i)
        write_mask(root / "val" / "masks" / f"v{i}.png", value=2)
    return root


def open_labeled(root: Path, role: str = "labeled", **kw: object) -> list[data.Item]:
    return data.open_split("folder", root, role, num_classes=3, **kw)  # type: ignore[arg-type]


def raises_naming(path: Path, problem: str) -> pytest.RaisesContext:
    return pytest.raises(DataError, match=re.escape(str(path)) + ".*" + problem)


def truncate(path: Path, keep: float = 0.6) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def test_a_good_folder_opens(tmp_path: Path) -> None:
    root = folder(tmp_path)
    assert [len(open_labeled(root, role)) for role in ("labeled", "unlabeled", "val")] == [3, 3, 3]


# ----------------------------------------------------------------------------------------- missing files


def test_missing_mask_in_folder(tmp_path: Path) -> None:
    root = folder(tmp_path)
    (root / "labeled" / "masks" / "s1.png").unlink()
    with raises_naming(root / "labeled" / "masks" / "s1.png", "is missing for image"):
        open_labeled(root)


def test_mask_without_image_in_folder(tmp_path: Path) -> None:
    root = folder(tmp_path)
    write_mask(root / "val" / "masks" / "orphan.png")
    with raises_naming(root / "val" / "masks" / "orphan.png", "has no image"):
        open_labeled(root, "val")


def test_missing_image_and_mask_in_a_split_file(tmp_path: Path) -> None:
    root = folder(tmp_path)
    split = root / "split.txt"
    split.write_text("labeled/images/s0.png labeled/masks/s0.png\nlabeled/images/nope.png labeled/masks/s1.png\n")
    with raises_naming(root / "labeled" / "images" / "nope.png", "does not exist"):
        open_labeled(root, split_file=split)
    split.write_text("labeled/images/s0.png labeled/masks/gone.png\n")
    with raises_naming(root / "labeled" / "masks" / "gone.png", "does not exist"):
        open_labeled(root, split_file=split)
    with raises_naming(root / "missing.txt", "does not exist"):
        open_labeled(root, split_file=root / "missing.txt")


def test_missing_unlabeled_masks_are_optional(tmp_path: Path) -> None:
    root = folder(tmp_path)
    split = root / "u.txt"
    split.write_text("unlabeled/u0.png labeled/masks/none.png\n")
    assert open_labeled(root, "unlabeled", split_file=split)[0].mask is None


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    root = folder(tmp_path)
    for f in (root / "unlabeled").iterdir():
        f.unlink()
    (root / "unlabeled" / "readme.txt").write_text("no images here")
    with raises_naming(root / "unlabeled", "has no images"):
        open_labeled(root, "unlabeled")
    for f in (root / "val" / "images").iterdir():
        f.unlink()
    with raises_naming(root / "val" / "images", "has no images"):
        open_labeled(root, "val")
    with raises_naming(tmp_path / "nowhere", "does not exist"):
        data.open_split("folder", tmp_path / "nowhere", "labeled", num_classes=3)
    with raises_naming(tmp_path / "empty" / "labeled" / "images", "does not exist"):
        (tmp_path / "empty").mkdir()
        data.open_split("folder", tmp_path / "empty", "labeled", num_classes=3)


def test_empty_split_file(tmp_path: Path) -> None:
    root = folder(tmp_path)
    (root / "empty.txt").write_text("\n\n")
    with raises_naming(root / "empty.txt", "lists no images"):
        open_labeled(root, "unlabeled", split_file=root / "empty.txt")


# -------------------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image(tmp_path: Path, ext: str) -> None:
    root = folder(tmp_path, ext=ext)
    bad = root / "labeled" / "images" / f"s2.{ext}"
    write_image(bad, size=(64, 64))  # big enough to have entropy-coded data to lose
    write_mask(root / "labeled" / "masks" / "s2.png", size=(64, 64))
    truncate(bad)
    with raises_naming(bad, "cannot be read"):
        open_labeled(root)


def test_truncated_unlabeled_image(tmp_path: Path) -> None:
    root = folder(tmp_path, ext="jpg")
    bad = write_image(root / "unlabeled" / "u1.jpg", size=(64, 64))
    truncate(bad)
    with raises_naming(bad, "cannot be read"):
        open_labeled(root, "unlabeled")


def test_unreadable_image(tmp_path: Path) -> None:
    root = folder(tmp_path)
    bad = root / "unlabeled" / "u0.png"
    bad.write_bytes(b"this is not a png")
    with raises_naming(bad, "not an image file"):
        open_labeled(root, "unlabeled")


def test_truncated_mask(tmp_path: Path) -> None:
    root = folder(tmp_path)
    bad = root / "val" / "masks" / "v0.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 3, (H, W)).astype(np.uint8)).save(bad)
    truncate(bad, 0.5)
    with raises_naming(bad, "cannot be read"):
        open_labeled(root, "val")


# --------------------------------------------------------------------------------------------- bad masks


def test_mask_size_differs_from_image(tmp_path: Path) -> None:
    root = folder(tmp_path)
    bad = write_mask(root / "labeled" / "masks" / "s0.png", size=(H, W + 1))
    with raises_naming(bad, f"is {W + 1}x{H} but its image .*s0.png is {W}x{H}"):
        open_labeled(root)


def test_mask_values_outside_the_classes(tmp_path: Path) -> None:
    root = folder(tmp_path)
    bad = write_mask(root / "val" / "masks" / "v1.png", value=7)
    with raises_naming(bad, r"values 7 outside \[0, 3\) that are not the ignore value 255"):
        open_labeled(root, "val")


def test_ignore_value_is_allowed(tmp_path: Path) -> None:
    root = folder(tmp_path)
    write_mask(root / "val" / "masks" / "v1.png", value=255)
    assert len(open_labeled(root, "val")) == 3


def test_rgb_mask_is_rejected_but_palette_mask_works(tmp_path: Path) -> None:
    root = folder(tmp_path)
    bad = root / "labeled" / "masks" / "s1.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(bad)
    with raises_naming(bad, "3 channels .*not a palette image"):
        open_labeled(root)
    palette = Image.fromarray(np.full((H, W), 2, np.uint8)).convert("P")
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (253 * 3))
    palette.save(bad)
    assert data.load_mask(bad)[0, 0] == 2 and len(open_labeled(root)) == 3


def test_sixteen_bit_mask_values(tmp_path: Path) -> None:
    root = folder(tmp_path)
    good = root / "labeled" / "masks" / "s0.png"
    Image.fromarray(np.full((H, W), 2, np.uint16)).save(good)
    assert len(open_labeled(root)) == 3
    Image.fromarray(np.full((H, W), 1000, np.uint16)).save(good)
    with raises_naming(good, "values up to 1000"):
        open_labeled(root)


def test_binary_masks_saved_as_0_and_255_get_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = folder(tmp_path)
    for i in range(3):
        write_mask(root / "labeled" / "masks" / f"s{i}.png", value=255 * (i % 2))
    with caplog.at_level("WARNING", logger="allspark_seg.data.datasets"):
        open_labeled(root)
    assert "only class 0 and 255" in caplog.text
    report = data.scan_items(open_labeled(root, check=False), 3)
    assert (report.items, report.masks, report.foreground, report.ignore) == (3, 3, False, True)


def test_jpeg_mask_is_rejected(tmp_path: Path) -> None:
    root = folder(tmp_path)
    (root / "labeled" / "masks" / "s0.png").unlink()
    bad = write_image(root / "labeled" / "masks" / "s0.jpg")
    with raises_naming(bad, "is a JPEG"):
        open_labeled(root)


def test_two_images_with_one_name(tmp_path: Path) -> None:
    root = folder(tmp_path)
    write_image(root / "labeled" / "images" / "s0.jpg")
    with pytest.raises(DataError, match="same name"):
        open_labeled(root)


def test_several_bad_files_give_one_error_with_a_count(tmp_path: Path) -> None:
    root = folder(tmp_path)
    first = write_mask(root / "val" / "masks" / "v0.png", value=9)
    write_mask(root / "val" / "masks" / "v2.png", value=9)
    with pytest.raises(DataError, match=re.escape(str(first)) + r".*\(1 other files have problems too\.\)"):
        open_labeled(root, "val")


def test_no_check_skips_the_scan_but_not_missing_files(tmp_path: Path) -> None:
    root = folder(tmp_path)
    write_mask(root / "val" / "masks" / "v1.png", value=7)
    assert len(open_labeled(root, "val", check=False)) == 3
    (root / "val" / "images" / "v1.png").unlink()
    with pytest.raises(DataError, match="is missing for image|has no image"):
        open_labeled(root, "val", check=False)


# ------------------------------------------------------------------------------------------- split files


@pytest.mark.parametrize("line", ["../outside.png", "labeled/../../outside.png", "/etc/hostname"])
def test_split_line_outside_the_root(tmp_path: Path, line: str) -> None:
    root = folder(tmp_path / "root")
    write_image(tmp_path / "outside.png")
    split = root / "u.txt"
    split.write_text(f"unlabeled/u0.png\n{line}\n")
    with raises_naming(split, "line 2: .*points outside the data root"):
        open_labeled(root, "unlabeled", split_file=split)


def test_symlinked_folders_inside_the_root_are_fine(tmp_path: Path) -> None:
    store = folder(tmp_path / "store")
    root = tmp_path / "root"
    root.mkdir()
    (root / "labeled").symlink_to(store / "labeled")
    split = root / "l.txt"
    split.write_text("labeled/images/s0.png labeled/masks/s0.png\n")
    assert open_labeled(root, split_file=split)[0].name == "s0"


def test_split_file_references_a_file_twice(tmp_path: Path) -> None:
    root = folder(tmp_path)
    split = root / "l.txt"
    split.write_text(
        "labeled/images/s0.png labeled/masks/s0.png\nlabeled/images/s1.png labeled/masks/s1.png\n"
        "labeled/./images/s0.png labeled/masks/s2.png\n"
    )
    with raises_naming(split, "line 3: 'labeled/./images/s0.png' was already referenced on line 1"):
        open_labeled(root, split_file=split)
    split.write_text("labeled/images/s0.png labeled/masks/s0.png\nlabeled/images/s1.png labeled/masks/s0.png\n")
    with raises_naming(split, "line 2: 'labeled/masks/s0.png' was already referenced on line 1"):
        open_labeled(root, split_file=split)


def test_labeled_split_line_without_a_mask(tmp_path: Path) -> None:
    root = folder(tmp_path)
    split = root / "l.txt"
    split.write_text("labeled/images/s0.png\n")
    with raises_naming(split, "line 1: .*has no mask path"):
        open_labeled(root, split_file=split)


def test_bad_role_and_format(tmp_path: Path) -> None:
    root = folder(tmp_path)
    with pytest.raises(ConfigError, match="role"):
        open_labeled(root, "train")
    with pytest.raises(ConfigError, match="format"):
        data.open_split("kitti", root, "labeled")


# ------------------------------------------------------------------------------- odd input that must work


def save_mode(path: Path, mode: str) -> Path:
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65536, (H, W)).astype(np.uint16)).save(path)
    elif mode == "I":
        Image.fromarray(rng.integers(0, 4096, (H, W)).astype(np.int32)).save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (H, W, 3)).astype(np.uint8)).convert(mode).save(path)
    return path


@pytest.mark.parametrize(
    ("mode", "ext"),
    [("L", "png"), ("RGBA", "png"), ("I;16", "png"), ("I", "tif"), ("CMYK", "jpg"), ("CMYK", "tif"), ("P", "png")],
)
def test_odd_image_modes_are_converted_to_rgb(tmp_path: Path, mode: str, ext: str) -> None:
    root = folder(tmp_path)
    odd = save_mode(root / "labeled" / "images" / f"s0.{ext}", mode)
    if ext != "png":
        (root / "labeled" / "images" / "s0.png").unlink()
    with Image.open(odd) as check:
        assert check.mode.startswith(mode[0])
    image = data.load_image(odd)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8 and image.std() > 0
    items = open_labeled(root)
    sample = data.TrainDataset(items, role="labeled", crop_size=8, seed=0, num_classes=3)[0]
    assert sample["image"].shape == (3, 8, 8)


def test_rare_image_modes_are_converted_or_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = folder(tmp_path)
    (root / "unlabeled" / "u0.png").unlink()
    lab = root / "unlabeled" / "u0.tif"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).convert("LAB").save(lab)
    assert len(open_labeled(root, "unlabeled")) == 3 and data.load_image(lab).shape == (H, W, 3)

    def refuse(image: Image.Image) -> np.ndarray:
        raise ValueError(f"conversion from {image.mode} to RGB not supported")

    monkeypatch.setattr("allspark_seg.data.files.to_rgb", refuse)
    with raises_naming(lab, "has mode LAB, which cannot be converted to RGB"):
        open_labeled(root, "unlabeled")


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)).save(path)
    assert data.load_image(path)[0, :, 0].tolist() == [0, 128, 255]


def test_images_smaller_than_the_crop_are_padded(tmp_path: Path) -> None:
    root = folder(tmp_path)
    write_image(root / "labeled" / "images" / "s0.png", size=(3, 5))
    write_mask(root / "labeled" / "masks" / "s0.png", size=(3, 5), value=1)
    items = open_labeled(root)
    ds = data.TrainDataset(items, role="labeled", crop_size=32, seed=0, num_classes=3)
    sample = ds[0]
    assert sample["image"].shape == (3, 32, 32) and (sample["mask"] == 255).float().mean() > 0.9
