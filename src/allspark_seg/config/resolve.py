"""Resolving a run config: the method's defaults and the data format fill the null values, and every check runs.

Each field is checked against its choices or range (carried by the field, :mod:`.schema`); the checks here are the
ones that involve several keys, the method, the encoder or a file. Resolving a resolved config returns it unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from ..data.formats import FORMAT_CLASSES
from ..errors import ConfigError
from ..methods import METHODS, WEAK_TO_STRONG, Method, get_method
from ..models.factory import CNN_ENCODERS, ENCODER_NAMES, HF_ENCODER_PREFIX
from ..models.installed import installed_weights_path
from ..utils import to_pair
from .schema import AUTO, CHOICES, INSTALLED, RANGE, ModelConfig, RunConfig, SemiConfig, leaf_fields

__all__ = ["crop_hw", "resolve_config"]

#: Formats read from split files (``data.labeled_split``, ``data.unlabeled_split``).
_SPLIT_FORMATS = ("voc", "cityscapes", "coco")


def _check_choices(cfg: RunConfig) -> None:
    """The method is a registered one, and every field with choices holds one of them (or null)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"Config key 'method' is '{cfg.method}': choose one of {', '.join(METHODS)}.")
    for key, f, value in leaf_fields(cfg):
        choices = f.metadata.get(CHOICES)
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(f"Config key '{key}' is '{value}': choose one of {', '.join(choices)}.")


def _check_ranges(cfg: RunConfig) -> None:
    """Every number of a field with a range lies in it (null values and words such as ``epoch`` are skipped)."""
    for key, f, value in leaf_fields(cfg):
        valid = f.metadata.get(RANGE)
        if valid is None or value is None or isinstance(value, str):
            continue
        if any(v not in valid for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"Config key '{key}' must be {valid}, got {value}.")


def _pair(value: int | list[int], key: str) -> tuple[int, int]:
    """An int or ``[h, w]`` (type-checked when read) as ``(h, w)``."""
    if isinstance(value, list) and len(value) != 2:
        raise ConfigError(f"Config key '{key}' must be an int or [height, width], got {value}.")
    return to_pair(value)


def crop_hw(cfg: RunConfig) -> tuple[int, int]:
    """The training crop as ``(h, w)``.

    Raises:
        ConfigError: ``data.crop_size`` is still ``auto`` (the data decides it, ``engine.adapt.adapt_to_data``).
    """
    if cfg.data.crop_size == AUTO:
        raise ConfigError(
            "Config key 'data.crop_size' is 'auto': the crop is decided from the training images when the data is "
            "opened (allspark-seg train does it); give a size to build a model without the data."
        )
    return _pair(cfg.data.crop_size, "data.crop_size")


