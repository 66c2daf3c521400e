"""The methods, each one object: what it sets in a run config and the training step it runs.

A :class:`Method` fixes whether the model has the AllSpark block, the augmentation pipeline, the channel grouping's
guide maps and the values the ``semi.*`` keys left null take (:class:`SemiDefaults`; a key set in the config wins).
:func:`allspark_seg.config.resolve_config` applies them; the training loop runs ``RECIPES[cfg.method]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError
from .steps import Step, self_training_step, supervised_step, weak_to_strong_step

__all__ = ["METHODS", "RECIPES", "WEAK_TO_STRONG", "Method", "SemiDefaults", "get_method"]


@dataclass(frozen=True)
class SemiDefaults:
    """The values a method gives the ``semi.*`` keys a config leaves null (the defaults: every aid off, official).

    A method without unlabeled images (``supervised``) sets them whatever the config says. The attributes are the
    keys of :class:`~allspark_seg.config.SemiConfig` of the same names.
    """

    ema: bool = False
    conf_thresh: float = 0.0
    ignore_padding: bool = False
    per_image_teacher: bool = False
    cutmix: bool = False
    feature_perturbation: bool = False
    strong_views: int = 0
    class_thresh: bool = False
    unsup_start: int = 0
    unsup_rampup: int = 0


@dataclass(frozen=True)
class Method:
    """A training method (``method: NAME`` in a config).

    Attributes:
        name: The config value.
        step: The training step (:mod:`allspark_seg.methods.steps`).
        uses_allspark: The default of ``model.allspark.enabled``.
        pipeline: The default of ``data.pipeline`` (``allspark`` or ``unimatch``).
        grouping: The default of ``model.allspark.grouping`` (the guide maps: teacher ``logits`` or ``probs``).
        defaults: The values of the null ``semi.*`` keys.
    """

    name: str
    step: Step
    uses_allspark: bool
    pipeline: str
    grouping: str = "logits"
    defaults: SemiDefaults = field(default_factory=SemiDefaults)

    @property
    def semi(self) -> bool:
        """Learns from unlabeled images (every method but ``supervised``)."""
        return self.step is not supervised_step

    @property
    def weak_to_strong(self) -> bool:
        """The student learns from strong views of the unlabeled images (:func:`~.steps.weak_to_strong_step`)."""
        return self.step is weak_to_strong_step

    def preset(self) -> dict[str, Any]:
        """The flat preset dict of ``allspark_seg.config.METHODS``: ``allspark``, ``semi``, ``pipeline``, the
        ``grouping`` of the methods with the block and the ``semi.*`` defaults of the semi-supervised ones."""
        preset: dict[str, Any] = {"allspark": self.uses_allspark, "semi": self.semi, "pipeline": self.pipeline}
        if self.uses_allspark:
            preset["grouping"] = self.grouping
        return (preset | asdict(self.defaults)) if self.semi else preset


#: UniMatch's pseudo-labelling: confident pixels only, padding ignored, per-image teacher, CutMixed strong views.
_UNIMATCH_LABELS = {"conf_thresh": 0.95, "ignore_padding": True, "per_image_teacher": True, "cutmix": True}

#: Every method by name, in the order ``--help`` texts and error messages list them.
METHODS: Mapping[str, Method] = MappingProxyType(
    {
        method.name: method
        for method in (
            Method("supervised", supervised_step, uses_allspark=False, pipeline="allspark"),
            Method("selftrain", self_training_step, uses_allspark=False, pipeline="allspark"),
            Method("allspark", self_training_step, uses_allspark=True, pipeline="allspark", grouping="logits"),
            Method(
                "fixmatch",
                weak_to_strong_step,
                uses_allspark=False,
                pipeline="unimatch",
                defaults=SemiDefaults(**_UNIMATCH_LABELS, strong_views=1),
            ),
            Method(
                "unimatch",
                weak_to_strong_step,
                uses_allspark=False,
                pipeline="unimatch",
                defaults=SemiDefaults(**_UNIMATCH_LABELS, feature_perturbation=True, strong_views=2),
            ),
            Method(
                "allspark+",
                weak_to_strong_step,
                uses_allspark=True,
                pipeline="unimatch",
                grouping="probs",
                # class_thresh: measured in docs/results.md (label-efficiency benchmark)
                defaults=SemiDefaults(**_UNIMATCH_LABELS, ema=True, strong_views=2, class_thresh=True),
            ),
        )
    }
)

#: Methods whose student learns from strong views of the unlabeled images (``steps.weak_to_strong_step``).
WEAK_TO_STRONG: tuple[str, ...] = tuple(name for name, method in METHODS.items() if method.weak_to_strong)

#: The step of each method: the training loop runs ``RECIPES[cfg.method]``. A plain dict, so that tests can put a
#: wrapped step in its place (``monkeypatch.setitem``).
RECIPES: dict[str, Step] = {name: method.step for name, method in METHODS.items()}


def get_method(name: str) -> Method:
    """The method called ``name``.

    Raises:
        ConfigError: No method has that name.
    """
    if name not in METHODS:
        raise ConfigError(f"Unknown method '{name}': choose one of {', '.join(METHODS)}.")
    return METHODS[name]
