"""allspark-seg on a CUDA GPU: train, kill and resume, eval, predict and export, a process group, no host syncs.

The CUDA tests carry the ``cuda`` marker and are skipped, saying that CUDA is missing, where
``torch.cuda.is_available()`` is False. ``python bench/gpu_check.py`` runs them (``pytest -m cuda``) before its
timings. A check that runs on the CPU as well is parametrized over the device: its CPU half has no ``cuda`` marker,
runs everywhere, and is the reference the CUDA half is held to.

Exactness: the CPU runs resume bit for bit. On CUDA, ``train.deterministic`` makes cuBLAS and most kernels
deterministic (with ``CUBLAS_WORKSPACE_CONFIG`` set below, before any cuBLAS handle exists), but some backward kernels
have no deterministic version (bilinear upsampling accumulates with atomics) and PyTorch then warns. A CUDA run that
raised no such warning must resume exactly; one that did is compared with a tolerance (and the warning is shown).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read when its handle is made)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from allspark_seg import cli  # noqa: E402
from allspark_seg.dist import init_distributed  # noqa: E402
from allspark_seg.engine.checkpoint import load_checkpoint  # noqa: E402
from allspark_seg.engine.predict import load_trained_model, predict_image  # noqa: E402
from allspark_seg.engine.train import Trainer, fit  # noqa: E402
from allspark_seg.models import SemanticMemory  # noqa: E402
from conftest import tiny_model  # noqa: E402
from train_utils import TINY_MODEL, tiny_config, tiny_data  # noqa: E402

TESTS = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
NO_CUDA = "needs CUDA: torch.cuda.is_available() is False here (no GPU or a CPU-only PyTorch build)"
needs_cuda = pytest.mark.skipif(not CUDA, reason=NO_CUDA)
ON_CUDA = (pytest.mark.cuda, needs_cuda)

ITERATIONS, KILL_AT, CHECKPOINT_EVERY = 8, 5, 3  # killed after logging iteration 5; last.pt holds iteration 3
# Bounds on the logged losses of a resumed CUDA run against an uninterrupted one when a kernel was nondeterministic
# (relative; float32 atomics differ by ~1e-7, half-precision ones by ~1e-3; a flipped pseudo-label or memory slot
# moves a tiny model's loss by ~1e-3).
LOSS_RTOL = {"fp32": 0.02, "bf16": 0.1, "fp16": 0.05}
NONDETERMINISTIC = "deterministic"  # in PyTorch's warnings about kernels without a deterministic implementation


def device_params(*precisions: str) -> list[Any]:
    """``(device, precision)``: CPU in fp32 (the reference, no marker), CUDA in each precision (``cuda`` marker)."""
    params = [pytest.param("cpu", "fp32", id="cpu-fp32")]
    params += [pytest.param("cuda", p, marks=ON_CUDA, id=f"cuda-{p}") for p in precisions]
    return params


@pytest.fixture(autouse=True)
def restore_global_torch_state() -> Iterator[None]:
    """``train.deterministic`` switches process-wide flags on; other test modules must not inherit them."""
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
    if CUDA:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The synthetic dataset of ``train_utils.tiny_config`` (written by the first run)."""
    return str(tmp_path_factory.mktemp("cuda_data"))


def run_config(data_root: str, device: str, precision: str) -> dict[str, Any]:
    """A tiny AllSpark run: memory read from iteration 2, validations at 4 and 8, ``last.pt`` at 3, 6 and 8."""
    return {
        "method": "allspark",
        "model": dict(TINY_MODEL),
        "data": tiny_data(data_root),
        "train": {
            "iterations": ITERATIONS,
            "batch_size": 2,
            "lr": 0.01,
            "device": device,
            "precision": precision,
            "deterministic": True,
            "log_every": 1,
            "eval_every": 4,
            "checkpoint_every": CHECKPOINT_EVERY,
        },
        "semi": {"warmup_iterations": 2},
    }


def cli_train(config: Path, out: Path) -> list[str]:
    """``allspark-seg train -c CONFIG -o OUT`` in this process; the PyTorch warnings it raised about
    nondeterministic kernels."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["train", "--config", str(config), "--out", str(out)]) == 0
    return sorted({str(w.message).splitlines()[0] for w in caught if NONDETERMINISTIC in str(w.message)})


KILLED_RUN = """
import os, signal, sys
from allspark_seg import cli
from allspark_seg.engine.logger import MetricLogger

