"""Training recipes: CutMix, thresholds, EMA and the unlabeled loss by hand; the weak-to-strong wiring; every recipe
learns a fixed batch."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from allspark_seg.config.schema import CHOICES, RunConfig, leaf_fields
from allspark_seg.data import load_mask
from allspark_seg.dist import DistEnv
from allspark_seg.engine.diagnostics import largest_crop_share
from allspark_seg.engine.evaluate import sliding_windows
from allspark_seg.engine.recipes import (
    EMA_BUFFERS,
    RECIPES,
    StepContext,
    class_thresholds,
    cutmix,
    ema_update,
    make_ema,
    oversized_classes,
    pseudo_labels,
    teacher_logits,
    unsup_loss,
    unsup_scale,
    weak_to_strong_step,
)
from allspark_seg.engine.train import Trainer
from allspark_seg.losses import build_loss
from conftest import no_dropout, tiny_model
from train_utils import epoch_iterators, tiny_config


# ----------------------------------------------------------------------------------------- hand-computed pieces
def test_cutmix_pastes_the_rolled_neighbour_inside_the_box():
    box = torch.tensor([[[True, False], [False, False]], [[False, False], [True, True]]])  # (B=2, 2, 2)
    images = torch.arange(16.0).view(2, 2, 2, 2)  # (B, C=2, 2, 2)
    labels = torch.tensor([[[1, 1], [1, 1]], [[2, 2], [2, 2]]])
    mixed_images, mixed_labels = cutmix(box, images, labels)
    # Sample 0 takes sample 1 (its neighbour after roll by one) at (0, 0); sample 1 takes sample 0 on its last row.
    assert mixed_labels.tolist() == [[[2, 1], [1, 1]], [[2, 2], [1, 1]]]
    expected = images.clone()
    expected[0, :, 0, 0] = images[1, :, 0, 0]
    expected[1, :, 1, :] = images[0, :, 1, :]
    assert torch.equal(mixed_images, expected)
    # A batch of one mixes with itself: nothing changes.
    (same,) = cutmix(box[:1], images[:1])
    assert torch.equal(same, images[:1])


def test_pseudo_labels_threshold_padding_and_the_unimatch_normalisation():
    # Two classes, four pixels; probabilities of class 1: sigmoid(logit difference).
    diff = torch.tensor([[[3.0, 0.5], [-2.0, -0.1]]])  # (B=1, 2, 2)
    logits = torch.stack([torch.zeros_like(diff), diff], dim=1)  # (1, K=2, 2, 2)
    p1 = torch.sigmoid(diff)
    ignore = torch.tensor([[[False, False], [True, False]]])
    labels, confidence, valid = pseudo_labels(logits, conf_thresh=0.8, ignore=ignore)
    torch.testing.assert_close(confidence, torch.maximum(p1, 1 - p1))
    # 0.953 kept (class 1); 0.622 below 0.8; padding ignored whatever its confidence (0.881); 0.525 below 0.8.
    assert labels.tolist() == [[[1, 255], [255, 255]]]
    assert valid.tolist() == [[[True, True], [False, True]]]
    # Loss: cross-entropy of the kept pixel divided by the 3 valid pixels (unconfident ones count, padding not).
    student = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[1.0, 5.0], [5.0, 5.0]]]])
    expected = -math.log(math.exp(1.0) / (1.0 + math.exp(1.0))) / 3
    assert unsup_loss(student, labels, valid).item() == pytest.approx(expected, rel=1e-6)
    # Without threshold and padding: plain argmax and mean cross-entropy (the official loss).
    labels0, _, valid0 = pseudo_labels(logits)
    assert labels0.tolist() == [[[1, 1], [0, 0]]] and bool(valid0.all())


def test_class_thresholds_scale_the_threshold_by_each_class_mean_confidence():
    # Class 0: confidences 0.99 and 0.97 (mean 0.98); class 1: 0.70 and 0.56 (mean 0.63); class 2: only on padding.
    confidence = torch.tensor([[[0.99, 0.97, 0.70], [0.56, 0.99, 0.50]]])
    labels = torch.tensor([[[0, 0, 1], [1, 2, 1]]])
    valid = torch.tensor([[[True, True, True], [True, False, False]]])
    thresholds = class_thresholds(confidence, labels, valid, 0.95, num_classes=4)
    expected = [0.95, 0.95 * 0.63 / 0.98, 0.95, 0.95]  # classes 2 and 3 are predicted on no valid pixel
    torch.testing.assert_close(thresholds, torch.tensor(expected), rtol=1e-6, atol=0)


def test_class_thresholds_keep_a_less_confident_class_that_a_fixed_threshold_drops():
    # Class 1's pixels (teacher probability 0.8 and 0.7) all fall below 0.95; per-class thresholds keep the 0.8 one.
    p1 = torch.tensor([[[0.02, 0.01, 0.8, 0.7]]])  # (B=1, 1, 4)
    logits = torch.stack([torch.log(1 - p1), torch.log(p1)], dim=1)
    fixed, _, _ = pseudo_labels(logits, conf_thresh=0.95)
    per_class, confidence, _ = pseudo_labels(logits, conf_thresh=0.95, class_thresh=True)
    assert fixed.tolist() == [[[0, 0, 255, 255]]]
    # Class 1 threshold: 0.95 * mean(0.8, 0.7) / mean(0.98, 0.99) = 0.7234: keeps 0.8, drops 0.7.
    assert per_class.tolist() == [[[0, 0, 1, 255]]]
    assert pseudo_labels(logits, class_thresh=True)[0].tolist() == [[[0, 0, 1, 1]]]  # no threshold: nothing dropped


def test_area_cap_drops_a_class_only_in_the_images_where_it_is_too_large():
    # Image 0: class 1 on 3 of 4 pixels (75%); image 1: on 1 of 4 (25%), another of its pixels is padding.
    labels = torch.tensor([[[1, 1], [1, 0]], [[1, 0], [0, 2]]])
    valid = torch.tensor([[[True, True], [True, True]], [[True, True], [True, False]]])
    cap = torch.tensor([1.0, 0.5, 0.2])
    # Image 1: class 1 is 1 of 3 valid pixels (33%, under 0.5); class 2 lies on padding only (0%).
    assert oversized_classes(labels, valid, cap).tolist() == [[False, True, False], [False, False, False]]
    logits = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 5
    kept, _, _ = pseudo_labels(logits, ignore=~valid, area_cap=cap)
    assert kept.tolist() == [[[255, 255], [255, 0]], [[1, 0], [0, 255]]]
    # The share is of the arg max before any threshold: with one of its pixels unconfident, class 1 keeps 2 of 4
    # pixels (50%, not above the cap) but still covers 75% of image 0 in the teacher's eyes.
    logits[0, :, 0, 0] = torch.tensor([0.0, 0.1, 0.0])
    assert pseudo_labels(logits, conf_thresh=0.5, area_cap=cap)[0][0].tolist() == [[255, 255], [255, 0]]
    assert pseudo_labels(logits, conf_thresh=0.5)[0][0].tolist() == [[255, 1], [1, 0]]


def test_largest_crop_share_over_crop_sized_windows_of_the_labeled_masks():
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :4] = 1  # a 4 x 4 object in one corner
    mask[7, 7] = 255  # ignored: not counted
    whole = largest_crop_share([mask], 3, 8)
    torch.testing.assert_close(whole, torch.tensor([47 / 63, 16 / 63, 0.0]))
    torch.testing.assert_close(largest_crop_share([mask], 3, 4), torch.tensor([1.0, 1.0, 0.0]))  # a crop on it
    torch.testing.assert_close(largest_crop_share([mask], 3, (4, 8)), torch.tensor([1.0, 0.5, 0.0]))
    two = largest_crop_share([mask, np.full((4, 4), 2, np.uint8)], 3, 8)  # a mask smaller than the crop: one window
    torch.testing.assert_close(two, torch.tensor([47 / 63, 16 / 63, 1.0]))


def test_largest_crop_share_of_a_large_crop_from_subsampled_masks_is_within_a_point_of_the_exact_one():
    yy, xx = np.mgrid[:700, :900]
    mask = np.zeros((700, 900), np.uint8)
    mask[100:400, 50:330] = 1
    mask[(yy - 500) ** 2 + (xx - 600) ** 2 < 150**2] = 2
    mask[600:, :200] = 255
    exact = np.zeros(3)
    for y0, y1, x0, x1 in sliding_windows(700, 900, 320, 160):  # every window at full resolution
        window = mask[y0:y1, x0:x1]
        exact = np.maximum(exact, [(window == k).sum() / (window < 3).sum() for k in range(3)])
    approx = largest_crop_share([mask], 3, 320).double().numpy()  # every 5th pixel
    assert np.abs(approx - exact).max() < 0.01, (approx, exact)


def test_unsup_scale_waits_then_ramps_up():
    semi = tiny_config("unused", "fixmatch", ("semi.unsup_start=10", "semi.unsup_rampup=20")).semi
    assert [unsup_scale(semi, s) for s in (0, 9)] == [0.0, 0.0]
    assert unsup_scale(semi, 10) == pytest.approx(math.exp(-5.0))
    assert unsup_scale(semi, 20) == pytest.approx(math.exp(-5.0 * 0.25))
    assert [unsup_scale(semi, s) for s in (30, 500)] == [1.0, 1.0]
    assert unsup_scale(tiny_config("unused", "fixmatch").semi, 0) == 1.0  # presets: no wait, no ramp


def test_ema_update_with_the_decay_warm_up():
    model, ema = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
        model.running_mean.fill_(3.0)
    # Step 0: d = min(1 - 1/1, 0.9) = 0, the teacher copies the student.
    assert ema_update(ema, model, decay=0.9, step=0) == 0.0
    assert ema.weight.tolist() == [1.0, 1.0]
    assert ema.running_mean.tolist() == [3.0, 3.0]  # buffers are copied
    # Step 1: d = min(1/2, 0.9) = 0.5.  Step 100: d = 0.9.
    with torch.no_grad():
        model.weight.fill_(3.0)
    assert ema_update(ema, model, decay=0.9, step=1) == 0.5
    assert ema.weight.tolist() == [2.0, 2.0]  # 0.5 * 1 + 0.5 * 3
    assert ema_update(ema, model, decay=0.9, step=100) == pytest.approx(0.9)
    torch.testing.assert_close(ema.weight, torch.full((2,), 0.9 * 2.0 + 0.1 * 3.0))
    frozen = make_ema(model)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training


def test_ema_buffers_average_the_batchnorm_statistics_and_copy_the_counters_and_the_memory():
    torch.manual_seed(0)
    student = tiny_model(num_classes=3, allspark=True)
    teacher = make_ema(student)
    bn = "head.linear_fuse.bn"
    with torch.no_grad():
        for b in student.buffers():  # the student's statistics, counters and memory move on
            b.copy_(~b if b.dtype == torch.bool else torch.rand_like(b) if b.is_floating_point() else b + 3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    after = student.state_dict()
    assert ema_update(teacher, student, decay=0.75, step=10, buffers="average") == 0.75
    state = teacher.state_dict()
    for key in (f"{bn}.running_mean", f"{bn}.running_var"):  # 0.75 * teacher + 0.25 * student, in float64
        expected = (0.75 * before[key].double() + 0.25 * after[key].double()).float()
        torch.testing.assert_close(state[key], expected, rtol=0, atol=float(4 * torch.finfo(torch.float32).eps))
        assert not torch.equal(state[key], after[key])
    memory = ("bank", "ptr", "filled")
    for key in (f"{bn}.num_batches_tracked", *(f"allspark.attn.memory.{m}" for m in memory)):
        assert torch.equal(state[key], after[key]), key  # counters and the memory queue: copied
    ema_update(teacher, student, decay=0.75, step=11)  # the default copies every buffer
    assert all(torch.equal(v, after[k]) for k, v in teacher.state_dict().items() if k in dict(student.named_buffers()))
    with pytest.raises(ValueError, match="buffers='mean'"):
        ema_update(teacher, student, decay=0.75, step=12, buffers="mean")
    choices = {key: f.metadata[CHOICES] for key, f, _ in leaf_fields(RunConfig()) if CHOICES in f.metadata}
    assert choices["semi.ema_buffers"] == EMA_BUFFERS  # the config's choices are the update's


def test_feature_perturbation_touches_only_the_chosen_unlabeled_images():
    torch.manual_seed(0)
    model = no_dropout(tiny_model(num_classes=3, allspark=False)).train()
    model.head.linear_fuse.bn.eval()  # batch statistics would couple the rows
    x_l, x_u = torch.randn(2, 3, 64, 64), torch.randn(3, 3, 64, 64)
    clean_l, clean_u = model(x_l, x_u)
    torch.manual_seed(1)
    fp_l, fp_u = model(x_l, x_u, fp_images=2, fp_rate=0.5)
    assert torch.equal(fp_l, clean_l) and torch.equal(fp_u[2:], clean_u[2:])
    assert not torch.allclose(fp_u[:2], clean_u[:2])
    with pytest.raises(ValueError, match="fp_images=4"):
        model(x_l, x_u, fp_images=4)


# ---------------------------------------------------------------------------------- weak-to-strong wiring
class PixelTeacher(nn.Module):
    """Logits that are a pixel-wise function of the image: class 1 where channel 0 is positive. The teacher is much
    surer of class 1 (slope 20) than of class 0 (slope 2), so per-class thresholds are far from the global one."""

    def forward(self, x: torch.Tensor, coupled: bool = False) -> torch.Tensor:
        x0 = x[:, 0]
        return torch.stack([torch.zeros_like(x0), torch.where(x0 > 0, 20 * x0, 2 * x0)], dim=1)


def pseudo_labels_by_hand(
    logits: torch.Tensor, ignore: torch.Tensor, conf_thresh: float, per_class: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels ``(B, H, W)`` (255 where dropped) and the valid mask, in float64, written out: the top softmax
    probability against ``conf_thresh``, or with ``per_class`` against ``conf_thresh * m_c / max_k m_k`` where
    ``m_c`` is the mean top probability of the valid pixels whose arg max is ``c`` (a class predicted nowhere keeps
    ``conf_thresh``). Also checks that no pixel lies within 1e-4 of its threshold, so float32 agrees."""
    confidence, labels = logits.double().softmax(dim=1).max(dim=1)
    valid = ~ignore
    thresholds = torch.full((logits.shape[1],), conf_thresh, dtype=torch.float64)
    if per_class:
        means = {c: confidence[valid & (labels == c)].mean() for c in range(logits.shape[1])}
        means = {c: m for c, m in means.items() if not m.isnan()}
        top = max(means.values())
        for c, m in means.items():
            thresholds[c] = conf_thresh * m / top
    margin = confidence - thresholds[labels]
    assert bool((margin.abs() > 1e-4).all())
    return labels.masked_fill(~valid | (margin < 0), 255), valid


