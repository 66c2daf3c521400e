"""Samplers and loaders: seeded global batches, validation sharding without duplicates, worker seeding.

Global batches (docs/architecture.md): each optimiser step consumes ``G = world_size * grad_accum * batch_size``
samples taken in order from the epoch's seeded order; process ``r`` at micro-step ``k`` takes the contiguous chunk
``r * grad_accum + k`` of size ``batch_size``. One process with accumulation, several processes, or one process
with a larger batch therefore see the same samples per step, and resuming at step ``t`` needs no replay.

The epoch's order is ``np.random.default_rng([seed, epoch, ORDER_TAG, stream]).permutation(n)``, followed by
further permutations from the same generator when the steps need more than ``n`` samples (a dataset smaller than
one global batch). Samples of the ``j``-th permutation are yielded as ``index + j * n``: datasets wrap the index
around, and the augmentation generator ``[seed, epoch, index, stream]`` differs between the laps (``stream``:
0 unlabeled, 1 labeled, as for the order).

Training iterates one loader per stream for the whole run (:func:`build_run_loader`): its sampler yields these
epochs one after the other from the resume position, so its worker processes start once per run (not once per
epoch, which with a few labeled images is once per step) and prefetch across the epoch boundaries; the batches are
those of the per-epoch loaders (:func:`build_train_loader`) concatenated.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from allspark_seg.errors import ConfigError

__all__ = [
    "ORDER_TAG",
    "GlobalBatchSampler",
    "RunBatchSampler",
    "ShardSampler",
    "build_run_loader",
    "build_train_loader",
    "build_val_loader",
    "epoch_order",
    "global_batches",
    "shard_indices",
    "steps_per_epoch",
    "worker_init_fn",
]

#: Constant mixed into the order generator so it never collides with a sample's augmentation generator.
ORDER_TAG = 0x0A11_5BA2


def steps_per_epoch(n: int, batch_size: int, shards: int = 1) -> int:
    """Optimiser steps per epoch, as the official ``DistributedSampler`` plus ``drop_last`` batching gives them.

    ``max(1, ceil(n / shards) // batch_size)``: the sampler pads the epoch to a multiple of the number of shards
    (processes, times ``grad_accum`` when micro-steps stand in for processes), then each shard drops its last
    incomplete batch; at least one step. Pascal, 183 labels (10,399 unlabeled), 4 shards of 2: 1300.

    Args:
        n: Length of the epoch-defining dataset.
        batch_size: Samples per shard and micro-step.
        shards: ``world_size * grad_accum``.
    """
    if n < 1 or batch_size < 1 or shards < 1:
        raise ConfigError(
            f"Need a non-empty dataset, a positive batch and shard count, got n={n}, batch_size={batch_size}, "
            f"shards={shards}."
        )
    return max(1, -(-n // shards) // batch_size)


def epoch_order(n: int, seed: int, epoch: int, count: int, stream: int = 0) -> np.ndarray:
    """The first ``count`` sample indices of an epoch.

    Args:
        n: dataset length.
        seed: base seed.
        epoch: epoch number.
        count: how many indices are needed (may exceed ``n``).
        stream: separates independent orders with the same seed (e.g. 0 unlabeled, 1 labeled).

    Returns:
        ``(count,)`` int64: permutations of ``range(n)`` concatenated, the ``j``-th shifted by ``j * n``.
    """
    rng = np.random.default_rng([int(seed), int(epoch), ORDER_TAG, int(stream)])
    laps = max(1, -(-count // n))
    order = np.concatenate([rng.permutation(n) + lap * n for lap in range(laps)])
    return order[:count]


def _check_layout(batch_size: int, rank: int, world_size: int, grad_accum: int) -> None:
    if batch_size < 1 or grad_accum < 1 or world_size < 1:
        raise ConfigError(
            f"batch_size, grad_accum and world_size must be positive, got {batch_size}, {grad_accum}, {world_size}."
        )
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, {world_size}), got {rank}.")


def global_batches(
    dataset_len: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    grad_accum: int = 1,
    start_step: int = 0,
    steps: int | None = None,
    stream: int = 0,
) -> list[list[list[tuple[int, int]]]]:
    """This process's micro-batches: ``result[step - start_step][k]`` is a list of ``(index, epoch)`` pairs.

    Args:
        dataset_len: n.
        batch_size: per-process micro-batch size.
        seed: base seed.
        epoch: epoch number (also written into every pair).
        rank: this process.
        world_size: number of processes.
        grad_accum: micro-steps per optimiser step.
        start_step: first step (resume).
        steps: steps in the epoch, default :func:`steps_per_epoch`.
        stream: order stream (see :func:`epoch_order`).

    Returns:
        Nested lists ``[steps - start_step][grad_accum][batch_size]`` of ``(index, epoch)``.
    """
    _check_layout(batch_size, rank, world_size, grad_accum)
    g = world_size * grad_accum * batch_size
    total = steps_per_epoch(dataset_len, batch_size, world_size * grad_accum) if steps is None else steps
    if start_step >= total:
        return []
    order = epoch_order(dataset_len, seed, epoch, total * g, stream)
    result = []
    for step in range(start_step, total):
        chunk = order[step * g : (step + 1) * g]
        micro = []
        for k in range(grad_accum):
            part = chunk[(rank * grad_accum + k) * batch_size : (rank * grad_accum + k + 1) * batch_size]
            micro.append([(int(i), int(epoch)) for i in part])
        result.append(micro)
    return result


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler yielding, per optimiser step and micro-step, this process's list of ``(index, epoch)``.

    Yields ``(steps - start_step) * grad_accum`` batches of ``batch_size`` pairs. Arguments as
    :func:`global_batches`. :meth:`set_epoch` moves a persistent loader to another epoch.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        start_step: int = 0,
        steps: int | None = None,
        stream: int = 0,
    ) -> None:
        _check_layout(batch_size, rank, world_size, grad_accum)
        if dataset_len < 1:
            raise ConfigError("Cannot sample from an empty dataset.")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.start_step = start_step
        self.steps = steps
        self.stream = stream

    @property
    def global_batch(self) -> int:
        """G = world_size * grad_accum * batch_size."""
        return self.world_size * self.grad_accum * self.batch_size

    @property
    def total_steps(self) -> int:
        """Optimiser steps in the epoch (``steps`` or :func:`steps_per_epoch`)."""
        if self.steps is not None:
            return self.steps
        return steps_per_epoch(self.dataset_len, self.batch_size, self.world_size * self.grad_accum)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Sample another epoch (and optionally start it at ``start_step``)."""
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = global_batches(
            self.dataset_len,
            self.batch_size,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            grad_accum=self.grad_accum,
            start_step=self.start_step,
            steps=self.steps,
            stream=self.stream,
        )
        for micro in batches:
            yield from micro


class RunBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler of a whole run: the batches of iterations ``start .. stop - 1``, epoch after epoch.

    Iteration ``i`` is step ``i % steps`` of epoch ``i // steps``, sampled as :class:`GlobalBatchSampler` samples it
    (the same ``(index, epoch)`` pairs, ``grad_accum`` batches per iteration), so one iterator over this sampler
    yields exactly what the per-epoch samplers of epochs ``start // steps`` onwards yield one after the other, the
    first started at ``start % steps``, and ends after iteration ``stop - 1``.

    Args:
        dataset_len: n.
        batch_size: Per-process micro-batch size.
        seed: Base seed.
        start: First iteration of the run to sample (the resume position).
        stop: Iterations of the run (the sampler ends before iteration ``stop``).
        steps: Steps per epoch, default :func:`steps_per_epoch`.
        rank: This process.
        world_size: Number of processes.
        grad_accum: Micro-steps per optimiser step.
        stream: Order stream (see :func:`epoch_order`).
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        *,
        seed: int,
        start: int = 0,
        stop: int,
        steps: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        stream: int = 0,
    ) -> None:
        _check_layout(batch_size, rank, world_size, grad_accum)
        if dataset_len < 1:
            raise ConfigError("Cannot sample from an empty dataset.")
        if start < 0 or stop < 0:
            raise ConfigError(f"start and stop must not be negative, got {start} and {stop}.")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.stop = stop
        self.steps = steps_per_epoch(dataset_len, batch_size, world_size * grad_accum) if steps is None else steps
        if self.steps < 1:
            raise ConfigError(f"steps per epoch must be positive, got {self.steps}.")
        self.rank = rank
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.stream = stream

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while step < self.stop:
            epoch, offset = divmod(step, self.steps)
            end = min(self.steps, self.stop - epoch * self.steps)  # the last epoch may end early
            batches = global_batches(
                self.dataset_len,
                self.batch_size,
                seed=self.seed,
                epoch=epoch,
                rank=self.rank,
                world_size=self.world_size,
                grad_accum=self.grad_accum,
                start_step=offset,
                steps=self.steps,
                stream=self.stream,
            )
            for micro in batches[: end - offset]:
                yield from micro
            step = (epoch + 1) * self.steps


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Validation indices of one process: ``range(rank, n, world_size)``; no duplicates and no padding."""
    _check_layout(1, rank, world_size, 1)
    return list(range(rank, n, world_size))


class ShardSampler(Sampler[int]):
    """Sampler over :func:`shard_indices` (ranks may get one sample more or less than others)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = shard_indices(n, rank, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def _seed_worker(seed: int, rank: int, worker_id: int) -> None:
    state = np.random.SeedSequence([int(seed), int(rank), int(worker_id)]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[1]))


