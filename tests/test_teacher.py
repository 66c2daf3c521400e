"""``semi.teacher_checkpoint``: a trained run's model, frozen, labels the unlabeled images."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import torch

from allspark_seg.dist import DistEnv
from allspark_seg.engine.checkpoint import load_checkpoint
from allspark_seg.engine.inference import load_trained_model
from allspark_seg.engine.train import Trainer, fit
from allspark_seg.errors import CheckpointError, ConfigError
from train_utils import tiny_config


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
    it_l, it_u = trainer._epoch_iterators(0, 0)
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
