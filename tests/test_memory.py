"""Semantic Memory: the vectorised update against a slow literal restatement of the official loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from allspark_seg.models.memory import SemanticMemory, channel_grouping, ring_buffer_slots
from numerics import argmax_margin, check_decisions, decision_bound


def official_enqueue(bank: torch.Tensor, ptr: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor) -> None:
    """The official ``_dequeue_and_enqueue`` for one sample, restated: maps (C, N), classes (C,), in place."""
    length = bank.shape[1]
    for k in torch.unique(classes).tolist():
        idx = torch.nonzero(classes == k).squeeze(-1)
        items = maps[idx]
        n, p = items.shape[0], int(ptr[k])
        if p + n > length:
            bank[k, p:] = items[: length - p]
            bank[k, : p + n - length] = items[length - p :]
            ptr[k] = p + n - length
        else:
            bank[k, p : p + n] = items
            ptr[k] = (p + n) % length


def sequential_fifo(bank: torch.Tensor, ptr: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor) -> None:
    """One item at a time: the FIFO semantics for any number of items (also more than L per class)."""
    length = bank.shape[1]
    for item, k in zip(maps, classes.tolist(), strict=True):
        bank[k, int(ptr[k])] = item
        ptr[k] = (ptr[k] + 1) % length


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_update_equals_official_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    num_classes, channels, n = 5, 16, 9
    memory = SemanticMemory(num_classes, channels, (3, 3))
    ref_bank, ref_ptr = memory.bank.clone(), memory.ptr.clone()
    for _step in range(7):  # several steps wrap every class around the ring
        batch = 3
        maps = torch.randn(batch, channels, n, generator=gen)
        # Skewed class draws so some classes get many channels and some none.
        probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
        classes = torch.multinomial(probs, batch * channels, replacement=True, generator=gen).view(batch, channels)
        for b in range(batch):  # official: samples in batch order
            official_enqueue(ref_bank, ref_ptr, maps[b], classes[b])
        memory.enqueue(maps.reshape(-1, n), classes.reshape(-1))
        assert torch.equal(memory.ptr, ref_ptr)
        assert torch.equal(memory.bank, ref_bank)


def test_wrap_around_order_by_hand():
    memory = SemanticMemory(num_classes=2, length=4, grid=(1, 1), init="zeros")
    memory.ptr[0] = 3
    maps = torch.arange(1.0, 7.0).view(6, 1)  # six items, values 1..6
    classes = torch.tensor([0, 0, 1, 0, 1, 0])
    memory.enqueue(maps, classes)
    # class 0 gets items 1, 2, 4, 6 written at slots 3, 0, 1, 2; class 1 gets 3, 5 at slots 0, 1.
    assert memory.bank[0, :, 0].tolist() == [2.0, 4.0, 6.0, 1.0]
    assert memory.bank[1, :, 0].tolist() == [3.0, 5.0, 0.0, 0.0]
    assert memory.ptr.tolist() == [3, 2]
    assert memory.filled.tolist() == [[True] * 4, [True, True, False, False]]


@pytest.mark.parametrize("seed", range(4))
def test_more_items_than_slots_keeps_the_last_ones(seed):
    gen = torch.Generator().manual_seed(seed)
    memory = SemanticMemory(num_classes=3, length=5, grid=(2, 2))
    ref_bank, ref_ptr = memory.bank.clone(), memory.ptr.clone()
    for _ in range(3):
        maps = torch.randn(40, 4, generator=gen)
        classes = torch.randint(0, 3, (40,), generator=gen)
        sequential_fifo(ref_bank, ref_ptr, maps, classes)
        memory.enqueue(maps, classes)
        assert torch.equal(memory.bank, ref_bank)
        assert torch.equal(memory.ptr, ref_ptr)


def test_ring_buffer_slots_sources_are_final_writers():
    classes = torch.tensor([1, 1, 1, 1, 1, 0])
    cls, slot, src, new_ptr = ring_buffer_slots(classes, torch.tensor([0, 1]), length=2)
    # class 1 items (ranks 0..4) at slots 1,0,1,0,1: the last writers are items 3 (slot 0) and 4 (slot 1).
    pairs = {(int(c), int(s)): int(i) for c, s, i in zip(cls, slot, src, strict=True)}
    assert pairs == {(0, 0): 5, (1, 1): 4, (1, 0): 3}
    assert new_ptr.tolist() == [1, 0]


def test_update_needs_no_host_synchronisation():
    """On the meta device any .item(), .cpu(), nonzero or data-dependent shape would raise."""
    memory = SemanticMemory(num_classes=81, length=512, grid=(17, 17)).to("meta")
    maps = torch.empty(4 * 512, 289, device="meta")
    classes = torch.empty(4 * 512, dtype=torch.long, device="meta")
    memory.enqueue(maps, classes)
    assert memory.bank.shape == (81, 512, 289)


def official_similarity(emb_u: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """The official CSG's cosine similarities ``(B, K, C)``: square grid from sqrt(N), bilinear resize, cosine (its
    argmax over classes is the channel's class)."""
    n = emb_u.shape[1]
    side = int(math.sqrt(n))
    prob = F.interpolate(prob, size=(side, side), mode="bilinear", align_corners=False).flatten(2)
    return torch.matmul(F.normalize(prob, dim=-1), F.normalize(emb_u, dim=1))


