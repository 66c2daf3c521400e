"""Training transforms: small pure functions on numpy arrays with an explicit random generator.

Images are ``np.uint8 (H, W, 3)`` RGB arrays and masks ``np.uint8 (H, W)`` arrays (class ids, or 0/1 flags for the
padding mask). Geometric functions take the image and a tuple of masks that must stay aligned with it, so one call
moves a ground-truth mask and a padding mask together. PIL does the resampling, brightness, contrast, saturation,
grayscale and blur, as the official code (UniMatch's ``dataset/transform.py`` with torchvision on PIL images) does;
the hue rotation is vectorised numpy (torchvision's float HSV formula, twice faster than PIL's HSV round trip).

Every function that draws randomness takes ``rng: np.random.Generator`` and draws nothing else; a training sample's
generator is ``np.random.default_rng([seed, epoch, index, stream])`` with the stream of its role (0 unlabeled,
1 labeled; see :func:`sample_rng`), so labeled and unlabeled sample ``j`` draw different crops, flips and scales.

Pipelines (:func:`apply_pipeline`):

- ``allspark`` (faithful to the AllSpark recipe): rescale, pad, crop, flip for every sample; labeled images then get
  colour jitter (p=0.8), grayscale (p=0.2) and blur (p=0.5); unlabeled images stay geometric only.
- ``unimatch``: labeled images geometric only; unlabeled images give a weak view and two strong views, each strong
  view with jitter, grayscale, blur and its own CutMix box.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from allspark_seg.constants import IGNORE_INDEX
from allspark_seg.utils import to_pair

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PIPELINES",
    "ROLE_STREAMS",
    "adjust_hue",
    "apply_pipeline",
    "color_jitter",
    "cutmix_box",
    "denormalize",
    "gaussian_blur",
    "hflip",
    "normalize",
    "pad_to",
    "random_crop",
    "random_gaussian_blur",
    "random_grayscale",
    "random_rescale",
    "sample_rng",
    "strong_photometric",
    "to_hw",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
PIPELINES: tuple[str, ...] = ("allspark", "unimatch")

Masks = tuple[np.ndarray, ...]


#: Random stream of each training role: the sampler's order (``loaders.epoch_order``) and every sample's augmentation
#: generator (:func:`sample_rng`) are keyed by it, so the labeled and the unlabeled sets never share draws.
ROLE_STREAMS: dict[str, int] = {"unlabeled": 0, "labeled": 1}


def sample_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of one training sample: ``np.random.default_rng([seed, epoch, index, stream])``.

    ``stream`` is the role's (:data:`ROLE_STREAMS`); stream 0 gives the same generator as ``[seed, epoch, index]``
    (a trailing zero does not change a numpy seed sequence). Nothing depends on workers or processes.
    """
    return np.random.default_rng([int(seed), int(epoch), int(index), int(stream)])


#: The crop-size name of :func:`allspark_seg.utils.to_pair` (an int or ``(h, w)`` -> ``(h, w)``).
to_hw = to_pair


def _resize_array(array: np.ndarray, size_wh: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize(size_wh, resample))


# --------------------------------------------------------------------------------------------- geometric


def random_rescale(
    image: np.ndarray,
    masks: Masks,
    rng: np.random.Generator,
    ratio_range: tuple[float, float] = (0.5, 2.0),
) -> tuple[np.ndarray, Masks]:
    """Rescale so that the long side is an integer drawn uniformly from ``[lo * L, hi * L]``, keeping the aspect.

    Args:
        image: ``(H, W, 3)`` uint8.
        masks: ``(H, W)`` uint8 arrays resized with nearest neighbour.
        rng: random generator.
        ratio_range: (lo, hi) scale range of the long side L.

    Returns:
        The resized image (bilinear, as PIL) and masks (nearest).
    """
    h, w = image.shape[:2]
    long_side = max(h, w)
    lo, hi = int(long_side * ratio_range[0]), int(long_side * ratio_range[1])
    new_long = max(1, int(rng.integers(lo, hi, endpoint=True)))
    if h > w:
        oh, ow = new_long, max(1, int(w * new_long / h + 0.5))
    else:
        ow, oh = new_long, max(1, int(h * new_long / w + 0.5))
    image = _resize_array(image, (ow, oh), Image.Resampling.BILINEAR)
    masks = tuple(_resize_array(m, (ow, oh), Image.Resampling.NEAREST) for m in masks)
    return image, masks


