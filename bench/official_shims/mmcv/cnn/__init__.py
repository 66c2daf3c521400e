"""``mmcv.cnn.ConvModule`` (and ``ConvTranspose2d``) in plain PyTorch, as mmcv 1.x builds them.

``ConvModule``: a convolution (bias off when a norm follows), the norm registered as ``bn`` (mmcv's name for batch
norms, so checkpoints keep the official keys), then ReLU; Kaiming-normal (fan-out) convolution weights, norm weight
1 and bias 0. Only the options the official code uses are accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from torch import nn

__all__ = ["ConvModule", "ConvTranspose2d"]

ConvTranspose2d = nn.ConvTranspose2d

_NORMS: dict[str, type[nn.Module]] = {"BN": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm}
_RELU: Mapping[str, Any] = MappingProxyType({"type": "ReLU"})  # mmcv's default activation; None means none


class ConvModule(nn.Module):
    """conv -> norm -> ReLU, as ``mmcv.cnn.ConvModule(..., norm_cfg=dict(type="BN" | "SyncBN"))``.

    ``SyncBN`` is PyTorch's ``SyncBatchNorm``, which computes a plain batch norm when no process group exists.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool | str = "auto",
        norm_cfg: Mapping[str, Any] | None = None,
        act_cfg: Mapping[str, Any] | None = _RELU,
        inplace: bool = True,
    ) -> None:
        super().__init__()
        if act_cfg is not None and act_cfg.get("type") != "ReLU":
            raise NotImplementedError(f"This mmcv shim only has ReLU activations, not {act_cfg!r}.")
        with_norm = norm_cfg is not None
        if bias == "auto":
            bias = not with_norm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.constant_(self.conv.bias, 0)
        self.with_norm = with_norm
        if norm_cfg is not None:
            if norm_cfg.get("type") not in _NORMS:
                raise NotImplementedError(f"This mmcv shim only has BN and SyncBN, not {norm_cfg!r}.")
            self.bn = _NORMS[norm_cfg["type"]](out_channels)
            self.bn.requires_grad_(norm_cfg.get("requires_grad", True))
            nn.init.constant_(self.bn.weight, 1)
            nn.init.constant_(self.bn.bias, 0)
        self.activate = None if act_cfg is None else nn.ReLU(inplace=inplace)

    def forward(self, x: Any) -> Any:
        x = self.conv(x)
        if self.with_norm:
            x = self.bn(x)
        return x if self.activate is None else self.activate(x)
