"""AllSpark block and segmentor: shapes, contracts, gradients, per-image inference, options."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from allspark_seg.models.allspark import ChannelCrossAttention
from allspark_seg.models.layers import standardize
from conftest import no_dropout
from numerics import check32, rel_max

K = 5


def batches(seed: int = 0, b_l: int = 2, b_u: int = 2, size: tuple[int, int] = (64, 64)):
    gen = torch.Generator().manual_seed(seed)
    x_l = torch.randn(b_l, 3, *size, generator=gen)
    x_u = torch.randn(b_u, 3, *size, generator=gen)
    guide = torch.randn(b_u, K, *size, generator=gen)
    return x_l, x_u, guide


def test_standardize_equals_instance_norm():
    x = torch.randn(2, 3, 7, 11, dtype=torch.float64)
    torch.testing.assert_close(standardize(x), nn.InstanceNorm2d(3).double()(x), rtol=1e-10, atol=1e-10)


def test_eval_forward_contract(model_factory):
    model = model_factory().eval()
    out = model(torch.randn(3, 3, 64, 96))
    assert out.shape == (3, K, 64, 96)
    with pytest.raises(ValueError, match="eval mode"):
        model(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(("b_l", "b_u"), [(2, 2), (3, 1), (1, 4)])
def test_training_forward_any_batch_sizes(model_factory, b_l, b_u):
    model = model_factory().train()
    x_l, x_u, guide = batches(b_l=b_l, b_u=b_u)
    logits_l, logits_u = model(x_l, x_u, guide_logits=guide, use_memory=False)
    assert logits_l.shape == (b_l, K, 64, 64) and logits_u.shape == (b_u, K, 64, 64)
    assert int(model.allspark.memory.ptr.sum()) == b_u * 64  # every unlabeled channel was enqueued
    logits_l, logits_u = model(x_l, x_u, guide_logits=guide, use_memory=True)
    assert torch.isfinite(logits_l).all() and torch.isfinite(logits_u).all()


def test_supervised_training_forward(model_factory):
    model = model_factory().train()
    logits, none = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, K, 64, 64) and none is None


def test_training_input_validation(model_factory):
    model = model_factory().train()
    x_l, x_u, guide = batches()
    with pytest.raises(ValueError, match="height and width"):
        model(x_l, torch.randn(2, 3, 64, 96))
    with pytest.raises(ValueError, match="guide_logits must be"):
        model(x_l, x_u, guide_logits=guide[:1])
    with pytest.raises(ValueError, match="need unlabeled images"):
        model(x_l, guide_logits=guide)
    plain = model_factory(allspark=False).train()
    with pytest.raises(ValueError, match="no AllSpark"):
        plain(x_l, x_u, use_memory=True)


def test_memory_grid_mismatch_is_a_clear_error(model_factory):
    model = model_factory(crop_size=64).train()
    x_l, x_u, guide = batches(size=(96, 96))
    with pytest.raises(ValueError, match="training crop size"):
        model(x_l, x_u, guide_logits=guide)


def test_non_square_crops(model_factory):
    model = model_factory(crop_size=(64, 96)).train()
    assert model.allspark.memory.grid == (2, 3)
    x_l, x_u, guide = batches(size=(64, 96))
    logits_l, _ = model(x_l, x_u, guide_logits=guide, use_memory=True)
    assert logits_l.shape == (2, K, 64, 96)


def grads(model: nn.Module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}


SELF_BRANCH = ("allspark.attn.q_u.", "allspark.attn.k_u.", "allspark.attn.v_u.", "allspark.attn.out_u.")


@pytest.mark.parametrize("use_memory", [False, True])
def test_every_parameter_gets_a_gradient_in_training(model_factory, use_memory):
    model = model_factory().train()
    x_l, x_u, guide = batches()
    logits_l, logits_u = model(x_l, x_u, guide_logits=guide, use_memory=use_memory)
    (logits_l.square().mean() + logits_u.square().mean()).backward()
    missing = [n for n, ok in grads(model).items() if not ok]
    assert missing == []


def test_inference_path_uses_only_the_cross_branch(model_factory):
    model = model_factory().eval()
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    got = grads(model)
    assert not any(got[n] for n in got if n.startswith(SELF_BRANCH))
    assert all(ok for n, ok in got.items() if not n.startswith(SELF_BRANCH))


def test_labeled_output_reaches_unlabeled_features_only_without_memory(model_factory):
    block = no_dropout(model_factory()).allspark.train()
    feat_l, feat_u = torch.randn(2, 64, 2, 2), torch.randn(2, 64, 2, 2, requires_grad=True)
    guide = torch.randn(2, K, 64, 64)
    out_l, _ = block(feat_l, feat_u, guide_logits=guide, use_memory=False)
    (g,) = torch.autograd.grad(out_l.sum(), feat_u)
    assert g.abs().sum() > 0
    out_l, _ = block(feat_l, feat_u, guide_logits=guide, use_memory=True)
    (g,) = torch.autograd.grad(out_l.sum(), feat_u, allow_unused=True)
    assert g is None or g.abs().max() == 0  # memory keys are detached: labeled output ignores unlabeled features


def test_per_image_eval_does_not_depend_on_batch_partners(model_factory):
    """In float64 exactly; in float32 (batches of 2 round differently from batches of 1) within 4 x the float32
    error of the image alone, against the image alone in float64 (``numerics``)."""
    model = model_factory().eval()
    model64 = copy.deepcopy(model).double()
    a, b, c = torch.randn(3, 1, 3, 64, 64).unbind(0)
    with torch.no_grad():
        alone, alone64 = model(a), model64(a.double())
        for partner in (b, c):
            check32("with a partner", model(torch.cat([a, partner]))[:1], alone, alone64)
            with_partner = model64(torch.cat([a, partner]).double())[:1]
            assert rel_max(with_partner, alone64) < 1e-12
        # The official batch-coupled behaviour stays available and does depend on the partner...
        coupled_b = model64(torch.cat([a, b]).double(), coupled=True)[:1]
        coupled_c = model64(torch.cat([a, c]).double(), coupled=True)[:1]
        assert (coupled_b - coupled_c).abs().max() > 1e-4
        # ...and equals per-image inference at batch size 1.
        check32("coupled, batch of 1", model(a, coupled=True), alone, alone64)
        assert rel_max(model64(a.double(), coupled=True), alone64) < 1e-12


def test_broadcast_keys_equal_repeated_keys():
    torch.manual_seed(0)
    attn = no_dropout(ChannelCrossAttention(8, 2, num_classes=3, grid=(2, 3))).double()
    z_l = torch.randn(3, 6, 8, dtype=torch.float64)
    keys, values = torch.randn(6, 40, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64)
    shared = attn.cross_attention(z_l, keys, values)
    repeated = attn.cross_attention(z_l, keys.expand(3, 6, 40).clone(), values.expand(3, 6, 40).clone())
    torch.testing.assert_close(shared, repeated, rtol=1e-12, atol=1e-12)


def test_memory_length_is_free(model_factory):
    model = model_factory(memory_length=16).train()
    assert model.allspark.memory.bank.shape == (K, 16, 4)
    assert model.allspark.attn.k_mem.in_features == 16
    x_l, x_u, guide = batches()
    model(x_l, x_u, guide_logits=guide)
    logits_l, _ = model(x_l, x_u, guide_logits=guide, use_memory=True)
    logits_l.sum().backward()
    assert model.allspark.attn.k_mem.weight.grad is not None
    assert torch.equal(model.allspark.memory.ptr, model.allspark.memory.ptr % 16)


def test_zero_initialised_memory_masks_empty_classes():
    torch.manual_seed(0)
    attn = no_dropout(ChannelCrossAttention(8, 2, num_classes=3, grid=(2, 2), memory_init="zeros"))
    attn.memory.enqueue(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))  # only class 0 gets slots
    keys, values, mask = attn._memory_keys_values()
    assert mask.tolist() == [True] * 16 + [False] * 32
    captured = []
    attn.attn_dropout.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    attn(torch.randn(2, 4, 8), torch.randn(2, 4, 8), use_memory=True)
    weights = captured[0]  # cross-attention weights (B_l, 2C, K * 2C)
    assert weights[..., 16:].abs().max() == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 16))


def test_guide_probabilities_option_changes_grouping(model_factory):
    a = model_factory(grouping="logits").train()
    b = model_factory(grouping="probs").train()
    x_l, x_u, guide = batches()
    a(x_l, x_u, guide_logits=guide * 5)
    b(x_l, x_u, guide_logits=guide * 5)
    assert not torch.equal(a.allspark.memory.ptr, b.allspark.memory.ptr)


def test_dropout_is_done_by_modules(model_factory):
    model = no_dropout(model_factory()).train()
    x_l, x_u, guide = batches()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = model(x_l, x_u, guide_logits=guide)[0]
    model.load_state_dict(state)
    second = model(x_l, x_u, guide_logits=guide)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_state_dict_round_trip_includes_memory(model_factory):
    model = model_factory().train()
    x_l, x_u, guide = batches()
    model(x_l, x_u, guide_logits=guide)
    state = model.state_dict()
    assert {"allspark.attn.memory.bank", "allspark.attn.memory.ptr", "allspark.attn.memory.filled"} <= set(state)
    other = model_factory(seed=1)
    other.load_state_dict(state)
    model.eval(), other.eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    assert torch.equal(other.allspark.memory.bank, model.allspark.memory.bank)


def test_supervised_baseline_has_no_block(model_factory):
    model = model_factory(allspark=False)
    assert model.allspark is None
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, K, 64, 64)
