"""Flash attention (non-causal): forward and backward Triton kernels.

Math, per (batch, head), ``q, k, v`` of shape ``(L, D)``, ``s = scale`` (default ``D**-0.5``)::

    S = s q k^T        P = softmax_rows(S)        o = P v

Forward (FlashAttention-2, Dao 2023; Triton tutorial 06-fused-attention; lazy rescaling from
FlashAttention-4): each program owns ``BLOCK_M`` query rows and streams ``BLOCK_N``-row blocks of
``k, v`` with an online softmax in the log2 domain. With ``x = S log2(e)`` for the current key
block and a running (possibly stale) row max ``m``::

    if max_rows(max(m, rowmax(x)) - m) > RESCALE_LOG2:      (block-uniform; always on the 1st block)
        m' = max(m, rowmax(x))    alpha = 2^(m - m')    l, acc *= alpha    m = m'
    p = 2^(x - m)                 l += rowsum(p)        acc += p v

``p <= 2^RESCALE_LOG2`` (not 1) between rescales; every quantity shares the same ``m``, so the
result is exact: at the end ``o = acc / l`` and ``lse = m + log2(l)`` (log-sum-exp of ``x`` in base
2), which is saved for backward: ``P = 2^(x - lse)``. ``rowmax`` is taken on the unscaled ``q k^T``
(``scale > 0``), so ``x - m`` is one FFMA per score. Nothing ``L x L`` is ever stored.

Backward, given ``do = dLoss/do``::

    delta = rowsum(o * do)                 (= rowsum(P * dP), preprocess kernel)
    dP = do v^T        dS = P * (dP - delta)
    dv = P^T do        dk = s dS^T q       dq = s dS k

computed on one of two paths, chosen at each backward call by ``IMF_KERNELS_ATTN_BWD``
(:func:`imf_kernels.attention_bwd.flash_backward`):

* ``deterministic`` (default; :mod:`imf_kernels.attention_bwd_op`): two kernels without atomics, so the
  gradients are bitwise reproducible (the trainer's resume relies on it): one program per key block
  accumulates ``dk, dv`` over all query blocks, one program per query block accumulates ``dq`` over all
  key blocks; both recompute ``P`` from ``lse``: 7 matmuls of ``L x L x D``.
* ``atomic`` (opt-in; :mod:`imf_kernels.attention_bwd_atomic_op`): FlashAttention-2's one kernel per
  key block, which also adds its ``s dS k`` into an fp32 ``dq`` buffer with atomic adds: 5 matmuls, at
  the price of ``cdiv(L, BLOCK_N)`` fp32 adds per ``dq`` element, an fp32 ``(B, H, L, D)`` buffer for
  16-bit inputs and a ``dq`` whose last bits depend on the order of the adds (refused under
  ``torch.use_deterministic_algorithms(True)``). Use it where the GPU benchmark shows it faster
  (``python -m bench kernels``: ``imf_kernels_atomic_bwd``) and bitwise reproducibility is not needed.

Tangent (forward mode), tangents ``q_t, k_t, v_t``::

    S_t = s (q_t k^T + q k_t^T)   mu = rowsum(P * S_t)   P_t = P * (S_t - mu)   o_t = P_t v + P v_t

Fused JVP forward (the same kernel, ``WITH_TANGENT=True``): primal and tangent in one pass,
sharing the primal's rescaling. Each program keeps, per query row, a shift ``c`` (an estimate of
``mu``) and::

    l   = sum_j p_j                             acc = sum_j p_j v_j
    r   = sum_j p_j (S_t,j - c)                 t   = sum_j p_j (S_t,j - c) v_j + sum_j p_j v_t,j

Per block: ``p_t = p * (S_t - c)`` (one FFMA and one FMUL per score), ``r += rowsum(p_t)``,
``acc += p v``, ``t += p_t v + p v_t``. ``c`` moves only in the (rare) rescale branch, to the running
mean including the current block: ``delta = r / l``, ``c += delta``, ``p_t -= delta p``,
``t -= delta acc`` (``acc`` before this block), ``r -= delta l`` (= 0 up to rounding); this keeps
the invariants above exact for any ``c``. At the end ``mu - c = r / l``, so::

    o_t = (t - (r / l) acc) / l = P_t v + P v_t

Centring ``S_t`` on a running mean before ``p_t`` is rounded to the input dtype for the ``v``
matmul keeps the rounding error proportional to the spread of ``S_t`` rather than to ``|S_t|``
(the two differ a lot when ``S_t`` has a large common offset per row; the first block's mean
already removes it). ``S_t`` and ``p_t`` are formed in fp32; ``P_t v`` and ``P v_t`` share the
accumulator ``t``. The fused forward costs 6 matmuls of ``L x L x D`` (``S``, the two of ``S_t``,
``P v``, ``P_t v``, ``P v_t``) against 2 for the primal, and O(L) memory. Static cost on sm_90
(d64, 128x64 tile, 8 warps): 459 SASS instructions per iteration on the hot path (627 in the first
version), 204 registers, no spills; see ``docs/attention_jvp_loop.md``.

Forward-mode AD: :class:`_Attention` has a ``jvp`` rule, so ``torch.func.jvp(attention, ...)`` and
``torch.autograd.forward_ad`` dual tensors work. Both call ``forward`` first (the primal kernel,
2 matmuls), then the rule, which runs the fused JVP kernel for ``o_t`` (6 matmuls; its primal
result is recomputed and dropped): 8 matmuls in all, 1.33x the explicit
:func:`imf_kernels.attention_jvp` route, which runs the fused kernel once. The primal output keeps
its ordinary autograd graph (flash backward), so ``u, dudt = torch.func.jvp(f, ...)`` followed by a
loss on ``u`` and ``.backward()`` works (the py-meanflow pattern). ``o_t`` is a stop-gradient
output: backward through it raises (the MeanFlow losses detach ``du/dt``).

Numerics: scores, softmax statistics and all accumulators are fp32; ``P`` and ``dS`` are
rounded to the input dtype only as operands of the ``v``/``q``/``k`` matmuls (as in
FlashAttention). fp32 inputs follow torch's own fp32 matmul setting (:func:`dot_precision`): IEEE
by default (exact; FMA dots on a GPU, a correctness path, not a fast one), TF32 tensor cores after
``torch.set_float32_matmul_precision("high")``; the interpreter always runs IEEE.
Inputs are read through their strides, so a ``(B, L, H, D)`` tensor viewed as ``(B, H, L, D)``
is used in place; outputs are allocated with ``empty_like`` and keep that layout.

Block sizes: a head dim that is not a power of two is split into two power-of-two column tiles
when that is less matmul work than padding it (:func:`imf_kernels.attention_common.split_meta`; the
forward in both modes and the dk/dv and dq kernels): 72 = 64 + 16, i.e. 80 columns, 1.11x the matmul
work of 72 instead of 1.78x at 128 (sm_90, JVP 128x64/8 warps: 224 registers, 0 spills, 164 KB
smem, against 255 registers, 44 B spilled and 262 KB, over the limit, padded). Only the backward
preprocess reads one masked ``next_power_of_2(head_dim)`` tile (no matmul).
``seq`` is a compile-time constant, as in the Triton tutorial: loop trip counts are static, a
sequence that is a multiple of the block runs without any mask, and a ragged one runs the same
single software-pipelined loop with row-masked loads and the score mask applied in the last block
only (a block-uniform branch; the first version ran the tail as a second loop with its own pipeline
prologue: sm_90 at 276 tokens, JVP 128x64/8 warps, the mask adds 20 instructions (4%) to the 464 of
a hot-path iteration). The price is one compile per sequence length; the autotuner keys on it
anyway. (It also keeps the kernels runnable in the Triton 3.6 interpreter with NumPy 2.4, which
cannot use a runtime scalar as a ``range`` bound.)

Tested: CPU Triton interpreter in fp32/fp16 against fp64 autograd / ``torch.func.jvp`` of math
attention (interpreted bf16 ``tl.dot`` is wrong, so bf16 is covered only by the GPU-marked tests,
not yet run on a GPU); compiled for sm_90 without a GPU (registers, spills, SASS); the autotune
configs target H100.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning
from ._checks import check_float, check_like
from ._layout import aligned, load_rows, tile_ptrs
from .attention_bwd import flash_backward
from .attention_common import (
    LOG2E,
    SMEM_SLACK,
    alloc,
    drop_sm8x_spills,
    head_columns,
    least_padding,
    program_offsets,
    row_grid,
    split_meta,
    tile_configs,
)

MAX_HEAD_DIM = 128
# Lazy rescaling: the running max is raised only when a block exceeds it by more than this (log2
# units), so unnormalised probabilities stay <= 2^5 (fp16 ``p_t`` overflows only past |S_t - c| ~ 2,000).
RESCALE_LOG2: tl.constexpr = tl.constexpr(5.0)


@triton.jit
def _fwd_inner(
    acc, acc2, acc_t, acc_t2, l_i, r_i, m_i, c_i, q, q2, q_t, q_t2,
    k_ptrs, v_ptrs, kt_ptrs, vt_ptrs, k2_ptrs, v2_ptrs, kt2_ptrs, vt2_ptrs,
    stride_kl, stride_vl, stride_ktl, stride_vtl, offs_n, d_ok, d2_ok, qk_scale, scale,
    seq_len: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_D2: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, WITH_TANGENT: tl.constexpr,
):  # fmt: skip
    """Online-softmax update over all key blocks in one software-pipelined loop, with lazy rescaling
    and, if ``WITH_TANGENT``, the tangent terms (module docstring). When ``seq_len`` is not a multiple
    of ``BLOCK_N`` (``RAGGED``), loads zero-fill the key rows past the end and only the last block
    (a block-uniform branch) sets their scores to ``-inf``. With ``SPLIT`` the head dim is two column
    tiles (``acc2``, ``q2``, ``k2``, ... hold the second)."""
    RAGGED: tl.constexpr = seq_len % BLOCK_N != 0
    for start_n in range(0, seq_len, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_ptrs + start_n * stride_kl, cols, seq_len, d_ok, RAGGED, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if SPLIT:
            k2 = load_rows(k2_ptrs + start_n * stride_kl, cols, seq_len, d2_ok, RAGGED, EVEN_D2)
            qk = tl.dot(q2, tl.trans(k2), qk, input_precision=PRECISION)
        if RAGGED:
            if start_n + BLOCK_N > seq_len:  # the last block only
                qk = tl.where((cols < seq_len)[None, :], qk, float("-inf"))
        if WITH_TANGENT:
            k_t = load_rows(kt_ptrs + start_n * stride_ktl, cols, seq_len, d_ok, RAGGED, EVEN_D)
            s_t = tl.dot(q_t, tl.trans(k), input_precision=PRECISION)
            s_t = tl.dot(q, tl.trans(k_t), s_t, input_precision=PRECISION)
            if SPLIT:
                k_t2 = load_rows(kt2_ptrs + start_n * stride_ktl, cols, seq_len, d2_ok, RAGGED, EVEN_D2)
                s_t = tl.dot(q_t2, tl.trans(k2), s_t, input_precision=PRECISION)
                s_t = tl.dot(q2, tl.trans(k_t2), s_t, input_precision=PRECISION)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0: max commutes with the scale
        rescale = tl.max(m_new - m_i, 0) > RESCALE_LOG2
        if rescale:
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            if SPLIT:
                acc2 = acc2 * alpha[:, None]
            if WITH_TANGENT:
                r_i = r_i * alpha
                acc_t = acc_t * alpha[:, None]
                if SPLIT:
                    acc_t2 = acc_t2 * alpha[:, None]
            m_i = m_new
        p = tl.math.exp2(qk * qk_scale - m_i[:, None])  # one FFMA per score
        l_i += tl.sum(p, 1)
        v = load_rows(v_ptrs + start_n * stride_vl, cols, seq_len, d_ok, RAGGED, EVEN_D)
        p_lo = p.to(v.dtype)
        if SPLIT:
            v2 = load_rows(v2_ptrs + start_n * stride_vl, cols, seq_len, d2_ok, RAGGED, EVEN_D2)
        if WITH_TANGENT:
            p_t = p * (s_t * scale - c_i[:, None])
            r_blk = tl.sum(p_t, 1)
            if rescale:  # re-centre on the running mean: c += delta keeps the invariant exact
                delta = (r_i + r_blk) / l_i
                c_i += delta
                p_t -= delta[:, None] * p
                acc_t -= delta[:, None] * acc
                if SPLIT:
                    acc_t2 -= delta[:, None] * acc2
                r_i = r_i + r_blk - delta * l_i
            else:
                r_i += r_blk
            p_t_lo = p_t.to(v.dtype)
            v_t = load_rows(vt_ptrs + start_n * stride_vtl, cols, seq_len, d_ok, RAGGED, EVEN_D)
            acc_t = tl.dot(p_t_lo, v, acc_t, input_precision=PRECISION)
            acc_t = tl.dot(p_lo, v_t, acc_t, input_precision=PRECISION)
            if SPLIT:
                v_t2 = load_rows(vt2_ptrs + start_n * stride_vtl, cols, seq_len, d2_ok, RAGGED, EVEN_D2)
                acc_t2 = tl.dot(p_t_lo, v2, acc_t2, input_precision=PRECISION)
                acc_t2 = tl.dot(p_lo, v_t2, acc_t2, input_precision=PRECISION)
        acc = tl.dot(p_lo, v, acc, input_precision=PRECISION)
        if SPLIT:
            acc2 = tl.dot(p_lo, v2, acc2, input_precision=PRECISION)
    return acc, acc2, acc_t, acc_t2, l_i, r_i, m_i, c_i


# Shared memory the compiler adds to the tiles (barriers, layout-conversion scratch): the first JVP
# kernel at d128, 64x64, 3 stages was estimated at 229,376 B and compiled to 233,472 B (> 232,448).
def _fwd_smem(meta: dict, num_stages: int) -> int:
    """Shared memory of :func:`_attn_fwd`: the ``q`` (and ``q_t``) tile plus ``num_stages`` buffered
    ``k, v`` (and ``k_t, v_t``) tiles."""
    tile = head_columns(meta) * meta["Q"].element_size()
    n = 2 if meta["WITH_TANGENT"] else 1
    return tile * n * (meta["BLOCK_M"] + num_stages * 2 * meta["BLOCK_N"]) + SMEM_SLACK


# Configs, from compiling every candidate of the first version for sm_90 (fp16, seq 4096, d64 and
# d128; registers / spills from ptxas -v; docs/attention_jvp_loop.md has the method). The rule:
# - warps follow the resident row tile: 64 rows -> 4 warps (one warpgroup), 128 rows -> 8 warps.
#   128 rows on 4 warps needs 222-255 registers and spills at BLOCK_N = 128 (8 B at d64, 1 KB at
#   d128), and the JVP 128-row 4-warp tiles spill 0.8-6.9 KB;
# - primal BLOCK_N = 128 only with 8 warps (64x128 on 4 warps: 254 registers at d128);
# - tangent BLOCK_N <= 64 (two fp32 accumulators plus the S, S_t and p_t tiles);
# - 2 or 3 stages: a 4th stage changed neither registers nor the loop, only shared memory;
# - BLOCK_N = 32 for short or ragged sequences (iMF's 276 tokens: 9 blocks, 96% useful keys).
# Pinned config (IMF_KERNELS_PINNED=1): the mode's first entry with the least padded query rows
# (:func:`_fwd_pinned`: 64x64 at iMF's 276 tokens, 128x64 at a multiple of 128). On sm_8x the tangent
# tiles of SM8X_SPILLS are dropped (mma.sync holds more in registers): BLOCK_N = 32 there.
FWD_PRIMAL_CONFIGS = tile_configs(
    ((128, 64, 8), (64, 64, 4), (128, 128, 8), (64, 128, 8), (64, 32, 4)), num_stages=(3, 2)
)
FWD_TANGENT_CONFIGS = tile_configs(((128, 64, 8), (64, 64, 4), (128, 32, 8), (64, 32, 4)), num_stages=(3, 2))
FWD_CONFIGS = list(dict.fromkeys(FWD_PRIMAL_CONFIGS + FWD_TANGENT_CONFIGS))


def fwd_mode_configs(configs: list, meta: dict) -> list:
    """The configs of the launch's mode (``WITH_TANGENT``) among ``configs``, in the mode's order. With
    the tangent, by head-tile columns (``python -m bench compile``, sm_90, head_dim 8-128 in steps of 8):
    above 96 (d104-d128: 128 columns) only ``BLOCK_N = 32`` (128x64 on 8 warps spills 40 B, 64x64 on 4
    warps 288 B; the 32-wide tiles are clean); above 80 (d88, d96: 64 + 32 columns) no 64x64 on 4 warps
    (255 registers, 16-28 B spilled; 128x64 on 8 warps: 230-232 registers, clean)."""
    if not meta["WITH_TANGENT"]:
        return [c for c in FWD_PRIMAL_CONFIGS if c in configs]
    columns = head_columns(meta)

    def spills(c) -> bool:
        wide_keys = c.kwargs["BLOCK_N"] > 32
        return wide_keys and (columns > 96 or (columns > 80 and c.num_warps == 4))

    return [c for c in FWD_TANGENT_CONFIGS if c in configs and not spills(c)]


def _fwd_prune(configs: list, meta: dict) -> list:
    """:func:`fwd_mode_configs` without the tiles that spill on this device (sm_8x: :data:`SM8X_SPILLS`)."""
    mode = fwd_mode_configs(configs, meta)
    return drop_sm8x_spills("fwd_tangent", mode, meta) if meta["WITH_TANGENT"] else mode


def _fwd_pinned(meta: dict):
    """The pinned config: the first of the surviving mode's list with the least padded query rows."""
    return least_padding(_fwd_prune(FWD_CONFIGS, meta), "BLOCK_M", meta["SEQ"])


