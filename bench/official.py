"""The official AllSpark code as a benchmark baseline, imported from a local checkout of xmed-lab/AllSpark.

``bench/run.py --official DIR`` times the official modules themselves (``model/model_helper.py``,
``model/backbone/mit.py``, ``model/semseg/allspark.py`` of the checkout; nothing of them is copied here). Their
third-party imports are satisfied by ``bench/official_shims`` (timm's ``DropPath``, ``to_2tuple``,
``trunc_normal_``; mmcv's ``ConvModule``) and by the real einops. :func:`import_official` puts both on
``sys.path``; it is called only inside a benchmark worker process.

Without DDP, on one process, the official model computes what one DDP rank computes: ``train_allspark.py`` reaches
it through ``model.module`` (here: the model itself), its ``SyncBN`` is PyTorch's ``SyncBatchNorm``, which falls
back to a plain batch norm without a process group, the DDP buffer broadcast from rank 0 and the gradient
all-reduce have nothing to do, and the per-iteration ``barrier`` is absent. The Semantic Memory is updated inside
the model's training forward, as under DDP.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from allspark_seg.interop import to_official_state_dict
from allspark_seg.models import AllSparkSegmentor

__all__ = [
    "OFFICIAL_FILES",
    "REQUIRED_MODULES",
    "SHIMS",
    "check_official_dir",
    "import_official",
    "official_config",
    "official_memory_class",
    "official_twin",
]

SHIMS = Path(__file__).resolve().parent / "official_shims"
OFFICIAL_FILES = ("model/model_helper.py", "model/backbone/mit.py", "model/semseg/allspark.py")
REQUIRED_MODULES = ("einops",)  # imported by the official code and not shimmed: its copies are part of what is timed


def official_dir_arg(parser: argparse.ArgumentParser, path: str | None) -> str | None:
    """The resolved ``--official`` folder (None when not given); ``parser.error`` with the reason when unusable."""
    if not path:
        return None
    problem = check_official_dir(path)
    if problem:
        parser.error(problem)
    return str(Path(path).resolve())


def check_official_dir(path: str | Path) -> str | None:
    """Why ``path`` cannot serve as the official checkout (one sentence), or ``None`` when it can.

    Args:
        path: The folder given to ``--official``.
    """
    root = Path(path)
    if not root.is_dir():
        return f"--official {path}: no such folder (give a checkout of xmed-lab/AllSpark)."
    missing = [name for name in OFFICIAL_FILES if not (root / name).is_file()]
    if missing:
        return f"--official {path}: {', '.join(missing)} not found; is this a checkout of xmed-lab/AllSpark?"
    for module in REQUIRED_MODULES:
        if importlib.util.find_spec(module) is None:
            return (
                f"--official {path}: the official code imports {module}, which is not installed (pip install {module})."
            )
    return None


def import_official(path: str | Path) -> ModuleType:
    """Import the official ``model.model_helper`` (and through it the backbone and decoder) from ``path``.

    Puts ``bench/official_shims`` and ``path`` at the front of ``sys.path`` (this process only).

    Returns:
        The official ``model.model_helper`` module.

    Raises:
        RuntimeError: ``path`` is not a usable checkout, or another ``model`` package shadows it.
    """
    problem = check_official_dir(path)
    if problem:
        raise RuntimeError(problem)
    root = Path(path).resolve()
    for entry in (str(root), str(SHIMS)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    helper = importlib.import_module("model.model_helper")
    if Path(helper.__file__).resolve() != root / "model" / "model_helper.py":
        raise RuntimeError(f"--official {path}: `model.model_helper` was imported from {helper.__file__} instead.")
    return helper


def official_memory_class(path: str | Path) -> type[nn.Module]:
    """The official ``CrossAttnMem`` class (``model/semseg/allspark.py``), whose ``_dequeue_and_enqueue`` is the
    Semantic Memory update."""
    import_official(path)
    return importlib.import_module("model.semseg.allspark").CrossAttnMem


def official_config(model: AllSparkSegmentor, crop: int, warmup_epoch: int = 0) -> dict[str, Any]:
    """The official ``cfg["model"]`` (backbone and decoder ``type`` + ``kwargs``) describing ``model``'s shapes.

    The official repository builds MiT-B2..B5 through ``mit_b*`` functions that load pretrained files; any variant
    is the same ``MixVisionTransformer`` class with the variant's widths, which the config names directly.

    Args:
        model: An allspark-seg model with a MiT encoder and an AllSpark block.
        crop: Training crop (the official memory grid is ``(crop // 32 + 1) ** 2``).
        warmup_epoch: The decoder's warm-up; 0 makes ``set_SMem_status(0)`` read the memory.
    """
    spec = model.encoder.spec
    drop_path = max((m.drop_prob for m in model.encoder.modules() if hasattr(m, "drop_prob")), default=0.0)
    norm_eps = next(m.eps for n, m in model.encoder.named_modules() if n.endswith("norm1"))
    backbone = {
        "embed_dims": list(spec.embed_dims),
        "num_heads": list(spec.num_heads),
        "mlp_ratios": [spec.mlp_ratio] * 4,
        "qkv_bias": spec.qkv_bias,
        "norm_layer": partial(nn.LayerNorm, eps=norm_eps),
        "depths": list(spec.depths),
        "sr_ratios": list(spec.sr_ratios),
        "drop_rate": 0.0,
        "drop_path_rate": drop_path,
    }
    decoder = {
        "num_heads": model.allspark.attn.num_heads,
        "num_class": model.num_classes,
        "in_planes": list(spec.embed_dims),
        "image_size": crop,
        "warmup_epoch": warmup_epoch,
        "embedding_dim": model.head.linear_fuse.conv.out_channels,
    }
    return {
        "backbone": {"type": "model.backbone.mit.MixVisionTransformer", "kwargs": backbone},
        "decoder": {"type": "model.semseg.allspark.SemiDecoder", "kwargs": decoder},
    }


def official_twin(model: AllSparkSegmentor, crop: int, path: str | Path) -> nn.Module:
    """The official ``ModelBuilder`` with exactly ``model``'s weights, buffers, Semantic Memory and dropout rates.

    Args:
        model: An allspark-seg model (MiT encoder, AllSpark block, faithful options).
        crop: Training crop; ``(crop // 32 + 1) ** 2`` must be ``model``'s memory grid (not a multiple of 32).
        path: The official checkout.

    Returns:
        The official model in training mode, memory read (``set_SMem_status(0)`` with warm-up 0).
    """
    grid = model.allspark.memory.grid
    if (crop // 32 + 1) ** 2 != grid[0] * grid[1]:
        raise ValueError(f"Crop {crop} gives a {grid} stage-4 grid that the official memory formula gets wrong.")
    helper = import_official(path)
    ref = helper.ModelBuilder(official_config(model, crop))
    ref.load_state_dict(to_official_state_dict(model), strict=True)
    if not any(m.p for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)):
        for m in ref.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.p = 0.0
    ref.decoder.set_SMem_status(epoch=ref.decoder.warmup_epoch)
    return ref.train()
