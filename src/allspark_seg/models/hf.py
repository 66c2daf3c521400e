"""Hugging Face ``transformers`` backbones as encoders (the ``hf`` extra): ``model.encoder: hf:DIR``.

Any architecture that ``transformers.AutoBackbone`` builds (ConvNeXt, Swin, ResNet, DINOv2, ...) works, from a local
folder written by ``save_pretrained`` (``config.json``, plus the weights when they are to be loaded). Nothing is
downloaded. The widths come from ``backbone.channels`` and the strides from a probe forward, so neither is configured
twice; the AllSpark block sits on the last returned map and the SegFormer head reads all of them.

Which stages are returned: the ``out_features`` saved in the folder's config when it lists at least two, otherwise
the last four stages (all of them when there are fewer), the stem excluded. ViT-like backbones (DINOv2) return their
stages as maps at one stride (the patch size), with ``reshape_hidden_states`` switched on; the head then simply fuses
four maps of the same size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, MissingExtraError

__all__ = ["HFBackboneEncoder", "build_hf_encoder", "default_out_features"]

log = logging.getLogger(__name__)

#: Side of the square probe image used to measure the strides of the returned maps.
PROBE_SIZE = 224


def default_out_features(stage_names: list[str], saved: list[str] | None, max_stages: int = 4) -> list[str]:
    """The stages an encoder returns: ``saved`` when it names at least two, else the last ``max_stages`` stages.

    Args:
        stage_names: The backbone's stage names, stem first (``["stem", "stage1", ...]``).
        saved: ``out_features`` of the saved config (its default names only the last stage).
        max_stages: Stages to take by default.
    """
    if saved and len(saved) >= 2:
        return list(saved)
    stages = [name for name in stage_names if name != "stem"] or list(stage_names)
    return stages[-max_stages:]


class HFBackboneEncoder(nn.Module):
    """Adapter from a ``transformers`` backbone to the encoder contract of :func:`~allspark_seg.build_model`.

    Args:
        backbone: A ``transformers`` backbone (``BackboneMixin``): ``backbone(pixel_values=x).feature_maps`` is a
            tuple of NCHW maps and ``backbone.channels`` lists their widths.

    Attributes:
        out_channels: Width of every returned map.
        reductions: Stride of every returned map (input side / map side on a 224 x 224 probe).
        unused: Backbone parameters that no returned map depends on (e.g. Swin's final LayerNorm, DINOv2's mask
            token), found by a probe backward pass and frozen, so DistributedDataParallel needs no unused-parameter
            search and optimisers skip them as they would anyway.

    Shape:
        ``forward(x)``: ``(B, 3, H, W)`` -> list of ``(B, C_i, h_i, w_i)``.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_channels: tuple[int, ...] = tuple(int(c) for c in backbone.channels)
        self._sizes: dict[tuple[int, int], list[tuple[int, int]]] = {}
        probe = self.output_size(PROBE_SIZE, PROBE_SIZE)
        self.reductions: tuple[int, ...] = tuple(max(1, round(PROBE_SIZE / h)) for h, _ in probe)
        self.unused: tuple[str, ...] = self._freeze_unused()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's feature maps of ``x`` ``(B, 3, H, W)``, as a list."""
        maps = list(self.backbone(pixel_values=x).feature_maps)
        if any(m.ndim != 4 for m in maps):
            raise ValueError(
                f"The Hugging Face backbone returned maps of shapes {[tuple(m.shape) for m in maps]}; NCHW maps are "
                "needed (for ViT backbones set reshape_hidden_states=true in config.json)."
            )
        return maps

    @torch.no_grad()
    def output_size(self, height: int, width: int) -> list[tuple[int, int]]:
        """Spatial sizes of the returned maps for a ``height x width`` input (measured once per size).

        The probe runs in eval mode on zeros, so it changes no BatchNorm statistics and draws no random numbers.
        """
        key = (int(height), int(width))
        if key not in self._sizes:
            param = next(self.backbone.parameters())
            was_training = self.backbone.training
            self.backbone.eval()
            try:
                maps = self.forward(torch.zeros(1, 3, *key, device=param.device, dtype=param.dtype))
            finally:
                self.backbone.train(was_training)
            self._sizes[key] = [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]
        return list(self._sizes[key])

    def _freeze_unused(self, size: int = 64) -> tuple[str, ...]:
        """Freeze the parameters a probe backward (eval mode, zeros ``(1, 3, size, size)``) leaves without gradient."""
        params = [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]
        if not params:
            return ()
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            x = torch.zeros(1, 3, size, size, device=params[0][1].device, dtype=params[0][1].dtype)
            grads = torch.autograd.grad(
                sum(m.sum() for m in self.forward(x)), [p for _, p in params], allow_unused=True
            )
        finally:
            self.backbone.train(was_training)
        unused = tuple(n for (n, p), g in zip(params, grads, strict=True) if g is None)
        for name, param in params:
            if name in unused:
                param.requires_grad_(False)
        if unused:
            log.debug("frozen backbone parameters no output depends on: %s", unused)
        return unused

    def extra_repr(self) -> str:
        return f"channels={self.out_channels}, reductions={self.reductions}"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingExtraError("transformers", "hf", "model.encoder=hf:DIR (a Hugging Face backbone)") from None
    return transformers


