"""convert_sync_batchnorm on the CPU: each BatchNorm2d becomes a DistBatchNorm2d holding the same tensors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from allspark_seg.dist import DistBatchNorm2d, convert_sync_batchnorm


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_converted_batchnorm_keeps_the_tensors_dtype_and_mode_of_the_one_it_replaces(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.BatchNorm2d(4, eps=1e-3, momentum=0.3, affine=False)),
    ).to(dtype)
    bn, nested = model[1], model[3][0]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        nested.running_mean.normal_()
        nested.running_var.uniform_(0.5, 2.0)
    bn.bias.requires_grad_(False)
    nested.eval()  # e.g. a frozen BatchNorm: it must stay in eval mode
    reference = copy.deepcopy(model)
    before = tensors(model)

    assert convert_sync_batchnorm(model, torch.device("cpu")) is model

    new_bn, new_nested = model[1], model[3][0]
    assert isinstance(new_bn, DistBatchNorm2d) and isinstance(new_nested, DistBatchNorm2d)
    after = tensors(model)
    assert after.keys() == before.keys()
    assert all(after[name] is tensor for name, tensor in before.items())  # the same tensors, as nn.SyncBatchNorm's
    assert all(t.dtype == dtype for t in after.values() if t.is_floating_point())
    assert new_bn.training and not new_nested.training
    assert new_bn.weight.requires_grad and not new_bn.bias.requires_grad
    assert (new_nested.eps, new_nested.momentum, new_nested.affine) == (1e-3, 0.3, False)
    # Without a process group it is the BatchNorm it replaced: same output, same running statistics.
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    assert torch.equal(model(x), reference(x))
    for name, tensor in tensors(reference).items():
        assert torch.equal(after[name], tensor), name
