"""Weights in and out: official AllSpark checkpoints, NVlabs MiT ImageNet files and Hugging Face SegFormer folders.

Official AllSpark checkpoints (``latest.pth``/``best.pth`` of ``train_allspark.py``, or a bare ``ModelBuilder`` state
dict, with or without DDP's ``module.`` prefix) map onto :class:`~allspark_seg.models.AllSparkSegmentor` as:

=========================================  ===========================================
official key                               this package
=========================================  ===========================================
``backbone.*``                             ``encoder.*``
``decoder.allspark.attn.kv_queue``         ``allspark.attn.memory.bank``
``decoder.allspark.attn.queue_ptr``        ``allspark.attn.memory.ptr``
``decoder.allspark.*``                     ``allspark.*``
``decoder.decoder.*``                      ``head.*``
(none)                                     ``allspark.attn.memory.filled`` (all True)
=========================================  ===========================================

Every file is read with ``torch.load(..., weights_only=True)``: tensors and plain containers only, never code. The
numpy scalars the official script stores next to the weights (``previous_best``) are allowed as data.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, MissingExtraError
from .models import MIT_VARIANTS, AllSparkSegmentor, MiTSpec, MixVisionTransformer, SegFormerHead, build_model
from .models.mit import resolve_mit_spec

__all__ = [
    "FAITHFUL_OPTIONS",
    "HF_LAYER_NORM_EPS",
    "OFFICIAL_LAYER_NORM_EPS",
    "OfficialLayout",
    "hf_config_dict",
    "infer_official_layout",
    "load_encoder_weights",
    "load_official_checkpoint",
    "mit_from_hf_config",
    "official_key",
    "read_state_dict",
    "to_hf_state_dict",
    "to_official_state_dict",
]

logger = logging.getLogger(__name__)

OFFICIAL_LAYER_NORM_EPS = 1e-6
"""eps of the MiT block and stage LayerNorms in the NVlabs/AllSpark code."""
HF_LAYER_NORM_EPS = 1e-5
"""eps of every LayerNorm of Hugging Face's SegFormer (``nn.LayerNorm`` default; its ``layer_norm_eps`` is unused)."""

FAITHFUL_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {
        "per_image_eval": False,
        "grouping": "logits",
        "grouping_resize": "bilinear",
        "memory_init": "randn",
        "gather_memory": False,
        "layer_norm_eps": OFFICIAL_LAYER_NORM_EPS,
    }
)
"""``build_model`` options that reproduce the official code's behaviour (batch-coupled eval, logit grouping...)."""

# build_model arguments that an official checkpoint determines: they cannot be overridden when loading one.
_DETERMINED = ("encoder", "num_classes", "allspark", "head_dim", "num_heads", "memory", "memory_length", "pretrained")
_SEGFORMER_HEADS = (1, 2, 5, 8)
_FILLED_KEY = "allspark.attn.memory.filled"
_OURS_TO_OFFICIAL_EXACT = {
    "allspark.attn.memory.bank": "decoder.allspark.attn.kv_queue",
    "allspark.attn.memory.ptr": "decoder.allspark.attn.queue_ptr",
}
_OFFICIAL_TO_OURS_EXACT = {v: k for k, v in _OURS_TO_OFFICIAL_EXACT.items()}
_PREFIXES = (("encoder.", "backbone."), ("allspark.", "decoder.allspark."), ("head.", "decoder.decoder."))


# ---------------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------------
def _numpy_scalar_globals() -> list[Any]:
    """Globals that rebuild numpy scalars (data only), e.g. the official ``previous_best`` (an ``np.float64``)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    core = getattr(np, "_core", None)
    multiarray = core.multiarray if core is not None else np.core.multiarray
    scalar = multiarray.scalar
    types = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float16, np.float32, np.float64)
    allowed: list[Any] = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    allowed += sorted({type(np.dtype(t)) for t in types} - {np.dtype}, key=str)
    return allowed


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; every failure becomes one ``CheckpointError`` sentence."""
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if path.is_dir():
        raise CheckpointError(f"Checkpoint {path} is a directory, not a file.")
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe_globals is None:  # torch < 2.5
            return torch.load(path, map_location="cpu", weights_only=True)
        with safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if match is None:  # a file that is not a pickle at all
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(e)}).") from e
        raise CheckpointError(
            f"{path} holds a pickled {match.group(1)} object, which safe loading (weights_only=True) refuses to "
            "execute; re-save only its state dict (tensors) to load it."
        ) from e
    except Exception as e:  # zip/EOF/key errors of a file that is not a torch checkpoint
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(e)}).") from e


def _first_line(error: Exception) -> str:
    """The first non-empty line of an exception message (the type name when it has none), at most 160 chars."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:160] if lines else type(error).__name__


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise MissingExtraError("safetensors", "hf", f"Reading {path}") from e
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}).") from e


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: a raw state dict or one under ``model``/``state_dict`` keys."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not _all_tensors(obj):
            inner = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj or not _all_tensors(obj):
        what = f"a {type(obj).__name__}" if not isinstance(obj, Mapping) else f"a dict with keys {_few(list(obj))}"
        raise CheckpointError(
            f"{path} is not a model checkpoint: expected a state dict (or one under 'model'/'state_dict'), got {what}."
        )
    return {str(k): v for k, v in obj.items()}


def _all_tensors(obj: Mapping[Any, Any]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a PyTorch checkpoint file safely, without DDP's ``module.`` prefix.

    Args:
        path: A ``.pth``/``.pt``/``.bin`` file (a raw state dict or ``{"model": ..., ...}``/``{"state_dict": ...}``)
            or a ``.safetensors`` file.

    Returns:
        ``{key: tensor}`` in file order.

    Raises:
        CheckpointError: Missing file, not a checkpoint, or one holding pickled objects other than data.
    """
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        return _load_safetensors(path)
    return _strip_prefix(_unwrap_state_dict(_torch_load(path), path), "module.")


