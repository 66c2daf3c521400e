"""Parity with the official AllSpark code (restated literally in ``official_reference.py``) in faithful mode.

With the same weights, our model and the reference must give the same eval (teacher) logits, training logits
before the warm-up (in-batch keys) and after it (memory read), the same Semantic Memory after several optimiser
steps, and the same gradient for every parameter: relative difference below 1e-5 in float32 and 1e-10 in float64.
Dropout and drop-path are off in both (they are modules); BatchNorm runs in training mode on the same batch.

Run ``pytest tests/test_parity_official.py -s`` to print the largest relative differences measured.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import official_reference as R
from allspark_seg.interop import load_official_checkpoint, official_key, to_official_state_dict
from allspark_seg.models import AllSparkSegmentor
from allspark_seg.models.allspark import ChannelCrossAttention
from allspark_seg.models.layers import standardize
from conftest import no_dropout

K = 4
DIMS = (8, 16, 32, 64)
MIT_HEADS = (1, 1, 2, 2)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
WARMUP_EPOCH = 1
STEPS = 4  # epochs 0, 0 (in-batch keys), 1, 1 (memory read): epoch = step // 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b is the reference)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(b.dtype).tiny))


@pytest.fixture(scope="module")
def measured() -> Iterator[dict[tuple[str, str], float]]:
    """Largest relative difference per (dtype, quantity); printed when the module ends (``pytest -s``)."""
    table: dict[tuple[str, str], float] = {}
    yield table
    print("\nmax relative difference vs the official reference (faithful mode):")
    for (dtype, what), value in sorted(table.items()):
        print(f"  {dtype:8s} {what:32s} {value:.3e}")


def record(table: dict[tuple[str, str], float], dtype: torch.dtype, what: str, value: float) -> float:
    key = (str(dtype).replace("torch.", ""), what)
    table[key] = max(table.get(key, 0.0), value)
    return value


def reference_model(crop: int, patch_num: int | None, allspark: bool = True) -> R.ModelBuilder:
    return R.build_official_model(
        K,
        allspark=allspark,
        embed_dims=DIMS,
        depths=(1, 1, 1, 1),
        mit_heads=MIT_HEADS,
        drop_path_rate=0.0,
        num_heads=2,
        image_size=crop,
        patch_num=patch_num,
        warmup_epoch=WARMUP_EPOCH,
        embedding_dim=32,
    )


def make_pair(
    tmp_path, crop: int, patch_num: int | None, dtype: torch.dtype, seed: int, allspark: bool = True
) -> tuple[R.ModelBuilder, AllSparkSegmentor]:
    """A random reference model and ours loaded from its checkpoint (``module.``-prefixed, as DDP saves it)."""
    torch.manual_seed(seed)
    ref = reference_model(crop, patch_num, allspark)
    path = tmp_path / f"ref_{seed}.pth"
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 0}, path)
    ours = load_official_checkpoint(path, drop_path=0.0, encoder_options={"num_heads": MIT_HEADS})
    return no_dropout(ref).to(dtype), no_dropout(ours).to(dtype)


def data(seed: int, crop: int, dtype: torch.dtype, batch: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x_l = torch.randn(batch, 3, crop, crop, generator=gen, dtype=dtype)
    x_u = torch.randn(batch, 3, crop, crop, generator=gen, dtype=dtype)
    y_l = torch.randint(0, K, (batch, crop, crop), generator=gen)
    y_l[:, :3] = 255  # some ignored pixels
    return x_l, x_u, y_l


def loss_of(logits_l: torch.Tensor, logits_u: torch.Tensor, y_l: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """The official objective: (CE(labeled) + CE(unlabeled, hard pseudo-labels)) / 2, ignore index 255."""
    return (F.cross_entropy(logits_l, y_l, ignore_index=255) + F.cross_entropy(logits_u, pseudo)) / 2


def official_step(ref: R.ModelBuilder, x_l, x_u, y_l, epoch: int) -> tuple[torch.Tensor, ...]:
    """One iteration of ``train_allspark.py`` up to ``backward``: teacher pass, setters, student pass."""
    teacher = R.official_teacher_pass(ref, x_u)
    ref.decoder.set_SMem_status(epoch)
    ref.train()
    pred_l, pred_u = ref(torch.cat([x_l, x_u])).split([x_l.shape[0], x_u.shape[0]])
    ref.zero_grad()
    loss_of(pred_l, pred_u, y_l, teacher.argmax(dim=1)).backward()
    return teacher, pred_l, pred_u


def our_step(model: AllSparkSegmentor, x_l, x_u, y_l, use_memory: bool) -> tuple[torch.Tensor, ...]:
    """The same iteration through our API: no setters, teacher logits and the memory flag are arguments."""
    with torch.no_grad():
        model.eval()
        teacher = model(x_u)  # faithful mode: batch-coupled, like the official teacher pass
    model.train()
    pred_l, pred_u = model(x_l, x_u, guide_logits=teacher, use_memory=use_memory)
    model.zero_grad()
    loss_of(pred_l, pred_u, y_l, teacher.argmax(dim=1)).backward()
    return teacher, pred_l, pred_u


def vanishing_gradient(name: str, allspark: bool) -> bool:
    """Parameters whose exact gradient is 0 in training mode: they add a per-channel constant that reaches the
    head's training-mode BatchNorm as a per-channel constant, which it removes (the head's per-stage biases, and
    without AllSpark the last stage norm's bias). Their computed gradients are rounding noise, so they are compared
    relative to the model's largest gradient."""
    return (name.startswith("head.linear_c") and name.endswith(".bias")) or (
        not allspark and name == "encoder.norm4.bias"
    )


