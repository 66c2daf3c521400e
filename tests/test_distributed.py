"""Two gloo processes on the CPU against one process with the same global batch."""

from __future__ import annotations

import json
import os
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

pytestmark = pytest.mark.dist


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


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, data_root):
    seconds = run(tmp_path / "ddp", data_root, 2, 2, *EXACT)
    run(tmp_path / "single", data_root, 4, 1, *EXACT)
    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert len(ddp) == len(single) == 4
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=1e-4, atol=1e-5)
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    alone = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    # The memory copies are identical (every process enqueued the channels of both) and equal to one process's.
    for key in ("allspark.attn.memory.bank", "allspark.attn.memory.ptr", "allspark.attn.memory.filled"):
        assert torch.equal(rank0[key], rank1[key]), key
    assert torch.equal(rank0["allspark.attn.memory.ptr"], alone["allspark.attn.memory.ptr"])
    torch.testing.assert_close(
        rank0["allspark.attn.memory.bank"], alone["allspark.attn.memory.bank"], rtol=1e-3, atol=1e-4
    )
    for key, value in alone.items():
        if value.is_floating_point():
            torch.testing.assert_close(rank0[key], value, rtol=1e-3, atol=1e-4, msg=key)
    print(f"\n2-process DDP run: {seconds:.1f} s wall")


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
