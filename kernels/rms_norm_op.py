"""RMSNorm over the last dim, with an optional fused tangent (forward-mode JVP) output.

Math, per row of length ``D`` (all in fp32; outputs in the dtype of ``x``)::

    forward   r   = rsqrt(mean(x^2) + eps)           y   = x * r * w
    tangent   y_t = w * (x_t * r - x * r^3 * mean(x * x_t))
                  = w * r * (x_t - xn * mean(xn * x_t)),            xn = x * r
    backward  g   = dy * w
              dx  = r * (g - xn * mean(g * xn))
              dw  = sum over rows of dy * xn

The dual forward reads ``x`` once for both outputs and stores ``r`` (fp32, one per row) for the
backward, which is the *primal* backward only: the MeanFlow losses stop the gradient of the
tangent, so ``y_t`` is returned detached and nothing is saved for it. Prefix tangents (see
:mod:`imf_kernels.reference`): ``x_t`` may cover only the first ``n <= batch`` rows of the batch; the
kernel masks the tangent by row count (``rows_t = x_t.numel() // D``).

The weight gradient is reduced in two stages, as liger-kernel's ``rms_norm`` does: each backward
program walks a contiguous range of rows, accumulates its partial ``dw`` in fp32 registers and
writes one row of a ``(programs, D)`` buffer, which is then summed. (Liger launches one program per
SM; here the range is a fixed number of rows per ``D``, see ``_rows_per_program``.) The split only
depends on the shape, so the backward is deterministic (no atomics).

**Forward-mode AD.** ``torch.func.jvp`` and ``torch.autograd.forward_ad`` run through
:func:`rms_norm` (the ``autograd.Function`` has ``forward`` + ``setup_context`` + ``jvp`` +
``backward``): the tangent along ``x_dot`` is the fused kernel in tangent-only mode
(``WITH_PRIMAL=False``), the tangent along ``w_dot`` the primal kernel with ``w_dot`` as weight
(``y`` is linear in ``w``). The primal keeps its backward; the tangent is a constant to autograd.

``D`` is a constexpr (the ``d < D`` mask is known in whole 16-byte groups) and 16-byte aligned row
strides are rebuilt as visible multiples (``ALIGN``), so rows load as 16-byte vectors.

Block sizes: a row is one ``BLOCK_D = next_power_of_2(D)`` tile; ``BLOCK_M`` rows per tile and
``num_warps`` are autotuned per ``D`` (one fixed config under ``TRITON_INTERPRET=1``).

Tested: fp32/fp16 on CPU under the Triton interpreter (``tests/test_dual_ops.py``); the bf16 GPU
tests there are written but were not run when this module was written (no GPU available).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_eps, check_float, check_prefix, describe, kernel_rule, per_thread, preferred, saved
from ._layout import aligned, as_rows, rows_layout, stride_align
from ._tuning import autotune

# Elements of x one backward program walks (16 rows at D = 768 or 1024, BLOCK_D = 1024). Its fp32 dw
# partial row adds 4 * D bytes to the 6 * D * 16 bytes of bf16 traffic of those rows (x, dy read, dx
# written): 4%. In exchange the 8,832 rows of a batch-32 step make 552 programs, four per H100 SM
# (64 rows per program made 138: one partial wave; sm_90 compile report).
_BWD_ELEMENTS_PER_PROGRAM = 16384


def _rows_per_program(block_d: int) -> int:
    """Rows per backward program: a power of two >= 16 (the largest BLOCK_M), so tiles never straddle
    two programs. It depends on ``D`` only, so the kernel (where it is a constexpr: the Triton 3.6
    interpreter cannot loop to a runtime bound under numpy >= 2.3) compiles once per ``D``."""
    return max(16, _BWD_ELEMENTS_PER_PROGRAM // block_d)


# Candidate configs: BLOCK_M rows x BLOCK_D = next_power_of_2(D) columns, num_warps. Rule, from the
# sm_90 compile report (bf16, 8832 rows, D = 768 and 1152; ``python -m bench compile``), applied by
# :func:`_fits`: 8 to 32 tile elements per thread. Above 32 the backward reaches 255 registers, and
# with 16 warps (at most 128 registers a thread) it spilled 84 B - 2.6 KB; below 8 a thread's share
# of a row is under 16 bytes and the loads split (8-byte or narrower). 6-8 of these per D remain.
# (BLOCK_M 2, 4 warps) is left out: its backward spills 4 B on sm_80 at D = 768 and 1024.
_CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w) for m in (1, 2, 4, 8, 16) for w in (2, 4, 8) if (m, w) != (2, 4)]
_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 8}, num_warps=4)


def _elements(config, meta) -> int:
    return config.kwargs["BLOCK_M"] * meta["BLOCK_D"]


def _fits(configs, meta):
    """The configs of the rule above for this ``BLOCK_D``."""
    return [c for c in configs if 8 <= per_thread(c, _elements(c, meta)) <= 32]


def _pinned(meta):
    return preferred(_fits(_CONFIGS, meta), lambda c: _elements(c, meta))


@autotune(candidates=_CONFIGS, key=["D", "WITH_PRIMAL", "WITH_TANGENT"], interpret_config=_INTERPRET_CONFIG,
          prune=_fits, pinned=_pinned, name="rms_norm_op.rms_norm_fwd")  # fmt: skip
@triton.jit
def _rms_norm_fwd_kernel(
    X, XT, W, Y, YT, RSTD,
    stride_x, stride_xt,
    rows, rows_t, eps,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    WITH_PRIMAL: tl.constexpr, WITH_TANGENT: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rows64 = offs_m.to(tl.int64)[:, None]
    mask = (offs_m < rows)[:, None] & mask_d[None, :]

    x = tl.load(X + rows64 * aligned(stride_x, ALIGN) + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    xn = x * rstd[:, None]
    if WITH_PRIMAL:
        tl.store(RSTD + offs_m, rstd, mask=offs_m < rows)
        tl.store(Y + rows64 * D + offs_d[None, :], (xn * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    if WITH_TANGENT:
        mask_t = (offs_m < rows_t)[:, None] & mask_d[None, :]
        xt = tl.load(XT + rows64 * aligned(stride_xt, ALIGN) + offs_d[None, :], mask=mask_t, other=0.0)
        xt = xt.to(tl.float32)
        dot = tl.sum(xn * xt, axis=1) / D
        yt = w[None, :] * rstd[:, None] * (xt - xn * dot[:, None])
        tl.store(YT + rows64 * D + offs_d[None, :], yt.to(YT.dtype.element_ty), mask=mask_t)


@autotune(candidates=_CONFIGS, key=["D"], interpret_config=_INTERPRET_CONFIG, prune=_fits, pinned=_pinned,
          name="rms_norm_op.rms_norm_bwd")  # fmt: skip
@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_x,
    rows,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    w = tl.load(W + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        offs_m = pid * ROWS_PER_PROGRAM + start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < rows
        rows64 = offs_m.to(tl.int64)[:, None]
        mask = mask_m[:, None] & mask_d[None, :]
        dy = tl.load(DY + rows64 * aligned(stride_dy, ALIGN) + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows64 * aligned(stride_x, ALIGN) + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + offs_m, mask=mask_m, other=0.0)
        xn = x * rstd[:, None]
        g = dy * w[None, :]
        dot = tl.sum(g * xn, axis=1) / D
        dx = rstd[:, None] * (g - xn * dot[:, None])
        tl.store(DX + rows64 * D + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xn, axis=0)
    tl.store(DW_PARTIAL + pid * D + offs_d, dw, mask=mask_d)


def _validate(x, x_t, weight, eps) -> None:
    check_float("x", x)
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got {describe(x)}")
    if x_t is not None:
        check_prefix("x_t", x_t, "x", x)
    check_float("weight", weight, ndim=1)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},) (last dim of x), got {describe(weight)}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on the device of x ({x.device}), got {describe(weight)}")
    check_eps(eps)


def _forward(x, x_t, weight, eps, *, primal=True):
    """``(y, y_t, rstd)``; ``rstd`` is fp32 with one entry per row of ``x``. ``y`` and ``rstd`` are
    ``None`` when not ``primal`` (tangent only), ``y_t`` when ``x_t`` is ``None``."""
    d = x.shape[-1]
    x2 = as_rows("x", x)
    xt2 = as_rows("x_t", x_t) if x_t is not None else x2
    rows, rows_t = x2.shape[0], xt2.shape[0] if x_t is not None else 0
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if primal else None
    y_t = torch.empty(x_t.shape, dtype=x.dtype, device=x.device) if x_t is not None else None
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device) if primal else None
    unused = x2  # pointer for the outputs a mode does not write
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),)
    _rms_norm_fwd_kernel[grid](
        x2, xt2, weight, unused if y is None else y, unused if y_t is None else y_t, unused if rstd is None else rstd,
        x2.stride(0), xt2.stride(0),
        rows, rows_t, eps,
        D=d, BLOCK_D=triton.next_power_of_2(d), ALIGN=stride_align(x2, xt2),
        WITH_PRIMAL=primal, WITH_TANGENT=x_t is not None,
    )  # fmt: skip
    return y, y_t, rstd


def _backward(dy, x, weight, rstd):
    d = x.shape[-1]
    x2 = as_rows("x", x)
    dy2 = dy.reshape(-1, d)
    if dy2.stride(1) != 1:
        dy2 = dy2.contiguous()
    rows, block_d = x2.shape[0], triton.next_power_of_2(d)
    per_program = _rows_per_program(block_d)
    programs = triton.cdiv(rows, per_program)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw_partial = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight, rstd, dx, dw_partial,
        dy2.stride(0), x2.stride(0),
        rows,
        D=d, BLOCK_D=block_d, ALIGN=stride_align(dy2, x2), ROWS_PER_PROGRAM=per_program,
    )  # fmt: skip
    return dx, dw_partial.sum(0).to(weight.dtype)


class _RMSNormFn(torch.autograd.Function):
    """Dual RMSNorm ``(y, y_t, rstd)``; differentiable in ``y`` only (``y_t`` and ``rstd`` are
    non-differentiable, ``x_t`` gets no gradient).

    Forward-mode rule (``torch.func.jvp``, ``torch.autograd.forward_ad``): the tangent of ``y``
    along ``x_dot`` comes from the fused kernel in tangent-only mode; RMSNorm is linear in the
    weight, so the tangent along ``w_dot`` is the primal kernel with ``w_dot`` as weight.
    """

    @staticmethod
    def forward(x, x_t, weight, eps):
        return _forward(x, x_t, weight.contiguous(), eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, weight, eps = inputs
        _, y_t, rstd = output
        ctx.eps = eps
        ctx.save_for_backward(x, weight, rstd)
        ctx.save_for_forward(x, weight)
        ctx.mark_non_differentiable(*(t for t in (y_t, rstd) if t is not None))

    @staticmethod
    @kernel_rule
    def backward(ctx, dy, _dy_t, _drstd):
        x, weight, rstd = saved(ctx)
        dx, dw = _backward(dy, x, weight.contiguous(), rstd)
        return dx, None, dw, None

    @staticmethod
    @kernel_rule
    def jvp(ctx, x_dot, _x_t_dot, w_dot, _eps_dot):
        x, weight = saved(ctx)
        y_dot = None
        if x_dot is not None:
            y_dot = _forward(x, rows_layout(x_dot), weight.contiguous(), ctx.eps, primal=False)[1]
        if w_dot is not None:
            y_w = _forward(x, None, w_dot.contiguous(), ctx.eps)[0]
            y_dot = y_w if y_dot is None else y_dot + y_w
        return y_dot, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``y = x * rsqrt(mean(x^2) + eps) * weight`` over the last dim; differentiable in ``x`` and ``weight``.

    ``x``: any shape ``(..., D)`` that flattens to rows without a copy; ``weight``: ``(D,)``, any float dtype.
    """
    _validate(x, None, weight, eps)
    return _RMSNormFn.apply(x, None, weight, eps)[0]


def rms_norm_jvp(
    x: torch.Tensor, x_t: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, y_t)``: :func:`rms_norm` and its tangent along ``x_t`` (``(n, ...)``, ``n <= x.shape[0]``).

    ``y`` is differentiable in ``x`` and ``weight``; ``y_t`` is detached.
    """
    _validate(x, x_t, weight, eps)
    return _RMSNormFn.apply(x, x_t, weight, eps)[:2]
