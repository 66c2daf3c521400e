"""``model.allspark.infer_memory``: inference reads the Semantic Memory as the labeled training stream does.

Checked: default off changes nothing (no new state, eval outputs independent of the memory); with the option, eval
outputs change only once a training forward has read the memory; they equal the labeled training stream's on the same
inputs (same keys, same features); another stage-4 grid reads the memory's maps resized bilinearly (against a literal
float64 restatement); EMA teacher, per-image independence, sliding window, checkpoints, ``eval`` and ONNX export.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from allspark_seg.config import load_config, model_kwargs
from allspark_seg.engine.evaluate import slide_inference, whole_inference
from allspark_seg.engine.export import export_onnx
from allspark_seg.engine.predict import evaluate_checkpoint, load_trained_model
from allspark_seg.engine.train import fit
from allspark_seg.errors import ConfigError
from allspark_seg.methods import steps as recipes  # the steps look teacher_logits up here
from allspark_seg.models.allspark import resize_maps
from conftest import no_dropout
from numerics import check32, rel_max
from train_utils import tiny_config

K = 5


def inputs(seed: int = 0, size: tuple[int, int] = (64, 64)) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x_l, x_u = torch.randn(2, 3, *size, generator=gen), torch.randn(2, 3, *size, generator=gen)
    return x_l, x_u, torch.randn(2, K, *size, generator=gen)


def pair(model_factory, **kwargs):
    """The same weights with and without ``infer_memory``."""
    faithful = model_factory(**kwargs)
    with_option = model_factory(infer_memory=True, **kwargs)
    with_option.load_state_dict(faithful.state_dict())  # no memory_ready in it: none written yet -> not ready
    return faithful, with_option


def read_memory(model, seed: int = 1) -> None:
    """One training forward that fills the memory and reads it (as after the warm-up)."""
    model.train()
    x_l, x_u, guide = inputs(seed)
    torch.manual_seed(seed)  # the dropout masks (and so the BatchNorm statistics) depend on the seed only
    with torch.no_grad():
        model(x_l, x_u, guide_logits=guide, use_memory=True)


# ------------------------------------------------------------------------------------------- default off
def test_default_off_adds_no_state_and_never_reads_the_memory(model_factory):
    model = model_factory()
    assert model.allspark.infer_memory is False and "allspark.memory_ready" not in model.state_dict()
    read_memory(model)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        before = model(x)
        model.allspark.memory.bank.normal_()  # another memory: the faithful inference never looks at it
        assert torch.equal(model(x), before)
    cfg = load_config({"data": {"crop_size": 64}, "train": {"iterations": 1}})
    assert cfg.model.allspark.infer_memory is False and model_kwargs(cfg)["infer_memory"] is False


# ------------------------------------------------------------------------------------------- when it reads
def test_outputs_change_only_after_a_training_forward_read_the_memory(model_factory):
    faithful, model = pair(model_factory)
    x = torch.randn(2, 3, 64, 64)

    def both():
        faithful.eval(), model.eval()
        with torch.no_grad():
            return faithful(x), model(x)

    a, b = both()
    assert torch.equal(a, b) and not bool(model.allspark.memory_ready)  # random memory, never read: image keys
    for net in (faithful, model):  # the warm-up: the memory is filled but not read
        net.train()
        x_l, x_u, guide = inputs(1)
        torch.manual_seed(1)
        with torch.no_grad():
            net(x_l, x_u, guide_logits=guide, use_memory=False)
    a, b = both()
    assert torch.equal(a, b) and not model.allspark.reads_memory_at_inference()
    read_memory(model, seed=2)
    read_memory(faithful, seed=2)
    a, b = both()
    assert bool(model.allspark.memory_ready) and model.allspark.reads_memory_at_inference()
    assert (a - b).abs().max() > 1e-3  # the memory path


def test_inference_equals_the_labeled_training_stream_on_the_same_inputs(model_factory):
    """Same keys (the memory's), same features: eval output = labeled output of a training forward reading the
    memory without updating it. float64: equal to rounding; float32: as close to float64 as the training path."""
    model = no_dropout(model_factory(infer_memory=True))
    read_memory(model)
    block = model.allspark
    gen = torch.Generator().manual_seed(3)
    feat = torch.randn(3, 64, 2, 2, generator=gen)  # the training crop's stage-4 grid (64 px -> 2 x 2)
    feat_u = torch.randn(2, 64, 2, 2, generator=gen)

    def run(b, dtype):
        b = copy.deepcopy(b).to(dtype)
        with torch.no_grad():
            b.eval()
            inferred, _ = b(feat.to(dtype))
            b.train()
            trained, _ = b(feat.to(dtype), feat_u.to(dtype), use_memory=True)  # no guide: the memory is not updated
        return inferred, trained

    inferred64, trained64 = run(block, torch.float64)
    assert rel_max(inferred64, trained64) < 1e-12
    inferred32, trained32 = run(block, torch.float32)
    check32("inference with memory", inferred32, trained32, trained64)
    faithful = copy.deepcopy(block).double().eval()
    faithful.infer_memory = False  # the image-keys path on the same weights is another output
    with torch.no_grad():
        assert rel_max(faithful(feat.double())[0], inferred64) > 1e-3


def literal_memory_inference(block, feat: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The block's eval output with keys/values projected from ``bank`` ``(K, L, h * w)``, written out."""
    b, c, h, w = feat.shape
    attn = block.attn
    tokens = block.map_in(feat).flatten(2).transpose(1, 2)  # (B, N, C)
    z = block.attn_norm(tokens)
    q = attn.q_l2u(z)  # (B, N, 2C)
    slots = bank.transpose(1, 2)  # (K, N, L)
    keys = attn.k_l2u(slots).permute(1, 0, 2).reshape(h * w, -1)  # (N, K * 2C)
    values = attn.v_l2u(slots).permute(1, 0, 2).reshape(h * w, -1)
    logits = q.transpose(1, 2) @ keys  # (B, 2C, S)
    mean = logits.mean(dim=(-2, -1), keepdim=True)
    var = logits.var(dim=(-2, -1), keepdim=True, unbiased=False)
    weights = ((logits - mean) / torch.sqrt(var + 1e-5)).softmax(dim=-1)
    y = attn.out_l2u((weights @ values.transpose(0, 1)).transpose(1, 2))  # (B, N, C)
    out = block.encoder_norm(y + tokens)
    return block.map_out(out.transpose(1, 2).reshape(b, c, h, w))


def test_resize_maps_by_hand():
    maps = torch.tensor([[1.0, 3.0, 5.0, 7.0]])  # one 2 x 2 map [[1, 3], [5, 7]]
    assert torch.equal(resize_maps(maps, (2, 2), (2, 2)), maps)  # the same grid: unchanged
    up = resize_maps(maps, (2, 2), (2, 4)).view(2, 4)  # columns at source x = 0, 0.25, 0.75, 1 (clamped)
    torch.testing.assert_close(up, torch.tensor([[1.0, 1.5, 2.5, 3.0], [5.0, 5.5, 6.5, 7.0]]), rtol=0, atol=1e-6)
    assert resize_maps(torch.randn(5, 7, 6), (2, 3), (3, 4)).shape == (5, 7, 12)


@pytest.mark.parametrize("size", [(96, 80), (32, 32)])
def test_another_grid_reads_the_memory_resized_bilinearly(model_factory, size):
    model = no_dropout(model_factory(infer_memory=True))
    read_memory(model)
    block = model.allspark.double().eval()
    h, w = model.encoder.output_size(*size)[-1]
    assert (h, w) != block.memory.grid
    feat = torch.randn(2, 64, h, w, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    gh, gw = block.memory.grid
    bank = block.memory.bank
    resized = F.interpolate(bank.reshape(-1, 1, gh, gw), size=(h, w), mode="bilinear", align_corners=False)
    expected = literal_memory_inference(block, feat, resized.reshape(K, bank.shape[1], h * w))
    with torch.no_grad():
        got, _ = block(feat)
        assert rel_max(got, expected) < 1e-12
        # on the training grid the same restatement holds with the memory as it is
        feat2 = torch.randn(2, 64, gh, gw, dtype=torch.float64)
        assert rel_max(block(feat2)[0], literal_memory_inference(block, feat2, bank)) < 1e-12


# ------------------------------------------------------------------------------------------- where it runs
def test_ema_teacher_reads_the_memory_copied_from_the_student(model_factory):
    model = model_factory(infer_memory=True)
    ema = recipes.make_ema(model)
    x = torch.randn(1, 3, 64, 64)
    read_memory(model)
    assert not ema.allspark.reads_memory_at_inference()  # copied before the student read the memory
    recipes.ema_update(ema, model, 0.999, step=0)  # decay 0 at step 0: the teacher becomes the student
    assert ema.allspark.reads_memory_at_inference()
    assert torch.equal(ema.allspark.memory.bank, model.allspark.memory.bank)
    model.eval().requires_grad_(False)  # as the teacher's: some CPU kernels are chosen by requires_grad
    with torch.no_grad():
        torch.testing.assert_close(ema(x), model(x), rtol=0, atol=0)


def test_memory_inference_is_per_image_and_slides(model_factory):
    model = model_factory(infer_memory=True)
    read_memory(model)
    model.eval()
    model64 = copy.deepcopy(model).double()
    a, b = torch.randn(2, 1, 3, 64, 64, dtype=torch.float64).unbind(0)
    with torch.no_grad():
        alone = model64(a)
        assert rel_max(model64(torch.cat([a, b]))[:1], alone) < 1e-12
        assert rel_max(model64(torch.cat([a, b]), coupled=True)[:1], alone) < 1e-12  # memory keys: no coupling
        image = torch.randn(1, 3, 64, 96, dtype=torch.float64)
        slid = slide_inference(model64, image, K, window=64, stride=32)  # windows at x = 0, 32
        left, right = whole_inference(model64, image[..., :64]), whole_inference(model64, image[..., 32:])
        expected = torch.cat([left[..., :32], (left[..., 32:] + right[..., :32]) / 2, right[..., 32:]], dim=-1)
        assert rel_max(slid, expected) < 1e-12


def test_state_dicts_load_across_the_option(model_factory):
    faithful = model_factory()
    read_memory(faithful)
    model = model_factory(infer_memory=True, seed=1)
    model.load_state_dict(faithful.state_dict())  # written without the flag, memory written: counts as ready
    assert bool(model.allspark.memory_ready) and model.allspark.reads_memory_at_inference()
    fresh = model_factory(infer_memory=True)
    fresh.load_state_dict(model_factory(seed=2).state_dict())  # nothing written: not ready
    assert not fresh.allspark.reads_memory_at_inference()
    fresh.load_state_dict(model.state_dict())  # with the flag: as saved, and the remembered answer is forgotten
    assert fresh.allspark.reads_memory_at_inference()
    model.load_state_dict(fresh.state_dict() | {"allspark.memory_ready": torch.tensor(False)})
    assert not model.allspark.reads_memory_at_inference()
    other = model_factory(seed=3)
    other.load_state_dict(model.state_dict())  # a block without the option drops the flag
    assert "allspark.memory_ready" not in other.state_dict()


def test_config_key_and_its_check():
    base = {"data": {"crop_size": 64}, "train": {"iterations": 1}}
    cfg = load_config(base, ["model.allspark.infer_memory=true"])
    assert model_kwargs(cfg)["infer_memory"] is True
    with pytest.raises(ConfigError, match=r"'model.allspark.infer_memory' .* needs model.allspark.memory=true"):
        load_config(base, ["model.allspark.infer_memory=true", "model.allspark.memory=false"])
    supervised = load_config(base, ["method=supervised", "model.allspark.infer_memory=true"])  # no block: unused
    assert supervised.model.allspark.enabled is False


# ------------------------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def test_training_teacher_eval_and_export_read_the_memory(tmp_path: Path, data_root: str, monkeypatch):
    """The teacher reads the memory from the step after the labeled stream first read it (warm-up 2: steps 0..2
    use the image's keys, step 3 the memory); validation (96 px images: a 3 x 3 grid against the memory's 2 x 2)
    reads it resized; ``eval`` reproduces the logged mIoU; the ONNX graph holds the memory path at two sizes."""
    seen = []
    original = recipes.teacher_logits

    def spy(ctx, x_u):
        seen.append(ctx.net.allspark.reads_memory_at_inference())
        return original(ctx, x_u)

    monkeypatch.setattr(recipes, "teacher_logits", spy)
    overrides = ("model.allspark.infer_memory=true", "semi.warmup_iterations=2")
    cfg = tiny_config(data_root, "allspark", overrides, iterations=4, eval_every=4)
    result = fit(cfg, tmp_path / "run")
    assert seen == [False, False, False, True]
    trained = load_trained_model(tmp_path / "run" / "last.pt")
    assert trained.cfg.model.allspark.infer_memory and trained.model.allspark.reads_memory_at_inference()
    evaluated, _ = evaluate_checkpoint(trained)
    assert evaluated.metrics.miou == result.final.miou  # the logged number, exactly
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["memory_read"] for r in logged if r["type"] == "train"] == [False, False, True, True]
    faithful = copy.deepcopy(trained.model)
    faithful.allspark.infer_memory = False
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert (faithful(x) - trained.model(x)).abs().max() > 1e-4  # validation did read the memory

    report = export_onnx(trained, tmp_path / "m.onnx", size=(48, 48))
    assert set(report.max_abs_diff) == {(48, 48), (67, 41)} and report.worst < 1e-4
