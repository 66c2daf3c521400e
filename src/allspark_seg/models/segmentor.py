"""The segmentor: encoder, optional AllSpark block on the last stage, SegFormer head, upsampling to the input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .allspark import AllSparkBlock
from .head import SegFormerHead

__all__ = ["AllSparkSegmentor"]


class AllSparkSegmentor(nn.Module):
    """Encoder -> (AllSpark on the last stage) -> SegFormer head -> bilinear upsampling to the input size.

    Forward contract:
        - eval mode: ``model(x)`` -> logits ``(B, K, H, W)``;
        - training mode: ``model(x_l, x_u, guide_logits=t, use_memory=flag)`` -> ``(logits_l, logits_u)``, where
          ``t`` are teacher logits for ``x_u`` at any resolution; ``model(x_l)`` -> ``(logits_l, None)``;
        - feature perturbation (UniMatch): ``model(x_l, x_u, ..., fp_images=n, fp_rate=p)`` decodes the first ``n``
          unlabeled images from maps passed through ``Dropout2d(p)`` (every map the head reads, after the AllSpark
          block), so their logits are the perturbed stream's; one forward, so DDP sees a single call.

    Labeled and unlabeled images go through the encoder and the head as one batch (the head's BatchNorm sees the
    mixed batch, as officially) and are split only around the AllSpark block. Nothing is stored on the modules
    between calls except the Semantic Memory buffers.

    Args:
        encoder: Module mapping ``(B, 3, H, W)`` to a list of NCHW maps, finest first.
        head: The decode head.
        allspark: The AllSpark block on the last map, or None for the plain SegFormer baselines.
    """

    def __init__(self, encoder: nn.Module, head: SegFormerHead, allspark: AllSparkBlock | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.allspark = allspark

    @property
    def num_classes(self) -> int:
        """Number of output classes K."""
        return self.head.linear_pred.out_channels

    def forward(
        self,
        x: torch.Tensor,
        x_u: torch.Tensor | None = None,
        *,
        guide_logits: torch.Tensor | None = None,
        use_memory: bool = False,
        coupled: bool | None = None,
        fp_images: int = 0,
        fp_rate: float = 0.5,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Segment. See the class docstring for the eval and training contracts.

        Args:
            x: Images ``(B, 3, H, W)`` (labeled images in training).
            x_u: Unlabeled images ``(B_u, 3, H, W)``, training only.
            guide_logits: Teacher logits for ``x_u`` ``(B_u, K, H', W')``; drives the memory update.
            use_memory: Read the Semantic Memory in the labeled cross-attention.
            coupled: AllSpark inference over the whole batch (official) instead of per image; None = the
                block's default.
            fp_images: Training only: decode the first ``fp_images`` unlabeled images from perturbed maps.
            fp_rate: Channel dropout rate of the perturbation.
        """
        if not self.training:
            if x_u is not None or guide_logits is not None or use_memory:
                raise ValueError(
                    "In eval mode call model(x): unlabeled images, guide logits and memory are training-only."
                )
            return self._logits(self._features(x, None, None, False, coupled), x)
        self._check_training_inputs(x, x_u, guide_logits, use_memory)
        feats = self._features(x, x_u, guide_logits, use_memory, coupled)
        if fp_images:
            if x_u is None or not 0 < fp_images <= x_u.shape[0]:
                raise ValueError(f"fp_images={fp_images} needs at least that many unlabeled images x_u.")
            feats = [_perturb(f, x.shape[0], fp_images, fp_rate) for f in feats]
        logits = self._logits(feats, x)
        if x_u is None:
            return logits, None
        # split, not two slices: the gradient is assembled once instead of two zero-filled full-batch tensors
        logits_l, logits_u = logits.split([x.shape[0], x_u.shape[0]])
        return logits_l, logits_u

    def _features(
        self,
        x: torch.Tensor,
        x_u: torch.Tensor | None,
        guide_logits: torch.Tensor | None,
        use_memory: bool,
        coupled: bool | None,
    ) -> list[torch.Tensor]:
        """Encoder maps of ``[x; x_u]`` (one pass), the last one passed through the AllSpark block."""
        feats = list(self.encoder(x if x_u is None else torch.cat([x, x_u])))
        if self.allspark is not None:
            b_l = x.shape[0]
            last = feats[-1]
            out_l, out_u = self.allspark(
                last[:b_l],
                None if x_u is None else last[b_l:],
                guide_logits=guide_logits,
                use_memory=use_memory,
                coupled=coupled,
            )
            feats[-1] = out_l if out_u is None else torch.cat([out_l, out_u])
        return feats

    def _logits(self, feats: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(feats), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def _check_training_inputs(
        self, x: torch.Tensor, x_u: torch.Tensor | None, guide_logits: torch.Tensor | None, use_memory: bool
    ) -> None:
        if x.ndim != 4:
            raise ValueError(f"Expected labeled images (B, C, H, W), got shape {tuple(x.shape)}.")
        if x_u is None:
            if guide_logits is not None or use_memory:
                raise ValueError("guide_logits and use_memory need unlabeled images x_u.")
            return
        if x_u.ndim != 4 or x_u.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"Unlabeled images must have the labeled images' channels, height and width: got {tuple(x_u.shape)} "
                f"and {tuple(x.shape)}."
            )
        if guide_logits is not None and (
            guide_logits.ndim != 4 or guide_logits.shape[:2] != (x_u.shape[0], self.num_classes)
        ):
            raise ValueError(
                f"guide_logits must be (B_u={x_u.shape[0]}, K={self.num_classes}, H, W), "
                f"got {tuple(guide_logits.shape)}."
            )
        if use_memory and (self.allspark is None or self.allspark.memory is None):
            raise ValueError("use_memory=True but the model has no AllSpark Semantic Memory.")


def _perturb(feat: torch.Tensor, start: int, count: int, rate: float) -> torch.Tensor:
    """``Dropout2d(rate)`` on rows ``start .. start + count`` of a map ``(B, C, h, w)``; the other rows unchanged."""
    dropped = F.dropout2d(feat[start : start + count], rate, training=True)
    return torch.cat([feat[:start], dropped, feat[start + count :]])