@_tuning.autotune(
    candidates=FWD_CONFIGS,
    key=["SEQ", "HEAD_DIM", "WITH_TANGENT"],
    smem_bytes=_fwd_smem,
    tensor_arg="Q",
    prune=_fwd_prune,
    pinned=_fwd_pinned,
    interpret_config=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
)
@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    QT,
    KT,
    VT,
    O,
    OT,
    LSE,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_qtb,
    stride_qth,
    stride_qtl,
    stride_qtd,
    stride_ktb,
    stride_kth,
    stride_ktl,
    stride_ktd,
    stride_vtb,
    stride_vth,
    stride_vtl,
    stride_vtd,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    stride_otb,
    stride_oth,
    stride_otl,
    stride_otd,
    n_heads,
    qk_scale,
    scale,
    SEQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
    WITH_TANGENT: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: ``o`` (and ``o_t`` if ``WITH_TANGENT``; else ``QT, KT, VT, OT`` are unused) and
    ``lse`` (log2 domain, ``LSE`` contiguous ``(batch, heads, SEQ)``) for ``BLOCK_M`` query rows of
    one (batch, head)."""
    stride_kl = aligned(stride_kl, ALIGN)
    stride_vl = aligned(stride_vl, ALIGN)
    stride_ktl = aligned(stride_ktl, ALIGN)
    stride_vtl = aligned(stride_vtl, ALIGN)
    off_bh, off_b, off_h, offs_m, offs_n, offs_d, d_ok, offs_d2, d2_ok = program_offsets(
        SEQ, BLOCK_M, BLOCK_N, n_heads, HEAD_DIM, BLOCK_D, BLOCK_D2
    )
    EVEN_D: tl.constexpr = SPLIT or HEAD_DIM == BLOCK_D  # a split's first tile is all real columns
    EVEN_D2: tl.constexpr = BLOCK_D + BLOCK_D2 == HEAD_DIM

    q_ptrs = tile_ptrs(Q, off_b, off_h, offs_m, offs_d, stride_qb, stride_qh, stride_ql, stride_qd, ALIGN)
    qt_ptrs = tile_ptrs(QT, off_b, off_h, offs_m, offs_d, stride_qtb, stride_qth, stride_qtl, stride_qtd, ALIGN)
    k_ptrs = tile_ptrs(K, off_b, off_h, offs_n, offs_d, stride_kb, stride_kh, stride_kl, stride_kd, ALIGN)
    v_ptrs = tile_ptrs(V, off_b, off_h, offs_n, offs_d, stride_vb, stride_vh, stride_vl, stride_vd, ALIGN)
    kt_ptrs = tile_ptrs(KT, off_b, off_h, offs_n, offs_d, stride_ktb, stride_kth, stride_ktl, stride_ktd, ALIGN)
    vt_ptrs = tile_ptrs(VT, off_b, off_h, offs_n, offs_d, stride_vtb, stride_vth, stride_vtl, stride_vtd, ALIGN)
    q = load_rows(q_ptrs, offs_m, SEQ, d_ok, True, EVEN_D)
    q_t = load_rows(qt_ptrs, offs_m, SEQ, d_ok, True, EVEN_D) if WITH_TANGENT else q
    # the second column tile (unused unless SPLIT)
    q2_ptrs = tile_ptrs(Q, off_b, off_h, offs_m, offs_d2, stride_qb, stride_qh, stride_ql, stride_qd, ALIGN)
    qt2_ptrs = tile_ptrs(QT, off_b, off_h, offs_m, offs_d2, stride_qtb, stride_qth, stride_qtl, stride_qtd, ALIGN)
    q2 = load_rows(q2_ptrs, offs_m, SEQ, d2_ok, True, EVEN_D2) if SPLIT else q
    q_t2 = load_rows(qt2_ptrs, offs_m, SEQ, d2_ok, True, EVEN_D2) if SPLIT and WITH_TANGENT else q

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    r_i = tl.zeros([BLOCK_M], tl.float32)
    c_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    acc_t2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    k2_ptrs = tile_ptrs(K, off_b, off_h, offs_n, offs_d2, stride_kb, stride_kh, stride_kl, stride_kd, ALIGN)
    v2_ptrs = tile_ptrs(V, off_b, off_h, offs_n, offs_d2, stride_vb, stride_vh, stride_vl, stride_vd, ALIGN)
    kt2_ptrs = tile_ptrs(KT, off_b, off_h, offs_n, offs_d2, stride_ktb, stride_kth, stride_ktl, stride_ktd, ALIGN)
    vt2_ptrs = tile_ptrs(VT, off_b, off_h, offs_n, offs_d2, stride_vtb, stride_vth, stride_vtl, stride_vtd, ALIGN)
    acc, acc2, acc_t, acc_t2, l_i, r_i, m_i, c_i = _fwd_inner(
        acc, acc2, acc_t, acc_t2, l_i, r_i, m_i, c_i, q, q2, q_t, q_t2,
        k_ptrs, v_ptrs, kt_ptrs, vt_ptrs, k2_ptrs, v2_ptrs, kt2_ptrs, vt2_ptrs,
        stride_kl, stride_vl, stride_ktl, stride_vtl, offs_n, d_ok, d2_ok, qk_scale, scale,
        SEQ, BLOCK_N, EVEN_D, EVEN_D2, SPLIT, PRECISION, WITH_TANGENT,
    )  # fmt: skip

    row_ok = offs_m < SEQ
    mask = row_ok[:, None] & d_ok[None, :]
    l_inv = 1.0 / l_i
    tl.store(LSE + off_bh.to(tl.int64) * SEQ + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    o_ptrs = tile_ptrs(O, off_b, off_h, offs_m, offs_d, stride_ob, stride_oh, stride_ol, stride_od, ALIGN)
    ot_ptrs = tile_ptrs(OT, off_b, off_h, offs_m, offs_d, stride_otb, stride_oth, stride_otl, stride_otd, ALIGN)
    tl.store(o_ptrs, (acc * l_inv[:, None]).to(O.dtype.element_ty), mask=mask)
    mask2 = row_ok[:, None] & d2_ok[None, :]
    o2_ptrs = tile_ptrs(O, off_b, off_h, offs_m, offs_d2, stride_ob, stride_oh, stride_ol, stride_od, ALIGN)
    ot2_ptrs = tile_ptrs(OT, off_b, off_h, offs_m, offs_d2, stride_otb, stride_oth, stride_otl, stride_otd, ALIGN)
    if SPLIT:
        tl.store(o2_ptrs, (acc2 * l_inv[:, None]).to(O.dtype.element_ty), mask=mask2)
    if WITH_TANGENT:
        # o_t = (t - (mu - c) acc) / l with mu - c = r / l: the final shift to the exact mean
        shift = r_i * l_inv
        o_t = (acc_t - shift[:, None] * acc) * l_inv[:, None]
        tl.store(ot_ptrs, o_t.to(OT.dtype.element_ty), mask=mask)
        if SPLIT:
            o_t2 = (acc_t2 - shift[:, None] * acc2) * l_inv[:, None]
            tl.store(ot2_ptrs, o_t2.to(OT.dtype.element_ty), mask=mask2)


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
    if not 0 < scale < float("inf"):
        raise ValueError(f"scale must be positive and finite (the kernels scale after the row max), got {scale}")
    return float(scale)


def empty_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``o`` like ``q`` and the fp32 log-sum-exp ``lse`` of shape ``(batch, heads, seq)``."""
    return alloc(q), alloc(q, q.shape[:3], torch.float32)


