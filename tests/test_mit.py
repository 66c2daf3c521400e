"""MiT encoder: variants, output strides and shapes for square and non-square inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from allspark_seg.errors import ConfigError
from allspark_seg.models import MIT_VARIANTS, MixVisionTransformer, mit_output_size
from allspark_seg.models.mit import resolve_mit_spec
from conftest import TINY_ENCODER
from numerics import check32, rel_max

# SegFormer paper, Table 6 / NVlabs mix_transformer.py.
PAPER = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_variants_match_the_paper(name):
    spec = MIT_VARIANTS[name]
    assert (spec.embed_dims, spec.depths) == PAPER[name]
    assert spec.num_heads == (1, 2, 5, 8)
    assert spec.sr_ratios == (8, 4, 2, 1)
    assert spec.mlp_ratio == 4 and spec.qkv_bias


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (97, 65), (513, 513), (512, 1024), (801, 801)])
def test_output_size_arithmetic(size):
    h, w = size
    expected, sh, sw = [], h, w
    for stride in (4, 2, 2, 2):
        sh, sw = -(-sh // stride), -(-sw // stride)
        expected.append((sh, sw))
    assert mit_output_size(h, w) == expected


def test_paper_grids():
    assert mit_output_size(513, 513)[-1] == (17, 17)  # N = 289
    assert mit_output_size(801, 801)[-1] == (26, 26)  # N = 676
    assert mit_output_size(512, 512)[-1] == (16, 16)  # where (crop // 32 + 1) ** 2 = 289 is wrong


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (97, 65), (33, 130)])
def test_forward_strides_and_shapes(size):
    torch.manual_seed(0)
    enc = MixVisionTransformer(resolve_mit_spec("mit_b0", **TINY_ENCODER))
    x = torch.randn(2, 3, *size)
    outs = enc(x)
    assert len(outs) == 4
    for out, width, (h, w) in zip(outs, TINY_ENCODER["embed_dims"], mit_output_size(*size), strict=True):
        assert out.shape == (2, width, h, w)
        assert out.is_contiguous()
        assert torch.isfinite(out).all()


def test_layer_norm_eps_is_configurable():
    enc = MixVisionTransformer(resolve_mit_spec("mit_b0", **TINY_ENCODER), layer_norm_eps=1e-5)
    assert enc.norm4.eps == 1e-5 and enc.block1[0].norm1.eps == 1e-5
    assert enc.patch_embed1.norm.eps == 1e-5  # patch-embedding norms use the default in both sources
    default = MixVisionTransformer(resolve_mit_spec("mit_b0", **TINY_ENCODER))
    assert default.norm4.eps == 1e-6 and default.block3[0].norm2.eps == 1e-6


def test_drop_path_rates_increase_linearly():
    enc = MixVisionTransformer(resolve_mit_spec("mit_b0", depths=(2, 2, 2, 2)), drop_path_rate=0.7)
    rates = [blk.drop_path.drop_prob for i in range(1, 5) for blk in getattr(enc, f"block{i}")]
    assert rates == pytest.approx([0.1 * i for i in range(8)])


def manual_attention(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out for block 4 (2 heads of 32, no spatial reduction) on ``x`` ``(2, 6, 64)``."""
    q = attn.q(x).reshape(2, 6, 2, 32).transpose(1, 2)
    k, v = attn.kv(x).reshape(2, 6, 2, 2, 32).permute(2, 0, 3, 1, 4)
    out = ((q @ k.transpose(-2, -1)) * 32**-0.5).softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(2, 6, 64))


def test_attention_matches_manual_softmax_attention():
    torch.manual_seed(0)
    enc = MixVisionTransformer(resolve_mit_spec("mit_b0", **TINY_ENCODER)).eval()
    attn = enc.block4[0].attn  # 2 heads, no spatial reduction
    attn64 = copy.deepcopy(attn).double()
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        assert rel_max(attn64(x.double(), 2, 3), manual_attention(attn64, x.double())) < 1e-13
        check32("MiT attention", attn(x, 2, 3), manual_attention(attn, x), manual_attention(attn64, x.double()))


def test_too_small_input_is_a_clear_error():
    enc = MixVisionTransformer(resolve_mit_spec("mit_b0", **TINY_ENCODER))
    with pytest.raises(ValueError, match="too small"):
        enc(torch.randn(1, 3, 28, 64))


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="mit_b0, mit_b1"):
        resolve_mit_spec("mit_b9")
    with pytest.raises(ConfigError, match="divisible"):
        resolve_mit_spec("mit_b0", embed_dims=(8, 16, 30, 64), num_heads=(1, 1, 4, 2))