def _few(keys: Iterable[str], limit: int = 4) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _mismatch_report(
    missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
) -> str:
    """``'2 missing keys (a, b); 1 shape mismatch (c: file (3, 4) vs model (3, 5))'``."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' * (len(missing) > 1)} ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) > 1)} ({_few(unexpected)})")
    if mismatched:
        shown = [f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched]
        parts.append(f"{len(mismatched)} shape mismatch{'es' * (len(mismatched) > 1)} ({_few(shown, 3)})")
    return "; ".join(parts)


def _compare(
    source: Mapping[str, Any], target: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """Missing (in target only), unexpected (in source only) and shape-mismatched keys (in target order).

    A source value that is not a tensor counts as a shape mismatch with shape ``()``.
    """
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    mismatched = [
        (k, tuple(getattr(source[k], "shape", ())), tuple(v.shape))
        for k, v in target.items()
        if k in source and getattr(source[k], "shape", None) != v.shape
    ]
    return missing, unexpected, mismatched


def state_dict_mismatch(source: Mapping[str, Any], target: Mapping[str, torch.Tensor]) -> str:
    """``''`` when ``source`` has exactly the keys and shapes of ``target``, else a one-line report of the missing,
    unexpected and mismatched keys (``'1 missing key (a); 1 shape mismatch (c: file (3, 4) vs model (3, 5))'``)."""
    return _mismatch_report(*_compare(source, target))


# ---------------------------------------------------------------------------------------------------------------------
# Official AllSpark checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def official_key(key: str) -> str | None:
    """The official ``ModelBuilder`` key of one of our state-dict keys, or None when it has no counterpart.

    >>> official_key("allspark.attn.memory.bank")
    'decoder.allspark.attn.kv_queue'
    """
    if key in _OURS_TO_OFFICIAL_EXACT:
        return _OURS_TO_OFFICIAL_EXACT[key]
    if key.startswith("allspark.attn.memory.") or key.startswith(("allspark.attn.k_mem.", "allspark.attn.v_mem.")):
        return None
    for ours, theirs in _PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return None


def _ours_from_official(key: str) -> str | None:
    if key in _OFFICIAL_TO_OURS_EXACT:
        return _OFFICIAL_TO_OURS_EXACT[key]
    for ours, theirs in _PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return None


@dataclass(frozen=True)
class OfficialLayout:
    """What an official state dict says about the model that wrote it.

    Attributes:
        spec: MiT architecture (heads from the variant table or the fallback rule, see ``infer_official_layout``).
        in_chans: Input channels of the first patch embedding.
        variant: Matching MiT variant name, or None for custom widths/depths.
        num_classes: K (rows of ``linear_pred``).
        head_dim: SegFormer head width (rows of ``linear_c1.proj``).
        allspark: Whether the AllSpark block is present (False for ``semidec_base.py`` baselines).
        num_heads: AllSpark heads (``q_u`` rows / C), None without AllSpark.
        memory_shape: ``(K, L, N)`` of ``kv_queue``, None without AllSpark.
        grid: Square memory grid ``(sqrt(N), sqrt(N))``, None without AllSpark.
    """

    spec: MiTSpec
    in_chans: int
    variant: str | None
    num_classes: int
    head_dim: int
    allspark: bool
    num_heads: int | None = None
    memory_shape: tuple[int, int, int] | None = None
    grid: tuple[int, int] | None = None


def _fallback_mit_heads(widths: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Heads are not stored in tensors: for widths of no known variant take, per stage, the largest divisor of the
    width that does not exceed SegFormer's (1, 2, 5, 8)."""
    heads = []
    for width, ref in zip(widths, _SEGFORMER_HEADS, strict=True):
        heads.append(max(h for h in range(1, ref + 1) if width % h == 0))
    return tuple(heads)  # type: ignore[return-value]


