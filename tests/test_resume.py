"""Resuming: checkpoints read on the CPU whatever the device, old checkpoints, refused data changes, metrics.jsonl
and the guard's warnings after a resume, and exact resumes of the recipes beyond the default one."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from allspark_seg.dist import DistEnv
from allspark_seg.engine import logger as logger_module
from allspark_seg.engine import train as train_module
from allspark_seg.engine.guard import CollapseGuard
from allspark_seg.engine.logger import MetricLogger
from allspark_seg.engine.state import _check_resumable, atomic_save, capture_rng, load_checkpoint, restore_rng
from allspark_seg.engine.train import Trainer, fit
from allspark_seg.errors import CheckpointError
from allspark_seg.utils import atomic as atomic_module
from train_utils import tiny_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, data_root: str) -> Path:
    """A 2-iteration run (``last.pt`` and ``best.pt`` at iteration 2, ``metrics.jsonl``)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    fit(tiny_config(data_root, iterations=2), out)
    return out


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory: pytest.TempPathFactory, data_root: str) -> Path:
    """``last.pt`` of a two-iteration labels-only run."""
    out = tmp_path_factory.mktemp("teacher")
    fit(tiny_config(data_root, method="supervised", iterations=2, eval_every=2), out)
    return out / "last.pt"


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run folder's checkpoints and ``metrics.jsonl``."""
    dst.mkdir(parents=True)
    for name in ("last.pt", "best.pt", "metrics.jsonl"):
        shutil.copy(src / name, dst / name)
    return dst


# The meta device stands in for a GPU: loading weights onto its parameters copies nothing (torch warns so).
on_meta = pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter:UserWarning")


def read_records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- checkpoints read on the CPU


@on_meta
def test_resume_on_a_non_cpu_device_reads_the_checkpoint_on_the_cpu(
    tmp_path: Path, data_root: str, finished_run: Path
) -> None:
    # The meta device stands in for a GPU: tensors loaded onto it are not CPU ByteTensors, which is all that
    # torch.set_rng_state takes (loading onto the run's device crashed every resume on a GPU).
    out = copy_run(finished_run, tmp_path / "run")
    trainer = Trainer(tiny_config(data_root, iterations=4), out, DistEnv(device=torch.device("meta")), None)
    assert trainer.step == 2
    assert next(trainer.model.parameters()).device.type == "meta"  # load_state_dict copied onto the run's device
    assert torch.equal(torch.get_rng_state(), load_checkpoint(out / "last.pt")["rng"]["torch"])


