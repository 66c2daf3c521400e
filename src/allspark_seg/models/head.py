"""SegFormer all-MLP decode head.

Parameter names follow the official AllSpark code (``linear_c1..4.proj``, ``linear_fuse.conv``/``.bn``,
``linear_pred``), so its checkpoints map onto this head without renaming.

The forward pass folds the fuse convolution into the per-stage projections (exact up to float rounding, see
:func:`folded_projections`): with head width E = 768 the unfolded fuse is a ``4E x E`` matrix product at every
stride-4 position, by far the largest cost of the whole model on MiT-B0/B1/B2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SegFormerHead", "folded_projections"]


class MLP(nn.Module):
    """Per-pixel linear projection of a feature map (a 1x1 convolution stored as ``nn.Linear``)."""

    def __init__(self, input_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``(B, C_in, h, w)`` to ``(B, C_out, h, w)``."""
        b, _, h, w = x.shape
        return F.linear(_rows(x), self.proj.weight, self.proj.bias).view(b, h, w, -1).permute(0, 3, 1, 2)


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
        ``forward(feats)``: maps ``(B, C_i, h_i, w_i)`` -> logits ``(B, K, h_1, w_1)`` at the finest map's size,
        always in the contiguous (NCHW) memory format.
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
        """Decode the stage maps (finest first) into logits at the finest resolution.

        Computed with the fuse convolution folded into the per-stage projections (see :func:`folded_projections`):
        ``fuse(cat_i(up(P_i c_i + b_i))) = sum_i up((W_i P_i) c_i) + sum_i W_i b_i``, which skips the concatenated
        ``(B, n * E, h_1, w_1)`` map and its ``n * E x E`` convolution at stride 4. Parameters and their gradients
        are those of the unfolded head (the products are formed on the fly at every forward). The maps are
        processed channels-last and the sum is accumulated in place; the logits are returned contiguous.
        """
        b, _, h, w = feats[0].shape
        weights, bias = folded_projections(self)
        fused = torch.addmm(bias, _rows(feats[0]), weights[0].T)  # (B * h_1 * w_1, E), a fresh tensor (no view)
        for i in range(1, len(feats)):
            bi, _, hi, wi = feats[i].shape
            y = (_rows(feats[i]) @ weights[i].T).view(bi, hi, wi, -1).permute(0, 3, 1, 2)  # channels-last view
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
            fused.add_(y.permute(0, 2, 3, 1).reshape(fused.shape))  # no product or upsampling saves its output
        x = F.relu_(_batch_norm_rows(self.linear_fuse.bn, fused, (b, h, w)))  # nor does batch norm
        x = self.dropout(x.view(b, h, w, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(fused.shape)
        pred = self.linear_pred
        logits = torch.addmm(pred.bias, x, pred.weight.flatten(1).T)  # (B * h_1 * w_1, K)
        return logits.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


def _batch_norm_rows(bn: nn.Module, rows: torch.Tensor, bhw: tuple[int, int, int]) -> torch.Tensor:
    """Apply a BatchNorm module to a channels-last map given as rows ``(B * H * W, C)``; returns the same layout.

    A plain ``nn.BatchNorm2d`` in training mode runs :func:`_hand_row_batch_norm` on float32/float64 rows (PyTorch's
    kernel on rows, the channels-last one, accumulates its statistics less precisely: 4e-7..5e-6 relative against
    ~1e-7) and :func:`_builtin_row_batch_norm` on float16/bfloat16 rows (autocast), where PyTorch's kernel
    accumulates in float32: 5-20x faster and more precise than the hand-written one, whose float16 sum of squares
    overflows (docs/performance.md, "Hand-written vs torch built-ins"). Both update the running statistics as the
    module would; anything else (eval mode, synchronised batch norms) is the module itself on the channels-last view.
    """
    if type(bn) is not nn.BatchNorm2d or not bn.training or not bn.track_running_stats:
        b, h, w = bhw
        out = bn(rows.view(b, h, w, -1).permute(0, 3, 1, 2))
        return out.permute(0, 2, 3, 1).reshape(rows.shape)
    if rows.dtype in (torch.float16, torch.bfloat16):
        return _builtin_row_batch_norm(bn, rows)
    return _hand_row_batch_norm(bn, rows)


def _momentum(bn: nn.BatchNorm2d) -> float:
    """Count one more batch and return the running statistics' update factor (``momentum=None``: cumulative)."""
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def _builtin_row_batch_norm(bn: nn.BatchNorm2d, rows: torch.Tensor) -> torch.Tensor:
    """Training-mode ``F.batch_norm`` of the rows ``(R, C)`` over R, updating the running statistics."""
    factor = _momentum(bn)
    return F.batch_norm(rows, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, factor, bn.eps)


def _hand_row_batch_norm(bn: nn.BatchNorm2d, rows: torch.Tensor) -> torch.Tensor:
    """Training-mode :class:`_RowBatchNorm` of the rows ``(R, C)`` over R, updating the running statistics."""
    y, mean, var = _RowBatchNorm.apply(rows, bn.weight, bn.bias, bn.eps)
    factor = _momentum(bn)
    with torch.no_grad():
        n = rows.shape[0]
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_((var * (n / max(n - 1, 1))).to(bn.running_var.dtype), factor)
    return y


class _RowBatchNorm(torch.autograd.Function):
    """Training-mode batch normalisation of the columns of ``x`` ``(R, C)`` over its R rows.

    Returns ``(y, mean, biased var)``; only ``y`` is differentiable. Saves ``x`` and per-channel statistics, like
    the native kernel, and recomputes the normalised input in backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        mean = x.sum(dim=0).div_(n)
        y = x - mean
        var = y.square().sum(dim=0).div_(n)  # two passes: as precise as NCHW batch norm, faster than var_mean
        invstd = torch.rsqrt(var + eps)
        y.mul_(weight * invstd).add_(bias)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: torch.Tensor, _grad_mean: torch.Tensor | None, _grad_var: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        n = x.shape[0]
        x_hat = (x - mean).mul_(invstd)
        grad_bias = grad_y.sum(dim=0)
        grad_weight = (grad_y * x_hat).sum(dim=0)
        grad_x = x_hat.mul_(grad_weight / -n).add_(grad_y).sub_(grad_bias / n).mul_(weight * invstd)
        return grad_x, grad_weight, grad_bias, None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> contiguous rows ``(B * H * W, C)`` (a view for channels-last maps).

    The head works on channels-last maps: per-pixel products are plain matrix products over rows of channels, and
    bilinear upsampling is vectorised over channels (on CPU its NCHW backward is about 10x slower).
    """
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def folded_projections(head: SegFormerHead) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Fold the head's 1x1 fuse convolution into its per-stage projections.

    The fuse weight ``W`` ``(E, n * E)`` is split into per-stage slices ``W_i`` ``(E, E)`` in concatenation order
    (stage n first, as in SegFormer). Because bilinear upsampling is linear and preserves constants, the head's fused
    map equals ``sum_i up((W_i P_i) c_i) + sum_i W_i b_i``.

    Args:
        head: The SegFormer head.

    Returns:
        ``(weights, bias)``: ``weights[i - 1]`` = ``W_i P_i`` ``(E, C_i)`` for stage i (finest first) and the
        summed bias ``(E,)``.
    """
    n = len(head.in_channels)
    fuse = head.linear_fuse.conv.weight.flatten(1)  # (E, n * E)
    width = fuse.shape[1] // n
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    for i in range(1, n + 1):
        proj = getattr(head, f"linear_c{i}").proj
        w_i = fuse[:, (n - i) * width : (n - i + 1) * width]
        weights.append(w_i @ proj.weight)
        biases.append(w_i @ proj.bias)
    return weights, torch.stack(biases).sum(dim=0)
