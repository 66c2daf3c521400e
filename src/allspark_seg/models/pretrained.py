"""Encoder weights on disk: safe reading of weight files, the one state-dict mismatch report, the encoder formats.

Reading (:func:`read_state_dict`): every file goes through ``torch.load(..., weights_only=True)`` (tensors and plain
containers only, never code; the numpy scalars the official script stores next to the weights are allowed as data)
or ``safetensors``; the tensors are unwrapped from ``model``/``state_dict`` and DDP's ``module.`` prefix is dropped.

Comparing (:func:`compare_state_dicts`, :func:`mismatch_report`, :func:`state_dict_mismatch`): the missing,
unexpected and mis-shaped keys of a file against a model, in one line. Every loader of the package reports with it.

Encoder formats:
    - MiT (:func:`load_encoder_weights`): NVlabs ImageNet files ``mit_bX.pth``, the ``backbone.*`` of official
      AllSpark checkpoints, and Hugging Face SegFormer folders (both key layouts, see ``_HF_BLOCK_MODULES``).
    - Convolutional encoders (:func:`load_weight_file`): files whose keys are the encoder's own plus a classification
      head (torchvision's MobileNetV2, ``efficientnet_pytorch``'s EfficientNet-Lite0).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, MissingExtraError
from .mit import MiTSpec, MixVisionTransformer

__all__ = [
    "HF_LAYER_NORM_EPS",
    "OFFICIAL_LAYER_NORM_EPS",
    "compare_state_dicts",
    "few_keys",
    "hf_mit_spec",
    "load_encoder_weights",
    "load_weight_file",
    "mismatch_report",
    "read_hf_config",
    "read_state_dict",
    "state_dict_mismatch",
]

logger = logging.getLogger(__name__)

OFFICIAL_LAYER_NORM_EPS = 1e-6
"""eps of the MiT block and stage LayerNorms in the NVlabs/AllSpark code."""
HF_LAYER_NORM_EPS = 1e-5
"""eps of every LayerNorm of Hugging Face's SegFormer (``nn.LayerNorm`` default; its ``layer_norm_eps`` is unused)."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------------
def _numpy_scalar_globals() -> list[Any]:
    """Globals that rebuild numpy scalars (data only), e.g. the official ``previous_best`` (an ``np.float64``)."""
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
        what = f"a {type(obj).__name__}" if not isinstance(obj, Mapping) else f"a dict with keys {few_keys(list(obj))}"
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


# ---------------------------------------------------------------------------------------------------------------------
# The mismatch report
# ---------------------------------------------------------------------------------------------------------------------
def few_keys(keys: Iterable[str], limit: int = 4) -> str:
    """The first ``limit`` keys, comma-separated, then ``' and N more'`` (``'a, b, c, d and 2 more'``)."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def mismatch_report(
    missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
) -> str:
    """``'2 missing keys (a, b); 1 shape mismatch (c: file (3, 4) vs model (3, 5))'``."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' * (len(missing) > 1)} ({few_keys(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) > 1)} ({few_keys(unexpected)})")
    if mismatched:
        shown = [f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched]
        parts.append(f"{len(mismatched)} shape mismatch{'es' * (len(mismatched) > 1)} ({few_keys(shown, 3)})")
    return "; ".join(parts)


def compare_state_dicts(
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
    return mismatch_report(*compare_state_dicts(source, target))


# ---------------------------------------------------------------------------------------------------------------------
# MiT encoder weights: NVlabs ImageNet files, official backbones and Hugging Face SegFormer folders
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


def read_hf_config(directory: Path) -> dict[str, Any] | None:
    """The ``config.json`` of a Hugging Face folder (or the file itself) as a dict, None when there is none.

    Raises:
        CheckpointError: The file is not a JSON object.
    """
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


def hf_mit_spec(config: Mapping[str, Any], source: str) -> tuple[MiTSpec, int]:
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


def _check_hf_config_matches(encoder: MixVisionTransformer, config: Mapping[str, Any], source: str) -> None:
    """Attention heads live only in config.json: compare the architecture before loading."""
    spec, _ = hf_mit_spec(config, source)
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
        config = read_hf_config(path)
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
                f"SegFormer keys); its keys start with {few_keys(list(state_dict))}."
            )
        tensors = {k: v for k, v in state_dict.items() if k not in ignored}
        unexpected, incomplete = [], []
        eps = OFFICIAL_LAYER_NORM_EPS
    target = encoder.state_dict()
    missing, extra, mismatched = compare_state_dicts(tensors, target)
    missing = [f"{k} (needs both key and value)" if k in incomplete else k for k in missing]
    unexpected = unexpected + extra
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"The {source} does not fit the encoder (widths {encoder.spec.embed_dims}, depths {encoder.spec.depths}): "
            f"{mismatch_report(missing, unexpected, mismatched)}."
        )
    encoder.load_state_dict(tensors, strict=True)
    _set_block_eps(encoder, eps, source)
    logger.info("Loaded MiT weights from the %s (%d tensors, %d ignored).", source, len(tensors), len(ignored))
    return ignored


# ---------------------------------------------------------------------------------------------------------------------
# Convolutional encoder weights: the encoder's own keys plus an ignored classification head
# ---------------------------------------------------------------------------------------------------------------------
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
    state_dict = read_state_dict(path)
    if anchor not in state_dict:
        raise CheckpointError(
            f"The weight file {path} holds no {architecture} weights (no '{anchor}'); its keys start with "
            f"{few_keys(state_dict)}."
        )
    skipped = [k for k in state_dict if k.startswith(ignored)]
    tensors = {k: v for k, v in state_dict.items() if not k.startswith(ignored)}
    report = state_dict_mismatch(tensors, encoder.state_dict())
    if report:
        raise CheckpointError(f"The weight file {path} does not fit the {architecture} encoder: {report}.")
    encoder.load_state_dict(tensors, strict=True)
    logger.info(
        "Loaded %s weights from %s (%d tensors, %d head keys ignored).", architecture, path, len(tensors), len(skipped)
    )
    return skipped
