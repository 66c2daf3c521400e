"""``semi.teacher_checkpoint``: a trained run's model, frozen, labels the unlabeled images."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import re
import shutil

import pytest
import torch

from allspark_seg.dist import DistEnv
from allspark_seg.engine.checkpoint import load_checkpoint
from allspark_seg.engine.inference import load_trained_model
from allspark_seg.engine.logger import MetricLogger
from allspark_seg.engine.train import Trainer, fit
from allspark_seg.errors import CheckpointError, ConfigError
from train_utils import epoch_iterators, tiny_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory, data_root):
    """``last.pt`` of a two-iteration labels-only run."""
    out = tmp_path_factory.mktemp("teacher")
    fit(tiny_config(data_root, method="supervised", iterations=2, eval_every=2), out)
    return out / "last.pt"


def test_the_teacher_is_the_checkpoints_model_frozen(tmp_path, data_root, teacher_path):
    cfg = tiny_config(data_root, method="fixmatch", overrides=(f"semi.teacher_checkpoint={teacher_path}",))
    assert cfg.semi.ema is False
    trainer = Trainer(cfg, tmp_path / "student", DistEnv(), None)
    teacher = trainer.ctx.teacher
    assert teacher is not None and teacher is not trainer.model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    reference = load_trained_model(teacher_path).model
    it_l, it_u = epoch_iterators(trainer, 0, 0)
    batch_l, batch_u = next(it_l), next(it_u)
    for _ in range(3):
        out = trainer.train_step(itertools.repeat(batch_l), itertools.repeat(batch_u))
    with torch.no_grad():
        confidence, labels = reference(batch_u["image"]).softmax(dim=1).max(dim=1)
    assert torch.equal(out.confidence, confidence)  # the same weights after three student steps
    kept = out.pseudo != 255
    assert torch.equal(kept, confidence >= cfg.semi.conf_thresh) and torch.equal(out.pseudo[kept], labels[kept])
    saved = load_checkpoint(teacher_path)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())
    student = trainer.model.state_dict()
    assert any(not torch.equal(student[k], saved[k]) for k in saved if saved[k].is_floating_point())


def test_a_changed_teacher_file_is_refused_on_resume(tmp_path, data_root, teacher_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(teacher_path.read_bytes())
    cfg = tiny_config(data_root, method="fixmatch", overrides=(f"semi.teacher_checkpoint={teacher}",), iterations=2)
    fit(cfg, tmp_path / "student")
    written = load_checkpoint(tmp_path / "student" / "last.pt")["teacher_sha256"]
    assert written == hashlib.sha256(teacher.read_bytes()).hexdigest()
    fit(cfg, tmp_path / "student")  # the same file: resumes (nothing left to do)
    saved = load_checkpoint(teacher)
    saved["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in saved["model"].items()}
    torch.save(saved, teacher)
    with pytest.raises(CheckpointError, match="another semi.teacher_checkpoint file"):
        fit(cfg, tmp_path / "student")


def test_bad_teacher_settings_are_one_sentence(tmp_path, data_root, teacher_path):
    with pytest.raises(ConfigError, match="'semi.teacher_checkpoint' labels unlabeled images: method 'supervised'"):
        tiny_config(data_root, method="supervised", overrides=(f"semi.teacher_checkpoint={teacher_path}",))
    with pytest.raises(ConfigError, match="both choose the teacher"):
        tiny_config(
            data_root, method="fixmatch", overrides=(f"semi.teacher_checkpoint={teacher_path}", "semi.ema=true")
        )
    assert tiny_config(data_root, method="allspark+", overrides=("semi.teacher_checkpoint=t.pt",)).semi.ema is False
    missing = tmp_path / "missing.pt"
    cfg = tiny_config(data_root, method="fixmatch", overrides=(f"semi.teacher_checkpoint={missing}",))
    with pytest.raises(ConfigError, match=f"'semi.teacher_checkpoint': Checkpoint '{missing}' does not exist"):
        Trainer(cfg, tmp_path / "a", DistEnv(), None)
    three = tmp_path / "three"
    fit(
        tiny_config(
            str(tmp_path / "data3"),
            method="supervised",
            overrides=("data.synthetic.num_classes=3",),
            iterations=1,
            eval_every=1,
        ),
        three,
    )
    cfg = tiny_config(data_root, method="fixmatch", overrides=(f"semi.teacher_checkpoint={three / 'last.pt'}",))
    with pytest.raises(ConfigError, match="predicts 3 classes, this run has 6"):
        Trainer(cfg, tmp_path / "b", DistEnv(), None)
    assert not (tmp_path / "a" / "last.pt").exists() and not (tmp_path / "b" / "last.pt").exists()


# ------------------------------------------------------------------ the teacher's classes and whether its run finished
class Interrupted(Exception):
    """Raised by the test to stop a run, as a kill would."""


@pytest.fixture(scope="module")
def scored_runs(tmp_path_factory, data_root):
    """Two 3-iteration labels-only runs validated at every iteration with scripted mIoUs (best at iteration 1):
    ``finished`` ran to the end; ``interrupted`` was killed after iteration 2 (``last.pt`` at 2, ``best.pt`` at 1)."""
    scripted = {1: 0.5, 2: 0.2, 3: 0.3}
    original = Trainer.validate
    write = MetricLogger.write

    def interrupt_after_iteration_2(self, record):
        write(self, record)
        if record["type"] == "train" and record["step"] == 3:  # logged after last.pt at 2, before validating 3
            raise Interrupted

    root = tmp_path_factory.mktemp("scored")
    cfg = tiny_config(data_root, method="supervised", iterations=3, eval_every=1, checkpoint_every=1)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "validate", lambda self: dataclasses.replace(original(self), miou=scripted[self.step]))
        fit(cfg, root / "finished")
        m.setattr(MetricLogger, "write", interrupt_after_iteration_2)
        with pytest.raises(Interrupted):
            fit(cfg, root / "interrupted")
    return root


def test_a_teacher_with_the_classes_in_another_order_is_refused(tmp_path, data_root, teacher_path):
    saved = load_checkpoint(teacher_path)
    names = list(saved["class_names"])
    saved["class_names"] = names[::-1]  # the same classes, another order: the ids of its predictions would not match
    permuted = tmp_path / "permuted" / "last.pt"
    permuted.parent.mkdir()
    torch.save(saved, permuted)
    cfg = tiny_config(data_root, method="fixmatch", overrides=(f"semi.teacher_checkpoint={permuted}",))
    expected = f"was trained on the classes {names[::-1]}, this run has {names} (in another order)"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        Trainer(cfg, tmp_path / "student", DistEnv(), None)


def test_the_best_checkpoint_of_a_finished_run_teaches_and_the_log_names_it(tmp_path, data_root, scored_runs, caplog):
    best = scored_runs / "finished" / "best.pt"
    saved = load_checkpoint(best)
    assert (saved["step"], saved["total"], saved["miou"]) == (1, 3, 0.5)  # written before the end of its run
    assert load_checkpoint(scored_runs / "finished" / "last.pt")["miou"] == 0.3
    caplog.set_level(logging.INFO, logger="allspark_seg")
    cfg = tiny_config(data_root, method="fixmatch", overrides=(f"semi.teacher_checkpoint={best}",))
    Trainer(cfg, tmp_path / "student", DistEnv(), None)
    assert f"teacher: {best}, frozen: iteration 1 of 3, validation mIoU 50.00" in caplog.text
    last = scored_runs / "finished" / "last.pt"
    cfg = tiny_config(data_root, method="fixmatch", overrides=(f"semi.teacher_checkpoint={last}",))
    Trainer(cfg, tmp_path / "student2", DistEnv(), None)
    assert f"teacher: {last}, frozen: iteration 3 of 3, validation mIoU 30.00" in caplog.text


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("last.pt", "is at iteration 2 of its 3-iteration run, which had not finished"),
        ("best.pt", "is at iteration 1 of 3 and its run had not finished (last.pt at iteration 2)"),
    ],
)
def test_a_teacher_from_a_run_that_had_not_finished_is_refused(tmp_path, data_root, scored_runs, name, why):
    path = scored_runs / "interrupted" / name
    cfg = tiny_config(data_root, method="fixmatch", overrides=(f"semi.teacher_checkpoint={path}",))
    with pytest.raises(ConfigError, match=re.escape(f"'{path}' {why}; use the best.pt or last.pt of a finished run.")):
        Trainer(cfg, tmp_path / "student", DistEnv(), None)


def test_a_best_checkpoint_is_refused_next_to_another_runs_last(tmp_path, data_root, scored_runs, teacher_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(scored_runs / "finished" / "best.pt", folder / "best.pt")
    shutil.copy(teacher_path, folder / "last.pt")  # a finished run, but not the one best.pt comes from
    cfg = tiny_config(data_root, method="fixmatch", overrides=(f"semi.teacher_checkpoint={folder / 'best.pt'}",))
    with pytest.raises(ConfigError, match="is not the best checkpoint of the finished run in its folder"):
        Trainer(cfg, tmp_path / "student", DistEnv(), None)
