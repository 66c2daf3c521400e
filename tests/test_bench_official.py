"""The benchmark's official-code harness (``bench/official.py``) and its import shims (``bench/official_shims``).

No test needs the official checkout: a fake checkout written here has the official file layout and imports the
same names from timm and mmcv as the official code; its model classes are the restatement
``tests/official_reference.py`` behind the official constructor signatures, with the shims' ``DropPath`` and
``ConvModule`` put in. So the shims are checked where the official code uses them (state-dict keys, a strict load of
our weights, float64 outputs and gradients), and the harness (import, configuration, weight transfer, the timed
iteration, the memory update, inference) runs end to end.
"""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY_ENCODER, no_dropout

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import official  # noqa: E402
import workloads as W  # noqa: E402

from allspark_seg import build_model  # noqa: E402
from allspark_seg.interop import FAITHFUL_OPTIONS, official_key  # noqa: E402

FAKE_HELPER = """
import importlib
from torch import nn


class ModelBuilder(nn.Module):
    def __init__(self, net_cfg):
        super().__init__()
        self.backbone = self._build(net_cfg["backbone"])
        self.decoder = self._build(net_cfg["decoder"])

    def _build(self, cfg):
        module_name, class_name = cfg["type"].rsplit(".", 1)
        return getattr(importlib.import_module(module_name), class_name)(**cfg["kwargs"])

    def forward(self, x):
        h, w = x.shape[-2:]
        return self.decoder(self.backbone(x), h, w)
"""

FAKE_MIT = """
from timm.models.layers import DropPath, to_2tuple, trunc_normal_
import official_reference as R


class MixVisionTransformer(R.MixVisionTransformer):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dims=(64, 128, 256, 512),
                 num_heads=(1, 2, 4, 8), mlp_ratios=(4, 4, 4, 4), qkv_bias=False, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=None, depths=(3, 4, 6, 3),
                 sr_ratios=(8, 4, 2, 1)):
        super().__init__(in_chans, embed_dims, num_heads, mlp_ratios, qkv_bias, drop_rate, attn_drop_rate,
                         drop_path_rate, depths, sr_ratios, norm_layer(1).eps)
        self.img_size = to_2tuple(img_size)
        trunc_normal_(self.patch_embed1.proj.weight, std=0.02)
        for i in range(1, 5):
            for block in getattr(self, f"block{i}"):
                if hasattr(block.drop_path, "drop_prob"):
                    block.drop_path = DropPath(block.drop_path.drop_prob)
"""

FAKE_ALLSPARK = """
from mmcv.cnn import ConvModule
import official_reference as R

CrossAttnMem = R.CrossAttnMem


class SemiDecoder(R.SemiDecoder):
    def __init__(self, num_heads, num_class, in_planes, image_size, warmup_epoch, embedding_dim):
        super().__init__(num_heads, num_class, in_planes, image_size, warmup_epoch, embedding_dim)
        self.decoder.linear_fuse = ConvModule(in_channels=embedding_dim * 4, out_channels=embedding_dim,
                                              kernel_size=1, norm_cfg=dict(type="SyncBN", requires_grad=True))
"""