def flash_forward_into(q, k, v, o, lse, scale: float, tangents=None) -> None:
    """Run the forward kernel on validated ``q, k, v`` (and ``tangents = (q_t, k_t, v_t, o_t)`` of the
    same shape for the fused JVP), writing ``o``, ``lse`` (and ``o_t``). Outputs may be views into
    larger buffers: ``o, o_t`` through their strides, ``lse`` contiguous ``(batch, heads, seq)``."""
    batch, heads, seq, _ = q.shape
    if q.numel() == 0:
        return
    q_t, k_t, v_t, o_t = (q, k, v, o) if tangents is None else tangents
    _attn_fwd[row_grid("BLOCK_M", seq, batch * heads)](
        q,
        k,
        v,
        q_t,
        k_t,
        v_t,
        o,
        o_t,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *q_t.stride(),
        *k_t.stride(),
        *v_t.stride(),
        *o.stride(),
        *o_t.stride(),
        heads,
        scale * LOG2E,
        scale,
        SEQ=seq,
        WITH_TANGENT=tangents is not None,
        **split_meta(q, k, v, o, q_t, k_t, v_t, o_t),
    )


@torch.library.custom_op("imf_kernels::attention_tangent", mutates_args=())
def attention_tangent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``o_t`` from the fused JVP kernel (its ``o`` and ``lse`` are dropped). A custom op, so that the
    jvp rule below receives plain tensors under ``torch.func.jvp`` (functorch unwraps its levels at
    the dispatcher), and so that backward through ``o_t`` raises instead of silently dropping."""
    o, lse = empty_outputs(q)
    o_t = alloc(q)
    flash_forward_into(q, k, v, o, lse, scale, (q_t, k_t, v_t, o_t))
    return o_t


@attention_tangent.register_fake
def _(q, k, v, q_t, k_t, v_t, scale):
    return torch.empty_like(q)


def _tangent_backward(ctx, _do_t):
    raise RuntimeError(
        "imf_kernels.attention: the tangent from its jvp rule is a stop-gradient output; "
        "detach it (e.g. dudt.detach()), as the MeanFlow losses do"
    )


attention_tangent.register_autograd(_tangent_backward)


def zero_tangent(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``t``, or zeros like ``like`` where forward AD passes no tangent (dense, so loads stay aligned)."""
    return torch.zeros_like(like) if t is None else t


