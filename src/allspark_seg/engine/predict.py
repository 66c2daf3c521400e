"""Inference from a trained checkpoint: rebuild the model, evaluate it, and predict images on disk.

A checkpoint written by ``allspark-seg train`` holds the resolved config; :func:`load_trained_model` rebuilds the
exact model from it (:func:`~allspark_seg.engine.train.build_model_from_config`) and loads the weights strictly, so a
checkpoint of another model fails with one sentence instead of silently loading half of it.

:func:`predict_paths` writes, for every input image ``NAME``:

- ``OUT/masks/NAME.png``: single-channel class ids (0..K-1), the format the data readers accept;
- ``OUT/color/NAME.png``: the mask painted with the dataset's palette;
- ``OUT/overlay/NAME.jpg``: the colour mask blended over the image.

Images whose long side exceeds a threshold (default: twice the training crop) are predicted with a sliding window
of the training crop, so memory stays bounded and the model sees objects at the scale it was trained on.

:func:`predict_paths` runs every file through :class:`allspark_seg.predictor.Predictor` (``allspark_seg.load``), so
a mask predicted from Python is the mask ``allspark-seg predict`` writes.
"""

from __future__ import annotations

import glob
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import data as D
from ..config import RunConfig, apply_overrides, config_from_dict, crop_hw, resolve_config
from ..errors import CheckpointError, ConfigError, DataError
from ..interop import state_dict_mismatch
from ..models import AllSparkSegmentor
from ..utils.progress import Progress
from .checkpoint import load_checkpoint
from .evaluate import EvalResult, evaluate, infer

__all__ = [
    "PREDICT_MODES",
    "PredictSettings",
    "TrainedModel",
    "blend",
    "collect_inputs",
    "evaluate_checkpoint",
    "load_trained_model",
    "predict_image",
    "predict_paths",
    "predict_probabilities",
]

log = logging.getLogger(__name__)

PREDICT_MODES = ("auto", "whole", "slide")

#: Images with a shorter side are padded (black, bottom/right) for the forward pass and the mask cropped back.
MIN_SIDE = 32


@dataclass(frozen=True)
class TrainedModel:
    """A model rebuilt from a training checkpoint.

    Attributes:
        model: The segmentor in eval mode, on its device.
        cfg: The resolved run config stored in the checkpoint.
        class_names: K class names.
        palette: ``(K, 3)`` uint8 colours.
        step: Training iteration of the checkpoint.
        path: The checkpoint file.
    """

    model: AllSparkSegmentor
    cfg: RunConfig
    class_names: tuple[str, ...]
    palette: np.ndarray
    step: int
    path: Path

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.model.parameters()).device


def _pick_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"Device '{device}' was asked for but no CUDA device is available: use --device cpu.")
    return torch.device(device)


def _check_state_dict(model: torch.nn.Module, state: dict, path: Path) -> None:
    """Raise a one-sentence CheckpointError when ``state`` does not fit ``model`` exactly."""
    problems = state_dict_mismatch(state, model.state_dict())
    if problems:
        raise CheckpointError(f"Checkpoint '{path}' does not match the model its config describes: {problems}.")


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild the model of a training checkpoint (``last.pt``/``best.pt``) and load its weights.

    The model is built from the config stored in the checkpoint, without ``model.pretrained`` (the checkpoint
    holds every weight). Loading never unpickles code.

    Args:
        path: Checkpoint file.
        device: ``auto``, ``cpu``, ``cuda`` or a torch device.

    Returns:
        The model in eval mode with its config, class names and palette.

    Raises:
        CheckpointError: The file is missing or unreadable, was not written by ``allspark-seg train``, holds a
            config this version cannot read, or its weights do not fit the model its config describes.
    """
    from .train import build_model_from_config  # late: train imports the whole engine

    path = Path(path)
    saved = load_checkpoint(path, map_location="cpu")
    if not isinstance(saved.get("config"), dict) or not isinstance(saved.get("model"), dict):
        raise CheckpointError(
            f"Checkpoint '{path}' has no run config and model weights: it was not written by allspark-seg train "
            "(official AllSpark checkpoints load with allspark_seg.interop.load_official_checkpoint)."
        )
    try:
        cfg = resolve_config(config_from_dict(saved["config"]))
    except ConfigError as error:
        raise CheckpointError(f"Checkpoint '{path}' holds a config this version cannot read: {error}") from None
    cfg = replace(cfg, model=replace(cfg.model, pretrained=""))
    model = build_model_from_config(cfg)
    state = saved["model"]
    _check_state_dict(model, state, path)
    model.load_state_dict(state)
    model.to(_pick_device(device)).eval()
    k = cfg.data.num_classes
    assert k is not None
    names = tuple(saved.get("class_names") or (f"class_{i}" for i in range(k)))
    palette = saved.get("palette")
    palette = D.palette_for(k) if palette is None else np.asarray(torch.as_tensor(palette), dtype=np.uint8)
    if len(names) != k or palette.shape != (k, 3):
        raise CheckpointError(f"Checkpoint '{path}' has {len(names)} class names and {len(palette)} colours for {k}.")
    return TrainedModel(model, cfg, names, palette, int(saved.get("step", 0)), path)


# ------------------------------------------------------------------------------------------------- evaluate


def _eval_config(
    cfg: RunConfig,
    data_root: str | Path | None,
    overrides: Sequence[str],
) -> RunConfig:
    """The stored config with a new data root and ``data.*``/``eval.*`` overrides (the model must not change)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(("data.", "eval.")):
            raise ConfigError(
                f"Override '{item}': evaluation accepts only data.* and eval.* keys (the model comes from the "
                "checkpoint)."
            )
    if data_root is not None:
        cfg = replace(cfg, data=replace(cfg.data, root=str(data_root)))
    new = resolve_config(apply_overrides(cfg, overrides))
    if new.data.num_classes != cfg.data.num_classes:
        raise ConfigError(
            f"The evaluation data has {new.data.num_classes} classes but the checkpoint predicts "
            f"{cfg.data.num_classes}."
        )
    return new


