"""Collapse diagnostics (hand-computed) and the collapse guard on scripted collapses and on a normal run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from allspark_seg.engine import recipes
from allspark_seg.engine.checkpoint import load_checkpoint
from allspark_seg.engine.diagnostics import (
    collapsed_classes,
    dominant_class,
    labeled_class_share,
    loss_ratio,
    memory_diversity,
    miou_drop,
    pseudo_label_counts,
    pseudo_label_stats,
    stats_from_counts,
)
from allspark_seg.engine.train import Trainer, TrainingCollapsed, fit
from allspark_seg.errors import AllSparkError
from allspark_seg.models import SemanticMemory
from allspark_seg.optim import lr_for_step
from train_utils import tiny_config


# ------------------------------------------------------------------------------------------- diagnostics
def test_pseudo_label_statistics_by_hand():
    pseudo = torch.tensor([[[0, 0, 1], [255, 2, 2]]])  # (1, 2, 3): one ignored pixel
    conf = torch.tensor([[[0.9, 0.7, 0.6], [0.1, 0.8, 1.0]]])
    target = torch.tensor([[[0, 1, 1], [2, 2, 255]]])
    stats = pseudo_label_stats(pseudo, conf, num_classes=4, target=target)
    torch.testing.assert_close(stats["pseudo_share"], torch.tensor([2, 1, 2, 0]) / 5.0)
    torch.testing.assert_close(stats["pseudo_conf"][:3], torch.tensor([0.8, 0.6, 0.9]))
    assert math.isnan(stats["pseudo_conf"][3])
    assert stats["kept_fraction"].item() == pytest.approx(5 / 6)
    assert stats["pseudo_acc"].item() == pytest.approx(3 / 4)  # 4 kept pixels with ground truth, 3 right
    # Counts are additive: two batches summed give the statistics of both together.
    a = pseudo_label_counts(pseudo, conf, 4, target)
    b = pseudo_label_counts(torch.full((1, 2, 3), 3), torch.ones(1, 2, 3), 4, torch.full((1, 2, 3), 255))
    both = stats_from_counts({k: a[k] + b[k] for k in a})
    torch.testing.assert_close(both["pseudo_share"], torch.tensor([2, 1, 2, 6]) / 11.0)
    assert both["pseudo_acc"].item() == pytest.approx(3 / 4)
    # Nothing kept: zero shares, NaN accuracy (not a misleading 0).
    empty = pseudo_label_stats(torch.full((1, 2, 2), 255), torch.zeros(1, 2, 2), 3, torch.zeros(1, 2, 2).long())
    assert empty["pseudo_share"].tolist() == [0.0, 0.0, 0.0] and math.isnan(empty["pseudo_acc"])


def test_loss_ratio_memory_diversity_and_labeled_shares_by_hand():
    assert loss_ratio(torch.tensor(1.0), torch.tensor(4.0)).item() == 0.25
    assert math.isnan(loss_ratio(torch.tensor(1.0), torch.tensor(0.0)))
    memory = SemanticMemory(num_classes=3, length=3, grid=(1, 2), init="zeros")
    memory.enqueue(
        torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [5.0, 5.0]]),
        torch.tensor([0, 0, 1, 1, 2]),
    )
    diversity = memory_diversity(memory)
    assert diversity[0].item() == pytest.approx(1.0)  # two parallel slots: a collapsed class
    assert diversity[1].item() == pytest.approx(1 / math.sqrt(2))  # cos((0, 3), (1, 1))
    assert math.isnan(diversity[2])  # one written slot: no pair
    masks = [np.array([[0, 0], [1, 255]], np.uint8), np.array([[2, 2], [2, 0]], np.uint8)]
    torch.testing.assert_close(labeled_class_share(masks, 4), torch.tensor([3, 1, 3, 0]) / 7.0)


def test_collapse_checks_by_hand():
    assert miou_drop(best=0.60, current=0.45) == pytest.approx(15.0)
    assert miou_drop(best=0.60, current=0.70) == 0.0
    assert miou_drop(best=-1.0, current=0.1) == 0.0  # nothing to compare with yet
    labeled = torch.tensor([0.7, 0.2, 0.1, 0.0])
    pseudo = torch.tensor([0.93, 0.06, 0.01, 0.0])
    assert collapsed_classes(pseudo, labeled, 0.5) == [1, 2]  # 0.06 < 0.5 * 0.2, 0.01 < 0.5 * 0.1
    assert collapsed_classes(pseudo, labeled, 0.25) == [2]  # 0.06 >= 0.05; class 3 is not labeled
    assert collapsed_classes(pseudo, labeled, 0.0) == []


# ------------------------------------------------------------------------------------------- the guard
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def scripted_miou(monkeypatch, values: list[float]) -> None:
    """Make every validation return the real metrics with the next scripted mIoU."""
    original = Trainer.validate
    queue = list(values)

    def validate(self):
        return dataclasses.replace(original(self), miou=queue.pop(0) if queue else values[-1])

    monkeypatch.setattr(Trainer, "validate", validate)


# The stop/rollback tests watch one signal each: the other checks are switched off explicitly (the defaults warn).
GUARD = (
    "guard.enabled=true",
    "guard.miou_drop=10",
    "guard.action=stop",
    "guard.min_class_share=0",
    "guard.dominant_share=0",
)


def test_guard_stops_on_a_scripted_miou_collapse(tmp_path, data_root, monkeypatch):
    scripted_miou(monkeypatch, [0.40, 0.50, 0.38, 0.45])
    out = tmp_path / "run"
    cfg = tiny_config(data_root, overrides=GUARD, iterations=8, eval_every=2, log_every=2)
    with pytest.raises(TrainingCollapsed, match=r"mIoU 38.00 at iteration 6 is 12.00 points below the best 50.00 "):
        fit(cfg, out)
    assert issubclass(TrainingCollapsed, AllSparkError)
    assert load_checkpoint(out / "best.pt")["step"] == 4
    (event,) = records(out, "guard")
    assert (event["step"], event["kind"], event["action"]) == (6, "miou", "stop")
    results = json.loads((out / "results.json").read_text())
    assert "guard.action=stop" in results["stopped"] and results["best_step"] == 4


def test_guard_patience_needs_consecutive_firing_checks(tmp_path, data_root, monkeypatch):
    scripted_miou(monkeypatch, [0.50, 0.30, 0.45, 0.30])  # drops at 4 and 8, never twice in a row
    cfg = tiny_config(data_root, overrides=(*GUARD, "guard.patience=2"), iterations=8, eval_every=2, log_every=2)
    result = fit(cfg, tmp_path / "run")
    assert result.step == 8 and records(tmp_path / "run", "guard") == []


def test_guard_rolls_back_to_the_best_checkpoint(tmp_path, data_root, monkeypatch):
    scripted_miou(monkeypatch, [0.50, 0.20, 0.50, 0.52])  # collapse at 4: back to the weights of iteration 2
    restored = {}
    original = Trainer.rollback

    def spy(self, path):
        original(self, path)
        best = load_checkpoint(path)
        restored["model"] = all(torch.equal(v, best["model"][k]) for k, v in self.model.state_dict().items())
        restored["memory"] = torch.equal(self.model.allspark.memory.bank, best["model"]["allspark.attn.memory.bank"])
        restored["step"] = self.step

    monkeypatch.setattr(Trainer, "rollback", spy)
    out = tmp_path / "run"
    cfg = tiny_config(
        data_root, overrides=(*GUARD, "guard.action=rollback", "guard.lr_factor=0.25"), iterations=8, eval_every=2
    )
    result = fit(cfg, out)
    assert restored == {"model": True, "memory": True, "step": 4}  # weights and memory of best.pt, step kept
    assert result.step == 8
    (event,) = records(out, "guard")
    assert (event["step"], event["action"]) == (4, "rollback")
    # The schedule goes on from iteration 4 at a quarter of its value.
    train = {r["step"]: r["lr"] for r in records(out, "train")}
    for step in (4, 5, 8):  # record of step s holds the lr of optimiser step s - 1
        factor = 0.25 if step > 4 else 1.0
        assert train[step] == pytest.approx(factor * lr_for_step(step - 1, 8, cfg.train.lr, 0.9), rel=1e-9)
    last = load_checkpoint(out / "last.pt")
    assert last["guard"]["rollbacks"] == 1 and last["guard"]["lr_scale"] == 0.25


def test_guard_stops_after_max_rollbacks(tmp_path, data_root, monkeypatch):
    scripted_miou(monkeypatch, [0.50, 0.20])
    cfg = tiny_config(
        data_root,
        overrides=(*GUARD, "guard.action=rollback", "guard.max_rollbacks=2"),
        iterations=10,
        eval_every=2,
    )
    with pytest.raises(TrainingCollapsed, match="guard.max_rollbacks=2 reached"):
        fit(cfg, tmp_path / "run")
    assert [e["action"] for e in records(tmp_path / "run", "guard")] == ["rollback", "rollback", "stop"]


def scripted_teacher(monkeypatch, collapse_after: int | None) -> None:
    """Pseudo-labels = the unlabeled ground truth (a healthy teacher), all background after ``collapse_after`` steps."""
    original = recipes.RECIPES["selftrain"]
    calls = {"n": 0}

    def scripted(ctx, batch_l, batch_u, *, use_memory):
        out = original(ctx, batch_l, batch_u, use_memory=use_memory)
        calls["n"] += 1
        out.pseudo = out.target_u.clone()
        if collapse_after is not None and calls["n"] > collapse_after:
            out.pseudo = torch.zeros_like(out.pseudo)
        return out

    monkeypatch.setitem(recipes.RECIPES, "selftrain", scripted)


CLASS_GUARD = (
    "guard.enabled=true",
    "guard.miou_drop=100",
    "guard.min_class_share=0.1",
    "guard.dominant_share=0",
    "guard.action=stop",
)


def test_guard_fires_when_a_pseudo_label_class_collapses(tmp_path, data_root, monkeypatch):
    scripted_teacher(monkeypatch, collapse_after=16)
    cfg = tiny_config(data_root, method="selftrain", overrides=CLASS_GUARD, iterations=32, eval_every=8, log_every=8)
    with pytest.raises(TrainingCollapsed, match=r"class share collapsed at iteration 24: 'disc' 0.00% \(labeled "):
        fit(cfg, tmp_path / "run")
    (event,) = records(tmp_path / "run", "guard")
    assert (event["step"], event["kind"], event["action"]) == (24, "classes", "stop")


def test_guard_stays_quiet_with_a_healthy_teacher(tmp_path, data_root, monkeypatch):
    scripted_teacher(monkeypatch, collapse_after=None)
    cfg = tiny_config(data_root, method="selftrain", overrides=CLASS_GUARD, iterations=32, eval_every=8, log_every=8)
    result = fit(cfg, tmp_path / "run")
    assert result.step == 32 and records(tmp_path / "run", "guard") == []
    assert all(r["pseudo_acc"] == 1.0 for r in records(tmp_path / "run", "train"))


def test_guard_stays_quiet_on_a_normal_run(tmp_path, data_root):
    quiet = ("guard.enabled=true", "guard.action=stop", "guard.min_class_share=0", "guard.dominant_share=0")
    cfg = tiny_config(data_root, method="allspark", overrides=quiet, iterations=12, eval_every=3)
    result = fit(cfg, tmp_path / "run")
    assert result.step == 12 and records(tmp_path / "run", "guard") == []
    train = records(tmp_path / "run", "train")
    assert all(r["kept_fraction"] == 1.0 and len(r["pseudo_share"]) == 6 for r in train)
    assert all(r["loss_ratio"] == pytest.approx(r["loss_x"] / r["loss_u"], rel=1e-5) for r in train)
    assert all(len(r["memory_diversity"]) == 6 and -1 <= r["memory_diversity"][0] <= 1 for r in train)


# ------------------------------------------------------------------------------------------- the default: warn
def test_dominant_class_by_hand():
    labeled = torch.tensor([0.6, 0.3, 0.1])
    conf = torch.tensor([0.99998, 0.7, math.nan])
    assert dominant_class(torch.tensor([0.995, 0.005, 0.0]), conf, labeled, 0.98, 0.99) == 0
    assert dominant_class(torch.tensor([0.97, 0.03, 0.0]), conf, labeled, 0.98, 0.99) is None  # not enough share
    unsure = torch.tensor([0.9, 0.7, math.nan])
    assert dominant_class(torch.tensor([0.995, 0.005, 0.0]), unsure, labeled, 0.98, 0.99) is None  # an unsure teacher
    mostly = torch.tensor([0.985, 0.01, 0.005])  # the labeled data are 98.5% class 0: no collapse
    assert dominant_class(torch.tensor([0.995, 0.005, 0.0]), conf, mostly, 0.98, 0.99) is None
    assert dominant_class(torch.tensor([0.995, 0.005, 0.0]), conf, labeled, 0.0, 0.99) is None  # disabled


def test_guard_defaults_warn_for_the_semi_supervised_methods(data_root):
    for method in ("selftrain", "allspark", "fixmatch", "unimatch", "allspark+"):
        g = tiny_config(data_root, method=method).guard
        assert (g.enabled, g.action, g.patience) == (True, "warn", 1)
        assert (g.miou_drop, g.min_class_share, g.dominant_share, g.dominant_conf) == (10.0, 0.1, 0.98, 0.99)
    assert tiny_config(data_root, method="supervised").guard.enabled is False
    assert tiny_config(data_root, overrides=("guard.enabled=false",)).guard.enabled is False
    assert tiny_config(data_root, method="supervised", overrides=("guard.enabled=true",)).guard.enabled is True
    with pytest.raises(AllSparkError, match=r"'guard.dominant_share' must be in \[0, 1\], got 1.5"):
        tiny_config(data_root, overrides=("guard.dominant_share=1.5",))
    with pytest.raises(AllSparkError, match="'guard.action' is 'pause': choose one of warn, stop, rollback"):
        tiny_config(data_root, overrides=("guard.action=pause",))


def one_class_teacher(monkeypatch, collapse_after: int | None, conf: float = 0.99998) -> None:
    """Pseudo-labels = the unlabeled ground truth, then (after ``collapse_after`` steps) every pixel background at
    confidence ``conf``: the issue's symptom (100% of the pseudo-labels on one class at confidence 0.99998)."""
    original = recipes.RECIPES["selftrain"]
    calls = {"n": 0}

    def scripted(ctx, batch_l, batch_u, *, use_memory):
        out = original(ctx, batch_l, batch_u, use_memory=use_memory)
        calls["n"] += 1
        out.pseudo = out.target_u.clone()
        if collapse_after is not None and calls["n"] > collapse_after:
            out.pseudo = torch.zeros_like(out.pseudo)
            out.confidence = torch.full_like(out.confidence, conf)
        return out

    monkeypatch.setitem(recipes.RECIPES, "selftrain", scripted)