class _Attention(torch.autograd.Function):
    """``o = attention(q, k, v)``; ``lse`` is a non-differentiable second output kept for backward.

    ``jvp``: see the module docstring (forward-mode AD); ``backward``: the flash backward of ``o``.
    """

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
        ctx.save_for_forward(q, k, v)
        ctx.scale = scale

    @staticmethod
    def jvp(ctx, q_t, k_t, v_t, _scale_t):
        q, k, v = ctx.saved_tensors
        tangents = [zero_tangent(t, x) for t, x in zip((q_t, k_t, v_t), (q, k, v), strict=True)]
        validate_tangent_dtypes(q, tangents)
        return attention_tangent(q, k, v, *tangents, ctx.scale), None

    @staticmethod
    def backward(ctx, do, _dlse):
        return (*flash_backward(do, *ctx.saved_tensors, ctx.scale), None)


def validate_tangent_dtypes(q: torch.Tensor, tangents: list[torch.Tensor]) -> None:
    """Forward-AD tangents reach the jvp rule unchecked: they must match the primal's shape and dtype."""
    for name, t in zip(("q_t", "k_t", "v_t"), tangents, strict=True):
        check_like(name, t, "q", q)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None):
    """Flash attention ``softmax(q k^T * scale) v`` over ``(batch, heads, seq, head_dim)`` inputs.

    fp32/fp16/bf16, any ``seq``, ``1 <= head_dim <= 128``, any strides; ``scale`` defaults to
    ``head_dim ** -0.5``. Differentiable w.r.t. ``q, k, v``; O(seq) extra memory.
    """
    scale = validate(q, k, v, scale)
    return _Attention.apply(q, k, v, scale)[0]
