"""Flash attention backward, deterministic path: the Triton kernels, the preprocess launch
(:func:`backward_stats`) and the two-kernel launch (:func:`deterministic_backward`).
:func:`imf_kernels.attention_bwd.flash_backward` runs the preprocess, then this path or the atomic one
(:mod:`imf_kernels.attention_bwd_atomic_op`, which reuses the dk/dv kernel of this module).

The math (per (batch, head), ``S = s q k^T``, ``P = softmax_rows(S)``, ``o = P v``; see
:mod:`imf_kernels.attention_op`), given ``do = dLoss/do`` and the forward's log-sum-exp ``lse``
(log2 domain, so ``P = 2^(S log2(e) - lse)``)::

    delta = rowsum(o * do)                 (= rowsum(P * dP), preprocess kernel)
    dP = do v^T        dS = P * (dP - delta)
    dv = P^T do        dk = s dS^T q       dq = s dS k

``lse`` and ``delta`` enter the main kernels from buffers padded to a multiple of ``STATS_PAD`` rows
per (batch, head) (``lse = +inf``, ``delta = 0`` past the end, written by the preprocess kernel), so
the per-block loads of these statistics are never masked: a query row past the end has ``P = 0``
exactly. (Masking them instead cost 158 of 482 SASS instructions per iteration of the dk/dv loop on
sm_90 at iMF's 276 tokens.)

Two kernels without atomics (so the gradients are deterministic): one program per key block
accumulates ``dk, dv`` over all query blocks, one program per query block
accumulates ``dq`` over all key blocks; both recompute ``P`` from ``lse``. The two share their
set-up (:func:`bwd_program`), the streamed-block loads and scores (:func:`stream_block`) and the
stores (:func:`store_tiles`); Triton inlines these helpers, so the kernels compile as if written
out (checked on sm_90: same registers, spills and SASS). ``P`` and ``dS`` are rounded to the input
dtype only as operands of the matmuls; accumulators are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning
from ._layout import add_rows, aligned, load_rows, tile_ptrs
from .attention_common import (
    SMEM_SLACK,
    alloc,
    drop_sm8x_spills,
    head_columns,
    least_padding,
    program_ids,
    program_offsets,
    row_grid,
    tile_configs,
)

# Rows of every (batch, head) in the padded lse/delta buffers: a multiple of this, the largest row block
# of any backward config (checked in tests/test_attention.py).
STATS_PAD: tl.constexpr = tl.constexpr(128)


def padded_seq(seq: int) -> int:
    """Rows per (batch, head) of the padded lse/delta buffers."""
    return triton.cdiv(seq, STATS_PAD.value) * STATS_PAD.value


@triton.jit
def stats_row(off_bh, SEQ: tl.constexpr):
    """Offset of one (batch, head)'s first row in the padded lse/delta buffers (:func:`padded_seq`)."""
    SEQ_PAD: tl.constexpr = (SEQ + STATS_PAD - 1) // STATS_PAD * STATS_PAD
    return off_bh.to(tl.int64) * SEQ_PAD


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
    O,
    DO,
    LSE,
    LSE_PAD,
    DELTA,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dod,
    n_heads,
    SEQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``delta = rowsum(o * do)`` in fp32 and a copy of ``lse`` for ``BLOCK_M`` rows of the padded
    statistics (rows past ``SEQ``: ``delta = 0``, ``lse = +inf``)."""
    SEQ_PAD: tl.constexpr = (SEQ + STATS_PAD - 1) // STATS_PAD * STATS_PAD
    start_m, off_bh = program_ids(SEQ_PAD, BLOCK_M)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    o_ptrs = tile_ptrs(O, off_b, off_h, offs_m, offs_d, stride_ob, stride_oh, stride_ol, stride_od, ALIGN)
    do_ptrs = tile_ptrs(DO, off_b, off_h, offs_m, offs_d, stride_dob, stride_doh, stride_dol, stride_dod, ALIGN)
    o = load_rows(o_ptrs, offs_m, SEQ, d_ok, True, EVEN_D).to(tl.float32)
    do = load_rows(do_ptrs, offs_m, SEQ, d_ok, True, EVEN_D).to(tl.float32)
    lse = tl.load(LSE + off_bh.to(tl.int64) * SEQ + offs_m, mask=offs_m < SEQ, other=float("inf"))
    tl.store(LSE_PAD + stats_row(off_bh, SEQ) + offs_m, lse)
    tl.store(DELTA + stats_row(off_bh, SEQ) + offs_m, tl.sum(o * do, 1))


@triton.jit
def bwd_program(
    X, Y, Z, W, stride_xb, stride_xh, stride_xl, stride_xd, stride_yb, stride_yh, stride_yl, stride_yd,
    stride_zb, stride_zh, stride_zl, stride_zd, stride_wb, stride_wh, stride_wl, stride_wd, n_heads,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    SPLIT: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr, OTHER: tl.constexpr,
):  # fmt: skip
    """Set-up shared by the two backward kernels: the program owns ``BLOCK`` rows of ``X, Y`` (loaded
    here, zero past ``SEQ``) and streams ``OTHER``-row blocks of ``Z, W``. Returns the
    :func:`program_offsets`, the tiles ``x, x2, y, y2`` (the second = the first unless ``SPLIT``),
    pointers to the first ``Z, W`` block ``z_ptrs, z2_ptrs, w_ptrs, w2_ptrs`` and their row strides
    rebuilt with :func:`aligned`."""
    EVEN_D: tl.constexpr = SPLIT or HEAD_DIM == BLOCK_D  # a split's first tile is all real columns
    EVEN_D2: tl.constexpr = BLOCK_D + BLOCK_D2 == HEAD_DIM
    stride_zl = aligned(stride_zl, ALIGN)
    stride_wl = aligned(stride_wl, ALIGN)
    off_bh, off_b, off_h, rows, others, offs_d, d_ok, offs_d2, d2_ok = program_offsets(
        SEQ, BLOCK, OTHER, n_heads, HEAD_DIM, BLOCK_D, BLOCK_D2
    )

    x_ptrs = tile_ptrs(X, off_b, off_h, rows, offs_d, stride_xb, stride_xh, stride_xl, stride_xd, ALIGN)
    y_ptrs = tile_ptrs(Y, off_b, off_h, rows, offs_d, stride_yb, stride_yh, stride_yl, stride_yd, ALIGN)
    x = load_rows(x_ptrs, rows, SEQ, d_ok, True, EVEN_D)
    y = load_rows(y_ptrs, rows, SEQ, d_ok, True, EVEN_D)
    x2_ptrs = tile_ptrs(X, off_b, off_h, rows, offs_d2, stride_xb, stride_xh, stride_xl, stride_xd, ALIGN)
    y2_ptrs = tile_ptrs(Y, off_b, off_h, rows, offs_d2, stride_yb, stride_yh, stride_yl, stride_yd, ALIGN)
    x2 = load_rows(x2_ptrs, rows, SEQ, d2_ok, True, EVEN_D2) if SPLIT else x
    y2 = load_rows(y2_ptrs, rows, SEQ, d2_ok, True, EVEN_D2) if SPLIT else y
    z_ptrs = tile_ptrs(Z, off_b, off_h, others, offs_d, stride_zb, stride_zh, stride_zl, stride_zd, ALIGN)
    w_ptrs = tile_ptrs(W, off_b, off_h, others, offs_d, stride_wb, stride_wh, stride_wl, stride_wd, ALIGN)
    z2_ptrs = tile_ptrs(Z, off_b, off_h, others, offs_d2, stride_zb, stride_zh, stride_zl, stride_zd, ALIGN)
    w2_ptrs = tile_ptrs(W, off_b, off_h, others, offs_d2, stride_wb, stride_wh, stride_wl, stride_wd, ALIGN)
    return (
        off_bh, off_b, off_h, rows, others, offs_d, d_ok, offs_d2, d2_ok,
        x, x2, y, y2, z_ptrs, z2_ptrs, w_ptrs, w2_ptrs, stride_zl, stride_wl,
    )  # fmt: skip


@triton.jit
def stream_block(
    r, r2, x_ptrs, x2_ptrs, y_ptrs, y2_ptrs, start, stride_xl, stride_yl, offs, d_ok, d2_ok,
    seq_len: tl.constexpr, MASK: tl.constexpr, EVEN_D: tl.constexpr, EVEN_D2: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One streamed block of a backward loop: rows ``start + offs`` of ``x, y`` (both column tiles;
    the second = the first unless ``SPLIT``) and the scores ``r x^T`` against the resident ``r, r2``."""
    rows = start + offs
    x = load_rows(x_ptrs + start * stride_xl, rows, seq_len, d_ok, MASK, EVEN_D)
    y = load_rows(y_ptrs + start * stride_yl, rows, seq_len, d_ok, MASK, EVEN_D)
    s = tl.dot(r, tl.trans(x), input_precision=PRECISION)
    x2 = x
    y2 = y
    if SPLIT:
        x2 = load_rows(x2_ptrs + start * stride_xl, rows, seq_len, d2_ok, MASK, EVEN_D2)
        y2 = load_rows(y2_ptrs + start * stride_yl, rows, seq_len, d2_ok, MASK, EVEN_D2)
        s = tl.dot(r2, tl.trans(x2), s, input_precision=PRECISION)
    return rows, x, x2, y, y2, s


