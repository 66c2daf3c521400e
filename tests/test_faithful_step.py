"""The engine's ``allspark`` iteration against a literal re-statement of the official ``train_allspark.py`` loop.

Same weights, same batches (from our loaders), dropout off: 10 iterations across the memory warm-up (8 steps per
epoch, warm-up 1 epoch), with the official optimiser, loss and learning-rate schedule (set after each step).
Losses, weights and the Semantic Memory must agree to float64 precision (every tensor within 1e-7 of its
largest value after 10 steps; float32 rounding alone gives ~1e-6).
"""

from __future__ import annotations

import itertools

import torch

import official_reference as R
from allspark_seg.dist import DistEnv
from allspark_seg.engine.recipes import StepContext, self_training_step
from allspark_seg.engine.train import Trainer
from allspark_seg.interop import to_official_state_dict
from allspark_seg.losses import build_loss
from allspark_seg.optim import build_optimizer, param_groups, set_lr
from conftest import no_dropout
from train_utils import epoch_iterators, tiny_config

STEPS = 10


def official_loop(ref: R.ModelBuilder, batches, cfg, steps_per_epoch: int, epochs: int) -> list[float]:
    """``train_allspark.py`` lines 106-167 restated (single process, no barrier)."""
    lr, lr_multi = cfg.train.lr, cfg.train.lr_multi
    optimizer = R.official_optimizer(ref, lr, lr_multi)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
    total_iters = steps_per_epoch * epochs
    losses = []
    for t, (batch_l, batch_u) in enumerate(batches):
        epoch, i = divmod(t, steps_per_epoch)
        ref.decoder.set_SMem_status(epoch=epoch, isVal=False)
        img_x, mask_x, img_u = batch_l["image"].double(), batch_l["mask"], batch_u["image"].double()
        pseudo_label = R.official_teacher_pass(ref, img_u).argmax(dim=1)
        ref.train()
        preds = ref(torch.cat((img_x, img_u)))
        pred_x, pred_u = preds.split([img_x.shape[0], img_u.shape[0]])
        loss = (criterion(pred_x, mask_x) + criterion(pred_u, pseudo_label)) / 2.0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        iters = epoch * steps_per_epoch + i
        new_lr = lr * (1 - iters / total_iters) ** 0.9
        optimizer.param_groups[0]["lr"] = new_lr
        optimizer.param_groups[1]["lr"] = new_lr * lr_multi
    return losses


def test_allspark_step_matches_the_official_loop(tmp_path):
    cfg = tiny_config(
        str(tmp_path / "data"),
        overrides=("semi.warmup_epochs=1", "model.drop_path=0.0", "model.head_dropout=0.0"),
        iterations=None,
        epochs=2,
        lr=0.01,
    )
    trainer = Trainer(cfg, tmp_path / "run", DistEnv(), None)  # builds data, model and plan as `fit` does
    cfg, plan = trainer.cfg, trainer.plan
    assert (plan.steps_per_epoch, plan.total, plan.warmup) == (8, 16, 8)
    model = no_dropout(trainer.model).double()
    grid = model.allspark.memory.grid
    ref = R.build_official_model(
        cfg.data.num_classes,
        embed_dims=cfg.model.embed_dims,
        depths=cfg.model.depths,
        mit_heads=cfg.model.num_heads,
        drop_path_rate=0.0,
        patch_num=grid[0] * grid[1],
        warmup_epoch=1,
        embedding_dim=cfg.model.head_dim,
    )
    ref.load_state_dict(to_official_state_dict(model))
    ref = no_dropout(ref).double()

    batches = []
    for epoch in range(2):
        it_l, it_u = epoch_iterators(trainer, epoch, 0)
        batches += list(zip(it_l, it_u, strict=True))
    batches = batches[:STEPS]

    # Our engine's pieces: parameter groups, optimiser, schedule with the official lag, the recipe.
    t = cfg.train
    optimizer = build_optimizer("sgd", param_groups(model, t.lr, t.lr_multi), t.lr, momentum=0.9, weight_decay=1e-4)
    ctx = StepContext(cfg=cfg, net=model, teacher=None, criterion_l=build_loss("ce"), device=torch.device("cpu"))
    ours = []
    for step, (batch_l, batch_u) in enumerate(batches):
        batch_l = {**batch_l, "image": batch_l["image"].double()}
        batch_u = {**batch_u, "image": batch_u["image"].double()}
        set_lr(optimizer, step, plan.total, t.lr, t.poly_power)
        optimizer.zero_grad()
        out = self_training_step(ctx, batch_l, batch_u, use_memory=step >= plan.warmup)
        out.loss.backward()
        optimizer.step()
        ours.append(out.loss.item())

    official = official_loop(ref, batches, cfg, plan.steps_per_epoch, epochs=2)
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(official, dtype=torch.float64))
    assert len(set(itertools.pairwise(ours))) == STEPS - 1  # the losses really move
    expected = to_official_state_dict(model)
    got = ref.state_dict()
    for key, value in expected.items():
        if value.is_floating_point():  # max |difference| relative to the tensor's largest value
            assert (got[key] - value).abs().max() <= 1e-7 * value.abs().max().clamp_min(1e-12), key
        else:
            assert torch.equal(got[key], value), key
    # Memory buffers (kv_queue, queue_ptr) are part of the comparison above; they did move.
    assert int(model.allspark.memory.ptr.sum()) > 0
