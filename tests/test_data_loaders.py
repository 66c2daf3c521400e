"""Global batch sampler contract, validation sharding, worker seeding and loaders on tiny datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from allspark_seg import data
from allspark_seg.data.loaders import global_batches
from allspark_seg.errors import ConfigError


def step_sets(batches: list[list[list[tuple[int, int]]]]) -> list[list[tuple[int, int]]]:
    return [[pair for micro in step for pair in micro] for step in batches]


def per_step(n: int, batch: int, world: int, accum: int, **kw: int) -> list[list[tuple[int, int]]]:
    """Pairs per optimiser step, gathered over all ranks and micro-steps in rank-major order."""
    ranks = [global_batches(n, batch, rank=r, world_size=world, grad_accum=accum, **kw) for r in range(world)]
    return [[pair for r in range(world) for micro in ranks[r][s] for pair in micro] for s in range(len(ranks[0]))]


def test_steps_per_epoch() -> None:
    assert data.steps_per_epoch(100, 8) == 12
    assert data.steps_per_epoch(3, 8) == 1
    with pytest.raises(ConfigError):
        data.steps_per_epoch(0, 8)
    with pytest.raises(ConfigError):
        data.steps_per_epoch(10, 2, shards=0)


def official_batches_per_rank(n: int, batch: int, world: int) -> int:
    """What torch's ``DistributedSampler(shuffle=True)`` plus ``DataLoader(drop_last=True)`` yield per rank."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=world - 1, shuffle=True)
    return len(torch.utils.data.DataLoader(range(n), batch_size=batch, sampler=sampler, drop_last=True))


@pytest.mark.parametrize(
    ("n", "batch", "expected"),
    [
        (10582 - 183, 2, 1300),  # Pascal classic, 183 labels: unlabeled epoch, 4 GPUs x 2
        (10582 - 92, 2, 1311),
        (10582 - 1464, 2, 1140),  # the method doc's table says 1139 (floor(n / 8))
        (2975 - 186, 2, 349),  # Cityscapes 1/16 (the method doc says 348)
        (2975 - 1488, 2, 186),  # Cityscapes 1/2 (the method doc says 185)
        (366, 4, 23),  # supervised Pascal 366: labeled epoch, 4 GPUs x 4
        (7, 2, 1),
    ],
)
def test_steps_per_epoch_match_the_official_sampler(n: int, batch: int, expected: int) -> None:
    """floor(ceil(n / W) / B) with W = 4 processes, or 1 process with 4 micro-steps, or 2 x 2."""
    assert official_batches_per_rank(n, batch, 4) == expected
    assert data.steps_per_epoch(n, batch, shards=4) == expected
    for world, accum in ((4, 1), (1, 4), (2, 2)):
        assert len(global_batches(n, batch, seed=0, epoch=0, rank=0, world_size=world, grad_accum=accum)) == expected


def test_ranks_and_accumulation_see_the_same_samples_per_step() -> None:
    kw = {"seed": 3, "epoch": 2}
    two_ranks = per_step(50, 4, world=2, accum=1, **kw)
    accumulate = per_step(50, 4, world=1, accum=2, **kw)
    double = per_step(50, 8, world=1, accum=1, **kw)
    assert len(two_ranks) == len(accumulate) == len(double) == 6
    for a, b, c in zip(two_ranks, accumulate, double, strict=True):
        assert a == b == c  # same order even, not only the same sets
        assert len(set(a)) == 8


def test_chunks_follow_the_documented_layout() -> None:
    order = data.epoch_order(40, 1, 0, 40)
    batches = global_batches(40, 2, seed=1, epoch=0, rank=1, world_size=2, grad_accum=3)
    g = 2 * 3 * 2
    for step, micro in enumerate(batches):
        for k, chunk in enumerate(micro):
            start = step * g + (1 * 3 + k) * 2
            assert [i for i, _ in chunk] == order[start : start + 2].tolist()
            assert all(e == 0 for _, e in chunk)


def test_epoch_is_a_permutation_and_depends_on_seed_epoch_stream() -> None:
    flat = [p for step in step_sets(global_batches(30, 5, seed=0, epoch=1)) for p in step]
    assert sorted(i for i, _ in flat) == list(range(30)) and {e for _, e in flat} == {1}
    base = data.epoch_order(30, 0, 1, 30)
    assert (base == data.epoch_order(30, 0, 1, 30)).all()
    for other in (data.epoch_order(30, 0, 2, 30), data.epoch_order(30, 1, 1, 30), data.epoch_order(30, 0, 1, 30, 1)):
        assert not (base == other).all()


def test_resuming_at_a_step_needs_no_replay() -> None:
    full = global_batches(64, 4, seed=0, epoch=0, grad_accum=2)
    resumed = global_batches(64, 4, seed=0, epoch=0, grad_accum=2, start_step=3)
    assert resumed == full[3:]
    sampler = data.GlobalBatchSampler(64, 4, seed=0, epoch=0, grad_accum=2, start_step=3)
    assert list(sampler) == [micro for step in full[3:] for micro in step] and len(sampler) == 10
    sampler.set_epoch(1)
    assert len(list(sampler)) == 16


def test_dataset_smaller_than_one_global_batch() -> None:
    steps = per_step(3, 4, world=2, accum=1, seed=0, epoch=0)
    assert len(steps) == 1
    indices = [i for i, _ in steps[0]]
    assert len(indices) == 8 and len(set(indices)) == 8  # later laps are shifted: distinct augmentations
    assert sorted(i % 3 for i in indices[:3]) == [0, 1, 2]  # the first lap is one permutation


