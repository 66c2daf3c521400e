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
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import data as D
from ..config import RunConfig, config_from_dict, crop_hw, resolve_config
from ..errors import CheckpointError, ConfigError
from ..models import AllSparkSegmentor
from ..models.factory import build_model_from_config
from ..models.pretrained import state_dict_mismatch
from .evaluate import infer
from .state import LAST, load_checkpoint

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
    "why_run_unfinished",
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


def load_teacher(path: str | Path, class_names: Sequence[str], device: torch.device) -> tuple[AllSparkSegmentor, str]:
    """The frozen teacher of ``semi.teacher_checkpoint``: a finished run's model, in eval mode, without gradients.

    Refused: a teacher with another number of classes, or other class names or the same in another order (its
    pseudo-labels would be permuted), and a checkpoint of a run that had not finished (:func:`why_run_unfinished`).
    Logs the checkpoint used: its path, iteration and validation mIoU.

    Args:
        path: ``best.pt``/``last.pt`` of a training run (any architecture).
        class_names: The K class names of the run it teaches, in order.
        device: Where it runs.

    Returns:
        The model and the sha256 of its file (a resumed run refuses a teacher file whose contents changed).

    Raises:
        ConfigError: The file is not a readable checkpoint of a training run, its classes are not this run's, in
            this order, or its run had not finished.
    """
    path = Path(path)
    key = "Config key 'semi.teacher_checkpoint'"
    try:
        saved = load_checkpoint(path, map_location="cpu")
        trained = _trained_model(saved, path, device)
    except CheckpointError as error:
        raise ConfigError(f"{key}: {error}") from None
    k = len(class_names)
    if trained.cfg.data.num_classes != k:
        raise ConfigError(f"{key}: '{path}' predicts {trained.cfg.data.num_classes} classes, this run has {k}.")
    names, ours = saved.get("class_names"), list(class_names)
    if names is None:
        log.warning("%s: '%s' records no class names: its classes cannot be checked against %s", key, path, ours)
    elif list(names) != ours:
        how = "in another order" if sorted(names) == sorted(ours) else "with other names"
        raise ConfigError(
            f"{key}: '{path}' was trained on the classes {list(names)}, this run has {ours} ({how}): its "
            "pseudo-labels would name other classes; train the teacher on this run's classes."
        )
    unfinished = why_run_unfinished(saved, path)
    if unfinished:
        raise ConfigError(f"{key}: '{path}' {unfinished}; use the best.pt or last.pt of a finished run.")
    log.info("teacher: %s, frozen: %s", path, _checkpoint_summary(saved))
    trained.model.requires_grad_(False)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return trained.model, digest.hexdigest()


def _run_total(saved: dict[str, Any]) -> int | None:
    """The iterations of a checkpoint's run: recorded in it (``total``), or for a checkpoint written before that by a
    run set in iterations, its ``train.iterations``; None when unknown (an older run set in epochs)."""
    total = saved.get("total")
    if total is None:
        total = (saved.get("config") or {}).get("train", {}).get("iterations")
    return None if total is None else int(total)


def why_run_unfinished(saved: dict[str, Any], path: Path) -> str | None:
    """Why the run of a training checkpoint had not finished, or None when it had.

    A checkpoint at its run's last iteration (``step >= total``: the ``last.pt`` of a finished run) comes from a
    finished run. An earlier one (``best.pt`` is written at the best validation, usually before the end) does when
    the ``last.pt`` in its folder is at its run's last iteration and names this checkpoint as the run's best (the same
    ``best_step``, ``best_miou`` and config): a run still going, stopped (collapse guard, interruption) or extended
    since is refused. A checkpoint written before runs recorded their length, by a run set in epochs, cannot be told:
    a warning is logged and it is accepted.

    Args:
        saved: The checkpoint dict read from ``path``.
        path: Its file.

    Returns:
        None, or a sentence fragment (what follows the file's name) saying why not.
    """
    step, total = int(saved.get("step", 0)), _run_total(saved)
    if total is None:
        log.warning("'%s' does not record how long its run was: whether that run finished cannot be told", path)
        return None
    if step >= total:
        return None
    last_path = path.parent / LAST
    if not last_path.is_file() or last_path.resolve() == path.resolve():
        return f"is at iteration {step} of its {total}-iteration run, which had not finished"
    try:
        last = load_checkpoint(last_path, map_location="meta")  # the numbers only, no tensor data
    except CheckpointError:
        return f"is at iteration {step} of {total} and the {LAST} next to it cannot be read"
    last_step, last_total = int(last.get("step", 0)), _run_total(last)
    if last_total is None or last_step < last_total:
        return f"is at iteration {step} of {total} and its run had not finished ({LAST} at iteration {last_step})"
    same_run = last.get("config") == saved.get("config")
    if not same_run or last.get("best_step") != step or last.get("best_miou") != saved.get("best_miou"):
        return (
            f"is at iteration {step} of {total} and is not the best checkpoint of the finished run in its folder "
            f"({LAST}'s best is at iteration {last.get('best_step')})"
        )
    return None


def _checkpoint_summary(saved: dict[str, Any]) -> str:
    """``iteration S of T, validation mIoU M`` of a training checkpoint (the numbers it records)."""
    step, total = int(saved.get("step", 0)), _run_total(saved)
    miou = saved.get("miou")
    if miou is None and saved.get("best_step") == step:
        miou = saved.get("best_miou")  # best.pt: its own validation
    of = "" if total is None else f" of {total}"
    score = "not recorded" if miou is None or miou < 0 else f"{100 * float(miou):.2f}"
    return f"iteration {step}{of}, validation mIoU {score}"


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
    return _trained_model(load_checkpoint(path, map_location="cpu"), path, device)


def _trained_model(saved: dict[str, Any], path: Path, device: str | torch.device) -> TrainedModel:
    """:func:`load_trained_model` on a checkpoint dict already read from ``path``."""
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
