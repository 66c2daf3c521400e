"""The synthetic dataset: deterministic, exact masks, shape-coded classes, reused when identical."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from allspark_seg import data
from allspark_seg.data.synthetic import SHAPES, class_names, generate_synthetic, render_sample
from allspark_seg.errors import ConfigError, DataError

SIZES = {"num_labeled": 4, "num_unlabeled": 6, "num_val": 3, "image_size": 32}


def test_render_sample_is_deterministic_with_exact_masks() -> None:
    image, mask = render_sample(np.random.default_rng([1, 2, 3]), 48, 6)
    again, mask2 = render_sample(np.random.default_rng([1, 2, 3]), 48, 6)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8 and mask.shape == (48, 48)
    assert (image == again).all() and (mask == mask2).all()
    assert mask.max() < 6 and (mask > 0).any() and (mask == 0).any()
    rect, _ = render_sample(np.random.default_rng(0), (20, 40), 3)
    assert rect.shape == (20, 40, 3)


def test_colour_does_not_identify_the_class() -> None:
    means = {k: [] for k in range(1, 6)}
    for i in range(60):
        image, mask = render_sample(np.random.default_rng([0, 9, i]), 48, 6, max_objects=3)
        for k in means:
            if (mask == k).sum() > 20:
                means[k].append(image[mask == k].mean(axis=0))
    centres = np.array([np.mean(v, axis=0) for v in means.values()])
    assert all(len(v) >= 5 for v in means.values())
    assert np.abs(centres - centres.mean(axis=0)).max() < 45  # every class has the same colour distribution


def test_generate_writes_the_folder_layout(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "syn", seed=3, num_classes=5, **SIZES)
    assert (root / "classes.txt").read_text().split("\n")[:5] == list(class_names(5))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["num_unlabeled"] == 6
    labeled = data.open_split("synthetic", root, "labeled")
    unlabeled = data.open_split("synthetic", root, "unlabeled")
    val = data.open_split("synthetic", root, "val")
    assert (len(labeled), len(unlabeled), len(val)) == (4, 6, 3)
    assert all(item.mask is not None for item in unlabeled)  # diagnostics ground truth picked up
    assert data.resolve_num_classes("synthetic", root) == 5


def test_generation_is_deterministic_and_reused(tmp_path: Path) -> None:
    a = generate_synthetic(tmp_path / "a", seed=0, **SIZES)
    b = generate_synthetic(tmp_path / "b", seed=0, **SIZES)
    for rel in ("labeled/images/l00000.png", "unlabeled/u00005.png", "val/masks/v00002.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    stamp = (a / "manifest.json").stat().st_mtime_ns
    assert generate_synthetic(tmp_path / "a", seed=0, **SIZES) == a
    assert (a / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    generate_synthetic(tmp_path / "a", seed=1, **SIZES)  # a different request replaces it
    assert json.loads((a / "manifest.json").read_text())["seed"] == 1
    assert (a / "labeled/images/l00000.png").read_bytes() != (b / "labeled/images/l00000.png").read_bytes()


def test_sample_i_does_not_depend_on_the_other_sizes(tmp_path: Path) -> None:
    a = generate_synthetic(tmp_path / "a", seed=0, **SIZES)
    b = generate_synthetic(tmp_path / "b", seed=0, **{**SIZES, "num_unlabeled": 2})
    assert (a / "unlabeled/u00001.png").read_bytes() == (b / "unlabeled/u00001.png").read_bytes()


def test_without_unlabeled_masks(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "s", seed=0, unlabeled_masks=False, **SIZES)
    assert not (root / "unlabeled_masks").exists()
    assert all(i.mask is None for i in data.open_split("synthetic", root, "unlabeled"))


def test_refuses_to_overwrite_other_files(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="is not a synthetic dataset"):
        generate_synthetic(tmp_path / "mine", seed=0, **SIZES)
    assert (tmp_path / "mine" / "thesis.tex").exists()


@pytest.mark.parametrize("kwargs", [{"num_classes": 1}, {"num_classes": len(SHAPES) + 2}, {"num_labeled": 0}])
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        generate_synthetic(tmp_path / "s", seed=0, **{**SIZES, **kwargs})
