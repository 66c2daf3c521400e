"""Weights in and out: official AllSpark checkpoints, NVlabs MiT ImageNet files and Hugging Face SegFormer folders.

- :mod:`.official`: official AllSpark checkpoints in (:func:`load_official_checkpoint`, :func:`infer_official_layout`)
  and out (:func:`to_official_state_dict`), the key map (:func:`official_key`) and :data:`FAITHFUL_OPTIONS`.
- :mod:`.huggingface`: Hugging Face SegFormer folders in (:func:`mit_from_hf_config`) and out
  (:func:`to_hf_state_dict`, :func:`hf_config_dict`).
- Reading weight files, the mismatch report and the MiT/CNN encoder weight formats (:func:`read_state_dict`,
  :func:`state_dict_mismatch`, :func:`load_encoder_weights`) live in :mod:`allspark_seg.models.pretrained` and are
  re-exported here.
"""

from __future__ import annotations

from ..models.pretrained import (
    HF_LAYER_NORM_EPS,
    OFFICIAL_LAYER_NORM_EPS,
    load_encoder_weights,
    read_state_dict,
    state_dict_mismatch,
)
from .huggingface import hf_config_dict, mit_from_hf_config, to_hf_state_dict
from .official import (
    FAITHFUL_OPTIONS,
    OfficialLayout,
    infer_official_layout,
    load_official_checkpoint,
    official_key,
    to_official_state_dict,
)

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
    "state_dict_mismatch",
    "to_hf_state_dict",
    "to_official_state_dict",
]