def resolve_config(cfg: RunConfig) -> RunConfig:
    """Fill derived values from the method's defaults and the data format, and validate every key.

    Resolving a resolved config returns it unchanged.

    Raises:
        ConfigError: One sentence naming the first invalid key or combination.
    """
    _check_choices(cfg)
    method = get_method(cfg.method)

    # Model: the AllSpark block follows the method unless set.
    allspark = cfg.model.allspark
    allspark = replace(
        allspark,
        enabled=method.uses_allspark if allspark.enabled is None else allspark.enabled,
        grouping=allspark.grouping or method.grouping,
    )
    model = replace(cfg.model, allspark=allspark)
    _check_encoder(model)
    model = replace(model, pretrained=_resolve_installed(model))

    # Data: number of classes and pipeline.
    data = cfg.data
    if data.format in FORMAT_CLASSES:
        if data.num_classes not in (None, FORMAT_CLASSES[data.format]):
            raise ConfigError(
                f"Config key 'data.num_classes' is {data.num_classes} but format '{data.format}' has "
                f"{FORMAT_CLASSES[data.format]} classes."
            )
        data = replace(data, num_classes=FORMAT_CLASSES[data.format])
    elif data.format == "synthetic":
        if data.num_classes not in (None, data.synthetic.num_classes):
            raise ConfigError(
                f"Config key 'data.num_classes' is {data.num_classes} but the synthetic dataset has "
                f"data.synthetic.num_classes={data.synthetic.num_classes}."
            )
        data = replace(data, num_classes=data.synthetic.num_classes)
    data = replace(data, pipeline=data.pipeline or method.pipeline)
    if isinstance(data.crop_size, str) and data.crop_size != AUTO:
        raise ConfigError(f"Config key 'data.crop_size' must be an int, [h, w] or 'auto', got '{data.crop_size}'.")
    if data.crop_size != AUTO and min(_pair(data.crop_size, "data.crop_size")) < 32:
        raise ConfigError(f"Config key 'data.crop_size' must be at least 32 pixels, got {data.crop_size}.")
    if data.format in _SPLIT_FORMATS and not data.labeled_split:
        raise ConfigError(f"Config key 'data.labeled_split' is required for format '{data.format}'.")
    if data.format in _SPLIT_FORMATS and method.semi and not data.unlabeled_split:
        raise ConfigError(
            f"Config key 'data.unlabeled_split' is required for method '{cfg.method}' on format '{data.format}'."
        )
    if data.format != "synthetic" and not data.root:
        raise ConfigError(f"Config key 'data.root' is required for format '{data.format}'.")

    # Training length, then the range of every number.
    train = cfg.train
    if (train.iterations is None) == (train.epochs is None):
        raise ConfigError("Give exactly one of the config keys 'train.iterations' and 'train.epochs'.")
    if train.unlabeled_batch_size is None:
        train = replace(train, unlabeled_batch_size=train.batch_size)
    if isinstance(train.eval_every, str) and train.eval_every != "epoch":
        raise ConfigError(
            f"Config key 'train.eval_every' must be a number of iterations or 'epoch', got '{train.eval_every}'."
        )
    _check_ranges(cfg)

    # Semi-supervised options from the method.
    semi = _fill_semi(cfg.semi, method)
    if semi.warmup_iterations is not None and semi.warmup_epochs is not None:
        raise ConfigError("Give at most one of 'semi.warmup_iterations' and 'semi.warmup_epochs'.")
    if data.pipeline == "allspark" and (semi.cutmix or semi.feature_perturbation):
        raise ConfigError(
            "semi.cutmix and semi.feature_perturbation need the unimatch augmentation pipeline: "
            "set data.pipeline=unimatch."
        )
    _check_weak_to_strong(method, semi, data.pipeline)
    _check_teacher(method, semi)

    # Evaluation defaults.
    ev = cfg.eval
    mode = ev.mode or ("slide" if data.format == "cityscapes" else "whole")
    if ev.window is None and data.crop_size == AUTO:  # filled when the data has decided the crop
        ev = replace(ev, mode=mode, stride=None if ev.stride is None else list(_pair(ev.stride, "eval.stride")))
    else:
        window = list(_pair(ev.window if ev.window is not None else data.crop_size, "eval.window"))
        stride = ev.stride if ev.stride is not None else [max(1, int(s * 2 / 3)) for s in window]
        ev = replace(ev, mode=mode, window=window, stride=list(_pair(stride, "eval.stride")))
    if not ev.scales or any(s <= 0 for s in ev.scales):
        raise ConfigError(f"Config key 'eval.scales' must be a non-empty list of positive factors, got {ev.scales}.")
    guard = replace(cfg.guard, enabled=method.semi if cfg.guard.enabled is None else cfg.guard.enabled)
    if allspark.enabled and allspark.infer_memory and not allspark.memory:
        raise ConfigError(
            "Config key 'model.allspark.infer_memory' reads the Semantic Memory at inference: it needs "
            "model.allspark.memory=true."
        )
    _check_hf_pretrained(model)
    return replace(cfg, model=model, data=data, train=train, semi=semi, eval=ev, guard=guard)


