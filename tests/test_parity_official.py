"""Parity with the official AllSpark code (restated literally in ``official_reference.py``) in faithful mode.

With the same weights, our model and the reference must give the same eval (teacher) logits, training logits
before the warm-up (in-batch keys) and after it (memory read), the same Semantic Memory after several optimiser
steps, and the same gradient for every parameter. In float64: relative difference below 1e-10. In float32: each of
the two against a float64 twin of the reference that makes its decisions (pseudo-labels, ReLU signs), ours within
4 x the reference code's own float32 error (``numerics``), so that the test holds on every CPU. Dropout and
drop-path are off in both (they are modules); BatchNorm runs in training mode on the same batch.

Run ``pytest tests/test_parity_official.py -s`` to print the differences measured.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import allspark_seg.models.allspark as allspark_module
import official_reference as R
from allspark_seg.interop import load_official_checkpoint, official_key, to_official_state_dict
from allspark_seg.models import AllSparkSegmentor
from allspark_seg.models.allspark import ChannelCrossAttention
from allspark_seg.models.layers import standardize
from conftest import no_dropout
from numerics import (
    Errors,
    argmax_margin,
    check32,
    check32_group,
    check_decisions,
    check_relu_decisions,
    decision_bound,
    our_relu_inputs,
    print_table,
    relu_inputs,
)

K = 4
DIMS = (8, 16, 32, 64)
MIT_HEADS = (1, 1, 2, 2)
TOLERANCE = {torch.float64: 1e-10}  # float32: against float64, see numerics
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


@pytest.fixture(scope="module")
def float32_table() -> Iterator[dict[str, Errors | tuple[int, int]]]:
    """float32 errors against float64 (ours and the reference code's own); printed when the module ends."""
    table: dict[str, Errors | tuple[int, int]] = {}
    yield table
    print_table("float32 against float64, faithful mode", table)


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


def official_step(
    ref: R.ModelBuilder, x_l, x_u, y_l, epoch: int, pseudo: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """One iteration of ``train_allspark.py`` up to ``backward``: teacher pass, setters, student pass.

    ``pseudo`` replaces the teacher's argmax as the unlabeled target (a float64 twin taking the pseudo-labels a
    float32 run decided, see ``numerics``)."""
    teacher = R.official_teacher_pass(ref, x_u)
    ref.decoder.set_SMem_status(epoch)
    ref.train()
    pred_l, pred_u = ref(torch.cat([x_l, x_u])).split([x_l.shape[0], x_u.shape[0]])
    ref.zero_grad()
    loss_of(pred_l, pred_u, y_l, teacher.argmax(dim=1) if pseudo is None else pseudo).backward()
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


def grouping_similarity(emb: torch.Tensor, prob_map: torch.Tensor) -> torch.Tensor:
    """The cosine similarities ``(B_u, K, C)`` behind the official channel-wise semantic grouping (``CrossAttnMem``:
    the unlabeled half of ``emb``, the teacher logits resized to the square token grid); its argmax over K is the
    class of each channel."""
    emb_u = emb.split(emb.shape[0] // 2)[1]
    side = int(math.sqrt(emb_u.shape[1]))
    prob = F.interpolate(prob_map, size=(side, side), mode="bilinear", align_corners=False).flatten(2)
    return F.normalize(prob, dim=-1) @ F.normalize(emb_u, dim=1)


@contextmanager
def grouping_similarities(ref: R.ModelBuilder, force: Sequence[torch.Tensor] = ()) -> Iterator[list[torch.Tensor]]:
    """Record :func:`grouping_similarity` at every training-mode call of the reference's AllSpark attention,
    optionally forcing the channel classes its memory update uses (``force[i]`` ``(B_u, C)`` for call i: the
    decisions of another implementation, see ``numerics``)."""
    (attn,) = [m for m in ref.modules() if isinstance(m, R.CrossAttnMem)]
    sims: list[torch.Tensor] = []
    pending = list(force)
    forced: list[torch.Tensor] = []  # this call's classes, one sample per _dequeue_and_enqueue call
    enqueue = attn._dequeue_and_enqueue

    def hook(module: nn.Module, args: tuple) -> None:
        if module.training:
            emb, _, prob_map, _ = args
            sims.append(grouping_similarity(emb.detach(), prob_map.detach()))
            if pending:
                forced[:] = list(pending.pop(0).unbind(0))

    def forced_enqueue(emb_u: torch.Tensor, channel_cls: torch.Tensor) -> None:
        enqueue(emb_u, forced.pop(0) if forced else channel_cls)

    handle = attn.register_forward_pre_hook(hook)
    attn._dequeue_and_enqueue = forced_enqueue  # this instance only (a float64 twin)
    try:
        yield sims
    finally:
        handle.remove()
        del attn._dequeue_and_enqueue
    assert not pending and not forced, "forced channel classes were not used"


@contextmanager
def our_channel_classes() -> Iterator[list[torch.Tensor]]:
    """Record the channel classes ``(B_u, C)`` of our AllSpark block's memory updates."""
    original = allspark_module.channel_grouping
    classes: list[torch.Tensor] = []

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        out = original(*args, **kwargs)
        classes.append(out.clone())
        return out

    allspark_module.channel_grouping = spy
    try:
        yield classes
    finally:
        allspark_module.channel_grouping = original


def compare_float32_steps(
    ours: AllSparkSegmentor,
    ref: R.ModelBuilder,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]],
    warmup_epoch: int,
    table: dict[str, Errors],
) -> dict[str, list[int]]:
    """Train ``ours`` and the reference code ``ref`` (both float32, same weights) side by side, each beside a float64
    twin of the reference that makes its decisions, and check everything against the twins (``numerics``).

    Per iteration ``(x_l, x_u, y_l, epoch)``: the pseudo-labels, the channel grouping and the head's ReLU signs of
    each float32 run may differ from float64 only on near-ties; teacher and training logits, the memory and every
    gradient are within ``FACTOR`` x the reference code's own float32 error of float64 (the twin with the same
    decisions); after SGD steps (momentum 0.9), so is the state.

    Returns:
        How many pseudo-labels, channel classes and ReLU signs differed from float64 (near-ties), in ours and in the
        reference code.
    """
    twin_ours, twin_lit = copy.deepcopy(ref).double(), copy.deepcopy(ref).double()
    models = (ours, ref, twin_ours, twin_lit)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
    flips = {"pseudo-labels": [0, 0], "channel classes": [0, 0], "head ReLU signs": [0, 0]}
    allspark = ours.allspark is not None
    for x_l, x_u, y_l, epoch in batches:
        phase = "memory" if epoch >= warmup_epoch else "in-batch"
        with our_relu_inputs() as relu_ours, our_channel_classes() as classes_ours:
            t_ours, l_ours, u_ours = our_step(ours, x_l, x_u, y_l, use_memory=epoch >= warmup_epoch)
        with relu_inputs(ref) as relu_lit, grouping_similarities(ref) as sim_lit:
            t_lit, l_lit, u_lit = official_step(ref, x_l, x_u, y_l, epoch)
        classes_lit = [s.argmax(dim=1) for s in sim_lit]  # what the official code computed from the same values
        x64 = (x_l.double(), x_u.double(), y_l, epoch)
        twins = {}
        for name, twin, relu, classes, teacher in (
            ("ours", twin_ours, relu_ours, classes_ours, t_ours),
            ("reference code", twin_lit, relu_lit, classes_lit, t_lit),
        ):
            forced = [x > 0 for x in relu]
            with relu_inputs(twin, forced) as relu64, grouping_similarities(twin, classes) as sim64:
                outputs = official_step(twin, *x64, pseudo=teacher.argmax(dim=1))
            twins[name] = (outputs, relu64, sim64)
        (t64_ours, l64_ours, u64_ours), relu64_ours, sim64_ours = twins["ours"]
        (t64_lit, l64_lit, u64_lit), relu64_lit, sim64_lit = twins["reference code"]

        # Decisions: equal to float64's except on near-ties (the twins took them)
        bound = decision_bound(t_lit, t64_lit, terms=2)
        for i, (t32, t64) in enumerate(((t_ours, t64_ours), (t_lit, t64_lit))):
            flips["pseudo-labels"][i] += check_decisions(
                "pseudo-labels", t32.argmax(dim=1), t64.argmax(dim=1), argmax_margin(t64), bound
            )
        assert len(relu_ours) == len(relu_lit) == len(relu64_ours) == len(relu64_lit) == 1
        found = check_relu_decisions("head ReLU", relu_ours[0], relu_lit[0], relu64_ours[0], relu64_lit[0])
        flips["head ReLU signs"] = [a + b for a, b in zip(flips["head ReLU signs"], found, strict=True)]
        if allspark:
            assert len(classes_ours) == len(sim_lit) == len(sim64_ours) == len(sim64_lit) == 1
            bound = decision_bound(sim_lit[0], sim64_lit[0], terms=2)
            for i, (got, sims64) in enumerate(((classes_ours[0], sim64_ours[0]), (classes_lit[0], sim64_lit[0]))):
                flips["channel classes"][i] += check_decisions(
                    "channel classes", got, sims64.argmax(dim=1), argmax_margin(sims64), bound
                )

        # Values: each float32 run against its twin
        for what, a, b, a64, b64 in (
            ("teacher logits", t_ours, t_lit, t64_ours, t64_lit),
            (f"training logits, {phase}", l_ours, l_lit, l64_ours, l64_lit),
            (f"training logits, {phase}", u_ours, u_lit, u64_ours, u64_lit),
        ):
            check32(what, a, b, a64, b64, table=table)
        if allspark:
            memory = ours.allspark.memory
            attn32, attn64, attn64_lit = (m.decoder.allspark.attn for m in (ref, twin_ours, twin_lit))
            assert torch.equal(memory.ptr, attn64.queue_ptr) and torch.equal(attn32.queue_ptr, attn64_lit.queue_ptr)
            check32("memory bank", memory.bank, attn32.kv_queue, attn64.kv_queue, attn64_lit.kv_queue, table=table)
        check_gradients32(ours, ref, twin_ours, twin_lit, f"gradients, {phase}", table)
        for opt in optimizers:
            opt.step()
    # The whole state after the steps: weights, batch-norm statistics and memory, through the official keys.
    states = [to_official_state_dict(ours), ref.state_dict(), twin_ours.state_dict(), twin_lit.state_dict()]
    assert list(states[0]) == list(states[1]) == list(states[2])
    floats = [k for k, v in states[0].items() if v.is_floating_point()]
    check32_group("state after steps", *([state[k] for k in floats] for state in states), names=floats, table=table)
    for key, value in states[0].items():
        if not value.is_floating_point():
            assert torch.equal(value, states[2][key]) and torch.equal(states[1][key], states[3][key]), key
    if not allspark:
        del flips["channel classes"]
    return flips


def check_gradients32(
    ours: nn.Module, ref: nn.Module, twin_ours: nn.Module, twin_lit: nn.Module, what: str, table: dict[str, Errors]
) -> None:
    """Every parameter's float32 gradient against its float64 twin's (see :func:`compare_float32_steps`)."""
    grads = {
        name: [dict(m.named_parameters())[name].grad for m in (ref, twin_ours, twin_lit)]
        for name, _ in ref.named_parameters()
    }
    scale = max(float(g[1].norm()) for g in grads.values() if g[1] is not None)
    allspark = getattr(ours, "allspark", None) is not None
    groups: dict[bool, list[tuple]] = {False: [], True: []}
    for name, param in ours.named_parameters():
        lit, ours64, lit64 = grads[official_key(name)]
        assert param.grad is not None and lit is not None, name  # every parameter has a gradient on both sides
        vanishing = vanishing_gradient(name, allspark)
        if vanishing:  # exact value 0: rounding noise, measured relative to the largest gradient
            assert float(ours64.norm()) < 1e-12 * scale, name  # ~0 in float64 too
        groups[vanishing].append((name, param.grad, lit, ours64, lit64))
    for vanishing, group in groups.items():
        if group:
            names, *tensors = zip(*group, strict=True)
            label = f"{what} (exactly 0)" if vanishing else what
            check32_group(label, *tensors, names=names, scale=scale if vanishing else None, table=table)


CROPS = pytest.mark.parametrize(
    ("crop", "patch_num"),
    [(64, 4), (65, None)],  # 64 -> 2 x 2 grid (official formula would give 3 x 3); 65 -> 3 x 3 (formula right)
    ids=["crop64-grid2", "crop65-grid3"],
)


def batches(crop: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """``STEPS`` iterations ``(x_l, x_u, y_l, epoch)``: epochs 0, 0 (in-batch keys), 1, 1 (memory read)."""
    return [(*data(100 * crop + step, crop, dtype), step // 2) for step in range(STEPS)]


@CROPS
def test_training_and_eval_parity_in_float64(tmp_path, measured, crop, patch_num):
    dtype = torch.float64
    ref, ours = make_pair(tmp_path, crop, patch_num, dtype, seed=crop)
    tol = TOLERANCE[dtype]
    grid = ours.allspark.memory.grid
    assert grid == (2, 2) if crop == 64 else (3, 3)
    assert ref.decoder.allspark.attn.kv_queue.shape == ours.allspark.memory.bank.shape == (K, 64, grid[0] * grid[1])
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    for x_l, x_u, y_l, epoch in batches(crop, dtype):
        phase = "memory" if epoch >= WARMUP_EPOCH else "in-batch"
        t_ref, l_ref, u_ref = official_step(ref, x_l, x_u, y_l, epoch)
        t_ours, l_ours, u_ours = our_step(ours, x_l, x_u, y_l, use_memory=epoch >= WARMUP_EPOCH)
        assert torch.equal(t_ours.argmax(dim=1), t_ref.argmax(dim=1))  # the same pseudo-labels
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


@CROPS
def test_training_and_eval_parity_in_float32(tmp_path, float32_table, crop, patch_num):
    ref, ours = make_pair(tmp_path, crop, patch_num, torch.float32, seed=crop)
    table: dict[str, Errors] = {}
    flips = compare_float32_steps(ours, ref, batches(crop, torch.float32), WARMUP_EPOCH, table)
    float32_table.update({f"crop {crop}: {k}": v for k, v in table.items()})
    float32_table.update({f"crop {crop}: {k} flipped (ours, reference)": tuple(v) for k, v in flips.items()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_eval_is_batch_coupled_like_the_official_code(tmp_path, measured, float32_table, dtype):
    ref, ours = make_pair(tmp_path, 64, 4, dtype, seed=1)
    ref64 = copy.deepcopy(ref).double().eval()
    ref.eval()
    ours.eval()
    x = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(5), dtype=dtype)  # any size at eval
    with torch.no_grad():
        expected = ref(x)
        coupled = ours(x)
        alone = ours(x[:1])
        expected64 = ref64(x.double())
    if dtype == torch.float64:
        assert record(measured, dtype, "eval (teacher) logits", rel(coupled, expected)) < TOLERANCE[dtype]
    else:
        check32("eval (teacher) logits, batch-coupled", coupled, expected, expected64, table=float32_table)
    assert rel(alone, expected[:1]) > 1e-4  # the first image's prediction depends on its batch partners


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_baseline_parity(tmp_path, measured, float32_table, dtype):
    """The SegFormer baseline decoder (``semidec_base.py``): no AllSpark block."""
    ref, ours = make_pair(tmp_path, 64, None, dtype, seed=2, allspark=False)
    assert ours.allspark is None
    twin_ours, twin_lit = copy.deepcopy(ref).double(), copy.deepcopy(ref).double()
    x_l, x_u, y_l = data(7, 64, dtype)
    x = torch.cat([x_l, x_u])
    for m in (ref, ours, twin_ours, twin_lit):
        m.train()
    with our_relu_inputs() as relu_ours:
        pred_ours, _ = ours(x)
    with relu_inputs(ref) as relu_lit:
        pred_ref = ref(x)
    F.cross_entropy(pred_ref[:2], y_l, ignore_index=255).backward()
    F.cross_entropy(pred_ours[:2], y_l, ignore_index=255).backward()
    if dtype == torch.float64:
        tol = TOLERANCE[dtype]
        assert record(measured, dtype, "baseline training logits", rel(pred_ours, pred_ref)) < tol
        assert record(measured, dtype, "baseline gradients", max(gradient_differences(ours, ref).values())) < tol
        return
    # float32: each against a float64 twin of the reference with its ReLU decisions
    with relu_inputs(twin_ours, [relu_ours[0] > 0]) as relu64_ours:
        pred64_ours = twin_ours(x.double())
    with relu_inputs(twin_lit, [relu_lit[0] > 0]) as relu64_lit:
        pred64_lit = twin_lit(x.double())
    for pred in (pred64_ours, pred64_lit):
        F.cross_entropy(pred[:2], y_l, ignore_index=255).backward()
    flips = check_relu_decisions("baseline head ReLU", relu_ours[0], relu_lit[0], relu64_ours[0], relu64_lit[0])
    float32_table["baseline: head ReLU signs flipped (ours, reference)"] = flips
    check32("baseline: training logits", pred_ours, pred_ref, pred64_ours, pred64_lit, table=float32_table)
    check_gradients32(ours, ref, twin_ours, twin_lit, "baseline: gradients", float32_table)


def test_our_random_model_drives_the_reference(float32_table, model_factory):
    """The other direction: our weights (and memory) written with ``to_official_state_dict`` into the reference."""
    from allspark_seg.interop import FAITHFUL_OPTIONS

    ours = no_dropout(model_factory(seed=3, num_classes=K, drop_path=0.0, **FAITHFUL_OPTIONS))
    ours.allspark.memory.enqueue(torch.randn(64, 4), torch.arange(64) % K)  # a memory that is not just randn
    ref = no_dropout(reference_model(64, 4))  # same MiT heads as the conftest tiny model
    ref.load_state_dict(to_official_state_dict(ours), strict=True)
    table: dict[str, Errors] = {}
    flips = compare_float32_steps(ours, ref, [(*data(11, 64, torch.float32), WARMUP_EPOCH)], WARMUP_EPOCH, table)
    float32_table.update({f"ours -> reference: {k}": v for k, v in table.items()})
    float32_table.update({f"ours -> reference: {k} flipped (ours, reference)": tuple(v) for k, v in flips.items()})


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
