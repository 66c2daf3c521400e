"""Cross-entropy with ignore index, and OHEM against a literal re-statement of the official algorithm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from allspark_seg.errors import ConfigError
from allspark_seg.losses import CrossEntropy, OhemCrossEntropy, build_loss, cross_entropy, ohem_keep_mask

IGNORE = 255


def _batch(seed: int, scale: float = 2.0, ignore_frac: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(2, 4, 8, 8, generator=g)).requires_grad_()
    target = torch.randint(0, 4, (2, 8, 8), generator=g)
    target[torch.rand(target.shape, generator=g) < ignore_frac] = IGNORE
    return logits, target


def _official_ohem(
    pred: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ProbOhemCrossEntropy2d.forward, step by step (no class weights); returns (loss, target)."""
    b, c, h, w = pred.shape
    target = target.reshape(-1).clone()
    valid_mask = target.ne(IGNORE)
    target = target * valid_mask.long()
    num_valid = valid_mask.sum()
    prob = F.softmax(pred, dim=1).transpose(0, 1).reshape(c, -1)
    if min_kept > num_valid:
        pass
    elif num_valid > 0:
        prob = prob.masked_fill(~valid_mask, 1)
        mask_prob = prob[target, torch.arange(len(target), dtype=torch.long)]
        threshold = thresh
        if min_kept > 0:
            index = mask_prob.argsort()
            threshold_index = index[min(len(index), min_kept) - 1]
            if mask_prob[threshold_index] > thresh:
                threshold = mask_prob[threshold_index]
            kept_mask = mask_prob.le(threshold)
            target = target * kept_mask.long()
            valid_mask = valid_mask * kept_mask
    target = target.masked_fill(~valid_mask, IGNORE).view(b, h, w)
    return F.cross_entropy(pred, target, ignore_index=IGNORE), target


def _p_gt(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    valid = target != IGNORE
    return logits.detach().softmax(1).gather(1, target.masked_fill(~valid, 0)[:, None])[:, 0][valid]


def _check_against_official(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    expected_loss, expected_target = _official_ohem(logits, target, thresh, min_kept)
    keep = ohem_keep_mask(logits, target, thresh, min_kept, IGNORE)
    assert torch.equal(keep, expected_target != IGNORE)
    loss = OhemCrossEntropy(thresh, min_kept, IGNORE)(logits, target)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    return keep


def test_cross_entropy_matches_torch_mean_over_valid_pixels() -> None:
    logits, target = _batch(0)
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE)
    torch.testing.assert_close(cross_entropy(logits, target), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(CrossEntropy()(logits, target), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(build_loss("ce")(logits, target), expected, rtol=1e-6, atol=1e-7)


def test_cross_entropy_keep_mask_and_bf16() -> None:
    logits, target = _batch(1)
    keep = torch.zeros_like(target, dtype=torch.bool)
    keep[:, :4] = True
    expected = F.cross_entropy(logits, target.masked_fill(~keep, IGNORE), ignore_index=IGNORE)
    torch.testing.assert_close(cross_entropy(logits, target, keep=keep), expected, rtol=1e-6, atol=1e-7)
    low = cross_entropy(logits.detach().bfloat16(), target)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, F.cross_entropy(logits, target, ignore_index=IGNORE), rtol=2e-2, atol=1e-2)


def test_all_ignored_gives_zero_with_a_gradient_path() -> None:
    logits, _ = _batch(2)
    target = torch.full((2, 8, 8), IGNORE)
    assert torch.isnan(F.cross_entropy(logits, target, ignore_index=IGNORE))  # what we avoid
    for loss_fn in (CrossEntropy(), OhemCrossEntropy(0.7, 10)):
        loss = loss_fn(logits, target)
        assert loss.item() == 0.0
        assert loss.requires_grad
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.count_nonzero(grad).item() == 0


def test_ohem_fewer_valid_pixels_than_min_kept_keeps_all() -> None:
    logits, target = _batch(3)
    num_valid = int((target != IGNORE).sum())
    keep = _check_against_official(logits, target, thresh=0.7, min_kept=num_valid + 1)
    assert torch.equal(keep, target != IGNORE)
    torch.testing.assert_close(
        OhemCrossEntropy(0.7, num_valid + 1)(logits, target), F.cross_entropy(logits, target, ignore_index=IGNORE)
    )


def test_ohem_threshold_from_min_kept_when_above_thresh() -> None:
    logits, target = _batch(4)
    min_kept, thresh = 40, 0.05
    kth = _p_gt(logits, target).sort().values[min_kept - 1]
    assert kth > thresh  # the regime under test
    keep = _check_against_official(logits, target, thresh, min_kept)
    assert int(keep.sum()) == min_kept  # exactly the min_kept hardest pixels (no ties in random data)
    assert _p_gt(logits, target)[keep[target != IGNORE]].max() == kth


def test_ohem_threshold_is_thresh_when_min_kept_pixel_is_easier() -> None:
    logits, target = _batch(5)
    min_kept, thresh = 10, 0.7
    p = _p_gt(logits, target)
    assert p.sort().values[min_kept - 1] <= thresh  # the regime under test
    keep = _check_against_official(logits, target, thresh, min_kept)
    assert int(keep.sum()) == int((p <= thresh).sum())
    assert min_kept < int(keep.sum()) < p.numel()


def test_ohem_min_kept_zero_keeps_every_valid_pixel_as_official() -> None:
    logits, target = _batch(6)
    keep = _check_against_official(logits, target, thresh=0.7, min_kept=0)
    assert torch.equal(keep, target != IGNORE)


def test_ohem_min_kept_equal_to_num_valid_and_larger_than_the_batch() -> None:
    logits, target = _batch(7)
    num_valid = int((target != IGNORE).sum())
    _check_against_official(logits, target, thresh=0.1, min_kept=num_valid)
    no_ignore = torch.randint(0, 4, (2, 8, 8), generator=torch.Generator().manual_seed(7))
    _check_against_official(logits, no_ignore, thresh=0.1, min_kept=10_000)


def test_ohem_gradient_only_through_kept_pixels() -> None:
    logits, target = _batch(8)
    loss_fn = build_loss("ohem", thresh=0.05, min_kept=30)
    keep = ohem_keep_mask(logits, target, 0.05, 30)
    (grad,) = torch.autograd.grad(loss_fn(logits, target), logits)
    touched = grad.abs().sum(1) > 0
    assert torch.equal(touched, keep)


def test_build_loss_errors() -> None:
    with pytest.raises(ConfigError, match="valid losses are 'ce', 'ohem'"):
        build_loss("focal")
    with pytest.raises(ConfigError, match="thresh"):
        build_loss("ohem", thresh=1.5)
    with pytest.raises(ConfigError, match="min_kept"):
        build_loss("ohem", min_kept=-1)
    assert isinstance(build_loss("ohem", thresh=0.7, min_kept=200000), OhemCrossEntropy)
