"""Inference from a trained checkpoint: rebuild the model, then turn one RGB image into class probabilities and ids.

A checkpoint written by ``allspark-seg train`` holds the resolved config; :func:`load_trained_model` rebuilds the
exact model from it (:func:`~allspark_seg.models.factory.build_model_from_config`) and loads the weights strictly, so
a checkpoint of another model fails with one sentence instead of silently loading half of it.

:func:`predict_image` is the one image -> mask path: :class:`allspark_seg.predictor.Predictor` (``allspark_seg.load``)
calls it, and ``allspark-seg predict`` (:func:`~allspark_seg.engine.predict.predict_paths`) runs every file through a
predictor. Images whose long side exceeds a threshold (default: twice the training crop) are predicted with a sliding
window of the training crop, so memory stays bounded and the model sees objects at the scale it was trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import data as D
from ..config import RunConfig, config_from_dict, crop_hw, resolve_config
from ..errors import CheckpointError, ConfigError
from ..models import AllSparkSegmentor
from ..models.factory import build_model_from_config
from ..models.pretrained import state_dict_mismatch
from .evaluate import infer
from .state import load_checkpoint

__all__ = [
    "MIN_SIDE",
    "PREDICT_MODES",
    "PredictSettings",
    "TrainedModel",
    "blend",
    "load_teacher",
    "load_trained_model",
    "predict_image",
    "predict_probabilities",
]

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


def load_teacher(path: str | Path, num_classes: int, device: torch.device) -> tuple[AllSparkSegmentor, str]:
    """The frozen teacher of ``semi.teacher_checkpoint``: a trained run's model, in eval mode, without gradients.

    Args:
        path: ``best.pt``/``last.pt`` of a training run (any architecture).
        num_classes: The classes of the run it teaches.
        device: Where it runs.

    Returns:
        The model and the sha256 of its file (a resumed run refuses a teacher file whose contents changed).

    Raises:
        ConfigError: The file is not a readable checkpoint of a training run, or its model predicts another number
            of classes.
    """
    try:
        trained = load_trained_model(path, device)
    except CheckpointError as error:
        raise ConfigError(f"Config key 'semi.teacher_checkpoint': {error}") from None
    if trained.cfg.data.num_classes != num_classes:
        raise ConfigError(
            f"Config key 'semi.teacher_checkpoint': '{path}' predicts {trained.cfg.data.num_classes} classes, this run "
            f"has {num_classes}."
        )
    trained.model.requires_grad_(False)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return trained.model, digest.hexdigest()


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


@dataclass(frozen=True)
class PredictSettings:
    """How an image is predicted (by :class:`~allspark_seg.predictor.Predictor` and ``allspark-seg predict``).

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