def gradient_differences(ours: nn.Module, ref: nn.Module) -> dict[str, float]:
    """Relative gradient difference of every parameter (official names looked up with ``official_key``)."""
    ref_params = dict(ref.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in ref.parameters() if p.grad is not None)
    out = {}
    for name, param in ours.named_parameters():
        other = ref_params[official_key(name)]
        assert (param.grad is None) == (other.grad is None), name
        if param.grad is None:
            continue
        if vanishing_gradient(name, ours.allspark is not None):
            assert float(other.grad.abs().max()) < 1e-6 * scale, name  # really ~0 on the reference side too
            out[name] = float((param.grad - other.grad).abs().max()) / scale
        else:
            out[name] = rel(param.grad, other.grad)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    ("crop", "patch_num"),
    [(64, 4), (65, None)],  # 64 -> 2 x 2 grid (official formula would give 3 x 3); 65 -> 3 x 3 (formula right)
    ids=["crop64-grid2", "crop65-grid3"],
)
def test_training_and_eval_parity(tmp_path, measured, dtype, crop, patch_num):
    ref, ours = make_pair(tmp_path, crop, patch_num, dtype, seed=crop)
    tol = TOLERANCE[dtype]
    grid = ours.allspark.memory.grid
    assert grid == (2, 2) if crop == 64 else (3, 3)
    assert ref.decoder.allspark.attn.kv_queue.shape == ours.allspark.memory.bank.shape == (K, 64, grid[0] * grid[1])
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    for step in range(STEPS):
        epoch = step // 2
        phase = "memory" if epoch >= WARMUP_EPOCH else "in-batch"
        x_l, x_u, y_l = data(100 * crop + step, crop, dtype)
        t_ref, l_ref, u_ref = official_step(ref, x_l, x_u, y_l, epoch)
        t_ours, l_ours, u_ours = our_step(ours, x_l, x_u, y_l, use_memory=epoch >= WARMUP_EPOCH)
        assert record(measured, dtype, "eval (teacher) logits", rel(t_ours, t_ref)) < tol
        assert record(measured, dtype, f"training logits, {phase}", rel(l_ours, l_ref)) < tol
        assert record(measured, dtype, f"training logits, {phase}", rel(u_ours, u_ref)) < tol
        memory, attn = ours.allspark.memory, ref.decoder.allspark.attn
        assert torch.equal(memory.ptr, attn.queue_ptr)
        assert record(measured, dtype, "memory bank", rel(memory.bank, attn.kv_queue)) < tol
        grads = gradient_differences(ours, ref)
        assert len(grads) == sum(1 for _ in ours.parameters())  # every parameter has a gradient on both sides
        worst = max(grads, key=grads.get)
        assert record(measured, dtype, f"gradients, {phase}", grads[worst]) < tol, worst
        opt_ref.step()
        opt_ours.step()
    # Whole state after the optimiser steps: weights, BatchNorm statistics and memory, through the official keys.
    official = to_official_state_dict(ours)
    reference = ref.state_dict()
    assert list(official) == list(reference)
    worst_state = max(rel(v.double(), reference[k].double()) for k, v in official.items() if v.is_floating_point())
    assert record(measured, dtype, "state after steps", worst_state) < tol
    assert all(torch.equal(v, reference[k]) for k, v in official.items() if not v.is_floating_point())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_eval_is_batch_coupled_like_the_official_code(tmp_path, measured, dtype):
    ref, ours = make_pair(tmp_path, 64, 4, dtype, seed=1)
    ref.eval()
    ours.eval()
    x = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(5), dtype=dtype)  # any size at eval
    with torch.no_grad():
        expected = ref(x)
        coupled = ours(x)
        alone = ours(x[:1])
    assert record(measured, dtype, "eval (teacher) logits", rel(coupled, expected)) < TOLERANCE[dtype]
    assert rel(alone, expected[:1]) > 1e-4  # the first image's prediction depends on its batch partners


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_baseline_parity(tmp_path, measured, dtype):
    """The SegFormer baseline decoder (``semidec_base.py``): no AllSpark block."""
    ref, ours = make_pair(tmp_path, 64, None, dtype, seed=2, allspark=False)
    assert ours.allspark is None
    x_l, x_u, y_l = data(7, 64, dtype)
    ref.train()
    ours.train()
    pred_ref = ref(torch.cat([x_l, x_u]))
    pred_ours, _ = ours(torch.cat([x_l, x_u]))
    tol = TOLERANCE[dtype]
    assert record(measured, dtype, "baseline training logits", rel(pred_ours, pred_ref)) < tol
    F.cross_entropy(pred_ref[:2], y_l, ignore_index=255).backward()
    F.cross_entropy(pred_ours[:2], y_l, ignore_index=255).backward()
    assert record(measured, dtype, "baseline gradients", max(gradient_differences(ours, ref).values())) < tol


