"""Hugging Face AutoBackbone encoders (``model.encoder: hf:DIR``) built offline from small random configs."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoBackbone, BertConfig, ConvNextConfig, Dinov2Config, ResNetConfig, SwinConfig

from allspark_seg import build_model
from allspark_seg.config import load_config
from allspark_seg.engine.predict import evaluate_checkpoint, load_trained_model
from allspark_seg.engine.train import fit
from allspark_seg.errors import ConfigError, MissingExtraError
from allspark_seg.models.hf import HFBackboneEncoder, build_hf_encoder, default_out_features
from train_utils import tiny_config

CONFIGS = {
    "convnext": lambda: ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]),
    "resnet": lambda: ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]),
    "swin": lambda: SwinConfig(
        image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4
    ),
    "dinov2": lambda: Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=64,
        out_features=["stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every backbone saved with random weights (seed 0) in its own folder."""
    root = tmp_path_factory.mktemp("hf")
    folders = {}
    for name, make in CONFIGS.items():
        torch.manual_seed(0)
        AutoBackbone.from_config(make()).save_pretrained(root / name)
        folders[name] = root / name
    return folders


@pytest.mark.parametrize(
    ("name", "channels", "strides"),
    [
        ("convnext", (8, 16, 32, 64), (4, 8, 16, 32)),
        ("resnet", (8, 16, 32, 64), (4, 8, 16, 32)),
        ("swin", (8, 16, 32, 64), (4, 8, 16, 32)),
        ("dinov2", (32, 32, 32), (8, 8, 8)),  # the config's own out_features; one stride (the patch size)
    ],
)
def test_widths_and_strides_come_from_the_backbone(saved, name, channels, strides):
    encoder = build_hf_encoder(saved[name])
    assert encoder.out_channels == channels and encoder.reductions == strides
    x = torch.randn(2, 3, 64, 96)
    maps = encoder(x)
    assert [m.shape[1] for m in maps] == list(channels)
    assert [tuple(m.shape[-2:]) for m in maps] == encoder.output_size(64, 96)
    assert encoder.output_size(64, 96) == [(64 // s, 96 // s) for s in strides]
    # AllSpark on the last map, the head on all of them; training and eval forwards.
    model = build_model(encoder, num_classes=3, crop_size=64, head_dim=16)
    assert model.allspark.memory.grid == (64 // strides[-1],) * 2
    model.train()
    logits_l, logits_u = model(x[:, :, :, :64], x[:, :, :, :64].flip(0), guide_logits=torch.randn(2, 3, 64, 64))
    (logits_l.sum() + logits_u.sum()).backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)
    assert encoder.unused == {
        "swin": ("swin.layernorm.weight", "swin.layernorm.bias"),
        "dinov2": ("embeddings.mask_token",),
    }.get(name, ())
    assert model.eval()(x).shape == (2, 3, 64, 96)


def test_default_stages_probe_and_weights(saved):
    assert default_out_features(["stem", "stage1", "stage2"], ["stage2"]) == ["stage1", "stage2"]
    assert default_out_features(["stem"] + [f"stage{i}" for i in range(1, 13)], None) == [
        "stage9",
        "stage10",
        "stage11",
        "stage12",
    ]
    assert default_out_features(["stem", "stage1", "stage2"], ["stem", "stage2"]) == ["stem", "stage2"]
    # The saved ConvNeXt names only its last stage: the encoder returns the last four.
    assert json.loads((saved["convnext"] / "config.json").read_text())["out_features"] == ["stage4"]
    # The stride probe runs in eval mode: BatchNorm statistics and the random stream are left alone.
    torch.manual_seed(1)
    encoder = build_hf_encoder(saved["resnet"])
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    rng = torch.get_rng_state()
    encoder.train()
    assert encoder.output_size(40, 56) == [(10, 14), (5, 7), (3, 4), (2, 2)]
    assert encoder.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())
    # pretrained=True loads the saved weights; False draws new ones from the config.
    loaded = build_hf_encoder(saved["swin"], pretrained=True)
    random = build_hf_encoder(saved["swin"], pretrained=False)
    torch.manual_seed(0)
    reference = AutoBackbone.from_config(CONFIGS["swin"]())
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], value), key
    key = "swin.embeddings.patch_embeddings.projection.weight"
    assert not torch.equal(random.backbone.state_dict()[key], reference.state_dict()[key])
    assert isinstance(loaded, HFBackboneEncoder)


def test_errors_name_the_folder_and_the_extra(tmp_path, saved, monkeypatch):
    with pytest.raises(ConfigError, match="has no config.json"):
        build_hf_encoder(tmp_path)
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="'bert' config is not a backbone"):
        build_hf_encoder(tmp_path)
    with pytest.raises(ConfigError, match="leave it empty for random weights"):
        load_config(
            {"model": {"encoder": f"hf:{saved['convnext']}", "pretrained": str(tmp_path)}, "train": {"iterations": 1}}
        )
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'allspark-seg\[hf\]'"):
        build_hf_encoder(saved["convnext"])


@pytest.mark.parametrize(("name", "method"), [("convnext", "allspark"), ("dinov2", "allspark+")])
def test_fit_and_evaluate_with_an_hf_encoder(tmp_path, saved, name, method):
    folder = saved[name]
    cfg = tiny_config(
        str(tmp_path / "data"),
        method=method,
        overrides=(f"model.encoder=hf:{folder}", f"model.pretrained={folder}", "data.crop_size=64"),
        iterations=4,
        eval_every=4,
        log_every=2,
    )
    result = fit(cfg, tmp_path / "run")
    assert result.step == 4 and 0.0 <= result.final.miou <= 1.0
    train = [r for r in result.history if r["type"] == "train"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train) and "memory_fill" in train[-1]
    # The checkpoint rebuilds the same model (from DIR's config) and evaluates to the logged number.
    trained = load_trained_model(tmp_path / "run" / "last.pt")
    assert trained.model.encoder.out_channels == build_hf_encoder(folder).out_channels
    metrics, _ = evaluate_checkpoint(trained)
    assert metrics.metrics.miou == pytest.approx(result.final.miou, abs=1e-6)
