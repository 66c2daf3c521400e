"""Fused channel attention for AllSpark: psi-standardised softmax attention without materialising the logits.

AllSpark's labeled cross-attention computes, per labeled sample b, ``softmax(psi(Q_b^T K)) V^T`` where ``Q_b`` is
``(N, D)`` (D = 2C query channels over N positions), ``K`` and ``V`` are ``(N, S)`` key/value channels shared by the
batch (S = K * 2C when the Semantic Memory is read) and psi standardises the whole ``(D, S)`` logit matrix to zero
mean and unit variance. The literal code materialises that matrix several times (logits, psi, softmax, dropout and
their gradients: 4 x 44 M floats per labeled sample on Pascal with MiT-B5, 170 M on COCO).

Two exact rewrites avoid it:

1. Softmax is shift-invariant, so ``softmax((A - mean) / sqrt(var + eps)) = softmax(s * A)`` with
   ``s = rsqrt(var(A) + eps)``. The variance of ``A = Q^T K`` needs only ``N x N`` Gram matrices
   (:func:`psi_scale`), and ``s`` is folded into the queries. Gradients flow through ``s`` by autograd.
2. The attention itself runs in row blocks (:class:`BlockedAttention`): a block of query rows, all key columns,
   softmax, dropout, times the values. Only the output ``(M, N)``, one log-sum-exp per row and (with dropout) a
   one-byte keep mask per weight are kept for the backward pass, which recomputes each block's weights.

In float32 the outputs and gradients match the materialised computation within a few 1e-7 relative; in float64
within 1e-13. Dropout draws its mask from the default generator (so ``torch.manual_seed`` makes it reproducible),
not with the same random stream as ``nn.Dropout``.

The fold in 1. is exact, so ``F.scaled_dot_product_attention`` with ``scale=1`` computes the same function
(:func:`sdpa_attention`). Measured on the CPU (docs/performance.md, "Hand-written vs torch built-ins"), it wins
only for a forward without autograd under autocast (the teacher pass and inference of a bf16 run): 0.78-0.83x the
time, with the same error once the next layer rounds the output to bf16. With dropout PyTorch's CPU dispatcher
runs its math kernel, which materialises the weights (1.05-2.5x the time, 6-12x the memory kept for backward); with
autograd and no dropout it is 0.85-1.08x the time; in float32 without autograd 0.74-0.83x the time but with up to
1.9x the error (at a 3 x 3 grid). There the blocked attention is kept.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["BlockedAttention", "blocked_attention", "psi_scale", "sdpa_attention"]

# Elements of one block's weight matrix (rows x S): 2**22 floats = 16 MiB per buffer (3 buffers in forward, 4 in
# backward). Larger blocks stream the keys/values and the key/value gradients fewer times; smaller ones use less
# memory. 2**21..2**23 are within 10% of each other on a 2-core Xeon.
BLOCK_ELEMENTS = 2**22
_INT31 = 2**31


def psi_scale(
    queries: torch.Tensor, keys: torch.Tensor, column_mask: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """``rsqrt(var(Q_b^T K) + eps)`` per sample, from ``N x N`` Gram matrices (no ``D x S`` logits).

    With ``Q0 = Q - q_m 1^T`` and ``K0 = K - k_m 1^T`` centred over channels (``q_m``, ``k_m`` the channel means),
    ``Q^T K - mean = Q0^T K0 + (Q0^T k_m) 1^T + 1 (K0^T q_m)^T``, three mutually orthogonal terms, so the sum of
    squared deviations is ``<Q0 Q0^T, K0 K0^T> + S k_m^T Q0 Q0^T k_m + D q_m^T K0 K0^T q_m``: a sum of non-negative
    terms with no cancellation (unlike ``E[A^2] - E[A]^2``).

    Args:
        queries: ``(B, N, D)``: D query channels over N positions per sample.
        keys: ``(N, S)``: S key channels shared by the batch.
        column_mask: Optional ``(S,)`` bool; statistics over the True columns only.
        eps: Added to the (biased) variance, as InstanceNorm does.

    Returns:
        ``(B,)`` scale in the promoted floating dtype (at least float32).
    """
    dtype = torch.promote_types(torch.promote_types(queries.dtype, keys.dtype), torch.float32)
    q, k = queries.to(dtype), keys.to(dtype)
    d = q.shape[-1]
    if column_mask is None:
        count = k.new_tensor(float(k.shape[1]))
        k_mean = k.mean(dim=1, keepdim=True)  # (N, 1)
        k0 = k - k_mean
    else:
        m = column_mask.to(dtype)
        count = m.sum()
        k_mean = (k * m).sum(dim=1, keepdim=True) / count
        k0 = (k - k_mean) * m
    gram_k = k0 @ k0.T  # (N, N)
    q_mean = q.mean(dim=-1, keepdim=True)  # (B, N, 1)
    q0 = q - q_mean
    gram_q = q0 @ q0.transpose(-1, -2)  # (B, N, N)
    cross = (gram_q * gram_k).sum(dim=(-2, -1))
    row_term = (k_mean.T @ gram_q @ k_mean).reshape(-1) * count
    col_term = (q_mean.transpose(-1, -2) @ gram_k @ q_mean).reshape(-1) * d
    var = (cross + row_term + col_term) / (count * d)
    return torch.rsqrt(var + eps)


def _block_rows(rows: int, cols: int) -> int:
    return max(1, min(rows, BLOCK_ELEMENTS // max(cols, 1)))


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast inside the kernel (it casts its inputs itself); devices without autocast need nothing."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class BlockedAttention(torch.autograd.Function):
    """``softmax(q K + bias) V^T`` with dropout on the weights, computed and differentiated in row blocks.

    Forward inputs: ``q (M, N)``, ``k (N, S)``, ``v (N, S)``, ``bias (S,)`` or None (added to every row, ``-inf``
    masks a column), dropout probability ``p``. Output ``(M, N)``. Half-precision inputs are computed in float32
    and the output is cast back. Saved for backward: ``q, k, v``, the output, the row log-sum-exp ``(M,)`` and, with
    dropout, the ``(M, S)`` bool keep mask (a quarter of one float32 weight matrix).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, p: float
    ) -> torch.Tensor:
        dtype = _compute_dtype(q, k, v)
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype)
        with _autocast_off(q.device):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            rows, cols = q.shape[0], k.shape[1]
            step = _block_rows(rows, cols)
            out = q.new_empty(rows, v.shape[0])
            lse = q.new_empty(rows)
            keep = None if p == 0.0 else torch.empty(rows, cols, dtype=torch.bool, device=q.device)
            buf = q.new_empty(step, cols)
            rand = None if keep is None else torch.empty(step, cols, dtype=torch.int32, device=q.device)
            keep_f = None if keep is None else q.new_empty(step, cols)
            threshold = round((1.0 - p) * _INT31)
            for start in range(0, rows, step):
                stop = min(start + step, rows)
                w = buf[: stop - start]
                torch.mm(q[start:stop], k, out=w)
                if bias is not None:
                    w.add_(bias)
                row_max = w.amax(dim=1, keepdim=True)
                w.sub_(row_max).exp_()
                total = w.sum(dim=1, keepdim=True)
                lse[start:stop] = (row_max + total.log()).squeeze(1)
                if keep is not None:
                    assert rand is not None and keep_f is not None
                    r = rand[: stop - start].random_()  # uniform on [0, 2**31): P(r < threshold) = 1 - p
                    torch.lt(r, threshold, out=keep[start:stop])
                    w.mul_(keep_f[: stop - start].copy_(keep[start:stop]))  # 0/1 floats: 5x faster than masked_fill_
                    total = total * (1.0 - p)
                torch.mm(w, v.T, out=out[start:stop])
                out[start:stop].div_(total)
        ctx.p = p
        ctx.save_for_backward(q, k, v, bias, out, lse, keep)
        return out.to(ctx.in_dtypes[0])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, bias, out, lse, keep = ctx.saved_tensors
        p = ctx.p
        in_dtypes = ctx.in_dtypes
        with _autocast_off(q.device):
            g = grad_out.to(q.dtype)
            rows, cols = q.shape[0], k.shape[1]
            step = _block_rows(rows, cols)
            dq = torch.empty_like(q)
            dk = torch.zeros_like(k)
            dv = torch.zeros_like(v)
            delta = (g * out).sum(dim=1, keepdim=True)  # (M, 1): sum_j P_ij dP_ij
            w_buf = q.new_empty(step, cols)
            dw_buf = q.new_empty(step, cols)
            kept_buf = None if keep is None else q.new_empty(step, cols)
            keep_f = None if keep is None else q.new_empty(step, cols)
            inv_keep = 1.0 / (1.0 - p)
            for start in range(0, rows, step):
                stop = min(start + step, rows)
                q_b, g_b = q[start:stop], g[start:stop]
                w = w_buf[: stop - start]  # the softmax weights P of the block, recomputed
                torch.mm(q_b, k, out=w)
                if bias is not None:
                    w.add_(bias)
                w.sub_(lse[start:stop, None]).exp_()
                dw = dw_buf[: stop - start]
                torch.mm(g_b, v, out=dw)  # d(weights after dropout)
                if keep is None:
                    dv.addmm_(g_b.T, w)
                else:
                    assert kept_buf is not None and keep_f is not None
                    mask = keep_f[: stop - start].copy_(keep[start:stop])
                    kept = torch.mul(w, mask, out=kept_buf[: stop - start])
                    dv.addmm_(g_b.T, kept, alpha=inv_keep)
                    dw.mul_(mask).mul_(inv_keep)
                dw.sub_(delta[start:stop]).mul_(w)  # d(logits) = P * (dP - delta)
                torch.mm(dw, k.T, out=dq[start:stop])
                dk.addmm_(q_b.T, dw)
        dq, dk, dv = dq.to(in_dtypes[0]), dk.to(in_dtypes[1]), dv.to(in_dtypes[2])
        return dq, dk, dv, None, None


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """``dropout(softmax(q @ k + bias)) @ v.T`` without materialising the ``(M, S)`` weights (see the module doc).

    Args:
        q: Queries ``(M, N)`` (rows are queries, any scaling already applied).
        k: Keys ``(N, S)`` (columns are keys).
        v: Values ``(N, S)`` (columns are values).
        bias: Optional ``(S,)`` added to every row of the logits; ``-inf`` excludes a column.
        dropout_p: Dropout probability on the attention weights (0 for none).

    Returns:
        ``(M, N)`` in the dtype of ``q``.
    """
    return BlockedAttention.apply(q, k, v, bias, float(dropout_p))


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """:func:`blocked_attention` (without ``bias``) by ``F.scaled_dot_product_attention``, computed in float32.

    Keys and values are passed to SDPA as contiguous ``(S, N)`` rows (its flash kernel needs a unit last stride):
    one transposing copy each. Half-precision inputs are computed in float32 and the output is cast back to
    ``q``'s dtype, as :func:`blocked_attention` does.

    Args:
        q: Queries ``(M, N)`` (any scaling already applied).
        k: Keys ``(N, S)``.
        v: Values ``(N, S)``.
        dropout_p: Dropout on the weights (above 0 PyTorch's CPU kernel materialises them).

    Returns:
        ``(M, N)`` in the dtype of ``q``.
    """
    dtype = _compute_dtype(q, k, v)
    with _autocast_off(q.device):
        rows = [_contiguous_as(t, dtype)[None, None] for t in (q, k.T, v.T)]
        out = F.scaled_dot_product_attention(*rows, dropout_p=dropout_p, scale=1.0)
    return out[0, 0].to(q.dtype)


def _contiguous_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a contiguous tensor of ``dtype`` with at most one copy (``Tensor.to`` keeps a transposed layout)."""
    if t.dtype == dtype:
        return t.contiguous()
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)
