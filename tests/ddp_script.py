"""Run by ``torchrun`` (or alone) in test_distributed.py: train a tiny config and save this rank's final model state.

Usage: ``ddp_script.py OUT DATA_ROOT BATCH [--frozen-bn] [--zero-lr] [--float64] [override ...]``.

``--frozen-bn`` replaces every BatchNorm by one that always normalises with its running statistics (BatchNorm in
eval mode, affine parameters still trained): the restricted case in which gradient accumulation can equal several
processes exactly, since training-mode BatchNorm over a global batch cannot be computed one micro-batch at a time.
``--zero-lr`` sets every learning rate to 0 (the weights never move; losses and the Semantic Memory still evolve),
for layouts whose gradients are summed in another order (equal only up to float rounding).
``--float64`` trains in float64 (test-only, no config key): the model is cast before the synchronised BatchNorm and
DDP see it and a forward pre-hook casts its floating-point inputs (the data pipeline yields float32 images); the
engine's upcasts (``allspark_seg.utils.upcast``) keep float64. Layouts that do different
arithmetic (a batch of 4 against two of 2) are compared in float64, where rounding cannot flip a near-tie decision
(a ReLU's sign, a pseudo-label, the memory slot of a channel) as it can in float32 on some CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import allspark_seg.engine.train as train_module  # noqa: E402
from allspark_seg.dist import destroy, init_distributed  # noqa: E402
from allspark_seg.engine.train import Trainer  # noqa: E402
from train_utils import tiny_config  # noqa: E402


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed running statistics in every mode (not a BatchNorm2d: nothing synchronises it)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.eps = bn.eps
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean.clone())
        self.register_buffer("running_var", bn.running_var.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``model`` (in place) by :class:`FrozenBatchNorm2d`."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, FrozenBatchNorm2d(child))
        else:
            freeze_batchnorm(child)
    return model


def zero_lr(optimizer: torch.optim.Optimizer, *args: object) -> None:
    """Replaces ``set_lr``: every parameter group's learning rate is 0."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0


def to_float64(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook: floating-point tensor arguments cast to float64."""

    def cast(value: Any) -> Any:
        return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    return tuple(cast(a) for a in args), {key: cast(value) for key, value in kwargs.items()}


def in_float64(model: nn.Module) -> nn.Module:
    """``model`` cast to float64, with :func:`to_float64` on its inputs."""
    model = model.double()
    model.register_forward_pre_hook(to_float64, with_kwargs=True)
    return model


def main() -> None:
    out, root, batch, *overrides = sys.argv[1:]
    if "--frozen-bn" in overrides:
        overrides.remove("--frozen-bn")
        build = train_module.build_model_from_config
        train_module.build_model_from_config = lambda cfg: freeze_batchnorm(build(cfg))
    if "--zero-lr" in overrides:
        overrides.remove("--zero-lr")
        train_module.set_lr = zero_lr
    if "--float64" in overrides:
        overrides.remove("--float64")
        build_float32 = train_module.build_model_from_config
        train_module.build_model_from_config = lambda cfg: in_float64(build_float32(cfg))
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    cfg = tiny_config(root, overrides=tuple(overrides), iterations=4, batch_size=int(batch))
    trainer = Trainer(cfg, Path(out), env, None)
    trainer.run()
    torch.save(trainer.model.state_dict(), Path(out) / f"rank{env.rank}.pt")
    destroy()


if __name__ == "__main__":
    main()
