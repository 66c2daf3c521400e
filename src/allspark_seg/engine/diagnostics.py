"""Semi-supervised diagnostics computed at logging steps: pseudo-labels, confidence, memory state."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.memory import SemanticMemory

__all__ = ["memory_diversity", "pseudo_label_stats"]

IGNORE = 255


def pseudo_label_stats(
    pseudo: torch.Tensor, confidence: torch.Tensor, num_classes: int, target: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Class shares and confidence of pseudo-labels.

    Args:
        pseudo: ``(B, H, W)`` int64, 255 where ignored.
        confidence: ``(B, H, W)`` teacher top probability.
        num_classes: K.
        target: Optional ground truth ``(B, H, W)`` of the same images.

    Returns:
        ``pseudo_share (K,)`` (fraction of kept pixels per class), ``pseudo_conf (K,)`` (mean confidence per class,
        NaN where absent), ``kept_fraction`` (kept pixels / all pixels) and, with ``target``, ``pseudo_acc``
        (accuracy over kept pixels whose ground truth is not ignored).
    """
    kept = pseudo != IGNORE
    labels = pseudo[kept]
    counts = torch.bincount(labels, minlength=num_classes)[:num_classes].float()
    conf_sum = torch.zeros(num_classes, device=pseudo.device).index_add_(0, labels, confidence[kept].float())
    stats = {
        "pseudo_share": counts / counts.sum().clamp_min(1),
        "pseudo_conf": conf_sum / counts.where(counts > 0, torch.nan),
        "kept_fraction": kept.float().mean(),
    }
    if target is not None:
        valid = kept & (target != IGNORE)
        stats["pseudo_acc"] = (pseudo[valid] == target[valid]).float().mean() if valid.any() else torch.tensor(0.0)
    return stats


@torch.no_grad()
def memory_diversity(memory: SemanticMemory) -> torch.Tensor:
    """``(K,)`` mean pairwise cosine similarity of the written slots of each class (NaN with fewer than 2).

    Values near 1 mean a class's memory collapsed onto one pattern.
    """
    bank = F.normalize(memory.bank.float(), dim=-1)  # (K, L, N)
    filled = memory.filled.float()  # (K, L)
    gram = bank @ bank.transpose(1, 2)  # (K, L, L)
    pair = filled[:, :, None] * filled[:, None, :]
    pair = pair * (1 - torch.eye(pair.shape[-1], device=pair.device))
    n = pair.sum(dim=(1, 2))
    return (gram * pair).sum(dim=(1, 2)) / n.where(n > 0, torch.nan)
