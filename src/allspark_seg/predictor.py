"""Prediction from Python in two lines: :func:`load` a training checkpoint, call the :class:`Predictor`.

::

    import allspark_seg

    predictor = allspark_seg.load("runs/mine/best.pt")
    mask = predictor("photo.jpg")                 # (H, W) uint8 class ids, the size of the image
    color = predictor.colorize(mask)              # (H, W, 3) uint8, the dataset's palette

This is the code path of ``allspark-seg predict``: the command runs every file through a :class:`Predictor` built
with its options, so ``predictor(path)`` returns exactly the ``masks/NAME.png`` the command writes for that file.
Images are given as a file path, a PIL image or a uint8 numpy array (``(H, W, 3)`` RGB, ``(H, W)`` grayscale or
``(H, W, 4)`` RGBA); every form is converted to RGB the way the command reads files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import data as D
from .config import RunConfig
from .data.files import READ_ERRORS
from .data.files import to_rgb as _pil_to_rgb
from .engine.inference import (
    PredictSettings,
    TrainedModel,
    blend,
    load_trained_model,
    predict_image,
    predict_probabilities,
)
from .errors import ConfigError, DataError
from .utils import to_pair

__all__ = ["ImageInput", "Predictor", "load", "to_rgb"]

#: What a :class:`Predictor` accepts as an image.
ImageInput = str | os.PathLike[str] | Image.Image | np.ndarray

#: A sliding window or stride: ``n`` or ``(h, w)``.
Size = int | Sequence[int]


def to_rgb(image: ImageInput) -> np.ndarray:
    """Convert an image given as a path, a PIL image or a numpy array to RGB, as ``allspark-seg predict`` reads files.

    Args:
        image: A file path; a PIL image of any mode; or a uint8 array ``(H, W)`` (grayscale), ``(H, W, 1)``,
            ``(H, W, 3)`` (RGB) or ``(H, W, 4)`` (RGBA, alpha dropped).

    Returns:
        ``(H, W, 3)`` uint8 RGB, C-contiguous.

    Raises:
        DataError: A missing or unreadable file, a folder, an array of another dtype or shape, or another type.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if path.is_dir():
            raise DataError(
                f"Image '{path}' is a folder: a predictor takes one image (allspark-seg predict takes folders)."
            )
        return D.load_image(path)
    if isinstance(image, Image.Image):
        try:
            image.load()
            return _pil_to_rgb(image)
        except READ_ERRORS as error:
            raise DataError(f"The PIL image (mode {image.mode}) cannot be converted to RGB: {error}.") from error
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise DataError(f"An image must be a file path, a PIL image or a numpy array, not a {type(image).__name__}.")


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 -> ``(H, W, 3)`` uint8."""
    if array.dtype != np.uint8:
        raise DataError(
            f"A numpy image must have dtype uint8 (values 0..255), not {array.dtype}: for floats in [0, 1] pass "
            "(x * 255).round().astype(np.uint8)."
        )
    shape = tuple(array.shape)
    if not (array.ndim == 2 or (array.ndim == 3 and shape[2] in (1, 3, 4))):
        raise DataError(f"A numpy image must have shape (H, W), (H, W, 3) or (H, W, 4), not {shape}.")
    if array.size == 0:
        raise DataError(f"The numpy image is empty (shape {shape}).")
    if array.ndim == 2 or shape[2] == 1:
        return np.repeat(array.reshape(shape[0], shape[1], 1), 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def _size(value: Size | None, name: str) -> tuple[int, int] | None:
    """``None``, ``n`` or ``(h, w)`` -> ``None`` or ``(h, w)`` positive ints."""
    return None if value is None else to_pair(value, f"Option '{name}'")


def _flag(value: bool) -> bool:
    """A bool option (a string such as ``"false"`` would be true)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"Option 'flip' must be True or False, got {value!r}.")
    return bool(value)


def _scales(value: float | Sequence[float]) -> tuple[float, ...]:
    """One factor or a sequence of them -> a tuple of floats (checked positive by :class:`PredictSettings`)."""
    if isinstance(value, (int, float, np.number)):
        items: list[object] = [value]
    else:
        items = list(value) if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str) else ["?"]
    if not all(isinstance(s, (int, float, np.number)) and not isinstance(s, bool) for s in items):
        raise ConfigError(f"Option 'scales' must be a number or a sequence of numbers, got {value!r}.")
    return tuple(float(s) for s in items)


