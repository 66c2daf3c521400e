"""The config stored in a checkpoint describes the whole model: eval/predict/export rebuild exactly what trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from allspark_seg.engine.predict import evaluate_checkpoint, load_trained_model
from allspark_seg.engine.train import fit
from allspark_seg.interop import HF_LAYER_NORM_EPS, OFFICIAL_LAYER_NORM_EPS
from train_utils import TINY_MODEL, tiny_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("synthetic"))


def save_random_hf_segformer(directory: Path) -> Path:
    """A Hugging Face SegFormer folder with random weights of the tiny MiT's widths (offline, random init)."""
    torch.manual_seed(3)
    config = transformers.SegformerConfig(
        hidden_sizes=TINY_MODEL["embed_dims"],
        depths=TINY_MODEL["depths"],
        num_attention_heads=TINY_MODEL["num_heads"],
        sr_ratios=[8, 4, 2, 1],
        decoder_hidden_size=16,
    )
    transformers.SegformerModel(config).save_pretrained(directory)
    return directory


def test_eval_of_a_run_from_hugging_face_weights_reproduces_its_logged_miou(tmp_path: Path, data_root: str) -> None:
    hf_dir = save_random_hf_segformer(tmp_path / "hf")
    cfg = tiny_config(data_root, "supervised", (f"model.pretrained={hf_dir}",), iterations=4, eval_every=4)
    assert cfg.model.layer_norm_eps == OFFICIAL_LAYER_NORM_EPS  # what the user wrote: the default
    result = fit(cfg, tmp_path / "run")
    trained = load_trained_model(tmp_path / "run" / "best.pt")
    # The weights set eps 1e-5; the stored config says so, and the rebuilt model (no weights file) uses it.
    assert trained.cfg.model.layer_norm_eps == HF_LAYER_NORM_EPS
    assert trained.model.encoder.layer_norm_eps == HF_LAYER_NORM_EPS
    assert {m.eps for m in trained.model.encoder.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    evaluated, _ = evaluate_checkpoint(trained)
    logged = [r for r in result.history if r["type"] == "eval"][-1]
    assert evaluated.metrics.miou == logged["miou"] == result.best_miou
    # Resuming the finished run with the user's config (eps not written) is accepted: the same model is rebuilt.
    again = fit(cfg, tmp_path / "run")
    assert again.step == result.step