def write_checkout(root: Path) -> Path:
    """A folder with the official file layout (``model/...``) and the fake modules above."""
    for name, text in zip(official.OFFICIAL_FILES, (FAKE_HELPER, FAKE_MIT, FAKE_ALLSPARK), strict=True):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def isolated(monkeypatch):
    """``sys.path`` restored, and the ``model``, ``timm`` and ``mmcv`` modules imported by a test dropped after it;
    einops not required (the fake checkout does not import it)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(official, "REQUIRED_MODULES", ())
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("model", "timm", "mmcv"):
            del sys.modules[name]
    importlib.invalidate_caches()


@pytest.fixture
def checkout(tmp_path, isolated) -> Path:
    return write_checkout(tmp_path / "AllSpark")


@pytest.fixture
def shims(isolated):
    """The shim packages importable as ``timm`` and ``mmcv`` (only during the test)."""
    sys.path.insert(0, str(official.SHIMS))
    return importlib.import_module("timm.models.layers"), importlib.import_module("mmcv.cnn")


def tiny(classes: int = 5, crop: int = 65, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    options = {**FAITHFUL_OPTIONS, "encoder_options": TINY_ENCODER, "head_dim": 16, "drop_path": 0.0, **kwargs}
    return build_model("mit_b0", num_classes=classes, crop_size=crop, **options)


# -- the shims --------------------------------------------------------------------------------------------------------
def test_timm_shim_names(shims):
    layers, _ = shims
    assert layers.to_2tuple(7) == (7, 7)
    assert layers.to_2tuple([3, 5]) == (3, 5)
    assert layers.to_2tuple("ab") == ("ab", "ab")
    w = torch.empty(20000)
    layers.trunc_normal_(w, std=0.5, a=-1.0, b=1.0)
    assert w.min() >= -1.0 and w.max() <= 1.0
    assert 0.35 < float(w.std()) < 0.5  # a N(0, 0.5) cut at 2 standard deviations has std ~0.44


def test_timm_shim_drop_path(shims):
    layers, _ = shims
    x = torch.randn(4000, 3, 2)
    drop = layers.DropPath(0.25)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(layers.DropPath(0.0).train()(x), x)
    torch.manual_seed(0)
    y = drop.train()(x)
    kept = (y != 0).flatten(1).any(dim=1)
    # each sample is either dropped whole or kept and scaled by 1 / keep
    torch.testing.assert_close(y[kept], x[kept] / 0.75, rtol=1e-6, atol=0)
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))
    assert abs(float(kept.double().mean()) - 0.75) < 0.03
    drop.drop_prob = 0.0  # read at every call, as the official reset_drop_path relies on
    assert torch.equal(drop(x), x)


def test_mmcv_shim_conv_module(shims):
    _, cnn = shims
    torch.manual_seed(0)
    module = cnn.ConvModule(
        in_channels=6, out_channels=4, kernel_size=1, norm_cfg={"type": "SyncBN", "requires_grad": True}
    )
    assert set(module.state_dict()) == {
        "conv.weight",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }
    assert module.conv.bias is None and isinstance(module.bn, nn.SyncBatchNorm)
    assert torch.equal(module.bn.weight, torch.ones(4)) and torch.equal(module.bn.bias, torch.zeros(4))
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    module = module.double().train()
    conv = nn.functional.conv2d(x, module.conv.weight)
    mean, var = conv.mean(dim=(0, 2, 3), keepdim=True), conv.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = ((conv - mean) / torch.sqrt(var + 1e-5)).clamp_min(0)
    torch.testing.assert_close(module(x), expected, rtol=1e-12, atol=1e-12)  # one process: a plain batch norm
    plain = cnn.ConvModule(6, 4, 3, padding=1, act_cfg=None)
    assert plain.conv.bias is not None and not hasattr(plain, "bn") and plain.activate is None
    assert cnn.ConvTranspose2d is nn.ConvTranspose2d
    with pytest.raises(NotImplementedError, match="GN"):
        cnn.ConvModule(6, 4, 1, norm_cfg={"type": "GN"})
    with pytest.raises(NotImplementedError, match="GELU"):
        cnn.ConvModule(6, 4, 1, act_cfg={"type": "GELU"})


# -- the harness ------------------------------------------------------------------------------------------------------
def test_check_official_dir_explains(tmp_path, monkeypatch):
    assert "no such folder" in official.check_official_dir(tmp_path / "nope")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_helper.py").write_text("")
    message = official.check_official_dir(tmp_path)
    assert "model/backbone/mit.py, model/semseg/allspark.py not found" in message
    assert "xmed-lab/AllSpark" in message
    write_checkout(tmp_path)
    monkeypatch.setattr(official, "REQUIRED_MODULES", ())
    assert official.check_official_dir(tmp_path) is None
    monkeypatch.setattr(official, "REQUIRED_MODULES", ("no_such_module_for_the_test",))
    message = official.check_official_dir(tmp_path)
    assert "imports no_such_module_for_the_test, which is not installed (pip install" in message


def test_import_official_uses_the_checkout_and_the_shims(checkout, tmp_path):
    helper = official.import_official(checkout)
    assert Path(helper.__file__) == checkout.resolve() / "model" / "model_helper.py"
    importlib.import_module("model.backbone.mit")  # as ModelBuilder imports them, by their config names
    importlib.import_module("model.semseg.allspark")
    assert Path(sys.modules["timm"].__file__).parent == official.SHIMS / "timm"
    assert Path(sys.modules["mmcv.cnn"].__file__).parent == official.SHIMS / "mmcv" / "cnn"
    other = write_checkout(tmp_path / "other")
    with pytest.raises(RuntimeError, match="was imported from"):
        official.import_official(other)  # another checkout cannot replace the one already imported


def test_official_twin_float64_equivalence(checkout):
    """Our weights loaded strictly into the (fake) official model; same logits and gradients in float64."""
    ours = no_dropout(tiny()).double()
    twin = official.official_twin(ours, 65, checkout).double()
    assert type(twin).__module__ == "model.model_helper"
    assert type(twin.decoder.decoder.linear_fuse).__module__ == "mmcv.cnn"
    assert twin.decoder.using_SMem and twin.training
    x_l, y_l, x_u = (t.double() if t.is_floating_point() else t for t in W.batch(65, 5))
    mine = W._iteration(ours, False, x_l, y_l, x_u)
    theirs = W._iteration(twin, True, x_l, y_l, x_u)
    for a, b in zip(mine, theirs, strict=True):
        assert W.rel(a, b) < 1e-10
    errors = W._gradient_errors(ours, twin, official_key)
    assert max(errors.values()) < 1e-10
    assert torch.equal(ours.allspark.memory.ptr, twin.decoder.allspark.attn.queue_ptr)


def test_official_config_describes_the_model():
    model = tiny(classes=7, crop=97, drop_path=0.1)
    cfg = official.official_config(model, 97)
    backbone, decoder = cfg["backbone"]["kwargs"], cfg["decoder"]["kwargs"]
    assert cfg["backbone"]["type"] == "model.backbone.mit.MixVisionTransformer"
    assert cfg["decoder"]["type"] == "model.semseg.allspark.SemiDecoder"
    assert backbone["embed_dims"] == [8, 16, 32, 64] and backbone["num_heads"] == [1, 1, 2, 2]
    assert backbone["norm_layer"](4).eps == 1e-6 and backbone["drop_path_rate"] == pytest.approx(0.1)
    assert decoder == {
        "num_heads": 2,
        "num_class": 7,
        "in_planes": [8, 16, 32, 64],
        "image_size": 97,
        "warmup_epoch": 0,
        "embedding_dim": 16,
    }
    with pytest.raises(ValueError, match="Crop 96"):
        official.official_twin(tiny(crop=96), 96, "unused")


def _loss(model: nn.Module, dtype: torch.dtype) -> float:
    """Ours: the official objective of one iteration (teacher pass, student pass), in ``dtype``."""
    x_l, y_l, x_u = W.batch(65, 5)
    teacher, logits_l, logits_u = W._iteration(model.to(dtype), False, x_l, y_l, x_u)
    loss = nn.functional.cross_entropy(logits_l, y_l, ignore_index=255)
    return float((loss + nn.functional.cross_entropy(logits_u, teacher.argmax(dim=1))).detach() / 2)


def test_timed_official_iteration_matches_ours(checkout):
    """The closure the benchmark times: one train_allspark.py iteration on the official model (float32), against
    ours in float64; bound: ours' own float32 error on the same loss (floor: a few float32 ulps)."""
    ours = no_dropout(tiny())
    step = W.baseline_step_fn(copy.deepcopy(ours), 65, 5, official=str(checkout))
    truth = _loss(copy.deepcopy(ours), torch.float64)
    own_error = abs(_loss(copy.deepcopy(ours), torch.float32) - truth)
    bound = max(own_error, 8 * torch.finfo(torch.float32).eps * abs(truth))
    assert abs(float(step()) - truth) <= 4 * bound


def test_memory_update_against_the_official_class(checkout):
    res = W.memory_update(classes=6, batch_u=2, channels=16, grid=3, warmup=0, repeats=2, official=str(checkout))
    assert res["baseline"] == "official" and res["same_state"]
    assert len(res["base"]["times"]) == len(res["ours"]["times"]) == 2
    assert W.memory_update(classes=6, batch_u=2, channels=16, grid=3, warmup=0, repeats=1)["baseline"] == "literal"


def test_official_info_identifies_the_files(checkout):
    sys.path.insert(0, str(BENCH))
    import run as bench

    info = bench.official_info(checkout)
    assert info["path"] == str(checkout.resolve()) and info["commit"] is None
    assert len(info["sha256"]) == 12
    (checkout / "model" / "semseg" / "allspark.py").write_text(FAKE_ALLSPARK + "\n# changed\n")
    assert bench.official_info(checkout)["sha256"] != info["sha256"]
