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

computed by two kernels without atomics (so the gradients are deterministic): one program per
key block accumulates ``dk, dv`` over all query blocks, one program per query block
accumulates ``dq`` over all key blocks; both recompute ``P`` from ``lse``.

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

Block sizes: in the backward kernels the head dim is one ``BLOCK_D = next_power_of_2(head_dim)``
tile (min 16), masked when ``head_dim`` is not a power of two (72 runs as 128: the padding costs
matmul work, not memory traffic). The forward kernel (both modes) splits such a head dim into two
power-of-two column tiles when that is less work (:func:`forward_meta`: 72 = 64 + 16, i.e. 80
columns, 1.11x the matmul work of 72 instead of 1.78x; sm_90, JVP 128x64/8 warps: 224 registers,
0 spills, 164 KB smem, against 255 registers, 44 B spilled and 262 KB, over the limit, padded).
``seq`` is a compile-time constant, as in the Triton tutorial: the loop trip
counts and the ragged tail are static (full key blocks run unmasked, the tail block masked),
at the price of one compile per sequence length; the autotuner keys on it anyway. (It also
keeps the kernels runnable in the Triton 3.6 interpreter with NumPy 2.4, which cannot use a
runtime scalar as a ``range`` bound.)

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
from ._checks import check_float, check_like, interpreting
from ._layout import aligned, load_rows, stride_align, tile_ptrs

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
# Lazy rescaling: the running max is raised only when a block exceeds it by more than this (log2
# units), so unnormalised probabilities stay <= 2^5 (fp16 ``p_t`` overflows only past |S_t - c| ~ 2,000).
RESCALE_LOG2: tl.constexpr = tl.constexpr(5.0)


@triton.jit
def program_ids(SEQ: tl.constexpr, BLOCK: tl.constexpr):
    """``(block, batch * head)`` of this program on the flattened 1-D grid (``BLOCK``-row slices of
    ``SEQ`` fastest, so the programs of one head run together and share its K/V in L2). One axis:
    grid axes 1 and 2 stop at 65,535 programs, axis 0 at 2^31 - 1."""
    n_blocks: tl.constexpr = (SEQ + BLOCK - 1) // BLOCK
    pid = tl.program_id(0)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def program_offsets(
    SEQ: tl.constexpr, BLOCK: tl.constexpr, OTHER: tl.constexpr, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):  # fmt: skip
    """Offsets of a program that owns ``BLOCK`` rows of one (batch, head) and streams ``OTHER``-row
    blocks: ``off_bh`` (:func:`program_ids`), the int64 ``off_b, off_h``, the own ``rows``, the
    ``others`` of a streamed block and both head-dim column tiles ``offs_d, d_ok, offs_d2, d2_ok``
    (the second is used only when the head dim is split)."""
    start, off_bh = program_ids(SEQ, BLOCK)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    rows = start * BLOCK + tl.arange(0, BLOCK)
    others = tl.arange(0, OTHER)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
    d2_ok = offs_d2 < HEAD_DIM
    return off_bh, off_b, off_h, rows, others, offs_d, d_ok, offs_d2, d2_ok


