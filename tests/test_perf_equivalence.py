"""The performance rewrites compute what the literal code computes: outputs and gradients within 1e-12 relative in
float64; in float32, each of the two against the literal code in float64 (with the decisions of the float32 run),
ours within 4 x the literal code's own float32 error (``numerics``: a bound that holds on every CPU).

- SegFormer head with the fuse convolution folded into the per-stage projections, channels-last rows and the
  row batch norm, against the official head (``official_reference.SegFormerHead``) with the same weights;
- psi as a per-sample query scale from Gram matrices (:func:`psi_scale`) against the variance of the materialised
  logits, including inputs with a large mean (no cancellation);
- the row-blocked attention (:func:`blocked_attention`) against the materialised softmax attention, over several
  blocks, with a column mask, with dropout (float64 gradcheck, reproducibility, keep rate);
- the AllSpark cross-attention's fused path against its materialised path;
- a whole model (several attention blocks, head width 256) against the literal official model: training logits
  with the memory read, every gradient, the memory and the state after SGD steps.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import allspark_seg.models.attention as attention_module
import official_reference as R
from allspark_seg import build_model
from allspark_seg.interop import FAITHFUL_OPTIONS, to_official_state_dict
from allspark_seg.models.allspark import ChannelCrossAttention
from allspark_seg.models.attention import blocked_attention, psi_scale
from allspark_seg.models.head import SegFormerHead, folded_projections
from allspark_seg.models.layers import standardize
from conftest import no_dropout
from numerics import Errors, check32, check32_group, check_relu_decisions, our_relu_inputs, print_table, relu_inputs
from test_parity_official import compare_float32_steps, gradient_differences, official_step, our_step, rel

TOL = {torch.float64: 1e-12}  # float32: against float64, see numerics
DIMS = (16, 32, 64, 128)


@pytest.fixture(scope="module")
def float32_table() -> Iterator[dict[str, Errors | tuple[int, int]]]:
    """float32 errors against float64 (ours and the reference code's own), printed at the end (``pytest -s``)."""
    table: dict[str, Errors | tuple[int, int]] = {}
    yield table
    print_table("float32 against float64: performance rewrites", table)


def head_pair(dtype: torch.dtype, num_classes: int = 7, width: int = 96) -> tuple[SegFormerHead, R.SegFormerHead]:
    torch.manual_seed(0)
    ours = SegFormerHead(DIMS, num_classes, embed_dim=width, dropout=0.0)
    ref = R.SegFormerHead(width, DIMS, num_classes)
    ref.dropout.p = 0.0
    with torch.no_grad():  # non-trivial batch-norm affine parameters and statistics
        ours.linear_fuse.bn.weight.uniform_(0.5, 1.5)
        ours.linear_fuse.bn.bias.normal_()
        ours.linear_fuse.bn.running_var.uniform_(0.5, 2.0)
    ref.load_state_dict(ours.state_dict())
    return ours.to(dtype), ref.to(dtype)


def stage_maps(dtype: torch.dtype, batch: int = 3, size: int = 33) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    sizes = [size]
    for _ in range(3):
        sizes.append((sizes[-1] + 1) // 2)
    return [
        (torch.randn(batch, c, s, s, generator=gen, dtype=dtype) + 0.5).requires_grad_()
        for c, s in zip(DIMS, sizes, strict=True)
    ]


def head_setup(dtype: torch.dtype, training: bool) -> tuple[SegFormerHead, R.SegFormerHead, list[torch.Tensor]]:
    """The head pair in training or eval mode, and stage maps (eval: running statistics of these maps)."""
    ours, ref = head_pair(dtype)
    feats = stage_maps(dtype)
    if not training:  # running statistics of this batch, so pre-activations are O(1) rather than off-scale
        ours.linear_fuse.bn.momentum = 1.0
        with torch.no_grad():
            ours([f.detach() for f in feats])
        ref.load_state_dict(ours.state_dict())
    ours.train(training)
    ref.train(training)
    return ours, ref, feats


def vanishing_head_gradient(name: str, training: bool) -> bool:
    """A per-channel constant before a training-mode batch norm: the exact gradient is 0."""
    return training and name.startswith("linear_c") and name.endswith(".bias")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_folded_head_matches_the_official_head_in_float64(training):
    dtype = torch.float64
    ours, ref, feats = head_setup(dtype, training)
    ref_feats = [f.detach().clone().requires_grad_() for f in feats]
    out, expected = ours(feats), ref(*ref_feats)
    assert out.is_contiguous() and out.shape == expected.shape == (3, 7, 33, 33)
    assert rel(out, expected) < TOL[dtype]
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for f, g in zip(feats, ref_feats, strict=True):
        assert rel(f.grad, g.grad) < TOL[dtype]
    ref_params = dict(ref.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in ref.parameters())
    for name, p in ours.named_parameters():
        other = ref_params[name].grad
        if vanishing_head_gradient(name, training):
            assert float((p.grad - other).abs().max()) < TOL[dtype] * scale, name
        else:
            assert rel(p.grad, other) < TOL[dtype], name
    for key, value in ref.state_dict().items():  # running statistics and the batch counter
        mine = ours.state_dict()[key]
        assert torch.equal(mine, value) if not value.is_floating_point() else rel(mine, value) < TOL[dtype], key


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_folded_head_matches_the_official_head_in_float32(training, float32_table):
    """Ours and the official head in float32, each against a float64 twin of the official head that takes its ReLU
    decisions (``numerics``); 3 x 96 x 33 x 33 ReLU inputs, so one may be within rounding of 0."""
    ours, ref, feats = head_setup(torch.float32, training)
    twin_ours, twin_lit = copy.deepcopy(ref).double(), copy.deepcopy(ref).double()
    dtypes = (torch.float32, torch.float64, torch.float64)  # the reference code and its two float64 twins
    inputs = [[f.detach().to(dtype).requires_grad_() for f in feats] for dtype in dtypes]
    with our_relu_inputs() as relu_ours:
        out = ours(feats)
    with relu_inputs(ref) as relu_lit:
        expected = ref(*inputs[0])
    with relu_inputs(twin_ours, [relu_ours[0] > 0]) as relu64_ours:
        out64 = twin_ours(*inputs[1])
    with relu_inputs(twin_lit, [relu_lit[0] > 0]) as relu64_lit:
        expected64 = twin_lit(*inputs[2])
    assert out.is_contiguous() and out.shape == expected.shape == (3, 7, 33, 33)
    flips = check_relu_decisions("head ReLU", relu_ours[0], relu_lit[0], relu64_ours[0], relu64_lit[0])
    what = f"head ({'train' if training else 'eval'})"
    float32_table[f"{what}: ReLU signs flipped (ours, reference)"] = flips
    check32(f"{what}: logits", out, expected, out64, expected64, table=float32_table)
    grad = torch.randn_like(out)
    for y in (out, expected, out64, expected64):
        y.backward(grad.to(y.dtype))
    grads = ([f.grad for f in x] for x in [feats, *inputs])
    check32_group(f"{what}: input gradients", *grads, table=float32_table)
    params = [dict(m.named_parameters()) for m in (ours, ref, twin_ours, twin_lit)]
    scale = max(float(p.grad.norm()) for p in twin_ours.parameters())
    for vanishing in (False, True):
        names = [n for n in params[0] if vanishing_head_gradient(n, training) == vanishing]
        if vanishing:
            assert all(float(params[2][n].grad.norm()) < 1e-12 * scale for n in names)
        tensors = ([p[n].grad for n in names] for p in params)
        label = f"{what}: gradients (exactly 0)" if vanishing else f"{what}: gradients"
        if names:
            check32_group(label, *tensors, names=names, scale=scale if vanishing else None, table=float32_table)
    states = [m.state_dict() for m in (ours, ref, twin_ours, twin_lit)]
    floats = [k for k, v in states[0].items() if v.is_floating_point()]
    tensors = ([state[k] for k in floats] for state in states)
    check32_group(f"{what}: running statistics", *tensors, names=floats, table=float32_table)
    for key, value in states[0].items():  # the batch counter
        if not value.is_floating_point():
            assert torch.equal(value, states[1][key]) and torch.equal(value, states[2][key]), key


def test_folded_head_accepts_channels_last_maps_and_momentum_none(float32_table):
    ours, ref = head_pair(torch.float32)
    ref64 = copy.deepcopy(ref).double()
    for m in (ours, ref, ref64):
        m.linear_fuse.bn.momentum = None
    feats = [f.detach().contiguous(memory_format=torch.channels_last) for f in stage_maps(torch.float32)]
    for _ in range(2):  # cumulative average over two batches
        out, expected, expected64 = ours(feats), ref(*feats), ref64(*[f.double() for f in feats])
    assert int(ours.linear_fuse.bn.num_batches_tracked) == 2
    check32("channels-last head: logits", out, expected, expected64, table=float32_table)
    for name in ("running_mean", "running_var"):
        a, b, c = (getattr(m.linear_fuse.bn, name) for m in (ours, ref, ref64))
        check32("channels-last head: running statistics", a, b, c, table=float32_table)


def test_folded_projections_are_the_fuse_weight_slices_times_the_projections():
    ours, _ = head_pair(torch.float64)
    weights, bias = folded_projections(ours)
    fuse = ours.linear_fuse.conv.weight.flatten(1)
    width = 96
    for i, w in enumerate(weights, start=1):
        block = fuse[:, (4 - i) * width : (5 - i) * width]  # concatenation order c4, c3, c2, c1
        proj = getattr(ours, f"linear_c{i}").proj
        torch.testing.assert_close(w, block @ proj.weight, rtol=0, atol=1e-14)
    expected = sum(
        fuse[:, (4 - i) * width : (5 - i) * width] @ getattr(ours, f"linear_c{i}").proj.bias for i in (1, 2, 3, 4)
    )
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------------
# psi as a scale, and the blocked attention
# ---------------------------------------------------------------------------------------------------------------------
def materialised_psi_var(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The variance of the materialised logits ``(B, D, S)`` (in the inputs' dtype)."""
    logits = q.transpose(1, 2) @ k
    if mask is None:
        return logits.var(dim=(1, 2), unbiased=False)
    cols = logits[..., mask]
    return cols.reshape(cols.shape[0], -1).var(dim=1, unbiased=False)


@pytest.mark.parametrize("offset", [0.0, 30.0], ids=["centred", "large-mean"])
def test_psi_scale_matches_the_variance_of_the_logits(offset, float32_table):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 25, 48, generator=gen) + offset
    k = torch.randn(25, 300, generator=gen) * 2 + offset
    expected = torch.rsqrt(materialised_psi_var(q.double(), k.double()) + 1e-5)
    literal = torch.rsqrt(materialised_psi_var(q, k) + 1e-5)
    # float32 Gram matrices, no E[A^2] - E[A]^2 cancellation: as precise as the materialised variance in float32
    check32(f"psi scale, offset {offset:g}", psi_scale(q, k), literal, expected, table=float32_table)
    assert rel(psi_scale(q.double(), k.double()), expected) < 1e-13
    mask = torch.rand(300, generator=gen) > 0.4
    expected_masked = torch.rsqrt(materialised_psi_var(q.double(), k.double(), mask) + 1e-5)
    assert rel(psi_scale(q.double(), k.double(), mask), expected_masked) < 1e-13


def materialised_attention(q, k, v, bias=None):
    logits = q @ k if bias is None else q @ k + bias
    return logits.softmax(dim=-1) @ v.T


def attention_inputs(dtype: torch.dtype, masked: bool) -> tuple[torch.Tensor, ...]:
    """``q (40, 9), k, v (9, 500)``, a column mask or ``None``, an output gradient: the same values in any dtype."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(*shape, generator=gen) for shape in ((40, 9), (9, 500), (9, 500)))
    q, k, v = (x.to(dtype).requires_grad_() for x in (q * 2, k, v))
    bias = None
    if masked:
        bias = torch.zeros(500, dtype=dtype).masked_fill(torch.arange(500) % 3 == 0, float("-inf"))
    return q, k, v, bias, torch.randn(40, 9, generator=gen).to(dtype)


@pytest.mark.parametrize("masked", [False, True], ids=["all-columns", "masked-columns"])
def test_blocked_attention_matches_the_materialised_attention_in_float64(monkeypatch, masked):
    monkeypatch.setattr(attention_module, "BLOCK_ELEMENTS", 7 * 500)  # 7 rows per block: 6 blocks of 40 rows
    q, k, v, bias, grad = attention_inputs(torch.float64, masked)
    out = blocked_attention(q, k, v, bias)
    expected = materialised_attention(q, k, v, bias)
    assert rel(out, expected) < TOL[torch.float64]
    ours = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(ours, ref, strict=True):
        assert rel(a, b) < TOL[torch.float64]


@pytest.mark.parametrize("masked", [False, True], ids=["all-columns", "masked-columns"])
def test_blocked_attention_matches_the_materialised_attention_in_float32(monkeypatch, masked, float32_table):
    monkeypatch.setattr(attention_module, "BLOCK_ELEMENTS", 7 * 500)
    q, k, v, bias, grad = attention_inputs(torch.float32, masked)
    q64, k64, v64, bias64, grad64 = attention_inputs(torch.float64, masked)
    out = blocked_attention(q, k, v, bias)
    literal = materialised_attention(q, k, v, bias)
    expected = materialised_attention(q64, k64, v64, bias64)
    check32("blocked attention: output", out, literal, expected, table=float32_table)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    lit = torch.autograd.grad(literal, (q, k, v), grad)
    ref = torch.autograd.grad(expected, (q64, k64, v64), grad64)
    for a, b, c in zip(ours, lit, ref, strict=True):
        check32("blocked attention: gradients", a, b, c, table=float32_table)


def test_blocked_attention_dropout(monkeypatch):
    monkeypatch.setattr(attention_module, "BLOCK_ELEMENTS", 3 * 7)  # blocks of 3 rows
    gen = torch.Generator().manual_seed(4)
    q, k, v = (
        torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in ((8, 5), (5, 7), (5, 7))
    )

    def run(q, k, v):
        torch.manual_seed(5)
        return blocked_attention(q, k, v, None, 0.3)

    assert torch.autograd.gradcheck(run, (q, k, v))  # the backward uses the forward's mask
    assert torch.equal(run(q, k, v), run(q, k, v))  # reproducible from the seed
    # keep rate and inverted scaling: with constant values every output is (kept weight) / 0.7
    ones = torch.ones(5, 20000, dtype=torch.float64)
    torch.manual_seed(6)
    out = blocked_attention(torch.zeros(8, 5, dtype=torch.float64), ones, ones, None, 0.3)
    kept = out * 0.7  # the fraction of uniform weights 1/S that survived, per row
    assert abs(float(kept.mean()) - 0.7) < 0.005


def test_blocked_attention_keeps_half_precision_inputs_in_their_dtype(float32_table):
    q = torch.randn(6, 4, dtype=torch.bfloat16)
    k, v = torch.randn(4, 10, dtype=torch.bfloat16), torch.randn(4, 10, dtype=torch.bfloat16)
    out = blocked_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    expected = materialised_attention(q.double(), k.double(), v.double())
    literal = materialised_attention(q, k, v)
    check32("blocked attention: bfloat16 output", out, literal, expected, floor_ulps=1, table=float32_table)


def cross_attention_paths(attn: ChannelCrossAttention, z_l: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The fused path (keys shared by the batch), the materialised path (keys expanded per sample) and the literal
    psi (standardise, softmax, attend); outputs and input gradients of the sum."""
    with torch.no_grad():
        keys, values, _ = attn._memory_keys_values()  # (N, K * 2C) shared keys: the fused path
    z = [z_l.detach().clone().requires_grad_() for _ in range(2)]
    fused = attn.cross_attention(z[0], keys, values)
    per_sample = attn.cross_attention(z[1], keys.expand(2, -1, -1), values.expand(2, -1, -1))  # materialised
    fused.sum().backward()
    per_sample.sum().backward()
    with torch.no_grad():
        q = attn.q_l2u(z_l).transpose(1, 2)
        literal = attn.out_l2u((standardize(q @ keys).softmax(-1) @ values.T).transpose(1, 2))
    return fused.detach(), per_sample.detach(), literal, z[0].grad, z[1].grad


def test_fused_cross_attention_matches_the_materialised_path_in_float64(monkeypatch):
    monkeypatch.setattr(attention_module, "BLOCK_ELEMENTS", 2**12)  # several blocks
    torch.manual_seed(7)
    attn = no_dropout(ChannelCrossAttention(32, 2, num_classes=5, grid=(3, 3))).double()
    fused, per_sample, literal, grad_fused, grad_per_sample = cross_attention_paths(
        attn, torch.randn(2, 9, 32, dtype=torch.float64)
    )
    assert rel(fused, per_sample) < TOL[torch.float64]
    assert rel(grad_fused, grad_per_sample) < TOL[torch.float64]
    assert rel(per_sample, literal) < TOL[torch.float64]  # and the materialised path is the literal psi


def test_fused_cross_attention_matches_the_materialised_path_in_float32(monkeypatch, float32_table):
    monkeypatch.setattr(attention_module, "BLOCK_ELEMENTS", 2**12)
    torch.manual_seed(7)
    attn = no_dropout(ChannelCrossAttention(32, 2, num_classes=5, grid=(3, 3)))
    z_l = torch.randn(2, 9, 32)
    fused, per_sample, literal, grad_fused, grad_per_sample = cross_attention_paths(attn, z_l)
    _, per_sample64, literal64, _, grad64 = cross_attention_paths(copy.deepcopy(attn).double(), z_l.double())
    check32("cross attention: fused output", fused, per_sample, per_sample64, table=float32_table)
    check32("cross attention: fused input gradient", grad_fused, grad_per_sample, grad64, table=float32_table)
    # and the materialised path is the literal psi
    check32("cross attention: materialised output", per_sample, literal, literal64, table=float32_table)


# ---------------------------------------------------------------------------------------------------------------------
# A whole model against the literal official one (wider than the parity tests: several attention blocks)
# ---------------------------------------------------------------------------------------------------------------------
def whole_model_pair(dtype: torch.dtype) -> tuple[nn.Module, R.ModelBuilder]:
    torch.manual_seed(8)
    encoder = {"embed_dims": DIMS, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)}
    options = {**FAITHFUL_OPTIONS, "encoder_options": encoder}
    ours = no_dropout(build_model("mit_b0", num_classes=6, crop_size=65, head_dim=256, drop_path=0.0, **options))
    ref = R.build_official_model(
        6,
        embed_dims=DIMS,
        depths=(1, 1, 1, 1),
        mit_heads=(1, 2, 4, 8),
        drop_path_rate=0.0,
        image_size=65,
        warmup_epoch=0,
        embedding_dim=256,
    )
    ref.load_state_dict(to_official_state_dict(ours))
    return ours.to(dtype), no_dropout(ref).to(dtype)


def whole_model_batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    gen = torch.Generator().manual_seed(9)
    batches = []
    for _ in range(2):
        x_l, x_u = torch.randn(2, 3, 65, 65, generator=gen), torch.randn(2, 3, 65, 65, generator=gen)
        y_l = torch.randint(0, 6, (2, 65, 65), generator=gen)
        batches.append((x_l.to(dtype), x_u.to(dtype), y_l, 0))
    return batches


def test_whole_model_matches_the_literal_model_with_memory_read_in_float64(monkeypatch):
    monkeypatch.setattr(attention_module, "BLOCK_ELEMENTS", 2**15)  # 2 * 256 query rows against 6 * 256 keys
    ours, ref = whole_model_pair(torch.float64)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    tol = TOL[torch.float64]
    for x_l, x_u, y_l, epoch in whole_model_batches(torch.float64):
        t_ref, l_ref, u_ref = official_step(ref, x_l, x_u, y_l, epoch=epoch)
        t_ours, l_ours, u_ours = our_step(ours, x_l, x_u, y_l, use_memory=True)
        assert torch.equal(t_ours.argmax(dim=1), t_ref.argmax(dim=1))  # the same pseudo-labels
        assert rel(t_ours, t_ref) < tol
        assert rel(l_ours, l_ref) < tol and rel(u_ours, u_ref) < tol
        assert max(gradient_differences(ours, ref).values()) < tol
        assert torch.equal(ours.allspark.memory.ptr, ref.decoder.allspark.attn.queue_ptr)
        assert rel(ours.allspark.memory.bank, ref.decoder.allspark.attn.kv_queue) < tol
        opt_ours.step()
        opt_ref.step()
    official = to_official_state_dict(ours)
    for key, value in ref.state_dict().items():
        assert torch.equal(official[key], value) if not value.is_floating_point() else rel(official[key], value) < tol


def test_whole_model_matches_the_literal_model_with_memory_read_in_float32(monkeypatch, float32_table):
    """Each float32 run against a float64 twin of the literal model with its decisions (``numerics``): holds on
    every CPU, including where a ReLU input within rounding of 0 gets the other sign in one of the two."""
    monkeypatch.setattr(attention_module, "BLOCK_ELEMENTS", 2**15)
    ours, ref = whole_model_pair(torch.float32)
    table: dict[str, Errors] = {}
    flips = compare_float32_steps(ours, ref, whole_model_batches(torch.float32), warmup_epoch=0, table=table)
    float32_table.update({f"whole model: {k}": v for k, v in table.items()})
    float32_table.update({f"whole model: {k} flipped (ours, reference)": tuple(v) for k, v in flips.items()})


# ---------------------------------------------------------------------------------------------------------------------
# The memory update: strided (B, C, N) views, with and without ring overflow, against the official loop
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("length", "classes"), [(48, 5), (16, 2)], ids=["no-overflow", "overflow"])
def test_enqueue_of_transposed_tokens_matches_the_official_loop(length, classes):
    """3 samples x 16 channels per update. With L = 16 and 2 classes, a class receives more than L maps in one
    update (our general path, keeping the last L); the official loop, one sample at a time, stays valid (it needs
    at most L maps per class and sample)."""
    from allspark_seg.models import SemanticMemory

    gen = torch.Generator().manual_seed(10)
    official = R.CrossAttnMem(1, 16, 0.0, classes, 9)
    official.SMem_size = length
    official.kv_queue = torch.randn(classes, length, 9, generator=gen)
    ours = SemanticMemory(classes, length, (3, 3))
    ours.bank.copy_(official.kv_queue)
    overflowed = False
    for _ in range(3):
        tokens = torch.randn(3, 9, 16, generator=gen)  # (B, N, C): each sample's 16 channel maps of 9 positions
        labels = torch.randint(0, classes, (3, 16), generator=gen)
        overflowed |= int(torch.bincount(labels.reshape(-1), minlength=classes).max()) > length
        for b in range(3):
            official._dequeue_and_enqueue(tokens[b], labels[b])
        ours.enqueue(tokens.transpose(1, 2), labels)
        assert torch.equal(ours.ptr, official.queue_ptr)
        assert torch.equal(ours.bank, official.kv_queue)
    assert overflowed == (length == 16)
