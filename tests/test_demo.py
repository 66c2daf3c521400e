"""The demo on a tiny budget: every recipe trained, table with the gap closed, pictures and index.html; and without
matplotlib."""

from __future__ import annotations

import html
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from allspark_seg import cli, viz
from allspark_seg.demo import (
    DEMO_CONFIG,
    DEMO_RECIPES,
    QUICK_OVERRIDES,
    DemoRecipe,
    RecipeResult,
    demo_config,
    gap_closed,
    run_demo,
    torch_threads,
    verdict,
)
from allspark_seg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

NAMES = ["labels-only", "allspark+", "fixmatch+teacher+area_cap", "all-labels"]
TINY = [
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


def test_recipes_share_everything_but_the_method_and_the_labels() -> None:
    assert [r.name for r in DEMO_RECIPES] == NAMES
    for quick in (False, True):
        cfgs = {r.name: demo_config(r, quick=quick) for r in DEMO_RECIPES}
        few, full = cfgs["labels-only"], cfgs["all-labels"]
        for cfg in cfgs.values():
            assert cfg.train == few.train and cfg.eval == few.eval
            assert cfg.model.encoder == "mobilenet_v2" and cfg.model.pretrained == few.model.pretrained
        s = few.data.synthetic
        assert full.data.synthetic.num_labeled == s.num_labeled + s.num_unlabeled
        assert {n: c.data.synthetic.num_labeled for n, c in cfgs.items() if n != "all-labels"} == dict.fromkeys(
            NAMES[:3], s.num_labeled
        )
        assert [c.method for c in cfgs.values()] == ["supervised", "allspark+", "fixmatch", "supervised"]
        best = cfgs["fixmatch+teacher+area_cap"].semi
        assert best.class_thresh and best.area_cap == 1 and cfgs["allspark+"].model.allspark.enabled
    quick = demo_config("allspark", quick=True)
    assert quick.train.iterations < demo_config("allspark").train.iterations
    assert len(QUICK_OVERRIDES) == len(set(QUICK_OVERRIDES))


def _result(name: str, miou: float) -> RecipeResult:
    return RecipeResult(name, miou, miou, 10, [miou], 1.0, [], Path(name))


def test_gap_closed_and_verdict() -> None:
    runs = {n: _result(n, m) for n, m in zip(NAMES, [0.50, 0.56, 0.60, 0.70], strict=True)}
    assert gap_closed(runs, "allspark+") == pytest.approx(0.3)
    assert gap_closed(runs, "fixmatch+teacher+area_cap") == pytest.approx(0.5)
    assert gap_closed(runs, "labels-only") is None and gap_closed(runs, "all-labels") is None
    text = verdict(runs)
    assert text.startswith("labels-only ends at 50.0 mIoU; allspark+ ends at 56.0 mIoU, 6.0 points above labels-only")
    assert "50% of the gap to all-labels" in text
    runs["all-labels"] = _result("all-labels", 0.40)  # no gap to close: no share of it
    assert gap_closed(runs, "allspark+") is None and "gap" not in verdict(runs)


@pytest.mark.slow
def test_tiny_demo_writes_table_pictures_and_page(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo", overrides=TINY, jobs=1)
    assert list(result.runs) == NAMES
    assert result.class_names == ("background", "disc", "square", "triangle")
    for run in result.runs.values():
        assert 0.0 <= run.miou <= 1.0 and len(run.iou) == 4
        assert [r["step"] for r in run.history if r["type"] == "eval"] == [2, 4]
    assert result.runs["allspark+"].history[0].get("loss_u") is not None
    assert result.runs["labels-only"].history[0].get("loss_u") is None
    lines = result.table.splitlines()
    assert lines[0].split() == NAMES
    assert sum(line.strip().startswith("IoU ") for line in lines) == 4
    assert f"{100 * result.runs['allspark+'].miou:.1f}" in lines[2]
    assert any(line.startswith("gap closed") for line in lines) == (
        result.runs["all-labels"].miou > result.runs["labels-only"].miou
    )
    grid = Image.open(result.files["predictions"])
    assert grid.width > grid.height  # 6 columns (image, truth, four predictions) by 3 validation images
    for name in ("curves", "per_class_iou"):
        assert Image.open(result.files[name]).size[0] > 300
    page = result.files["index"].read_text()
    for image in ("predictions.png", "curves.png", "per_class_iou.png"):
        assert f'src="{image}"' in page
    assert "mIoU (final)" in page and "labels-only" in page
    summary = json.loads(result.files["summary"].read_text())
    assert summary["runs"]["allspark+"]["miou"] == result.runs["allspark+"].miou
    assert summary["runs"]["allspark+"]["gap_closed"] == gap_closed(result.runs, "allspark+")
    sizes = {n: summary["runs"][n]["config"]["data"]["synthetic"]["num_labeled"] for n in NAMES}
    assert sizes == {"labels-only": 4, "allspark+": 4, "fixmatch+teacher+area_cap": 4, "all-labels": 12}
    teacher = summary["runs"]["fixmatch+teacher+area_cap"]["config"]["semi"]["teacher_checkpoint"]
    assert teacher == str((tmp_path / "demo" / "labels-only" / "last.pt").resolve())
    roots = {n: summary["runs"][n]["config"]["data"]["root"] for n in NAMES}
    assert len(set(roots.values())) == 2 and len(list(Path(roots["all-labels"], "labeled", "images").iterdir())) == 12
    val = [sorted(p.read_bytes() for p in Path(root, "val", "images").iterdir()) for root in set(roots.values())]
    assert val[0] == val[1]  # the upper bound is validated on the same images


@pytest.mark.slow
def test_demo_command_without_matplotlib_still_draws_predictions(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not viz.has_matplotlib()
    code = cli.main(["demo", "--out", str(tmp_path / "demo"), "--jobs", "2", "--set", *TINY])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "mIoU (final)" in out and "index.html" in out
    assert "matplotlib is not installed" in err
    for name in NAMES:  # the training processes show their progress, each line with its recipe
        assert f"[{name}] " in err and (tmp_path / "demo" / name / "train.log").is_file()
    assert "train 4/4" in (tmp_path / "demo" / "allspark+" / "train.log").read_text()
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


def test_a_teacher_row_must_come_after_its_teacher(tmp_path: Path) -> None:
    rows = (DemoRecipe("student", "fixmatch", teacher="labels-only"), DemoRecipe("labels-only", "supervised"))
    with pytest.raises(ConfigError, match="'student' learns from 'labels-only', which is not a row before it"):
        run_demo(tmp_path / "demo", overrides=TINY, recipes=rows)
    assert not (tmp_path / "demo" / "student").exists()


@pytest.mark.slow
def test_a_row_with_a_frozen_teacher_starts_after_its_teacher_has_finished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="allspark_seg")  # the workers log at the parent's level
    rows = (
        DemoRecipe("labels-only", "supervised"),
        DemoRecipe("allspark+", "allspark+"),
        DemoRecipe("round1", "fixmatch", teacher="labels-only"),
        DemoRecipe("all-labels", "supervised", all_labeled=True),
    )
    result = run_demo(tmp_path / "demo", overrides=TINY, recipes=rows, jobs=2)
    assert list(result.runs) == [r.name for r in rows]
    teacher = (tmp_path / "demo" / "labels-only" / "last.pt").resolve()
    summary = json.loads(result.files["summary"].read_text())
    assert summary["runs"]["round1"]["config"]["semi"]["teacher_checkpoint"] == str(teacher)
    log = (tmp_path / "demo" / "round1" / "train.log").read_text()
    assert f"teacher: {teacher}, frozen" in log
    teacher_done = (tmp_path / "demo" / "labels-only" / "results.json").stat().st_mtime
    assert (tmp_path / "demo" / "round1" / "config.yaml").stat().st_mtime >= teacher_done