class Predictor:
    """A trained model that turns images into class-id masks, exactly as ``allspark-seg predict`` does.

    Build one with :func:`load`. Calling it predicts one image; keyword options override, for that call, the
    settings given to :func:`load`.

    Attributes:
        settings: The default mode, sliding window, test-time augmentation and overlay opacity.
    """

    def __init__(self, trained: TrainedModel, settings: PredictSettings | None = None) -> None:
        """Wrap a model rebuilt by :func:`~allspark_seg.engine.inference.load_trained_model`.

        Args:
            trained: The model, its config, class names and palette.
            settings: Defaults of every call; None = the defaults of ``allspark-seg predict``.

        Raises:
            ConfigError: Impossible settings.
        """
        settings = PredictSettings() if settings is None else settings
        settings.check()
        self._trained = trained
        self.settings = settings

    # ------------------------------------------------------------------------------------------ description

    @property
    def classes(self) -> tuple[str, ...]:
        """The K class names stored in the checkpoint (``class_0``... when it has none)."""
        return self._trained.class_names

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return len(self._trained.class_names)

    @property
    def palette(self) -> np.ndarray:
        """``(K, 3)`` uint8 colours of the classes (a copy)."""
        return self._trained.palette.copy()

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._trained.device

    @property
    def model(self) -> torch.nn.Module:
        """The segmentor, in eval mode."""
        return self._trained.model

    @property
    def config(self) -> RunConfig:
        """The resolved run config stored in the checkpoint."""
        return self._trained.cfg

    @property
    def step(self) -> int:
        """The training iteration of the checkpoint."""
        return self._trained.step

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self._trained.path

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"Predictor('{self.path}', {self.config.method}, {self.num_classes} classes, step {self.step}, "
            f"device {self.device}, mode {s.mode}, flip {s.flip}, scales {list(s.scales)})"
        )

    # -------------------------------------------------------------------------------------------- predict

    def _settings(
        self,
        mode: str | None,
        window: Size | None,
        stride: Size | None,
        flip: bool | None,
        scales: float | Sequence[float] | None,
        slide_above: int | None,
    ) -> PredictSettings:
        """The default settings with this call's options."""
        changes: dict[str, object] = {}
        if mode is not None:
            changes["mode"] = mode
        if window is not None:
            changes["window"] = _size(window, "window")
        if stride is not None:
            changes["stride"] = _size(stride, "stride")
        if flip is not None:
            changes["flip"] = _flag(flip)
        if scales is not None:
            changes["scales"] = _scales(scales)
        if slide_above is not None:
            changes["slide_above"] = slide_above
        settings = replace(self.settings, **changes) if changes else self.settings
        settings.check()
        return settings

    def __call__(
        self,
        image: ImageInput,
        *,
        mode: str | None = None,
        window: Size | None = None,
        stride: Size | None = None,
        flip: bool | None = None,
        scales: float | Sequence[float] | None = None,
        slide_above: int | None = None,
    ) -> np.ndarray:
        """Class ids of one image.

        An option left at None keeps the predictor's setting (by default that of ``allspark-seg predict``:
        ``auto``, the config's ``eval.window`` and ``eval.stride``, no flip, scale 1, slide above twice the training
        crop).

        Args:
            image: A file path, a PIL image or a uint8 array (see :func:`to_rgb`).
            mode: ``auto`` (slide when the long side exceeds ``slide_above``), ``whole`` or ``slide``.
            window: Sliding window, ``n`` or ``(h, w)``.
            stride: Sliding stride, ``n`` or ``(h, w)``.
            flip: Add horizontally flipped passes.
            scales: Multi-scale test-time augmentation factors, e.g. ``(0.75, 1.0, 1.25)``.
            slide_above: Long side in pixels above which ``auto`` slides.

        Returns:
            ``(H, W)`` uint8 class ids in ``0..K-1``, the size of the image.

        Raises:
            DataError: An image that cannot be read or converted.
            ConfigError: An impossible option.
        """
        settings = self._settings(mode, window, stride, flip, scales, slide_above)
        return predict_image(self._trained, to_rgb(image), settings)

    def predict_proba(
        self,
        image: ImageInput,
        *,
        mode: str | None = None,
        window: Size | None = None,
        stride: Size | None = None,
        flip: bool | None = None,
        scales: float | Sequence[float] | None = None,
        slide_above: int | None = None,
    ) -> np.ndarray:
        """Class probabilities of one image (averaged over the test-time passes); their arg max is the mask.

        Takes the options of :meth:`__call__`.

        Returns:
            ``(K, H, W)`` float32 probabilities.
        """
        settings = self._settings(mode, window, stride, flip, scales, slide_above)
        return predict_probabilities(self._trained, to_rgb(image), settings).cpu().numpy()

    # --------------------------------------------------------------------------------------------- pictures

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """Paint a mask with the palette ``allspark-seg predict`` uses for ``color/NAME.png``.

        Args:
            mask: ``(H, W)`` integer class ids; ids without a colour (255 = ignore) are drawn white.

        Returns:
            ``(H, W, 3)`` uint8 RGB.

        Raises:
            DataError: Not a 2-D integer array.
        """
        mask = np.asarray(mask)
        if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
            raise DataError(f"A mask must be an (H, W) integer array, not {mask.dtype} of shape {mask.shape}.")
        return D.colorize(mask, self._trained.palette)

    def overlay(self, image: ImageInput, mask: np.ndarray | None = None, alpha: float | None = None) -> np.ndarray:
        """The colour mask blended over the image, as in ``overlay/NAME.jpg`` (before JPEG compression).

        Args:
            image: A file path, a PIL image or a uint8 array (see :func:`to_rgb`).
            mask: ``(H, W)`` class ids; None = predict them with the default settings.
            alpha: Opacity of the colours in ``[0, 1]``; None = ``settings.alpha`` (0.5).

        Returns:
            ``(H, W, 3)`` uint8 RGB.

        Raises:
            DataError: A mask of another size than the image.
            ConfigError: ``alpha`` outside ``[0, 1]``.
        """
        rgb = to_rgb(image)
        alpha = self.settings.alpha if alpha is None else float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"The overlay opacity must be in [0, 1], got {alpha}.")
        mask = predict_image(self._trained, rgb, self.settings) if mask is None else mask
        color = self.colorize(mask)
        if color.shape != rgb.shape:
            raise DataError(
                f"The mask is {color.shape[0]}x{color.shape[1]} but the image {rgb.shape[0]}x{rgb.shape[1]}."
            )
        return blend(rgb, color, alpha)


