"""Flash attention (non-causal): forward and backward Triton kernels.

Math, per (batch, head), ``q, k, v`` of shape ``(L, D)``, ``s = scale`` (default ``D**-0.5``)::

    S = s q k^T        P = softmax_rows(S)        o = P v

Forward (FlashAttention-2, Dao 2023; Triton tutorial 06-fused-attention): each program owns
``BLOCK_M`` query rows and streams ``BLOCK_N``-row blocks of ``k, v`` with an online softmax in
the log2 domain. With ``x = S log2(e)`` for the current key block::

    m' = max(m, rowmax(x))      p = 2^(x - m')      alpha = 2^(m - m')
    l  = alpha l + rowsum(p)    acc = alpha acc + p v

and at the end ``o = acc / l`` and ``lse = m + log2(l)`` (log-sum-exp of ``x`` in base 2), which is
saved for backward: ``P = 2^(x - lse)``. Nothing ``L x L`` is ever stored.

Backward, given ``do = dLoss/do``::

    delta = rowsum(o * do)                 (= rowsum(P * dP), preprocess kernel)
    dP = do v^T        dS = P * (dP - delta)
    dv = P^T do        dk = s dS^T q       dq = s dS k

computed by two kernels without atomics (so the gradients are deterministic): one program per
key block accumulates ``dk, dv`` over all query blocks, one program per query block
accumulates ``dq`` over all key blocks; both recompute ``P`` from ``lse``.

The tangent (forward-mode) of this op is :mod:`imf_kernels.attention_jvp_op`, which shares the
backward below.

Numerics: scores, softmax statistics and all accumulators are fp32; ``P`` and ``dS`` are
rounded to the input dtype only as operands of the ``v``/``q``/``k`` matmuls (as in
FlashAttention). fp32 inputs use IEEE fp32 matmuls (not TF32), like torch's default.
Inputs are read through their strides, so a ``(B, L, H, D)`` tensor viewed as ``(B, H, L, D)``
is used in place; outputs are allocated with ``empty_like`` and keep that layout.

Block sizes: the head dim is one ``BLOCK_D = next_power_of_2(head_dim)`` tile (min 16), masked
when ``head_dim`` is not a power of two (72 runs as 128: the padding costs matmul work, not
memory traffic). ``seq`` is a compile-time constant, as in the Triton tutorial: the loop trip
counts and the ragged tail are static (full key blocks run unmasked, the tail block masked),
at the price of one compile per sequence length; the autotuner keys on it anyway. (It also
keeps the kernels runnable in the Triton 3.6 interpreter with NumPy 2.4, which cannot use a
runtime scalar as a ``range`` bound.)

Tested: CPU Triton interpreter in fp32/fp16 (interpreted bf16 ``tl.dot`` is wrong, so bf16 is
covered only by the GPU-marked tests); the autotune configs target H100.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning
from ._checks import check_float, check_like

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


@triton.jit
def tile_ptrs(X, off_b, off_h, rows, offs_d, stride_b, stride_h, stride_l, stride_d):
    """Pointers to ``X[off_b, off_h, rows, offs_d]`` of a strided ``(batch, heads, seq, head_dim)`` tensor."""
    return X + off_b * stride_b + off_h * stride_h + rows[:, None] * stride_l + offs_d[None, :] * stride_d


@triton.jit
def load_rows(ptrs, rows, n_rows, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a ``(rows, BLOCK_D)`` tile, zero-filling rows ``>= n_rows`` (if ``MASK_ROWS``) and padded
    head-dim columns (unless ``EVEN_D``); without masks the load is unpredicated."""
    if MASK_ROWS:
        x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_n, d_ok, qk_scale,
    start: tl.constexpr, end: tl.constexpr, seq_len: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online-softmax update over key blocks ``[start, end)``; ``MASK_N`` only for the ragged tail."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_ptrs + start_n * stride_kl, cols, seq_len, d_ok, MASK_N, EVEN_D)
        v = load_rows(v_ptrs + start_n * stride_vl, cols, seq_len, d_ok, MASK_N, EVEN_D)
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASK_N:
            x = tl.where((cols < seq_len)[None, :], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        p = tl.math.exp2(x - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def _fwd_smem(meta: dict, num_stages: int) -> int:
    """Shared memory of :func:`_attn_fwd`: the ``q`` tile plus ``num_stages`` buffered ``k, v`` tiles."""
    tile = meta["BLOCK_D"] * meta["Q"].element_size()
    return tile * (meta["BLOCK_M"] + num_stages * 2 * meta["BLOCK_N"])


FWD_CONFIGS = _tuning.configs(BLOCK_M=(64, 128), BLOCK_N=(64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))


@_tuning.autotune(
    candidates=FWD_CONFIGS,
    key=["SEQ", "HEAD_DIM"],
    smem_bytes=_fwd_smem,
    tensor_arg="Q",
    interpret_config=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
)
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    n_heads, qk_scale,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: ``BLOCK_M`` query rows of one (batch, head). Writes ``o`` and ``lse`` (log2 domain,
    ``LSE`` contiguous ``(batch, heads, SEQ)``)."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = tile_ptrs(Q, off_b, off_h, offs_m, offs_d, stride_qb, stride_qh, stride_ql, stride_qd)
    k_ptrs = tile_ptrs(K, off_b, off_h, offs_n, offs_d, stride_kb, stride_kh, stride_kl, stride_kd)
    v_ptrs = tile_ptrs(V, off_b, off_h, offs_n, offs_d, stride_vb, stride_vh, stride_vl, stride_vd)
    q = load_rows(q_ptrs, offs_m, SEQ, d_ok, True, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full: tl.constexpr = (SEQ // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_n, d_ok, qk_scale,
        0, n_full, SEQ, BLOCK_N, False, EVEN_D, PRECISION,
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_n, d_ok, qk_scale,
        n_full, SEQ, SEQ, BLOCK_N, True, EVEN_D, PRECISION,
    )

    row_ok = offs_m < SEQ
    tl.store(LSE + off_bh.to(tl.int64) * SEQ + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    o_ptrs = tile_ptrs(O, off_b, off_h, offs_m, offs_d, stride_ob, stride_oh, stride_ol, stride_od)
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _rows_smem(meta: dict, num_stages: int) -> int:
    """Shared memory of the backward preprocess: ``o`` and ``do`` tiles (no pipelined loop)."""
    return 2 * meta["BLOCK_M"] * meta["BLOCK_D"] * meta["O"].element_size()


PREPROCESS_CONFIGS = _tuning.configs(BLOCK_M=(64, 128), num_warps=(4, 8), num_stages=(1,))


@_tuning.autotune(
    candidates=PREPROCESS_CONFIGS,
    key=["SEQ", "HEAD_DIM"],
    smem_bytes=_rows_smem,
    tensor_arg="O",
    interpret_config=triton.Config({"BLOCK_M": 32}),
)
@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    n_heads,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``delta = rowsum(o * do)`` in fp32 for ``BLOCK_M`` rows."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    o_ptrs = tile_ptrs(O, off_b, off_h, offs_m, offs_d, stride_ob, stride_oh, stride_ol, stride_od)
    do_ptrs = tile_ptrs(DO, off_b, off_h, offs_m, offs_d, stride_dob, stride_doh, stride_dol, stride_dod)
    o = load_rows(o_ptrs, offs_m, SEQ, d_ok, True, EVEN_D).to(tl.float32)
    do = load_rows(do_ptrs, offs_m, SEQ, d_ok, True, EVEN_D).to(tl.float32)
    tl.store(DELTA + off_bh.to(tl.int64) * SEQ + offs_m, tl.sum(o * do, 1), mask=offs_m < SEQ)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_ql, stride_dol, offs_m, d_ok, qk_scale,
    start: tl.constexpr, end: tl.constexpr, seq_len: tl.constexpr,
    BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate ``dk`` (unscaled ``dS^T q``) and ``dv = P^T do`` over query blocks ``[start, end)``.

    Query rows past the end get ``lse = +inf``, so their ``P`` is exactly zero."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        q = load_rows(q_ptrs + start_m * stride_ql, rows, seq_len, d_ok, MASK_M, EVEN_D)
        do = load_rows(do_ptrs + start_m * stride_dol, rows, seq_len, d_ok, MASK_M, EVEN_D)
        if MASK_M:
            lse = tl.load(lse_ptrs + start_m, mask=rows < seq_len, other=float("inf"))
            delta = tl.load(delta_ptrs + start_m, mask=rows < seq_len, other=0.0)
        else:
            lse = tl.load(lse_ptrs + start_m)
            delta = tl.load(delta_ptrs + start_m)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


def _dkdv_smem(meta: dict, num_stages: int) -> int:
    """Shared memory of :func:`_attn_bwd_dkdv`: resident ``k, v`` plus buffered ``q, do`` tiles."""
    tile = meta["BLOCK_D"] * meta["Q"].element_size()
    return tile * (2 * meta["BLOCK_N"] + num_stages * 2 * meta["BLOCK_M"])


DKDV_CONFIGS = _tuning.configs(BLOCK_M=(32, 64), BLOCK_N=(64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))


@_tuning.autotune(
    candidates=DKDV_CONFIGS,
    key=["SEQ", "HEAD_DIM"],
    smem_bytes=_dkdv_smem,
    tensor_arg="Q",
    interpret_config=triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}),
)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    n_heads, qk_scale, scale,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: ``dk, dv`` for ``BLOCK_N`` key rows of one (batch, head), looping over all queries."""
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    k_ptrs = tile_ptrs(K, off_b, off_h, offs_n, offs_d, stride_kb, stride_kh, stride_kl, stride_kd)
    v_ptrs = tile_ptrs(V, off_b, off_h, offs_n, offs_d, stride_vb, stride_vh, stride_vl, stride_vd)
    k = load_rows(k_ptrs, offs_n, SEQ, d_ok, True, EVEN_D)
    v = load_rows(v_ptrs, offs_n, SEQ, d_ok, True, EVEN_D)
    q_ptrs = tile_ptrs(Q, off_b, off_h, offs_m, offs_d, stride_qb, stride_qh, stride_ql, stride_qd)
    do_ptrs = tile_ptrs(DO, off_b, off_h, offs_m, offs_d, stride_dob, stride_doh, stride_dol, stride_dod)
    lse_ptrs = LSE + off_bh.to(tl.int64) * SEQ + offs_m
    delta_ptrs = DELTA + off_bh.to(tl.int64) * SEQ + offs_m

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_full: tl.constexpr = (SEQ // BLOCK_M) * BLOCK_M
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_ql, stride_dol, offs_m, d_ok, qk_scale,
        0, m_full, SEQ, BLOCK_M, False, EVEN_D, PRECISION,
    )
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_ql, stride_dol, offs_m, d_ok, qk_scale,
        m_full, SEQ, SEQ, BLOCK_M, True, EVEN_D, PRECISION,
    )

    mask = (offs_n < SEQ)[:, None] & d_ok[None, :]
    dk_ptrs = tile_ptrs(DK, off_b, off_h, offs_n, offs_d, stride_dkb, stride_dkh, stride_dkl, stride_dkd)
    dv_ptrs = tile_ptrs(DV, off_b, off_h, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvl, stride_dvd)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_n, d_ok, qk_scale,
    start: tl.constexpr, end: tl.constexpr, seq_len: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate ``dq`` (unscaled ``dS k``) over key blocks ``[start, end)``."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_ptrs + start_n * stride_kl, cols, seq_len, d_ok, MASK_N, EVEN_D)
        v = load_rows(v_ptrs + start_n * stride_vl, cols, seq_len, d_ok, MASK_N, EVEN_D)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASK_N:
            p = tl.where((cols < seq_len)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


def _dq_smem(meta: dict, num_stages: int) -> int:
    """Shared memory of :func:`_attn_bwd_dq`: resident ``q, do`` plus buffered ``k, v`` tiles."""
    tile = meta["BLOCK_D"] * meta["Q"].element_size()
    return tile * (2 * meta["BLOCK_M"] + num_stages * 2 * meta["BLOCK_N"])


DQ_CONFIGS = _tuning.configs(BLOCK_M=(64, 128), BLOCK_N=(32, 64), num_warps=(4, 8), num_stages=(2, 3, 4))


@_tuning.autotune(
    candidates=DQ_CONFIGS,
    key=["SEQ", "HEAD_DIM"],
    smem_bytes=_dq_smem,
    tensor_arg="Q",
    interpret_config=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    n_heads, qk_scale, scale,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: ``dq`` for ``BLOCK_M`` query rows of one (batch, head), looping over all keys."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < SEQ

    q_ptrs = tile_ptrs(Q, off_b, off_h, offs_m, offs_d, stride_qb, stride_qh, stride_ql, stride_qd)
    do_ptrs = tile_ptrs(DO, off_b, off_h, offs_m, offs_d, stride_dob, stride_doh, stride_dol, stride_dod)
    q = load_rows(q_ptrs, offs_m, SEQ, d_ok, True, EVEN_D)
    do = load_rows(do_ptrs, offs_m, SEQ, d_ok, True, EVEN_D)
    lse = tl.load(LSE + off_bh.to(tl.int64) * SEQ + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * SEQ + offs_m, mask=row_ok, other=0.0)
    k_ptrs = tile_ptrs(K, off_b, off_h, offs_n, offs_d, stride_kb, stride_kh, stride_kl, stride_kd)
    v_ptrs = tile_ptrs(V, off_b, off_h, offs_n, offs_d, stride_vb, stride_vh, stride_vl, stride_vd)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full: tl.constexpr = (SEQ // BLOCK_N) * BLOCK_N
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_n, d_ok, qk_scale,
        0, n_full, SEQ, BLOCK_N, False, EVEN_D, PRECISION,
    )
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kl, stride_vl, offs_n, d_ok, qk_scale,
        n_full, SEQ, SEQ, BLOCK_N, True, EVEN_D, PRECISION,
    )

    dq_ptrs = tile_ptrs(DQ, off_b, off_h, offs_m, offs_d, stride_dqb, stride_dqh, stride_dql, stride_dqd)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def validate(q, k, v, scale) -> float:
    """Check ``q, k, v`` (see module docstring) and return the softmax scale to use."""
    check_float("q", q, ndim=4)
    check_like("k", k, "q", q)
    check_like("v", v, "q", q)
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim must be in [1, {MAX_HEAD_DIM}], got shape {tuple(q.shape)}")
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def kernel_meta(q: torch.Tensor) -> dict:
    """Compile-time arguments shared by every attention kernel for inputs like ``q``."""
    head_dim = q.shape[-1]
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def row_grid(block: str, seq: int, batch_heads: int):
    """Launch grid: one program per ``block``-sized slice of ``seq`` rows, per (batch, head)."""
    return lambda meta: (triton.cdiv(seq, meta[block]), batch_heads)


def alloc(like: torch.Tensor, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None):
    """An uninitialised buffer every element of which a kernel writes: ``empty_like(like)`` (same strides
    when ``like`` is dense, e.g. a ``(B, L, H, D)`` transpose view), or contiguous ``shape, dtype`` on
    ``like``'s device. The tests swap this for a NaN-filled version to check that."""
    if shape is None:
        return torch.empty_like(like)
    return torch.empty(shape, dtype=dtype, device=like.device)


def empty_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``o`` like ``q`` and the fp32 log-sum-exp ``lse`` of shape ``(batch, heads, seq)``."""
    return alloc(q), alloc(q, q.shape[:3], torch.float32)


def flash_forward_into(q, k, v, o, lse, scale: float) -> None:
    """Run the forward kernel on validated ``q, k, v``, writing ``o`` and ``lse`` (which may be views
    into larger buffers: ``o`` through its strides, ``lse`` contiguous ``(batch, heads, seq)``)."""
    batch, heads, seq, _ = q.shape
    if q.numel() == 0:
        return
    _attn_fwd[row_grid("BLOCK_M", seq, batch * heads)](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        heads, scale * LOG2E,
        SEQ=seq, **kernel_meta(q),
    )


def flash_backward(do, q, k, v, o, lse, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` from the saved forward (shared with :mod:`imf_kernels.attention_jvp_op`)."""
    batch, heads, seq, _ = q.shape
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    if q.numel() == 0:
        return dq, dk, dv
    meta = kernel_meta(q)
    delta = alloc(lse)
    _attn_bwd_preprocess[row_grid("BLOCK_M", seq, batch * heads)](
        o, do, delta, *o.stride(), *do.stride(), heads,
        SEQ=seq, HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"],
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    _attn_bwd_dkdv[row_grid("BLOCK_N", seq, batch * heads)](
        q, k, v, do, lse, delta, dk, dv, *strides, *dk.stride(), *dv.stride(),
        heads, scale * LOG2E, scale, SEQ=seq, **meta,
    )
    _attn_bwd_dq[row_grid("BLOCK_M", seq, batch * heads)](
        q, k, v, do, lse, delta, dq, *strides, *dq.stride(),
        heads, scale * LOG2E, scale, SEQ=seq, **meta,
    )
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    """``o = attention(q, k, v)``; ``lse`` is a non-differentiable second output kept for backward."""

    @staticmethod
    def forward(q, k, v, scale):
        o, lse = empty_outputs(q)
        flash_forward_into(q, k, v, o, lse, scale)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, do, _dlse):
        return (*flash_backward(do, *ctx.saved_tensors, ctx.scale), None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None):
    """Flash attention ``softmax(q k^T * scale) v`` over ``(batch, heads, seq, head_dim)`` inputs.

    fp32/fp16/bf16, any ``seq``, ``1 <= head_dim <= 128``, any strides; ``scale`` defaults to
    ``head_dim ** -0.5``. Differentiable w.r.t. ``q, k, v``; O(seq) extra memory.
    """
    scale = validate(q, k, v, scale)
    return _Attention.apply(q, k, v, scale)[0]