@on_meta
def test_rollback_reads_best_pt_on_the_cpu(
    tmp_path: Path, data_root: str, finished_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = copy_run(finished_run, tmp_path / "run")
    trainer = Trainer(tiny_config(data_root, iterations=4), out, DistEnv(device=torch.device("meta")), None)
    devices: set[str] = set()
    original = train_module.load_checkpoint

    def spy(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
        saved = original(path, map_location=map_location)
        devices.update(v.device.type for v in saved["model"].values())
        return saved

    monkeypatch.setattr(train_module, "load_checkpoint", spy)
    monkeypatch.setattr(trainer, "save", lambda name: None)
    trainer.rollback(out / "best.pt")
    assert devices == {"cpu"} and trainer.guard.rollbacks == 1


def test_restore_rng_takes_cpu_states_and_refuses_states_without_data() -> None:
    state = capture_rng()
    expected = torch.rand(4)
    restore_rng(state)
    assert torch.equal(torch.rand(4), expected)
    meta = {"torch": state["torch"].to("meta")}  # what map_location="meta" gives: a tensor without values
    with pytest.raises(CheckpointError, match="random state has no values"):
        restore_rng(meta)


# ------------------------------------------------------------------------------------- what a resume compares


def test_a_key_missing_from_an_old_checkpoint_means_its_default_then(
    tmp_path: Path, data_root: str, finished_run: Path
) -> None:
    saved = load_checkpoint(finished_run / "last.pt")
    del saved["config"]["semi"]["area_cap"]  # written before semi.area_cap existed (default 0.0)
    del saved["config"]["semi"]["class_thresh"]  # null in the schema: the method's default then (false)
    del saved["config"]["data"]["pipeline"]  # null in the schema: the method's pipeline
    atomic_save(saved, tmp_path / "run" / "last.pt")
    with pytest.raises(CheckpointError, match=re.escape("semi.area_cap=0.0 but this run has semi.area_cap=0.5")):
        fit(tiny_config(data_root, overrides=("semi.area_cap=0.5",), iterations=3), tmp_path / "run")
    assert fit(tiny_config(data_root, iterations=3), tmp_path / "run").step == 3


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory: pytest.TempPathFactory, data_root: str) -> Any:
    """The resolved config of a run like :func:`finished_run`'s (a fresh folder: nothing is resumed)."""
    trainer = Trainer(tiny_config(data_root, iterations=2), tmp_path_factory.mktemp("fresh"), DistEnv(), None)
    return trainer.cfg, trainer.bundle.class_names


@pytest.mark.parametrize(
    ("fmt", "change", "message"),
    [
        ("folder", {"root": "/elsewhere"}, 'data.root="{root}" but this run has data.root="/elsewhere"'),
        ("folder", {"labeled_split": "l.txt"}, 'data.labeled_split="" but this run has data.labeled_split="l.txt"'),
        ("folder", {"unlabeled_split": "u.txt"}, 'data.unlabeled_split="" but this run has data.unlabeled_split='),
        ("synthetic", {"crop_size": 64}, "data.crop_size=48 but this run has data.crop_size=64"),
        ("synthetic", {"format": "folder"}, 'data.format="synthetic" but this run has data.format="folder"'),
        ("synthetic", {"synthetic": {"seed": 3}}, "data.synthetic.seed=0 but this run has data.synthetic.seed=3"),
    ],
)
def test_resuming_with_other_data_is_refused(
    finished_run: Path, run_cfg: Any, fmt: str, change: dict[str, Any], message: str
) -> None:
    cfg, class_names = run_cfg
    saved = load_checkpoint(finished_run / "last.pt")
    saved["config"]["data"]["format"] = fmt
    base = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format=fmt))
    _check_resumable(saved, base, finished_run / "last.pt", 1, None, class_names)  # the same data: resumes
    if "synthetic" in change:
        change = {"synthetic": dataclasses.replace(cfg.data.synthetic, **change["synthetic"])}
    other = dataclasses.replace(base, data=dataclasses.replace(base.data, **change))
    expected = message.format(root=cfg.data.root)
    with pytest.raises(CheckpointError, match=re.escape(expected) + ".*the resumed run would see other samples"):
        _check_resumable(saved, other, finished_run / "last.pt", 1, None, class_names)


def test_a_synthetic_dataset_elsewhere_with_the_same_settings_resumes(finished_run: Path, run_cfg: Any) -> None:
    cfg, class_names = run_cfg  # the generator's settings, not the folder it writes to, decide the samples
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root="/elsewhere"))
    _check_resumable(load_checkpoint(finished_run / "last.pt"), other, finished_run / "last.pt", 1, None, class_names)


def test_resuming_with_other_class_names_is_refused(tmp_path: Path, data_root: str, finished_run: Path) -> None:
    saved = load_checkpoint(finished_run / "last.pt")
    saved["class_names"][1] = "ball"
    atomic_save(saved, tmp_path / "run" / "last.pt")
    with pytest.raises(CheckpointError, match="classes .*'ball'.* but the data has .*'disc'"):
        fit(tiny_config(data_root, iterations=3), tmp_path / "run")


# ------------------------------------------------------------------------- metrics.jsonl and guard warnings


def test_drop_records_after_keeps_the_earlier_lines_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.jsonl"
    kept = [{"type": "train", "step": 1, "loss": 1.5}, {"type": "train", "step": 2}, {"type": "eval", "step": 2}]
    later = [{"type": "train", "step": 3}, {"type": "guard", "step": 4, "kind": "miou", "action": "warn"}]
    head = "".join(json.dumps(r) + "\n" for r in kept)
    path.write_text(head + "".join(json.dumps(r) + "\n" for r in later) + '{"type": "train", "st')  # torn line
    failing = tmp_path / "failing.jsonl"
    failing.write_text(path.read_text())

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(atomic_module.os, "replace", crash)
        with pytest.raises(OSError):
            logger_module.drop_records_after(failing, 2)
    assert failing.read_text() == path.read_text()  # a failed rewrite leaves the file as it was
    assert logger_module.drop_records_after(path, 2) == 3
    assert path.read_text() == head
    assert logger_module.drop_records_after(path, 2) == 0 and path.read_text() == head
    assert logger_module.drop_records_after(tmp_path / "missing.jsonl", 2) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failing.jsonl", "metrics.jsonl"]  # no temporary file left


