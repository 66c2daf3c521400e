"""Run configuration: frozen dataclasses, YAML files, ``--set key=value`` overrides and validation.

A config file is YAML with the sections below; every key is optional except where a method or a data format
needs it. Values left ``null`` are derived: from the ``method`` (its ``semi.*`` defaults, :mod:`allspark_seg.methods`),
the data format (``data.num_classes``, ``eval.mode``) or other keys (``eval.window`` from ``data.crop_size``). The
resolved config, with every value concrete, is what a run writes to its output folder and stores in its checkpoints.

Errors are :class:`ConfigError` with one sentence naming the key: unknown keys (with the closest valid name),
wrong types, missing values and impossible combinations.

The package: :mod:`.schema` (the dataclasses; every key is documented there, with its choices or range),
:mod:`.loading` (YAML, dicts, overrides, writing) and :mod:`.resolve` (derived values and the checks).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..data.formats import FORMAT_CLASSES, FORMAT_NAMES
from ..methods import METHODS as _METHOD_REGISTRY
from ..methods import WEAK_TO_STRONG
from ..models.factory import model_kwargs  # moved to the model factory; importable from here as before
from .loading import apply_overrides, config_from_dict, dump_config, load_config
from .resolve import crop_hw, resolve_config
from .schema import (
    AUTO,
    INSTALLED,
    AllSparkConfig,
    DataConfig,
    EvalConfig,
    GuardConfig,
    ModelConfig,
    RunConfig,
    SemiConfig,
    SyntheticConfig,
    TrainConfig,
)

__all__ = [
    "AUTO",
    "FORMATS",
    "FORMAT_CLASSES",
    "INSTALLED",
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
    "crop_hw",
    "dump_config",
    "load_config",
    "model_kwargs",
    "resolve_config",
]

#: ``data.format`` values.
FORMATS: tuple[str, ...] = FORMAT_NAMES

#: Each method's preset as a flat read-only dict (:meth:`allspark_seg.methods.Method.preset`): ``allspark``,
#: ``semi``, ``pipeline``, ``grouping`` and the ``semi.*`` defaults. The methods themselves are in
#: :mod:`allspark_seg.methods`.
METHODS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {name: MappingProxyType(method.preset()) for name, method in _METHOD_REGISTRY.items()}
)