def test_explicit_steps_for_unequal_batch_sizes() -> None:
    labeled = data.GlobalBatchSampler(10, 2, seed=0, epoch=0, steps=7, stream=1)
    unlabeled = data.GlobalBatchSampler(30, 4, seed=0, epoch=0)
    assert len(labeled) == len(unlabeled) == 7
    assert all(len(b) == 2 for b in labeled)


def test_validation_sharding_has_no_duplicates_and_no_padding() -> None:
    shards = [data.shard_indices(10, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert list(data.ShardSampler(2, 1, 3)) == [1] and list(data.ShardSampler(2, 2, 3)) == []
    with pytest.raises(ConfigError):
        data.shard_indices(10, 3, 3)


def test_worker_init_fn_is_deterministic() -> None:
    init = data.worker_init_fn(7, rank=1)
    init(0)
    a = (np.random.random(), torch.rand(1).item())
    init(0)
    assert (np.random.random(), torch.rand(1).item()) == a
    data.worker_init_fn(7, rank=1)(1)
    assert np.random.random() != a[0]


def tiny_dataset(root: Path, n: int) -> data.TrainDataset:
    for i in range(n):
        (root / "labeled" / "images").mkdir(parents=True, exist_ok=True)
        (root / "labeled" / "masks").mkdir(parents=True, exist_ok=True)
        noise = np.random.default_rng(i).integers(0, 256, (10, 14, 3)).astype(np.uint8)
        Image.fromarray(noise).save(root / "labeled" / "images" / f"{i}.png")
        Image.fromarray(np.full((10, 14), i % 2, np.uint8)).save(root / "labeled" / "masks" / f"{i}.png")
    items = data.open_split("folder", root, "labeled", num_classes=2)
    return data.TrainDataset(items, role="labeled", crop_size=16, seed=0, num_classes=2)


def test_loader_on_a_dataset_smaller_than_one_batch(tmp_path: Path) -> None:
    loader = data.build_train_loader(tiny_dataset(tmp_path, 3), 8, seed=0, epoch=0)
    batches = list(loader)
    assert len(batches) == 1
    assert batches[0]["image"].shape == (8, 3, 16, 16) and batches[0]["mask"].shape == (8, 16, 16)
    assert set(batches[0]["mask"].unique().tolist()) <= {0, 1, 255}
    images = batches[0]["image"]
    assert len({img.numpy().tobytes() for img in images}) == 8  # repeats are augmented differently


def test_loader_results_do_not_depend_on_workers(tmp_path: Path) -> None:
    dataset = tiny_dataset(tmp_path, 4)
    kw = {"seed": 1, "epoch": 3}
    serial = list(data.build_train_loader(dataset, 2, **kw))
    parallel = list(data.build_train_loader(dataset, 2, num_workers=2, **kw))
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def per_epoch_batches(n: int, batch: int, steps: int, start: int, stop: int, **kw: int) -> list[list[tuple[int, int]]]:
    """The per-epoch samplers of iterations ``start .. stop - 1`` one after the other (the loop before run loaders)."""
    accum = kw.get("grad_accum", 1)
    out: list[list[tuple[int, int]]] = []
    for epoch in range(start // steps, -(-stop // steps)):
        offset = start % steps if epoch == start // steps else 0
        out += list(data.GlobalBatchSampler(n, batch, epoch=epoch, start_step=offset, steps=steps, **kw))
    return out[: (stop - start) * accum]


@pytest.mark.parametrize(
    ("n", "batch", "steps", "start", "stop", "layout"),
    [
        (4, 4, 1, 0, 5, {}),  # one step per epoch: 4 labeled images
        (10, 3, 3, 0, 10, {}),  # the last epoch ends early
        (10, 3, 3, 4, 11, {}),  # resumed within an epoch
        (10, 3, 3, 6, 9, {}),  # resumed at an epoch boundary
        (3, 2, 2, 1, 7, {"grad_accum": 2}),  # smaller than a global batch, micro-steps
        (9, 2, 2, 3, 8, {"rank": 1, "world_size": 2, "stream": 1}),
        (5, 2, 2, 4, 4, {}),  # nothing left
    ],
)
def test_run_sampler_yields_the_per_epoch_batches_one_after_another(
    n: int, batch: int, steps: int, start: int, stop: int, layout: dict[str, int]
) -> None:
    sampler = data.RunBatchSampler(n, batch, seed=5, start=start, stop=stop, steps=steps, **layout)
    expected = per_epoch_batches(n, batch, steps, start, stop, seed=5, **layout)
    assert list(sampler) == expected
    assert len(sampler) == len(expected) == (stop - start) * layout.get("grad_accum", 1)


def test_run_sampler_default_steps_and_bad_arguments() -> None:
    sampler = data.RunBatchSampler(10, 3, seed=0, stop=7)
    assert sampler.steps == data.steps_per_epoch(10, 3)
    assert list(sampler) == per_epoch_batches(10, 3, sampler.steps, 0, 7, seed=0)
    with pytest.raises(ConfigError):
        data.RunBatchSampler(0, 3, seed=0, stop=1)
    with pytest.raises(ConfigError):
        data.RunBatchSampler(4, 2, seed=0, start=-1, stop=1)


def test_run_loader_with_a_worker_gives_the_per_epoch_loaders_batches(tmp_path: Path) -> None:
    dataset = tiny_dataset(tmp_path, 4)  # 2 steps per epoch with batch 2
    per_epoch = [b for epoch in (1, 2, 3) for b in data.build_train_loader(dataset, 2, seed=1, epoch=epoch)][1:]
    run = list(data.build_run_loader(dataset, 2, seed=1, start=3, stop=8, num_workers=1))
    assert len(run) == len(per_epoch) == 5
    for a, b in zip(run, per_epoch, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
