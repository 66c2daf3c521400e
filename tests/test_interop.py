"""Interop: official AllSpark checkpoints both ways, NVlabs MiT files and Hugging Face SegFormer folders.

Every checkpoint is created here (random weights, nothing downloaded). Outputs are compared in float32 the way of
``numerics``: ours against the other code run in float64, within 4 x that code's own float32 error. ``pytest -s``
prints the errors measured against Hugging Face's SegFormer encoder.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    SegformerConfig,
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
    SegformerModel,
)

import official_reference as R
from allspark_seg import build_model
from allspark_seg.errors import CheckpointError, ConfigError
from allspark_seg.interop import (
    FAITHFUL_OPTIONS,
    HF_LAYER_NORM_EPS,
    OFFICIAL_LAYER_NORM_EPS,
    hf_config_dict,
    infer_official_layout,
    load_encoder_weights,
    load_official_checkpoint,
    mit_from_hf_config,
    official_key,
    read_state_dict,
    to_hf_state_dict,
    to_official_state_dict,
)
from allspark_seg.models import AllSparkSegmentor, MixVisionTransformer
from allspark_seg.models.mit import resolve_mit_spec
from conftest import TINY_ENCODER, no_dropout, tiny_model
from numerics import Errors, check32, print_table

K = 5
TINY_HEADS = TINY_ENCODER["num_heads"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def measured() -> Iterator[dict[str, Errors | tuple[int, int]]]:
    """float32 errors against HF in float64 per quantity, printed at the end of the module (``pytest -s``)."""
    table: dict[str, Errors | tuple[int, int]] = {}
    yield table
    print_table("Hugging Face SegFormer encoder, float32", table)


def faithful_tiny(seed: int = 0, **kwargs: object) -> AllSparkSegmentor:
    torch.manual_seed(seed)
    options = {**FAITHFUL_OPTIONS, "num_classes": K, **kwargs}
    return tiny_model(**options)  # type: ignore[arg-type]


def perturb(module: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Add noise to every parameter and float buffer, so norms, biases and running stats are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point() and "kv_queue" not in name and "memory.bank" not in name:
                t.add_(scale * torch.randn(t.shape, generator=gen, dtype=t.dtype))
                if "running_var" in name:
                    t.abs_()
    return module


def save_official(path: Path, state: dict[str, torch.Tensor], wrap: str = "latest") -> Path:
    """Write a state dict the way the official scripts do: ``latest.pth`` (DDP prefix, extras) or raw."""
    if wrap == "latest":
        payload: object = {
            "model": {f"module.{k}": v for k, v in state.items()},
            "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.01}]},
            "epoch": 7,
            "best_epoch": 5,
            "previous_best": np.mean(np.array([70.5, 71.25])),  # a numpy float64, as evaluate() returns it
        }
    elif wrap == "state_dict":
        payload = {"state_dict": state}
    else:
        payload = state
    torch.save(payload, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wrap", ["latest", "raw", "state_dict"])
def test_official_round_trip_is_lossless(tmp_path, wrap):
    model = perturb(faithful_tiny(seed=1), seed=2)
    model.allspark.memory.enqueue(torch.randn(400, 4), torch.arange(400) % K)  # 80 > 64 per class: wraps
    path = save_official(tmp_path / "latest.pth", to_official_state_dict(model), wrap)
    loaded = load_official_checkpoint(path, encoder_options={"num_heads": TINY_HEADS})
    expected, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        if key != "allspark.attn.memory.filled":
            assert torch.equal(got[key], value), key
    assert bool(got["allspark.attn.memory.filled"].all())  # official slots start random: all count as filled
    no_dropout(model)
    no_dropout(loaded)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    model.train()
    loaded.train()
    guide = torch.randn(2, K, 16, 16, generator=torch.Generator().manual_seed(1))
    for use_memory in (False, True):
        out_a = model(x, x.flip(-1), guide_logits=guide, use_memory=use_memory)
        out_b = loaded(x, x.flip(-1), guide_logits=guide, use_memory=use_memory)
        assert all(torch.equal(a, b) for a, b in zip(out_a, out_b, strict=True))
    assert torch.equal(model.allspark.memory.bank, loaded.allspark.memory.bank)


def test_official_keys_and_order_are_exactly_the_model_builders():
    model = faithful_tiny()
    ref = R.build_official_model(
        K, embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), mit_heads=TINY_HEADS, patch_num=4, embedding_dim=32
    )
    official = to_official_state_dict(model)
    assert list(official) == list(ref.state_dict())
    assert all(official[k].shape == v.shape for k, v in ref.state_dict().items())
    assert official_key("allspark.attn.memory.bank") == "decoder.allspark.attn.kv_queue"
    assert official_key("allspark.attn.memory.ptr") == "decoder.allspark.attn.queue_ptr"
    assert official_key("allspark.attn.memory.filled") is None
    assert official_key("encoder.block1.0.attn.kv.weight") == "backbone.block1.0.attn.kv.weight"
    assert official_key("head.linear_fuse.bn.running_var") == "decoder.decoder.linear_fuse.bn.running_var"


def test_baseline_checkpoint_both_ways(tmp_path):
    torch.manual_seed(3)
    ref = R.build_official_model(
        K, allspark=False, embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), mit_heads=TINY_HEADS, embedding_dim=32
    )
    perturb(ref, seed=4)
    path = save_official(tmp_path / "best.pth", ref.state_dict())
    model = load_official_checkpoint(path, encoder_options={"num_heads": TINY_HEADS})
    assert model.allspark is None and model.num_classes == K and model.head.linear_fuse.conv.out_channels == 32
    assert list(to_official_state_dict(model)) == list(ref.state_dict())
    assert all(torch.equal(to_official_state_dict(model)[k], v) for k, v in ref.state_dict().items())
    ref.eval()
    model.eval()
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        check32("baseline eval logits", model(x), ref(x), ref64(x.double()))


def test_loaded_model_is_in_faithful_mode_and_overrides_apply(tmp_path):
    path = save_official(tmp_path / "ckpt.pth", to_official_state_dict(faithful_tiny()))
    model = load_official_checkpoint(path)
    block = model.allspark
    assert block.per_image_eval is False
    assert block.attn.grouping == "logits" and block.attn.grouping_resize == "bilinear"
    assert block.memory.init == "randn" and block.attn.gather_memory is False
    assert model.encoder.layer_norm_eps == OFFICIAL_LAYER_NORM_EPS == 1e-6
    assert block.attn.attn_dropout.p == 0.1 and model.head.dropout.p == 0.1
    custom = load_official_checkpoint(path, per_image_eval=True, attn_dropout=0.0, drop_path=0.0)
    assert custom.allspark.per_image_eval is True and custom.allspark.attn.attn_dropout.p == 0.0
    assert all(getattr(m, "drop_prob", 0.0) == 0.0 for m in custom.modules())


def test_layout_inference_of_a_known_variant():
    ref = R.build_official_model(21, embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), image_size=513)
    layout = infer_official_layout(ref.state_dict())
    assert layout.variant == "mit_b0"
    assert layout.spec.num_heads == (1, 2, 5, 8) and layout.spec.sr_ratios == (8, 4, 2, 1)
    assert layout.spec.mlp_ratio == 4 and layout.spec.qkv_bias is True and layout.in_chans == 3
    assert (layout.num_classes, layout.head_dim, layout.num_heads) == (21, 768, 2)
    assert layout.memory_shape == (21, 256, 289) and layout.grid == (17, 17)


def test_layout_inference_of_custom_widths_uses_the_documented_head_rule(tmp_path, caplog):
    ref = R.build_official_model(
        3,
        embed_dims=(8, 16, 32, 64),
        depths=(1, 2, 1, 1),
        mit_heads=(1, 2, 4, 8),
        num_heads=4,
        image_size=65,
        embedding_dim=24,
    )
    layout = infer_official_layout(ref.state_dict())
    assert layout.variant is None
    assert layout.spec.depths == (1, 2, 1, 1)
    assert layout.spec.num_heads == (1, 2, 4, 8)  # largest divisor of the width not above SegFormer's 1, 2, 5, 8
    assert (layout.num_classes, layout.head_dim, layout.num_heads, layout.grid) == (3, 24, 4, (3, 3))
    with caplog.at_level(logging.INFO, logger="allspark_seg.interop"):
        model = load_official_checkpoint(save_official(tmp_path / "c.pth", ref.state_dict()))
    assert "match no known variant" in caplog.text
    assert model.encoder.block4[0].attn.num_heads == 8 and model.allspark.attn.num_heads == 4


def test_numpy_1_pickled_extras_load(tmp_path):
    """Official checkpoints were written with numpy 1.x: ``previous_best`` pickles as numpy.core.multiarray.scalar."""
    path = save_official(tmp_path / "latest.pth", to_official_state_dict(faithful_tiny()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(item, data)
    old = tmp_path / "numpy1.pth"
    old.write_bytes(buffer.getvalue())
    assert load_official_checkpoint(old).num_classes == K


def test_mismatched_checkpoint_reports_every_problem_in_one_error(tmp_path):
    state = dict(to_official_state_dict(faithful_tiny()))
    del state["decoder.allspark.map_out.0.bias"]
    del state["backbone.block2.0.attn.q.weight"]
    state["decoder.allspark.attn.extra.weight"] = torch.zeros(2)
    state["decoder.allspark.attn.out_u.weight"] = torch.zeros(64, 64)  # should be (64, 128)
    path = save_official(tmp_path / "broken.pth", state)
    with pytest.raises(CheckpointError) as info:
        load_official_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert "2 missing keys" in message and "decoder.allspark.map_out.0.bias" in message
    assert "backbone.block2.0.attn.q.weight" in message
    assert "1 unexpected key (decoder.allspark.attn.extra.weight)" in message
    assert "decoder.allspark.attn.out_u.weight: file (64, 64) vs model (64, 128)" in message
    assert message.count("\n") == 0


def test_files_that_are_not_official_checkpoints(tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64), "fc.weight": torch.zeros(10, 5)}
    with pytest.raises(CheckpointError, match=r"is not an official AllSpark/SegFormer checkpoint.*conv1\.weight"):
        load_official_checkpoint(save_official(tmp_path / "resnet.pth", resnet, wrap="raw"))
    deeplab = {"backbone.conv1.weight": torch.zeros(1), "decoder.decoder.linear_pred.weight": torch.zeros(2, 3, 1, 1)}
    with pytest.raises(CheckpointError, match="backbone that is not a MiT"):
        load_official_checkpoint(save_official(tmp_path / "deeplab.pth", deeplab, wrap="raw"))
    released = dict(to_official_state_dict(faithful_tiny()))
    released["decoder.allspark.embeddings.patch_embeddings.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="issue #3"):
        load_official_checkpoint(save_official(tmp_path / "released.pth", released))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_official_checkpoint(text)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_official_checkpoint(tmp_path)
    pickled = tmp_path / "args.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, pickled)
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace.*weights_only"):
        load_official_checkpoint(pickled)
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="is not a model checkpoint"):
        load_official_checkpoint(tmp_path / "meta.pth")


def test_non_square_memory_and_bad_overrides(tmp_path):
    state = dict(to_official_state_dict(faithful_tiny()))
    good = save_official(tmp_path / "good.pth", state)
    state["decoder.allspark.attn.kv_queue"] = torch.randn(K, 64, 6)
    with pytest.raises(CheckpointError, match="N = 6 tokens per slot, which is not a square grid"):
        load_official_checkpoint(save_official(tmp_path / "rect.pth", state))
    with pytest.raises(ConfigError, match="num_classes cannot be overridden"):
        load_official_checkpoint(good, num_classes=3)
    with pytest.raises(ConfigError, match="crop_size 512 gives a"):
        load_official_checkpoint(good, crop_size=512)
    assert load_official_checkpoint(good, crop_size=33).allspark.memory.grid == (2, 2)  # ceil(33 / 32) = 2
    with pytest.raises(ConfigError, match="embed_dims"):
        load_official_checkpoint(good, encoder_options={"embed_dims": (8, 16, 32, 32)})


def test_models_the_official_code_cannot_represent():
    with pytest.raises(CheckpointError, match="memory length L = 32 differs from the width C = 64"):
        to_official_state_dict(faithful_tiny(memory_length=32))
    with pytest.raises(CheckpointError, match="memory grid 2 x 3 is not square"):
        to_official_state_dict(faithful_tiny(crop_size=(64, 96)))
    with pytest.raises(CheckpointError, match="has no Semantic Memory"):
        to_official_state_dict(faithful_tiny(memory=False))
    zeros = faithful_tiny(memory_init="zeros")
    with pytest.raises(CheckpointError, match="classes without any written slot"):
        to_official_state_dict(zeros)
    zeros.allspark.memory.enqueue(torch.randn(K, 4), torch.arange(K))  # every class written once
    assert to_official_state_dict(zeros)["decoder.allspark.attn.kv_queue"].shape == (K, 64, 4)

    class Stub(nn.Module):
        out_channels = (8, 16, 32, 64)

        def output_size(self, h: int, w: int) -> list[tuple[int, int]]:
            return [(h // 4, w // 4), (h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]

    with pytest.raises(CheckpointError, match="encoder is a Stub"):
        to_official_state_dict(build_model(Stub(), num_classes=K, crop_size=64, head_dim=32))


# ---------------------------------------------------------------------------------------------------------------------
# NVlabs ImageNet files
# ---------------------------------------------------------------------------------------------------------------------
def tiny_mit(eps: float = 1e-6, seed: int = 0) -> MixVisionTransformer:
    torch.manual_seed(seed)
    return MixVisionTransformer(resolve_mit_spec("mit_b0", **TINY_ENCODER), drop_path_rate=0.0, layer_norm_eps=eps)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_nvlabs_file_loads_and_matches_the_official_mit(tmp_path, wrapper):
    source = perturb(tiny_mit(seed=1), seed=2)
    state = dict(source.state_dict())
    state["head.weight"], state["head.bias"] = torch.randn(1000, 64), torch.zeros(1000)  # ImageNet classifier
    path = tmp_path / "mit_tiny.pth"
    torch.save(state if wrapper is None else {wrapper: state}, path)
    encoder = tiny_mit(eps=1e-5, seed=3)
    ignored = load_encoder_weights(encoder, path)
    assert ignored == ["head.weight", "head.bias"]
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in source.state_dict().items())
    assert encoder.layer_norm_eps == 1e-6 and encoder.block2[0].norm1.eps == 1e-6 and encoder.norm3.eps == 1e-6
    assert encoder.patch_embed1.norm.eps == 1e-5  # patch-embedding norms use the default in both codes
    official = R.MixVisionTransformer(embed_dims=(8, 16, 32, 64), num_heads=TINY_HEADS, depths=(1, 1, 1, 1))
    missing, unexpected = official.load_state_dict(state, strict=False)  # what the official init_weights does
    assert not missing and unexpected == ["head.weight", "head.bias"]
    official64 = copy.deepcopy(official).double().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = zip(encoder.eval()(x), official.eval()(x), official64(x.double()), strict=True)
        for stage, (ours, theirs, theirs64) in enumerate(maps, start=1):
            check32(f"stage {stage}", ours, theirs, theirs64)


def test_encoder_weights_from_an_official_allspark_checkpoint(tmp_path):
    model = perturb(faithful_tiny(seed=4), seed=5)
    path = save_official(tmp_path / "latest.pth", to_official_state_dict(model))
    encoder = tiny_mit()
    ignored = load_encoder_weights(encoder, path)
    assert all(k.startswith("decoder.") for k in ignored) and len(ignored) > 10
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in model.encoder.state_dict().items())


def test_nvlabs_errors(tmp_path):
    b0 = MixVisionTransformer(resolve_mit_spec("mit_b0"), drop_path_rate=0.0)
    path = tmp_path / "mit_b0.pth"
    torch.save(b0.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit the encoder .*shape mismatch.*patch_embed1\.proj\.weight"):
        load_encoder_weights(tiny_mit(), path)
    state = dict(tiny_mit().state_dict())
    del state["norm4.weight"]
    state["block1.0.attn.rel_pos"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 missing key \(norm4\.weight\); 1 unexpected key \(block1\.0\.attn"):
        load_encoder_weights(tiny_mit(), path)
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="holds no MiT encoder weights"):
        load_encoder_weights(tiny_mit(), path)
    with pytest.raises(ConfigError, match="needs a MixVisionTransformer"):
        load_encoder_weights(nn.Linear(2, 2), path)


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face SegFormer folders
# ---------------------------------------------------------------------------------------------------------------------
def hf_config(**kwargs: object) -> SegformerConfig:
    options = {
        "hidden_sizes": [8, 16, 32, 64],
        "depths": [1, 1, 1, 1],
        "num_attention_heads": [1, 1, 2, 2],
        "sr_ratios": [8, 4, 2, 1],
        "decoder_hidden_size": 16,
        "num_labels": 3,
    }
    options.update(kwargs)
    return SegformerConfig(**options)


def hf_hidden_states(hf: SegformerModel, x: torch.Tensor) -> list[torch.Tensor]:
    """HF's four stage outputs as NCHW maps (with ``reshape_last_stage=False`` the last one is ``(B, h*w, C)``)."""
    states = list(hf(pixel_values=x, output_hidden_states=True).hidden_states)
    last = states[-1]
    if last.ndim == 3:
        h, w = states[-2].shape[-2:]
        states[-1] = last.reshape(last.shape[0], (h + 1) // 2, (w + 1) // 2, -1).permute(0, 3, 1, 2)
    return states


def compare_with_hf(
    encoder: MixVisionTransformer, hf: SegformerModel, measured: dict[str, Errors | tuple[int, int]], what: str
) -> None:
    """Our stage maps (float32) within 4 x HF's own float32 error of HF's maps in float64, at three input sizes."""
    encoder.eval()
    hf.eval()
    hf64 = copy.deepcopy(hf).double()
    for size in ((64, 64), (64, 96), (45, 77)):
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
        with torch.no_grad():
            ours, theirs, theirs64 = encoder(x), hf_hidden_states(hf, x), hf_hidden_states(hf64, x.double())
        for stage, (a, b, c) in enumerate(zip(ours, theirs, theirs64, strict=True), start=1):
            assert a.shape == b.shape
            errors = check32(f"{what}, input {size}, stage {stage}", a, b, c)
            measured[what] = measured[what] | errors if what in measured else errors


def save_hf(model: nn.Module, directory: Path, fmt: str) -> None:
    """``save_pretrained`` in the legacy key layout, as one safetensors file, as shards, or as ``pytorch_model.bin``.

    transformers 5 only writes safetensors; the ``.bin`` (what transformers 4 wrote with ``safe_serialization=False``
    and what the published ``nvidia/mit-b*`` folders hold) is made from the same tensors with ``torch.save``.
    """
    model.save_pretrained(directory, max_shard_size="40KB" if fmt == "sharded" else "50GB")
    if fmt == "bin":
        single = directory / "model.safetensors"
        torch.save(read_state_dict(single), directory / "pytorch_model.bin")
        single.unlink()
    expected = {
        "safetensors": "model.safetensors",
        "sharded": "model.safetensors.index.json",
        "bin": "pytorch_model.bin",
    }
    assert (directory / expected[fmt]).is_file()


@pytest.mark.parametrize(
    "architecture", [SegformerModel, SegformerForImageClassification, SegformerForSemanticSegmentation]
)
@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_hf_folder_loads_and_matches_hf_hidden_states(tmp_path, measured, architecture, fmt):
    torch.manual_seed(6)
    hf = perturb(architecture(hf_config()), seed=7)
    save_hf(hf, tmp_path, fmt)
    encoder = mit_from_hf_config(tmp_path, drop_path_rate=0.0)
    assert encoder.spec.num_heads == (1, 1, 2, 2) and encoder.layer_norm_eps == HF_LAYER_NORM_EPS
    ignored = load_encoder_weights(encoder, tmp_path)
    head = {
        SegformerModel: "",
        SegformerForImageClassification: "classifier.",
        SegformerForSemanticSegmentation: "decode_head.",
    }
    prefix = head[architecture]
    assert (not ignored) if not prefix else (ignored and all(k.startswith(prefix) for k in ignored))
    body = hf if architecture is SegformerModel else hf.segformer
    compare_with_hf(encoder, body, measured, "hidden states, legacy keys")


def test_hf_transformers5_module_layout_and_reshape_convention(tmp_path, measured):
    """``save_pretrained(save_original_format=False)`` writes transformers 5 module names
    (``segformer.stages.0.blocks.0.attention.q_proj``); with ``reshape_last_stage=False`` HF returns the last stage
    as tokens, which our encoder gives as a map."""
    torch.manual_seed(8)
    hf = perturb(SegformerForSemanticSegmentation(hf_config(reshape_last_stage=False)), seed=9)
    hf.save_pretrained(tmp_path, save_original_format=False)
    assert "segformer.stages.0.blocks.0.attention.q_proj.weight" in read_state_dict(tmp_path / "model.safetensors")
    encoder = mit_from_hf_config(tmp_path, drop_path_rate=0.0)
    load_encoder_weights(encoder, tmp_path)
    compare_with_hf(encoder, hf.segformer, measured, "hidden states, transformers 5 keys")


def test_hf_eps_follows_the_weights_not_the_config_field(tmp_path, measured, caplog):
    torch.manual_seed(10)
    hf = perturb(SegformerModel(hf_config(layer_norm_eps=1e-6)), seed=11)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["layer_norm_eps"] == 1e-6  # unused by HF's layers
    assert all(m.eps == 1e-5 for m in hf.modules() if isinstance(m, nn.LayerNorm))
    encoder = tiny_mit(eps=1e-6)  # built from the variant table: official eps
    with caplog.at_level(logging.INFO, logger="allspark_seg.models.pretrained"):
        load_encoder_weights(encoder, tmp_path)
    assert "eps set from 1e-06 to 1e-05" in caplog.text
    norms = [encoder.norm1, encoder.norm4, encoder.block1[0].norm1, encoder.block4[0].norm2]
    assert all(n.eps == 1e-5 for n in norms) and encoder.layer_norm_eps == 1e-5
    compare_with_hf(encoder, hf, measured, "hidden states, eps set to 1e-5")
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)  # float64: the eps effect alone, no rounding
    encoder, hf = encoder.double().eval(), hf.double().eval()
    with torch.no_grad():
        matched = rel(encoder(x)[0], hf_hidden_states(hf, x)[0])
        _set_all_block_eps(encoder, 1e-6)  # what keeping the official eps would give
        kept = rel(encoder(x)[0], hf_hidden_states(hf, x)[0])
    assert matched < 1e-12 and kept > 1e-6  # ~1e-15 vs ~6e-6: the eps is part of the weights' configuration


