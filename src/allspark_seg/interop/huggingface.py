"""Hugging Face SegFormer folders in and out for the MiT encoder.

In: :func:`mit_from_hf_config` builds the MiT a folder's ``config.json`` describes; its weights load with
:func:`~allspark_seg.models.pretrained.load_encoder_weights` (re-exported here), which reads both Hugging Face key
layouts. Out: :func:`to_hf_state_dict` and :func:`hf_config_dict` give the ``model.safetensors`` tensors and the
``config.json`` of a folder that ``SegformerModel.from_pretrained`` loads. Hugging Face's SegFormer uses LayerNorm eps
1e-5 everywhere (:data:`HF_LAYER_NORM_EPS`), the NVlabs/official code 1e-6.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..models.mit import MixVisionTransformer
from ..models.pretrained import HF_LAYER_NORM_EPS, hf_mit_spec, load_encoder_weights, read_hf_config

__all__ = ["HF_LAYER_NORM_EPS", "hf_config_dict", "load_encoder_weights", "mit_from_hf_config", "to_hf_state_dict"]

logger = logging.getLogger(__name__)


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
    config = read_hf_config(path)
    if config is None:
        raise CheckpointError(f"{path} has no config.json: it is not a Hugging Face model folder.")
    spec, in_chans = hf_mit_spec(config, str(path))
    rate = float(config.get("drop_path_rate", 0.1)) if drop_path_rate is None else drop_path_rate
    return MixVisionTransformer(spec, in_chans=in_chans, drop_path_rate=rate, layer_norm_eps=HF_LAYER_NORM_EPS)


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