@triton.jit
def store_tiles(
    X, x, x2, off_b, off_h, rows, offs_d, offs_d2, d_ok, d2_ok,
    stride_b, stride_h, stride_l, stride_d, n_rows, SPLIT: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Store ``x`` (and ``x2`` if ``SPLIT``) to the rows ``< n_rows`` of ``X[off_b, off_h]``'s first
    (second) column tile."""
    row_ok = (rows < n_rows)[:, None]
    x_ptrs = tile_ptrs(X, off_b, off_h, rows, offs_d, stride_b, stride_h, stride_l, stride_d, ALIGN)
    tl.store(x_ptrs, x.to(X.dtype.element_ty), mask=row_ok & d_ok[None, :])
    if SPLIT:
        x2_ptrs = tile_ptrs(X, off_b, off_h, rows, offs_d2, stride_b, stride_h, stride_l, stride_d, ALIGN)
        tl.store(x2_ptrs, x2.to(X.dtype.element_ty), mask=row_ok & d2_ok[None, :])


@triton.jit
def _bwd_dkdv_inner(
    k, k2, v, v2,
    q_ptrs, q2_ptrs, do_ptrs, do2_ptrs, lse_ptrs, delta_ptrs, stride_ql, stride_dol, dq_ptrs, dq2_ptrs, stride_dql,
    offs_m, d_ok, d2_ok, qk_scale, scale, seq_len: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):  # fmt: skip
    """``dk`` (unscaled ``dS^T q``) and ``dv = P^T do`` of the resident keys, accumulated over all
    query blocks in one loop (``dk2, dv2, k2, ...``: the second column tile when ``SPLIT``). When
    ``seq_len`` is not a multiple of ``BLOCK_M`` (``RAGGED``), query rows past the end load as zeros
    and their padded ``lse = +inf`` gives ``P = 0`` exactly, so no score needs masking. With
    ``ATOMIC_DQ`` (:mod:`imf_kernels.attention_bwd_atomic_op`) each block's ``s dS k`` is also added
    to the fp32 ``dq`` rows at ``dq_ptrs`` (``dq2_ptrs``; unused otherwise)."""
    EVEN_D: tl.constexpr = SPLIT or HEAD_DIM == BLOCK_D  # as in bwd_program
    EVEN_D2: tl.constexpr = BLOCK_D + BLOCK_D2 == HEAD_DIM
    RAGGED: tl.constexpr = seq_len % BLOCK_M != 0
    dk, dk2 = tl.zeros(k.shape, tl.float32), tl.zeros(k2.shape, tl.float32)
    dv, dv2 = tl.zeros(v.shape, tl.float32), tl.zeros(v2.shape, tl.float32)
    for start_m in range(0, seq_len, BLOCK_M):
        rows, q, q2, do, do2, s_t = stream_block(k, k2, q_ptrs, q2_ptrs, do_ptrs, do2_ptrs, start_m, stride_ql,
            stride_dol, offs_m, d_ok, d2_ok, seq_len, RAGGED, EVEN_D, EVEN_D2, SPLIT, PRECISION)  # fmt: skip
        lse = tl.load(lse_ptrs + start_m)  # padded: no mask (module docstring)
        delta = tl.load(delta_ptrs + start_m)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        p_lo = p_t.to(do.dtype)
        dv = tl.dot(p_lo, do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if SPLIT:
            dv2 = tl.dot(p_lo, do2, dv2, input_precision=PRECISION)
            dp_t = tl.dot(v2, tl.trans(do2), dp_t, input_precision=PRECISION)
        ds_lo = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_lo, q, dk, input_precision=PRECISION)
        if SPLIT:
            dk2 = tl.dot(ds_lo, q2, dk2, input_precision=PRECISION)
        if ATOMIC_DQ:
            ds = tl.trans(ds_lo)
            dq = tl.dot(ds, k, input_precision=PRECISION) * scale
            add_rows(dq_ptrs + start_m * stride_dql, dq, rows, seq_len, d_ok, RAGGED, EVEN_D)
            if SPLIT:
                dq2 = tl.dot(ds, k2, input_precision=PRECISION) * scale
                add_rows(dq2_ptrs + start_m * stride_dql, dq2, rows, seq_len, d2_ok, RAGGED, EVEN_D2)
    return dk, dk2, dv, dv2


def bwd_autotune(candidates: list, smem_bytes, interpret_config: triton.Config, kernel: str, resident: str, rule=None):
    """:func:`imf_kernels._tuning.autotune` for a backward tile kernel: keyed on ``SEQ, HEAD_DIM``,
    configs pruned by their shared memory (``smem_bytes``, for ``Q``'s dtype), the kernel's own ``rule``
    (``rule(configs, meta)``, optional) and the sm_8x spill table (``kernel``'s entry of
    :data:`SM8X_SPILLS`); pinned: the first surviving config whose ``resident`` tile (``BLOCK_N`` for a
    key-block program, ``BLOCK_M`` for a query-block one) pads the fewest rows."""

    def prune(configs: list, meta: dict) -> list:
        return drop_sm8x_spills(kernel, rule(configs, meta) if rule else configs, meta)

    return _tuning.autotune(
        candidates=candidates,
        key=["SEQ", "HEAD_DIM"],
        smem_bytes=smem_bytes,
        tensor_arg="Q",
        prune=prune,
        pinned=lambda meta: least_padding(prune(candidates, meta), resident, meta["SEQ"]),
        interpret_config=interpret_config,
    )


def _dkdv_smem(meta: dict, num_stages: int) -> int:
    """Shared memory of :func:`_attn_bwd_dkdv`: resident ``k, v`` plus buffered ``q, do`` tiles."""
    tile = head_columns(meta) * meta["Q"].element_size()
    return tile * (2 * meta["BLOCK_N"] + num_stages * 2 * meta["BLOCK_M"]) + SMEM_SLACK


# Rule (sm_90 compiles, as for the forward, and head_dim 8-128 in steps of 8 at seq 1000 and 4096): BLOCK_N
# (resident k, v, dk, dv rows) 128 -> 8 warps (on 4 warps: 246-255 registers, 0.7-1.1 KB spilled); 64 ->
# 8 warps, or 4 warps with BLOCK_M 32 (64x64 on 4 warps spills 128-136 B at d128); BLOCK_M 32 or 64; 2 or
# 3 stages (a 4th only adds shared memory); 64x128 only up to 96 head-tile columns (:func:`_dkdv_rule`).
DKDV_CONFIGS = tile_configs(((64, 128, 8), (32, 128, 8), (32, 64, 4), (64, 64, 8)), num_stages=(3, 2))


def _dkdv_rule(configs: list, meta: dict) -> list:
    """No 64 x 128 tile above 96 head-tile columns (d104-d128: 128): it needs all 255 registers there and
    spills 4 B on 2 stages at a masked head dim and a ragged length (d104/112/120, seq 1000); up to 96
    columns it needs 193-235."""
    wide = head_columns(meta) > 96
    return [c for c in configs if not (wide and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 64 * 128)]


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ,
    stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd, stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd, stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    n_heads, qk_scale, scale,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_D2: tl.constexpr, SPLIT: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: ``dk, dv`` for ``BLOCK_N`` key rows of one (batch, head), looping over all queries;
    with ``ATOMIC_DQ`` also their ``dq`` contributions added to the fp32 ``DQ``
    (:mod:`imf_kernels.attention_bwd_atomic_op`; otherwise ``DQ`` and its strides are unused)."""
    off_bh, off_b, off_h, offs_n, offs_m, offs_d, d_ok, offs_d2, d2_ok, k, k2, v, v2, \
        q_ptrs, q2_ptrs, do_ptrs, do2_ptrs, stride_ql, stride_dol = bwd_program(
            K, V, Q, DO, stride_kb, stride_kh, stride_kl, stride_kd, stride_vb, stride_vh, stride_vl, stride_vd,
            stride_qb, stride_qh, stride_ql, stride_qd, stride_dob, stride_doh, stride_dol, stride_dod, n_heads,
            SEQ, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, ALIGN, BLOCK_N, BLOCK_M)  # fmt: skip
    lse_ptrs = LSE + stats_row(off_bh, SEQ) + offs_m
    delta_ptrs = DELTA + stats_row(off_bh, SEQ) + offs_m
    dq_ptrs = tile_ptrs(DQ, off_b, off_h, offs_m, offs_d, stride_dqb, stride_dqh, stride_dql, stride_dqd, ALIGN)
    dq2_ptrs = tile_ptrs(DQ, off_b, off_h, offs_m, offs_d2, stride_dqb, stride_dqh, stride_dql, stride_dqd, ALIGN)
    dk, dk2, dv, dv2 = _bwd_dkdv_inner(
        k, k2, v, v2, q_ptrs, q2_ptrs, do_ptrs, do2_ptrs, lse_ptrs, delta_ptrs, stride_ql, stride_dol,
        dq_ptrs, dq2_ptrs, aligned(stride_dql, ALIGN), offs_m, d_ok, d2_ok, qk_scale, scale, SEQ, HEAD_DIM,
        BLOCK_D, BLOCK_D2, BLOCK_N, BLOCK_M, SPLIT, PRECISION, ATOMIC_DQ)  # fmt: skip
    store_tiles(DK, dk * scale, dk2 * scale, off_b, off_h, offs_n, offs_d, offs_d2, d_ok, d2_ok,
                stride_dkb, stride_dkh, stride_dkl, stride_dkd, SEQ, SPLIT, ALIGN)  # fmt: skip
    store_tiles(DV, dv, dv2, off_b, off_h, offs_n, offs_d, offs_d2, d_ok, d2_ok,
                stride_dvb, stride_dvh, stride_dvl, stride_dvd, SEQ, SPLIT, ALIGN)  # fmt: skip


# The kernel as written, which the atomic backward tunes with its own configs
# (:mod:`imf_kernels.attention_bwd_atomic_op`), and as the deterministic backward tunes it.
dkdv_kernel = _attn_bwd_dkdv
deterministic_dkdv = bwd_autotune(
    DKDV_CONFIGS, _dkdv_smem, triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}), "dkdv", "BLOCK_N", _dkdv_rule
)(dkdv_kernel)