def _set_all_block_eps(encoder: MixVisionTransformer, eps: float) -> None:
    for i in range(1, 5):
        getattr(encoder, f"norm{i}").eps = eps
        for block in getattr(encoder, f"block{i}"):
            block.norm1.eps = block.norm2.eps = eps


def test_hf_writer_round_trip(tmp_path, measured):
    encoder = perturb(tiny_mit(eps=HF_LAYER_NORM_EPS, seed=12), seed=13)
    save_file(to_hf_state_dict(encoder), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(encoder)))
    hf = SegformerModel.from_pretrained(str(tmp_path))
    compare_with_hf(encoder, hf, measured, "hidden states, written by to_hf_state_dict")
    back = tiny_mit(seed=14)
    load_encoder_weights(back, tmp_path)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in encoder.state_dict().items())
    assert read_state_dict(tmp_path / "model.safetensors").keys() == to_hf_state_dict(encoder).keys()


def test_build_model_with_a_pretrained_hf_folder(tmp_path):
    SegformerModel(hf_config()).save_pretrained(tmp_path)
    model = build_model(
        "mit_b0", num_classes=3, crop_size=64, head_dim=32, encoder_options=TINY_ENCODER, pretrained=str(tmp_path)
    )
    assert model.encoder.layer_norm_eps == 1e-5 and model.encoder.block3[0].norm2.eps == 1e-5