class RecordingStudent(nn.Module):
    """Records its inputs and returns zero logits (with a gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def forward(self, x_l: torch.Tensor, x_u: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((x_l, x_u, kwargs))
        zeros = torch.zeros(x_l.shape[0] + x_u.shape[0], 2, *x_l.shape[-2:]) + self.bias
        return zeros[: x_l.shape[0]], zeros[x_l.shape[0] :]


@pytest.mark.parametrize(("method", "views", "fp"), [("fixmatch", 1, 0), ("unimatch", 2, 3), ("allspark+", 2, 0)])
def test_weak_to_strong_step_mixes_images_labels_and_guides_consistently(tmp_path, method, views, fp):
    cfg = tiny_config(str(tmp_path), method=method, overrides=("data.synthetic.num_classes=2",))
    b, h, w = 3, 4, 5
    torch.manual_seed(0)
    weak = torch.randn(b, 3, h, w)
    batch_u = {
        "image": weak,
        "image_s1": weak + 0.01,  # strong views: the weak view slightly shifted, so labels follow pixels
        "image_s2": weak - 0.01,
        "cutmix_box1": torch.rand(b, h, w) > 0.5,
        "cutmix_box2": torch.rand(b, h, w) > 0.5,
        "ignore": torch.rand(b, h, w) > 0.8,
    }
    batch_l = {"image": torch.randn(2, 3, h, w), "mask": torch.randint(0, 2, (2, h, w))}
    student = RecordingStudent()
    ctx = StepContext(cfg, student, PixelTeacher(), build_loss("ce"), torch.device("cpu"))
    out = weak_to_strong_step(ctx, batch_l, batch_u, use_memory=True)

    ((x_l, x_u, kwargs),) = student.calls
    assert torch.equal(x_l, batch_l["image"]) and x_u.shape[0] == b * views + fp
    assert kwargs["fp_images"] == fp and kwargs["use_memory"] == (method == "allspark+")
    parts = x_u.split(b)
    if fp:
        assert torch.equal(parts[0], weak)  # the perturbed stream decodes the weak view
    for v, x_s in enumerate(parts[1:] if fp else parts, start=1):
        expected = cutmix(batch_u[f"cutmix_box{v}"], batch_u[f"image_s{v}"])[0]
        assert torch.equal(x_s, expected)
    guide = kwargs["guide_logits"]
    if method == "allspark+":
        # The guide maps are the teacher's on the weak view, mixed like the images: they match the teacher on what
        # the student sees (up to the 0.01 photometric shift).
        assert guide.shape == (b * views, 2, h, w)
        teacher_on_input = PixelTeacher()(x_u)
        assert torch.allclose(guide, teacher_on_input, atol=0.21)
        assert not torch.allclose(guide, PixelTeacher()(torch.cat([weak] * views)), atol=0.21)
    else:
        assert guide is None
    # Pseudo-labels: allspark+ thresholds each class at 0.95 x its relative mean confidence (semi.class_thresh), which
    # keeps class 0 pixels that the global 0.95 of fixmatch and unimatch drops.
    assert cfg.semi.class_thresh is (method == "allspark+")
    labels, valid = pseudo_labels_by_hand(PixelTeacher()(weak), batch_u["ignore"], 0.95, cfg.semi.class_thresh)
    fixed, _ = pseudo_labels_by_hand(PixelTeacher()(weak), batch_u["ignore"], 0.95, False)
    assert bool((fixed != 255).any()) and bool(((labels == 0) & (fixed == 255)).any()) == cfg.semi.class_thresh
    # Unlabeled loss of zero logits: log(2) on kept pixels over valid ones, averaged as the recipe says.
    per_view = []
    for v in range(1, views + 1):
        lab, val = cutmix(batch_u[f"cutmix_box{v}"], labels, valid)
        per_view.append(math.log(2) * (lab != 255).sum().item() / val.sum().item())
    strong = sum(per_view) / views
    fp_loss = math.log(2) * (labels != 255).sum().item() / valid.sum().item()
    expected_u = (strong + fp_loss) / 2 if fp else strong
    assert out.logs["loss_u"].item() == pytest.approx(expected_u, rel=1e-5)
    assert out.loss.item() == pytest.approx((math.log(2) + expected_u) / 2, rel=1e-5)
    assert torch.equal(out.pseudo, labels)


# ------------------------------------------------------------------------------------- every recipe learns
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


RECIPE_CASES = [
    ("supervised", ()),
    ("selftrain", ()),
    ("allspark", ()),
    ("fixmatch", ()),
    ("unimatch", ()),
    ("allspark+", ()),
    ("allspark+", ("model.allspark.memory=false",)),  # the memory ablation reads no memory after the warm-up
]


@pytest.mark.parametrize(("method", "overrides"), RECIPE_CASES)
def test_each_recipe_lowers_its_loss_on_a_fixed_batch(tmp_path, data_root, method, overrides):
    cfg = tiny_config(
        data_root,
        method=method,
        overrides=("semi.warmup_iterations=2", "semi.conf_thresh=0.6", "train.optimizer=adamw", *overrides)
        if method != "supervised"
        else ("train.optimizer=adamw",),
        iterations=100,
        lr=0.003,
        lr_multi=1.0,
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg, tmp_path / "run", DistEnv(), None)
    it_l, it_u = epoch_iterators(trainer, 0, 0)
    batch_l = next(it_l)
    batch_u = next(it_u) if it_u is not None else None
    assert trainer.recipe is RECIPES[method]
    losses, losses_x = [], []
    for _ in range(16):
        out = trainer.train_step(itertools.repeat(batch_l), itertools.repeat(batch_u) if batch_u else None)
        losses.append(out.loss.item())
        losses_x.append(out.logs["loss_x"].item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    # A self-trainer that collapses (one class everywhere, learnt from its own pseudo-labels) lowers its total loss
    # through loss_u alone: the labeled loss must fall too, and the model must beat, on the labeled batch it learns,
    # the pixel accuracy of predicting that batch's most frequent class everywhere (measured: 0.90-0.92 against 0.75).
    assert sum(losses_x[-3:]) / 3 < 0.8 * sum(losses_x[:3]) / 3, losses_x
    with torch.no_grad():
        logits = trainer.model.eval()(batch_l["image"])
    y = batch_l["mask"]
    predicted = torch.nn.functional.interpolate(logits, size=y.shape[-2:], mode="bilinear").argmax(1)
    known = y != 255
    majority = float(y[known].bincount().max()) / int(known.sum())
    accuracy = float((predicted == y)[known].float().mean())
    assert accuracy > majority + 0.05, (accuracy, majority)
    if method != "supervised":
        assert out.pseudo is not None and out.pseudo.shape == batch_u["image"].shape[:1] + batch_u["image"].shape[2:]
        # The teacher too (the EMA model for allspark+): a teacher that gives one class everywhere cannot beat the
        # majority class on these images either.
        teacher = teacher_logits(trainer.ctx, trainer.ctx.images(batch_l))
        taught = torch.nn.functional.interpolate(teacher, size=y.shape[-2:], mode="bilinear").argmax(1)
        teacher_accuracy = float((taught == y)[known].float().mean())
        assert teacher_accuracy > majority + 0.05, (teacher_accuracy, majority)


@pytest.mark.parametrize("method", ["allspark", "allspark+"])
def test_labels_only_until_unsup_start_then_the_unlabeled_loss_counts(tmp_path, data_root, method):
    cfg = tiny_config(data_root, method=method, overrides=("semi.unsup_start=1", "semi.conf_thresh=0.0"))
    trainer = Trainer(cfg, tmp_path / "run", DistEnv(), None)
    it_l, it_u = epoch_iterators(trainer, 0, 0)
    first, second = trainer.train_step(it_l, it_u), trainer.train_step(it_l, it_u)
    assert float(first.logs["loss_u"]) > 0  # computed and logged, but not trained on
    # Labels only: the full supervised loss (the step a supervised run takes), not the semi recipe's loss_x / 2.
    assert float(first.loss) == float(first.logs["loss_x"])
    expected = (float(second.logs["loss_x"]) + float(second.logs["loss_u"])) / 2
    assert float(second.loss) == pytest.approx(expected, rel=1e-6)


def test_the_trainer_caps_pseudo_labels_from_crops_of_the_labeled_masks(tmp_path, data_root):
    cfg = tiny_config(data_root, method="fixmatch", overrides=("semi.area_cap=0.5", "semi.conf_thresh=0.0"))
    trainer = Trainer(cfg, tmp_path / "run", DistEnv(), None)
    k = trainer.cfg.data.num_classes
    masks = [load_mask(item.mask, item.mask_encoding) for item in trainer.bundle.labeled.items]
    expected = 0.5 * largest_crop_share(masks, k, 48)  # crop 48 of the 96 px images
    assert torch.equal(trainer.ctx.area_cap, expected) and bool((expected < 0.5).any())
    it_l, it_u = epoch_iterators(trainer, 0, 0)
    batch_l, batch_u = next(it_l), next(it_u)
    labels = teacher_logits(trainer.ctx, trainer.ctx.images(batch_u)).argmax(1)  # the teacher before the step
    valid = ~batch_u["ignore"]
    counts = torch.stack([((labels == c) & valid).flatten(1).sum(1) for c in range(k)], 1)  # (B, K)
    share = counts / valid.flatten(1).sum(1, keepdim=True)  # of each image's valid pixels
    out = trainer.train_step(itertools.repeat(batch_l), itertools.repeat(batch_u))
    dropped = (share > expected).gather(1, labels.flatten(1)).view_as(labels) | ~valid  # by hand, per image
    assert torch.equal(out.pseudo, labels.masked_fill(dropped, 255))
    # Both sides happen: an oversized class is dropped, and the pseudo-labels of the other classes survive.
    assert bool(dropped.any()) and bool((out.pseudo != 255).any()) and len(out.pseudo.unique()) >= 2
    for method, overrides in (("fixmatch", ()), ("supervised", ("semi.area_cap=0.5",))):
        other = Trainer(tiny_config(data_root, method, overrides), tmp_path / method, DistEnv(), None)
        assert other.ctx.area_cap is None
