"""The training loop's loaders and threads: one loader per stream for the whole run (its workers start once, not
once per epoch), the same batches as the per-epoch loaders, and the intra-op threads left after the workers."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import dataloader

from allspark_seg.dist import DistEnv
from allspark_seg.engine import adapt
from allspark_seg.engine.train import Trainer, fit
from train_utils import epoch_iterators, tiny_config

#: 4 labeled images of batch 4: one step per epoch, as with configs/folder.yaml on 4 labeled tiles.
FEW_LABELS = ("data.synthetic.num_labeled=4", "data.synthetic.num_unlabeled=8", "data.synthetic.num_val=2")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic_few"))


def same_batch(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def per_epoch(trainer: Trainer, start: int, stop: int) -> list[tuple[dict, dict | None]]:
    """Batches of iterations ``start .. stop - 1`` from the per-epoch iterators (the loop's former construction)."""
    steps, accum = trainer.plan.steps_per_epoch, trainer.cfg.train.grad_accum
    out: list[tuple[dict, dict | None]] = []
    for epoch in range(start // steps, -(-stop // steps)):
        it_l, it_u = epoch_iterators(trainer, epoch, start % steps if epoch == start // steps else 0)
        out += [(b, next(it_u) if it_u is not None else None) for b in it_l]
    return out[: (stop - start) * accum]


@pytest.mark.parametrize(
    ("method", "overrides", "start"),
    [
        ("allspark", ("train.grad_accum=2",), 3),  # 2 steps per epoch, resumed within the second epoch
        ("supervised", ("train.batch_size=4",), 2),  # one step per epoch
    ],
)
def test_the_run_iterators_give_the_per_epoch_batches_from_the_resume_position(
    tmp_path, data_root, method, overrides, start
):
    cfg = tiny_config(data_root, method, (*FEW_LABELS, *overrides), iterations=6)
    trainer = Trainer(cfg, tmp_path / "run", DistEnv(), None)
    assert trainer.plan.steps_per_epoch in (1, 2) and trainer.plan.total == 6  # several epochs after the start
    trainer.step = start  # as a resumed run
    it_l, it_u = trainer._run_iterators()
    run = [(b, next(it_u) if it_u is not None else None) for b in it_l]
    expected = per_epoch(trainer, start, trainer.plan.total)
    assert len(run) == len(expected) == (trainer.plan.total - start) * cfg.train.grad_accum
    for (l_run, u_run), (l_old, u_old) in zip(run, expected, strict=True):
        assert same_batch(l_run, l_old)
        assert (u_run is None and u_old is None) or same_batch(u_run, u_old)


def test_a_loader_worker_starts_once_per_run_not_once_per_epoch(tmp_path, data_root, monkeypatch):
    monkeypatch.setattr(adapt.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})  # room for one worker
    started = []
    init = dataloader._MultiProcessingDataLoaderIter.__init__

    def counting(self, loader):
        started.append(loader.num_workers)
        init(self, loader)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__", counting)
    overrides = (*FEW_LABELS, "train.batch_size=4", "data.num_workers=1")
    cfg = tiny_config(data_root, "supervised", overrides, iterations=4, eval_every=100, log_every=100)
    result = fit(cfg, tmp_path / "run")
    assert result.step == 4  # four one-step epochs ...
    assert started == [1]  # ... one loader iterator, one worker process
    fit(cfg, tmp_path / "run")  # resumed at the end: nothing left to load, no worker started
    assert started == [1]


# --------------------------------------------------------------------------------------------------- threads


@pytest.mark.parametrize(
    ("cores", "loaders", "workers", "processes", "threads"),
    [(2, 1, 1, 1, 1), (2, 2, 0, 1, 2), (1, 1, 0, 1, 1), (1, 2, 0, 1, 1), (16, 2, 4, 1, 8), (16, 2, 7, 1, 2),
     (64, 2, 7, 4, 2), (8, 2, 0, 4, 2), (3, 2, 4, 1, 1)],
)  # fmt: skip
def test_intra_op_threads_are_the_cores_left_after_the_workers(cores, loaders, workers, processes, threads):
    assert adapt.intra_op_threads(cores, loaders, workers, processes) == threads


def test_the_threads_and_the_worker_cap_fit_together():
    for cores in range(1, 33):
        for loaders in (1, 2):
            for processes in (1, 2, 4):
                workers = adapt.worker_limit(cores, loaders, processes)
                threads = adapt.intra_op_threads(cores, loaders, workers, processes)
                assert threads >= 1
                assert processes * (threads + loaders * workers) <= max(cores, processes)


def test_choose_threads_leaves_explicit_settings_alone():
    kw = {"cores": 2, "loaders": 1, "workers": 1, "processes": 1}
    assert adapt.choose_threads(current=2, environ={}, **kw) == (1, "2 usable cores - 1 loader worker")
    assert adapt.choose_threads(current=2, environ={"OMP_NUM_THREADS": "2"}, **kw) == (2, "OMP_NUM_THREADS is set")
    assert adapt.choose_threads(current=2, environ={"MKL_NUM_THREADS": "3"}, **kw) == (2, "MKL_NUM_THREADS is set")
    # Fewer threads than the cores allow (torch.set_num_threads by the caller): kept, never raised.
    assert adapt.choose_threads(current=1, environ={}, cores=8, loaders=2, workers=1, processes=1) == (
        1,
        "kept: at most 6 = 8 usable cores - 2 loader workers",
    )
    assert adapt.choose_threads(current=8, environ={}, cores=8, loaders=2, workers=1, processes=2) == (
        2,
        "(8 usable cores - 4 loader workers) / 2 processes",
    )
    assert adapt.choose_threads(current=4, environ={}, cores=4, loaders=2, workers=0, processes=1) == (
        4,
        "4 usable cores - 0 loader workers",
    )


def test_training_uses_the_chosen_threads_logs_them_once_and_restores_them(tmp_path, data_root, monkeypatch, caplog):
    monkeypatch.setattr(adapt.os, "sched_getaffinity", lambda pid: {0, 1})  # 2 cores: one worker, one thread
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    seen = []
    step = Trainer.train_step

    def spying(self, it_l, it_u):
        seen.append(torch.get_num_threads())
        return step(self, it_l, it_u)

    monkeypatch.setattr(Trainer, "train_step", spying)
    overrides = (*FEW_LABELS, "train.batch_size=4", "data.num_workers=1")
    cfg = tiny_config(data_root, "supervised", overrides, iterations=2, eval_every=100, log_every=100)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # PyTorch's default on 2 cores
    try:
        with caplog.at_level(logging.INFO, logger="allspark_seg"):
            fit(cfg, tmp_path / "run")
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    assert seen == [1, 1] and after == 2
    lines = [r.getMessage() for r in caplog.records if "torch threads" in r.getMessage()]
    assert lines == ["torch threads: 1 (2 usable cores - 1 loader worker)"]
