"""The literal baseline: the official AllSpark algorithm, run with the same weights as an allspark-seg model.

The model itself is ``tests/official_reference.py`` (a line-by-line restatement of the official code, also used by
the parity tests), imported here rather than copied: the per-sample, per-class memory loop with host
synchronisations, keys/values materialised with ``repeat`` per labeled sample, the duplicated AllSpark input and the
discarded self-attention branch at inference, manual attention in the MiT encoder, state passed through setters.
This module only builds it from an allspark-seg model (``to_official_state_dict``) and restates one iteration of
the official ``train_allspark.py`` loop (lines 127-149).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

import official_reference as R  # noqa: E402
from allspark_seg.interop import to_official_state_dict  # noqa: E402
from allspark_seg.models import AllSparkSegmentor  # noqa: E402

__all__ = ["R", "literal_infer", "literal_optimizer", "literal_train_step", "literal_twin"]


def literal_twin(model: AllSparkSegmentor, crop: int) -> R.ModelBuilder:
    """The official model with exactly ``model``'s weights, buffers and Semantic Memory.

    Args:
        model: An allspark-seg model built with a MiT encoder and an AllSpark block.
        crop: Square training crop (the official memory grid is ``(crop // 32 + 1) ** 2``; the crop must not be a
            multiple of 32, as in the official configs).

    Returns:
        The literal model in training mode, warm-up 0 (the memory is read).
    """
    enc = model.encoder
    spec = enc.spec
    grid = model.allspark.memory.grid
    if (crop // 32 + 1) ** 2 != grid[0] * grid[1]:
        raise ValueError(f"Crop {crop} gives a {grid} stage-4 grid that the official memory formula gets wrong.")
    ref = R.build_official_model(
        model.num_classes,
        embed_dims=spec.embed_dims,
        depths=spec.depths,
        mit_heads=spec.num_heads,
        sr_ratios=spec.sr_ratios,
        drop_path_rate=_max_drop_path(enc),
        num_heads=model.allspark.attn.num_heads,
        image_size=crop,
        warmup_epoch=0,
        embedding_dim=model.head.linear_fuse.conv.out_channels,
    )
    ref.load_state_dict(to_official_state_dict(model), strict=True)
    _copy_dropout_rates(model, ref)
    return ref


def _max_drop_path(encoder: nn.Module) -> float:
    rates = [m.drop_prob for m in encoder.modules() if hasattr(m, "drop_prob")]
    return max(rates, default=0.0)


def _copy_dropout_rates(model: nn.Module, ref: nn.Module) -> None:
    """Give the reference the dropout rates of ``model`` (zero in ``model`` means zero in ``ref``)."""
    ours = [m.p for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not any(ours):
        for m in ref.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.p = 0.0
    if not any(m.drop_prob for m in model.modules() if hasattr(m, "drop_prob")):
        for m in ref.modules():
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0


def literal_optimizer(ref: R.ModelBuilder, lr: float = 1e-3, lr_multi: float = 10.0) -> torch.optim.SGD:
    """The official optimiser (:func:`official_reference.official_optimizer`) with the benchmark's defaults."""
    return R.official_optimizer(ref, lr, lr_multi)


def literal_train_step(
    ref: R.ModelBuilder, optimizer: torch.optim.Optimizer, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor
) -> torch.Tensor:
    """One official ``train_allspark.py`` iteration (memory read): teacher pass, setters, student pass, SGD step.

    Args:
        ref: The literal model.
        optimizer: Its optimiser.
        x_l: Labeled images ``(B, 3, H, W)``.
        y_l: Labels ``(B, H, W)`` int64, 255 ignored.
        x_u: Unlabeled images ``(B, 3, H, W)`` (the official code needs ``B_l == B_u``).

    Returns:
        The detached loss.
    """
    pseudo_label = R.official_teacher_pass(ref, x_u).argmax(dim=1)
    ref.decoder.set_SMem_status(epoch=ref.decoder.warmup_epoch)
    ref.train()
    pred_x, pred_u = ref(torch.cat((x_l, x_u))).split([x_l.shape[0], x_u.shape[0]])
    loss = (F.cross_entropy(pred_x, y_l, ignore_index=255) + F.cross_entropy(pred_u, pseudo_label)) / 2.0
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def literal_infer(ref: R.ModelBuilder, x: torch.Tensor) -> torch.Tensor:
    """Official inference (eval mode): logits ``(B, K, H, W)``."""
    ref.eval()
    return ref(x)
