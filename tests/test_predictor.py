"""``allspark_seg.load`` and its Predictor: inputs, options, pictures and errors, checked against the predict command.

The checkpoint is the tiny untrained model of ``test_predict_export`` saved the way training saves it; untrained, it
still gives every class somewhere on random images, so equal masks are a real comparison.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import allspark_seg
from allspark_seg import cli
from allspark_seg.config import config_from_dict, resolve_config
from allspark_seg.data import palette_for
from allspark_seg.engine import predict as P
from allspark_seg.engine.train import build_model_from_config
from allspark_seg.errors import AllSparkError, CheckpointError, ConfigError, DataError
from allspark_seg.predictor import Predictor, to_rgb
from test_predict_export import save_checkpoint

NAMES = ("background", "disc", "square", "triangle", "ring", "cross")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pt")  # crop 64: auto slides above 128 pixels


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return allspark_seg.load(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An RGB photo, a grayscale image smaller than MiT's minimum, and an RGBA image large enough to slide."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(3)
    files = {
        "photo": (rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), "photo.png"),
        "gray": (rng.integers(0, 256, (20, 24), dtype=np.uint8), "gray.png"),
        "big": (rng.integers(0, 256, (150, 140, 4), dtype=np.uint8), "big.png"),
    }
    for array, name in files.values():
        Image.fromarray(array).save(folder / name)
    return {key: folder / name for key, (_, name) in files.items()}


def run_cli(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- loading


def test_load_describes_the_checkpoint(predictor: Predictor, checkpoint: Path) -> None:
    assert isinstance(predictor, allspark_seg.Predictor)
    assert predictor.classes == NAMES and predictor.num_classes == 6
    assert predictor.device == torch.device("cpu") and not predictor.model.training
    assert predictor.step == 7 and predictor.path == checkpoint and predictor.config.method == "allspark"
    np.testing.assert_array_equal(predictor.palette, palette_for(6))
    predictor.palette[0] = 7  # a copy: the predictor's palette is unchanged
    np.testing.assert_array_equal(predictor.palette[0], [0, 0, 0])
    trained = P.load_trained_model(checkpoint)
    for key, value in predictor.model.state_dict().items():
        torch.testing.assert_close(value, trained.model.state_dict()[key], rtol=0, atol=0)
    assert "6 classes" in repr(predictor) and "mode auto" in repr(predictor)


def test_device_choices(checkpoint: Path) -> None:
    assert allspark_seg.load(checkpoint, torch.device("cpu")).device == torch.device("cpu")
    auto = allspark_seg.load(checkpoint).device  # the default, as the command's --device
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert allspark_seg.load(checkpoint, "cuda").device.type == "cuda"
    else:
        with pytest.raises(ConfigError, match="no CUDA device"):
            allspark_seg.load(checkpoint, "cuda")


def test_checkpoint_without_class_names_names_them_as_the_command_does(checkpoint: Path, tmp_path: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)
    del saved["class_names"], saved["palette"]
    torch.save(saved, tmp_path / "bare.pt")
    bare = allspark_seg.load(tmp_path / "bare.pt", "cpu")
    assert bare.classes == tuple(f"class_{i}" for i in range(6))
    np.testing.assert_array_equal(bare.palette, palette_for(6))


def test_import_stays_light_and_load_is_exported() -> None:
    code = (
        "import sys, allspark_seg; "
        "assert 'allspark_seg.engine.predict' not in sys.modules and 'allspark_seg.predictor' not in sys.modules; "
        "import allspark_seg.predictor as m; "
        "assert allspark_seg.load is m.load and allspark_seg.Predictor is m.Predictor; "
        "assert {'load', 'Predictor'} <= set(allspark_seg.__all__) and 'load' in dir(allspark_seg)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        allspark_seg.nothing  # noqa: B018


# ------------------------------------------------------------------------------------------------ inputs


def test_path_pil_and_array_give_identical_masks(predictor: Predictor, images: dict[str, Path]) -> None:
    path = images["photo"]
    array = np.asarray(Image.open(path))
    mask = predictor(path)
    assert mask.shape == (50, 70) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == set(range(6))  # every class somewhere: a real comparison
    for same in (str(path), Image.open(path), array, np.asfortranarray(array)):
        np.testing.assert_array_equal(predictor(same), mask)
    np.testing.assert_array_equal(mask, P.predict_image(P.load_trained_model(predictor.path), array))


def test_grayscale_and_rgba_convert_as_files_are_read(predictor: Predictor, images: dict[str, Path]) -> None:
    gray = np.asarray(Image.open(images["gray"]))
    assert gray.shape == (20, 24)  # smaller than MiT's minimum: padded, cropped back
    mask = predictor(images["gray"])
    assert mask.shape == (20, 24)
    for same in (gray, gray[:, :, None], np.repeat(gray[:, :, None], 3, axis=2), Image.open(images["gray"])):
        np.testing.assert_array_equal(predictor(same), mask)
    rgba = np.asarray(Image.open(images["big"]))
    assert rgba.shape == (150, 140, 4)
    mask = predictor(images["big"])
    assert mask.shape == (150, 140)
    for same in (rgba, rgba[:, :, :3], Image.open(images["big"])):
        np.testing.assert_array_equal(predictor(same), mask)
    palette_mode = Image.open(images["big"]).convert("P")  # any PIL mode is converted as files are
    np.testing.assert_array_equal(to_rgb(palette_mode), np.asarray(palette_mode.convert("RGB")))


# --------------------------------------------------------------------- against the model's logits, by hand
IMAGENET = (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))


def model_from_file(path: Path) -> torch.nn.Module:
    """The checkpoint's model rebuilt from its stored config and weights, without the inference code."""
    saved = torch.load(path, weights_only=True)
    model = build_model_from_config(resolve_config(config_from_dict(saved["config"])))
    model.load_state_dict(saved["model"])
    return model.eval()


