"""Fused QK-RMSNorm + 1-D rotary embedding, with an optional fused tangent output.

The iMF block normalises ``q`` and ``k`` over ``head_dim`` (RMSNorm with a learned weight) and
then rotates them (RoPE, rotate-half layout as in :func:`imf_kernels.reference.rope`). Per row
(one token of one head, length ``D = head_dim``, ``half = D / 2``), in fp32::

    forward   r  = rsqrt(mean(x^2) + eps)     z = x * r * w
              y[d] = z[d] cos[l, d] + sgn(d) z[rot(d)] sin[l, d],
              rot(d) = (d + half) mod D,  sgn(d) = -1 for d < half, +1 otherwise
    tangent   z_t = w * r * (x_t - xn * mean(xn * x_t)),  xn = x * r   (the RMSNorm tangent)
              y_t = rope(z_t)                                          (RoPE is linear)
    backward  dz[j] = dy[j] cos[l, j] - sgn(j) sin[l, rot(j)] dy[rot(j)]   (rope transposed; rot is
                                                                         an involution, sgn(rot j) = -sgn(j))
              g = dz * w;  dx = r * (g - xn * mean(g * xn));  dw = sum over (batch, token, head) of dz * xn

The rotated partner ``x[rot(d)]`` is read with a second (cache-hitting) load at permuted offsets
instead of a register shuffle. The intermediate ``z`` is never rounded to the input dtype (the
reference rounds it once between its two ops, so the kernel is slightly more accurate).

**Layouts.** The model computes ``qkv = Linear(x)`` as ``(B, L, 3, H, D)`` and attention wants
``(B, H, L, D)``. The kernel reads ``x = qkv[:, :, i]`` -- any ``(B, L, H, D)`` view with unit stride
in ``D`` -- through its strides and writes ``y`` as a contiguous ``(B, H, L, D)`` tensor, so the
transpose copy is folded into the op. The backward returns ``dx`` as a contiguous ``(B, L, H, D)``
tensor (autograd then scatters it into the ``qkv`` gradient). ``cos``, ``sin``: ``(L, D)`` from
:func:`imf_kernels.reference.rope_tables`. Prefix tangents: ``x_t`` is ``(n, L, H, D)``, ``n <= B``;
``y_t`` is ``(n, H, L, D)``.

**Forward-mode AD.** ``torch.func.jvp`` / ``forward_ad`` through :func:`qk_norm_rope`: the tangent
along ``x_dot`` is the fused kernel in tangent-only mode; ``y`` is linear in the weight and jointly
in ``(cos, sin)``, so those tangents are the primal kernel with ``w_dot`` / ``(cos_dot, sin_dot)``
in their place. The primal keeps its backward; the tangent is a constant to autograd.

Backward: only the primal (``y_t`` detached, nothing saved for it); ``rstd`` (fp32, ``(B, H, L)``)
is saved by the forward. Each backward program covers 64 tokens of one ``(batch, head)`` (in
``BLOCK_L`` tiles) and writes one fp32 partial row of ``dw``; the partials are summed in a fixed
order (deterministic). Both grids are 1-D over ``batch x heads x token tiles``: grid axes 1 and 2
stop at 65,535, and the backward no longer walks a whole sequence per ``(batch, head)`` program
(which left an H100 under-filled below 132 ``batch x heads``).

**Vectorised loads at any head_dim** (issue 13: at head_dim 72 every load was scalar and configs
spilled up to 21 KB). ``D = head_dim`` is a constexpr, so the ``d < D`` mask and the rotation
``rot(d)`` are known in groups of 8 (``D % 16 == 0``) or 4 (72); strides that are multiples of 16
bytes (checked by the launcher, :func:`imf_kernels._layout.stride_align`) are rebuilt as
visible multiples (``ALIGN``), since Triton does not specialise a stride like 72 and ignores
``tl.multiple_of`` on scalars. Everything is read 16 bytes at a time except the rotated partner at
head_dim 72, whose halves of 36 start 72 bytes apart (8-byte loads, cache hits of the main load).

Tested: fp32/fp16 on CPU under the Triton interpreter (``tests/test_dual_ops.py``); the bf16 GPU
tests there are written but were not run when this module was written (no GPU available).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_eps, check_float, check_prefix, describe, kernel_rule, per_thread, preferred, saved
from ._layout import aligned, stride_align
from ._tuning import autotune

# Candidate configs: BLOCK_L tokens x BLOCK_D = next_power_of_2(head_dim) columns, num_warps.
# Rule, from the sm_90 compile report (bf16, batch 32 x 276 tokens x 16 heads, head_dim 64 and 72;
# ``python -m bench compile``), applied per BLOCK_D by :func:`_fits`:
#   * 8 to 16 fp32 tile elements per thread: the forward with tangent keeps about ten such tiles live
#     (x, x[rot], x_t, x_t[rot], cos, sin, outputs); at 16 it needs <= 160 registers and spills
#     nothing, at 32 it reaches 255 (the old list's BLOCK_L = 128 with 2 warps spilled 10.7 KB); below
#     8 a thread's share of a row is under 16 bytes (8-byte loads);
#   * not 32 * num_warps == BLOCK_D: the 1-D weight load then gets one element per thread (scalar
#     2-byte loads; seen at (BLOCK_D 64, 2 warps) and (128, 4 warps)).
# That keeps 4-6 of these 20 per head_dim (head_dim 64: (4, 1), (8, 1), (16, 4), (32, 4), (32, 8),
# (64, 8)), all with 16-byte loads and no spill.
_CONFIGS = [triton.Config({"BLOCK_L": m}, num_warps=w) for m in (4, 8, 16, 32, 64) for w in (1, 2, 4, 8)]
_INTERPRET_CONFIG = triton.Config({"BLOCK_L": 16}, num_warps=4)
# Tokens one backward program covers (a multiple of every BLOCK_L): its fp32 dw partial row is 1/64
# of the bytes of dy and x it reads, and batch 32 x 16 heads x 276 tokens still make 2560 programs
# (132 SMs). The partial count depends on the shape only, so the backward is deterministic.
_BWD_TOKENS = 64


def _elements(config, meta) -> int:
    return config.kwargs["BLOCK_L"] * meta["BLOCK_D"]


def _fits(configs, meta):
    """The configs of the rule above for this ``BLOCK_D``."""
    ok = lambda c: 8 <= per_thread(c, _elements(c, meta)) <= 16 and 32 * c.num_warps != meta["BLOCK_D"]
    return [c for c in configs if ok(c)]


def _pinned(meta):
    return preferred(_fits(_CONFIGS, meta), lambda c: _elements(c, meta))


@triton.jit
def _rope(z, zr, cos, sin, sgn):
    """``z cos + sgn * z[rot] sin`` with ``zr = z[rot]`` already gathered."""
    return z * cos + sgn * zr * sin


@triton.jit
def _tile(pid, L, H, BLOCK_L: tl.constexpr):
    """``(token tile, head, batch)`` of a program of the 1-D grid ``B * H * cdiv(L, BLOCK_L)`` (grid axes
    1 and 2 stop at 65,535; axis 0 does not)."""
    n_l = tl.cdiv(L, BLOCK_L)
    bh = pid // n_l
    return pid % n_l, bh % H, (bh // H).to(tl.int64)


@autotune(candidates=_CONFIGS, key=["D", "WITH_PRIMAL", "WITH_TANGENT"], interpret_config=_INTERPRET_CONFIG,
          prune=_fits, pinned=_pinned, name="rope_op.qk_norm_rope_fwd")  # fmt: skip
@triton.jit
def _qk_norm_rope_fwd_kernel(
    X, XT, W, COS, SIN, Y, YT, RSTD,
    sx_b, sx_l, sx_h, sxt_b, sxt_l, sxt_h,
    L, H, n_t, eps,
    D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    WITH_PRIMAL: tl.constexpr, WITH_TANGENT: tl.constexpr,
):  # fmt: skip
    pid_l, h, b = _tile(tl.program_id(0), L, H, BLOCK_L)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    half: tl.constexpr = D // 2
    rot_d = tl.where(offs_d < half, offs_d + half, offs_d - half)
    sgn = tl.where(offs_d < half, -1.0, 1.0)[None, :]
    mask_d = offs_d < D
    mask = (offs_l < L)[:, None] & mask_d[None, :]

    w = tl.load(W + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    wr = tl.load(W + rot_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    tab = offs_l[:, None] * D
    cos = tl.load(COS + tab + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + tab + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)

    x_row = X + b * aligned(sx_b, ALIGN) + h * aligned(sx_h, ALIGN) + offs_l[:, None] * aligned(sx_l, ALIGN)
    x = tl.load(x_row + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    xr = tl.load(x_row + rot_d[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd_l = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    rstd = rstd_l[:, None]
    xn = x * rstd
    xnr = xr * rstd

    row_out = (b * H + h) * L + offs_l
    out = row_out[:, None] * D + offs_d[None, :]
    if WITH_PRIMAL:
        tl.store(RSTD + row_out, rstd_l, mask=offs_l < L)
        tl.store(Y + out, _rope(xn * w, xnr * wr, cos, sin, sgn).to(Y.dtype.element_ty), mask=mask)
    if WITH_TANGENT:
        if b < n_t:
            xt_row = XT + b * aligned(sxt_b, ALIGN) + h * aligned(sxt_h, ALIGN)
            xt_row += offs_l[:, None] * aligned(sxt_l, ALIGN)
            xt = tl.load(xt_row + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            xtr = tl.load(xt_row + rot_d[None, :], mask=mask, other=0.0).to(tl.float32)
            dot = (tl.sum(xn * xt, axis=1) / D)[:, None]
            zt = w * rstd * (xt - xn * dot)
            ztr = wr * rstd * (xtr - xnr * dot)
            tl.store(YT + out, _rope(zt, ztr, cos, sin, sgn).to(YT.dtype.element_ty), mask=mask)


@autotune(candidates=_CONFIGS, key=["D"], interpret_config=_INTERPRET_CONFIG, prune=_fits, pinned=_pinned,
          name="rope_op.qk_norm_rope_bwd")  # fmt: skip
@triton.jit
def _qk_norm_rope_bwd_kernel(
    DY, X, W, COS, SIN, RSTD, DX, DW_PARTIAL,
    sdy_b, sdy_h, sdy_l, sx_b, sx_l, sx_h,
    L, H,
    D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, TOKENS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_l, h, b = _tile(pid, L, H, TOKENS)
    offs_d = tl.arange(0, BLOCK_D)
    half: tl.constexpr = D // 2
    rot_d = tl.where(offs_d < half, offs_d + half, offs_d - half)
    sgn = tl.where(offs_d < half, -1.0, 1.0)[None, :]
    mask_d = offs_d < D
    w = tl.load(W + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    dy_head = DY + b * aligned(sdy_b, ALIGN) + h * aligned(sdy_h, ALIGN)
    x_head = X + b * aligned(sx_b, ALIGN) + h * aligned(sx_h, ALIGN)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, TOKENS, BLOCK_L):
        offs_l = pid_l * TOKENS + start + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        mask = mask_l[:, None] & mask_d[None, :]
        tab = offs_l[:, None] * D
        cos = tl.load(COS + tab + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        sinr = tl.load(SIN + tab + rot_d[None, :], mask=mask, other=0.0).to(tl.float32)
        dy_row = dy_head + offs_l[:, None] * aligned(sdy_l, ALIGN)
        dy = tl.load(dy_row + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        dyr = tl.load(dy_row + rot_d[None, :], mask=mask, other=0.0).to(tl.float32)
        dz = dy * cos - sgn * sinr * dyr
        x = tl.load(x_head + offs_l[:, None] * aligned(sx_l, ALIGN) + offs_d[None, :], mask=mask, other=0.0)
        rstd = tl.load(RSTD + (b * H + h) * L + offs_l, mask=mask_l, other=0.0)[:, None]
        xn = x.to(tl.float32) * rstd
        g = dz * w
        dot = (tl.sum(g * xn, axis=1) / D)[:, None]
        dx = rstd * (g - xn * dot)
        dx_off = ((b * L + offs_l[:, None]) * H + h) * D + offs_d[None, :]
        tl.store(DX + dx_off, dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dz * xn, axis=0)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * D + offs_d, dw, mask=mask_d)


def _validate(x, x_t, weight, cos, sin, eps) -> None:
    check_float("x", x, ndim=4)
    batch, seq, heads, d = x.shape
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got {describe(x)}")
    if d % 2:
        raise ValueError(f"x must have an even head_dim (last dim) for RoPE, got {describe(x)}")
    if x.stride(-1) != 1:
        raise ValueError(f"x must have unit stride in head_dim (last dim), got strides {x.stride()}")
    if x_t is not None:
        check_prefix("x_t", x_t, "x", x)
        if x_t.stride(-1) != 1:
            raise ValueError(f"x_t must have unit stride in head_dim (last dim), got strides {x_t.stride()}")
    check_float("weight", weight, ndim=1)
    if weight.shape[0] != d:
        raise ValueError(f"weight must have shape ({d},) (head_dim of x), got {describe(weight)}")
    for name, table in (("cos", cos), ("sin", sin)):
        check_float(name, table, ndim=2)
        if table.shape != (seq, d):
            raise ValueError(f"{name} must have shape ({seq}, {d}) got {describe(table)}")
    for name, t in (("weight", weight), ("cos", cos), ("sin", sin)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {describe(t)}")
    check_eps(eps)


def _forward(x, x_t, weight, cos, sin, eps, *, primal=True):
    """``(y, y_t, rstd)`` with ``y``: ``(B, H, L, D)`` contiguous, ``rstd``: ``(B, H, L)`` fp32; ``y`` and
    ``rstd`` are ``None`` when not ``primal`` (tangent only), ``y_t`` when ``x_t`` is ``None``."""
    batch, seq, heads, d = x.shape
    xt = x_t if x_t is not None else x
    y = torch.empty((batch, heads, seq, d), dtype=x.dtype, device=x.device) if primal else None
    y_t = torch.empty((xt.shape[0], heads, seq, d), dtype=x.dtype, device=x.device) if x_t is not None else None
    rstd = torch.empty((batch, heads, seq), dtype=torch.float32, device=x.device) if primal else None
    grid = lambda meta: (batch * heads * triton.cdiv(seq, meta["BLOCK_L"]),)
    _qk_norm_rope_fwd_kernel[grid](
        x, xt, weight, cos, sin, x if y is None else y, x if y_t is None else y_t, x if rstd is None else rstd,
        x.stride(0), x.stride(1), x.stride(2), xt.stride(0), xt.stride(1), xt.stride(2),
        seq, heads, xt.shape[0] if x_t is not None else 0, eps,
        D=d, BLOCK_D=triton.next_power_of_2(d), ALIGN=stride_align(x, xt),
        WITH_PRIMAL=primal, WITH_TANGENT=x_t is not None,
    )  # fmt: skip
    return y, y_t, rstd


def _backward(dy, x, weight, cos, sin, rstd):
    batch, seq, heads, d = x.shape
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = torch.empty((batch, seq, heads, d), dtype=x.dtype, device=x.device)
    programs = batch * heads * triton.cdiv(seq, _BWD_TOKENS)
    dw_partial = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    grid = (programs,)
    _qk_norm_rope_bwd_kernel[grid](
        dy, x, weight, cos, sin, rstd, dx, dw_partial,
        dy.stride(0), dy.stride(1), dy.stride(2), x.stride(0), x.stride(1), x.stride(2),
        seq, heads,
        D=d, BLOCK_D=triton.next_power_of_2(d), ALIGN=stride_align(dy, x), TOKENS=_BWD_TOKENS,
    )  # fmt: skip
    return dx, dw_partial.sum(0).to(weight.dtype)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _QKNormRopeFn(torch.autograd.Function):
    """Dual QK-RMSNorm + RoPE ``(y, y_t, rstd)``; differentiable in ``y`` only (``y_t`` and ``rstd``
    non-differentiable, no gradient for ``x_t``; ``cos``, ``sin`` are constants to backward).

    Forward-mode rule: the tangent along ``x_dot`` comes from the fused kernel in tangent-only mode.
    ``y`` is linear in the weight and, jointly, in ``(cos, sin)``, so the tangents along ``w_dot``
    and ``(cos_dot, sin_dot)`` are the primal kernel with those in place of the weight / the tables.
    """

    @staticmethod
    def forward(x, x_t, weight, cos, sin, eps):
        return _forward(x, x_t, weight.contiguous(), cos.contiguous(), sin.contiguous(), eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, weight, cos, sin, eps = inputs
        _, y_t, rstd = output
        weight, cos, sin = weight.contiguous(), cos.contiguous(), sin.contiguous()
        ctx.eps = eps
        ctx.save_for_backward(x, weight, cos, sin, rstd)
        ctx.save_for_forward(x, weight, cos, sin)
        ctx.mark_non_differentiable(*(t for t in (y_t, rstd) if t is not None))

    @staticmethod
    @kernel_rule
    def backward(ctx, dy, _dy_t, _drstd):
        x, weight, cos, sin, rstd = saved(ctx)
        dx, dw = _backward(dy, x, weight, cos, sin, rstd)
        return dx, None, dw, None, None, None

    @staticmethod
    @kernel_rule
    def jvp(ctx, x_dot, _x_t_dot, w_dot, cos_dot, sin_dot, _eps_dot):
        x, weight, cos, sin = saved(ctx)
        parts = []
        if x_dot is not None:
            parts.append(_forward(x, _unit_last_stride(x_dot), weight, cos, sin, ctx.eps, primal=False)[1])
        if w_dot is not None:
            parts.append(_forward(x, None, w_dot.contiguous(), cos, sin, ctx.eps)[0])
        if cos_dot is not None or sin_dot is not None:
            tables = [torch.zeros_like(cos) if t is None else t.contiguous() for t in (cos_dot, sin_dot)]
            parts.append(_forward(x, None, weight, *tables, ctx.eps)[0])
        return (sum(parts[1:], parts[0]) if parts else None), None, None


def qk_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``rope(rms_norm(x, weight), cos, sin)`` with the head transpose folded in.

    ``x``: ``(B, L, H, D)``, any strides with unit stride in ``D`` (e.g. ``qkv[:, :, 0]`` of a
    ``(B, L, 3, H, D)`` projection); ``weight``: ``(D,)``; ``cos``, ``sin``: ``(L, D)``.
    Returns ``y``: ``(B, H, L, D)`` contiguous, dtype of ``x``; differentiable in ``x`` and ``weight``
    (``cos``/``sin`` are constants and get no gradient).
    """
    _validate(x, None, weight, cos, sin, eps)
    return _QKNormRopeFn.apply(x, None, weight, cos, sin, eps)[0]


def qk_norm_rope_jvp(
    x: torch.Tensor,
    x_t: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, y_t)``: :func:`qk_norm_rope` and its tangent along ``x_t`` (``(n, L, H, D)``, ``n <= B``).

    ``y_t`` is ``(n, H, L, D)`` contiguous and detached.
    """
    _validate(x, x_t, weight, cos, sin, eps)
    return _QKNormRopeFn.apply(x, x_t, weight, cos, sin, eps)[:2]