def check_grouping(what: str, got: torch.Tensor, sim32: torch.Tensor, sim64: torch.Tensor) -> None:
    """float32 channel classes against the float64 argmax: equal except on near-ties (``numerics``)."""
    bound = decision_bound(sim32, sim64, terms=2)
    check_decisions(what, got, sim64.argmax(dim=1), argmax_margin(sim64), bound)


def test_channel_grouping_matches_official_on_square_grids():
    torch.manual_seed(0)
    emb_u = torch.randn(2, 16, 24)
    guide = torch.randn(2, 5, 64, 64)
    emb64, guide64 = emb_u.double(), guide.double()
    sim64 = official_similarity(emb64, guide64)
    assert torch.equal(channel_grouping(emb64, guide64, (4, 4)), sim64.argmax(dim=1))
    check_grouping("square grid", channel_grouping(emb_u, guide, (4, 4)), official_similarity(emb_u, guide), sim64)


def manual_similarity(emb_u: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``(B, K, C)`` of the class maps ``(B, K, h, w)`` and the channel maps ``(B, h * w, C)``."""
    return F.normalize(maps.flatten(2), dim=-1) @ F.normalize(emb_u, dim=1)


def test_channel_grouping_non_square_and_probabilities():
    torch.manual_seed(0)
    emb_u = torch.randn(2, 6, 12)  # grid 2 x 3
    guide = torch.randn(2, 4, 8, 12)

    def probs_maps(g: torch.Tensor) -> torch.Tensor:
        return F.interpolate(g.softmax(1), size=(2, 3), mode="bilinear", align_corners=False)

    def area_maps(g: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(g, (2, 3))

    for what, options, maps in (
        ("probabilities", {"use_probs": True}, probs_maps),
        ("area", {"resize": "area"}, area_maps),
    ):
        got64 = channel_grouping(emb_u.double(), guide.double(), (2, 3), **options)
        sim64 = manual_similarity(emb_u.double(), maps(guide.double()))
        assert got64.shape == (2, 12) and torch.equal(got64, sim64.argmax(dim=1))
        got = channel_grouping(emb_u, guide, (2, 3), **options)
        check_grouping(what, got, manual_similarity(emb_u, maps(guide)), sim64)


def test_memory_buffers_are_saved_and_restored():
    memory = SemanticMemory(num_classes=3, length=4, grid=(2, 2), init="zeros")
    memory.enqueue(torch.randn(5, 4), torch.tensor([0, 0, 2, 1, 0]))
    state = memory.state_dict()
    assert set(state) == {"bank", "ptr", "filled"}
    other = SemanticMemory(num_classes=3, length=4, grid=(2, 2), init="zeros")
    other.load_state_dict(state)
    assert torch.equal(other.bank, memory.bank) and torch.equal(other.ptr, memory.ptr)
    assert torch.equal(other.filled, memory.filled)