@triton.jit
def _fwd_inner(
    acc, acc2, acc_t, acc_t2, l_i, r_i, m_i, c_i, q, q2, q_t, q_t2,
    k_ptrs, v_ptrs, kt_ptrs, vt_ptrs, k2_ptrs, v2_ptrs, kt2_ptrs, vt2_ptrs,
    stride_kl, stride_vl, stride_ktl, stride_vtl, offs_n, d_ok, d2_ok, qk_scale, scale,
    seq_len: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_D2: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, WITH_TANGENT: tl.constexpr,
):  # fmt: skip
    """Online-softmax update over all key blocks (the full ones unmasked, then the ragged tail masked),
    with lazy rescaling and, if ``WITH_TANGENT``, the tangent terms (module docstring). With ``SPLIT``
    the head dim is two column tiles (``acc2``, ``q2``, ``k2``, ... hold the second)."""
    n_full: tl.constexpr = (seq_len // BLOCK_N) * BLOCK_N
    for MASK_N in tl.static_range(2):  # 0: the full blocks, unmasked; 1: the ragged tail
        for start_n in range(n_full if MASK_N else 0, seq_len if MASK_N else n_full, BLOCK_N):
            cols = start_n + offs_n
            k = load_rows(k_ptrs + start_n * stride_kl, cols, seq_len, d_ok, MASK_N, EVEN_D)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            if SPLIT:
                k2 = load_rows(k2_ptrs + start_n * stride_kl, cols, seq_len, d2_ok, MASK_N, EVEN_D2)
                qk = tl.dot(q2, tl.trans(k2), qk, input_precision=PRECISION)
            if MASK_N:
                qk = tl.where((cols < seq_len)[None, :], qk, float("-inf"))
            if WITH_TANGENT:
                k_t = load_rows(kt_ptrs + start_n * stride_ktl, cols, seq_len, d_ok, MASK_N, EVEN_D)
                s_t = tl.dot(q_t, tl.trans(k), input_precision=PRECISION)
                s_t = tl.dot(q, tl.trans(k_t), s_t, input_precision=PRECISION)
                if SPLIT:
                    k_t2 = load_rows(kt2_ptrs + start_n * stride_ktl, cols, seq_len, d2_ok, MASK_N, EVEN_D2)
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
            v = load_rows(v_ptrs + start_n * stride_vl, cols, seq_len, d_ok, MASK_N, EVEN_D)
            p_lo = p.to(v.dtype)
            if SPLIT:
                v2 = load_rows(v2_ptrs + start_n * stride_vl, cols, seq_len, d2_ok, MASK_N, EVEN_D2)
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
                v_t = load_rows(vt_ptrs + start_n * stride_vtl, cols, seq_len, d_ok, MASK_N, EVEN_D)
                acc_t = tl.dot(p_t_lo, v, acc_t, input_precision=PRECISION)
                acc_t = tl.dot(p_lo, v_t, acc_t, input_precision=PRECISION)
                if SPLIT:
                    v_t2 = load_rows(vt2_ptrs + start_n * stride_vtl, cols, seq_len, d2_ok, MASK_N, EVEN_D2)
                    acc_t2 = tl.dot(p_t_lo, v2, acc_t2, input_precision=PRECISION)
                    acc_t2 = tl.dot(p_lo, v_t2, acc_t2, input_precision=PRECISION)
            acc = tl.dot(p_lo, v, acc, input_precision=PRECISION)
            if SPLIT:
                acc2 = tl.dot(p_lo, v2, acc2, input_precision=PRECISION)
    return acc, acc2, acc_t, acc_t2, l_i, r_i, m_i, c_i


# Shared memory the compiler adds to the tiles (barriers, layout-conversion scratch): the first JVP
# kernel at d128, 64x64, 3 stages was estimated at 229,376 B and compiled to 233,472 B (> 232,448).
SMEM_SLACK = 4096


def tile_configs(tiles, num_stages) -> list:
    """``triton.Config`` per ``(BLOCK_M, BLOCK_N, num_warps)`` tile and pipeline depth."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n_}, num_warps=w, num_stages=n)
        for m, n_, w in tiles
        for n in num_stages
    ]


def _fwd_smem(meta: dict, num_stages: int) -> int:
    """Shared memory of :func:`_attn_fwd`: the ``q`` (and ``q_t``) tile plus ``num_stages`` buffered
    ``k, v`` (and ``k_t, v_t``) tiles."""
    tile = (meta["BLOCK_D"] + (meta["BLOCK_D2"] if meta["SPLIT"] else 0)) * meta["Q"].element_size()
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
# - BLOCK_N = 32 for short or ragged sequences (iMF's 276 tokens: 9 blocks, 86% useful keys).
# The first entry of a mode is its pinned config (IMF_KERNELS_PINNED=1).
FWD_PRIMAL_CONFIGS = tile_configs(
    ((128, 64, 8), (64, 64, 4), (128, 128, 8), (64, 128, 8), (64, 32, 4)), num_stages=(3, 2)
)
FWD_TANGENT_CONFIGS = tile_configs(((128, 64, 8), (64, 64, 4), (128, 32, 8), (64, 32, 4)), num_stages=(3, 2))
FWD_CONFIGS = list(dict.fromkeys(FWD_PRIMAL_CONFIGS + FWD_TANGENT_CONFIGS))


def _fwd_prune(configs: list, meta: dict) -> list:
    """The configs of the launch's mode (``WITH_TANGENT``) among ``configs``, in the mode's order; with
    the tangent at a 128-column head tile only ``BLOCK_N = 32`` (``python -m bench compile``, d128:
    128x64 on 8 warps spills 40 B, 64x64 on 4 warps 288 B; the 32-wide tiles are clean)."""
    if not meta["WITH_TANGENT"]:
        return [c for c in FWD_PRIMAL_CONFIGS if c in configs]
    wide = meta["BLOCK_D"] + (meta["BLOCK_D2"] if meta["SPLIT"] else 0) > 96
    return [c for c in FWD_TANGENT_CONFIGS if c in configs and not (wide and c.kwargs["BLOCK_N"] > 32)]


@_tuning.autotune(
    candidates=FWD_CONFIGS,
    key=["SEQ", "HEAD_DIM", "WITH_TANGENT"],
    smem_bytes=_fwd_smem,
    tensor_arg="Q",
    prune=_fwd_prune,
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
    """``delta = rowsum(o * do)`` in fp32 for ``BLOCK_M`` rows."""
    start_m, off_bh = program_ids(SEQ, BLOCK_M)
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
    tl.store(DELTA + off_bh.to(tl.int64) * SEQ + offs_m, tl.sum(o * do, 1), mask=offs_m < SEQ)


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
    q_ptrs, q2_ptrs, do_ptrs, do2_ptrs, lse_ptrs, delta_ptrs, stride_ql, stride_dol,
    offs_m, d_ok, d2_ok, qk_scale, seq_len: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``dk`` (unscaled ``dS^T q``) and ``dv = P^T do`` of the resident keys, accumulated over all
    query blocks: the full ones unmasked, then the ragged tail masked (``dk2, dv2, k2, ...``: the
    second column tile when ``SPLIT``). Query rows past the end get ``lse = +inf``, so their ``P`` is
    exactly zero."""
    EVEN_D: tl.constexpr = SPLIT or HEAD_DIM == BLOCK_D  # as in bwd_program
    EVEN_D2: tl.constexpr = BLOCK_D + BLOCK_D2 == HEAD_DIM
    m_full: tl.constexpr = (seq_len // BLOCK_M) * BLOCK_M
    dk, dk2 = tl.zeros(k.shape, tl.float32), tl.zeros(k2.shape, tl.float32)
    dv, dv2 = tl.zeros(v.shape, tl.float32), tl.zeros(v2.shape, tl.float32)
    for MASK_M in tl.static_range(2):  # 0: the full blocks, unmasked; 1: the ragged tail
        for start_m in range(m_full if MASK_M else 0, seq_len if MASK_M else m_full, BLOCK_M):
            rows, q, q2, do, do2, s_t = stream_block(k, k2, q_ptrs, q2_ptrs, do_ptrs, do2_ptrs, start_m, stride_ql,
                stride_dol, offs_m, d_ok, d2_ok, seq_len, MASK_M, EVEN_D, EVEN_D2, SPLIT, PRECISION)  # fmt: skip
            if MASK_M:
                lse = tl.load(lse_ptrs + start_m, mask=rows < seq_len, other=float("inf"))
                delta = tl.load(delta_ptrs + start_m, mask=rows < seq_len, other=0.0)
            else:
                lse = tl.load(lse_ptrs + start_m)
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
    return dk, dk2, dv, dv2


def bwd_autotune(candidates: list, smem_bytes, interpret_config: triton.Config):
    """:func:`imf_kernels._tuning.autotune` for a backward tile kernel: keyed on ``SEQ, HEAD_DIM``,
    configs pruned by their shared memory (``smem_bytes``, for ``Q``'s dtype)."""
    return _tuning.autotune(
        candidates=candidates,
        key=["SEQ", "HEAD_DIM"],
        smem_bytes=smem_bytes,
        tensor_arg="Q",
        interpret_config=interpret_config,
    )


def _dkdv_smem(meta: dict, num_stages: int) -> int:
    """Shared memory of :func:`_attn_bwd_dkdv`: resident ``k, v`` plus buffered ``q, do`` tiles."""
    tile = (meta["BLOCK_D"] + (meta["BLOCK_D2"] if meta["SPLIT"] else 0)) * meta["Q"].element_size()
    return tile * (2 * meta["BLOCK_N"] + num_stages * 2 * meta["BLOCK_M"]) + SMEM_SLACK


# Rule (sm_90 compiles, as for the forward): BLOCK_N (resident k, v, dk, dv rows) 128 -> 8 warps
# (on 4 warps: 246-255 registers, 0.7-1.1 KB spilled); 64 -> 8 warps, or 4 warps with BLOCK_M 32
# (64x64 on 4 warps spills 128-136 B at d128); BLOCK_M 32 or 64; 2 or 3 stages (a 4th only adds
# shared memory).
DKDV_CONFIGS = tile_configs(((64, 128, 8), (32, 128, 8), (32, 64, 4), (64, 64, 8)), num_stages=(3, 2))


@bwd_autotune(DKDV_CONFIGS, _dkdv_smem, triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}))
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd, stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd, stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    n_heads, qk_scale, scale,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_D2: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: ``dk, dv`` for ``BLOCK_N`` key rows of one (batch, head), looping over all queries."""
    off_bh, off_b, off_h, offs_n, offs_m, offs_d, d_ok, offs_d2, d2_ok, k, k2, v, v2, \
        q_ptrs, q2_ptrs, do_ptrs, do2_ptrs, stride_ql, stride_dol = bwd_program(
            K, V, Q, DO, stride_kb, stride_kh, stride_kl, stride_kd, stride_vb, stride_vh, stride_vl, stride_vd,
            stride_qb, stride_qh, stride_ql, stride_qd, stride_dob, stride_doh, stride_dol, stride_dod, n_heads,
            SEQ, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, ALIGN, BLOCK_N, BLOCK_M)  # fmt: skip
    lse_ptrs = LSE + off_bh.to(tl.int64) * SEQ + offs_m
    delta_ptrs = DELTA + off_bh.to(tl.int64) * SEQ + offs_m
    dk, dk2, dv, dv2 = _bwd_dkdv_inner(
        k, k2, v, v2, q_ptrs, q2_ptrs, do_ptrs, do2_ptrs, lse_ptrs, delta_ptrs, stride_ql, stride_dol, offs_m,
        d_ok, d2_ok, qk_scale, SEQ, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_N, BLOCK_M, SPLIT, PRECISION)  # fmt: skip
    store_tiles(DK, dk * scale, dk2 * scale, off_b, off_h, offs_n, offs_d, offs_d2, d_ok, d2_ok,
                stride_dkb, stride_dkh, stride_dkl, stride_dkd, SEQ, SPLIT, ALIGN)  # fmt: skip
    store_tiles(DV, dv, dv2, off_b, off_h, offs_n, offs_d, offs_d2, d_ok, d2_ok,
                stride_dvb, stride_dvh, stride_dvl, stride_dvd, SEQ, SPLIT, ALIGN)  # fmt: skip


@triton.jit
def _bwd_dq_inner(
    q, q2, do, do2, lse, delta,
    k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, stride_kl, stride_vl,
    offs_n, d_ok, d2_ok, qk_scale, seq_len: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``dq`` (unscaled ``dS k``) of the resident queries, accumulated over all key blocks: the full
    ones unmasked, then the ragged tail masked (``dq2``: the second column tile when ``SPLIT``)."""
    EVEN_D: tl.constexpr = SPLIT or HEAD_DIM == BLOCK_D  # as in bwd_program
    EVEN_D2: tl.constexpr = BLOCK_D + BLOCK_D2 == HEAD_DIM
    n_full: tl.constexpr = (seq_len // BLOCK_N) * BLOCK_N
    dq, dq2 = tl.zeros(q.shape, tl.float32), tl.zeros(q2.shape, tl.float32)
    for MASK_N in tl.static_range(2):  # 0: the full blocks, unmasked; 1: the ragged tail
        for start_n in range(n_full if MASK_N else 0, seq_len if MASK_N else n_full, BLOCK_N):
            cols, k, k2, v, v2, s = stream_block(q, q2, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, start_n, stride_kl,
                stride_vl, offs_n, d_ok, d2_ok, seq_len, MASK_N, EVEN_D, EVEN_D2, SPLIT, PRECISION)  # fmt: skip
            p = tl.math.exp2(s * qk_scale - lse[:, None])
            if MASK_N:
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
    tile = (meta["BLOCK_D"] + (meta["BLOCK_D2"] if meta["SPLIT"] else 0)) * meta["Q"].element_size()
    return tile * (2 * meta["BLOCK_M"] + num_stages * 2 * meta["BLOCK_N"]) + SMEM_SLACK


# Rule: the mirror of dk/dv: BLOCK_M (resident q, do, dq rows) 128 -> 8 warps (on 4 warps it spills
# ~1.4 KB), 64 -> 4 or 8 warps; BLOCK_N 32 or 64; 2 or 3 stages.
DQ_CONFIGS = tile_configs(((128, 64, 8), (128, 32, 8), (64, 64, 4), (64, 32, 4), (64, 64, 8)), num_stages=(3, 2))


@bwd_autotune(DQ_CONFIGS, _dq_smem, triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}))
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
    row_ok = offs_m < SEQ
    lse = tl.load(LSE + off_bh.to(tl.int64) * SEQ + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * SEQ + offs_m, mask=row_ok, other=0.0)
    dq, dq2 = _bwd_dq_inner(
        q, q2, do, do2, lse, delta, k_ptrs, k2_ptrs, v_ptrs, v2_ptrs, stride_kl, stride_vl, offs_n,
        d_ok, d2_ok, qk_scale, SEQ, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, BLOCK_N, SPLIT, PRECISION)  # fmt: skip
    store_tiles(DQ, dq * scale, dq2 * scale, off_b, off_h, offs_m, offs_d, offs_d2, d_ok, d2_ok,
                stride_dqb, stride_dqh, stride_dql, stride_dqd, SEQ, SPLIT, ALIGN)  # fmt: skip


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


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 inputs (16-bit inputs always use their tensor-core path): IEEE
    under the interpreter and whenever torch's own fp32 matmuls are (the default
    ``torch.get_float32_matmul_precision() == "highest"``; exact, but FMA dots, not a fast path on a
    GPU), TF32 tensor cores once the user opts in with ``torch.set_float32_matmul_precision("high")``."""
    if dtype != torch.float32 or (not interpreting() and torch.get_float32_matmul_precision() != "highest"):
        return "tf32"
    return "ieee"


def kernel_meta(*tensors: torch.Tensor) -> dict:
    """Compile-time arguments shared by every attention kernel reading ``tensors`` (``q`` first)."""
    head_dim = tensors[0].shape[-1]
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "PRECISION": dot_precision(tensors[0].dtype),
        "ALIGN": stride_align(*tensors),
    }


def split_meta(*tensors: torch.Tensor) -> dict:
    """:func:`kernel_meta` for the forward, dk/dv and dq kernels, which split a head dim that is not a
    power of two into two power-of-two column tiles when that is less matmul work than padding:
    72 = 64 + 16 (80 columns computed, 1.11x) instead of 128 (1.78x); 96 = 64 + 32; 48 = 32 + 16."""
    meta = kernel_meta(*tensors)
    head_dim, padded = meta["HEAD_DIM"], meta["BLOCK_D"]
    first = max(16, 1 << (head_dim.bit_length() - 1))
    second = max(16, triton.next_power_of_2(max(1, head_dim - first)))
    split = head_dim > first and first + second < padded
    return {**meta, "BLOCK_D": first if split else padded, "BLOCK_D2": second, "SPLIT": split}


def row_grid(block: str, seq: int, batch_heads: int):
    """Launch grid: one axis of ``cdiv(seq, block) * batch_heads`` programs (see :func:`program_ids`)."""
    return lambda meta: (triton.cdiv(seq, meta[block]) * batch_heads,)


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


def flash_backward(do, q, k, v, o, lse, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` from the saved forward (shared with :mod:`imf_kernels.attention_jvp_op`)."""
    batch, heads, seq, _ = q.shape
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    if q.numel() == 0:
        return dq, dk, dv
    meta = kernel_meta(q, k, v, do, o, dq, dk, dv)  # the preprocess reads whole (padded) rows
    split = split_meta(q, k, v, do, o, dq, dk, dv)
    delta = alloc(lse)
    _attn_bwd_preprocess[row_grid("BLOCK_M", seq, batch * heads)](
        o,
        do,
        delta,
        *o.stride(),
        *do.stride(),
        heads,
        SEQ=seq,
        HEAD_DIM=meta["HEAD_DIM"],
        BLOCK_D=meta["BLOCK_D"],
        ALIGN=meta["ALIGN"],
    )
    inputs = (q, k, v, do, lse, delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    scalars = (heads, scale * LOG2E, scale)
    grid_n, grid_m = row_grid("BLOCK_N", seq, batch * heads), row_grid("BLOCK_M", seq, batch * heads)
    _attn_bwd_dkdv[grid_n](*inputs, dk, dv, *strides, *dk.stride(), *dv.stride(), *scalars, SEQ=seq, **split)
    _attn_bwd_dq[grid_m](*inputs, dq, *strides, *dq.stride(), *scalars, SEQ=seq, **split)
    return dq, dk, dv


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