def test_hf_errors(tmp_path):
    big = tmp_path / "b0"
    SegformerModel(hf_config(hidden_sizes=[32, 64, 160, 256], num_attention_heads=[1, 2, 5, 8])).save_pretrained(big)
    with pytest.raises(CheckpointError, match=r"describes another MiT than the encoder \(hidden_sizes"):
        load_encoder_weights(tiny_mit(), big)
    (big / "config.json").unlink()  # without a config only the tensors speak: shape mismatches
    with pytest.raises(CheckpointError, match=r"shape mismatches \(patch_embed1\.proj\.weight: file \(32, 3, 7, 7\)"):
        load_encoder_weights(tiny_mit(), big)
    heads = tmp_path / "heads"
    SegformerModel(hf_config(num_attention_heads=[1, 2, 2, 4])).save_pretrained(heads)
    with pytest.raises(CheckpointError, match="num_attention_heads"):  # heads are only in config.json
        load_encoder_weights(tiny_mit(), heads)
    broken = tmp_path / "broken"
    SegformerModel(hf_config()).save_pretrained(broken)
    state = read_state_dict(broken / "model.safetensors")
    del state["encoder.block.1.0.attention.self.value.weight"]
    del state["encoder.layer_norm.3.bias"]
    state["encoder.block.0.0.attention.self.rotary.weight"] = torch.zeros(2)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_encoder_weights(tiny_mit(), broken)
    message = str(info.value)
    assert "2 missing keys (block2.0.attn.kv.weight (needs both key and value), norm4.bias)" in message
    assert "1 unexpected key (encoder.block.0.0.attention.self.rotary.weight)" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(hf_config().to_dict()))
    with pytest.raises(CheckpointError, match="has no model.safetensors or pytorch_model.bin"):
        load_encoder_weights(tiny_mit(), empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(CheckpointError, match="'vit' model, not a SegFormer"):
        mit_from_hf_config(empty)
    (empty / "config.json").write_text(json.dumps({**hf_config().to_dict(), "hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        mit_from_hf_config(empty)
    with pytest.raises(CheckpointError, match="has no config.json"):
        mit_from_hf_config(tmp_path / "nowhere")
