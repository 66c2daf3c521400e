"""Mix Transformer (MiT) encoder of SegFormer (Xie et al., NeurIPS 2021).

Module and parameter names follow the NVlabs reference (``patch_embed1``, ``block1.0.attn.q``, ``norm1``...), so the
ImageNet files ``mit_bX.pth`` that the official AllSpark code loads map onto this encoder without renaming.
Attention runs through ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .layers import DropPath, init_mit_weights

__all__ = ["MIT_VARIANTS", "MiTSpec", "MixVisionTransformer", "mit_output_size"]


@dataclass(frozen=True)
class MiTSpec:
    """Architecture of one MiT variant.

    Attributes:
        embed_dims: Channel width of each of the four stages.
        num_heads: Attention heads per stage.
        depths: Transformer blocks per stage.
        sr_ratios: Spatial-reduction ratio of the keys/values per stage.
        mlp_ratio: Hidden width of the Mix-FFN relative to the stage width.
        qkv_bias: Bias in the query and key/value projections.
    """

    embed_dims: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True


_WIDE = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)
MIT_VARIANTS: dict[str, MiTSpec] = {
    "mit_b0": MiTSpec(embed_dims=(32, 64, 160, 256), num_heads=_HEADS, depths=(2, 2, 2, 2)),
    "mit_b1": MiTSpec(embed_dims=_WIDE, num_heads=_HEADS, depths=(2, 2, 2, 2)),
    "mit_b2": MiTSpec(embed_dims=_WIDE, num_heads=_HEADS, depths=(3, 4, 6, 3)),
    "mit_b3": MiTSpec(embed_dims=_WIDE, num_heads=_HEADS, depths=(3, 4, 18, 3)),
    "mit_b4": MiTSpec(embed_dims=_WIDE, num_heads=_HEADS, depths=(3, 8, 27, 3)),
    "mit_b5": MiTSpec(embed_dims=_WIDE, num_heads=_HEADS, depths=(3, 6, 40, 3)),
}


def resolve_mit_spec(encoder: str | MiTSpec, **overrides: Sequence[int] | float | bool | None) -> MiTSpec:
    """Return the spec of a named variant (or a given spec) with some fields replaced.

    Args:
        encoder: A key of ``MIT_VARIANTS`` or a ``MiTSpec``.
        **overrides: ``MiTSpec`` fields to replace; ``None`` values are ignored.

    Raises:
        ConfigError: Unknown variant name or field.
    """
    if isinstance(encoder, MiTSpec):
        spec = encoder
    elif encoder in MIT_VARIANTS:
        spec = MIT_VARIANTS[encoder]
    else:
        raise ConfigError(f"Unknown encoder '{encoder}': choose one of {', '.join(MIT_VARIANTS)}.")
    fields = {k: (tuple(v) if isinstance(v, Sequence) else v) for k, v in overrides.items() if v is not None}
    unknown = set(fields) - set(MiTSpec.__dataclass_fields__)
    if unknown:
        raise ConfigError(
            f"Unknown MiT option(s) {sorted(unknown)}: valid ones are {list(MiTSpec.__dataclass_fields__)}."
        )
    spec = replace(spec, **fields)
    for name in ("embed_dims", "num_heads", "depths", "sr_ratios"):
        if len(getattr(spec, name)) != 4:
            raise ConfigError(f"MiT option '{name}' needs 4 values (one per stage), got {getattr(spec, name)}.")
    for dim, heads in zip(spec.embed_dims, spec.num_heads, strict=True):
        if dim % heads:
            raise ConfigError(f"MiT stage width {dim} is not divisible by its {heads} attention heads.")
    return spec


def mit_output_size(height: int, width: int) -> list[tuple[int, int]]:
    """Spatial size of the four stage maps for an input of ``height x width``.

    Stage 1 is a stride-4 convolution (kernel 7, padding 3), stages 2-4 stride-2 convolutions (kernel 3, padding 1),
    so the sizes are ceil(s / 4), then ceil(s / 2) three times.
    """
    sizes = []
    h, w = math.ceil(height / 4), math.ceil(width / 4)
    sizes.append((h, w))
    for _ in range(3):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: strided convolution then LayerNorm (eps 1e-5 as in the reference)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Embed ``(B, C_in, H, W)`` into tokens ``(B, h * w, C)``; also returns ``h, w``."""
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys/values are spatially reduced by a strided convolution."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, sr_ratio: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Attend over tokens ``(B, h * w, C)``; returns the same shape."""
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)  # (B, heads, N, d)
        if self.sr_ratio > 1:
            x = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)  # (B, N', C)
            x = self.norm(x)
        kv = self.kv(x).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)  # (2, B, heads, N', d)
        dropout = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=dropout)  # (B, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
    """Mix-FFN: Linear, 3x3 depth-wise convolution, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Tokens ``(B, h * w, C)`` in and out."""
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class DWConv(nn.Module):
    """3x3 depth-wise convolution on tokens (kept as its own module for the reference key names)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Tokens ``(B, h * w, C)`` in and out."""
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block: efficient attention and Mix-FFN, each with a residual and stochastic depth."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, sr_ratio: int, drop_path: float, eps: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EfficientAttention(dim, num_heads, qkv_bias, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Tokens ``(B, h * w, C)`` in and out."""
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixVisionTransformer(nn.Module):
    """The MiT encoder: four stages of overlapping patch embedding, transformer blocks and a LayerNorm.

    Args:
        spec: Widths, heads, depths and reduction ratios (see ``MIT_VARIANTS``).
        in_chans: Input channels.
        drop_path_rate: Stochastic depth rate, increasing linearly over all blocks from 0 to this value.
        layer_norm_eps: eps of the block and stage LayerNorms: 1e-6 in the NVlabs/AllSpark code, 1e-5 in
            Hugging Face's SegFormer. The patch-embedding and spatial-reduction norms use 1e-5 in both.

    Shape:
        ``forward(x)``: ``(B, in_chans, H, W)`` -> four maps ``(B, C_i, ceil(H / s_i), ceil(W / s_i))`` with
        strides ``s_i`` = 4, 8, 16, 32 (see ``mit_output_size``). With the standard reduction ratios inputs
        must be at least 29 x 29 pixels.
    """

    def __init__(
        self, spec: MiTSpec, in_chans: int = 3, drop_path_rate: float = 0.1, layer_norm_eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.spec = spec
        self.layer_norm_eps = layer_norm_eps
        self.out_channels: tuple[int, ...] = tuple(spec.embed_dims)
        self.reductions: tuple[int, ...] = (4, 8, 16, 32)
        rates = torch.linspace(0, drop_path_rate, sum(spec.depths)).tolist()
        start = 0
        chans = in_chans
        for i in range(4):
            dim = spec.embed_dims[i]
            patch, stride = (7, 4) if i == 0 else (3, 2)
            self.add_module(f"patch_embed{i + 1}", OverlapPatchEmbed(chans, dim, patch, stride))
            blocks = [
                Block(
                    dim,
                    spec.num_heads[i],
                    spec.mlp_ratio,
                    spec.qkv_bias,
                    spec.sr_ratios[i],
                    rates[start + j],
                    layer_norm_eps,
                )
                for j in range(spec.depths[i])
            ]
            self.add_module(f"block{i + 1}", nn.ModuleList(blocks))
            self.add_module(f"norm{i + 1}", nn.LayerNorm(dim, eps=layer_norm_eps))
            start += spec.depths[i]
            chans = dim
        self.apply(init_mit_weights)

    def output_size(self, height: int, width: int) -> list[tuple[int, int]]:
        """Spatial sizes of the four stage maps for an input of ``height x width``."""
        return mit_output_size(height, width)

    def _check_size(self, height: int, width: int) -> None:
        for (h, w), sr in zip(self.output_size(height, width), self.spec.sr_ratios, strict=True):
            if min(h, w) < sr:
                raise ValueError(
                    f"Input of {height} x {width} pixels is too small for MiT: a stage map of {h} x {w} "
                    f"is smaller than its spatial-reduction ratio {sr}; use at least 29 x 29."
                )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode ``(B, C, H, W)`` into four NCHW maps with strides 4, 8, 16 and 32."""
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self._check_size(x.shape[-2], x.shape[-1])
        outs = []
        b = x.shape[0]
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, C_i, h, w)
            outs.append(x)
        return outs
