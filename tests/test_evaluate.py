"""Sliding windows, whole/slide/TTA inference and evaluate() on a toy loader."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from allspark_seg.engine.evaluate import evaluate, infer, slide_inference, sliding_windows, whole_inference
from allspark_seg.errors import ConfigError, DataError
from allspark_seg.models import build_model

K = 3


def _official_windows(h: int, w: int, grid: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The official evaluate()'s window loop, re-stated: start at 0, step by stride while inside, cut at the edge."""
    out = []
    row = 0
    while row < h:
        col = 0
        while col < w:
            out.append((row, min(h, row + grid), col, min(w, col + grid)))
            col += stride
        row += stride
    return out


def _conv(kernel: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv2d(3, K, kernel, padding=kernel // 2).eval()


def _image(h: int, w: int, seed: int = 1, b: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


class Oracle(nn.Module):
    """Predicts the class id written in channel 0 of the image; records how it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[bool, bool, tuple[int, ...]]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_inference_mode_enabled(), tuple(x.shape)))
        ids = x[:, 0].round().long().clamp(0, K - 1)
        return 10.0 * F.one_hot(ids, K).permute(0, 3, 1, 2).float() + self.anchor


def test_official_windows_on_cityscapes() -> None:
    windows = sliding_windows(1024, 2048, 801, 534, shift_edges=False)
    rows = [(0, 801), (534, 1024)]
    cols = [(0, 801), (534, 1335), (1068, 1869), (1602, 2048)]
    assert windows == [(y0, y1, x0, x1) for y0, y1 in rows for x0, x1 in cols]
    assert len(windows) == 8
    assert windows[-1] == (534, 1024, 1602, 2048)  # a 490 x 446 edge window
    assert windows == _official_windows(1024, 2048, 801, int(801 * 2 / 3))


def test_shifted_windows_on_cityscapes() -> None:
    windows = sliding_windows(1024, 2048, 801, 534)
    rows = [(0, 801), (223, 1024)]
    cols = [(0, 801), (534, 1335), (1068, 1869), (1247, 2048)]
    assert windows == [(y0, y1, x0, x1) for y0, y1 in rows for x0, x1 in cols]


def test_windows_non_multiple_case() -> None:
    assert sliding_windows(10, 17, 6, 4) == [
        (y0, y1, x0, x1) for y0, y1 in [(0, 6), (4, 10)] for x0, x1 in [(0, 6), (4, 10), (8, 14), (11, 17)]
    ]
    assert sliding_windows(10, 17, 6, 4, shift_edges=False) == [
        (y0, y1, x0, x1)
        for y0, y1 in [(0, 6), (4, 10), (8, 10)]
        for x0, x1 in [(0, 6), (4, 10), (8, 14), (12, 17), (16, 17)]
    ]


def test_rectangular_window_and_small_image() -> None:
    assert sliding_windows(5, 9, (4, 9), (2, 3)) == [(0, 4, 0, 9), (1, 5, 0, 9)]
    assert sliding_windows(30, 40, 801, 534) == [(0, 30, 0, 40)]
    assert sliding_windows(30, 40, 801, 534, shift_edges=False) == [(0, 30, 0, 40)]


@pytest.mark.parametrize(("h", "w", "grid"), [(13, 29, 7), (20, 20, 5), (9, 31, 10), (64, 50, 11)])
def test_windows_cover_every_pixel(h: int, w: int, grid: int) -> None:
    stride = int(grid * 2 / 3)
    assert sliding_windows(h, w, grid, stride, shift_edges=False) == _official_windows(h, w, grid, stride)
    for shift in (True, False):
        cover = torch.zeros(h, w, dtype=torch.int64)
        for y0, y1, x0, x1 in sliding_windows(h, w, grid, stride, shift):
            cover[y0:y1, x0:x1] += 1
            if shift:
                assert (y1 - y0, x1 - x0) == (min(grid, h), min(grid, w))
        assert int(cover.min()) >= 1


def test_window_errors() -> None:
    with pytest.raises(ConfigError, match="must not exceed"):
        sliding_windows(10, 10, 4, 5)
    with pytest.raises(ConfigError, match="window size"):
        sliding_windows(10, 10, 0, 1)
    with pytest.raises(ConfigError, match="stride"):
        sliding_windows(10, 10, 4, (1, 2, 3))


def test_slide_equals_whole_when_the_window_covers_the_image() -> None:
    model, image = _conv(3), _image(12, 15)
    with torch.no_grad():
        whole = whole_inference(model, image)
        torch.testing.assert_close(slide_inference(model, image, K, 16, 10), whole)
        torch.testing.assert_close(slide_inference(model, image, K, (12, 15), 4), whole)
        torch.testing.assert_close(slide_inference(model, image, K, 20, 16, shift_edges=False), whole)
    assert whole.shape == (1, K, 12, 15)
    torch.testing.assert_close(whole.sum(1), torch.ones(1, 12, 15))


@pytest.mark.parametrize("shift_edges", [True, False])
def test_slide_equals_whole_for_a_pointwise_model(shift_edges: bool) -> None:
    model, image = _conv(1), _image(20, 23, b=2)
    with torch.no_grad():
        slide = slide_inference(model, image, K, 7, 5, shift_edges)
        torch.testing.assert_close(slide, whole_inference(model, image))


def test_slide_with_a_context_model_differs_and_averages_windows() -> None:
    model, image = _conv(3), _image(10, 10)
    with torch.no_grad():
        slide = slide_inference(model, image, K, 6, 4)
        manual = torch.zeros(1, K, 10, 10)
        count = torch.zeros(1, 1, 10, 10)
        for y0, y1, x0, x1 in [(0, 6, 0, 6), (0, 6, 4, 10), (4, 10, 0, 6), (4, 10, 4, 10)]:
            manual[:, :, y0:y1, x0:x1] += model(image[:, :, y0:y1, x0:x1]).softmax(1)
            count[:, :, y0:y1, x0:x1] += 1
        torch.testing.assert_close(slide, manual / count)
        assert not torch.allclose(slide, whole_inference(model, image))


def test_flip_tta_with_a_flip_equivariant_model_equals_no_tta() -> None:
    model, image = _conv(1), _image(9, 14)
    with torch.no_grad():
        plain = infer(model, image, K)
        torch.testing.assert_close(infer(model, image, K, flip=True), plain)
        torch.testing.assert_close(infer(model, image, K, "slide", 5, 3, flip=True), plain)


def test_flip_and_multiscale_tta_average_the_passes() -> None:
    model, image = _conv(3, seed=3), _image(8, 12)
    with torch.no_grad():
        got = infer(model, image, K, flip=True, scales=(0.5, 1.0))
        small = F.interpolate(image, size=(4, 6), mode="bilinear", align_corners=False)
        passes = [model(image).softmax(1), model(image.flip(-1)).softmax(1).flip(-1)]
        for p in (model(small).softmax(1), model(small.flip(-1)).softmax(1).flip(-1)):
            passes.append(F.interpolate(p, size=(8, 12), mode="bilinear", align_corners=False))
        torch.testing.assert_close(got, sum(passes) / 4)
        assert not torch.allclose(got, infer(model, image, K))


def test_infer_errors() -> None:
    model, image = _conv(1), _image(6, 6)
    with pytest.raises(ConfigError, match="valid modes are 'whole', 'slide'"):
        infer(model, image, K, mode="sliding_window")
    with pytest.raises(ConfigError, match="window size and a stride"):
        infer(model, image, K, mode="slide")
    with pytest.raises(ConfigError, match="scales"):
        infer(model, image, K, scales=())
    with pytest.raises(ConfigError, match="predicts 3 classes but num_classes is 4"):
        infer(model, image, 4)


def _sample(pred: list[list[int]], mask: list[list[int]]) -> dict:
    p = torch.tensor(pred, dtype=torch.float32)
    return {"image": p.expand(1, 3, *p.shape).clone(), "mask": torch.tensor([mask]), "name": ["x"]}


LOADER = [
    _sample([[0, 1, 1], [2, 2, 0]], [[0, 1, 0], [2, 255, 0]]),
    _sample([[1, 1], [0, 0], [2, 1]], [[1, 1], [0, 2], [2, 2]]),
]
# confusion (rows = ground truth): [[3, 1, 0], [0, 3, 0], [1, 1, 2]]; union = [5, 5, 4]
EXPECTED_IOU = (3 / 5, 3 / 5, 2 / 4)


def test_evaluate_on_a_toy_loader() -> None:
    model = Oracle().train()
    result = evaluate(model, LOADER, K, mode="whole")
    assert torch.equal(result.metrics.confusion, torch.tensor([[3, 1, 0], [0, 3, 0], [1, 1, 2]]))
    assert result.metrics.iou == pytest.approx(EXPECTED_IOU)
    assert result.metrics.miou == pytest.approx(sum(EXPECTED_IOU) / 3)
    assert result.metrics.pixel_acc == pytest.approx(8 / 11)
    assert result.num_images == 2
    assert result.seconds >= 0.0
    assert all(not training and inference for training, inference, _ in model.calls)
    assert model.training  # restored


def test_evaluate_slide_and_tta_on_a_toy_loader() -> None:
    model = Oracle()
    result = evaluate(model, LOADER, K, mode="slide", window=2, stride=1, flip=True)
    assert result.metrics.iou == pytest.approx(EXPECTED_IOU)
    assert {shape[-2:] for _, _, shape in model.calls} == {(2, 2)}
    official = evaluate(Oracle(), LOADER, K, mode="slide", window=2, stride=1, shift_edges=False)
    assert official.metrics.iou == pytest.approx(EXPECTED_IOU)


def test_evaluate_batch_of_two_same_size_images() -> None:
    first = LOADER[0]
    batch = {"image": torch.cat([first["image"]] * 2), "mask": torch.cat([first["mask"]] * 2)}
    result = evaluate(Oracle(), [batch], K)
    single = evaluate(Oracle(), [first], K)
    assert torch.equal(result.metrics.confusion, 2 * single.metrics.confusion)
    assert result.num_images == 2


def test_evaluate_errors() -> None:
    with pytest.raises(DataError, match="'image' and a 'mask'"):
        evaluate(Oracle(), [(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2))], K)
    with pytest.raises(ConfigError, match="must not exceed"):
        evaluate(Oracle(), LOADER, K, mode="slide", window=2, stride=3)
    model = Oracle().train()
    with pytest.raises(ConfigError, match="num_classes is 5"):
        evaluate(model, LOADER, 5)
    assert model.training  # restored after an error too


def test_slide_equals_whole_on_a_tiny_segmentor() -> None:
    torch.manual_seed(0)
    encoder = {"embed_dims": (8, 16, 32, 64), "num_heads": (1, 1, 2, 2), "depths": (1, 1, 1, 1)}
    model = build_model("mit_b0", num_classes=5, crop_size=32, encoder_options=encoder, head_dim=32).eval()
    image = _image(40, 56)
    with torch.inference_mode():
        whole = whole_inference(model, image, 5)
        torch.testing.assert_close(slide_inference(model, image, 5, 64, 40), whole)
        assert infer(model, image, 5, "slide", 32, 21).shape == (1, 5, 40, 56)


def _evaluate_worker(rank: int, store_path: str, result_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(Oracle())
        shard = LOADER[rank::2] if rank == 0 else LOADER[rank::2] + LOADER[:1]  # uneven shards: 1 and 2 images
        result = evaluate(model, shard, K)
        torch.save({"confusion": result.metrics.confusion, "num_images": result.num_images}, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.dist
def test_evaluate_reduces_over_two_gloo_processes(tmp_path: os.PathLike) -> None:
    mp.spawn(_evaluate_worker, args=(str(tmp_path / "store"), str(tmp_path / "res")), nprocs=2, join=True)
    first = evaluate(Oracle(), LOADER[:1], K).metrics.confusion
    expected = torch.tensor([[3, 1, 0], [0, 3, 0], [1, 1, 2]]) + first
    for rank in range(2):
        got = torch.load(tmp_path / f"res.{rank}", weights_only=True)
        assert torch.equal(got["confusion"], expected)
        assert got["num_images"] == 3
