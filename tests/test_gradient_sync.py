"""Gradient accumulation under DDP: the micro-steps before the last skip the all-reduce, also through torch.compile."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from allspark_seg.dist import find_ddp, gradient_sync


@pytest.fixture
def ddp(tmp_path: Path) -> Iterator[nn.parallel.DistributedDataParallel]:
    """A one-process gloo DDP model whose communication hook counts the all-reduces."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(nn.Linear(4, 3))
        model.calls = 0  # type: ignore[attr-defined]

        def counting(state, bucket):  # no annotations: DDP checks them against the real classes
            model.calls += 1  # type: ignore[attr-defined]
            future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        model.register_comm_hook(None, counting)
        yield model
    finally:
        dist.destroy_process_group()


def backward_in(context_model: nn.Module, ddp: nn.parallel.DistributedDataParallel, sync: bool) -> int:
    """All-reduces of one backward through ``ddp`` inside the context chosen for ``context_model``."""
    before = ddp.calls  # type: ignore[attr-defined]
    with gradient_sync(context_model, sync=sync):
        ddp(torch.randn(2, 4)).sum().backward()
    return ddp.calls - before  # type: ignore[attr-defined]


def test_compiled_ddp_skips_the_all_reduce_before_the_last_micro_step(ddp) -> None:
    compiled = torch.compile(ddp)  # compiles lazily: never called here
    assert not isinstance(compiled, nn.parallel.DistributedDataParallel)
    assert find_ddp(compiled) is ddp and find_ddp(ddp) is ddp and find_ddp(nn.Linear(1, 1)) is None
    for wrapper in (ddp, compiled):
        assert backward_in(wrapper, ddp, sync=False) == 0
        assert backward_in(wrapper, ddp, sync=True) == 1


def test_without_ddp_the_context_is_empty() -> None:
    model = nn.Linear(4, 3)
    for sync in (False, True):
        with gradient_sync(torch.compile(model), sync=sync):
            model(torch.randn(2, 4)).sum().backward()
    assert model.weight.grad is not None