def build_hf_encoder(path: str | Path, *, pretrained: bool = False) -> HFBackboneEncoder:
    """Build an encoder from a Hugging Face backbone folder.

    Args:
        path: Folder with ``config.json`` (and ``model.safetensors``/``pytorch_model.bin`` when ``pretrained``).
        pretrained: Load the weights saved in the folder; otherwise only the config is read and the weights are
            randomly initialised (under the current torch seed).

    Returns:
        The adapter around ``AutoBackbone`` (stages chosen by :func:`default_out_features`).

    Raises:
        MissingExtraError: ``transformers`` is not installed.
        ConfigError: The folder or its config is missing, or its architecture has no ``AutoBackbone``.
        CheckpointError: ``pretrained`` but the folder's weights cannot be loaded or none match the backbone.
    """
    transformers = _transformers()
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.encoder=hf:{path}: '{folder}' has no config.json (write it with save_pretrained).")
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    stage_names = getattr(config, "stage_names", None)
    if not stage_names:
        raise ConfigError(
            f"model.encoder=hf:{path}: a '{config.model_type}' config is not a backbone AutoBackbone can build "
            "(e.g. ConvNeXt, Swin, ResNet, DINOv2)."
        )
    config.out_features = default_out_features(list(stage_names), getattr(config, "out_features", None))
    if hasattr(config, "reshape_hidden_states"):
        config.reshape_hidden_states = True
    backbone_class = transformers.MODEL_FOR_BACKBONE_MAPPING.get(type(config), None)
    if backbone_class is None:
        raise ConfigError(f"model.encoder=hf:{path}: transformers has no backbone for '{config.model_type}' configs.")
    if pretrained:
        # The concrete class, not AutoBackbone.from_pretrained: some transformers versions ask the Hub whether the
        # name is a repository before looking at the local folder.
        try:
            backbone, info = backbone_class.from_pretrained(
                str(folder), config=config, local_files_only=True, output_loading_info=True
            )
        except (OSError, ValueError) as error:
            raise CheckpointError(f"model.encoder=hf:{path}: the weights cannot be loaded ({error}).") from None
        _check_loaded(backbone, info, folder)
    else:
        backbone = transformers.AutoBackbone.from_config(config)
    encoder = HFBackboneEncoder(backbone)
    log.info(
        "encoder %s from %s (%s weights): stages %s, widths %s, strides %s",
        type(backbone).__name__,
        folder,
        "saved" if pretrained else "random",
        config.out_features,
        encoder.out_channels,
        encoder.reductions,
    )
    return encoder


def _check_loaded(backbone: nn.Module, info: dict[str, Any], folder: Path) -> None:
    """Refuse weights that match nothing; log the keys that were left at their initial values."""
    missing = list(info.get("missing_keys", []))
    total = len(backbone.state_dict())
    if total and len(missing) >= total:
        raise CheckpointError(f"No weight in '{folder}' matches the {type(backbone).__name__} its config describes.")
    if missing:
        log.warning(
            "%d backbone weights were not in %s and keep their initial values: %s", len(missing), folder, missing
        )
