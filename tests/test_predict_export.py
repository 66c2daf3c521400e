"""Rebuilding models from checkpoints, prediction on files, and ONNX export (tiny untrained models, no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from allspark_seg.config import load_config
from allspark_seg.data import palette_for
from allspark_seg.engine import predict as P
from allspark_seg.engine.evaluate import infer
from allspark_seg.engine.export import check_sizes, export_onnx
from allspark_seg.engine.train import build_model_from_config
from allspark_seg.errors import CheckpointError, ConfigError, DataError, MissingExtraError

TINY_MODEL = {
    "encoder": "mit_b0",
    "embed_dims": [8, 16, 32, 64],
    "depths": [1, 1, 1, 1],
    "num_heads": [1, 1, 2, 2],
    "head_dim": 32,
}


def save_checkpoint(path: Path, method: str = "allspark", **allspark: object) -> Path:
    """An untrained tiny model saved the way training saves it."""
    cfg = load_config(
        {
            "method": method,
            "model": {**TINY_MODEL, "allspark": allspark},
            "data": {"format": "synthetic", "root": str(path.parent / "data"), "crop_size": 64},
            "train": {"iterations": 1},
        }
    )
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    names = ["background", "disc", "square", "triangle", "ring", "cross"]
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "class_names": names, "step": 7}
    torch.save({**state, "palette": torch.as_tensor(palette_for(6))}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pt")


def write_image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------ loading


def test_load_trained_model_restores_weights_names_and_palette(checkpoint: Path) -> None:
    trained = P.load_trained_model(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    for key, value in trained.model.state_dict().items():
        torch.testing.assert_close(value, saved["model"][key], rtol=0, atol=0)
    assert not trained.model.training
    assert trained.step == 7 and trained.cfg.method == "allspark" and trained.cfg.data.num_classes == 6
    assert trained.class_names[:2] == ("background", "disc")
    np.testing.assert_array_equal(trained.palette, palette_for(6))


def test_state_dict_mismatches_are_summarised(checkpoint: Path, tmp_path: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)
    key = next(k for k in saved["model"] if k.startswith("head."))
    del saved["model"][key]
    saved["model"]["extra.weight"] = torch.zeros(1)
    torch.save(saved, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as info:
        P.load_trained_model(tmp_path / "broken.pt")
    message = str(info.value)
    assert f"1 missing key ({key})" in message and "1 unexpected key (extra.weight)" in message
    assert "\n" not in message


def test_unreadable_stored_config_is_a_checkpoint_error(checkpoint: Path, tmp_path: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)
    saved["config"]["train"]["lrr"] = 0.1
    torch.save(saved, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="holds a config this version cannot read: Unknown config key"):
        P.load_trained_model(tmp_path / "future.pt")


def test_eval_overrides_cannot_change_the_model(checkpoint: Path) -> None:
    trained = P.load_trained_model(checkpoint)
    with pytest.raises(ConfigError, match="only data.\\* and eval.\\* keys"):
        P.evaluate_checkpoint(trained, overrides=["model.head_dim=64"])


# -------------------------------------------------------------------------------------------- inputs


def test_collect_inputs_expands_folders_globs_and_drops_duplicates(tmp_path: Path) -> None:
    a = write_image(tmp_path / "in" / "b.png", 8, 8)
    b = write_image(tmp_path / "in" / "a.jpg", 8, 8)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    c = write_image(tmp_path / "deep" / "x" / "c.bmp", 8, 8)
    found = P.collect_inputs([tmp_path / "in", str(tmp_path / "**" / "*.bmp"), a])
    assert found == [b.resolve(), a.resolve(), c.resolve()]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.png", "does not exist"),
        (lambda d: str(d / "*.tif"), "matches no images"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "contains no images"),
        (lambda d: (d / "x.txt").write_text("x") and d / "x.txt", "is not an image"),
    ],
)
def test_collect_inputs_errors(tmp_path: Path, make: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        P.collect_inputs([make(tmp_path)])  # type: ignore[operator]


def test_output_names_are_unique() -> None:
    paths = [Path("a/x.png"), Path("b/x.jpg"), Path("c/x.png"), Path("d/y.png")]
    assert P._output_names(paths) == ["x", "x_2", "x_3", "y"]


def test_blend() -> None:
    image = np.full((1, 2, 3), 100, np.uint8)
    color = np.full((1, 2, 3), 200, np.uint8)
    np.testing.assert_array_equal(P.blend(image, color, 0.25), np.full((1, 2, 3), 125, np.uint8))
    np.testing.assert_array_equal(P.blend(image, color, 0.0), image)


# --------------------------------------------------------------------------------------------- predict


def test_auto_mode_slides_only_above_the_threshold(checkpoint: Path) -> None:
    cfg = P.load_trained_model(checkpoint).cfg  # crop 64
    auto = P.PredictSettings()
    assert not P._sliding(auto, cfg, 128, 100) and P._sliding(auto, cfg, 129, 20)
    assert P._sliding(P.PredictSettings(slide_above=50), cfg, 60, 10)
    assert P._sliding(P.PredictSettings(mode="slide"), cfg, 8, 8) and not P._sliding(
        P.PredictSettings(mode="whole"), cfg, 999, 999
    )


def test_predict_image_matches_whole_and_slide_inference(checkpoint: Path) -> None:
    trained = P.load_trained_model(checkpoint)
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    large = rng.integers(0, 255, (140, 90, 3), dtype=np.uint8)
    from allspark_seg.data import normalize

    with torch.inference_mode():
        whole = infer(trained.model, normalize(small)[None], 6).argmax(1)[0].numpy()
        slide = infer(trained.model, normalize(large)[None], 6, "slide", (64, 64), (42, 42)).argmax(1)[0].numpy()
    np.testing.assert_array_equal(P.predict_image(trained, small), whole)
    np.testing.assert_array_equal(P.predict_image(trained, large), slide)  # 140 > 2 x 64: sliding window
    assert P.predict_image(trained, large).dtype == np.uint8


def test_predict_paths_writes_three_outputs_per_image(checkpoint: Path, tmp_path: Path) -> None:
    trained = P.load_trained_model(checkpoint)
    source = tmp_path / "in" / "photo.png"
    source.parent.mkdir()
    ramp = np.linspace(0, 255, 40 * 30 * 3).reshape(40, 30, 3).astype(np.uint8)  # smooth, so JPEG stays close
    Image.fromarray(ramp).save(source)
    gray = tmp_path / "in" / "gray.png"
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(gray)  # grayscale input is converted
    written = P.predict_paths(
        trained, [tmp_path / "in"], tmp_path / "out", P.PredictSettings(alpha=0.3), progress=False
    )
    assert [p.name for p in written] == ["gray.png", "photo.png"]
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "photo.png"))
    assert mask.shape == (40, 30) and mask.max() < 6
    color = np.asarray(Image.open(tmp_path / "out" / "color" / "photo.png"))
    np.testing.assert_array_equal(color, palette_for(6)[mask])
    overlay = np.asarray(Image.open(tmp_path / "out" / "overlay" / "photo.jpg"))
    expected = P.blend(np.asarray(Image.open(source)), color, 0.3)
    assert overlay.shape == expected.shape and np.abs(overlay.astype(int) - expected).mean() < 4  # JPEG


def test_predict_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="mode 'fast'"):
        P.PredictSettings(mode="fast").check()
    with pytest.raises(ConfigError, match="opacity"):
        P.PredictSettings(alpha=1.5).check()


# ---------------------------------------------------------------------------------------------- export


def test_check_sizes_are_two_sizes_off_the_32_grid() -> None:
    for size in ((64, 64), (513, 513), (96, 128), (45, 39)):
        sizes = check_sizes(size)
        assert sizes[0] == size and sizes[1] != size
        assert all(side % 32 for side in sizes[1])


@pytest.mark.slow
def test_export_supervised_model_with_dynamic_batch_and_size(tmp_path: Path) -> None:
    import onnxruntime as ort

    trained = P.load_trained_model(save_checkpoint(tmp_path / "sup.pt", method="supervised"))
    report = export_onnx(trained, tmp_path / "sup.onnx", size=(64, 64))
    assert set(report.max_abs_diff) == {(64, 64), (83, 57)} and report.worst < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    assert json.loads(meta["class_names"])[1] == "disc" and json.loads(meta["mean"]) == [0.485, 0.456, 0.406]
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 48, 72)
    with torch.inference_mode():
        expected = trained.model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], expected, atol=1e-4)


def test_export_refuses_batch_coupled_inference(tmp_path: Path) -> None:
    trained = P.load_trained_model(save_checkpoint(tmp_path / "coupled.pt", per_image_eval=False))
    with pytest.raises(ConfigError, match="per_image_eval=false"):
        export_onnx(trained, tmp_path / "m.onnx")


def test_export_without_onnx_names_the_extra(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'allspark-seg\[onnx\]'"):
        export_onnx(P.load_trained_model(checkpoint), tmp_path / "m.onnx")