def test_resume_drops_the_records_logged_after_the_checkpoint(
    tmp_path: Path, data_root: str, finished_run: Path
) -> None:
    out = copy_run(finished_run, tmp_path / "run")
    with (out / "metrics.jsonl").open("a") as handle:  # logged by the run after its last checkpoint, then killed
        handle.write(json.dumps({"type": "train", "step": 3, "loss": 9.0}) + "\n")
        handle.write(json.dumps({"type": "eval", "step": 4, "miou": 0.9}) + "\n")
    before = read_records(finished_run)
    fit(tiny_config(data_root, iterations=3), out)
    after = read_records(out)
    assert after[: len(before)] == before
    assert [(r["type"], r["step"]) for r in after[len(before) :] if r["type"] != "guard"] == [("train", 3), ("eval", 3)]
    assert {"type": "train", "step": 3, "loss": 9.0} not in after


def test_guard_state_keeps_its_warnings_and_old_states_have_none() -> None:
    guard = CollapseGuard(warnings=[("miou", 4), ("classes", 6)])
    restored = CollapseGuard()
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))  # primitives only
    assert restored == guard
    old = {"lr_scale": 0.5, "rollbacks": 1, "strikes": {"miou": 0}}
    restored.load_state_dict(old)
    assert restored.warnings == [] and restored.rollbacks == 1


def test_warnings_given_before_a_resume_are_counted_at_the_end(
    tmp_path: Path, data_root: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    scripted = {1: 0.5, 2: 0.3, 3: 0.3}  # 20 points below the best at iteration 2: one warning, still firing at 3
    original = Trainer.validate

    def validate(self: Trainer) -> Any:
        return dataclasses.replace(original(self), miou=scripted[self.step])

    monkeypatch.setattr(Trainer, "validate", validate)
    quiet = ("guard.min_class_share=0", "guard.dominant_share=0")
    fit(tiny_config(data_root, overrides=quiet, iterations=2, eval_every=1), tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "last.pt")["guard"]["warnings"] == [["miou", 2]]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="allspark_seg"):
        fit(tiny_config(data_root, overrides=quiet, iterations=3, eval_every=1), tmp_path / "run")
    summary = [r.getMessage() for r in caplog.records if "warning(s) during training" in r.getMessage()]
    assert len(summary) == 1 and "1 warning(s) during training (miou at iteration 2;" in summary[0]


# --------------------------------------------------------------------------- exact resume, beyond the default


class Interrupted(Exception):
    """Raised by the test to stop a run, as a kill would, after it logged iteration 3 (checkpoint at 2)."""


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal nested checkpoints: tensors bit for bit, everything else with ``==``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


RECIPES = {
    "ema": ("allspark", ("semi.ema=true",)),
    "teacher": ("fixmatch", ("semi.teacher_checkpoint={teacher}",)),
    "fp16": ("allspark", ("train.precision=fp16",)),
    "guard-rollback": ("allspark", ("guard.action=rollback", "guard.min_class_share=0", "guard.dominant_share=0")),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_an_interrupted_run_resumes_exactly(
    tmp_path: Path, data_root: str, teacher_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: str
) -> None:
    method, overrides = RECIPES[recipe]
    overrides = tuple(o.format(teacher=teacher_path) for o in overrides)
    cfg = tiny_config(data_root, method=method, overrides=overrides, iterations=4, checkpoint_every=2, eval_every=1)
    if recipe == "guard-rollback":  # the mIoU falls at iteration 2: the guard rolls back to iteration 1
        scripted = {1: 0.5, 2: 0.2, 3: 0.45, 4: 0.5}
        original = Trainer.validate
        monkeypatch.setattr(
            Trainer, "validate", lambda self: dataclasses.replace(original(self), miou=scripted[self.step])
        )
    fit(cfg, tmp_path / "straight")
    write = MetricLogger.write

    def interrupt_after_iteration_3(self: MetricLogger, record: dict[str, Any]) -> None:
        write(self, record)
        if record["type"] == "train" and record["step"] == 3:
            raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(MetricLogger, "write", interrupt_after_iteration_3)
        with pytest.raises(Interrupted):
            fit(cfg, tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 2
    fit(cfg, tmp_path / "resumed")
    straight, resumed = (load_checkpoint(tmp_path / name / "last.pt") for name in ("straight", "resumed"))
    assert_same(straight, resumed)
    assert (straight["ema"] is not None) == (recipe == "ema")
    assert (straight["scaler"] is not None) == (recipe == "fp16")
    assert (straight["teacher_sha256"] is not None) == (recipe == "teacher")
    assert straight["guard"]["rollbacks"] == (recipe == "guard-rollback")
    assert_same(*(load_checkpoint(tmp_path / name / "best.pt") for name in ("straight", "resumed")))

    def logged(name: str) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in read_records(tmp_path / name)]

    assert logged("resumed") == logged("straight")  # iteration 3 logged once