def test_default_guard_warns_on_a_scripted_collapse_and_training_goes_on(tmp_path, data_root, monkeypatch, caplog):
    scripted_miou(monkeypatch, [0.50])  # a steady validation: only the pseudo-labels collapse
    one_class_teacher(monkeypatch, collapse_after=16)
    out = tmp_path / "run"
    cfg = tiny_config(data_root, method="selftrain", iterations=40, eval_every=8, log_every=8)
    with caplog.at_level("WARNING", logger="allspark_seg.engine.train"):
        result = fit(cfg, out)
    assert result.step == 40 and (out / "results.json").exists()  # trained to the end
    events = records(out, "guard")
    # one warning per signal when the collapse starts (iteration 24), none while it lasts (32, 40)
    assert [(e["step"], e["kind"], e["action"]) for e in events] == [(24, "classes", "warn"), (24, "dominant", "warn")]
    assert "'background' 100.00% of them (labeled 75.61%) at mean confidence " in events[1]["reason"]
    conf = float(events[1]["reason"].split("mean confidence ")[1].split(",")[0])
    assert conf == pytest.approx(0.99998, abs=1e-3)  # a float32 mean of 24576 values
    assert "'disc' 0.00% (labeled" in events[0]["reason"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("collapse guard: pseudo-label class share collapsed at iteration 24" in m for m in warned)
    assert any("collapse guard: one class took the pseudo-labels at iteration 24" in m for m in warned)
    assert any("2 warning(s) during training (classes at iteration 24, dominant at iteration 24" in m for m in warned)
    last = load_checkpoint(out / "last.pt")["guard"]
    assert last["warned"] == ["classes", "dominant"] and last["rollbacks"] == 0


def test_default_guard_warns_on_an_miou_drop_and_records_the_recovery(tmp_path, data_root, monkeypatch, caplog):
    scripted_miou(monkeypatch, [0.50, 0.38, 0.39, 0.55])  # 12 points below the best at 8, 11 at 12, back at 16
    one_class_teacher(monkeypatch, collapse_after=None)
    out = tmp_path / "run"
    cfg = tiny_config(data_root, method="selftrain", iterations=16, eval_every=4, log_every=8)
    with caplog.at_level("WARNING", logger="allspark_seg.engine.train"):
        result = fit(cfg, out)
    assert result.step == 16 and result.best_miou == 0.55
    events = [(e["step"], e["kind"], e["action"]) for e in records(out, "guard")]
    assert events == [(8, "miou", "warn"), (16, "miou", "recovered")]
    assert [r["miou"] for r in records(out, "eval")] == [0.50, 0.38, 0.39, 0.55]  # no rollback, no re-evaluation
    assert any("validation mIoU 38.00 at iteration 8 is 12.00 points" in r.getMessage() for r in caplog.records)


def test_default_guard_is_quiet_on_a_healthy_run(tmp_path, data_root, monkeypatch, caplog):
    scripted_miou(monkeypatch, [0.40, 0.45, 0.50, 0.52, 0.50])
    one_class_teacher(monkeypatch, collapse_after=None)
    cfg = tiny_config(data_root, method="selftrain", iterations=40, eval_every=8, log_every=8)
    with caplog.at_level("WARNING", logger="allspark_seg.engine.train"):
        result = fit(cfg, tmp_path / "run")
    assert result.step == 40 and records(tmp_path / "run", "guard") == []
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