@triton.jit
def _bwd_dq_inner(
    q, q2, do, do2, lse, delta,
    k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, stride_kl, stride_vl,
    offs_n, d_ok, d2_ok, qk_scale, seq_len: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``dq`` (unscaled ``dS k``) of the resident queries, accumulated over all key blocks in one loop
    (``dq2``: the second column tile when ``SPLIT``). When ``seq_len`` is not a multiple of
    ``BLOCK_N`` (``RAGGED``), key rows past the end load as zeros and only the last block (a
    block-uniform branch) zeroes their ``P``."""
    EVEN_D: tl.constexpr = SPLIT or HEAD_DIM == BLOCK_D  # as in bwd_program
    EVEN_D2: tl.constexpr = BLOCK_D + BLOCK_D2 == HEAD_DIM
    RAGGED: tl.constexpr = seq_len % BLOCK_N != 0
    dq, dq2 = tl.zeros(q.shape, tl.float32), tl.zeros(q2.shape, tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        cols, k, k2, v, v2, s = stream_block(q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, start_n, stride_kl,
            stride_vl, offs_n, d_ok, d2_ok, seq_len, RAGGED, EVEN_D, EVEN_D2, SPLIT, PRECISION)  # fmt: skip
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if RAGGED:
            if start_n + BLOCK_N > seq_len:  # the last block only
                p = tl.where((cols < seq_len)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if SPLIT:
            dp = tl.dot(do2, tl.trans(v2), dp, input_precision=PRECISION)
        ds_lo = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds_lo, k, dq, input_precision=PRECISION)
        if SPLIT:
            dq2 = tl.dot(ds_lo, k2, dq2, input_precision=PRECISION)
    return dq, dq2


def _dq_smem(meta: dict, num_stages: int) -> int:
    """Shared memory of :func:`_attn_bwd_dq`: resident ``q, do`` plus buffered ``k, v`` tiles."""
    tile = head_columns(meta) * meta["Q"].element_size()
    return tile * (2 * meta["BLOCK_M"] + num_stages * 2 * meta["BLOCK_N"]) + SMEM_SLACK


# Rule: the mirror of dk/dv: BLOCK_M (resident q, do, dq rows) 128 -> 8 warps (on 4 warps it spills
# ~1.4 KB), 64 -> 4 or 8 warps; BLOCK_N 32 or 64; 2 or 3 stages.
DQ_CONFIGS = tile_configs(((128, 64, 8), (128, 32, 8), (64, 64, 4), (64, 32, 4), (64, 64, 8)), num_stages=(3, 2))


@bwd_autotune(DQ_CONFIGS, _dq_smem, triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}), "dq", "BLOCK_M")
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd, stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    n_heads, qk_scale, scale,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_D2: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: ``dq`` for ``BLOCK_M`` query rows of one (batch, head), looping over all keys (the
    mirror of :func:`_attn_bwd_dkdv`: ``q, do`` resident, ``k, v`` streamed)."""
    off_bh, off_b, off_h, offs_m, offs_n, offs_d, d_ok, offs_d2, d2_ok, q, q2, do, do2, \
        k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, stride_kl, stride_vl = bwd_program(
            Q, DO, K, V, stride_qb, stride_qh, stride_ql, stride_qd, stride_dob, stride_doh, stride_dol, stride_dod,
            stride_kb, stride_kh, stride_kl, stride_kd, stride_vb, stride_vh, stride_vl, stride_vd, n_heads,
            SEQ, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, ALIGN, BLOCK_M, BLOCK_N)  # fmt: skip
    lse = tl.load(LSE + stats_row(off_bh, SEQ) + offs_m)  # padded: no mask (module docstring)
    delta = tl.load(DELTA + stats_row(off_bh, SEQ) + offs_m)
    dq, dq2 = _bwd_dq_inner(
        q, q2, do, do2, lse, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, stride_kl, stride_vl, offs_n,
        d_ok, d2_ok, qk_scale, SEQ, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, BLOCK_N, SPLIT, PRECISION)  # fmt: skip
    store_tiles(DQ, dq * scale, dq2 * scale, off_b, off_h, offs_m, offs_d, offs_d2, d_ok, d2_ok,
                stride_dqb, stride_dqh, stride_dql, stride_dqd, SEQ, SPLIT, ALIGN)  # fmt: skip


def backward_stats(o, do, lse, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse_pad, delta)``: the forward's ``lse`` copied into fp32 buffers of :func:`padded_seq` rows per
    (batch, head) (``+inf`` past the end) and ``delta = rowsum(o * do)`` (``0`` past the end), which the
    main kernels read without masks; ``meta`` from :func:`imf_kernels.attention_common.kernel_meta`."""
    batch, heads, seq, _ = o.shape
    stats_shape = (batch, heads, padded_seq(seq))
    lse_pad, delta = alloc(lse, stats_shape, torch.float32), alloc(lse, stats_shape, torch.float32)
    _attn_bwd_preprocess[row_grid("BLOCK_M", padded_seq(seq), batch * heads)](
        o,
        do,
        lse,
        lse_pad,
        delta,
        *o.stride(),
        *do.stride(),
        heads,
        SEQ=seq,
        HEAD_DIM=meta["HEAD_DIM"],
        BLOCK_D=meta["BLOCK_D"],
        ALIGN=meta["ALIGN"],
    )
    return lse_pad, delta


def deterministic_backward(inputs: tuple, strides: tuple, scalars: tuple, dq, dk, dv, split: dict) -> None:
    """Fill ``dq, dk, dv`` with the dk/dv kernel (one program per key block) and the dq kernel (one per
    query block), given ``flash_backward``'s ``(q, k, v, do, lse_pad, delta)``, their strides,
    ``(heads, scale * log2(e), scale)`` and the launch meta (:func:`imf_kernels.attention_common.split_meta`)."""
    batch, heads, seq, _ = inputs[0].shape
    deterministic_dkdv[row_grid("BLOCK_N", seq, batch * heads)](  # DQ (= dk) unused without ATOMIC_DQ
        *inputs,
        dk,
        dv,
        dk,
        *strides,
        *dk.stride(),
        *dv.stride(),
        *dk.stride(),
        *scalars,
        SEQ=seq,
        ATOMIC_DQ=False,
        **split,
    )
    _attn_bwd_dq[row_grid("BLOCK_M", seq, batch * heads)](
        *inputs, dq, *strides, *dq.stride(), *scalars, SEQ=seq, **split
    )
