"""Two gloo processes on the CPU against one process with the same global batch, with or without accumulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from allspark_seg.data import generate_synthetic

SCRIPT = Path(__file__).parent / "ddp_script.py"
# Equal results need: no dropout (random streams differ per process), per-image teacher predictions (the official
# teacher couples the images of a process's batch), the memory read from the first step (in-batch keys are local to
# a process), and BatchNorm over the global batch (our gloo-capable synchronised BatchNorm).
EXACT = (
    "model.drop_path=0.0",
    "model.head_dropout=0.0",
    "model.allspark.attn_dropout=0.0",
    "semi.per_image_teacher=true",
    "semi.warmup_iterations=0",
)

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # several processes each


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_data")
    generate_synthetic(root, seed=0, num_labeled=8, num_unlabeled=16, num_val=4, image_size=96)
    return str(root)


def run(out: Path, data_root: str, batch: int, procs: int, *overrides: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(out), data_root, str(batch), *overrides]
    if procs == 1:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
        cmd += [str(SCRIPT), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.perf_counter() - start


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


# One process with a batch of 4 and two processes with batches of 2 do different arithmetic (convolutions batched
# otherwise, BatchNorm statistics summed per process then all-reduced), so they are compared in float64 (--float64):
# in float32 their rounding differs by ~1e-7 and a near-tie decision (a ReLU's sign, a pseudo-label's argmax, the
# channel grouping that picks a memory slot) could then go either way on some CPU, failing the test by chance.
# Measured float64 agreement after 4 steps: 8e-15 of a tensor's largest value at worst (BatchNorm and LayerNorm
# biases), 3e-16 on the logged losses. The bound 1e-10 leaves a factor 1e4 for other CPUs' kernels; what is not
# rounding is far above it (BatchNorm over each process's batch only: 5e-3 on the median tensor, the memory pointer
# differs).
RTOL64 = 1e-10
# The query of attention blocks 1-3 meets a single key at crop 48 (its 12x12, 6x6, 3x3 map reduced by 8, 4, 2): the
# softmax over one key is 1 whatever the query, so the query bias (initialised to 0) has an exact gradient of 0 and
# holds float64 noise (~1e-23). It is checked against the scale of its weight, the values its noise comes from.
NOISE_ONLY = {f"encoder.block{i}.0.attn.q.bias": f"encoder.block{i}.0.attn.q.weight" for i in (1, 2, 3)}


def train_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, data_root):
    seconds = run(tmp_path / "ddp", data_root, 2, 2, "--float64", *EXACT)
    run(tmp_path / "single", data_root, 4, 1, "--float64", *EXACT)
    ddp, single = train_records(tmp_path / "ddp"), train_records(tmp_path / "single")
    assert len(ddp) == len(single) == 4
    worst = {}  # largest difference of each logged loss or state tensor, relative to its largest value
    for key in ("loss", "loss_x", "loss_u"):  # logged in float64 (the mean of the processes' losses)
        a = torch.tensor([r[key] for r in ddp], dtype=torch.float64)
        b = torch.tensor([r[key] for r in single], dtype=torch.float64)
        assert not torch.equal(b, b.float().double()), f"{key} was not logged in float64"
        worst[key] = float(((a - b).abs() / b.abs()).max())
        assert worst[key] <= RTOL64, (key, a, b)
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    alone = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    assert rank0.keys() == alone.keys()
    assert all(v.dtype == torch.float64 for v in alone.values() if v.is_floating_point())  # the run was float64
    # The memory copies are identical (every process enqueued the channels of both) and equal to one process's.
    for key in ("allspark.attn.memory.bank", "allspark.attn.memory.ptr", "allspark.attn.memory.filled"):
        assert torch.equal(rank0[key], rank1[key]), key
    assert torch.equal(rank0["allspark.attn.memory.ptr"], alone["allspark.attn.memory.ptr"])
    for key, value in alone.items():
        if not value.is_floating_point():  # memory pointer and fill flags, BatchNorm step counts
            assert torch.equal(rank0[key], value), key
            continue
        scale = float(alone[NOISE_ONLY.get(key, key)].abs().max())
        worst[key] = float((rank0[key] - value).abs().max()) / scale
        assert worst[key] <= RTOL64, (key, worst[key])
    assert float(alone["allspark.attn.memory.bank"].abs().max()) > 0  # the memory was written
    top = ", ".join(f"{key} {error:.1e}" for key, error in sorted(worst.items(), key=lambda kv: -kv[1])[:3])
    print(f"\n2-process DDP run: {seconds:.1f} s wall; largest float64 differences (relative): {top}")


def test_faithful_rank0_memory_option(tmp_path, data_root):
    """``memory_sync=rank0`` restores the official behaviour: rank 0's buffers are broadcast before every forward,
    so each process only ever adds its own last batch to rank 0's memory and the copies differ."""
    run(tmp_path / "rank0", data_root, 2, 2, "model.allspark.memory_sync=rank0")
    rank0 = torch.load(tmp_path / "rank0" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank0" / "rank1.pt", weights_only=True)
    differing = (rank0["allspark.attn.memory.bank"] != rank1["allspark.attn.memory.bank"]).any(dim=-1)
    # Only the slots each process wrote in its last step differ (2 images x 64 channels per process); without the
    # broadcast the two memories would hold different channels everywhere after 4 steps.
    assert 0 < int(differing.sum()) <= 2 * 2 * 64


def model_state(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / f"rank{rank}.pt", weights_only=True)


def assert_same_training(a: Path, b: Path) -> None:
    """Bit-identical logged losses, final weights, Semantic Memory and optimiser state of two runs (rank 0)."""
    assert losses(a) == losses(b)
    state_a, state_b = model_state(a), model_state(b)
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        assert torch.equal(value, state_b[key]), key
    opt_a = torch.load(a / "last.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(b / "last.pt", weights_only=True)["optimizer"]["state"]
    for key, value in opt_a.items():
        assert torch.equal(value["momentum_buffer"], opt_b[key]["momentum_buffer"]), key


# One process with train.grad_accum=G plays G processes: micro-step k of a step is process k (same samples, the
# dropout and drop-path masks of process k, the official batch-coupled teacher on the same 2 images, the Semantic
# Memory as model.allspark.memory_sync defines it across processes). Training-mode BatchNorm cannot match (the
# global batch's statistics are not known one micro-batch at a time), so these runs freeze it (--frozen-bn).


@pytest.mark.parametrize("method", ["allspark", "fixmatch", "unimatch", "allspark+"])
def test_accumulation_equals_processes_with_the_official_rank0_memory(tmp_path, data_root, method):
    """``memory_sync=rank0``, the memory read from the first step, dropout on: bit-identical to 2 processes.

    Every micro-step starts from the memory the step started with (process k starts from rank 0's memory), adds its
    own unlabeled channels and reads them; the step keeps micro-step 0's additions (rank 0's), as DDP's broadcast
    keeps rank 0's memory. The weak-to-strong methods add each micro-step's strong-view augmentations and CutMix
    boxes, the feature-perturbation dropout (unimatch), per-class thresholds and the EMA teacher (allspark+): each
    micro-step must draw what its process draws, and the EMA must follow the same weights.
    """
    common = (f"method={method}", "--frozen-bn", "model.allspark.memory_sync=rank0", "semi.warmup_iterations=0")
    if method != "allspark":  # an untrained model is unsure of everything: a threshold of 0.95 would keep nothing
        common += ("semi.conf_thresh=0.3",)
    run(tmp_path / "ddp", data_root, 2, 2, *common)
    run(tmp_path / "accum", data_root, 2, 1, *common, "train.grad_accum=2")
    assert_same_training(tmp_path / "ddp", tmp_path / "accum")
    rows = [json.loads(line) for line in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    assert all(r["memory_read"] for r in train) if method.startswith("allspark") else "memory_read" not in train[0]
    assert all(r["loss_u"] > 0 for r in train)  # the unlabeled loss is trained on (not everything thresholded away)
    if method == "allspark+":  # the EMA teachers are the same too
        ema = [torch.load(tmp_path / name / "last.pt", weights_only=True)["ema"] for name in ("ddp", "accum")]
        assert ema[0].keys() == ema[1].keys() and all(torch.equal(v, ema[1][k]) for k, v in ema[0].items())


@pytest.mark.slow
def test_processes_with_accumulation_equal_one_process_with_more_micro_steps(tmp_path, data_root):
    """2 processes x 2 micro-steps play 1 process x 4 (virtual process ``r * 2 + k``), rank0 memory read.

    The two layouts sum the 4 micro-batch gradients in different orders (float rounding), so the weights are kept
    still (``--zero-lr``) while the memory evolves: rank 1's micro-steps must start from rank 0's memory of the
    previous step (broadcast before the step), or its losses would differ by far more than rounding.
    """
    common = ("--frozen-bn", "--zero-lr", "model.allspark.memory_sync=rank0", "semi.warmup_iterations=0")
    run(tmp_path / "ddp", data_root, 2, 2, *common, "train.grad_accum=2")
    run(tmp_path / "accum", data_root, 2, 1, *common, "train.grad_accum=4")
    ddp, accum = torch.tensor(losses(tmp_path / "ddp")), torch.tensor(losses(tmp_path / "accum"))
    # Each is a float32 sum of the same 4 positive losses / 4, in another order: within 3 eps of the exact mean.
    assert ((ddp - accum).abs() <= 6 * torch.finfo(torch.float32).eps * accum).all(), (ddp, accum)
    assert len(set(accum.tolist())) == len(accum)  # the memory moved the losses
    state_ddp, state_accum = model_state(tmp_path / "ddp"), model_state(tmp_path / "accum")
    for key, value in state_accum.items():
        assert torch.equal(value, state_ddp[key]), key


def test_accumulation_equals_processes_with_the_gathered_memory_during_the_warmup(tmp_path, data_root):
    """``memory_sync=all_gather`` (default), dropout on: bit-identical to 2 processes while the memory is not read.

    The memory after every step holds the micro-batches of all micro-steps in order, as every process holds the
    all-gathered batches of all processes. (Once it is read, micro-step k reads it with micro-batches 0..k of the
    step where the processes read it with all of them: documented, not equal.)
    """
    common = ("--frozen-bn", "semi.warmup_iterations=100")
    run(tmp_path / "ddp", data_root, 2, 2, *common)
    run(tmp_path / "accum", data_root, 2, 1, *common, "train.grad_accum=2")
    assert_same_training(tmp_path / "ddp", tmp_path / "accum")
    assert int(model_state(tmp_path / "accum")["allspark.attn.memory.filled"].sum()) > 0


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow
def test_two_process_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, data_root):
    """Dropout on, so each process's own masks matter: SIGKILL both processes after a checkpoint, run again."""
    args = ("model.allspark.memory_sync=rank0", "semi.warmup_iterations=3", "train.iterations=16")
    args += ("train.checkpoint_every=2", "train.log_every=100")
    run(tmp_path / "straight", data_root, 2, 2, *args)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    cmd += [str(out), data_root, "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    workers = children(proc.pid)  # torchrun starts each worker in a session of its own
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
    assert len(workers) == 2
    killed_at = torch.load(out / "last.pt", weights_only=True)["step"]
    assert 2 <= killed_at < 16, "the run should have been killed mid-way"
    run(out, data_root, 2, 2, *args)
    for rank in (0, 1):  # rank 1's memory differs from rank 0's (rank0 sync): both must be reproduced
        straight, resumed = model_state(tmp_path / "straight", rank), model_state(out, rank)
        for key, value in straight.items():
            assert torch.equal(value, resumed[key]), (rank, key)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 16
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"]), key
