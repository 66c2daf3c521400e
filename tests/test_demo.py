"""The demo on a tiny budget: both recipes trained, table, pictures and index.html; and without matplotlib."""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from allspark_seg import cli, viz
from allspark_seg.demo import DEMO_CONFIG, QUICK_OVERRIDES, demo_config, run_demo, torch_threads
from allspark_seg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "model.embed_dims=[8, 16, 32, 64]",
    "model.depths=[1, 1, 1, 1]",
    "model.num_heads=[1, 1, 2, 2]",
    "model.head_dim=32",
    "data.crop_size=64",
    "data.synthetic.num_labeled=4",
    "data.synthetic.num_unlabeled=8",
    "data.synthetic.num_val=3",
    "data.synthetic.image_size=64",
    "data.synthetic.num_classes=4",
    "train.iterations=4",
    "train.eval_every=2",
    "train.log_every=2",
    "train.device=cpu",
    "semi.warmup_iterations=2",
]


def test_config_file_is_the_demo_config() -> None:
    assert yaml.safe_load((REPO / "configs" / "synthetic_demo.yaml").read_text()) == DEMO_CONFIG


def test_recipes_share_everything_but_the_method() -> None:
    for quick in (False, True):
        sup, semi = demo_config("supervised", quick=quick), demo_config("allspark", quick=quick)
        assert sup.data == semi.data and sup.train == semi.train and sup.eval == semi.eval
        assert sup.model.embed_dims == semi.model.embed_dims
        assert (sup.model.allspark.enabled, semi.model.allspark.enabled) == (False, True)
    quick = demo_config("allspark", quick=True)
    assert quick.train.iterations < demo_config("allspark").train.iterations
    assert len(QUICK_OVERRIDES) == len(set(QUICK_OVERRIDES))


@pytest.mark.slow
def test_tiny_demo_writes_table_pictures_and_page(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo", overrides=TINY)
    assert list(result.runs) == ["supervised", "allspark"]
    assert result.class_names == ("background", "disc", "square", "triangle")
    for run in result.runs.values():
        assert 0.0 <= run.miou <= 1.0 and len(run.iou) == 4
        assert [r["step"] for r in run.history if r["type"] == "eval"] == [2, 4]
    assert result.runs["allspark"].history[0].get("loss_u") is not None
    lines = result.table.splitlines()
    assert lines[0].split() == ["supervised", "allspark"]
    assert sum(line.strip().startswith("IoU ") for line in lines) == 4
    assert f"{100 * result.runs['allspark'].miou:.1f}" in lines[2]
    grid = Image.open(result.files["predictions"])
    assert grid.width > grid.height  # 4 columns (image, truth, two predictions) by 3 validation images
    for name in ("curves", "per_class_iou"):
        assert Image.open(result.files[name]).size[0] > 300
    page = result.files["index"].read_text()
    for image in ("predictions.png", "curves.png", "per_class_iou.png"):
        assert f'src="{image}"' in page
    assert "mIoU (final)" in page and "supervised" in page
    summary = json.loads(result.files["summary"].read_text())
    assert summary["runs"]["allspark"]["miou"] == result.runs["allspark"].miou


@pytest.mark.slow
def test_demo_command_without_matplotlib_still_draws_predictions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not viz.has_matplotlib()
    code = cli.main(["demo", "--out", str(tmp_path / "demo"), "--set", *TINY])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "mIoU (final)" in out and "index.html" in out
    assert "matplotlib is not installed" in err
    assert (tmp_path / "demo" / "predictions.png").is_file() and (tmp_path / "demo" / "demo.log").is_file()
    assert not (tmp_path / "demo" / "curves.png").exists()
    assert html.escape(viz.VIZ_HINT) in (tmp_path / "demo" / "index.html").read_text()


def test_prediction_grid_layout() -> None:
    tile = np.zeros((10, 20, 3), np.uint8)
    tile[:, :, 0] = 255
    grid = viz.prediction_grid([[tile, tile], [tile, tile]], ["a", "b"], tile=40, pad=4)
    assert grid.width == 2 * 44 + 4
    pixels = np.asarray(grid)
    red = (pixels == [255, 0, 0]).all(axis=-1)
    assert red.sum() == 4 * 20 * 40  # four 10x20 tiles scaled to a 40-pixel long side
    assert (pixels[: grid.height - 2 * 44] < 128).all(axis=-1).any()  # dark title text above the tiles
    with pytest.raises(ValueError, match="one tile per title"):
        viz.prediction_grid([[tile]], ["a", "b"])


def test_torch_threads_are_restored() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="at least 1"), torch_threads(0):
        pass
    assert torch.get_num_threads() == before