def worker_init_fn(seed: int, rank: int = 0) -> functools.partial:
    """A picklable ``worker_init_fn`` seeding torch, numpy and random from ``(seed, rank, worker_id)``.

    Augmentations do not use these generators (they draw from ``[seed, epoch, index, stream]``); this is a safety
    net for code that does.
    """
    return functools.partial(_seed_worker, seed, rank)


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    grad_accum: int = 1,
    start_step: int = 0,
    steps: int | None = None,
    stream: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over :class:`GlobalBatchSampler` (arguments as :func:`global_batches`).

    Returns:
        A DataLoader yielding collated dicts of ``batch_size`` samples, ``grad_accum`` per optimiser step.
    """
    sampler = GlobalBatchSampler(
        len(dataset),
        batch_size,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        grad_accum=grad_accum,
        start_step=start_step,
        steps=steps,
        stream=stream,
    )
    return _batch_loader(dataset, sampler, seed=seed, rank=rank, num_workers=num_workers, pin_memory=pin_memory)


def build_run_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    start: int = 0,
    stop: int,
    steps: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    grad_accum: int = 1,
    stream: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over :class:`RunBatchSampler`: iterations ``start .. stop - 1`` of a run, epoch after epoch.

    Iterate it once for the whole run: its workers then start once and prefetch across epochs. The batches are
    those of :func:`build_train_loader` for each epoch (arguments as :class:`RunBatchSampler`).

    Returns:
        A DataLoader yielding collated dicts of ``batch_size`` samples, ``grad_accum`` per iteration.
    """
    sampler = RunBatchSampler(
        len(dataset),
        batch_size,
        seed=seed,
        start=start,
        stop=stop,
        steps=steps,
        rank=rank,
        world_size=world_size,
        grad_accum=grad_accum,
        stream=stream,
    )
    return _batch_loader(dataset, sampler, seed=seed, rank=rank, num_workers=num_workers, pin_memory=pin_memory)


def _batch_loader(
    dataset: Dataset, sampler: Sampler, *, seed: int, rank: int, num_workers: int, pin_memory: bool
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=worker_init_fn(seed, rank) if num_workers > 0 else None,
        persistent_workers=False,
        # A private generator: creating an iterator must not consume the global torch RNG (dropout), or a resumed
        # run, which creates its iterators at other steps, would diverge from an uninterrupted one.
        generator=torch.Generator(),
    )


def build_val_loader(
    dataset: Dataset,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
) -> DataLoader:
    """A validation loader over this process's shard (batch size 1 unless images share one size)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=num_workers,
        worker_init_fn=worker_init_fn(seed, rank) if num_workers > 0 else None,
    )