def pad_to(
    image: np.ndarray, masks: Masks, size: int | Sequence[int], mask_fills: Sequence[int]
) -> tuple[np.ndarray, Masks]:
    """Pad on the right and bottom up to at least ``size``: the image with 0, each mask with its fill value.

    Args:
        image: ``(H, W, 3)`` uint8.
        masks: ``(H, W)`` uint8 arrays.
        size: crop size, int or ``(h, w)``.
        mask_fills: one fill value per mask (255 for labels, 1 for a padding flag mask).

    Returns:
        Arrays of shape ``(max(H, h), max(W, w))``; unchanged objects when no padding is needed.
    """
    ch, cw = to_hw(size)
    h, w = image.shape[:2]
    pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
    if pad_h == 0 and pad_w == 0:
        return image, masks
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
    masks = tuple(
        np.pad(m, ((0, pad_h), (0, pad_w)), constant_values=fill) for m, fill in zip(masks, mask_fills, strict=True)
    )
    return image, masks


def random_crop(
    image: np.ndarray, masks: Masks, size: int | Sequence[int], rng: np.random.Generator
) -> tuple[np.ndarray, Masks]:
    """Take a random ``size`` window (call :func:`pad_to` first when the image may be smaller).

    Args:
        image: ``(H, W, 3)`` with ``H >= h`` and ``W >= w``.
        masks: ``(H, W)`` arrays cropped at the same place.
        size: crop size, int or ``(h, w)``.
        rng: random generator.

    Returns:
        ``(h, w, 3)`` image and ``(h, w)`` masks (contiguous copies).
    """
    ch, cw = to_hw(size)
    h, w = image.shape[:2]
    if h < ch or w < cw:
        raise ValueError(f"image {h}x{w} is smaller than the crop {ch}x{cw}; pad it first")
    x = int(rng.integers(0, w - cw, endpoint=True))
    y = int(rng.integers(0, h - ch, endpoint=True))
    image = np.ascontiguousarray(image[y : y + ch, x : x + cw])
    masks = tuple(np.ascontiguousarray(m[y : y + ch, x : x + cw]) for m in masks)
    return image, masks


def hflip(image: np.ndarray, masks: Masks, rng: np.random.Generator, p: float = 0.5) -> tuple[np.ndarray, Masks]:
    """Flip left-right with probability ``p`` (one uniform draw).

    Returns:
        The (possibly) flipped image and masks, same shapes.
    """
    if rng.random() < p:
        image = np.ascontiguousarray(image[:, ::-1])
        masks = tuple(np.ascontiguousarray(m[:, ::-1]) for m in masks)
    return image, masks


# ------------------------------------------------------------------------------------------- photometric


