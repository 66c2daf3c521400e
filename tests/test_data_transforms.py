"""Transforms: shapes, dtypes, alignment of masks with images, padding values, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from allspark_seg.data import transforms as T
from allspark_seg.data.palette import palette_for

PALETTE = palette_for(8).astype(np.int64)
PALETTE[0] = (30, 200, 90)  # no class is black, so zero padding is distinguishable


def block_sample(h: int = 60, w: int = 80, block: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image whose pixel colour encodes the class of a blocky mask."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 8, size=(-(-h // block), -(-w // block)))
    mask = np.kron(cells, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)
    image = PALETTE[mask].astype(np.uint8)
    return image, mask


def nearest_class(image: np.ndarray) -> np.ndarray:
    dist = ((image[:, :, None, :].astype(np.int64) - PALETTE[None, None]) ** 2).sum(-1)
    return dist.argmin(-1)


def test_random_rescale_keeps_aspect_and_integer_masks() -> None:
    image, mask = block_sample(60, 80)
    for seed in range(20):
        out, (m,) = T.random_rescale(image, (mask,), np.random.default_rng(seed))
        h, w = out.shape[:2]
        assert 40 <= w <= 160 and m.shape == (h, w) and m.dtype == np.uint8
        assert abs(h / w - 0.75) < 0.03
        assert set(np.unique(m)) <= set(np.unique(mask))


def test_rescale_of_a_one_pixel_image_never_reaches_zero() -> None:
    image, mask = np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.uint8)
    for seed in range(10):
        out, (m,) = T.random_rescale(image, (mask,), np.random.default_rng(seed))
        assert min(out.shape[:2]) >= 1 and m.shape == out.shape[:2]


def test_pad_uses_ignore_values() -> None:
    image, mask = block_sample(20, 30)
    flags = np.zeros((20, 30), np.uint8)
    out, (m, f) = T.pad_to(image, (mask, flags), (25, 40), (255, 1))
    assert out.shape == (25, 40, 3) and m.shape == f.shape == (25, 40)
    assert (out[20:] == 0).all() and (out[:, 30:] == 0).all()
    assert (m[20:] == 255).all() and (m[:, 30:] == 255).all() and (m[:20, :30] == mask).all()
    assert f.sum() == 25 * 40 - 20 * 30 and (f[:20, :30] == 0).all()
    same, masks = T.pad_to(image, (mask,), 10, (255,))
    assert same is image and masks[0] is mask


def test_random_crop_int_and_rectangular() -> None:
    image, mask = block_sample(60, 80)
    rng = np.random.default_rng(0)
    out, (m,) = T.random_crop(image, (mask,), 32, rng)
    assert out.shape == (32, 32, 3) and m.shape == (32, 32)
    out, (m,) = T.random_crop(image, (mask,), (20, 50), rng)
    assert out.shape == (20, 50, 3) and m.shape == (20, 50)
    with pytest.raises(ValueError):
        T.random_crop(image, (mask,), 70, rng)


def test_hflip_probability_one_and_zero() -> None:
    image, mask = block_sample()
    flipped, (m,) = T.hflip(image, (mask,), np.random.default_rng(0), p=1.0)
    assert (flipped == image[:, ::-1]).all() and (m == mask[:, ::-1]).all()
    same, (m,) = T.hflip(image, (mask,), np.random.default_rng(0), p=0.0)
    assert (same == image).all() and (m == mask).all()


@pytest.mark.parametrize("crop", [48, (40, 64), 128])
def test_geometric_pipeline_keeps_masks_aligned_with_images(crop: int | tuple[int, int]) -> None:
    image, mask = block_sample(60, 80, block=12)
    for seed in range(6):
        out = T.apply_pipeline("unimatch", "labeled", image, mask, np.random.default_rng(seed), crop)
        assert out["image"].dtype == torch.float32 and out["mask"].dtype == torch.int64
        assert tuple(out["image"].shape[1:]) == T.to_hw(crop) == tuple(out["mask"].shape)
        rgb = T.denormalize(out["image"])
        m = out["mask"].numpy()
        valid = m != 255
        agree = (nearest_class(rgb)[valid] == m[valid]).mean()
        assert agree > 0.95, agree  # only blended pixels on block borders may disagree
        assert (rgb[~valid] <= 1).all()  # padded pixels are black


def test_unlabeled_ignore_marks_exactly_the_padding() -> None:
    image, mask = block_sample(20, 30, block=5)
    for pipeline in T.PIPELINES:
        for seed in range(6):
            out = T.apply_pipeline(pipeline, "unlabeled", image, mask, np.random.default_rng(seed), 96)
            ignore = out["ignore"].numpy()
            assert out["ignore"].dtype == torch.bool and ignore.any() and not ignore.all()
            assert (out["mask"].numpy()[ignore] == 255).all()
            assert (out["mask"].numpy()[~ignore] != 255).all()
            assert (T.denormalize(out["image"])[ignore] <= 1).all()
            no_gt = T.apply_pipeline(pipeline, "unlabeled", image, None, np.random.default_rng(seed), 96)
            assert torch.equal(no_gt["ignore"], out["ignore"]) and "mask" not in no_gt


def test_pipeline_outputs_match_the_contract() -> None:
    image, mask = block_sample()
    rng = np.random.default_rng(0)
    lab = T.apply_pipeline("allspark", "labeled", image, mask, rng, 32)
    assert set(lab) == {"image", "mask"}
    unl = T.apply_pipeline("allspark", "unlabeled", image, None, rng, 32)
    assert set(unl) == {"image", "ignore"}
    uni = T.apply_pipeline("unimatch", "unlabeled", image, None, rng, 32)
    assert set(uni) == {"image", "image_s1", "image_s2", "cutmix_box1", "cutmix_box2", "ignore"}
    assert uni["cutmix_box1"].dtype == torch.bool and uni["cutmix_box1"].shape == (32, 32)
    with pytest.raises(ValueError):
        T.apply_pipeline("fixmatch", "labeled", image, mask, rng, 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        T.apply_pipeline("allspark", "labeled", image, None, rng, 32)


def test_allspark_unlabeled_is_geometric_only_and_labeled_is_photometric() -> None:
    image, mask = block_sample(60, 80, block=12)
    unchanged = changed = 0
    for seed in range(8):
        out = T.apply_pipeline("allspark", "unlabeled", image, mask, np.random.default_rng(seed), 48)
        valid = ~out["ignore"].numpy()
        rgb = T.denormalize(out["image"])
        unchanged += (nearest_class(rgb)[valid] == out["mask"].numpy()[valid]).mean() > 0.95
        lab = T.apply_pipeline("allspark", "labeled", image, mask, np.random.default_rng(seed), 48)
        geo = T.apply_pipeline("unimatch", "labeled", image, mask, np.random.default_rng(seed), 48)
        assert torch.equal(lab["mask"], geo["mask"])  # same geometric draws come first
        changed += not torch.allclose(lab["image"], geo["image"])
    assert unchanged == 8 and changed >= 5


def test_color_jitter_is_deterministic_and_changes_colours() -> None:
    image, _ = block_sample()
    a = T.color_jitter(image, np.random.default_rng(3))
    b = T.color_jitter(image, np.random.default_rng(3))
    assert a.dtype == np.uint8 and a.shape == image.shape and (a == b).all()
    assert not (a == image).all()
    none = T.color_jitter(image, np.random.default_rng(3), 0, 0, 0, 0)
    assert (none == image).all()


def test_hue_rotation_keeps_a_saturated_colour_saturated() -> None:
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    for seed in range(5):
        out = T.color_jitter(red, np.random.default_rng(seed), 0, 0, 0, 0.5)
        assert out.max() >= 250 and out.min() <= 5
        assert (out == out[0, 0]).all()


def test_adjust_hue_matches_pil_hsv() -> None:
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert (T.adjust_hue(image, 0.0) == image).all()
    rotated = T.adjust_hue(image, 1 / 3).astype(int)  # a third of a turn moves red to green, green to blue
    assert np.abs(rotated[..., [1, 2, 0]] - image).max() <= 1
    gray = np.full((2, 2, 3), 77, np.uint8)
    assert (T.adjust_hue(gray, 0.3) == 77).all()
    for hue in (0.1, -0.25, 0.5):
        h, s, v = Image.fromarray(image).convert("HSV").split()
        h = Image.fromarray(((np.asarray(h, np.int64) + int(hue * 255)) % 256).astype(np.uint8))
        pil = np.asarray(Image.merge("HSV", (h, s, v)).convert("RGB")).astype(int)
        diff = np.abs(T.adjust_hue(image, int(hue * 255) / 255).astype(int) - pil)
        assert diff.mean() < 1.5 and diff.max() <= 16  # PIL quantises hue and saturation to 8 bits


def test_grayscale_and_blur() -> None:
    image, _ = block_sample()
    gray = T.random_grayscale(image, np.random.default_rng(0), p=1.0)
    assert gray.shape == image.shape and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert T.random_grayscale(image, np.random.default_rng(0), p=0.0) is image
    blurred = T.random_gaussian_blur(image, np.random.default_rng(0), p=1.0, sigma_range=(2.0, 2.0))
    assert blurred.shape == image.shape and blurred.dtype == np.uint8
    assert np.abs(np.diff(blurred.astype(int), axis=1)).sum() < np.abs(np.diff(image.astype(int), axis=1)).sum()


def test_normalize_matches_imagenet_statistics() -> None:
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    x = T.normalize(image)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    expected = (image[2, 3] / 255.0 - np.array(T.IMAGENET_MEAN)) / np.array(T.IMAGENET_STD)
    assert np.allclose(x[:, 2, 3].numpy(), expected, atol=1e-5)
    assert (T.denormalize(x) == image).all()


def test_cutmix_box() -> None:
    assert not T.cutmix_box(32, np.random.default_rng(0), p=0.0).any()
    areas = []
    for seed in range(50):
        box = T.cutmix_box((32, 48), np.random.default_rng(seed), p=1.0)
        assert box.dtype == bool and box.shape == (32, 48)
        ys, xs = np.nonzero(box)
        if ys.size:
            assert box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()  # a rectangle
        areas.append(box.mean())
    assert min(areas) > 0.0 and max(areas) <= 0.4
    thin = T.cutmix_box((2, 500), np.random.default_rng(0), p=1.0)  # cannot fit: clipped, terminates
    assert thin.shape == (2, 500)


def test_sample_rng_depends_on_seed_epoch_and_index() -> None:
    draw = [T.sample_rng(*key).random() for key in [(0, 0, 0), (0, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 0)]]
    assert draw[0] == draw[1] and len(set(draw)) == 4
