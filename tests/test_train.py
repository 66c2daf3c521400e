"""The training loop: checkpoints, exact resume after SIGKILL, atomic saves, non-finite losses, learning."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from allspark_seg.config import config_from_dict
from allspark_seg.dist import DistEnv
from allspark_seg.engine import recipes
from allspark_seg.engine import state as ckpt_module
from allspark_seg.engine.checkpoint import atomic_save, load_checkpoint
from allspark_seg.engine.train import Trainer, TrainingDiverged, fit, training_plan
from allspark_seg.errors import AllSparkError, CheckpointError
from train_utils import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def records(out: Path, kind: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_fit_writes_checkpoints_config_and_metrics(tmp_path, data_root):
    cfg = tiny_config(data_root, iterations=4, checkpoint_every=2, eval_every=2)
    result = fit(cfg, tmp_path / "run")
    out = tmp_path / "run"
    assert result.step == 4
    assert {"last.pt", "best.pt", "config.yaml", "metrics.jsonl", "results.json"} <= {p.name for p in out.iterdir()}
    last = load_checkpoint(out / "last.pt")
    assert last["step"] == 4
    assert {"model", "optimizer", "rng", "config", "ema", "scaler", "best_miou"} <= set(last)
    assert "allspark.attn.memory.bank" in last["model"]
    restored = config_from_dict(last["config"])
    assert restored.data.num_classes == 6 and restored.method == "allspark"
    train = records(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {"loss", "loss_x", "loss_u", "lr", "pseudo_share", "kept_fraction", "memory_fill", "pseudo_acc"} <= set(
        train[-1]
    )
    assert len(train[-1]["pseudo_share"]) == 6
    assert sum(train[-1]["pseudo_share"]) == pytest.approx(1.0, abs=1e-5)
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [2, 4]
    assert result.best_miou == max(r["miou"] for r in evals)


def test_training_plan_warmup_and_eval_cadence(data_root):
    cfg = tiny_config(data_root, iterations=None, epochs=5, batch_size=2)
    plan = training_plan(cfg, num_samples=16, world_size=1)
    assert (plan.steps_per_epoch, plan.total) == (8, 40)
    assert plan.warmup == 3  # ceil(40 / 16)
    assert plan.eval_every == 8  # once per epoch
    cfg = tiny_config(data_root, overrides=("semi.warmup_epochs=0.5",), iterations=100)
    assert training_plan(cfg, 16, world_size=2).warmup == 2  # 4 steps per epoch with 2 processes


def run_training_subprocess(out: Path, data_root: str, iterations: int) -> subprocess.Popen:
    script = (
        "import sys; sys.path.insert(0, {tests!r});"
        "from train_utils import tiny_config; from allspark_seg.engine.train import fit;"
        "fit(tiny_config({root!r}, iterations={it}, checkpoint_every=2, log_every=100), {out!r})"
    ).format(tests=str(REPO / "tests"), root=data_root, it=iterations, out=str(out))
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, data_root):
    iterations = 12
    fit(tiny_config(data_root, iterations=iterations, checkpoint_every=2, log_every=100), tmp_path / "straight")
    # Kill a run with SIGKILL as soon as it has written a checkpoint, then run the same command again.
    out = tmp_path / "killed"
    proc = run_training_subprocess(out, data_root, iterations)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out / "last.pt")["step"]
    assert 2 <= killed_at < iterations, "the run should have been killed mid-way"
    fit(tiny_config(data_root, iterations=iterations, checkpoint_every=2, log_every=100), out)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(out / "last.pt")
    assert b["step"] == a["step"] == iterations
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])


def test_atomic_save_keeps_the_previous_file_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def crashing_save(obj, handle):
        handle.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("simulated crash during the save")

    monkeypatch.setattr(ckpt_module.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_unsafe_or_broken_checkpoints_are_refused(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(tmp_path / "garbage.pt")

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root, monkeypatch):
    calls = {"n": 0}
    original = recipes.RECIPES["allspark"]

    def poisoned(ctx, batch_l, batch_u, *, use_memory):
        out = original(ctx, batch_l, batch_u, use_memory=use_memory)
        calls["n"] += 1
        if calls["n"] == 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setitem(recipes.RECIPES, "allspark", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"non-finite in iteration 5 \(loss=nan.*last good checkpoint"):
        fit(tiny_config(data_root, iterations=8, checkpoint_every=2, log_every=1), out)
    saved = load_checkpoint(out / "last.pt")
    assert saved["step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_resuming_with_another_model_config_is_refused(tmp_path, data_root):
    out = tmp_path / "run"
    fit(tiny_config(data_root, iterations=2), out)
    with pytest.raises(CheckpointError, match="different 'model' config"):
        fit(tiny_config(data_root, overrides=("model.head_dim=16",), iterations=4), out)


@pytest.mark.slow
def test_tiny_training_learns_the_synthetic_data(tmp_path):
    """A few hundred iterations of a small MiT from scratch on foreground/background synthetic data (~30 s)."""
    cfg = tiny_config(
        str(tmp_path / "data"),
        method="supervised",
        overrides=(
            "model.embed_dims=[16,32,64,128]",
            "model.num_heads=[1,1,2,4]",
            "model.head_dim=64",
            "data.synthetic.num_classes=2",
            "data.synthetic.num_labeled=64",
            "data.synthetic.num_val=16",
            "data.pipeline=unimatch",  # geometric augmentation only for the labeled images
            "train.optimizer=adamw",
            "train.weight_decay=0.01",
        ),
        iterations=700,
        batch_size=8,
        lr=0.001,
        lr_multi=1.0,
        log_every=100,
        eval_every=700,
    )
    before = Trainer(cfg, tmp_path / "untrained", DistEnv(), None).validate().miou
    result = fit(cfg, tmp_path / "run")
    train = records(tmp_path / "run")
    assert train[-1]["loss"] < 0.9 * train[0]["loss"]
    assert result.best_miou > before + 0.12, (before, result.best_miou)


@pytest.mark.parametrize(("precision", "accum"), [("bf16", 1), ("fp16", 2)])
def test_mixed_precision_and_gradient_accumulation(tmp_path, data_root, precision, accum):
    cfg = tiny_config(data_root, overrides=(f"train.precision={precision}", f"train.grad_accum={accum}"), iterations=3)
    result = fit(cfg, tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert result.step == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(tmp_path / "run"))
    assert (saved["scaler"] is not None) == (precision == "fp16")  # fp16 needs a gradient scaler, bf16 does not
    assert all(v.dtype != torch.float16 for v in saved["model"].values())  # weights stay float32 under autocast


def test_tensorboard_without_the_extra_is_a_clear_error(tmp_path, data_root, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(AllSparkError, match=r"pip install 'allspark-seg\[tb\]'"):
        fit(tiny_config(data_root, overrides=("train.tensorboard=true",), iterations=1), tmp_path / "run")


def test_non_finite_loss_in_an_earlier_micro_step_never_reaches_the_optimiser(tmp_path, data_root, monkeypatch):
    """A NaN in micro-step 0 of iteration 3 (of 2) stops the run before that iteration's optimiser step."""
    calls = {"n": 0}
    original = recipes.RECIPES["allspark"]

    def poisoned(ctx, batch_l, batch_u, *, use_memory):
        out = original(ctx, batch_l, batch_u, use_memory=use_memory)
        calls["n"] += 1
        if calls["n"] == 5:  # iteration 3, micro-step 0: the last micro-step (call 6) is finite
            out.loss = out.loss * float("nan")
        return out

    steps = []
    sgd_step = torch.optim.SGD.step

    def checked_step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        assert all(torch.isfinite(g).all() for g in grads), "a non-finite gradient reached optimizer.step()"
        steps.append(len(grads))
        return sgd_step(self, *args, **kwargs)

    monkeypatch.setitem(recipes.RECIPES, "allspark", poisoned)
    monkeypatch.setattr(torch.optim.SGD, "step", checked_step)
    out = tmp_path / "run"
    cfg = tiny_config(data_root, overrides=("train.grad_accum=2",), iterations=8, checkpoint_every=2, log_every=4)
    trainer = Trainer(cfg, out, DistEnv(), None)
    with pytest.raises(TrainingDiverged, match=r"non-finite in iteration 3 \(loss=nan.*last good checkpoint"):
        trainer.run()
    assert len(steps) == 2  # iterations 1 and 2 only
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    saved = load_checkpoint(out / "last.pt")
    assert saved["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_logged_losses_are_means_over_all_micro_steps(tmp_path, data_root, monkeypatch):
    seen: list[dict[str, torch.Tensor]] = []
    original = recipes.RECIPES["allspark"]

    def spy(ctx, batch_l, batch_u, *, use_memory):
        out = original(ctx, batch_l, batch_u, use_memory=use_memory)
        seen.append(out.logs)
        return out

    monkeypatch.setitem(recipes.RECIPES, "allspark", spy)
    cfg = tiny_config(data_root, overrides=("train.grad_accum=3",), iterations=4, log_every=2)
    fit(cfg, tmp_path / "run")
    train = records(tmp_path / "run")
    assert [r["step"] for r in train] == [2, 4] and len(seen) == 12
    for r, window in zip(train, (seen[:6], seen[6:]), strict=True):
        for key in ("loss", "loss_x", "loss_u"):
            steps = [(m[0][key] + m[1][key] + m[2][key]) / 3 for m in (window[:3], window[3:])]
            assert r[key] == float((steps[0] + steps[1]) / 2), key
    assert len({r["loss"] for r in train}) == 2


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root):
    """A 2-iteration run whose ``last.pt`` the resume checks read."""
    out = tmp_path_factory.mktemp("finished") / "run"
    fit(tiny_config(data_root, iterations=2), out)
    return out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.grad_accum=2", "train.grad_accum=1 but this run has train.grad_accum=2"),
        ("train.batch_size=1", "train.batch_size=2 but this run has train.batch_size=1"),
        ("train.unlabeled_batch_size=4", "train.unlabeled_batch_size=2 but this run has train.unlabeled_batch_size=4"),
        ("train.seed=1", "train.seed=0 but this run has train.seed=1"),
        ("semi.ema=true", "semi.ema=false but this run has semi.ema=true"),
        ("semi.conf_thresh=0.9", "semi.conf_thresh=0.0 but this run has semi.conf_thresh=0.9"),
        ("semi.warmup_iterations=5", "semi.warmup_iterations=null but this run has semi.warmup_iterations=5"),
    ],
)
def test_resuming_with_another_layout_or_semi_setting_is_refused(tmp_path, data_root, finished_run, override, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes((finished_run / "last.pt").read_bytes())
    with pytest.raises(CheckpointError, match=re.escape(message)):
        fit(tiny_config(data_root, overrides=(override,), iterations=4), out)
    assert load_checkpoint(out / "last.pt")["step"] == 2  # nothing overwritten


def test_resuming_with_another_world_size_is_refused(tmp_path, data_root, finished_run):
    saved = load_checkpoint(finished_run / "last.pt")
    assert saved["world_size"] == 1
    saved["world_size"] = 2  # as if written by torchrun --nproc_per_node=2
    out = tmp_path / "run"
    atomic_save(saved, out / "last.pt")
    with pytest.raises(CheckpointError, match="written by 2 processes but this run has 1"):
        fit(tiny_config(data_root, iterations=4), out)
