"""Dual linear layer: primal and tangent rows through one weight, primal-only backward.

Math (``x``: ``(..., K)``, ``W``: ``(N, K)``, ``b``: ``(N,)``)::

    forward   y   = x W^T + b
    tangent   y_t = x_t W^T                 (the tangent of an affine map has no bias term)
    backward  dx  = dy W,   dW = dy^T x,   db = sum over rows of dy      (primal rows only)

No Triton here: GEMMs go to cuBLAS through ``torch.matmul`` / ``F.linear``. The point of the
``autograd.Function`` is the backward contract the MeanFlow losses need: ``y_t`` is detached and
nothing is saved for it (``ctx`` keeps ``x`` and ``W``, exactly what a plain ``F.linear`` keeps), so
the tangent costs no activation memory and no backward GEMMs. ``torch.func.jvp`` + autograd, by
contrast, records the tangent GEMM as well.

**Two GEMMs, not one over ``cat([x, x_t])``.** The concatenation would copy both operands (a read
and a write of ``(rows + n) * K`` elements, about the activation traffic of the GEMM itself) and the
bias would have to be kept off the tangent rows by a second pass; with two calls the bias is fused
into the primal GEMM's epilogue (``addmm``) and the tangent GEMM has none. The only extra cost of
two calls is reading ``W`` twice (``N * K``, under 2% of the activations at 276 tokens x batch 16)
and one more launch. At training shapes (tens of thousands of rows, ``K, N >= 768``) each GEMM
alone has thousands of 128x128 output tiles, so merging them buys no better wave quantization.
One GEMM would only pay off for tiny row counts, or if the caller already held primal and
tangent rows in one buffer (no copy); the model does not.

Prefix tangents (see :mod:`imf_kernels.reference`): ``x_t`` is ``(n, ...)`` with ``n <= x.shape[0]``.
Runs on any device torch does (CPU included, no interpreter needed); autocast is not applied
inside (pass operands of one dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, check_prefix, describe, kernel_rule, saved


def _check_operand(name: str, t, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"{name} must match x ({x.dtype}, {x.device}), got {describe(t)}")


def _validate(x, x_t, weight, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = describe(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a float32/float16/bfloat16 tensor, got {got}")
    check_prefix("x_t", x_t, "x", x)
    _check_operand("weight", weight, x)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (out_features, {x.shape[-1]}), got {describe(weight)}")
    if bias is not None:
        _check_operand("bias", bias, x)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {describe(bias)}")


class _LinearDualFn(torch.autograd.Function):
    """``(y, y_t)``; differentiable in ``y`` only: ``y_t`` detached, nothing saved for ``x_t``.

    Forward-mode rule for ``y``: ``x_dot W^T + x W_dot^T + b_dot`` (the terms whose tangents exist).
    """

    @staticmethod
    def forward(x, x_t, weight, bias):
        return F.linear(x, weight, bias), F.linear(x_t, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    @kernel_rule
    def backward(ctx, dy, _dy_t):
        x, weight = saved(ctx)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = torch.matmul(dy, weight) if ctx.needs_input_grad[0] else None
        dw = torch.matmul(dy2.t(), x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[2] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, None, dw, db

    @staticmethod
    @kernel_rule
    def jvp(ctx, x_dot, _x_t_dot, w_dot, b_dot):
        x, weight = saved(ctx)
        terms = [F.linear(x_dot, weight) if x_dot is not None else None]
        terms += [F.linear(x, w_dot) if w_dot is not None else None, b_dot]
        terms = [t for t in terms if t is not None]
        return (sum(terms[1:], terms[0]) if terms else None), None


def linear_dual(
    x: torch.Tensor, x_t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, y_t) = (x W^T + b, x_t W^T)``.

    ``x``: ``(..., K)``; ``x_t``: ``(n, ...)`` with ``n <= x.shape[0]``; ``weight``: ``(N, K)``;
    ``bias``: ``(N,)`` or ``None``; all of one dtype and device. ``y`` is differentiable in ``x``,
    ``weight`` and ``bias``; ``y_t`` is detached.
    """
    _validate(x, x_t, weight, bias)
    return _LinearDualFn.apply(x, x_t, weight, bias)
