"""The config schema drives validation (choices and ranges carried by the fields); the methods registry fills the
null ``semi.*`` keys; the lower layers (models, data) never import the config or the methods."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from allspark_seg import config, methods
from allspark_seg.config.schema import CHOICES, RANGE, Range, RunConfig, SemiConfig, leaf_fields
from allspark_seg.engine import recipes
from allspark_seg.errors import ConfigError

BASE = {"train": {"iterations": 10}}

CHOICE_KEYS = {
    "model.allspark.memory_init",
    "model.allspark.grouping",
    "model.allspark.grouping_resize",
    "model.allspark.memory_sync",
    "data.format",
    "data.synthetic.kind",
    "data.pipeline",
    "train.optimizer",
    "train.loss",
    "train.precision",
    "train.device",
    "eval.mode",
    "guard.action",
    "semi.ema_buffers",
}
RANGED_KEYS = {
    "model.head_dim",
    "model.head_dropout",
    "model.drop_path",
    "model.embed_dims",
    "model.depths",
    "model.num_heads",
    "model.allspark.num_heads",
    "model.allspark.memory_length",
    "model.allspark.attn_dropout",
    "data.num_workers",
    "train.iterations",
    "train.epochs",
    "train.batch_size",
    "train.unlabeled_batch_size",
    "train.lr",
    "train.momentum",
    "train.weight_decay",
    "train.grad_accum",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "semi.ema_decay",
    "semi.conf_thresh",
    "semi.unsup_weight",
    "semi.area_cap",
    "semi.unsup_start",
    "semi.unsup_rampup",
    "semi.warmup_iterations",
    "semi.warmup_epochs",
    "guard.miou_drop",
    "guard.min_class_share",
    "guard.dominant_share",
    "guard.dominant_conf",
    "guard.patience",
    "guard.lr_factor",
    "guard.max_rollbacks",
}


def _fields_with(meta_key: str) -> dict[str, object]:
    return {key: f.metadata[meta_key] for key, f, _ in leaf_fields(RunConfig()) if meta_key in f.metadata}


def test_the_schema_carries_the_choices_and_ranges_of_every_checked_key():
    assert set(_fields_with(CHOICES)) == CHOICE_KEYS
    assert set(_fields_with(RANGE)) == RANGED_KEYS
    assert _fields_with(CHOICES)["data.format"] == ("voc", "cityscapes", "coco", "folder", "synthetic")


def test_the_method_is_checked_against_the_registry():
    message = f"Config key 'method' is 'bogus': choose one of {', '.join(methods.METHODS)}."
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load_config(BASE, ["method=bogus"])
    assert "method" not in _fields_with(CHOICES)  # the registry imports the schema, so the schema cannot name it


@pytest.mark.parametrize("key", sorted(CHOICE_KEYS))
def test_every_key_with_choices_refuses_another_value(key):
    choices = _fields_with(CHOICES)[key]
    message = f"Config key '{key}' is 'bogus': choose one of {', '.join(choices)}."
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load_config(BASE, [f"{key}=bogus"])


def _outside(valid: Range) -> list[float]:
    """Values just outside ``valid`` on each bounded side."""
    below = [valid.low] if valid.low_open else [valid.low - 1]
    above = [] if valid.high is None else [valid.high if valid.high_open else valid.high + 1]
    return below + above


@pytest.mark.parametrize("key", sorted(RANGED_KEYS))
def test_every_ranged_key_refuses_the_numbers_outside_its_range(key):
    valid = _fields_with(RANGE)[key]
    is_list = key in ("model.embed_dims", "model.depths", "model.num_heads")
    for bad in _outside(valid):
        value = f"[8, {bad}, 8, 8]" if is_list else str(bad)
        overrides = [f"{key}={value}"] + (["train.iterations=null"] if key == "train.epochs" else [])
        with pytest.raises(ConfigError, match=rf"Config key '{re.escape(key)}' must be {re.escape(str(valid))}, got"):
            config.load_config(BASE, overrides)


def test_range_bounds_and_their_wording():
    assert (
        str(Range(0, low_open=True)) == "positive"
        and 0 not in Range(0, low_open=True)
        and 1e-9 in Range(0, low_open=True)
    )
    assert str(Range(0)) == ">= 0" and 0 in Range(0) and -1e-9 not in Range(0)
    assert str(Range(0, 1, high_open=True)) == "in [0, 1)" and 1 not in Range(0, 1, high_open=True)
    assert str(Range(0, 1, low_open=True)) == "in (0, 1]" and 1 in Range(0, 1, low_open=True)
    assert float("nan") not in Range(0) and float("nan") not in Range(0, 1)


def test_words_and_nulls_skip_the_range_check():
    cfg = config.load_config(BASE, ["train.eval_every=epoch", "semi.conf_thresh=null"])
    assert cfg.train.eval_every == "epoch" and cfg.semi.conf_thresh == 0.0  # the allspark default


# ------------------------------------------------------------------------------------------------- methods
def test_the_method_defaults_fill_every_null_semi_key_but_the_warmup_and_the_teacher_file():
    nullable = {f.name for f in dataclasses.fields(SemiConfig) if f.default is None}
    assert {f.name for f in dataclasses.fields(methods.SemiDefaults)} == nullable - {
        "warmup_iterations",
        "warmup_epochs",
        "teacher_checkpoint",
    }


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_each_method_resolves_to_its_defaults_and_a_set_key_wins_unless_supervised(name):
    method = methods.get_method(name)
    cfg = config.load_config(BASE | {"method": name})
    assert dataclasses.asdict(method.defaults).items() <= dataclasses.asdict(cfg.semi).items()
    assert cfg.model.allspark.enabled is method.uses_allspark and cfg.data.pipeline == method.pipeline
    assert cfg.model.allspark.grouping == method.grouping and cfg.guard.enabled is method.semi
    assert config.METHODS[name]["semi"] is method.semi and recipes.RECIPES[name] is method.step
    overridden = config.load_config(BASE | {"method": name}, ["semi.unsup_rampup=7"])
    assert overridden.semi.unsup_rampup == (7 if method.semi else 0)


def test_the_registry_names_and_views():
    assert list(methods.METHODS) == ["supervised", "selftrain", "allspark", "fixmatch", "unimatch", "allspark+"]
    assert config.WEAK_TO_STRONG == methods.WEAK_TO_STRONG == ("fixmatch", "unimatch", "allspark+")
    assert recipes.RECIPES is methods.RECIPES  # the table the training loop reads (tests substitute steps in it)
    assert config.METHODS["supervised"] == {"allspark": False, "semi": False, "pipeline": "allspark"}
    assert config.METHODS["allspark"]["grouping"] == "logits" and config.METHODS["allspark+"]["grouping"] == "probs"
    with pytest.raises(ConfigError, match="Unknown method 'mean_teacher': choose one of supervised, selftrain"):
        methods.get_method("mean_teacher")


# -------------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("package", ["allspark_seg.models", "allspark_seg.data", "allspark_seg.methods"])
def test_lower_layers_do_not_import_the_config_or_the_engine(package):
    upper = ("allspark_seg.config", "allspark_seg.engine", "allspark_seg.interop", "allspark_seg.experiment")
    if package != "allspark_seg.methods":
        upper += ("allspark_seg.methods",)
    code = f"import sys, {package}; print(sorted(m for m in sys.modules if m.startswith({upper!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
