"""Pseudo-label counts without host synchronisation: fixed shapes, equal to the boolean-indexing formula."""

from __future__ import annotations

import pytest
import torch

from allspark_seg.engine.diagnostics import pseudo_label_counts

K = 5


def counts_by_indexing(pseudo, confidence, num_classes, target=None):
    """The straightforward formula (boolean indexing and bincount: data-dependent shapes, a sync on CUDA)."""
    kept = pseudo != 255
    labels = pseudo[kept]
    counts = {
        "count": torch.bincount(labels, minlength=num_classes)[:num_classes].float(),
        "conf_sum": torch.zeros(num_classes).index_add_(0, labels, confidence[kept].float()),
        "kept": kept.sum().float(),
        "pixels": torch.tensor(float(pseudo.numel())),
    }
    if target is not None:
        checked = kept & (target != 255)
        counts["correct"] = (pseudo[checked] == target[checked]).sum().float()
        counts["checked"] = checked.sum().float()
    return counts


def random_batch(seed: int, shape=(3, 17, 19)):
    gen = torch.Generator().manual_seed(seed)
    pseudo = torch.randint(0, K, shape, generator=gen)
    pseudo[torch.rand(shape, generator=gen) < 0.3] = 255
    confidence = torch.rand(shape, generator=gen)
    target = torch.randint(0, K, shape, generator=gen)
    target[torch.rand(shape, generator=gen) < 0.2] = 255
    return pseudo, confidence, target


@pytest.mark.parametrize("seed", range(4))
def test_counts_equal_the_indexing_formula(seed):
    pseudo, confidence, target = random_batch(seed)
    for tgt in (target, None):
        got = pseudo_label_counts(pseudo, confidence, K, tgt)
        expected = counts_by_indexing(pseudo, confidence, K, tgt)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key].dtype == value.dtype, key
            if key == "conf_sum":  # float32 sums, maybe in another order: both within n * eps * sum of the exact sum
                exact = torch.zeros(K, dtype=torch.float64).index_add_(
                    0, pseudo[pseudo != 255], confidence[pseudo != 255].double()
                )
                bound = expected["count"].double() * torch.finfo(torch.float32).eps * exact
                assert ((value.double() - exact).abs() <= bound).all()
                assert ((got[key].double() - exact).abs() <= bound).all()
            else:
                assert torch.equal(got[key], value), key
    nothing_kept = torch.full_like(pseudo, 255)
    got = pseudo_label_counts(nothing_kept, confidence, K, target)
    assert torch.equal(got["count"], torch.zeros(K)) and float(got["kept"]) == 0 and float(got["checked"]) == 0


def test_counts_have_data_independent_shapes():
    """On the meta device (no values), every output has a fixed shape: no boolean indexing, nonzero or bincount,
    which on CUDA would read the data on the host at every micro-step."""
    pseudo = torch.empty(2, 8, 8, dtype=torch.long, device="meta")
    confidence = torch.empty(2, 8, 8, device="meta")
    counts = pseudo_label_counts(pseudo, confidence, K, pseudo)
    shapes = {key: tuple(value.shape) for key, value in counts.items()}
    assert shapes == {"count": (K,), "conf_sum": (K,), "kept": (), "pixels": (), "correct": (), "checked": ()}
    assert all(value.device.type == "meta" for value in counts.values())