write = MetricLogger.write


def write_then_die(self, record):
    write(self, record)
    if record.get("type") == "train" and record.get("step") == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a preempted job would


MetricLogger.write = write_then_die
sys.exit(cli.main(["train", "--config", {config!r}, "--out", {out!r}]))
"""


def train_records(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "train"]


class Runs:
    """Uninterrupted runs, trained once per (device, precision) and shared by the tests of this module."""

    def __init__(self, root: Path, data_root: str) -> None:
        self.root, self.data_root = root, data_root
        self.done: dict[tuple[str, str], tuple[Path, list[str]]] = {}

    def config(self, device: str, precision: str) -> Path:
        path = self.root / f"{device}-{precision}.yaml"
        if not path.exists():
            path.write_text(yaml.safe_dump(run_config(self.data_root, device, precision)))
        return path

    def straight(self, device: str, precision: str) -> tuple[Path, list[str]]:
        """The run folder and the nondeterminism warnings of its training."""
        key = (device, precision)
        if key not in self.done:
            out = self.root / f"straight-{device}-{precision}"
            self.done[key] = (out, cli_train(self.config(device, precision), out))
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_root: str) -> Runs:
    return Runs(tmp_path_factory.mktemp("cuda_runs"), data_root)


def assert_states_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Model weights, Semantic Memory and momentum buffers of two checkpoints, bit for bit."""
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"]), key


