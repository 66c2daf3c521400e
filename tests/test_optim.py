"""Parameter groups, optimisers and the poly schedule (with the official one-step lag)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from allspark_seg.errors import ConfigError
from allspark_seg.models import build_model
from allspark_seg.optim import build_optimizer, lr_for_step, param_groups, poly_lr, set_lr


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.block = nn.Linear(4, 4)
        self.head = nn.Conv2d(4, 2, 1)


def test_poly_values() -> None:
    total, base = 1000, 0.01
    assert poly_lr(0, total, base) == base
    assert poly_lr(total // 2, total, base) == pytest.approx(base * 0.5**0.9)
    assert poly_lr(total - 1, total, base) == pytest.approx(base * (1 / total) ** 0.9)
    assert poly_lr(total, total, base) == 0.0
    assert poly_lr(total + 5, total, base) == 0.0  # clamped
    assert poly_lr(250, total, base, power=1.0) == pytest.approx(0.0075)
    with pytest.raises(ConfigError):
        poly_lr(0, 0, base)


def test_lr_for_step_faithful_lag() -> None:
    total, base = 100, 0.1
    assert lr_for_step(0, total, base) == base
    assert lr_for_step(1, total, base) == base
    assert lr_for_step(10, total, base) == poly_lr(9, total, base)
    assert lr_for_step(10, total, base, faithful_lag=False) == poly_lr(10, total, base)
    assert lr_for_step(0, total, base, faithful_lag=False) == base


def test_set_lr_reproduces_the_official_loop() -> None:
    """Official: SGD built with (lr, lr * multi); after each step t: group lr = poly(t) (x multi)."""
    base, multi, total = 0.004, 40.0, 7
    official = torch.optim.SGD(
        [
            {"params": [nn.Parameter(torch.zeros(1))], "lr": base},
            {"params": [nn.Parameter(torch.zeros(1))], "lr": base * multi},
        ],
        lr=base,
    )
    ours = build_optimizer("sgd", param_groups(Toy(), base, multi), base)
    for t in range(total):
        value = set_lr(ours, t, total, base)
        used_official = [g["lr"] for g in official.param_groups]  # lr of step t
        assert [g["lr"] for g in ours.param_groups] == pytest.approx(used_official)
        assert value == pytest.approx(used_official[0])
        official.param_groups[0]["lr"] = base * (1 - t / total) ** 0.9
        official.param_groups[1]["lr"] = base * (1 - t / total) ** 0.9 * multi


def test_param_groups_split_by_module_identity() -> None:
    model = Toy()
    enc, rest = param_groups(model, lr=0.01, lr_multi=10.0, weight_decay=5e-4)
    enc_ids = {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in enc["params"]} == enc_ids
    assert {id(p) for p in rest["params"]} == {id(p) for p in model.parameters()} - enc_ids
    assert len(enc["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert (enc["name"], enc["lr"], enc["initial_lr"], enc["lr_mult"]) == ("encoder", 0.01, 0.01, 1.0)
    assert (rest["name"], rest["lr_mult"]) == ("decoder", 10.0)
    assert rest["lr"] == pytest.approx(0.1)
    assert rest["initial_lr"] == pytest.approx(0.1)
    assert enc["weight_decay"] == rest["weight_decay"] == 5e-4


def test_shared_parameter_stays_in_the_encoder_group() -> None:
    model = Toy()
    model.block.bias = model.encoder[1].bias  # a (4,) parameter shared by the encoder and the block
    enc, rest = param_groups(model, 0.01, 10.0)
    assert any(p is model.block.bias for p in enc["params"])
    assert not any(p is model.block.bias for p in rest["params"])
    assert "weight_decay" not in enc


def test_param_groups_errors() -> None:
    with pytest.raises(ConfigError, match="'backbone'"):
        param_groups(Toy(), 0.01, 10.0, encoder_attr="backbone")
    with pytest.raises(ConfigError, match="positive"):
        param_groups(Toy(), 0.0, 10.0)


def test_build_optimizer_sgd_and_adamw() -> None:
    sgd = build_optimizer("sgd", param_groups(Toy(), 0.01, 10.0), lr=0.01)
    assert isinstance(sgd, torch.optim.SGD)
    for group in sgd.param_groups:
        assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 1e-4, False)
    assert [g["lr"] for g in sgd.param_groups] == pytest.approx([0.01, 0.1])
    adamw = build_optimizer("adamw", param_groups(Toy(), 1e-4, 10.0), lr=1e-4, weight_decay=0.01, betas=(0.9, 0.99))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[1]["betas"] == (0.9, 0.99)
    assert adamw.param_groups[1]["weight_decay"] == 0.01
    with pytest.raises(ConfigError, match="valid optimizers are 'sgd', 'adamw'"):
        build_optimizer("adam", Toy().parameters(), lr=0.01)
    with pytest.raises(ConfigError, match="momentum"):
        build_optimizer("sgd", Toy().parameters(), lr=0.01, momentum=1.0)


def test_param_groups_on_the_segmentor() -> None:
    encoder = {"embed_dims": (8, 16, 32, 64), "num_heads": (1, 1, 2, 2), "depths": (1, 1, 1, 1)}
    model = build_model("mit_b0", num_classes=5, crop_size=32, encoder_options=encoder, head_dim=32)
    enc, rest = param_groups(model, 6e-5, 40.0)
    assert {id(p) for p in enc["params"]} == {id(p) for p in model.encoder.parameters()}
    others = [p for name, p in model.named_parameters() if not name.startswith("encoder.")]
    assert {id(p) for p in rest["params"]} == {id(p) for p in others}
    assert len(others) > 0