def _fill_semi(semi: SemiConfig, method: Method) -> SemiConfig:
    """The null ``semi.*`` keys take the method's defaults; a method without unlabeled images sets them all."""
    defaults = asdict(method.defaults)
    if semi.teacher_checkpoint and semi.ema is None:
        defaults["ema"] = False  # the frozen teacher takes the place of the method's EMA teacher
    if not method.semi:
        return replace(semi, **defaults)
    return replace(semi, **{k: v if getattr(semi, k) is None else getattr(semi, k) for k, v in defaults.items()})


def _check_weak_to_strong(method: Method, semi: SemiConfig, pipeline: str) -> None:
    """Strong views, CutMix and feature perturbation belong to the weak-to-strong methods."""
    if method.weak_to_strong:
        if pipeline != "unimatch":
            raise ConfigError(
                f"Method '{method.name}' learns from strong views of the unlabeled images: it needs "
                "data.pipeline=unimatch."
            )
        if semi.strong_views not in (1, 2):
            raise ConfigError(
                f"Config key 'semi.strong_views' must be 1 or 2 for '{method.name}', got {semi.strong_views}."
            )
        if not 0.0 <= semi.fp_dropout < 1.0:
            raise ConfigError(f"Config key 'semi.fp_dropout' must be in [0, 1), got {semi.fp_dropout}.")
        return
    for key in ("cutmix", "feature_perturbation", "strong_views"):
        if getattr(semi, key):
            raise ConfigError(
                f"Config key 'semi.{key}' applies to the weak-to-strong methods ({', '.join(WEAK_TO_STRONG)}), "
                f"not to '{method.name}'."
            )


def _check_teacher(method: Method, semi: SemiConfig) -> None:
    """A frozen teacher replaces the EMA teacher and needs a method that learns from unlabeled images."""
    if not semi.teacher_checkpoint:
        return
    if not method.semi:
        raise ConfigError(
            f"Config key 'semi.teacher_checkpoint' labels unlabeled images: method '{method.name}' uses none."
        )
    if semi.ema:
        raise ConfigError(
            "Config keys 'semi.teacher_checkpoint' and 'semi.ema' both choose the teacher: set semi.ema=false to "
            "learn from the frozen checkpoint."
        )


def _check_hf_pretrained(model: ModelConfig) -> None:
    """For ``hf:DIR`` encoders ``model.pretrained`` is empty or ``DIR`` (weights and config come from one folder)."""
    if not model.encoder.startswith(HF_ENCODER_PREFIX) or not model.pretrained:
        return
    folder = model.encoder[len(HF_ENCODER_PREFIX) :]
    if Path(model.pretrained).expanduser().resolve() != Path(folder).expanduser().resolve():
        raise ConfigError(
            f"Config key 'model.pretrained' is '{model.pretrained}' but the encoder is hf:{folder}: leave it empty for "
            f"random weights or set it to '{folder}' to load the weights saved there."
        )


def _resolve_installed(model: ModelConfig) -> str:
    """``model.pretrained``, with ``installed`` replaced by the absolute path of the encoder's installed weights."""
    if model.pretrained != INSTALLED:
        return model.pretrained
    return installed_weights_path(model.encoder)


def _check_encoder(model: ModelConfig) -> None:
    """``model.encoder`` is a known name or ``hf:DIR``; MiT architecture keys are not set for the CNN encoders."""
    if not (model.encoder in ENCODER_NAMES or model.encoder.startswith(HF_ENCODER_PREFIX)):
        raise ConfigError(
            f"Config key 'model.encoder' is '{model.encoder}': choose one of {', '.join(ENCODER_NAMES)} or "
            f"{HF_ENCODER_PREFIX}DIR."
        )
    if model.encoder in CNN_ENCODERS:
        mit_keys = [f"model.{k}" for k in ("embed_dims", "depths", "num_heads") if getattr(model, k) is not None]
        if mit_keys:
            raise ConfigError(
                f"Config key(s) {', '.join(mit_keys)} describe a MiT and do not apply to model.encoder="
                f"{model.encoder}, whose architecture is fixed: remove them."
            )
