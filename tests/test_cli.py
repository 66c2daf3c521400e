"""The ``allspark-seg`` command on tiny data: every subcommand, the paper configs, and the errors people make."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from allspark_seg import cli
from allspark_seg.config import load_config
from allspark_seg.engine.predict import load_trained_model, predict_image
from allspark_seg.engine.train import training_plan
from allspark_seg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "method": "allspark",
    "model": {
        "encoder": "mit_b0",
        "embed_dims": [8, 16, 32, 64],
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 1, 2, 2],
        "head_dim": 32,
    },
    "data": {
        "format": "synthetic",
        "crop_size": 64,
        "num_workers": 0,
        "synthetic": {"num_labeled": 4, "num_unlabeled": 8, "num_val": 4, "image_size": 64, "num_classes": 4},
    },
    "train": {
        "iterations": 6,
        "batch_size": 2,
        "lr": 0.01,
        "device": "cpu",
        "log_every": 2,
        "eval_every": 3,
        "checkpoint_every": 3,
    },
    "semi": {"warmup_iterations": 2},
}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``cli.main(args)`` -> (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    """Exit status 2, one ``error:`` sentence containing every fragment, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny AllSpark run trained once through ``allspark-seg train`` (6 iterations, evaluated at 3 and 6)."""
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = root / "run"
    code = cli.main(["train", "--config", str(config), "--out", str(out), "--set", f"data.root={root / 'data'}"])
    assert code == 0
    return {"root": root, "config": config, "out": out, "data": root / "data"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ train / eval


def test_train_writes_resolved_config_logs_and_checkpoints(trained: dict[str, Path]) -> None:
    out = trained["out"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["num_classes"] == 4 and saved["data"]["pipeline"] == "allspark"  # resolved values
    assert saved["model"]["allspark"]["enabled"] is True
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    log = (out / "train.log").read_text()
    assert "allspark: 6 iterations" in log and "eval @6" in log


def test_train_again_resumes_from_last_checkpoint(trained: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = trained["root"] / "resumed"
    args = ["train", "-c", trained["config"], "-o", out, "--set", f"data.root={trained['data']}", "train.iterations=3"]
    assert run_cli(args, capsys)[0] == 0
    first = torch.load(out / "last.pt", weights_only=True)
    assert first["step"] == 3
    code, stdout, err = run_cli([*args, "train.iterations=4"], capsys)
    assert code == 0
    assert f"resumed from {out / 'last.pt'} at iteration 3" in err
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    assert "Final mIoU" in stdout and "best mIoU" in stdout
    train_steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]
    assert train_steps == [2, 3, 4]  # continued, not restarted


def test_eval_reproduces_the_logged_miou_exactly(trained: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = trained["out"]
    report = trained["root"] / "eval.json"
    code, stdout, _ = run_cli(["eval", "--checkpoint", out / "best.pt", "--out", report], capsys)
    assert code == 0
    best_step = torch.load(out / "best.pt", weights_only=True)["best_step"]
    logged = next(r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval" and r["step"] == best_step)
    result = json.loads(report.read_text())
    assert result["step"] == best_step
    assert result["metrics"]["miou"] == logged["miou"]
    assert result["metrics"]["miou_official"] == logged["miou_official"]
    assert result["metrics"]["num_images"] == 4
    assert "background" in stdout and "official mIoU" in stdout


def test_eval_options_slide_flip_scales(trained: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    report = trained["root"] / "eval_tta.json"
    args = ["eval", "--checkpoint", trained["out"] / "last.pt", "--out", report, "--mode", "slide"]
    code, stdout, _ = run_cli([*args, "--window", "48", "--stride", "32x24", "--flip", "--scales", "0.75,1"], capsys)
    assert code == 0
    result = json.loads(report.read_text())
    assert result["eval"] == {
        "mode": "slide",
        "window": [48, 48],
        "stride": [32, 24],
        "flip": True,
        "scales": [0.75, 1],
    }
    assert "slide window [48, 48] stride [32, 24] + flip scales [0.75, 1.0]" in stdout
    assert 0.0 <= result["metrics"]["miou"] <= 1.0


# ------------------------------------------------------------------------------------------- predict / export


def test_predict_files_folders_globs_and_large_images(trained: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    val = trained["data"] / "val" / "images"
    large = trained["root"] / "inputs" / "large.png"
    large.parent.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(large)  # 200 > 2 x crop: slides
    out = trained["root"] / "pred"
    code, stdout, _ = run_cli(
        ["predict", "--checkpoint", trained["out"] / "last.pt", val, str(large.parent / "*.png"), "--out", out], capsys
    )
    assert code == 0
    names = sorted(p.name for p in (out / "masks").iterdir())
    assert names == sorted([p.name for p in val.iterdir()] + ["large.png"])
    model = load_trained_model(trained["out"] / "last.pt")
    for name in ("large.png", names[0]):
        source = large if name == "large.png" else val / name
        image = np.asarray(Image.open(source).convert("RGB"))
        mask = np.asarray(Image.open(out / "masks" / name))
        assert mask.shape == image.shape[:2] and mask.max() < 4
        np.testing.assert_array_equal(mask, predict_image(model, image))
        color = np.asarray(Image.open(out / "color" / name))
        np.testing.assert_array_equal(color, model.palette[mask])
        assert Image.open(out / "overlay" / name.replace(".png", ".jpg")).size == image.shape[1::-1]
    assert "Wrote 5 masks" in stdout


@pytest.mark.slow
def test_export_onnx_and_run_it_at_two_sizes(trained: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    import onnxruntime as ort

    onnx_file = trained["root"] / "model.onnx"
    code, stdout, _ = run_cli(
        ["export", "--checkpoint", trained["out"] / "best.pt", "--format", "onnx", "--out", onnx_file], capsys
    )
    assert code == 0
    assert "64x64" in stdout and "83x57" in stdout  # checked at the export size and at another size
    model = load_trained_model(trained["out"] / "best.pt").model
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == ["background", "disc", "square", "triangle"]
    for shape in ((1, 3, 64, 64), (2, 3, 70, 100)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4)


# ---------------------------------------------------------------------------------- splits / synthetic / coco


def test_splits_make_from_root_and_list_then_check(trained: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    root, out = trained["data"], trained["root"] / "splits"
    code, stdout, _ = run_cli(
        ["splits", "--root", root, "--format", "folder", "--labeled", 1, "--seed", 3, "--out", out / "a"], capsys
    )
    assert code == 0 and "Wrote 1 labeled lines" in stdout
    labeled = (out / "a" / "labeled.txt").read_text().splitlines()
    unlabeled = (out / "a" / "unlabeled.txt").read_text().splitlines()
    assert len(labeled) == 1 and len(unlabeled) == 3
    assert labeled[0].startswith("labeled/images/") and labeled[0].split()[1].startswith("labeled/masks/")
    listing = out / "all.txt"
    listing.write_text("\n".join(labeled + unlabeled) + "\n")
    code, _, _ = run_cli(["splits", "--list", listing, "--fraction", 0.5, "--out", out / "b"], capsys)
    assert code == 0
    drawn = (out / "b" / "labeled.txt").read_text().splitlines() + (
        out / "b" / "unlabeled.txt"
    ).read_text().splitlines()
    assert sorted(drawn) == sorted(labeled + unlabeled)  # lines copied unchanged
    code, stdout, _ = run_cli(
        ["splits", "--check", out / "b" / "labeled.txt", out / "b" / "unlabeled.txt", "--root", root], capsys
    )
    assert code == 0
    assert "2 labeled images (2 with masks)" in stdout and "2 unlabeled images" in stdout


def test_synthetic_command_writes_the_folder_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["synthetic", "--out", tmp_path / "s", "--labeled", 2, "--unlabeled", 3, "--val", 1, "--size", 32]
    code, _, _ = run_cli([*args, "--classes", 3], capsys)
    assert code == 0
    assert len(list((tmp_path / "s" / "unlabeled").iterdir())) == 3
    assert (tmp_path / "s" / "classes.txt").read_text().split() == ["background", "disc", "square"]


def test_coco_masks_without_pycocotools_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    ann = tmp_path / "instances_val2017.json"
    ann.write_text("{}")
    code, _, err = run_cli(["coco-masks", "--annotations", ann, "--out", tmp_path / "masks"], capsys)
    assert_user_error(code, err, "pycocotools", "pip install 'allspark-seg[coco]'")


# --------------------------------------------------------------------------------------------- errors


def test_wrong_paths_are_one_sentence(trained: dict[str, Path], capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = run_cli(["eval", "--checkpoint", tmp_path / "nope.pt"], capsys)
    assert_user_error(code, err, "nope.pt", "does not exist")
    code, _, err = run_cli(["train", "--config", tmp_path / "nope.yaml", "--out", tmp_path / "r"], capsys)
    assert_user_error(code, err, "nope.yaml", "does not exist")
    ckpt = trained["out"] / "last.pt"
    code, _, err = run_cli(["predict", "--checkpoint", ckpt, tmp_path / "missing.jpg", "--out", tmp_path / "p"], capsys)
    assert_user_error(code, err, "missing.jpg", "does not exist")
    code, _, err = run_cli(["eval", "--checkpoint", ckpt, "--data-root", tmp_path / "no_data"], capsys)
    assert_user_error(code, err, "no_data")


def test_config_typos_are_one_sentence(trained: dict[str, Path], capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "trian": {"lr": 0.1}}))
    code, _, err = run_cli(["train", "-c", bad, "-o", tmp_path / "r"], capsys)
    assert_user_error(code, err, "Unknown config key 'trian'", "did you mean 'train'")
    code, _, err = run_cli(["train", "-c", trained["config"], "-o", tmp_path / "r", "--set", "train.lrr=0.1"], capsys)
    assert_user_error(code, err, "Unknown config key 'train.lrr'", "did you mean 'train.lr'")
    code, _, err = run_cli(["train", "-c", trained["config"], "-o", tmp_path / "r", "--set", "trian.lr=0.1"], capsys)
    assert_user_error(code, err, "Unknown config key 'trian'", "did you mean 'train'")
    nested = tmp_path / "nested_typo.yaml"
    nested.write_text(yaml.safe_dump({**TINY, "train": {"lrr": 0.1}}))
    code, _, err = run_cli(["train", "-c", nested, "-o", tmp_path / "r"], capsys)
    assert_user_error(code, err, "Unknown config key 'train.lrr'", "did you mean 'train.lr'")
    code, _, err = run_cli(["train", "-c", trained["config"], "-o", tmp_path / "r", "--set", "train.lr=fast"], capsys)
    assert_user_error(code, err, "train.lr", "must be a number")
    assert not (tmp_path / "r" / "config.yaml").exists()  # validated before anything ran


def test_checkpoints_of_other_models_are_refused(
    trained: dict[str, Path], capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    random_sd = tmp_path / "random.pt"
    torch.save({"conv.weight": torch.randn(4, 3, 3, 3)}, random_sd)
    code, _, err = run_cli(["eval", "--checkpoint", random_sd], capsys)
    assert_user_error(code, err, "random.pt", "not written by allspark-seg train")
    saved = torch.load(trained["out"] / "last.pt", weights_only=True)
    saved["config"]["model"]["head_dim"] = 48
    other = tmp_path / "other.pt"
    torch.save(saved, other)
    code, _, err = run_cli(
        ["predict", "--checkpoint", other, trained["data"] / "val" / "images", "--out", tmp_path / "p"], capsys
    )
    assert_user_error(code, err, "other.pt", "does not match the model its config describes", "shape mismatch")
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("hello")
    code, _, err = run_cli(["export", "--checkpoint", not_torch, "--out", tmp_path / "m.onnx"], capsys)
    assert_user_error(code, err, "notes.pt", "cannot be read")


def test_missing_onnxruntime_names_the_extra(
    trained: dict[str, Path], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, err = run_cli(["export", "--checkpoint", trained["out"] / "last.pt", "--out", tmp_path / "m.onnx"], capsys)
    assert_user_error(code, err, "onnxruntime", "pip install 'allspark-seg[onnx]'")


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = run_cli(["--debug", "eval", "--checkpoint", tmp_path / "nope.pt"], capsys)
    assert code == 2
    assert "Traceback" in err and "CheckpointError" in err


@pytest.mark.slow
def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "allspark_seg", "eval", "--checkpoint", str(tmp_path / "nope.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: Checkpoint '{tmp_path / 'nope.pt'}' does not exist."
    assert done.stdout == ""


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "train", "eval", "predict", "export", "splits", "coco-masks", "synthetic"):
        assert command in text


# ------------------------------------------------------------------------------------------------ configs


PAPER = {
    # name: (format, crop, epochs, lr, lr_multi, per-process batch, unlabeled batch, warm-up epochs, loss, eval mode)
    "pascal_allspark": ("voc", 513, 80, 0.001, 10.0, 2, 2, 5, "ce", "whole"),
    "pascal_selftrain": ("voc", 513, 80, 0.001, 10.0, 2, 2, None, "ce", "whole"),
    "pascal_supervised": ("voc", 513, 80, 0.001, 10.0, 4, 4, None, "ce", "whole"),
    "pascal_blended_allspark": ("voc", 513, 80, 0.001, 10.0, 2, 2, 5, "ce", "whole"),
    "pascal_blended_selftrain": ("voc", 513, 80, 0.001, 10.0, 2, 2, None, "ce", "whole"),
    "pascal_blended_supervised": ("voc", 513, 80, 0.001, 10.0, 4, 4, None, "ce", "whole"),
    "cityscapes_allspark": ("cityscapes", 801, 240, 0.005, 1.0, 2, 2, 15, "ohem", "slide"),
    "cityscapes_selftrain": ("cityscapes", 801, 240, 0.001, 1.0, 2, 2, None, "ohem", "slide"),
    "cityscapes_supervised": ("cityscapes", 801, 240, 0.001, 1.0, 4, 4, None, "ohem", "slide"),
    "coco_allspark": ("coco", 513, 10, 0.001, 10.0, 4, 4, 0.625, "ce", "whole"),
    "coco_selftrain": ("coco", 513, 10, 0.001, 10.0, 4, 4, None, "ce", "whole"),
    "coco_supervised": ("coco", 513, 10, 0.001, 10.0, 8, 8, None, "ce", "whole"),
}


def test_every_config_file_loads(tmp_path: Path) -> None:
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert {f.stem for f in files} >= set(PAPER) | {"synthetic_demo", "folder"}
    for path in files:
        cfg = load_config(
            path,
            [f"data.root={tmp_path}", "data.num_classes=3"] if path.stem == "folder" else [f"data.root={tmp_path}"],
        )
        assert cfg.data.root == str(tmp_path)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_hold_the_official_values(name: str, tmp_path: Path) -> None:
    fmt, crop, epochs, lr, lr_multi, batch, batch_u, warmup, loss, mode = PAPER[name]
    cfg = load_config(REPO / "configs" / f"{name}.yaml", [f"data.root={tmp_path}"])
    method = name.rsplit("_", 1)[1]
    assert cfg.method == method and cfg.data.format == fmt
    assert cfg.model.encoder == "mit_b5" and cfg.model.head_dim == 768
    assert cfg.data.crop_size == crop and cfg.train.epochs == epochs and cfg.train.iterations is None
    assert (cfg.train.lr, cfg.train.lr_multi, cfg.train.optimizer) == (lr, lr_multi, "sgd")
    assert (cfg.train.momentum, cfg.train.weight_decay, cfg.train.poly_power) == (0.9, 1e-4, 0.9)
    assert (cfg.train.batch_size, cfg.train.unlabeled_batch_size) == (batch, batch_u)
    assert cfg.train.grad_accum == 4  # 4 GPUs' global batch on one device
    assert cfg.train.eval_every == "epoch"  # the official scripts validate once per epoch
    assert cfg.semi.warmup_epochs == warmup
    assert cfg.train.loss == loss
    if loss == "ohem":
        assert (cfg.train.ohem_thresh, cfg.train.ohem_min_kept) == (0.7, 200000)
    assert cfg.eval.mode == mode
    if mode == "slide":
        assert (cfg.eval.window, cfg.eval.stride) == ([801, 801], [534, 534])
    assert cfg.model.allspark.enabled == (method == "allspark")
    assert cfg.data.labeled_split.startswith("splits/") and cfg.data.labeled_split.endswith("/labeled.txt")
    assert bool(cfg.data.unlabeled_split) == (method != "supervised")
    semi = cfg.semi
    if method != "supervised":  # the faithful recipe: no EMA, no threshold, padding pseudo-labelled
        assert (semi.ema, semi.conf_thresh, semi.ignore_padding, semi.per_image_teacher) == (False, 0.0, False, False)


@pytest.mark.parametrize(
    ("name", "n", "steps"),
    [("pascal_allspark", 10582 - 183, 1300), ("cityscapes_allspark", 2975 - 186, 349), ("pascal_supervised", 366, 23)],
)
def test_paper_configs_follow_the_official_schedule(name: str, n: int, steps: int, tmp_path: Path) -> None:
    """One device with grad_accum 4 and 4 processes give the official steps per epoch and validate once per epoch."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml", [f"data.root={tmp_path}"])
    four_gpus = load_config(REPO / "configs" / f"{name}.yaml", [f"data.root={tmp_path}", "train.grad_accum=1"])
    for plan in (training_plan(cfg, n, world_size=1), training_plan(four_gpus, n, world_size=4)):
        assert plan.steps_per_epoch == plan.eval_every == steps
        assert plan.total == cfg.train.epochs * steps
        if cfg.semi.warmup_epochs is not None:
            assert plan.warmup == cfg.semi.warmup_epochs * steps


def test_eval_every_accepts_iterations_or_epoch_only(tmp_path: Path) -> None:
    assert load_config(REPO / "configs" / "synthetic_demo.yaml", ["train.eval_every=7"]).train.eval_every == 7
    for bad in ("train.eval_every=weekly", "train.eval_every=0"):
        with pytest.raises(ConfigError, match="train.eval_every"):
            load_config(REPO / "configs" / "synthetic_demo.yaml", [bad])


@pytest.mark.parametrize("unlabeled", [400, 20_000])
def test_default_validation_cadence_gives_ten_validations_whatever_the_epoch_length(
    unlabeled: int, tmp_path: Path
) -> None:
    """``configs/folder.yaml`` (eval_every null) with a large unlabeled folder: an epoch longer than the run must not
    leave a single validation at the end (best.pt would be the last step and the guard's mIoU check would not run)."""
    cfg = load_config(REPO / "configs" / "folder.yaml", [f"data.root={tmp_path}", "train.iterations=2000"])
    assert cfg.train.eval_every is None
    plan = training_plan(cfg, unlabeled, world_size=1)
    assert plan.total == 2000 and plan.total // plan.eval_every == 10