def adjust_hue(image: np.ndarray, hue: float) -> np.ndarray:
    """Rotate the hue by ``hue`` turns in HSV space, keeping saturation and value (torchvision's tensor formula).

    Vectorised in float32 without PIL's 8-bit HSV round trip (which is about twice slower at 513 px and quantises
    the hue); the result differs from PIL's by about one grey level on average.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        hue: rotation in turns, in [-0.5, 0.5].

    Returns:
        ``(H, W, 3)`` uint8.
    """
    r, g, b = np.moveaxis(image, -1, 0).astype(np.float32)
    maxc = np.maximum(np.maximum(r, g), b)
    delta = maxc - np.minimum(np.minimum(r, g), b)
    inv = 1.0 / np.maximum(delta, np.float32(1))
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~(is_r | is_g)
    # hue in sextants [0, 6): red max (g - b) / delta, green max 2 + (b - r) / delta, blue max 4 + (r - g) / delta
    h = ((g - b) * is_r + (b - r) * is_g + (r - g) * is_b) * inv + (2 * is_g + 4 * is_b).astype(np.float32)
    h += np.float32(6 * hue)
    out = np.empty(image.shape, dtype=np.float32)
    for channel, offset in enumerate((5.0, 3.0, 1.0)):  # HSV -> RGB: c = V - V * S * clip(min(k, 4 - k), 0, 1)
        k = h + np.float32(offset)
        k -= np.float32(6) * np.floor(k * np.float32(1 / 6))
        out[..., channel] = maxc - delta * np.clip(np.minimum(k, 4 - k), 0, 1)
    return np.rint(out, out=out).astype(np.uint8)


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.5,
    contrast: float = 0.5,
    saturation: float = 0.5,
    hue: float = 0.25,
) -> np.ndarray:
    """Colour jitter as torchvision's ``ColorJitter``: the four adjustments in a random order.

    Brightness, contrast and saturation use PIL's ``ImageEnhance`` as torchvision does for PIL images; the hue
    rotation is :func:`adjust_hue`.

    Factors are drawn as brightness/contrast/saturation ``U(max(0, 1 - x), 1 + x)`` and hue ``U(-hue, hue)``;
    a zero strength skips that adjustment (and draws nothing for it).

    Args:
        image: ``(H, W, 3)`` uint8.
        rng: random generator.
        brightness: strength x of the brightness factor.
        contrast: strength of the contrast factor.
        saturation: strength of the saturation factor.
        hue: maximum hue rotation, in turns (at most 0.5).

    Returns:
        ``(H, W, 3)`` uint8.
    """
    order = rng.permutation(4)
    factors = [rng.uniform(max(0.0, 1 - x), 1 + x) if x > 0 else None for x in (brightness, contrast, saturation)]
    hue_shift = rng.uniform(-hue, hue) if hue > 0 else None
    pil = Image.fromarray(image)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for op in order:
        if op < 3 and factors[op] is not None:
            pil = enhancers[op](pil).enhance(float(factors[op]))
        elif op == 3 and hue_shift is not None:
            pil = Image.fromarray(adjust_hue(np.asarray(pil), float(hue_shift)))
    return np.asarray(pil)


def random_grayscale(image: np.ndarray, rng: np.random.Generator, p: float = 0.2) -> np.ndarray:
    """Convert to grayscale (kept as 3 equal channels, ITU-R 601 luma as PIL) with probability ``p``.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    if rng.random() < p:
        gray = np.asarray(Image.fromarray(image).convert("L"))
        return np.repeat(gray[:, :, None], 3, axis=2)
    return image


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """PIL Gaussian blur with ``radius=sigma`` (PIL's radius is the standard deviation), as the official code.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=float(sigma))))


def random_gaussian_blur(
    image: np.ndarray, rng: np.random.Generator, p: float = 0.5, sigma_range: tuple[float, float] = (0.1, 2.0)
) -> np.ndarray:
    """Blur with probability ``p`` and sigma drawn from ``U(sigma_range)``.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    if rng.random() < p:
        return gaussian_blur(image, rng.uniform(*sigma_range))
    return image


def strong_photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The "strong" augmentation of UniMatch and of AllSpark's labeled branch.

    ``ColorJitter(0.5, 0.5, 0.5, 0.25)`` with p=0.8, then grayscale with p=0.2, then blur with p=0.5.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    if rng.random() < 0.8:
        image = color_jitter(image, rng)
    image = random_grayscale(image, rng, p=0.2)
    return random_gaussian_blur(image, rng, p=0.5)


def cutmix_box(
    size: int | Sequence[int],
    rng: np.random.Generator,
    p: float = 0.5,
    area_range: tuple[float, float] = (0.02, 0.4),
    ratio_range: tuple[float, float] = (0.3, 1 / 0.3),
    max_tries: int = 100,
) -> np.ndarray:
    """UniMatch's CutMix box: with probability ``p`` a rectangle of area ``U(area_range) * h * w``.

    The aspect ratio is drawn from ``U(ratio_range)`` and the top-left corner uniformly; draws are repeated until
    the box fits (after ``max_tries`` the last box is clipped to the crop, which only matters for thin crops).

    Args:
        size: crop size, int or ``(h, w)``.
        rng: random generator.
        p: probability of a non-empty box.
        area_range: box area as a fraction of the crop.
        ratio_range: range of the ratio box height / box width.
        max_tries: redraws before clipping.

    Returns:
        ``(h, w)`` bool, True inside the box.
    """
    h, w = to_hw(size)
    box = np.zeros((h, w), dtype=bool)
    if rng.random() > p:
        return box
    area = rng.uniform(*area_range) * h * w
    for _ in range(max_tries):
        ratio = rng.uniform(*ratio_range)
        box_w = int(np.sqrt(area / ratio))
        box_h = int(np.sqrt(area * ratio))
        x = int(rng.integers(0, w))
        y = int(rng.integers(0, h))
        if x + box_w <= w and y + box_h <= h:
            break
    box[y : y + box_h, x : x + box_w] = True
    return box


# -------------------------------------------------------------------------------------------- to tensors


def normalize(image: np.ndarray) -> torch.Tensor:
    """ImageNet normalisation of a uint8 image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.

    Returns:
        ``(3, H, W)`` float32 tensor ``(x / 255 - mean) / std``.
    """
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(IMAGENET_STD, dtype=np.float32) * 255.0)
    chw = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float32)
    chw -= mean[:, None, None]
    chw *= inv_std[:, None, None]
    return torch.from_numpy(chw)


def denormalize(tensor: torch.Tensor) -> np.ndarray:
    """Invert :func:`normalize` (for visualisation).

    Args:
        tensor: ``(3, H, W)`` float tensor.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    image = (tensor.detach().cpu().float() * std + mean).clamp(0, 1) * 255.0
    return image.round().to(torch.uint8).permute(1, 2, 0).numpy()


def _mask_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask.astype(np.int64))