def load(
    path: str | os.PathLike[str],
    device: str | torch.device = "auto",
    *,
    mode: str = "auto",
    window: Size | None = None,
    stride: Size | None = None,
    flip: bool = False,
    scales: float | Sequence[float] = (1.0,),
    slide_above: int | None = None,
    alpha: float = 0.5,
) -> Predictor:
    """Load a checkpoint of ``allspark-seg train`` (``best.pt``/``last.pt``) as a :class:`Predictor`.

    The defaults are those of ``allspark-seg predict``; each is the matching command-line option.

    Args:
        path: The checkpoint file.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N`` or a torch device.
        mode: ``auto`` (sliding window for images whose long side exceeds ``slide_above``), ``whole`` or ``slide``.
        window: Sliding window, ``n`` or ``(h, w)``; None = the config's ``eval.window`` (the training crop).
        stride: Sliding stride, ``n`` or ``(h, w)``; None = the config's ``eval.stride``.
        flip: Horizontal-flip test-time augmentation.
        scales: Multi-scale test-time augmentation factors.
        slide_above: Long side in pixels above which ``auto`` slides; None = twice the training crop's long side.
        alpha: Opacity of the colours in :meth:`Predictor.overlay`.

    Returns:
        The predictor, its model in eval mode on ``device``.

    Raises:
        CheckpointError: The file is missing, unreadable, not a training checkpoint, or does not fit its model.
        ConfigError: An impossible option or an unavailable device.
    """
    settings = PredictSettings(
        mode=mode,
        slide_above=slide_above,
        window=_size(window, "window"),
        stride=_size(stride, "stride"),
        flip=_flag(flip),
        scales=_scales(scales),
        alpha=float(alpha),
    )
    settings.check()
    return Predictor(load_trained_model(path, device), settings)
