"""Parameter groups, optimisers and the per-iteration poly learning-rate schedule.

The official recipe (method doc 1.11): SGD, momentum 0.9, weight decay 1e-4 on every parameter, no Nesterov;
two groups, the encoder at ``lr`` and everything else (AllSpark block, head) at ``lr * lr_multi``; poly decay
``lr_t = lr * (1 - t / T) ** 0.9`` set *after* each optimiser step, so step t runs with ``lr_{t-1}``
(:func:`lr_for_step` with ``faithful_lag=True``).

Usage in a training loop, before each optimiser step ``t`` (0-based)::

    set_lr(optimizer, t, total_steps, base_lr)
    optimizer.step()
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from allspark_seg.errors import ConfigError

__all__ = ["OPTIMIZERS", "build_optimizer", "lr_for_step", "param_groups", "poly_lr", "set_lr"]

OPTIMIZERS = ("sgd", "adamw")


def param_groups(
    model: nn.Module, lr: float, lr_multi: float, encoder_attr: str = "encoder", weight_decay: float | None = None
) -> list[dict]:
    """Split the parameters into an encoder group and a group for everything else.

    Membership is by module identity: the parameters of ``getattr(model, encoder_attr)`` form the first group, all
    other parameters of ``model`` the second (a parameter shared by both stays in the encoder group). A
    ``DistributedDataParallel`` wrapper is looked through. Every parameter is included, frozen ones too, as in the
    official code.

    Args:
        model: the segmentor.
        lr: encoder learning rate.
        lr_multi: multiplier of ``lr`` for the other parameters.
        encoder_attr: attribute name of the encoder sub-module.
        weight_decay: per-group weight decay; None leaves it to the optimiser's default.

    Returns:
        ``[encoder_group, rest_group]``; each dict has ``params``, ``name`` (``"encoder"``/``"decoder"``), ``lr``,
        ``initial_lr`` and ``lr_mult`` (1.0 and ``lr_multi``), and ``weight_decay`` when given.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    encoder = getattr(model, encoder_attr, None)
    if not isinstance(encoder, nn.Module):
        raise ConfigError(f"the model has no sub-module named {encoder_attr!r} to put in the encoder parameter group.")
    if lr <= 0 or lr_multi <= 0:
        raise ConfigError(f"lr and lr_multi must be positive, got lr={lr} and lr_multi={lr_multi}.")
    enc_params = list(encoder.parameters())
    enc_ids = {id(p) for p in enc_params}
    rest_params = [p for p in model.parameters() if id(p) not in enc_ids]
    groups = []
    for name, params, mult in (("encoder", enc_params, 1.0), ("decoder", rest_params, float(lr_multi))):
        group = {"params": params, "name": name, "lr": lr * mult, "initial_lr": lr * mult, "lr_mult": mult}
        if weight_decay is not None:
            group["weight_decay"] = float(weight_decay)
        groups.append(group)
    return groups


def build_optimizer(
    name: str,
    groups: Iterable[dict] | Iterable[nn.Parameter],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """Build the optimiser.

    Args:
        name: ``"sgd"`` (momentum, no Nesterov, as the paper) or ``"adamw"``.
        groups: parameter groups (e.g. from :func:`param_groups`) or plain parameters.
        lr: default learning rate for groups without one.
        momentum: SGD momentum.
        weight_decay: default weight decay (applied to every parameter, as the official recipe).
        betas: AdamW betas.

    Returns:
        The optimiser.
    """
    if lr <= 0:
        raise ConfigError(f"the learning rate must be positive, got {lr}.")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be non-negative, got {weight_decay}.")
    groups = list(groups)
    if name == "sgd":
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"SGD momentum must be in [0, 1), got {momentum}.")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)
    if name == "adamw":
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"AdamW betas must be in [0, 1), got {tuple(betas)}.")
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; valid optimizers are {', '.join(repr(n) for n in OPTIMIZERS)}.")


def poly_lr(step: int, total_steps: int, base_lr: float, power: float = 0.9) -> float:
    """Poly decay ``base_lr * (1 - step / total_steps) ** power``.

    Args:
        step: iteration, clamped to ``[0, total_steps]``.
        total_steps: T > 0.
        base_lr: learning rate at step 0.
        power: decay exponent.

    Returns:
        The learning rate (0 at ``step >= total_steps``).
    """
    if total_steps <= 0:
        raise ConfigError(f"the total number of iterations must be positive, got {total_steps}.")
    step = min(max(int(step), 0), int(total_steps))
    return base_lr * math.pow(1.0 - step / total_steps, power)


def lr_for_step(t: int, total_steps: int, base_lr: float, power: float = 0.9, faithful_lag: bool = True) -> float:
    """Learning rate used by optimiser step ``t`` (0-based).

    Args:
        t: optimiser step.
        total_steps: T.
        base_lr: initial learning rate.
        power: poly exponent.
        faithful_lag: the official scripts set the lr after each step from that step's index, so step t uses
            ``poly_lr(t - 1)`` (and step 0 the base lr); False uses ``poly_lr(t)``.

    Returns:
        The learning rate of the encoder group (multiply by a group's ``lr_mult`` for the others).
    """
    return poly_lr(max(t - 1, 0) if faithful_lag else t, total_steps, base_lr, power)


def set_lr(
    optimizer: torch.optim.Optimizer,
    step: int,
    total_steps: int,
    base_lr: float,
    power: float = 0.9,
    faithful_lag: bool = True,
) -> float:
    """Set every group's lr for optimiser step ``step``; call it just before ``optimizer.step()``.

    Args:
        optimizer: optimiser whose groups carry ``lr_mult`` (1.0 when absent).
        step: 0-based optimiser step about to run.
        total_steps: T.
        base_lr: initial encoder learning rate.
        power: poly exponent.
        faithful_lag: see :func:`lr_for_step`.

    Returns:
        The base value set (the encoder group's lr).
    """
    value = lr_for_step(step, total_steps, base_lr, power, faithful_lag)
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_mult", 1.0)
    return value
