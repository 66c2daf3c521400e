"""Run by ``torchrun --standalone --nproc_per_node=1`` in test_cuda.py: a tiny training inside a process group of one.

Usage: ``process_group_script.py OUT DATA_ROOT DEVICE [override ...]`` with DEVICE ``cuda`` (NCCL, PyTorch's
``nn.SyncBatchNorm``) or ``cpu`` (gloo, :class:`~allspark_seg.dist.DistBatchNorm2d`).

With one process the trainer normally starts no process group and converts no BatchNorm (``DistEnv.distributed``
is ``world_size > 1``). This script starts the group itself and hands the trainer an environment that counts as
distributed, so the multi-process code path runs with one process: the BatchNorm conversion, DDP (its gradient
all-reduce over the backend), the trainer's all-reduces and barriers. With a world of one, SyncBatchNorm normalises
with the local batch (PyTorch falls back to ``F.batch_norm``), so the run follows a run without a group up to float
rounding.

Writes ``OUT/process_group.json`` (backend, world size, BatchNorm classes, DDP) and ``OUT/rank0.pt`` (final state).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from allspark_seg.dist import DistBatchNorm2d, DistEnv, destroy, init_distributed  # noqa: E402
from allspark_seg.engine.train import Trainer  # noqa: E402
from train_utils import tiny_config  # noqa: E402


@dataclass(frozen=True)
class OneProcessGroup(DistEnv):
    """A :class:`DistEnv` that takes the distributed code path with a process group of any size, one included."""

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def count(model: nn.Module, kind: type) -> int:
    """Modules of exactly class ``kind``."""
    return sum(type(m) is kind for m in model.modules())


def main() -> None:
    out, root, device, *overrides = sys.argv[1:]
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    base = init_distributed(device)  # reuses the group
    env = OneProcessGroup(base.rank, base.local_rank, base.world_size, base.device)
    cfg = tiny_config(root, overrides=(f"train.device={device}", *overrides), iterations=4)
    trainer = Trainer(cfg, Path(out), env, None)
    info = {
        "backend": dist.get_backend(),
        "world_size": dist.get_world_size(),
        "device": str(env.device),
        "parameters_on": str(next(trainer.model.parameters()).device),
        "sync_batchnorm": count(trainer.model, nn.SyncBatchNorm),
        "dist_batchnorm": count(trainer.model, DistBatchNorm2d),
        "batchnorm": count(trainer.model, nn.BatchNorm2d),
        "ddp": isinstance(trainer.net, nn.parallel.DistributedDataParallel),
    }
    trainer.run()
    torch.save(trainer.model.state_dict(), Path(out) / "rank0.pt")
    (Path(out) / "process_group.json").write_text(json.dumps(info))
    destroy()


if __name__ == "__main__":
    main()
