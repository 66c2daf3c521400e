"""ONNX export of the inference graph, checked in onnxruntime against PyTorch.

The exported graph is the eval-mode forward: normalised images ``image (B, 3, H, W)`` float32 in, ``logits
(B, K, H, W)`` float32 out, with dynamic batch, height and width. Training-only parts (the memory update, the
channel grouping, the unlabeled self-attention) are not in it. With ``model.allspark.infer_memory`` and a memory
already read in training, the Semantic Memory is in it as constants, resized in the graph to each input's stage-4
grid (the resize is identity on the training grid); otherwise inference uses the image's own keys. The AllSpark
block attends per image at inference (``model.allspark.per_image_eval=true``, the default), so every image's logits
depend only on that image, whatever the batch. Inputs are normalised with the ImageNet mean and std (stored in the
file's metadata with the class names and the palette).

After writing the file, :func:`export_onnx` runs it in onnxruntime on random images of the export size and of
another size (not a multiple of 32) and reports the largest absolute difference from PyTorch.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError, MissingExtraError
from ..utils import to_pair
from .inference import TrainedModel

__all__ = ["EXPORT_FORMATS", "ExportReport", "InferenceGraph", "check_onnx", "check_sizes", "export_onnx"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx",)


class InferenceGraph(nn.Module):
    """``image -> logits``: the eval-mode forward with one positional input, as exporters want it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` of normalised images ``(B, 3, H, W)``."""
        return self.model(image)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and checked.

    Attributes:
        path: The ONNX file.
        opset: ONNX opset version.
        max_abs_diff: Largest |onnxruntime - PyTorch| logit difference per checked ``(h, w)``; empty when unchecked.
    """

    path: Path
    opset: int
    max_abs_diff: dict[tuple[int, int], float]

    @property
    def worst(self) -> float:
        """Largest difference over every checked size (NaN when unchecked)."""
        return max(self.max_abs_diff.values()) if self.max_abs_diff else float("nan")


def _require(package: str, purpose: str) -> Any:
    try:
        return __import__(package)
    except ImportError:
        raise MissingExtraError(package, "onnx", purpose) from None


def _metadata(trained: TrainedModel) -> dict[str, str]:
    return {
        "producer": "allspark-seg",
        "method": trained.cfg.method,
        "class_names": json.dumps(list(trained.class_names)),
        "palette": json.dumps(np.asarray(trained.palette).tolist()),
        "input": "RGB float32 (B, 3, H, W), (x / 255 - mean) / std",
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
        "output": "logits float32 (B, K, H, W)",
    }


def check_sizes(export_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The export size and a second, different size that is not a multiple of 32 (e.g. 64x64 -> 64x64, 83x57)."""
    h, w = export_size

    def off_grid(n: int) -> int:
        return n + 1 if n % 32 == 0 else n

    return [export_size, (off_grid(h + 19), off_grid(max(33, w - 7)))]


def check_onnx(
    path: str | Path, model: nn.Module, sizes: Sequence[tuple[int, int]], *, batch: int = 1, seed: int = 0
) -> dict[tuple[int, int], float]:
    """Run an ONNX file in onnxruntime and PyTorch on the same random images; max |difference| per size.

    Raises:
        MissingExtraError: onnxruntime is not installed.
    """
    ort = _require("onnxruntime", "Checking the exported ONNX file")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    diffs: dict[tuple[int, int], float] = {}
    model.eval()
    for h, w in sizes:
        x = torch.randn(batch, 3, h, w, generator=generator)
        with torch.inference_mode():
            ref = model(x.to(device)).float().cpu().numpy()
        out = session.run(None, {name: x.numpy()})[0]
        if out.shape != ref.shape:
            raise RuntimeError(f"ONNX output shape {out.shape} differs from PyTorch {ref.shape} at {h}x{w}")
        diffs[(h, w)] = float(np.abs(out - ref).max())
    return diffs


def _export(graph: nn.Module, path: Path, size: tuple[int, int], opset: int) -> None:
    """Trace ``graph`` on a random ``(1, 3, h, w)`` image into ``path`` with dynamic batch, height and width."""
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python shape arithmetic; checked at two sizes instead
        torch.onnx.export(
            graph,
            (torch.randn(1, 3, *size),),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
            opset_version=opset,
            dynamo=False,
        )


def export_onnx(
    trained: TrainedModel,
    out: str | Path,
    *,
    size: tuple[int, int] | None = None,
    opset: int = 17,
    check: bool = True,
) -> ExportReport:
    """Export the inference graph to ONNX with dynamic batch, height and width, then check it in onnxruntime.

    Args:
        trained: From :func:`~allspark_seg.engine.inference.load_trained_model`.
        out: Output ``.onnx`` file (its folder is created).
        size: ``(h, w)`` of the example input used for tracing; None = the training crop.
        opset: ONNX opset version.
        check: Run the file in onnxruntime at two sizes against PyTorch.

    Returns:
        The file, the opset and the differences measured.

    Raises:
        MissingExtraError: onnx (or, when checking, onnxruntime) is not installed.
        ConfigError: The AllSpark block is batch-coupled at inference (``per_image_eval=false``), which a graph
            with a dynamic batch cannot represent faithfully, or a bad size.
    """
    onnx = _require("onnx", "ONNX export")
    cfg = trained.cfg
    if cfg.model.allspark.enabled and not cfg.model.allspark.per_image_eval:
        raise ConfigError(
            f"Checkpoint '{trained.path}' uses batch-coupled inference (model.allspark.per_image_eval=false), which "
            "a graph with a dynamic batch cannot reproduce; ONNX export supports per-image inference only."
        )
    if size is None:
        size = to_pair(cfg.data.crop_size)
    if min(size) < 32:
        raise ConfigError(f"The export size must be at least 32x32 pixels, got {size[0]}x{size[1]}.")
    if check:
        _require("onnxruntime", "Checking the exported ONNX file")  # fail before the slow export, not after
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = trained.device
    graph = InferenceGraph(trained.model).cpu().eval()  # moves the model to the CPU; moved back at the end
    try:
        _export(graph, path, size, opset)
        proto = onnx.load(str(path))
        for key, value in _metadata(trained).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(path))
        diffs = check_onnx(path, graph, check_sizes(size)) if check else {}
    finally:
        trained.model.to(device)
    for (h, w), diff in diffs.items():
        log.info("onnxruntime vs PyTorch at %dx%d: max |difference| %.2e", h, w, diff)
    return ExportReport(path, opset, diffs)
