"""ConfusionMatrix and SegMetrics against hand-computed confusion matrices."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from allspark_seg.errors import ConfigError, DataError
from allspark_seg.metrics import ConfusionMatrix, _bincount_into, _index_add_into, metrics_from_confusion

# Pixels (target, pred): (0,0) (0,1) (1,1) (1,1) / (2,2) (2,0) (ignored) (0,0)
TARGET = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
# rows = ground truth, columns = prediction
EXPECTED = torch.tensor([[2, 1, 0], [0, 2, 0], [1, 0, 1]])


def test_matrix_and_metrics_by_hand() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    assert torch.equal(cm.matrix, EXPECTED)
    m = cm.compute()
    # tp = [2, 2, 1], gt = [3, 2, 2], pred = [3, 3, 1], union = [4, 3, 2]
    assert m.iou == pytest.approx((2 / 4, 2 / 3, 1 / 2))
    assert m.miou == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert m.pixel_acc == pytest.approx(5 / 7)
    assert m.mean_acc == pytest.approx((2 / 3 + 2 / 2 + 1 / 2) / 3)
    assert m.fw_iou == pytest.approx(3 / 7 * 1 / 2 + 2 / 7 * 2 / 3 + 2 / 7 * 1 / 2)
    assert m.present == (True, True, True)
    assert (m.num_pixels, m.ignored_pixels, m.invalid_pixels, m.num_images) == (7, 1, 0, 1)


def test_absent_class_is_nan_and_excluded_but_zero_in_official_miou() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    m = cm.compute()
    assert m.present == (True, True, True, False)
    assert math.isnan(m.iou[3])
    assert m.miou == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert m.miou_official == pytest.approx((1 / 2 + 2 / 3 + 1 / 2 + 0) / 4)
    assert m.mean_acc == pytest.approx((2 / 3 + 2 / 2 + 1 / 2) / 3)  # class 3 has no ground truth
    assert m.fw_iou == pytest.approx(3 / 7 * 1 / 2 + 2 / 7 * 2 / 3 + 2 / 7 * 1 / 2)
    table = m.table(["bg", "cat", "dog", "cow"])
    assert "absent" in table.splitlines()[5]
    assert "66.67" in table
    assert "55.56" in table
    assert "41.67" in table
    assert "mIoU (3/4 cls)" in table
    assert json.loads(json.dumps(m.to_dict(["bg", "cat", "dog", "cow"]), allow_nan=False))["per_class"]["cow"] is None


def test_class_only_in_prediction_counts_as_zero() -> None:
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[3, 1]]), torch.tensor([[0, 1]]))
    m = cm.compute()
    assert m.present == (True, True, False, True)
    assert m.iou[0] == 0.0
    assert m.iou[1] == 1.0
    assert m.iou[3] == 0.0
    assert m.miou == pytest.approx(1 / 3)


def _official_iou(pred: np.ndarray, target: np.ndarray, k: int, ignore: int = 255) -> np.ndarray:
    """Literal re-statement of the official intersectionAndUnion accumulation and IoU (as fractions)."""
    out = pred.reshape(-1).copy()
    tgt = target.reshape(-1)
    out[tgt == ignore] = ignore
    inter = out[out == tgt]
    a_i = np.histogram(inter, bins=np.arange(k + 1))[0]
    a_o = np.histogram(out, bins=np.arange(k + 1))[0]
    a_t = np.histogram(tgt, bins=np.arange(k + 1))[0]
    return a_i / (a_o + a_t - a_i + 1e-10)


def test_official_miou_matches_official_formula_on_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    k = 6
    cm = ConfusionMatrix(k)
    preds, targets = [], []
    for _ in range(3):
        pred = torch.randint(0, k - 1, (2, 9, 11), generator=g)  # class 5 never predicted
        target = torch.randint(0, k - 2, (2, 9, 11), generator=g)  # class 4 and 5 never in ground truth
        target[torch.rand(target.shape, generator=g) < 0.2] = 255
        cm.update(pred, target)
        preds.append(pred)
        targets.append(target)
    m = cm.compute()
    official = _official_iou(torch.cat(preds).numpy(), torch.cat(targets).numpy(), k)
    assert m.miou_official == pytest.approx(official.mean(), abs=1e-12)
    assert m.present == (True, True, True, True, True, False)
    assert m.miou == pytest.approx(official[:5].mean(), abs=1e-12)
    assert m.num_images == 6


def test_unbatched_and_batched_updates_accumulate() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)  # one (H, W) image
    cm.update(torch.stack([PRED, PRED]), torch.stack([TARGET, TARGET]))  # a (2, H, W) batch
    assert torch.equal(cm.matrix, 3 * EXPECTED)
    assert cm.compute().num_images == 3
    cm.reset()
    assert cm.matrix.sum().item() == 0


def test_out_of_range_labels_are_counted_as_invalid(caplog: pytest.LogCaptureFixture) -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1, 2, 5]]), torch.tensor([[0, 254, 255, 1]]))
    m = cm.compute()
    assert (m.num_pixels, m.ignored_pixels, m.invalid_pixels) == (1, 1, 2)
    assert "2 pixels had a target or prediction outside [0, 3)" in caplog.text


def test_empty_matrix_gives_nan() -> None:
    m = ConfusionMatrix(2).compute()
    assert math.isnan(m.miou)
    assert math.isnan(m.pixel_acc)
    assert m.miou_official == 0.0
    assert m.present == (False, False)


def test_counts_stay_on_the_input_device_and_both_kernels_agree() -> None:
    cm = ConfusionMatrix(3)
    assert cm.device is None
    cm.update(PRED, TARGET)
    assert cm.device == torch.device("cpu")
    assert cm.matrix.device == torch.device("cpu")
    assert cm.matrix.dtype == torch.int64
    index = torch.randint(0, 11, (1000,), generator=torch.Generator().manual_seed(1))
    a = torch.zeros(11, dtype=torch.int64)
    b = torch.zeros(11, dtype=torch.int64)
    _bincount_into(a, index)
    _index_add_into(b, index)  # the kernel used on CUDA
    assert torch.equal(a, b)
    assert a.sum().item() == 1000


def test_works_across_inference_mode() -> None:
    cm = ConfusionMatrix(3)
    with torch.inference_mode():
        cm.update(PRED, TARGET)
    cm.update(PRED, TARGET)  # outside inference mode: the counts must be a normal tensor
    cm.all_reduce()  # not distributed: a no-op
    assert torch.equal(cm.matrix, 2 * EXPECTED)


def test_misuse_raises() -> None:
    with pytest.raises(DataError, match="does not match mask shape"):
        ConfusionMatrix(3).update(PRED, TARGET[:1])
    with pytest.raises(ConfigError):
        ConfusionMatrix(0)
    with pytest.raises(ConfigError, match="2 class names"):
        ConfusionMatrix(3).compute().table(["a", "b"])
    cm = ConfusionMatrix(3)
    cm.all_reduce()
    with pytest.raises(RuntimeError):
        cm.all_reduce()
    with pytest.raises(RuntimeError):
        cm.update(PRED, TARGET)


def test_metrics_from_confusion_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square"):
        metrics_from_confusion(torch.zeros(2, 3, dtype=torch.int64))


def _reduce_worker(rank: int, store_path: str, result_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(3)
        cm.update(PRED[rank : rank + 1], TARGET[rank : rank + 1])
        cm.all_reduce()
        torch.save(cm.matrix.clone(), f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.dist
def test_all_reduce_sums_over_two_gloo_processes(tmp_path: os.PathLike) -> None:
    torch.set_num_threads(1)
    mp.spawn(_reduce_worker, args=(str(tmp_path / "store"), str(tmp_path / "cm")), nprocs=2, join=True)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"cm.{rank}", weights_only=True), EXPECTED)