# --------------------------------------------------------------------------------------------- pipelines


def _geometric(
    image: np.ndarray,
    masks: Masks,
    fills: Sequence[int],
    crop_size: int | Sequence[int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, Masks]:
    image, masks = random_rescale(image, masks, rng, (0.5, 2.0))
    image, masks = pad_to(image, masks, crop_size, fills)
    image, masks = random_crop(image, masks, crop_size, rng)
    return hflip(image, masks, rng, p=0.5)


def apply_pipeline(
    pipeline: Literal["allspark", "unimatch"],
    role: Literal["labeled", "unlabeled"],
    image: np.ndarray,
    mask: np.ndarray | None,
    rng: np.random.Generator,
    crop_size: int | Sequence[int],
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """Augment one training sample and return the dict of tensors documented in docs/architecture.md.

    Args:
        pipeline: "allspark" or "unimatch".
        role: "labeled" (``mask`` required) or "unlabeled" (``mask`` optional ground truth for diagnostics).
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` uint8 class ids (255 = ignore) or None.
        rng: the sample's generator.
        crop_size: int or ``(h, w)``.
        ignore_index: value of padded label pixels.

    Returns:
        labeled: ``image (3, h, w) float32``, ``mask (h, w) int64``.
        unlabeled, allspark: ``image``, ``ignore (h, w) bool`` (True on padding) and ``mask`` when given.
        unlabeled, unimatch: ``image`` (weak), ``image_s1``, ``image_s2``, ``cutmix_box1``, ``cutmix_box2``
        (``(h, w) bool``), ``ignore`` and ``mask`` when given.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; expected one of {PIPELINES}")
    if role == "labeled":
        if mask is None:
            raise ValueError("a labeled sample needs a mask")
        image, (mask,) = _geometric(image, (mask,), (ignore_index,), crop_size, rng)
        if pipeline == "allspark":
            image = strong_photometric(image, rng)
        return {"image": normalize(image), "mask": _mask_tensor(mask)}
    if role != "unlabeled":
        raise ValueError(f"unknown role {role!r}")

    padding = np.zeros(image.shape[:2], dtype=np.uint8)
    masks: Masks = (padding,) if mask is None else (padding, mask)
    image, masks = _geometric(image, masks, (1, ignore_index)[: len(masks)], crop_size, rng)
    out: dict[str, torch.Tensor] = {"image": normalize(image)}
    if pipeline == "unimatch":
        hw = image.shape[:2]
        strong1 = strong_photometric(image, rng)
        box1 = cutmix_box(hw, rng, p=0.5)
        strong2 = strong_photometric(image, rng)
        box2 = cutmix_box(hw, rng, p=0.5)
        out.update(
            image_s1=normalize(strong1),
            image_s2=normalize(strong2),
            cutmix_box1=torch.from_numpy(box1),
            cutmix_box2=torch.from_numpy(box2),
        )
    out["ignore"] = torch.from_numpy(masks[0].astype(bool))
    if mask is not None:
        out["mask"] = _mask_tensor(masks[1])
    return out