def test_our_random_model_drives_the_reference(tmp_path, measured, model_factory):
    """The other direction: our weights (and memory) written with ``to_official_state_dict`` into the reference."""
    from allspark_seg.interop import FAITHFUL_OPTIONS

    ours = no_dropout(model_factory(seed=3, num_classes=K, drop_path=0.0, **FAITHFUL_OPTIONS))
    ours.allspark.memory.enqueue(torch.randn(64, 4), torch.arange(64) % K)  # a memory that is not just randn
    ref = no_dropout(reference_model(64, 4))  # same MiT heads as the conftest tiny model
    ref.load_state_dict(to_official_state_dict(ours), strict=True)
    x_l, x_u, y_l = data(11, 64, torch.float32)
    t_ref, l_ref, u_ref = official_step(ref, x_l, x_u, y_l, epoch=WARMUP_EPOCH)
    t_ours, l_ours, u_ours = our_step(ours, x_l, x_u, y_l, use_memory=True)
    assert record(measured, torch.float32, "eval (teacher) logits", rel(t_ours, t_ref)) < 1e-5
    assert record(measured, torch.float32, "training logits, memory", rel(l_ours, l_ref)) < 1e-5
    assert record(measured, torch.float32, "training logits, memory", rel(u_ours, u_ref)) < 1e-5
    assert torch.equal(ours.allspark.memory.ptr, ref.decoder.allspark.attn.queue_ptr)
    assert max(gradient_differences(ours, ref).values()) < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks in float64: the explicit standardisation and the broadcast keys are exact
# ---------------------------------------------------------------------------------------------------------------------
def test_standardize_is_the_instance_norm_psi_in_float64(measured):
    gen = torch.Generator().manual_seed(0)
    self_logits = torch.randn(2, 2, 64, 64, generator=gen, dtype=torch.float64) * 30  # (B, heads, C, C)
    cross_logits = torch.randn(2, 1, 128, 256, generator=gen, dtype=torch.float64) * 30  # (B, 1, 2C, S)
    psi = nn.InstanceNorm2d(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected_cross = psi(cross_logits)  # the official 1-channel call
    assert any("num_features" in str(w.message) for w in caught)  # the warning the official code triggers
    assert record(measured, torch.float64, "psi (self, C x C)", rel(standardize(self_logits), psi(self_logits))) < 1e-13
    assert (
        record(measured, torch.float64, "psi (cross, 1 channel)", rel(standardize(cross_logits), expected_cross))
        < 1e-13
    )


@pytest.mark.parametrize("use_memory", [False, True], ids=["in-batch", "memory"])
def test_broadcast_cross_attention_equals_materialised_repeat_in_float64(measured, use_memory):
    """Our ChannelCrossAttention (keys broadcast, never copied) against the literal CrossAttnMem (``repeat``)."""
    torch.manual_seed(4)
    ref = R.CrossAttnMem(2, 16, 0.0, K, 9).double().train()
    ours = ChannelCrossAttention(16, 2, K, (3, 3), attn_dropout=0.0, gather_memory=False).double().train()
    names = {"kv_queue": "memory.bank", "queue_ptr": "memory.ptr"}
    state = {names.get(k, k): v for k, v in ref.state_dict().items()}
    state["memory.filled"] = torch.ones(K, 16, dtype=torch.bool)
    ours.load_state_dict(state, strict=True)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 9, 16, generator=gen, dtype=torch.float64, requires_grad=True)  # 2 labeled + 2 unlabeled
    guide = torch.randn(2, K, 12, 12, generator=gen, dtype=torch.float64)
    expected = ref(z, None, guide, use_memory)
    ours.update_memory(z[2:].detach(), guide, (3, 3))
    y_l, y_u = ours(z[:2], z[2:], use_memory=use_memory)
    got = torch.cat([y_l, y_u])
    assert torch.equal(ours.memory.ptr, ref.queue_ptr)
    assert torch.equal(ours.memory.bank, ref.kv_queue)  # the same values, written in the same slots
    assert record(measured, torch.float64, "AllSpark attention output", rel(got, expected)) < 1e-12
    (g_ref,) = torch.autograd.grad(expected.square().sum(), z)
    (g_ours,) = torch.autograd.grad(got.square().sum(), z)
    assert record(measured, torch.float64, "AllSpark input gradient", rel(g_ours, g_ref)) < 1e-12
