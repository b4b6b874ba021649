"""SwiGLU gate ``h = silu(a) * b``, with an optional fused tangent output.

Math, elementwise, in fp32 (outputs in the dtype of ``a``); ``s = sigmoid(a)``::

    forward   h   = silu(a) b,                      silu(a) = a s
    tangent   h_t = silu'(a) a_t b + silu(a) b_t,  silu'(a) = s (1 + a (1 - s))
    backward  da  = dh b silu'(a),   db = dh silu(a)

The dual forward reads ``a`` and ``b`` once for both outputs; the backward is the primal one only
(``h_t`` detached, nothing saved for it). Prefix tangents (see :mod:`imf_kernels.reference`):
``a_t``, ``b_t`` may cover only the first ``n <= batch`` rows; the kernel masks the tangent by row.

**Packed input.** The model computes ``ab = Linear(x)`` of width ``2 * hidden`` and splits it.
``a`` and ``b`` (and ``a_t``, ``b_t``) may be those last-dim halves, ``ab[..., :hidden]`` and
``ab[..., hidden:]``, passed as views: the kernels take a row stride per operand, so no
``.contiguous()`` copy is made. Any operand that flattens to ``(rows, hidden)`` with unit stride
in the last dim is accepted. Outputs (``h``, ``h_t``, and the gradients ``da``, ``db``) are
contiguous; autograd scatters ``da`` and ``db`` into the gradient of ``ab``.

**Alignment.** When every operand starts 16-byte aligned and its row stride is a multiple of 16
bytes (checked by the launcher), the strides are rebuilt in the kernel as visible multiples
(``ALIGN``) and every access is a 16-byte vector; otherwise the kernel is correct but scalar. The
halves of one packed projection are aligned only if ``hidden`` is a multiple of 8 (bf16): the iMF
block pads each half to a multiple of 64 units for that (hidden 2730 -> 2752, see
``imf.model.layers.IMFBlock``; unpadded, every load at iMF-L/2 and XL/2 was a scalar 2-byte load).

**Forward-mode AD.** ``torch.func.jvp`` / ``forward_ad`` through :func:`swiglu`: the tangent is the
fused kernel in tangent-only mode (``WITH_PRIMAL=False``; a missing ``a_dot`` or ``b_dot`` is zero).
The primal keeps its backward; the tangent is a constant to autograd.

Tiles: ``BLOCK_M`` rows x ``BLOCK_N`` columns of a 2-D grid, autotuned per ``hidden`` (one fixed
config under ``TRITON_INTERPRET=1``).

Tested: fp32/fp16 on CPU under the Triton interpreter (``tests/test_dual_ops.py``); the bf16 GPU
tests there are written but were not run when this module was written (no GPU available).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_float, check_like, check_prefix, kernel_rule, per_thread, preferred, saved
from ._layout import aligned, as_rows, rows_layout, stride_align
from ._tuning import autotune

# Candidate configs: BLOCK_M rows x BLOCK_N columns, num_warps. Rule, from the sm_90 compile report
# (bf16, 8832 rows x hidden 2752 / 2048, fused-projection halves; ``python -m bench compile``):
#   * 8 to 32 tile elements per thread (:func:`_fits`): at 64 the forward with tangent reaches 255
#     registers and spills (36-56 B); at 4 a thread's share of a row is one 8-byte load, not 16;
#   * 4 or 8 warps (1-2 warp programs only win at tiny row counts), tiles of 1-4K elements;
#   * ``BLOCK_N`` no wider than the row (``N`` rounded up to a power of two, at least 128).
_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w)
    for m, n, w in (
        (1, 1024, 4), (2, 1024, 4), (2, 1024, 8), (4, 512, 4), (4, 512, 8), (4, 1024, 4), (4, 1024, 8),
        (8, 128, 4), (8, 256, 4), (8, 256, 8), (8, 512, 4), (8, 512, 8), (16, 128, 4), (16, 256, 8),
    )
]  # fmt: skip
_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4)


def _elements(config) -> int:
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]


def _fits(configs, meta):
    """The configs of the rule above for a row of ``N`` columns."""
    width = max(128, triton.next_power_of_2(meta["N"]))
    return [c for c in configs if c.kwargs["BLOCK_N"] <= width and 8 <= per_thread(c, _elements(c)) <= 32]


def _pinned(meta):
    """:func:`preferred`, among equals the column tile that pads a row least (2752 = 11 x 256 - 64)."""
    n = meta["N"]
    fits = sorted(_fits(_CONFIGS, meta), key=lambda c: triton.cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_N"])
    return preferred(fits, _elements)


@triton.jit
def _silu_and_grad(a):
    """``(silu(a), silu'(a))`` in fp32."""
    s = tl.sigmoid(a)
    return a * s, s * (1.0 + a * (1.0 - s))


@autotune(candidates=_CONFIGS, key=["N", "WITH_PRIMAL", "WITH_TANGENT"], interpret_config=_INTERPRET_CONFIG,
          prune=_fits, pinned=_pinned, name="swiglu_op.swiglu_fwd")  # fmt: skip
@triton.jit
def _swiglu_fwd_kernel(
    A, B, AT, BT, H, HT,
    sa, sb, sat, sbt,
    rows, rows_t, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr,
    WITH_PRIMAL: tl.constexpr, WITH_TANGENT: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = offs_m.to(tl.int64)[:, None]
    cols = offs_n[None, :]
    mask_n = (offs_n < N)[None, :]
    mask = (offs_m < rows)[:, None] & mask_n
    a = tl.load(A + rows64 * aligned(sa, ALIGN) + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + rows64 * aligned(sb, ALIGN) + cols, mask=mask, other=0.0).to(tl.float32)
    silu, dsilu = _silu_and_grad(a)
    if WITH_PRIMAL:
        tl.store(H + rows64 * N + cols, (silu * b).to(H.dtype.element_ty), mask=mask)
    if WITH_TANGENT:
        mask_t = (offs_m < rows_t)[:, None] & mask_n
        at = tl.load(AT + rows64 * aligned(sat, ALIGN) + cols, mask=mask_t, other=0.0).to(tl.float32)
        bt = tl.load(BT + rows64 * aligned(sbt, ALIGN) + cols, mask=mask_t, other=0.0).to(tl.float32)
        tl.store(HT + rows64 * N + cols, (dsilu * at * b + silu * bt).to(HT.dtype.element_ty), mask=mask_t)


@autotune(candidates=_CONFIGS, key=["N"], interpret_config=_INTERPRET_CONFIG, prune=_fits, pinned=_pinned,
          name="swiglu_op.swiglu_bwd")  # fmt: skip
@triton.jit
def _swiglu_bwd_kernel(
    DH, A, B, DA, DB,
    sdh, sa, sb,
    rows, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = offs_m.to(tl.int64)[:, None]
    cols = offs_n[None, :]
    mask = (offs_m < rows)[:, None] & (offs_n < N)[None, :]
    dh = tl.load(DH + rows64 * aligned(sdh, ALIGN) + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + rows64 * aligned(sa, ALIGN) + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + rows64 * aligned(sb, ALIGN) + cols, mask=mask, other=0.0).to(tl.float32)
    silu, dsilu = _silu_and_grad(a)
    tl.store(DA + rows64 * N + cols, (dh * b * dsilu).to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + rows64 * N + cols, (dh * silu).to(DB.dtype.element_ty), mask=mask)


def _grid(rows: int, n: int):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))


def _validate(a, b, a_t, b_t) -> None:
    check_float("a", a)
    if a.numel() == 0:
        raise ValueError(f"a must not be empty, got shape {tuple(a.shape)}")
    check_like("b", b, "a", a)
    if (a_t is None) != (b_t is None):
        given, missing = ("a_t", "b_t") if b_t is None else ("b_t", "a_t")
        raise ValueError(
            f"a_t and b_t must be given together (tangents of both a and b, or neither): got {given} "
            f"but {missing}=None (pass zeros for an input that does not move)"
        )
    if a_t is not None:
        check_prefix("a_t", a_t, "a", a)
        check_like("b_t", b_t, "a_t", a_t)


def _forward(a, b, a_t, b_t, *, primal=True):
    """``(h, h_t)``: ``h`` is ``None`` when not ``primal`` (tangent only), ``h_t`` when ``a_t`` is ``None``."""
    n = a.shape[-1]
    a2, b2 = as_rows("a", a), as_rows("b", b)
    at2, bt2 = (as_rows("a_t", a_t), as_rows("b_t", b_t)) if a_t is not None else (a2, b2)
    h = torch.empty(a.shape, dtype=a.dtype, device=a.device) if primal else None
    h_t = torch.empty(a_t.shape, dtype=a.dtype, device=a.device) if a_t is not None else None
    _swiglu_fwd_kernel[_grid(a2.shape[0], n)](
        a2, b2, at2, bt2, a2 if h is None else h, a2 if h_t is None else h_t,
        a2.stride(0), b2.stride(0), at2.stride(0), bt2.stride(0),
        a2.shape[0], at2.shape[0] if a_t is not None else 0, n,
        ALIGN=stride_align(a2, b2, at2, bt2), WITH_PRIMAL=primal, WITH_TANGENT=a_t is not None,
    )  # fmt: skip
    return h, h_t


def _backward(dh, a, b):
    n = a.shape[-1]
    a2, b2 = as_rows("a", a), as_rows("b", b)
    dh2 = dh.reshape(-1, n)
    if dh2.stride(1) != 1:
        dh2 = dh2.contiguous()
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    db = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    _swiglu_bwd_kernel[_grid(a2.shape[0], n)](
        dh2, a2, b2, da, db,
        dh2.stride(0), a2.stride(0), b2.stride(0),
        a2.shape[0], n,
        ALIGN=stride_align(dh2, a2, b2),
    )  # fmt: skip
    return da, db


class _SwiGLUFn(torch.autograd.Function):
    """Dual SwiGLU ``(h, h_t)``; differentiable in ``h`` only (``h_t`` non-differentiable, no grads for
    ``a_t``, ``b_t``). Forward-mode rule: the fused kernel in tangent-only mode (a missing tangent of
    ``a`` or ``b`` is zero)."""

    @staticmethod
    def forward(a, b, a_t, b_t):
        return _forward(a, b, a_t, b_t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, _, _ = inputs
        ctx.save_for_backward(a, b)
        ctx.save_for_forward(a, b)
        if output[1] is not None:
            ctx.mark_non_differentiable(output[1])

    @staticmethod
    @kernel_rule
    def backward(ctx, dh, _dh_t):
        a, b = saved(ctx)
        da, db = _backward(dh, a, b)
        return da, db, None, None

    @staticmethod
    @kernel_rule
    def jvp(ctx, a_dot, b_dot, _a_t_dot, _b_t_dot):
        a, b = saved(ctx)
        if a_dot is None and b_dot is None:
            return None, None
        a_dot, b_dot = (torch.zeros_like(a) if t is None else rows_layout(t) for t in (a_dot, b_dot))
        return _forward(a, b, a_dot, b_dot, primal=False)[1], None


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``h = silu(a) * b``; ``a``, ``b``: same shape ``(..., hidden)``, contiguous or last-dim halves of one
    packed tensor. ``h`` is contiguous and differentiable in ``a`` and ``b``."""
    _validate(a, b, None, None)
    return _SwiGLUFn.apply(a, b, None, None)[0]


def swiglu_jvp(
    a: torch.Tensor, b: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, h_t)``: :func:`swiglu` and its tangent along ``(a_t, b_t)`` (``(n, ...)``, ``n <= a.shape[0]``).

    ``h_t`` is contiguous and detached. ``a_t`` and ``b_t`` come together (both ``None``: ``h_t`` is
    ``None``; one alone is a ``ValueError``: pass zeros for an input that does not move).
    """
    _validate(a, b, a_t, b_t)
    return _SwiGLUFn.apply(a, b, a_t, b_t)