# --------------------------------------------------------------------------------------- train, kill and resume
@pytest.mark.parametrize(("device", "precision"), device_params("fp32", "bf16", "fp16"))
def test_killed_run_resumes_like_an_uninterrupted_one(runs: Runs, device: str, precision: str) -> None:
    """``allspark-seg train`` SIGKILLed after logging iteration 5 (checkpoint at 3), then the same command again."""
    config = runs.config(device, precision)
    straight, nondeterministic = runs.straight(device, precision)
    out = runs.root / f"killed-{device}-{precision}"
    script = KILLED_RUN.format(kill_at=KILL_AT, config=str(config), out=str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert load_checkpoint(out / "last.pt")["step"] == CHECKPOINT_EVERY
    nondeterministic = [*nondeterministic, *cli_train(config, out)]

    log = (out / "train.log").read_text()
    where = "cuda:0" if device == "cuda" else "cpu"
    assert f"{precision} on {where} x1" in log, log[-2000:]
    assert f"resumed from {out / 'last.pt'} at iteration {CHECKPOINT_EVERY}" in log
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(out / "last.pt")
    assert a["step"] == b["step"] == ITERATIONS
    assert (b["scaler"] is not None) == (precision == "fp16")  # fp16 trains with a gradient scaler
    assert all(v.dtype != torch.float16 and v.dtype != torch.bfloat16 for v in b["model"].values())
    rec_a, rec_b = train_records(straight), train_records(out)
    assert [r["step"] for r in rec_b] == [r["step"] for r in rec_a] == list(range(1, ITERATIONS + 1))
    loss_a = np.array([r["loss"] for r in rec_a])
    loss_b = np.array([r["loss"] for r in rec_b])
    assert np.isfinite(loss_b).all()
    if not nondeterministic:
        assert loss_a.tolist() == loss_b.tolist()
        assert_states_equal(a, b)
        return
    assert device == "cuda", nondeterministic  # the CPU kernels are deterministic
    worst = float(np.max(np.abs(loss_b - loss_a) / np.abs(loss_a)))
    kernels = "; ".join(nondeterministic)
    print(f"\n{device} {precision}: nondeterministic kernels ({kernels}); worst relative loss difference {worst:.1e}")
    assert worst <= LOSS_RTOL[precision], (loss_a, loss_b, nondeterministic)


# ------------------------------------------------------------------------------------ eval, predict and export
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_CUDA)])
def test_eval_and_predict_on_the_device_of_the_checkpoint(
    runs: Runs, device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``eval`` gives the mIoU training logged; ``predict`` the masks of the model on the CPU (CUDA: up to ties);
    the checkpoint evaluates on the CPU as well."""
    out, _ = runs.straight(device, "fp32")
    best = out / "best.pt"
    saved = load_checkpoint(best)
    logged = next(
        r
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["type"] == "eval" and r["step"] == saved["best_step"]
    )
    miou = {}
    for where in dict.fromkeys((device, "cpu")):
        report = runs.root / f"eval-{device}-on-{where}.json"
        assert cli.main(["eval", "--checkpoint", str(best), "--device", where, "--out", str(report)]) == 0
        miou[where] = json.loads(report.read_text())["metrics"]["miou"]
    if device == "cpu":
        assert miou["cpu"] == logged["miou"]
    else:
        assert abs(miou["cuda"] - logged["miou"]) <= 1e-3, (miou, logged["miou"])
        assert abs(miou["cpu"] - logged["miou"]) <= 0.02, (miou, logged["miou"])

    images = Path(runs.data_root) / "val" / "images"
    pred = runs.root / f"pred-{device}"
    assert cli.main(["predict", "--checkpoint", str(best), str(images), "--out", str(pred), "--device", device]) == 0
    capsys.readouterr()
    on_cpu = load_trained_model(best, "cpu")
    for path in sorted(images.iterdir()):
        image = np.asarray(Image.open(path).convert("RGB"))
        mask = np.asarray(Image.open(pred / "masks" / f"{path.stem}.png"))
        expected = predict_image(on_cpu, image)
        assert mask.shape == expected.shape
        if device == "cpu":
            np.testing.assert_array_equal(mask, expected)
        else:
            assert (mask != expected).mean() <= 0.01, path.name


@pytest.mark.cuda
@needs_cuda
def test_onnx_export_of_a_cuda_checkpoint(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    """``export`` of a checkpoint trained on CUDA (the CPU case is tests/test_cli.py's): written and checked in
    onnxruntime against PyTorch at two sizes."""
    pytest.importorskip("onnx", reason="needs the onnx extra: pip install -e '.[onnx]'")
    pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install -e '.[onnx]'")
    out, _ = runs.straight("cuda", "fp32")
    onnx_file = runs.root / "cuda.onnx"
    assert cli.main(["export", "--checkpoint", str(out / "best.pt"), "--out", str(onnx_file)]) == 0
    stdout = capsys.readouterr().out
    assert onnx_file.stat().st_size > 0 and stdout.count("max |difference|") == 2, stdout


# ---------------------------------------------------------------------------------- a process group of one
@pytest.mark.parametrize(
    ("device", "backend", "batchnorm"),
    [
        pytest.param("cpu", "gloo", "dist_batchnorm", marks=pytest.mark.dist, id="cpu-gloo"),
        pytest.param("cuda", "nccl", "sync_batchnorm", marks=(*ON_CUDA, pytest.mark.dist), id="cuda-nccl"),
    ],
)
def test_one_process_torchrun_run_with_synchronised_batchnorm(
    tmp_path: Path, data_root: str, device: str, backend: str, batchnorm: str
) -> None:
    """``torchrun --standalone --nproc_per_node=1`` through the distributed code path (the process group, DDP,
    synchronised BatchNorm, the trainer's collectives): the model holds synchronised BatchNorm modules only, and the
    run follows one without a group. Not bit for bit: the head normalises a plain ``nn.BatchNorm2d`` with its own
    row kernel and a synchronised one with PyTorch's (``models/head.py``), which round differently (~1e-7)."""
    ddp = tmp_path / "group"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd += [str(TESTS / "process_group_script.py"), str(ddp), data_root, device]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((ddp / "process_group.json").read_text())
    assert info["backend"] == backend and info["world_size"] == 1 and info["ddp"]
    assert info["parameters_on"].startswith(device)
    assert info[batchnorm] > 0 and info["batchnorm"] == 0  # every BatchNorm2d converted
    alone = tmp_path / "alone"
    fit(tiny_config(data_root, overrides=(f"train.device={device}",), iterations=4), alone)
    loss_group = [r["loss"] for r in train_records(ddp)]
    loss_alone = [r["loss"] for r in train_records(alone)]
    state_group = torch.load(ddp / "rank0.pt", map_location="cpu", weights_only=True)
    state_alone = load_checkpoint(alone / "last.pt")["model"]
    assert state_group.keys() == state_alone.keys()
    assert len(loss_group) == len(loss_alone) == 4
    np.testing.assert_allclose(loss_group, loss_alone, rtol=1e-3 if device == "cpu" else LOSS_RTOL["fp32"])


# --------------------------------------------------------------------------------------- no host synchronisation
def sync_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """``file:line: message`` of every synchronising CUDA call ``set_sync_debug_mode("warn")`` reported."""
    return [
        f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0]}"
        for w in caught
        if "synchronizing" in str(w.message)
    ]


@pytest.mark.cuda
@needs_cuda
def test_memory_update_on_cuda_never_syncs_and_equals_the_cpu_update() -> None:
    """The Semantic Memory update (the enqueue, with and without ring overflow, and the grouping + enqueue of the
    AllSpark block) under ``set_sync_debug_mode("error")``: any host synchronisation raises. Same state as on the
    CPU."""
    gen = torch.Generator().manual_seed(0)
    cpu = SemanticMemory(num_classes=3, length=4, grid=(2, 3))
    gpu = SemanticMemory(num_classes=3, length=4, grid=(2, 3)).cuda()
    gpu.load_state_dict(cpu.state_dict())
    rounds = [(torch.randn(2, 5, 6, generator=gen), torch.randint(0, 3, (2, 5), generator=gen)) for _ in range(3)]
    rounds += [(torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen))]  # > 4 per class
    on_gpu = [(maps.cuda(), classes.cuda()) for maps, classes in rounds]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for maps, classes in on_gpu:
            gpu.enqueue(maps, classes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for maps, classes in rounds:
        cpu.enqueue(maps, classes)
    for key, value in cpu.state_dict().items():
        assert torch.equal(gpu.state_dict()[key].cpu(), value), key

    model = tiny_model(num_classes=5, crop_size=64).train()
    block_cpu = model.allspark.attn
    block_gpu = tiny_model(num_classes=5, crop_size=64).allspark.attn.cuda()
    block_gpu.load_state_dict(block_cpu.state_dict())
    grid = block_cpu.memory.grid
    channels = block_cpu.memory.length
    z_u = torch.nn.functional.layer_norm(torch.randn(2, grid[0] * grid[1], channels, generator=gen), (channels,))
    guide = torch.randn(2, 5, 16, 16, generator=gen)
    z_gpu, guide_gpu = z_u.cuda(), guide.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        classes_gpu = block_gpu.update_memory(z_gpu, guide_gpu, grid)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    classes_cpu = block_cpu.update_memory(z_u, guide, grid)
    assert torch.equal(classes_gpu.cpu(), classes_cpu)
    assert torch.equal(block_gpu.memory.bank.cpu(), block_cpu.memory.bank)


@pytest.mark.cuda
@needs_cuda
def test_training_step_after_the_warm_up_never_waits_for_the_gpu(tmp_path: Path, data_root: str) -> None:
    """One ``Trainer.train_step`` (fp32) after three warm-up steps under ``set_sync_debug_mode("warn")``: every
    synchronising call is listed with its source line. Left out: loading the batches (done before) and
    ``_require_finite``, the step's one documented host read (whether the loss and gradients are finite)."""
    cfg = tiny_config(data_root, overrides=("train.device=cuda", "semi.warmup_iterations=1"), iterations=8)
    trainer = Trainer(cfg, tmp_path / "run", init_distributed("cuda"), None)
    it_l, it_u = trainer._run_iterators()
    batches = [(next(it_l), next(it_u)) for _ in range(4)]  # loaded and pinned outside the checked step
    for batch_l, batch_u in batches[:3]:  # memory written at 0, read from 1
        trainer.train_step(iter([batch_l]), iter([batch_u]))
    trainer._require_finite = lambda loss_sum, logs: None  # type: ignore[method-assign]
    batch_l, batch_u = batches[3]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = trainer.train_step(iter([batch_l]), iter([batch_u]))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert trainer.step == 4 and torch.isfinite(out.loss)
    syncs = sync_warnings(caught)
    assert not syncs, "host synchronisations in the training step:\n" + "\n".join(syncs)