def evaluate_checkpoint(
    trained: TrainedModel,
    *,
    data_root: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> tuple[EvalResult, RunConfig]:
    """Evaluate a trained model on the validation set of its config, as training does.

    With no arguments this reproduces the number training logged for the checkpoint exactly (same data, same
    evaluation settings, fp32, one process).

    Args:
        trained: From :func:`load_trained_model`.
        data_root: Another data root (same format).
        overrides: ``data.*`` and ``eval.*`` overrides, e.g. ``eval.mode=slide``, ``eval.flip=true``,
            ``eval.scales=[0.75,1,1.25]``, ``data.val_split=splits/val.txt``.

    Returns:
        The evaluation result and the config it used.

    Raises:
        DataError: The validation data is missing or inconsistent.
        ConfigError: A bad override.
    """
    cfg = _eval_config(trained.cfg, data_root, overrides)
    fmt = "folder" if cfg.data.format == "synthetic" else cfg.data.format
    root = Path(cfg.data.root).expanduser()
    k = cfg.data.num_classes
    assert k is not None
    split = None
    if cfg.data.val_split:
        split = Path(cfg.data.val_split).expanduser()
        split = split if split.is_absolute() else root / split
    items = D.open_split(fmt, root, "val", num_classes=k, split_file=split, check=cfg.data.check)
    loader = D.build_val_loader(D.ValDataset(items, k))
    ev = cfg.eval
    result = evaluate(
        trained.model,
        loader,
        k,
        mode=ev.mode or "whole",
        window=tuple(ev.window),
        stride=tuple(ev.stride),
        flip=ev.flip,
        scales=tuple(ev.scales),
        shift_edges=ev.shift_edges,
        device=trained.device,
    )
    return result, cfg


# -------------------------------------------------------------------------------------------------- predict


@dataclass(frozen=True)
class PredictSettings:
    """How :func:`predict_paths` runs.

    Attributes:
        mode: ``auto`` (sliding window for images whose long side exceeds ``slide_above``), ``whole`` or ``slide``.
        slide_above: Long side in pixels above which ``auto`` slides; None = twice the training crop's long side.
        window: Sliding window ``(h, w)``; None = the config's ``eval.window`` (the training crop by default).
        stride: Sliding stride ``(h, w)``; None = the config's ``eval.stride``.
        flip: Horizontal-flip test-time augmentation.
        scales: Multi-scale test-time augmentation factors.
        alpha: Opacity of the colour mask in the overlays.
    """

    mode: str = "auto"
    slide_above: int | None = None
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    alpha: float = 0.5

    def check(self) -> None:
        """Raise ConfigError for impossible values."""
        if self.mode not in PREDICT_MODES:
            raise ConfigError(f"Prediction mode '{self.mode}' is unknown: choose one of {', '.join(PREDICT_MODES)}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"The overlay opacity must be in [0, 1], got {self.alpha}.")
        if self.slide_above is not None and self.slide_above < 1:
            raise ConfigError(f"The sliding-window threshold must be positive, got {self.slide_above}.")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"Test-time scales must be positive numbers, got {list(self.scales)}.")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in D.IMAGE_EXTENSIONS


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files, folders (their image files, sorted, not recursive) and glob patterns into image paths.

    Raises:
        DataError: An input that is neither an image file, a folder nor a glob pattern with matches, or no image
            at all.
    """
    found: list[Path] = []
    for raw in inputs:
        text = str(raw)
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if _is_image(p))
            if not files:
                raise DataError(f"Folder '{path}' contains no images ({', '.join(D.IMAGE_EXTENSIONS)}).")
            found.extend(files)
        elif path.is_file():
            if path.suffix.lower() not in D.IMAGE_EXTENSIONS:
                raise DataError(f"Input '{path}' is not an image ({', '.join(D.IMAGE_EXTENSIONS)}).")
            found.append(path)
        elif glob.has_magic(text):
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if _is_image(Path(p)))
            if not files:
                raise DataError(f"Pattern '{text}' matches no images.")
            found.extend(files)
        else:
            raise DataError(f"Input '{text}' does not exist (not a file, a folder or a glob pattern with matches).")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise DataError("No input images were given.")
    return unique


def _output_names(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique with ``_2``, ``_3``... when two inputs share a name."""
    names: list[str] = []
    used: set[str] = set()
    for path in paths:
        name, n = path.stem, 1
        while name in used:
            n += 1
            name = f"{path.stem}_{n}"
        used.add(name)
        names.append(name)
    return names


def blend(image: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * image + alpha * color`` as uint8 (both ``(H, W, 3)``)."""
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * color.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _sliding(settings: PredictSettings, cfg: RunConfig, h: int, w: int) -> bool:
    if settings.mode != "auto":
        return settings.mode == "slide"
    threshold = settings.slide_above if settings.slide_above is not None else 2 * max(crop_hw(cfg))
    return max(h, w) > threshold


@torch.inference_mode()
def predict_probabilities(
    trained: TrainedModel, image: np.ndarray, settings: PredictSettings = PredictSettings()
) -> torch.Tensor:
    """Class probabilities of one RGB image, averaged over the test-time augmentation passes.

    Args:
        trained: From :func:`load_trained_model`.
        image: ``(H, W, 3)`` uint8 RGB.
        settings: Mode, sliding window and test-time augmentation.

    Returns:
        ``(K, H, W)`` float32 probabilities on the model's device.
    """
    settings.check()
    cfg = trained.cfg
    h, w = image.shape[:2]
    slide = _sliding(settings, cfg, h, w)
    window = settings.window or tuple(cfg.eval.window)
    stride = settings.stride or tuple(cfg.eval.stride)
    if min(h, w) < MIN_SIDE:  # MiT needs about 29 pixels; pad with black (as training pads) and crop afterwards
        image = np.pad(image, ((0, max(0, MIN_SIDE - h)), (0, max(0, MIN_SIDE - w)), (0, 0)))
    x = D.normalize(image).unsqueeze(0).to(trained.device)
    probs = infer(
        trained.model,
        x,
        len(trained.class_names),
        "slide" if slide else "whole",
        window,
        stride,
        settings.flip,
        settings.scales,
        cfg.eval.shift_edges,
    )
    return probs[0, :, :h, :w]


@torch.inference_mode()
def predict_image(
    trained: TrainedModel, image: np.ndarray, settings: PredictSettings = PredictSettings()
) -> np.ndarray:
    """Class ids of one RGB image (the arg max of :func:`predict_probabilities`).

    Args:
        trained: From :func:`load_trained_model`.
        image: ``(H, W, 3)`` uint8 RGB.
        settings: Mode, sliding window and test-time augmentation.

    Returns:
        ``(H, W)`` uint8 class ids (K is at most 255).
    """
    return predict_probabilities(trained, image, settings).argmax(dim=0).to(torch.uint8).cpu().numpy()


def predict_paths(
    trained: TrainedModel,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    settings: PredictSettings = PredictSettings(),
    *,
    progress: bool = True,
) -> list[Path]:
    """Predict images, folders or glob patterns and write masks, colour masks and overlays.

    Args:
        trained: From :func:`load_trained_model`.
        inputs: Image files, folders or glob patterns.
        out_dir: Output folder (``masks/``, ``color/`` and ``overlay/`` are created in it).
        settings: Mode, sliding window, test-time augmentation and overlay opacity.
        progress: Show a progress bar (or periodic log lines when not on a terminal).

    Returns:
        The class-id mask files written, in input order.

    Raises:
        DataError: A missing or unreadable input.
    """
    from ..predictor import Predictor  # late: the predictor module imports this one

    predictor = Predictor(trained, settings)
    paths = collect_inputs(inputs)
    out = Path(out_dir)
    folders = {name: out / name for name in ("masks", "color", "overlay")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    bar = Progress(len(paths), logger=log, enabled=progress, desc="predict")
    written: list[Path] = []
    start = time.perf_counter()
    every = max(1, len(paths) // 10)
    for i, (path, name) in enumerate(zip(paths, _output_names(paths), strict=True), start=1):
        image = D.load_image(path)
        mask = predictor(image)
        color = predictor.colorize(mask)
        Image.fromarray(mask).save(folders["masks"] / f"{name}.png")
        Image.fromarray(color).save(folders["color"] / f"{name}.png")
        Image.fromarray(blend(image, color, settings.alpha)).save(folders["overlay"] / f"{name}.jpg", quality=90)
        written.append(folders["masks"] / f"{name}.png")
        bar.update(i, path.name, log_line=i % every == 0 or i == len(paths))
    bar.close()
    log.info("predicted %d images in %.1f s into %s", len(paths), time.perf_counter() - start, out)
    return written
