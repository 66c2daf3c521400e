"""SegFormer all-MLP decode head.

Parameter names follow the official AllSpark code (``linear_c1..4.proj``, ``linear_fuse.conv``/``.bn``,
``linear_pred``), so its checkpoints map onto this head without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SegFormerHead"]


class MLP(nn.Module):
    """Per-pixel linear projection of a feature map (a 1x1 convolution stored as ``nn.Linear``)."""

    def __init__(self, input_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``(B, C_in, h, w)`` to ``(B, C_out, h, w)``."""
        return F.conv2d(x, self.proj.weight[:, :, None, None], self.proj.bias)


class ConvBNReLU(nn.Module):
    """1x1 convolution without bias, BatchNorm and ReLU (mmcv's ``ConvModule`` with ``conv``/``bn`` names)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    """All-MLP head: per-stage linear to ``embed_dim``, upsample to stride 4, concatenate, fuse, classify.

    Args:
        in_channels: Widths of the encoder stages, finest first (any number of stages).
        num_classes: Number of output classes K.
        embed_dim: Width of the per-stage projections and of the fused map (768 in AllSpark).
        dropout: Rate of the ``nn.Dropout2d`` before the classifier (0.1 in SegFormer).

    Shape:
        ``forward(feats)``: maps ``(B, C_i, h_i, w_i)`` -> logits ``(B, K, h_1, w_1)`` at the finest map's size.
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 768, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        for i, c in enumerate(self.in_channels, start=1):
            self.add_module(f"linear_c{i}", MLP(c, embed_dim))
        self.linear_fuse = ConvBNReLU(embed_dim * len(self.in_channels), embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode the stage maps (finest first) into logits at the finest resolution."""
        size = feats[0].shape[-2:]
        projected = []
        # Concatenation order is coarsest first ([c4, c3, c2, c1]), as in SegFormer.
        for i in range(len(feats), 0, -1):
            x = getattr(self, f"linear_c{i}")(feats[i - 1])
            if i > 1:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            projected.append(x)
        x = self.linear_fuse(torch.cat(projected, dim=1))
        return self.linear_pred(self.dropout(x))
