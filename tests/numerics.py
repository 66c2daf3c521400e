"""Float32 comparisons that hold on every CPU: each implementation against a float64 run of the reference.

Two float32 implementations of the same mathematics round differently (summation order, fused kernels, avx512_bf16
or AMX paths), so an element-wise bound between them is a tolerance tuned on one machine. Worse, where the computation
makes a decision (a ReLU's sign, an argmax), an input within rounding error of the tie can go either way: one element
then passes its gradient in one implementation and not in the other, and the two gradients differ by ~1e-3 however
precise both are (one ReLU input of 3e5 is ~1/sqrt(3e5) of the gradient's norm: no norm-wise bound absorbs it). The
scheme used by the numerical tests:

- float64: implementations are compared directly and tightly (rounding ~1e-16; such near-ties are not met);
- float32: each implementation is compared with a float64 run of the reference, norm-wise per tensor::

      ||ours32 - ref64|| / ||ref64||  <=  FACTOR * ||lit32 - ref64|| / ||ref64||  +  FLOOR_ULPS * eps(float32)

  where ``lit32`` is the reference code itself run in float32: the bound is the reference's own float32 error on
  this machine, not a constant. In a group of tensors (every gradient), those of a few elements are checked pooled
  (:func:`check32_group`): the error norm of one of them is too poor a statistic;
- decisions are checked on their own (:func:`check_decisions`): a float32 decision may differ from float64's only
  where the float64 margin is within ``FACTOR`` x the reference's float32 error of the compared values. Gradients
  are then compared with a float64 twin of the reference that makes the same decisions as the float32 run under
  test (:func:`relu_inputs` with ``force``, given pseudo-labels), so a legitimate flip is not counted as an error
  and an error is not hidden by one. Our ReLU's decisions are read by :func:`our_relu_inputs`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass, replace

import torch
from torch import nn

import allspark_seg.models.head as head_module

FACTOR = 4.0  # how much larger than the reference's own float32 error ours may be
FLOOR_ULPS = 8  # plus 8 float32 ulps (~1e-6) relative, for tensors on which the reference happens to be exact
SMALL = 64  # tensors of fewer elements are checked pooled (see check32_group)


def floor(dtype: torch.dtype, ulps: float = FLOOR_ULPS) -> float:
    """The absolute part of the bound: ``ulps`` ulps of ``dtype`` (relative to the tensor's norm)."""
    return ulps * torch.finfo(dtype).eps


def _pair(x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both detached, in float64, of one shape."""
    x, ref = x.detach().double(), ref.detach().double()
    assert x.shape == ref.shape, (tuple(x.shape), tuple(ref.shape))
    return x, ref


def rel_norm(x: torch.Tensor, ref: torch.Tensor, scale: float | None = None) -> float:
    """Norm-wise relative error ``||x - ref||_2 / ||ref||_2`` (or ``/ scale``), computed in float64."""
    x, ref = _pair(x, ref)
    denom = float(ref.norm()) if scale is None else scale
    return float((x - ref).norm()) / max(denom, 1e-300)


def rel_max(x: torch.Tensor, ref: torch.Tensor, scale: float | None = None) -> float:
    """Worst element ``max |x - ref| / max |ref|`` (or ``/ scale``), computed in float64."""
    x, ref = _pair(x, ref)
    denom = float(ref.abs().max()) if scale is None else scale
    return float((x - ref).abs().max()) / max(denom, 1e-300)


@dataclass(frozen=True)
class Errors:
    """Errors against float64, norm-wise and worst element, of ours and of the reference code in the same precision,
    and ``used``: ours as a share of its bound (below 1 passes). Several tensors: the field-wise maximum."""

    ours: float
    ours_worst: float
    literal: float
    literal_worst: float
    used: float

    def __or__(self, other: Errors) -> Errors:
        return Errors(*(max(a, b) for a, b in zip(astuple(self), astuple(other), strict=True)))


def _assert_within(what: str, errors: Errors, dtype: torch.dtype, floor_ulps: float) -> Errors:
    """Assert ``ours <= FACTOR * literal + floor``; returns the errors with ``used`` set."""
    bound = FACTOR * errors.literal + floor(dtype, floor_ulps)
    errors = replace(errors, used=errors.ours / bound)
    assert errors.ours <= bound, (
        f"{what}: ours is {errors.ours:.2e} from float64 (norm-wise), more than {FACTOR:g} x the reference's own "
        f"{torch.finfo(dtype).bits}-bit error {errors.literal:.2e} + {floor(dtype, floor_ulps):.1e}"
    )
    return errors


def _record(table: dict[str, Errors | tuple[int, int]] | None, what: str, errors: Errors) -> None:
    """Keep the field-wise maximum per ``what``."""
    if table is not None:
        old = table.get(what)
        table[what] = old | errors if isinstance(old, Errors) else errors


def check32(
    what: str,
    ours: torch.Tensor,
    literal: torch.Tensor,
    ref64: torch.Tensor,
    literal_ref64: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    floor_ulps: float = FLOOR_ULPS,
    table: dict[str, Errors | tuple[int, int]] | None = None,
) -> Errors:
    """Assert ``ours`` (low precision) is as close to float64 as the reference code run in the same precision.

    Args:
        what: Name of the tensor, for the message and the table.
        ours: Our implementation's tensor (float32, or another low precision).
        literal: The reference code's tensor in the same precision.
        ref64: The reference code's tensor in float64 (with ``ours``'s decisions, see the module docstring).
        literal_ref64: The float64 reference for ``literal`` when it differs (a twin with the literal's decisions).
        scale: Divide by this instead of ``||ref64||`` (tensors whose exact value is 0, e.g. a bias before a
            training-mode batch norm: their float32 values are rounding noise of the surrounding computation).
        floor_ulps: The floor of the bound in ulps of ``ours.dtype``.
        table: Where to record the errors (the field-wise maximum per ``what``).

    Returns:
        The measured errors; raises ``AssertionError`` when ours exceeds ``FACTOR`` x the literal's + the floor.
    """
    assert ours.dtype == literal.dtype and ref64.dtype == torch.float64, (ours.dtype, literal.dtype, ref64.dtype)
    lit_ref = ref64 if literal_ref64 is None else literal_ref64
    errors = Errors(
        rel_norm(ours, ref64, scale), rel_max(ours, ref64, scale), rel_norm(literal, lit_ref, scale),
        rel_max(literal, lit_ref, scale), 0.0,
    )  # fmt: skip
    errors = _assert_within(what, errors, ours.dtype, floor_ulps)
    _record(table, what, errors)
    return errors


def check32_group(
    what: str,
    ours: Sequence[torch.Tensor],
    literal: Sequence[torch.Tensor],
    ref64: Sequence[torch.Tensor],
    literal_ref64: Sequence[torch.Tensor] | None = None,
    *,
    names: Sequence[str] | None = None,
    scale: float | None = None,
    table: dict[str, Errors | tuple[int, int]] | None = None,
) -> None:
    """:func:`check32` for each tensor of a group of one kind (every parameter's gradient, the state).

    The error norm of a tensor of a few elements is the sum of a few rounding errors, a poor statistic: on an
    8-element bias gradient the reference's error can be 4x below its usual value by chance. Tensors under
    ``SMALL`` elements are therefore checked together: the root mean square of their relative errors.
    """
    lit_refs = ref64 if literal_ref64 is None else literal_ref64
    names = names if names is not None else [f"#{i}" for i in range(len(ours))]
    pooled: list[tuple[float, float, float, float]] = []
    for name, a, b, c, d in zip(names, ours, literal, ref64, lit_refs, strict=True):
        if a.numel() >= SMALL:
            _record(table, what, check32(f"{what}: {name}", a, b, c, d, scale=scale))
        else:
            pooled.append((rel_norm(a, c, scale), rel_max(a, c, scale), rel_norm(b, d, scale), rel_max(b, d, scale)))
    if pooled:
        ours_rms, lit_rms = (math.sqrt(statistics.fmean(p[i] ** 2 for p in pooled)) for i in (0, 2))
        ours_worst, lit_worst = (max(p[i] for p in pooled) for i in (1, 3))
        errors = Errors(ours_rms, ours_worst, lit_rms, lit_worst, 0.0)
        label = f"{what}: {len(pooled)} tensors under {SMALL} elements (root mean square)"
        _record(table, what, _assert_within(label, errors, ours[0].dtype, FLOOR_ULPS))


def print_table(title: str, table: dict[str, Errors | tuple[int, int]]) -> None:
    """Print recorded errors, and decision counts ``(ours, reference)`` (shown with ``pytest -s``)."""
    print(f"\n{title}: relative to float64, norm-wise / worst element; share of the bound used")
    print(f"  {'':52s} {'ours':>19s}   {'reference code':>19s}   {'used':>5s}")
    for what, e in sorted(table.items()):
        if isinstance(e, Errors):
            print(
                f"  {what:52s} {e.ours:.2e} / {e.ours_worst:.2e}   {e.literal:.2e} / {e.literal_worst:.2e}   "
                f"{e.used:5.2f}"
            )
        else:
            print(f"  {what:52s} {e[0]:>19d}   {e[1]:>19d}")


# ---------------------------------------------------------------------------------------------------------------------
# Decisions: argmax and ReLU signs
# ---------------------------------------------------------------------------------------------------------------------
def decision_bound(literal: torch.Tensor, ref64: torch.Tensor, terms: int = 1) -> float:
    """Largest float64 margin at which a low-precision decision may legitimately differ.

    ``terms`` values enter the margin (1 for a sign, 2 for the gap between two logits); each may be off by
    ``FACTOR`` x the reference's own worst-element error plus the floor (relative to the largest value).
    """
    err = float((literal.detach().double() - ref64.detach()).abs().max())
    return terms * (FACTOR * err + floor(literal.dtype) * float(ref64.detach().abs().max()))


def argmax_margin(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gap between the largest and the second largest value along ``dim`` (float64 logits)."""
    top2 = logits.detach().topk(2, dim=dim).values
    return top2.select(dim, 0) - top2.select(dim, 1)


def check_decisions(what: str, got: torch.Tensor, expected: torch.Tensor, margin: torch.Tensor, bound: float) -> int:
    """Assert decisions ``got`` equal the float64 ``expected`` wherever the float64 ``margin`` exceeds ``bound``.

    Returns:
        How many decisions differ (all of them near-ties).
    """
    differ = got != expected
    wrong = differ & (margin > bound)
    assert not bool(wrong.any()), (
        f"{what}: {int(wrong.sum())} decisions differ from float64 where its margin (up to "
        f"{float(margin[wrong].max()):.2e}) exceeds the float32 error bound {bound:.2e}"
    )
    return int(differ.sum())


def _relu(model: nn.Module) -> nn.ReLU:
    """The reference model's only ReLU (the head's ``linear_fuse.activate``)."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1, f"expected the head's ReLU only, found {len(relus)}"
    return relus[0]


@contextmanager
def relu_inputs(model: nn.Module, force: Sequence[torch.Tensor] = ()) -> Iterator[list[torch.Tensor]]:
    """Record the input of the reference model's (only) ReLU at every call with autograd on, optionally forcing
    its decisions.

    Args:
        model: A model of ``official_reference`` (its head's ``nn.ReLU``).
        force: Decisions (``x > 0`` masks) of another implementation, one per recorded call: the ReLU then passes
            the gradient exactly where the mask is set. Values are unchanged (``+ (x - x.detach()) * flip``).

    Yields:
        The recorded inputs (detached copies), in call order.
    """
    relu = _relu(model)
    inputs: list[torch.Tensor] = []
    pending = list(force)

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
        if not torch.is_grad_enabled():  # the teacher pass: no gradient, its decisions do not matter
            return None
        x = args[0]
        inputs.append(x.detach().clone())
        if not pending:
            return None
        flip = pending.pop(0).to(x.dtype) - (x > 0).to(x.dtype)  # +1: pass where ReLU would not, -1: the reverse
        return out + (x - x.detach()) * flip

    inplace, relu.inplace = relu.inplace, False  # the hook needs the input; relu is exact either way
    handle = relu.register_forward_hook(hook)
    try:
        yield inputs
    finally:
        handle.remove()
        relu.inplace = inplace
    assert not pending, f"{len(pending)} forced ReLU decisions were not used"


@contextmanager
def our_relu_inputs() -> Iterator[list[torch.Tensor]]:
    """Record the input of our head's ReLU (the fused batch-norm output) at every call with autograd on, as
    ``(B, C, H, W)`` maps like the reference's."""
    original = head_module._batch_norm_rows
    inputs: list[torch.Tensor] = []

    def spy(bn: nn.Module, rows: torch.Tensor, bhw: tuple[int, int, int]) -> torch.Tensor:
        out = original(bn, rows, bhw)
        if torch.is_grad_enabled():
            b, h, w = bhw
            inputs.append(out.detach().view(b, h, w, -1).permute(0, 3, 1, 2).clone())  # before the in-place ReLU
        return out

    head_module._batch_norm_rows = spy
    try:
        yield inputs
    finally:
        head_module._batch_norm_rows = original


def check_relu_decisions(
    what: str, ours: torch.Tensor, literal: torch.Tensor, ours_ref64: torch.Tensor, literal_ref64: torch.Tensor
) -> tuple[int, int]:
    """ReLU inputs of both float32 runs against their float64 twins: signs may differ only on near-ties.

    Returns:
        How many signs differ from float64 (ours, literal).
    """
    bound = decision_bound(literal, literal_ref64)
    flips_ours = check_decisions(f"{what} (ours)", ours > 0, ours_ref64 > 0, ours_ref64.abs(), bound)
    flips_lit = check_decisions(f"{what} (reference code)", literal > 0, literal_ref64 > 0, literal_ref64.abs(), bound)
    return flips_ours, flips_lit
