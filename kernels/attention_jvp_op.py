"""Fused attention JVP: primal ``o`` and tangent ``o_t`` in one flash-style forward pass.

Math, per (batch, head), ``s = scale``, tangents ``q_t, k_t, v_t`` of ``q, k, v``::

    forward   S   = s q k^T                 P = softmax_rows(S)          o = P v
    tangent   S_t = s (q_t k^T + q k_t^T)   mu = rowsum(P * S_t)
              P_t = P * (S_t - mu)          o_t = P_t v + P v_t
    backward  of ``o`` only, exactly as :mod:`imf_kernels.attention_op` (the MeanFlow losses stop
              the gradient of the tangent, so ``o_t`` is detached and nothing is saved for it)

Blockwise, the tangent terms share the primal's online-softmax rescaling. With ``p = 2^(x - m)``
the unnormalised probabilities of a key block (``x = S log2 e``, running max ``m``) and
``alpha = 2^(m_old - m)``, each program keeps, per query row::

    l   = alpha l + rowsum(p)                     (softmax denominator)
    r   = alpha r + rowsum(p * S_t)               (so mu = r / l once all keys are seen)
    c'  = r / l                                   (running estimate of mu)
    acc = alpha acc + p v                         (-> o   = acc / l)
    t   = alpha t + (c - c') alpha acc_old + (p * (S_t - c')) v + p v_t
                                                  (-> o_t = t / l)

The invariant is ``t = sum_j p_j (S_t,j - c) v_j + sum_j p_j v_t,j`` for the current shift ``c``;
at the end ``c = mu``, so ``t / l = P_t v + P v_t`` exactly. Centring ``S_t`` on the running mean
before the product is rounded to the input dtype for the ``v`` matmul keeps the rounding error
proportional to ``|P_t|`` rather than ``|P * S_t|`` (the two differ a lot when ``S_t`` has a large
common offset; at ``seq = 1``, ``P_t = 0`` exactly). ``P_t v`` and ``P v_t`` share the accumulator
``t`` (both are rescaled by the same ``alpha``), which saves a ``BLOCK_M x BLOCK_D`` fp32 register
tile against keeping them apart. ``S_t`` and ``p * (S_t - c')`` are formed in fp32. The forward
costs 6 matmuls of ``L x L x D`` (``S``, the two of ``S_t``, ``P v``, ``P_t v``, ``P v_t``)
against 2 for the primal, and O(L) memory; ``lse`` is saved for the shared backward.

Prefix tangents (see :mod:`imf_kernels.reference`): ``q_t, k_t, v_t`` may cover only the first
``n <= batch`` samples. The fused kernel runs on ``q[:n]`` and the plain forward kernel of
:mod:`imf_kernels.attention_op` on ``q[n:]``, both writing views of one ``o`` and one ``lse``
(batch is the leading dim, so the views are plain strided tensors); one backward then covers the
whole batch.

Tested: CPU Triton interpreter in fp32/fp16 against ``torch.func.jvp`` of math attention in fp64;
bf16 and long sequences only in the GPU-marked tests. Autotune configs target H100.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning
from . import attention_op as flash
from ._checks import check_like, check_prefix
from .attention_op import load_rows, tile_ptrs


@triton.jit
def _jvp_inner(
    acc, acc_t, l_i, m_i, r_i, c_i, q, q_t, k_ptrs, v_ptrs, kt_ptrs, vt_ptrs,
    stride_kl, stride_vl, stride_ktl, stride_vtl, offs_n, d_ok, qk_scale, scale,
    start: tl.constexpr, end: tl.constexpr, seq_len: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Primal and tangent online-softmax update over key blocks ``[start, end)``."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_ptrs + start_n * stride_kl, cols, seq_len, d_ok, MASK_N, EVEN_D)
        k_t = load_rows(kt_ptrs + start_n * stride_ktl, cols, seq_len, d_ok, MASK_N, EVEN_D)
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s_t = tl.dot(q_t, tl.trans(k), input_precision=PRECISION)
        s_t = tl.dot(q, tl.trans(k_t), s_t, input_precision=PRECISION) * scale
        if MASK_N:
            x = tl.where((cols < seq_len)[None, :], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        p = tl.math.exp2(x - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        r_i = r_i * alpha + tl.sum(p * s_t, 1)
        c_new = r_i / l_i
        acc = acc * alpha[:, None]
        acc_t = acc_t * alpha[:, None] + (c_i - c_new)[:, None] * acc
        v = load_rows(v_ptrs + start_n * stride_vl, cols, seq_len, d_ok, MASK_N, EVEN_D)
        v_t = load_rows(vt_ptrs + start_n * stride_vtl, cols, seq_len, d_ok, MASK_N, EVEN_D)
        p_lo = p.to(v.dtype)
        acc_t = tl.dot((p * (s_t - c_new[:, None])).to(v.dtype), v, acc_t, input_precision=PRECISION)
        acc_t = tl.dot(p_lo, v_t, acc_t, input_precision=PRECISION)
        acc = tl.dot(p_lo, v, acc, input_precision=PRECISION)
        m_i = m_new
        c_i = c_new
    return acc, acc_t, l_i, m_i, r_i, c_i


def _jvp_smem(meta: dict, num_stages: int) -> int:
    """Shared memory of :func:`_attn_jvp_fwd`: ``q, q_t`` plus ``num_stages`` buffered ``k, v, k_t, v_t``."""
    tile = meta["BLOCK_D"] * meta["Q"].element_size()
    return tile * (2 * meta["BLOCK_M"] + num_stages * 4 * meta["BLOCK_N"])


JVP_CONFIGS = _tuning.configs(
    BLOCK_M=(64, 128), BLOCK_N=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4)
)


@_tuning.autotune(
    candidates=JVP_CONFIGS,
    key=["SEQ", "HEAD_DIM"],
    smem_bytes=_jvp_smem,
    tensor_arg="Q",
    interpret_config=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
)
@triton.jit
def _attn_jvp_fwd(
    Q, K, V, QT, KT, VT, O, OT, LSE,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_qtb, stride_qth, stride_qtl, stride_qtd,
    stride_ktb, stride_kth, stride_ktl, stride_ktd,
    stride_vtb, stride_vth, stride_vtl, stride_vtd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_otb, stride_oth, stride_otl, stride_otd,
    n_heads, qk_scale, scale,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: ``o, o_t`` and ``lse`` for ``BLOCK_M`` query rows of one (batch, head)."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = load_rows(
        tile_ptrs(Q, off_b, off_h, offs_m, offs_d, stride_qb, stride_qh, stride_ql, stride_qd),
        offs_m, SEQ, d_ok, True, EVEN_D,
    )
    q_t = load_rows(
        tile_ptrs(QT, off_b, off_h, offs_m, offs_d, stride_qtb, stride_qth, stride_qtl, stride_qtd),
        offs_m, SEQ, d_ok, True, EVEN_D,
    )
    k_ptrs = tile_ptrs(K, off_b, off_h, offs_n, offs_d, stride_kb, stride_kh, stride_kl, stride_kd)
    v_ptrs = tile_ptrs(V, off_b, off_h, offs_n, offs_d, stride_vb, stride_vh, stride_vl, stride_vd)
    kt_ptrs = tile_ptrs(KT, off_b, off_h, offs_n, offs_d, stride_ktb, stride_kth, stride_ktl, stride_ktd)
    vt_ptrs = tile_ptrs(VT, off_b, off_h, offs_n, offs_d, stride_vtb, stride_vth, stride_vtl, stride_vtd)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    r_i = tl.zeros([BLOCK_M], tl.float32)
    c_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full: tl.constexpr = (SEQ // BLOCK_N) * BLOCK_N
    acc, acc_t, l_i, m_i, r_i, c_i = _jvp_inner(
        acc, acc_t, l_i, m_i, r_i, c_i, q, q_t, k_ptrs, v_ptrs, kt_ptrs, vt_ptrs,
        stride_kl, stride_vl, stride_ktl, stride_vtl, offs_n, d_ok, qk_scale, scale,
        0, n_full, SEQ, BLOCK_N, False, EVEN_D, PRECISION,
    )
    acc, acc_t, l_i, m_i, r_i, c_i = _jvp_inner(
        acc, acc_t, l_i, m_i, r_i, c_i, q, q_t, k_ptrs, v_ptrs, kt_ptrs, vt_ptrs,
        stride_kl, stride_vl, stride_ktl, stride_vtl, offs_n, d_ok, qk_scale, scale,
        n_full, SEQ, SEQ, BLOCK_N, True, EVEN_D, PRECISION,
    )

    row_ok = offs_m < SEQ
    mask = row_ok[:, None] & d_ok[None, :]
    l_inv = 1.0 / l_i
    o = acc * l_inv[:, None]
    o_t = acc_t * l_inv[:, None]
    tl.store(LSE + off_bh.to(tl.int64) * SEQ + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    o_ptrs = tile_ptrs(O, off_b, off_h, offs_m, offs_d, stride_ob, stride_oh, stride_ol, stride_od)
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=mask)
    ot_ptrs = tile_ptrs(OT, off_b, off_h, offs_m, offs_d, stride_otb, stride_oth, stride_otl, stride_otd)
    tl.store(ot_ptrs, o_t.to(OT.dtype.element_ty), mask=mask)


def validate_tangents(q, q_t, k_t, v_t) -> None:
    """``q_t`` is a batch prefix of ``q`` (``n <= batch`` samples); ``k_t, v_t`` are shaped like ``q_t``."""
    check_prefix("q_t", q_t, "q", q)
    check_like("k_t", k_t, "q_t", q_t)
    check_like("v_t", v_t, "q_t", q_t)


def jvp_forward_into(q, k, v, q_t, k_t, v_t, o, o_t, lse, scale: float) -> None:
    """Run the fused kernel on validated inputs of one batch size, writing ``o, o_t, lse`` (views allowed:
    ``o, o_t`` through their strides, ``lse`` contiguous ``(batch, heads, seq)``)."""
    batch, heads, seq, _ = q.shape
    if q.numel() == 0:
        return
    _attn_jvp_fwd[flash.row_grid("BLOCK_M", seq, batch * heads)](
        q, k, v, q_t, k_t, v_t, o, o_t, lse,
        *q.stride(), *k.stride(), *v.stride(), *q_t.stride(), *k_t.stride(), *v_t.stride(),
        *o.stride(), *o_t.stride(),
        heads, scale * flash.LOG2E, scale,
        SEQ=seq, **flash.kernel_meta(q),
    )


class _AttentionJVP(torch.autograd.Function):
    """``(o, o_t, lse)``: ``o`` differentiable through the flash backward, ``o_t`` and ``lse`` not."""

    @staticmethod
    def forward(q, k, v, q_t, k_t, v_t, scale):
        n = q_t.shape[0]
        o, lse = flash.empty_outputs(q)
        o_t = flash.alloc(q_t)
        jvp_forward_into(q[:n], k[:n], v[:n], q_t, k_t, v_t, o[:n], o_t, lse[:n], scale)
        flash.flash_forward_into(q[n:], k[n:], v[n:], o[n:], lse[n:], scale)
        return o, o_t, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, *_, scale = inputs
        o, o_t, lse = output
        ctx.mark_non_differentiable(o_t, lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, do, _do_t, _dlse):
        return (*flash.flash_backward(do, *ctx.saved_tensors, ctx.scale), None, None, None, None)


def attention_jvp(q, k, v, q_t, k_t, v_t, *, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, o_t)``: flash attention and its forward-mode derivative along ``(q_t, k_t, v_t)``.

    Inputs as :func:`imf_kernels.attention`; the tangents may cover a leading-batch prefix
    (``q_t.shape[0] = n <= q.shape[0]``, ``k_t, v_t`` shaped like ``q_t``), and ``o_t`` has
    ``q_t``'s shape. ``o`` is differentiable w.r.t. ``q, k, v``; ``o_t`` is detached.
    """
    scale = flash.validate(q, k, v, scale)
    validate_tangents(q, q_t, k_t, v_t)
    o, o_t, _ = _AttentionJVP.apply(q, k, v, q_t, k_t, v_t, scale)
    return o, o_t
