"""Small building blocks shared by the models: DropPath and weight initialisers."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["DropPath", "init_mit_weights", "standardize"]


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch and rescale the rest.

    Args:
        x: Residual branch output, any shape with the batch first.
        drop_prob: Probability of dropping a sample.
        training: Only active in training mode.

    Returns:
        Tensor of the same shape as ``x``.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., 2016) as a module, so it can be switched off like dropout."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def init_mit_weights(module: nn.Module) -> None:
    """Initialise one module the way the SegFormer/MiT reference does.

    Linear: truncated normal (std 0.02), zero bias. LayerNorm: weight 1, bias 0.
    Conv2d: normal with std sqrt(2 / fan_out), zero bias.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def standardize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Standardise each matrix of ``x`` over its last two dims (biased variance).

    This is what ``nn.InstanceNorm2d(affine=False)`` computes on a ``(B, heads, Q, S)`` attention-logit tensor,
    the "psi" of AllSpark that replaces the 1/sqrt(d) scaling.

    Args:
        x: ``(..., Q, S)`` tensor.
        eps: Added to the variance.

    Returns:
        Tensor of the same shape, zero mean and unit variance per ``(Q, S)`` matrix.
    """
    var, mean = torch.var_mean(x, dim=(-2, -1), unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)
