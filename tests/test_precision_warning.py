"""bf16/fp16 on a CPU without instructions for them: one warning at the start of training, naming fp32."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from allspark_seg.dist import cpu_flags, slow_precision_warning
from allspark_seg.engine import train
from allspark_seg.engine.train import fit
from train_utils import tiny_config

CPU = torch.device("cpu")
AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})


def test_the_warning_needs_a_half_precision_on_a_cpu_without_its_instructions() -> None:
    for precision in ("bf16", "fp16"):
        message = slow_precision_warning(precision, CPU, AVX2_ONLY)
        assert message is not None and f"train.precision={precision}" in message and "fp32 is faster" in message
    assert slow_precision_warning("bf16", CPU, AVX2_ONLY | {"avx512_bf16"}) is None
    assert slow_precision_warning("bf16", CPU, AVX2_ONLY | {"amx_bf16"}) is None
    assert slow_precision_warning("bf16", CPU, frozenset({"fp", "asimd", "bf16"})) is None  # Arm
    assert slow_precision_warning("fp16", CPU, AVX2_ONLY | {"avx512_fp16"}) is None
    assert slow_precision_warning("fp32", CPU, AVX2_ONLY) is None
    assert slow_precision_warning("bf16", torch.device("cuda"), AVX2_ONLY) is None
    assert slow_precision_warning("bf16", CPU, None) is None  # flags unknown: no guess


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags : fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "fma"} and cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") is None


@pytest.mark.parametrize(("flags", "warned"), [(AVX2_ONLY, 1), (AVX2_ONLY | {"avx512_bf16"}, 0)])
def test_training_in_bf16_warns_once_at_the_start(flags, warned, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(train, "cpu_flags", lambda: flags)
    cfg = tiny_config(str(tmp_path / "data"), method="supervised", iterations=2, eval_every=2, precision="bf16")
    with caplog.at_level(logging.WARNING, logger="allspark_seg"):
        fit(cfg, tmp_path / "run")
    assert sum("without bf16 instructions" in r.getMessage() for r in caplog.records) == warned
