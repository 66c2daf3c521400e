"""Micro-steps as processes: what makes ``train.grad_accum: G`` on one process train as G processes do.

Micro-step ``k`` of process ``r`` is *virtual process* ``v = r * G + k``: it takes the global batch's chunk ``v``
(``data.loaders``), draws its dropout and drop-path masks from a generator seeded with ``(seed, step, v)``
(:func:`seed_micro_step`), and sees the Semantic Memory as ``model.allspark.memory_sync`` defines it across processes
(:class:`MicroStepMemory`). Gradients are averaged over micro-steps as DDP averages them over processes. So one
process with ``grad_accum: G`` reproduces G processes with ``grad_accum: 1`` exactly, except where the model computes
across the batch of all processes:

- **BatchNorm in training mode** normalises each micro-batch with its own statistics, where G processes normalise
  with the statistics of the whole global batch (synchronised BatchNorm). This cannot be matched one micro-batch at a
  time (micro-step 0 would need the statistics of micro-batches it has not computed yet, and BatchNorm's backward
  couples the gradients of the whole global batch); with BatchNorm in eval mode (fixed statistics) the runs are
  identical, as ``tests/test_distributed.py`` checks bit for bit.
- **``memory_sync=all_gather``, once the memory is read**: process ``k`` reads a memory holding the unlabeled
  channels of all G processes of the step, but micro-step ``k`` cannot see those of later micro-steps without another
  forward pass. Micro-steps enqueue in order, so after every step the memory holds what every process holds (the G
  micro-batches in order); micro-step ``k`` reads it with micro-batches ``0..k`` of the step (the last micro-step
  reads exactly what the processes read). During the warm-up (memory not read) the runs are identical. (With P
  processes and G micro-steps each, micro-step ``k`` enqueues the ``k``-th micro-batches of all processes, so the
  memory holds the channels of P * G processes in another order: virtual processes ``k, G + k, ...`` per micro-step.)
- ``memory_sync=rank0`` (the official behaviour, method doc Q9) is matched exactly: every micro-step starts from the
  memory the step started with (process ``k`` starts from rank 0's memory of the previous step), enqueues its own
  channels and reads them, and the step keeps micro-step 0's enqueues (rank 0's), dropping the others' as the
  official buffer broadcast drops those of ranks 1..G-1.

Random state: every micro-step reseeds the torch generators from ``(seed, step, v)``, so the masks of each process and
micro-step depend only on the iteration: a resumed run, multi-process or not, draws exactly the masks of an
uninterrupted one with no per-process generator state to save.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..models.memory import SemanticMemory

__all__ = ["DROPOUT_TAG", "MicroStepMemory", "gradients_finite", "micro_step_seed", "seed_micro_step"]

#: Constant mixed into the dropout seed so it never equals a data-order or augmentation key.
DROPOUT_TAG = 0xD20_9047


def micro_step_seed(seed: int, step: int, virtual_rank: int) -> int:
    """The 64-bit seed of the random draws of one micro-step: ``SeedSequence([seed, step, v, DROPOUT_TAG])``.

    Args:
        seed: ``train.seed``.
        step: Iteration (0-based, the optimiser steps done before this one).
        virtual_rank: ``rank * grad_accum + k`` for micro-step ``k`` of process ``rank``.
    """
    state = np.random.SeedSequence([int(seed), int(step), int(virtual_rank), DROPOUT_TAG]).generate_state(1, np.uint64)
    return int(state[0])


def seed_micro_step(seed: int, step: int, virtual_rank: int) -> None:
    """Seed the torch CPU and CUDA generators for one micro-step (host-side only, no device synchronisation)."""
    torch.manual_seed(micro_step_seed(seed, step, virtual_rank))


class MicroStepMemory:
    """``memory_sync`` applied to the micro-steps of one process as to processes (see the module docstring).

    Active only for ``rank0`` with more than one micro-step: :meth:`begin` before micro-step ``k`` restores the
    memory the step started with (for ``k >= 1``, after keeping micro-step 0's result), :meth:`end` after the last
    micro-step puts micro-step 0's result back. Under ``torchrun`` the step starts by broadcasting rank 0's memory
    explicitly, since DDP's own buffer broadcast runs inside the first forward, after the step's snapshot. Copies of
    the buffers on the device; no host synchronisation.

    Args:
        memory: The model's Semantic Memory (None: nothing to do).
        mode: ``model.allspark.memory_sync``.
        grad_accum: Micro-steps per optimiser step.
    """

    def __init__(self, memory: SemanticMemory | None, mode: str, grad_accum: int) -> None:
        self.memory = memory if mode == "rank0" and grad_accum > 1 else None
        self._start: dict[str, torch.Tensor] = {}
        self._kept: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        """True when micro-steps must not see each other's enqueues."""
        return self.memory is not None

    def _buffers(self) -> dict[str, torch.Tensor]:
        assert self.memory is not None
        return dict(self.memory.named_buffers())

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: buf.clone() for name, buf in self._buffers().items()}

    def _restore(self, saved: dict[str, torch.Tensor]) -> None:
        for name, buf in self._buffers().items():
            buf.copy_(saved[name])

    @torch.no_grad()
    def begin(self, k: int) -> None:
        """Call before micro-step ``k`` (0-based)."""
        if self.memory is None:
            return
        if k == 0:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for buf in self._buffers().values():
                    dist.broadcast(buf, src=0)
            self._start = self._snapshot()
            return
        if k == 1:
            self._kept = self._snapshot()
        self._restore(self._start)

    @torch.no_grad()
    def end(self) -> None:
        """Call after the last micro-step: the memory keeps micro-step 0's enqueues."""
        if self.memory is None:
            return
        self._restore(self._kept)
        self._start, self._kept = {}, {}


def gradients_finite(params: list[torch.Tensor]) -> torch.Tensor:
    """0-dim bool on the device: every gradient of ``params`` is finite (largest absolute value, fused per device)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    total = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total is not None:
        return torch.isfinite(total(grads, norm_type=float("inf")))
    return torch.stack([g.detach().abs().amax().float() for g in grads]).isfinite().all()