def hand_probabilities(model: torch.nn.Module, image: np.ndarray, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``(K, H, W)`` class probabilities of an RGB uint8 image, all in ``dtype``: padded with black to 32 pixels,
    normalised with the ImageNet mean and std, resized to ``round(side * scale)`` (bilinear), the softmax of the
    model's logits at that size, resized back and cropped (the documented inference, written out)."""
    h, w = image.shape[:2]
    padded = np.zeros((max(h, 32), max(w, 32), 3), np.uint8)
    padded[:h, :w] = image
    mean, std = IMAGENET
    x = torch.from_numpy(((padded / 255.0 - mean) / std).transpose(2, 0, 1).copy()).to(dtype)[None]
    size = x.shape[-2:]
    scaled = (round(size[0] * scale), round(size[1] * scale))
    if scale != 1.0:
        x = torch.nn.functional.interpolate(x, size=scaled, mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = model.to(dtype)(x)
    logits = torch.nn.functional.interpolate(logits, size=scaled, mode="bilinear", align_corners=False)
    probs = torch.nn.functional.interpolate(logits.softmax(1), size=size, mode="bilinear", align_corners=False)
    return probs[0, :, :h, :w]


@pytest.mark.parametrize(("name", "scale"), [("photo", 1.0), ("gray", 1.0), ("photo", 1.25)])
def test_masks_are_the_arg_max_of_the_models_logits_on_a_tensor_prepared_by_hand(
    predictor: Predictor, checkpoint: Path, images: dict[str, Path], name: str, scale: float
) -> None:
    image = np.asarray(Image.open(images[name]).convert("RGB"))
    mask = predictor(images[name], mode="whole", scales=[scale])
    model = model_from_file(checkpoint)
    exact = hand_probabilities(model, image, scale, torch.float64)
    error = (hand_probabilities(model, image, scale, torch.float32).double() - exact).abs().amax()  # float32's own
    top2 = exact.topk(2, dim=0).values
    decided = (top2[0] - top2[1] > 4 * error).numpy()  # no float32 run can flip these pixels' arg max
    assert decided.mean() > 0.9, decided.mean()
    np.testing.assert_array_equal(mask[decided], exact.argmax(0).numpy()[decided])
    assert len(np.unique(mask[decided])) >= 3  # the model predicts several classes here: a real comparison


# -------------------------------------------------------------------------------------- same as the CLI

CLI_CASES = [
    ([], {}),
    (["--mode", "slide"], {"mode": "slide"}),
    (["--flip"], {"flip": True}),
    (["--mode", "whole", "--flip", "--scales", "1,1.25"], {"mode": "whole", "flip": True, "scales": (1, 1.25)}),
    (
        ["--mode", "slide", "--window", "48", "--stride", "40x30", "--flip", "--alpha", "0.3"],
        {"mode": "slide", "window": 48, "stride": (40, 30), "flip": True, "alpha": 0.3},
    ),
    (["--slide-above", "60"], {"slide_above": 60}),
]


@pytest.mark.parametrize(("flags", "options"), CLI_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_masks_are_byte_identical_to_the_command(
    checkpoint: Path,
    predictor: Predictor,
    images: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    options: dict[str, Any],
) -> None:
    out = tmp_path / "pred"
    code, _, err = run_cli(
        ["predict", "--checkpoint", checkpoint, images["photo"].parent, "--out", out, "--device", "cpu", *flags], capsys
    )
    assert code == 0, err
    configured = allspark_seg.load(checkpoint, "cpu", **options)  # the options as load() defaults
    per_call = {k: v for k, v in options.items() if k != "alpha"}  # ... and as options of one call
    alpha = options.get("alpha", 0.5)
    for path in images.values():
        written = (out / "masks" / path.name).read_bytes()
        mask = configured(path)
        assert png_bytes(mask) == written
        assert png_bytes(predictor(path, **per_call)) == written
        assert (out / "color" / path.name).read_bytes() == png_bytes(configured.colorize(mask))
        overlay = (out / "overlay" / path.with_suffix(".jpg").name).read_bytes()
        assert overlay == jpeg_bytes(configured.overlay(path))  # predicted with the load() settings
        assert overlay == jpeg_bytes(predictor.overlay(path, mask, alpha=alpha))


def test_options_reach_the_model(predictor: Predictor, images: dict[str, Path]) -> None:
    photo, big = images["photo"], images["big"]
    assert (predictor(photo, flip=True) != predictor(photo)).any()
    assert (predictor(photo, mode="slide") != predictor(photo)).any()  # a 64 window on a 50x70 image
    assert (predictor(photo, scales=[1.0, 1.25]) != predictor(photo)).any()
    assert (predictor(photo, scales=1.25) == predictor(photo, scales=[1.25])).all()
    np.testing.assert_array_equal(predictor(big), predictor(big, mode="slide"))  # 150 > 2 x 64: auto slides
    assert (predictor(big, mode="whole") != predictor(big)).any()
    assert (predictor(big, mode="slide", window=(48, 40), stride=24) != predictor(big)).any()
    assert (predictor(photo, slide_above=60) == predictor(photo, mode="slide")).all()


def test_the_command_predicts_through_the_predictor(
    checkpoint: Path, images: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    original = Predictor.__call__

    def spy(self: Predictor, image: Any, **options: Any) -> np.ndarray:
        calls.append(np.asarray(image).shape[:2])
        return original(self, image, **options)

    monkeypatch.setattr(Predictor, "__call__", spy)
    trained = P.load_trained_model(checkpoint)
    P.predict_paths(trained, [images["photo"].parent], tmp_path / "out", progress=False)
    assert sorted(calls) == [(20, 24), (50, 70), (150, 140)]


def test_predict_proba(predictor: Predictor, images: dict[str, Path]) -> None:
    for options in ({}, {"flip": True, "scales": (1.0, 1.25)}, {"mode": "slide"}):
        proba = predictor.predict_proba(images["photo"], **options)
        assert proba.shape == (6, 50, 70) and proba.dtype == np.float32
        # averaged softmax passes: float32 sums of 6 terms of at most 1 are within 6 ulp(1) of 1
        np.testing.assert_allclose(proba.sum(axis=0), 1.0, rtol=0, atol=6 * np.finfo(np.float32).eps)
        np.testing.assert_array_equal(proba.argmax(axis=0), predictor(images["photo"], **options))


# ---------------------------------------------------------------------------------------------- pictures


def test_colorize_and_overlay(predictor: Predictor, images: dict[str, Path]) -> None:
    mask = predictor(images["photo"])
    color = predictor.colorize(mask)
    assert color.shape == (50, 70, 3) and color.dtype == np.uint8
    np.testing.assert_array_equal(color, palette_for(6)[mask])
    ignore = np.array([[0, 255]], dtype=np.int64)
    np.testing.assert_array_equal(predictor.colorize(ignore), [[[0, 0, 0], [255, 255, 255]]])
    image = np.asarray(Image.open(images["photo"]))
    np.testing.assert_array_equal(predictor.overlay(image, mask, alpha=0.0), image)
    np.testing.assert_array_equal(predictor.overlay(image, mask, alpha=1.0), color)
    np.testing.assert_array_equal(predictor.overlay(image), P.blend(image, color, 0.5))
    with pytest.raises(DataError, match="integer array"):
        predictor.colorize(mask.astype(np.float32))
    with pytest.raises(DataError, match="The mask is 50x70 but the image 20x24"):
        predictor.overlay(images["gray"], mask)
    with pytest.raises(ConfigError, match="opacity"):
        predictor.overlay(image, mask, alpha=2.0)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda d: d / "missing.png", DataError, "missing.png does not exist"),
        (lambda d: d, DataError, "is a folder"),
        (lambda d: (d / "notes.png").write_text("text") and d / "notes.png", DataError, "not an image file"),
        (
            lambda d: np.zeros((1, 8, 8, 3), np.uint8),
            DataError,
            "shape (H, W), (H, W, 3) or (H, W, 4), not (1, 8, 8, 3)",
        ),
        (lambda d: np.zeros((8, 8, 2), np.uint8), DataError, "not (8, 8, 2)"),
        (lambda d: np.zeros((0, 8, 3), np.uint8), DataError, "is empty"),
        (lambda d: np.zeros((8, 8, 3), np.float32), DataError, "dtype uint8 (values 0..255), not float32"),
        (lambda d: torch.zeros(3, 8, 8), DataError, "a numpy array, not a Tensor"),
        (lambda d: [[0, 1], [2, 3]], DataError, "a numpy array, not a list"),
    ],
)
def test_bad_images_are_one_sentence(
    predictor: Predictor, tmp_path: Path, make: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        predictor(make(tmp_path))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "fast"}, "mode 'fast' is unknown"),
        ({"window": 0}, "Option 'window' must be a positive int"),
        ({"stride": (8, 8, 8)}, "Option 'stride' must be a positive int"),
        ({"window": "64"}, "Option 'window'"),
        ({"flip": "false"}, "Option 'flip' must be True or False"),
        ({"scales": []}, "scales must be positive numbers"),
        ({"scales": [1, -1]}, "scales must be positive numbers"),
        ({"scales": "1,2"}, "Option 'scales' must be a number"),
        ({"slide_above": 0}, "threshold must be positive"),
    ],
)
def test_bad_options_are_config_errors(
    predictor: Predictor, checkpoint: Path, images: dict[str, Path], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        predictor(images["photo"], **options)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        allspark_seg.load(checkpoint, "cpu", **options)


def test_bad_checkpoints_are_checkpoint_errors(images: dict[str, Path], tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / "weights_only.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    cases = {
        tmp_path / "missing.pt": "does not exist",
        images["photo"]: "cannot be read safely",  # an image, not a checkpoint
        tmp_path / "notes.pt": "cannot be read safely",
        tmp_path / "weights_only.pt": "was not written by allspark-seg train",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            allspark_seg.load(path, "cpu")
        assert isinstance(info.value, AllSparkError) and str(path) in str(info.value)