def _require(state_dict: Mapping[str, torch.Tensor], key: str, source: str, what: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(f"{source} has no '{key}', so its {what} cannot be inferred.")
    return state_dict[key]


def _infer_mit_spec(
    state_dict: Mapping[str, torch.Tensor], prefix: str, source: str
) -> tuple[MiTSpec, int, str | None]:
    """MiT spec, input channels and variant name from ``{prefix}patch_embed{i}``/``block{i}.{j}`` tensors."""
    widths = []
    for i in range(1, 5):
        w = _require(state_dict, f"{prefix}patch_embed{i}.proj.weight", source, "MiT stage widths")
        if w.ndim != 4 or w.shape[-1] != (7 if i == 1 else 3):
            raise CheckpointError(
                f"{source}: '{prefix}patch_embed{i}.proj.weight' has shape {tuple(w.shape)}, which is not a MiT "
                f"patch embedding (kernel {7 if i == 1 else 3})."
            )
        widths.append(int(w.shape[0]))
    in_chans = int(state_dict[f"{prefix}patch_embed1.proj.weight"].shape[1])
    depths = []
    sr_ratios = []
    for i in range(1, 5):
        pattern = re.compile(rf"{re.escape(prefix)}block{i}\.(\d+)\.")
        indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
        if not indices:
            raise CheckpointError(f"{source} has no '{prefix}block{i}.*' tensors: it is not a MiT checkpoint.")
        depths.append(max(indices) + 1)
        sr = state_dict.get(f"{prefix}block{i}.0.attn.sr.weight")
        sr_ratios.append(1 if sr is None else int(sr.shape[-1]))
    fc1 = _require(state_dict, f"{prefix}block1.0.mlp.fc1.weight", source, "MLP ratio")
    mlp_ratio = fc1.shape[0] / widths[0]
    for i in range(2, 5):
        hidden = state_dict.get(f"{prefix}block{i}.0.mlp.fc1.weight")
        if hidden is not None and hidden.shape[0] != round(mlp_ratio * widths[i - 1]):
            raise CheckpointError(
                f"{source} uses different MLP ratios per stage, which this package's MiT does not support."
            )
    qkv_bias = f"{prefix}block1.0.attn.q.bias" in state_dict
    variant = next(
        (
            name
            for name, spec in MIT_VARIANTS.items()
            if spec.embed_dims == tuple(widths) and spec.depths == tuple(depths)
        ),
        None,
    )
    heads = MIT_VARIANTS[variant].num_heads if variant else _fallback_mit_heads(tuple(widths))
    spec = MiTSpec(
        embed_dims=tuple(widths),  # type: ignore[arg-type]
        num_heads=heads,
        depths=tuple(depths),  # type: ignore[arg-type]
        sr_ratios=tuple(sr_ratios),  # type: ignore[arg-type]
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
    )
    return spec, in_chans, variant


def _check_official_keys(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """One clear sentence for state dicts that are not official AllSpark/SegFormer checkpoints."""
    if any(k.startswith("decoder.allspark.embeddings.") or ".encoder.layer." in k for k in state_dict):
        raise CheckpointError(
            f"{source} holds the channel-transformer AllSpark block of the released weights "
            "('decoder.allspark.embeddings.*', 'encoder.layer.N.*'), which the released code (and so this package) "
            "does not implement; see the official repository's issue #3."
        )
    has_backbone = any(k.startswith("backbone.") for k in state_dict)
    if not has_backbone or "decoder.decoder.linear_pred.weight" not in state_dict:
        raise CheckpointError(
            f"{source} is not an official AllSpark/SegFormer checkpoint: it needs 'backbone.*' and "
            f"'decoder.decoder.linear_pred.weight', but its keys start with {_few(list(state_dict))}."
        )
    if "backbone.patch_embed1.proj.weight" not in state_dict:
        raise CheckpointError(
            f"{source} has a backbone that is not a MiT (no 'backbone.patch_embed1.proj.weight'; keys start with "
            f"{_few([k for k in state_dict if k.startswith('backbone.')])}); only MiT backbones are supported."
        )


def infer_official_layout(state_dict: Mapping[str, torch.Tensor], source: str = "The state dict") -> OfficialLayout:
    """Infer the architecture of an official AllSpark (or SegFormer-baseline) state dict from its tensors.

    MiT widths come from ``patch_embed{i}.proj.weight``, depths from the ``block{i}.{j}`` indices, reduction ratios
    from ``attn.sr``, the MLP ratio from ``mlp.fc1``. Attention heads are not stored in tensors: a known variant
    (``mit_b0`` .. ``mit_b5``) gets its heads (1, 2, 5, 8); other widths get, per stage, the largest divisor of the
    width not above that value (pass ``encoder_options={"num_heads": ...}`` to ``load_official_checkpoint`` when a
    custom model used others).

    Args:
        state_dict: Official keys, without ``module.``.
        source: How to name the checkpoint in errors.

    Raises:
        CheckpointError: Not an official checkpoint, a non-MiT backbone, or a non-square memory.
    """
    _check_official_keys(state_dict, source)
    spec, in_chans, variant = _infer_mit_spec(state_dict, "backbone.", source)
    num_classes = int(state_dict["decoder.decoder.linear_pred.weight"].shape[0])
    head_dim = int(_require(state_dict, "decoder.decoder.linear_c1.proj.weight", source, "head width").shape[0])
    if not any(k.startswith("decoder.allspark.") for k in state_dict):
        return OfficialLayout(spec, in_chans, variant, num_classes, head_dim, allspark=False)
    channels = int(_require(state_dict, "decoder.allspark.map_in.0.weight", source, "AllSpark width").shape[0])
    q_u = _require(state_dict, "decoder.allspark.attn.q_u.weight", source, "AllSpark heads")
    if q_u.shape[0] % channels:
        raise CheckpointError(f"{source}: 'q_u.weight' has {q_u.shape[0]} rows, not a multiple of C = {channels}.")
    queue = _require(state_dict, "decoder.allspark.attn.kv_queue", source, "Semantic Memory shape")
    if queue.ndim != 3:
        raise CheckpointError(f"{source}: 'kv_queue' has shape {tuple(queue.shape)}, expected (K, L, N).")
    k, length, tokens = (int(s) for s in queue.shape)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise CheckpointError(
            f"{source}: the Semantic Memory holds N = {tokens} tokens per slot, which is not a square grid as the "
            "official code requires."
        )
    return OfficialLayout(
        spec,
        in_chans,
        variant,
        num_classes,
        head_dim,
        allspark=True,
        num_heads=int(q_u.shape[0]) // channels,
        memory_shape=(k, length, tokens),
        grid=(side, side),
    )


def _build_from_layout(layout: OfficialLayout, source: str, overrides: dict[str, Any]) -> AllSparkSegmentor:
    """A faithful-mode segmentor of the inferred architecture, with user overrides of the free options."""
    determined = sorted(set(overrides) & set(_DETERMINED))
    if determined:
        raise ConfigError(
            f"{', '.join(determined)} cannot be overridden when loading {source}: the checkpoint's tensors fix them."
        )
    options = {**FAITHFUL_OPTIONS, **overrides}
    spec = layout.spec
    encoder_options = dict(options.pop("encoder_options", None) or {})
    if encoder_options:
        conflicting = [
            k for k, v in encoder_options.items() if k != "num_heads" and tuple(getattr(spec, k, ())) != tuple(v)
        ]
        if conflicting:
            raise ConfigError(
                f"encoder_options {conflicting} contradict {source}: only 'num_heads' (not stored in tensors) can be "
                "set when loading an official checkpoint."
            )
        if "num_heads" in encoder_options:
            spec = resolve_mit_spec(spec, num_heads=encoder_options["num_heads"])
    elif layout.variant is None:
        logger.info(
            "%s: MiT widths %s match no known variant; using heads %s (pass encoder_options={'num_heads': ...} "
            "to change).",
            source,
            spec.embed_dims,
            spec.num_heads,
        )
    encoder = MixVisionTransformer(
        spec,
        in_chans=layout.in_chans,
        drop_path_rate=options.pop("drop_path", 0.1),
        layer_norm_eps=options.pop("layer_norm_eps"),
    )
    if layout.allspark:
        assert layout.grid is not None and layout.num_heads is not None
        crop = options.pop("crop_size", 32 * layout.grid[0])
        crop_hw = (crop, crop) if isinstance(crop, int) else tuple(crop)
        if encoder.output_size(*crop_hw)[-1] != layout.grid:
            raise ConfigError(
                f"crop_size {crop} gives a {encoder.output_size(*crop_hw)[-1]} stage-4 grid but the Semantic Memory "
                f"of {source} holds a {layout.grid[0]} x {layout.grid[1]} grid."
            )
        options.update(crop_size=crop, num_heads=layout.num_heads)
    return build_model(
        encoder, num_classes=layout.num_classes, allspark=layout.allspark, head_dim=layout.head_dim, **options
    )


def load_official_checkpoint(path: str | Path, **overrides: Any) -> AllSparkSegmentor:
    """Build a faithful-mode model from a checkpoint of the official AllSpark code and load it.

    Reads a raw ``ModelBuilder`` state dict or the ``{"model": ..., "optimizer": ..., "epoch": ...}`` files of
    ``train_allspark.py``/``train_baseline_*.py``, keys with or without ``module.``. The architecture is inferred
    from the tensors (see :func:`infer_official_layout`); the model is in faithful mode (:data:`FAITHFUL_OPTIONS`:
    batch-coupled eval, logit grouping, randn memory, no memory all-gather, LayerNorm eps 1e-6), so its outputs,
    memory updates and gradients equal the official code's.

    Args:
        path: The checkpoint file.
        **overrides: ``build_model`` options the tensors do not fix, e.g. ``per_image_eval=True``,
            ``attn_dropout``, ``drop_path``, ``crop_size`` (must give the memory's grid), or
            ``encoder_options={"num_heads": (...)}`` for custom MiT widths.

    Returns:
        The model, in training mode as built; the memory's ``filled`` mask is all True (official slots start random).

    Raises:
        CheckpointError: Unreadable file, not an official checkpoint, or keys/shapes that do not match the inferred
            model (all problems in one message).
        ConfigError: An override of something the checkpoint fixes.
    """
    path = Path(path)
    source = f"Checkpoint {path}"
    state_dict = read_state_dict(path)
    layout = infer_official_layout(state_dict, source)
    model = _build_from_layout(layout, source, dict(overrides))
    expected = {k: v for k, v in model.state_dict().items() if k != _FILLED_KEY}
    mapped = {}
    unexpected = []
    for key, value in state_dict.items():
        ours = _ours_from_official(key)
        if ours is None or ours not in expected:
            unexpected.append(key)
        else:
            mapped[ours] = value
    missing, _, mismatched = _compare(mapped, expected)
    if missing or unexpected or mismatched:
        mismatched_official = [(official_key(k) or k, a, b) for k, a, b in mismatched]
        raise CheckpointError(
            f"{source} does not match the model inferred from it ({_describe(layout)}): "
            f"{_mismatch_report([official_key(k) or k for k in missing], unexpected, mismatched_official)}."
        )
    if layout.allspark:
        mapped[_FILLED_KEY] = torch.ones_like(model.state_dict()[_FILLED_KEY])
    model.load_state_dict(mapped, strict=True)
    logger.info("Loaded %s (%s).", source, _describe(layout))
    return model


def _describe(layout: OfficialLayout) -> str:
    spec = layout.spec
    mit = layout.variant or f"MiT widths {spec.embed_dims}, depths {spec.depths}"
    text = f"{mit}, K = {layout.num_classes}, head width {layout.head_dim}"
    if layout.allspark:
        text += f", AllSpark with {layout.num_heads} heads and a {'x'.join(map(str, layout.memory_shape or ()))} memory"
    return text + ("" if layout.allspark else ", no AllSpark")


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The segmentor inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    for _ in range(3):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _check_official_representable(model: nn.Module) -> None:
    def fail(reason: str) -> None:
        raise CheckpointError(f"This model cannot be written as an official AllSpark checkpoint: {reason}.")

    if not isinstance(model, AllSparkSegmentor):
        fail(f"it is a {type(model).__name__}, not an AllSparkSegmentor")
    if not isinstance(model.encoder, MixVisionTransformer):
        fail(f"its encoder is a {type(model.encoder).__name__}; the official code only has MiT backbones")
    if not isinstance(model.head, SegFormerHead) or len(model.head.in_channels) != 4:
        fail("its head is not a 4-stage SegFormer head")
    if model.encoder.layer_norm_eps != OFFICIAL_LAYER_NORM_EPS:
        logger.warning(
            "The encoder uses LayerNorm eps %g; the official code always uses %g, so it will compute slightly "
            "different features from these weights.",
            model.encoder.layer_norm_eps,
            OFFICIAL_LAYER_NORM_EPS,
        )
    block = model.allspark
    if block is None:
        return
    memory = block.memory
    if memory is None:
        fail("its AllSpark block has no Semantic Memory (the official block always has one)")
    assert memory is not None
    if memory.length != block.attn.dim or block.attn.k_mem is not None:
        fail(f"its memory length L = {memory.length} differs from the width C = {block.attn.dim} (official L = C)")
    if memory.grid[0] != memory.grid[1]:
        fail(f"its memory grid {memory.grid[0]} x {memory.grid[1]} is not square")
    if memory.init == "zeros" and not bool(memory.class_mask().all()):
        fail(
            "its zero-initialised memory has classes without any written slot, which it masks out of the attention "
            "but the official code would read as real keys"
        )


_OFFICIAL_ALLSPARK_ORDER = ("map_in.", "attn_norm.", "attn.queue_ptr", "attn.kv_queue", "attn.", "encoder_norm.")


def _official_rank(key: str) -> tuple[int, ...]:
    """Sort key reproducing the official ``ModelBuilder.state_dict()`` order (stable within a rank)."""
    if key.startswith("backbone."):
        rest = key[len("backbone.") :]
        m = re.match(r"(patch_embed|block|norm)(\d+)", rest)
        if m is None:
            return (0, 9)
        stage = int(m.group(2))
        return (0, 0, stage) if m.group(1) == "patch_embed" else (0, 1, stage, 0 if m.group(1) == "block" else 1)
    if key.startswith("decoder.allspark."):
        rest = key[len("decoder.allspark.") :]
        return (1, next((i for i, p in enumerate(_OFFICIAL_ALLSPARK_ORDER) if rest.startswith(p)), 6))
    m = re.match(r"decoder\.decoder\.linear_c(\d+)\.", key)
    if m is not None:
        return (2, 0, -int(m.group(1)))
    return (2, 1)


def to_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our segmentor's weights with the keys and order of the official ``ModelBuilder`` (no ``module.`` prefix).

    ``torch.save({"model": to_official_state_dict(m)}, p)`` writes a file the official code (and
    :func:`load_official_checkpoint`) loads; the round trip is lossless. Behaviour options (per-image eval, grouping
    on probabilities...) are not part of the weights.

    Args:
        model: An :class:`AllSparkSegmentor` with a MiT encoder, with or without AllSpark (DDP/compiled wrappers are
            unwrapped).

    Returns:
        ``{official_key: tensor}``; tensors share storage with the model (like ``state_dict()``).

    Raises:
        CheckpointError: The official code cannot represent the model (non-MiT encoder, memory length != C,
            non-square memory grid, a zero-initialised memory with never-written classes, no memory).
    """
    model = _unwrap_model(model)
    _check_official_representable(model)
    out = {}
    for key, value in model.state_dict().items():
        theirs = official_key(key)
        if theirs is None:
            if key == _FILLED_KEY:
                continue
            raise CheckpointError(f"This model cannot be written as an official AllSpark checkpoint: '{key}'.")
        out[theirs] = value
    return dict(sorted(out.items(), key=lambda item: _official_rank(item[0])))


# ---------------------------------------------------------------------------------------------------------------------
# MiT encoder weights: NVlabs ImageNet files and Hugging Face SegFormer folders
# ---------------------------------------------------------------------------------------------------------------------
_HF_BLOCK_MODULES = {
    # legacy layout (save_pretrained output and the published nvidia/mit-b* files) | transformers 5 module names
    "layer_norm_1": "norm1",
    "layernorm_before": "norm1",
    "attention.self.query": "attn.q",
    "attention.q_proj": "attn.q",
    "attention.self.key": "attn.kv#k",
    "attention.k_proj": "attn.kv#k",
    "attention.self.value": "attn.kv#v",
    "attention.v_proj": "attn.kv#v",
    "attention.self.sr": "attn.sr",
    "attention.sequence_reduction.sequence_reduction": "attn.sr",
    "attention.self.layer_norm": "attn.norm",
    "attention.sequence_reduction.layer_norm": "attn.norm",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_norm_2": "norm2",
    "layernorm_after": "norm2",
    "mlp.dense1": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.dense2": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
}
_HF_BLOCK = re.compile(r"(?:encoder\.block\.(\d+)\.(\d+)|stages\.(\d+)\.blocks\.(\d+))\.(.+)\.(weight|bias)")
_HF_PATCH = re.compile(
    r"(?:encoder\.patch_embeddings\.(\d+)|stages\.(\d+)\.patch_embeddings)\.(proj|layer_norm)\.(weight|bias)"
)
_HF_NORM = re.compile(r"(?:encoder\.layer_norm\.(\d+)|stages\.(\d+)\.layer_norm)\.(weight|bias)")
_HF_IGNORED = ("decode_head.", "classifier.")
_NVLABS_IGNORED = ("head.",)


def _hf_key_to_ours(key: str) -> str | None:
    """Our MiT key of a Hugging Face SegFormer encoder key (``...kv#k``/``#v`` for the halves of ``attn.kv``)."""
    if m := _HF_PATCH.fullmatch(key):
        stage = int(m.group(1) or m.group(2)) + 1
        return f"patch_embed{stage}.{'proj' if m.group(3) == 'proj' else 'norm'}.{m.group(4)}"
    if m := _HF_NORM.fullmatch(key):
        return f"norm{int(m.group(1) or m.group(2)) + 1}.{m.group(3)}"
    if m := _HF_BLOCK.fullmatch(key):
        stage = int(m.group(1) if m.group(1) is not None else m.group(3)) + 1
        index = int(m.group(2) if m.group(2) is not None else m.group(4))
        module = _HF_BLOCK_MODULES.get(m.group(5))
        if module is None:
            return None
        name, _, part = module.partition("#")
        return f"block{stage}.{index}.{name}.{m.group(6)}" + (f"#{part}" if part else "")
    return None


def _is_hf_layout(keys: Iterable[str]) -> bool:
    return any(k.startswith(("encoder.patch_embeddings.", "encoder.block.", "stages.")) for k in keys)


def _hf_to_mit_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str]]:
    """Rename HF encoder tensors to our MiT keys; returns (tensors, unexpected, ignored, incomplete kv keys)."""
    out: dict[str, torch.Tensor] = {}
    halves: dict[str, dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    ignored: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(_HF_IGNORED):
            ignored.append(key)
            continue
        ours = _hf_key_to_ours(key)
        if ours is None:
            unexpected.append(key)
        elif "#" in ours:
            name, part = ours.split("#")
            halves.setdefault(name, {})[part] = value
        else:
            out[ours] = value
    incomplete = []
    for name, parts in halves.items():
        if set(parts) == {"k", "v"}:
            out[name] = torch.cat([parts["k"], parts["v"]], dim=0)  # kv rows: keys first, then values
        else:
            incomplete.append(name)
    return out, unexpected, ignored, incomplete


def _read_hf_directory(directory: Path) -> dict[str, torch.Tensor]:
    """Tensors of a Hugging Face model folder: (sharded) safetensors first, then (sharded) pytorch_model.bin."""
    for name, reader in (("model.safetensors", _load_safetensors), ("pytorch_model.bin", read_state_dict)):
        single = directory / name
        if single.is_file():
            return dict(reader(single))
        index = directory / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid Hugging Face shard index ({e}).") from e
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                tensors.update(reader(directory / shard))
            return tensors
    raise CheckpointError(
        f"{directory} has no model.safetensors or pytorch_model.bin (nor a sharded index): it is not a Hugging Face "
        "model folder."
    )


def _read_hf_config(directory: Path) -> dict[str, Any] | None:
    path = directory / "config.json" if directory.is_dir() else directory
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a Hugging Face config (expected a JSON object).")
    return config


def _spec_from_hf_config(config: Mapping[str, Any], source: str) -> tuple[MiTSpec, int]:
    """MiT spec and input channels of a SegFormer ``config.json``; raises for what our MiT cannot express."""
    if config.get("model_type", "segformer") != "segformer":
        raise CheckpointError(f"{source} describes a '{config.get('model_type')}' model, not a SegFormer/MiT.")
    defaults = {
        "num_encoder_blocks": 4,
        "depths": [2, 2, 2, 2],
        "sr_ratios": [8, 4, 2, 1],
        "hidden_sizes": [32, 64, 160, 256],
        "patch_sizes": [7, 3, 3, 3],
        "strides": [4, 2, 2, 2],
        "num_attention_heads": [1, 2, 5, 8],
        "mlp_ratios": [4, 4, 4, 4],
        "hidden_act": "gelu",
        "num_channels": 3,
    }
    c = {k: config.get(k, v) for k, v in defaults.items()}
    unsupported = []
    if c["num_encoder_blocks"] != 4:
        unsupported.append(f"num_encoder_blocks={c['num_encoder_blocks']} (MiT has 4 stages)")
    if list(c["patch_sizes"]) != [7, 3, 3, 3] or list(c["strides"]) != [4, 2, 2, 2]:
        unsupported.append(f"patch_sizes={c['patch_sizes']}/strides={c['strides']} (MiT uses 7,3,3,3 / 4,2,2,2)")
    if c["hidden_act"] != "gelu":
        unsupported.append(f"hidden_act={c['hidden_act']!r} (MiT uses exact GELU)")
    if len(set(c["mlp_ratios"])) != 1:
        unsupported.append(f"mlp_ratios={c['mlp_ratios']} (one ratio for all stages)")
    if unsupported:
        raise CheckpointError(
            f"{source} describes a SegFormer this package's MiT cannot build: {'; '.join(unsupported)}."
        )
    spec = MiTSpec(
        embed_dims=tuple(c["hidden_sizes"]),  # type: ignore[arg-type]
        num_heads=tuple(c["num_attention_heads"]),  # type: ignore[arg-type]
        depths=tuple(c["depths"]),  # type: ignore[arg-type]
        sr_ratios=tuple(c["sr_ratios"]),  # type: ignore[arg-type]
        mlp_ratio=float(c["mlp_ratios"][0]),
        qkv_bias=True,
    )
    return spec, int(c["num_channels"])


def mit_from_hf_config(path: str | Path, *, drop_path_rate: float | None = None) -> MixVisionTransformer:
    """Build an (untrained) MiT encoder matching a Hugging Face SegFormer ``config.json``.

    The encoder uses Hugging Face's LayerNorm eps (1e-5 everywhere) and always returns four NCHW maps (HF's
    ``reshape_last_stage=False`` only changes how HF returns the last map). Load the weights with
    :func:`load_encoder_weights`.

    Args:
        path: A model folder or its ``config.json``.
        drop_path_rate: Stochastic depth; None takes the config's ``drop_path_rate`` (HF default 0.1).

    Raises:
        CheckpointError: No config, or a config our MiT cannot express (other patch sizes, activation, stage count).
    """
    path = Path(path)
    config = _read_hf_config(path)
    if config is None:
        raise CheckpointError(f"{path} has no config.json: it is not a Hugging Face model folder.")
    spec, in_chans = _spec_from_hf_config(config, str(path))
    rate = float(config.get("drop_path_rate", 0.1)) if drop_path_rate is None else drop_path_rate
    return MixVisionTransformer(spec, in_chans=in_chans, drop_path_rate=rate, layer_norm_eps=HF_LAYER_NORM_EPS)


def _check_hf_config_matches(encoder: MixVisionTransformer, config: Mapping[str, Any], source: str) -> None:
    """Attention heads live only in config.json: compare the architecture before loading."""
    spec, _ = _spec_from_hf_config(config, source)
    mine = encoder.spec
    diffs = [
        f"{name} {getattr(spec, attr)} vs encoder {getattr(mine, attr)}"
        for name, attr in (
            ("hidden_sizes", "embed_dims"),
            ("depths", "depths"),
            ("num_attention_heads", "num_heads"),
            ("sr_ratios", "sr_ratios"),
            ("mlp_ratios", "mlp_ratio"),
        )
        if getattr(spec, attr) != getattr(mine, attr)
    ]
    if diffs:
        raise CheckpointError(
            f"{source} describes another MiT than the encoder ({'; '.join(diffs)}): build the encoder with "
            "mit_from_hf_config(path) or the matching variant."
        )


def _set_block_eps(encoder: MixVisionTransformer, eps: float, source: str) -> None:
    """Set the eps of the block (``norm1``/``norm2``) and stage (``norm{i}``) LayerNorms."""
    old = encoder.layer_norm_eps
    for i in range(1, 5):
        getattr(encoder, f"norm{i}").eps = eps
        for block in getattr(encoder, f"block{i}"):
            block.norm1.eps = eps
            block.norm2.eps = eps
    encoder.layer_norm_eps = eps
    if old != eps:
        logger.info("Block and stage LayerNorm eps set from %g to %g to match the weights of %s.", old, eps, source)


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> list[str]:
    """Initialise a MiT encoder from ImageNet or Hugging Face weights on disk.

    Sources:
        - the NVlabs ImageNet file ``mit_bX.pth`` (keys ``patch_embed1.proj.weight``, ``block1.0.attn.kv.weight``...,
          optionally under ``state_dict``/``model``; its classifier ``head.*`` is ignored), or the ``backbone.*`` of
          an official AllSpark checkpoint (its ``decoder.*`` is ignored);
        - a Hugging Face folder (``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``, sharded or
          not) saved by ``SegformerModel``, ``SegformerForImageClassification`` (the published ``nvidia/mit-b*``) or
          ``SegformerForSemanticSegmentation``, in the legacy key layout (``encoder.block.0.0.attention.self.query``,
          what ``save_pretrained`` writes) or the transformers 5 module layout (``stages.0.blocks.0.attention.q_proj``);
          separate key/value projections are concatenated into ``attn.kv``; ``decode_head.*``/``classifier.*`` are
          ignored.

    The LayerNorm eps follows the source of the weights: the encoder's block and stage norms are set to 1e-5 for
    Hugging Face weights (what every HF SegFormer LayerNorm uses, whatever its config's ``layer_norm_eps`` says)
    and to 1e-6 for NVlabs/official weights; the change is logged.

    Args:
        encoder: A :class:`~allspark_seg.models.MixVisionTransformer`.
        path: A weight file or a Hugging Face model folder.

    Returns:
        The keys of the file that were ignored (classification or decode heads).

    Raises:
        CheckpointError: Unreadable file, not MiT weights, a config.json describing another architecture, or
            missing/unexpected keys and shape mismatches (all listed in one message). Nothing is loaded then.
    """
    if not isinstance(encoder, MixVisionTransformer):
        raise ConfigError(f"load_encoder_weights needs a MixVisionTransformer, got a {type(encoder).__name__}.")
    path = Path(path)
    if path.is_dir():
        source = f"Hugging Face folder {path}"
        config = _read_hf_config(path)
        if config is not None:
            _check_hf_config_matches(encoder, config, f"{path / 'config.json'}")
        state_dict = _strip_prefix(_read_hf_directory(path), "segformer.")
    else:
        source = f"weight file {path}"
        state_dict = _strip_prefix(read_state_dict(path), "segformer.")
    is_hf = _is_hf_layout(state_dict)
    if is_hf:
        tensors, unexpected, ignored, incomplete = _hf_to_mit_state_dict(state_dict)
        eps = HF_LAYER_NORM_EPS
    else:
        if "backbone.patch_embed1.proj.weight" in state_dict:
            ignored = [k for k in state_dict if not k.startswith("backbone.")]
            state_dict = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        else:
            ignored = [k for k in state_dict if k.startswith(_NVLABS_IGNORED)]
        if "patch_embed1.proj.weight" not in state_dict:
            raise CheckpointError(
                f"The {source} holds no MiT encoder weights (no 'patch_embed1.proj.weight' nor Hugging Face "
                f"SegFormer keys); its keys start with {_few(list(state_dict))}."
            )
        tensors = {k: v for k, v in state_dict.items() if k not in ignored}
        unexpected, incomplete = [], []
        eps = OFFICIAL_LAYER_NORM_EPS
    target = encoder.state_dict()
    missing, extra, mismatched = _compare(tensors, target)
    missing = [f"{k} (needs both key and value)" if k in incomplete else k for k in missing]
    unexpected = unexpected + extra
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"The {source} does not fit the encoder (widths {encoder.spec.embed_dims}, depths {encoder.spec.depths}): "
            f"{_mismatch_report(missing, unexpected, mismatched)}."
        )
    encoder.load_state_dict(tensors, strict=True)
    _set_block_eps(encoder, eps, source)
    logger.info("Loaded MiT weights from the %s (%d tensors, %d ignored).", source, len(tensors), len(ignored))
    return ignored


def to_hf_state_dict(encoder: MixVisionTransformer, prefix: str = "") -> dict[str, torch.Tensor]:
    """Our MiT weights in Hugging Face's legacy SegFormer layout (what ``save_pretrained`` writes).

    Save them with :func:`hf_config_dict` as ``config.json`` and ``model.safetensors`` to get a folder that
    ``SegformerModel.from_pretrained`` loads (``prefix="segformer."`` for the task models). An encoder without
    q/kv biases gets zero biases (HF always has them), which is exact.

    Args:
        encoder: The MiT encoder.
        prefix: Prepended to every key.

    Returns:
        ``{hf_key: tensor}``.
    """
    out: dict[str, torch.Tensor] = {}
    reverse = {
        "norm1": "layer_norm_1",
        "attn.q": "attention.self.query",
        "attn.sr": "attention.self.sr",
        "attn.norm": "attention.self.layer_norm",
        "attn.proj": "attention.output.dense",
        "norm2": "layer_norm_2",
        "mlp.fc1": "mlp.dense1",
        "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
        "mlp.fc2": "mlp.dense2",
    }
    for key, value in encoder.state_dict().items():
        if m := re.fullmatch(r"patch_embed(\d)\.(proj|norm)\.(weight|bias)", key):
            name = "proj" if m.group(2) == "proj" else "layer_norm"
            out[f"encoder.patch_embeddings.{int(m.group(1)) - 1}.{name}.{m.group(3)}"] = value
        elif m := re.fullmatch(r"norm(\d)\.(weight|bias)", key):
            out[f"encoder.layer_norm.{int(m.group(1)) - 1}.{m.group(2)}"] = value
        elif m := re.fullmatch(r"block(\d)\.(\d+)\.(.+)\.(weight|bias)", key):
            base = f"encoder.block.{int(m.group(1)) - 1}.{m.group(2)}."
            if m.group(3) == "attn.kv":
                k, v = value.chunk(2, dim=0)
                out[base + f"attention.self.key.{m.group(4)}"] = k
                out[base + f"attention.self.value.{m.group(4)}"] = v
            else:
                out[base + f"{reverse[m.group(3)]}.{m.group(4)}"] = value
    if not encoder.spec.qkv_bias:
        for i, depth in enumerate(encoder.spec.depths):
            for j in range(depth):
                for name in ("query", "key", "value"):
                    weight = out[f"encoder.block.{i}.{j}.attention.self.{name}.weight"]
                    out[f"encoder.block.{i}.{j}.attention.self.{name}.bias"] = weight.new_zeros(weight.shape[0])
    return {prefix + k: v for k, v in out.items()}


def hf_config_dict(encoder: MixVisionTransformer) -> dict[str, Any]:
    """A ``SegformerConfig`` dict (for ``config.json``) describing the encoder; HF always uses LayerNorm eps 1e-5."""
    spec = encoder.spec
    if encoder.layer_norm_eps != HF_LAYER_NORM_EPS:
        logger.warning(
            "The encoder uses LayerNorm eps %g but Hugging Face's SegFormer always uses %g: its features will differ "
            "slightly there.",
            encoder.layer_norm_eps,
            HF_LAYER_NORM_EPS,
        )
    return {
        "model_type": "segformer",
        "architectures": ["SegformerModel"],
        "num_channels": int(encoder.patch_embed1.proj.in_channels),
        "num_encoder_blocks": 4,
        "depths": list(spec.depths),
        "sr_ratios": list(spec.sr_ratios),
        "hidden_sizes": list(spec.embed_dims),
        "patch_sizes": [7, 3, 3, 3],
        "strides": [4, 2, 2, 2],
        "num_attention_heads": list(spec.num_heads),
        "mlp_ratios": [int(spec.mlp_ratio) if float(spec.mlp_ratio).is_integer() else spec.mlp_ratio] * 4,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.1,
        "reshape_last_stage": True,
    }
