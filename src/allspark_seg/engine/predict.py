"""Commands on a trained checkpoint: evaluate it on a validation set, and predict image files into a folder.

The model comes from :func:`~allspark_seg.engine.inference.load_trained_model` (re-exported here with the rest of the
image -> mask core of :mod:`.inference`). :func:`predict_paths` writes, for every input image ``NAME``:

- ``OUT/masks/NAME.png``: single-channel class ids (0..K-1), the format the data readers accept;
- ``OUT/color/NAME.png``: the mask painted with the dataset's palette;
- ``OUT/overlay/NAME.jpg``: the colour mask blended over the image.

:func:`predict_paths` runs every file through :class:`allspark_seg.predictor.Predictor` (``allspark_seg.load``), so
a mask predicted from Python is the mask ``allspark-seg predict`` writes.
"""

from __future__ import annotations

import glob
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from PIL import Image

from .. import data as D
from ..config import RunConfig, apply_overrides, resolve_config
from ..errors import ConfigError, DataError
from ..predictor import Predictor
from ..utils.progress import Progress
from . import inference
from .evaluate import EvalResult, evaluate
from .inference import *  # noqa: F403 (the checkpoint -> mask core, re-exported: it was defined here)
from .inference import PredictSettings, TrainedModel, blend
from .inference import _sliding as _sliding  # tests reach it through this module

__all__ = [*inference.__all__, "collect_inputs", "evaluate_checkpoint", "predict_paths"]

log = logging.getLogger(__name__)


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


def predict_paths(
    trained: TrainedModel,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    settings: PredictSettings | None = None,
    *,
    progress: bool = True,
) -> list[Path]:
    """Predict images, folders or glob patterns and write masks, colour masks and overlays.

    Args:
        trained: From :func:`load_trained_model`.
        inputs: Image files, folders or glob patterns.
        out_dir: Output folder (``masks/``, ``color/`` and ``overlay/`` are created in it).
        settings: Mode, sliding window, test-time augmentation and overlay opacity; None = the defaults.
        progress: Show a progress bar (or periodic log lines when not on a terminal).

    Returns:
        The class-id mask files written, in input order.

    Raises:
        DataError: A missing or unreadable input.
    """
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
        Image.fromarray(blend(image, color, predictor.settings.alpha)).save(
            folders["overlay"] / f"{name}.jpg", quality=90
        )
        written.append(folders["masks"] / f"{name}.png")
        bar.update(i, path.name, log_line=i % every == 0 or i == len(paths))
    bar.close()
    log.info("predicted %d images in %.1f s into %s", len(paths), time.perf_counter() - start, out)
    return written
