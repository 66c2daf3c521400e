"""Building a segmentor: the encoder registry, :func:`build_model`, and building the model a run config describes.

Train, eval, predict and export all build their model with :func:`build_model_from_config` (the arguments come from
:func:`model_kwargs`), so a stored config rebuilds the model that wrote a checkpoint. This module reads a
``RunConfig`` but never imports the ``config`` package at run time (``config`` imports ``models`` for the encoder
names).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from ..errors import ConfigError
from ..utils.sizes import to_pair
from .allspark import AllSparkBlock
from .cnn import check_no_mit_options
from .efficientnet import EfficientNetLite0Encoder
from .head import SegFormerHead
from .hf import build_hf_encoder
from .mit import MIT_VARIANTS, MiTSpec, MixVisionTransformer, resolve_mit_spec
from .mobilenet import MobileNetV2Encoder
from .pretrained import load_encoder_weights
from .segmentor import AllSparkSegmentor

if TYPE_CHECKING:  # annotations only: the config package imports this one
    from ..config.schema import RunConfig

__all__ = [
    "CNN_ENCODERS",
    "ENCODER_NAMES",
    "HF_ENCODER_PREFIX",
    "build_model",
    "build_model_from_config",
    "model_kwargs",
    "record_built_model",
]

#: Convolutional encoders built by name (fixed architectures; ImageNet weights through ``pretrained``).
CNN_ENCODERS: dict[str, type[nn.Module]] = {
    "mobilenet_v2": MobileNetV2Encoder,
    "efficientnet_lite0": EfficientNetLite0Encoder,
}

#: Every encoder name :func:`build_model` takes: the MiT variants, then the convolutional encoders.
ENCODER_NAMES: tuple[str, ...] = (*MIT_VARIANTS, *CNN_ENCODERS)

#: ``model.encoder: hf:DIR`` names a Hugging Face backbone folder (``models.hf``) instead of a built-in encoder.
HF_ENCODER_PREFIX = "hf:"


def build_model(
    encoder: str | MiTSpec | nn.Module = "mit_b5",
    num_classes: int = 21,
    allspark: bool = True,
    *,
    crop_size: int | Sequence[int] = 513,
    head_dim: int = 768,
    head_dropout: float = 0.1,
    drop_path: float = 0.1,
    layer_norm_eps: float = 1e-6,
    encoder_options: dict[str, Any] | None = None,
    num_heads: int = 2,
    memory: bool = True,
    memory_length: int | None = None,
    memory_init: Literal["randn", "zeros"] = "randn",
    attn_dropout: float = 0.1,
    grouping: Literal["logits", "probs"] = "logits",
    grouping_resize: Literal["bilinear", "area"] = "bilinear",
    per_image_eval: bool = True,
    gather_memory: bool = True,
    pretrained: str | None = None,
    infer_memory: bool = False,
) -> AllSparkSegmentor:
    """Build an AllSpark (or plain SegFormer) segmentor.

    Args:
        encoder: A MiT variant name (``mit_b0`` .. ``mit_b5``), a ``MiTSpec``, ``mobilenet_v2`` or
            ``efficientnet_lite0`` (see ``models.mobilenet``, ``models.efficientnet``), or an encoder module that
            returns a list of NCHW maps and exposes ``out_channels`` and ``output_size(h, w)`` (see ``models.hf``);
            a module with a ``load_pretrained(path)`` method loads ``pretrained`` itself.
        num_classes: Number of classes K.
        allspark: Put the AllSpark block on the last stage (False gives the paper's SegFormer baselines).
        crop_size: Training crop ``int`` or ``(h, w)``; fixes the memory grid from the encoder's stride arithmetic
            (the official ``(crop // 32 + 1) ** 2`` is wrong for multiples of 32 and for rectangles).
        head_dim: Width of the SegFormer head (768 in AllSpark).
        head_dropout: Dropout2d rate before the classifier.
        drop_path: Stochastic depth rate of the MiT encoder (ignored by the CNN encoders).
        layer_norm_eps: eps of the MiT block/stage norms (1e-6 official, 1e-5 for Hugging Face weights; ignored by
            the CNN encoders).
        encoder_options: Overrides of ``MiTSpec`` fields, e.g. ``{"embed_dims": (8, 16, 32, 64)}`` for tiny models
            (refused for the CNN encoders, whose architecture is fixed).
        num_heads: Heads of the AllSpark unlabeled self-attention.
        memory: Give the block a Semantic Memory.
        memory_length: Slots per class; None = the stage-4 width C (official).
        memory_init: ``randn`` (official) or ``zeros`` with empty classes masked.
        attn_dropout: AllSpark attention/projection dropout.
        grouping: Channel grouping on teacher ``logits`` (official) or ``probs`` (paper).
        grouping_resize: ``bilinear`` (official) or ``area`` downsampling of the guide maps.
        per_image_eval: Eval predictions independent of the rest of the batch (default) or batch-coupled (official).
        gather_memory: All-gather unlabeled channels across processes before enqueueing (default); False keeps
            local enqueues (the official behaviour relies on DDP's buffer broadcast from rank 0).
        pretrained: Local path of ImageNet encoder weights: NVlabs ``mit_bX.pth`` or a Hugging Face directory for
            MiT, torchvision's ``mobilenet_v2-b0353104.pth`` for ``mobilenet_v2``, ``efficientnet-lite0-57934424.pth``
            (``efficientnet_pytorch`` layout) for ``efficientnet_lite0``; their classification heads are ignored.
        infer_memory: Inference reads the Semantic Memory as the labeled training stream does after the warm-up
            (needs ``memory``); False (official) uses the image's own keys (see :class:`AllSparkBlock`).

    Returns:
        The segmentor, with ``.encoder``, ``.head`` and ``.allspark`` (None when ``allspark=False``).
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}.")
    for name, value, valid in (
        ("memory_init", memory_init, ("randn", "zeros")),
        ("grouping", grouping, ("logits", "probs")),
        ("grouping_resize", grouping_resize, ("bilinear", "area")),
    ):
        if value not in valid:
            raise ConfigError(f"Unknown {name} '{value}': choose one of {', '.join(valid)}.")
    if memory_length is not None and memory_length < 1:
        raise ConfigError(f"memory_length must be positive, got {memory_length}.")
    if allspark and infer_memory and not memory:
        raise ConfigError("infer_memory=True reads the Semantic Memory at inference: it needs memory=True.")
    if isinstance(encoder, nn.Module):
        enc = encoder
    elif isinstance(encoder, str) and encoder in CNN_ENCODERS:
        check_no_mit_options(encoder, encoder_options)
        enc = CNN_ENCODERS[encoder]()
    else:
        spec = resolve_mit_spec(encoder, **(encoder_options or {}))
        enc = MixVisionTransformer(spec, drop_path_rate=drop_path, layer_norm_eps=layer_norm_eps)
    if pretrained and callable(getattr(enc, "load_pretrained", None)):
        enc.load_pretrained(pretrained)
    elif pretrained:
        load_encoder_weights(enc, pretrained)
    channels = tuple(enc.out_channels)
    head = SegFormerHead(channels, num_classes, embed_dim=head_dim, dropout=head_dropout)
    block = None
    if allspark:
        grid = enc.output_size(*to_pair(crop_size))[-1]
        block = AllSparkBlock(
            channels[-1],
            num_classes,
            grid,
            num_heads=num_heads,
            per_image_eval=per_image_eval,
            infer_memory=infer_memory,
            memory=memory,
            memory_length=memory_length,
            memory_init=memory_init,
            attn_dropout=attn_dropout,
            grouping=grouping,
            grouping_resize=grouping_resize,
            gather_memory=gather_memory,
        )
    return AllSparkSegmentor(enc, head, block)


def _config_crop(cfg: RunConfig) -> tuple[int, int]:
    """``data.crop_size`` of a resolved config as ``(h, w)``.

    Raises:
        ConfigError: The crop is still ``auto`` (the data decides it when it is opened).
    """
    crop = cfg.data.crop_size
    if isinstance(crop, str):
        raise ConfigError(
            f"Config key 'data.crop_size' is '{crop}': the crop is decided from the training images when the data is "
            "opened (allspark-seg train does it); give a size to build a model without the data."
        )
    return to_pair(crop)


def model_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`allspark_seg.build_model` for a resolved config (without the encoder)."""
    m, a = cfg.model, cfg.model.allspark
    options = {"embed_dims": m.embed_dims, "depths": m.depths, "num_heads": m.num_heads}
    return {
        "num_classes": cfg.data.num_classes,
        "allspark": bool(a.enabled),
        "crop_size": _config_crop(cfg),
        "head_dim": m.head_dim,
        "head_dropout": m.head_dropout,
        "drop_path": m.drop_path,
        "layer_norm_eps": m.layer_norm_eps,
        "encoder_options": {k: v for k, v in options.items() if v is not None},
        "num_heads": a.num_heads,
        "memory": a.memory,
        "memory_length": a.memory_length,
        "memory_init": a.memory_init,
        "attn_dropout": a.attn_dropout,
        "grouping": a.grouping,
        "grouping_resize": a.grouping_resize,
        "per_image_eval": a.per_image_eval,
        "gather_memory": a.memory_sync == "all_gather",
        "infer_memory": a.infer_memory,
        "pretrained": m.pretrained or None,
    }


def build_model_from_config(cfg: RunConfig) -> AllSparkSegmentor:
    """The model a resolved config describes (weights from ``model.pretrained`` when set)."""
    encoder: Any = cfg.model.encoder
    kwargs = model_kwargs(cfg)
    if encoder.startswith(HF_ENCODER_PREFIX):
        encoder = build_hf_encoder(encoder[len(HF_ENCODER_PREFIX) :], pretrained=bool(cfg.model.pretrained))
        kwargs["pretrained"] = None  # the weights (if any) came with the backbone
    return build_model(encoder, **kwargs)


def record_built_model(cfg: RunConfig, model: AllSparkSegmentor) -> RunConfig:
    """``cfg`` with the model-shaping values that building decided, so the stored config rebuilds the same model.

    Loading weights sets the MiT LayerNorm eps from their source (1e-5 for Hugging Face weights, 1e-6 for NVlabs and
    official ones); ``eval``, ``predict`` and ``export`` rebuild without the weights file and need that value.
    """
    eps = getattr(model.encoder, "layer_norm_eps", None)
    if eps is None or float(eps) == cfg.model.layer_norm_eps:
        return cfg
    return replace(cfg, model=replace(cfg.model, layer_norm_eps=float(eps)))
