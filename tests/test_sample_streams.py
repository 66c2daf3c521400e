"""Random streams of training: augmentation keys per role, dropout seeds per (step, process, micro-step)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from allspark_seg import data
from allspark_seg.data.transforms import apply_pipeline, sample_rng


def tree(root, n: int = 6):
    """``n`` 40 x 56 images with masks in the folder layout, a distinct pattern per pixel row/column."""
    rng = np.random.default_rng(0)
    for sub in ("labeled/images", "labeled/masks"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / f"labeled/images/{i}.png")
        mask = (np.arange(40)[:, None] // 4 + np.arange(56)[None, :] // 5) % 3
        Image.fromarray(mask.astype(np.uint8)).save(root / f"labeled/masks/{i}.png")
    return data.open_split("folder", root, "labeled", num_classes=3)


def test_labeled_and_unlabeled_sample_j_draw_different_augmentations(tmp_path):
    """Same items, same seed and index: the labeled and the unlabeled sample must not get the same crop/flip/scale."""
    items = tree(tmp_path)
    labeled = data.TrainDataset(items, role="labeled", crop_size=24, seed=3, num_classes=3)
    unlabeled = data.TrainDataset(items, role="unlabeled", crop_size=24, seed=3, num_classes=3)
    same = [torch.equal(labeled[(j, 1)]["mask"], unlabeled[(j, 1)]["mask"]) for j in range(len(items))]
    assert not any(same), same
    # Each role has its own stream of [seed, epoch, index, stream] keys: 0 unlabeled (as before), 1 labeled.
    image, mask = np.asarray(Image.open(items[2].image)), np.asarray(Image.open(items[2].mask))
    for ds, stream in ((unlabeled, 0), (labeled, 1)):
        expected = apply_pipeline("allspark", ds.role, image, mask, sample_rng(3, 1, 2, stream), 24)
        assert torch.equal(ds[(2, 1)]["mask"], expected["mask"])
        assert torch.equal(ds[(2, 1)]["image"], expected["image"])
    assert sample_rng(3, 1, 2).random() == sample_rng(3, 1, 2, 0).random() != sample_rng(3, 1, 2, 1).random()


def test_augmentations_do_not_depend_on_workers(tmp_path):
    items = tree(tmp_path)
    labeled = data.TrainDataset(items, role="labeled", crop_size=24, seed=0, num_classes=3)

    def batches(workers: int) -> list[torch.Tensor]:
        loader = data.build_train_loader(labeled, 2, seed=0, epoch=0, num_workers=workers)
        return [b["image"] for b in loader]

    alone, two = batches(0), batches(2)
    assert len(alone) == 3 and all(torch.equal(a, b) for a, b in zip(alone, two, strict=True))


def test_micro_step_draws_depend_on_seed_step_and_virtual_process():
    """Dropout and drop-path masks of micro-step k on process r: a generator seeded from (seed, step, r * G + k)."""
    from allspark_seg.engine.accumulation import micro_step_seed, seed_micro_step

    def draw(seed: int, step: int, virtual: int) -> torch.Tensor:
        seed_micro_step(seed, step, virtual)
        return torch.rand(8)

    assert torch.equal(draw(0, 5, 1), draw(0, 5, 1))
    others = [draw(0, 5, 0), draw(0, 6, 1), draw(1, 5, 1)]
    assert not any(torch.equal(draw(0, 5, 1), other) for other in others)
    assert micro_step_seed(0, 5, 1) != micro_step_seed(0, 5, 0) and 0 <= micro_step_seed(0, 5, 1) < 2**64
