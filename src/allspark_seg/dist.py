"""Processes and devices: the torchrun environment, the process group, synchronised BatchNorm.

One code path serves one process and many: without ``torchrun`` the world size is 1 and no process group exists.
Only this module and the CLI read environment variables.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError

__all__ = [
    "DistBatchNorm2d",
    "DistEnv",
    "HALF_PRECISION_FLAGS",
    "convert_sync_batchnorm",
    "cpu_flags",
    "destroy",
    "find_ddp",
    "gradient_sync",
    "init_distributed",
    "slow_precision_warning",
    "unwrap",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs.

    Attributes:
        rank: Global rank.
        local_rank: Rank on this machine.
        world_size: Number of processes.
        device: The device this process computes on.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is in use."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"Environment variable {name}={value!r} is not an integer.") from None


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda`` -> the device of this process."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available: use train.device=cpu or auto.")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: str = "auto") -> DistEnv:
    """Read the torchrun environment and start the process group when there are several processes.

    The backend is NCCL on CUDA and gloo on the CPU. Calling it when a group already exists reuses it.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        log.info("process group: rank %d of %d on %s (%s)", rank, world, dev, dist.get_backend())
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def destroy() -> None:
    """Tear the process group down (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


#: CPU flags (Linux ``/proc/cpuinfo``; x86 and Arm spellings) of the instructions that make a precision fast on a CPU.
HALF_PRECISION_FLAGS: dict[str, tuple[str, ...]] = {
    "bf16": ("avx512_bf16", "amx_bf16", "bf16"),
    "fp16": ("avx512_fp16", "amx_fp16", "fphp"),
}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags (None where ``cpuinfo`` cannot be read, e.g. not on Linux)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def slow_precision_warning(precision: str, device: torch.device, flags: frozenset[str] | None) -> str | None:
    """The warning for ``train.precision`` bf16 or fp16 on a CPU without instructions for it (None when fine).

    Without them (an AVX2-only AMD EPYC, say) PyTorch emulates the type: an iteration takes several times the fp32
    one (8x measured for MiT-B0 at crop 257 with bf16), so fp32 is the faster choice. Unknown flags give no warning.
    """
    if device.type != "cpu" or precision not in HALF_PRECISION_FLAGS or flags is None:
        return None
    wanted = HALF_PRECISION_FLAGS[precision]
    if flags & set(wanted):
        return None
    return (
        f"train.precision={precision} on a CPU without {precision} instructions ({' / '.join(wanted[:2])}): "
        f"PyTorch emulates it and an iteration takes several times the fp32 one; train.precision=fp32 is faster here."
    )


def find_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel wrapper in ``model``, looking through ``torch.compile`` wrappers (None if none)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        if not hasattr(model, "_orig_mod"):
            return None
        model = model._orig_mod


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """The context of one micro-step's forward and backward: DDP's ``no_sync()`` unless ``sync``.

    Found through ``torch.compile`` (an ``isinstance`` test on the compiled wrapper is false, and every micro-step
    would all-reduce); a model without DDP always gets a null context.
    """
    ddp = None if sync else find_ddp(model)
    return contextlib.nullcontext() if ddp is None else ddp.no_sync()


class _SyncBatchNormFunction(torch.autograd.Function):
    """BatchNorm over the batches of all processes: statistics and their gradients are all-reduced (any backend)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        eps: float,
        momentum: float,
    ) -> torch.Tensor:
        channels = x.shape[1]
        dims = [0, *range(2, x.ndim)]
        count = torch.tensor([x.numel() // channels], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), x.square().sum(dims), count])
        dist.all_reduce(stats)
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean.square()).clamp_min(0)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * total / (total - 1).clamp_min(1), alpha=momentum)
        shape = (1, channels) + (1,) * (x.ndim - 2)
        invstd = torch.rsqrt(var + eps)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd, total)
        return xhat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xhat, weight, invstd, total = ctx.saved_tensors
        channels = xhat.shape[1]
        dims = [0, *range(2, xhat.ndim)]
        shape = (1, channels) + (1,) * (xhat.ndim - 2)
        local = torch.cat([dy.sum(dims), (dy * xhat).sum(dims)])
        grad_bias, grad_weight = local[:channels].clone(), local[channels:].clone()
        dist.all_reduce(local)
        mean_dy = (local[:channels] / total).view(shape)
        mean_dy_xhat = (local[channels:] / total).view(shape)
        dx = (dy - mean_dy - xhat * mean_dy_xhat) * (weight * invstd).view(shape)
        return dx, grad_weight, grad_bias, None, None, None, None


class DistBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batches of every process, on any backend (gloo too).

    PyTorch's ``nn.SyncBatchNorm`` runs on CUDA only; this one lets CPU multi-process training normalise over the
    global batch, so it matches one process with the same global batch. In eval mode, or without a process group,
    it is a plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        assert self.affine and self.track_running_stats and self.momentum is not None
        self.num_batches_tracked.add_(1)
        return _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.momentum
        )


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Synchronise every BatchNorm across processes: ``nn.SyncBatchNorm`` on CUDA, :class:`DistBatchNorm2d` else.

    As ``nn.SyncBatchNorm.convert_sync_batchnorm`` does, each converted module takes over the parameters and buffers
    of the one it replaces (the same tensors: dtype, device and ``requires_grad`` kept, a float64 model stays float64)
    and its train/eval mode.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, DistBatchNorm2d):
            setattr(model, name, _dist_batchnorm_like(child))
        else:
            convert_sync_batchnorm(child, device)
    return model


def _dist_batchnorm_like(bn: nn.BatchNorm2d) -> DistBatchNorm2d:
    """A :class:`DistBatchNorm2d` holding ``bn``'s own parameters and buffers, in ``bn``'s mode."""
    tensors = [t for t in (*bn.parameters(recurse=False), *bn.buffers(recurse=False)) if t.is_floating_point()]
    factory = {"device": tensors[0].device, "dtype": tensors[0].dtype} if tensors else {}
    new = DistBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **factory)
    for key, value in (*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)):
        setattr(new, key, value)
    new.train(bn.training)
    return new
