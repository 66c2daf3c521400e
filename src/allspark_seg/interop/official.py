"""Official AllSpark checkpoints in and out.

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

Every file is read by :func:`~allspark_seg.models.pretrained.read_state_dict` (``torch.load(...,
weights_only=True)``: tensors and plain containers only, never code; the numpy scalars the official script stores next
to the weights, ``previous_best``, are allowed as data), and key problems are reported by its mismatch report.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..models.factory import build_model
from ..models.head import SegFormerHead
from ..models.mit import MIT_VARIANTS, MiTSpec, MixVisionTransformer, resolve_mit_spec
from ..models.pretrained import (
    OFFICIAL_LAYER_NORM_EPS,
    compare_state_dicts,
    few_keys,
    mismatch_report,
    read_state_dict,
)
from ..models.segmentor import AllSparkSegmentor
from ..utils.sizes import to_pair

__all__ = [
    "FAITHFUL_OPTIONS",
    "OfficialLayout",
    "infer_official_layout",
    "load_official_checkpoint",
    "official_key",
    "to_official_state_dict",
]

logger = logging.getLogger(__name__)

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
# Reading official checkpoints
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
            f"'decoder.decoder.linear_pred.weight', but its keys start with {few_keys(list(state_dict))}."
        )
    if "backbone.patch_embed1.proj.weight" not in state_dict:
        raise CheckpointError(
            f"{source} has a backbone that is not a MiT (no 'backbone.patch_embed1.proj.weight'; keys start with "
            f"{few_keys([k for k in state_dict if k.startswith('backbone.')])}); only MiT backbones are supported."
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
        crop_hw = to_pair(crop)
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
    missing, _, mismatched = compare_state_dicts(mapped, expected)
    if missing or unexpected or mismatched:
        mismatched_official = [(official_key(k) or k, a, b) for k, a, b in mismatched]
        raise CheckpointError(
            f"{source} does not match the model inferred from it ({_describe(layout)}): "
            f"{mismatch_report([official_key(k) or k for k in missing], unexpected, mismatched_official)}."
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


# ---------------------------------------------------------------------------------------------------------------------
# Writing official checkpoints
# ---------------------------------------------------------------------------------------------------------------------
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
