"""Flash attention backward in one kernel with an atomic ``dq`` (FlashAttention-2's 5 matmuls), opt-in.

Selected per backward call by ``IMF_KERNELS_ATTN_BWD`` (:func:`imf_kernels.attention_bwd.backward_path`):
``deterministic`` (default: the two kernels of :mod:`imf_kernels.attention_bwd_op`, 7 matmuls, bitwise
reproducible) or ``atomic`` (this module). The math is that of :mod:`imf_kernels.attention_bwd_op`, per
(batch, head), ``s = scale``, ``delta = rowsum(o * do)`` from the same preprocess kernel::

    dP = do v^T        dS = P * (dP - delta)
    dv = P^T do        dk = s dS^T q       dq = s dS k

It is the dk/dv kernel of :mod:`imf_kernels.attention_bwd_op` launched with ``ATOMIC_DQ=True`` (and
tuned over its own configs, below): one program per ``BLOCK_N`` key rows keeps ``k, v`` and the fp32
``dk, dv`` accumulators resident and streams all query blocks (``S^T = k q^T``). Per query block::

    P^T  = 2^(S^T log2(e) - lse)          (matmul 1: S^T = k q^T)
    dv  += P^T do                         (matmul 2)
    dP^T = v do^T                         (matmul 3)
    dS^T = P^T * (dP^T - delta)
    dk  += dS^T q                         (matmul 4)
    dq[block] += s (dS^T)^T k             (matmul 5, tl.atomic_add into an fp32 buffer)

5 matmuls of ``L x L x D`` per (batch, head) against 7 for the deterministic pair (whose ``dq`` kernel
recomputes ``S`` and ``dP``). With a split head dim (72 = 64 + 16, see
:func:`imf_kernels.attention_common.split_meta`) both column tiles of ``dq`` are added. Padded key
rows (past ``seq``) are zero in ``k``, so their ``dS`` adds exactly zero; padded query rows load as
zeros with the padded ``lse = +inf`` (``P = 0``) and are masked out of the adds.

**Not deterministic.** Every key block adds its ``BLOCK_M x D`` contribution to the same ``dq`` rows;
the order in which the ``cdiv(L, BLOCK_N)`` adds of a row land depends on scheduling, and fp32 addition
is not associative, so ``dq`` can differ in the last bits between two runs on the same inputs (``dk``
and ``dv`` are written once per program and are reproducible). ``torch.use_deterministic_algorithms(True)``
therefore refuses this path (``RuntimeError``; with ``warn_only=True`` a warning), as torch does for its
own non-deterministic ops. The trainer promises bitwise resume, hence the deterministic default.

**Traffic.** Every ``dq`` element receives ``cdiv(L, BLOCK_N)`` fp32 adds (32 at seq 4096 with
``BLOCK_N = 128``), mostly absorbed by L2; whether two fewer matmuls beat that is for a GPU
measurement to decide (``python -m bench kernels``, row ``imf_kernels_atomic_bwd``).

**Memory.** An fp32 ``(B, H, L, D)`` accumulator (zeroed, the strides of ``dq``), ``4 B H L D`` bytes on
top of the gradients, for 16-bit inputs; at the end it is cast into ``dq`` by torch (``dq.copy_``: one
memory-bound elementwise pass, 6 bytes per element, against O(L D) work per element in the kernel,
so a Triton cast kernel would gain nothing and add a kernel to tune and gate). For fp32 inputs the
adds go straight into the zeroed ``dq``: no extra buffer, no cast.

The adds are ``tl.atomic_add(..., sem="relaxed")``: only the sum after the kernel is read, so no
ordering is needed. On sm_90 Triton emits ``atom.global.gpu.relaxed.add.v4.f32`` and ptxas, the result
being unused, ``REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU``: 16-byte vector reductions (4 per thread and
iteration at d64, 64x128, 8 warps; 5 at d72, the 16-column tile adding one), each predicated on its
row when ``seq`` leaves a ragged block (static compile; ``FTZ``: a subnormal fp32 partial sum is
flushed to zero).
"""

from __future__ import annotations

import torch
import triton

from . import _tuning
from .attention_bwd_op import dkdv_kernel
from .attention_common import SMEM_SLACK, drop_sm8x_spills, head_columns, row_grid, tile_configs


def _atomic_smem(meta: dict, num_stages: int) -> int:
    """Shared memory of the dk/dv kernel with ``ATOMIC_DQ``: resident ``k, v`` plus buffered ``q, do``
    tiles (as without), a second copy of ``k`` (the ``dq`` matmul's B operand), the ``dS^T`` tile
    read transposed and one more ``BLOCK_M x BLOCK_N`` of layout-conversion scratch, plus slack.
    Calibrated on sm_90 compiles: for every kept config at d64 / d72 / d128 it is 3,072-36,352 B above
    the compiled size (without the last three terms it was up to 37 KB below)."""
    size, m, n = meta["Q"].element_size(), meta["BLOCK_M"], meta["BLOCK_N"]
    tile = head_columns(meta) * size
    return tile * (3 * n + num_stages * 2 * m) + 2 * m * n * size + SMEM_SLACK


def _prune(configs: list, meta: dict) -> list:
    """Drop the tiles that spill on sm_90 at this launch's head-tile columns (the rule below): above 80
    columns the 64 x 128 tile, and at 81-96 (the split 64 + 32 tile of d88, d96) the 32 x 128 one too;
    on sm_8x also the tiles :data:`imf_kernels.attention_common.SM8X_SPILLS` lists."""
    columns = head_columns(meta)

    def spills(c) -> bool:
        area = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
        return columns > 80 and (area >= 64 * 128 or (columns <= 96 and c.kwargs["BLOCK_N"] == 128))

    return drop_sm8x_spills("atomic", [c for c in configs if not spills(c)], meta)


# Rule (sm_90 compiles, bf16: iMF-B/2 = seq 276 d64; MF-XL/2 = seq 256 d72; seq 4096 d64, d72 = 64 + 16,
# d128; and head_dim 8-128 in steps of 8 at seq 1000 and 4096): 8 warps throughout (on 4 warps 64x64 spills
# 4-12 B at d72 and 388-420 B at d128, 32x64 68-72 B at d128); BLOCK_N (resident keys) 128 or 64, BLOCK_M
# (streamed queries) 32 or 64, 2 or 3 stages; 64x128 only up to 80 columns (:func:`_prune`; it spills
# 76-84 B at d128); 32x128 not at 81-96 columns (d88, d96 = 64 + 32: 255 registers, 4-8 B spilled at seq
# 1000); 16x128 dropped (scalar 16-bit loads at d72). Kept, registers and shared bytes (s2-s3), no spills,
# 16-byte loads, wgmma, REDG.F32x4 adds:
#   64x128  d64 220-224, 82,432-99,328    d72 237-238, 115,200-136,192   d96, d128 pruned
#   32x128  d64 157-161, 73,984-82,432    d72 246-255, 90,368-100,864    d96 pruned  d128 216-226, 139,520-156,160
#   64x64   d64 189-192, 66,048-82,944    d72 210-214, 86,528-107,520    d96 226-234  d128 237-242, 131,584-164,864
#   32x64   d64 113-117, 49,408-57,856    d72 224-228, 59,648-70,144     d96 230-244  d128 168-175, 90,368-107,008
# First = the pinned default: the largest tile, i.e. the fewest dq adds per element (L / BLOCK_N).
ATOMIC_CONFIGS = tile_configs(((64, 128, 8), (32, 128, 8), (64, 64, 8), (32, 64, 8)), num_stages=(3, 2))


# The dk/dv kernel of :mod:`imf_kernels.attention_bwd_op` with ``ATOMIC_DQ``, tuned over these configs.
_attn_bwd_atomic = _tuning.autotune(
    candidates=ATOMIC_CONFIGS,
    key=["SEQ", "HEAD_DIM"],
    smem_bytes=_atomic_smem,
    tensor_arg="Q",
    prune=_prune,
    interpret_config=triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}),
    name="attention_bwd_atomic_op._attn_bwd_atomic",
)(dkdv_kernel)


def atomic_backward(inputs: tuple, strides: tuple, scalars: tuple, dq, dk, dv, split: dict) -> None:
    """Fill ``dq, dk, dv`` with the dk/dv kernel in ``ATOMIC_DQ`` mode (one program per key block), given
    ``flash_backward``'s ``(q, k, v, do, lse_pad, delta)``, their strides, ``(heads, scale * log2(e), scale)``
    and the launch meta, whose ``ALIGN`` was checked on ``dq``: the fp32 accumulator has its strides."""
    acc = dq if dq.dtype == torch.float32 else torch.empty_like(dq, dtype=torch.float32)
    assert acc.stride() == dq.stride(), (acc.stride(), dq.stride())  # ALIGN holds for acc's strides
    acc.zero_()
    batch, heads, seq, _ = inputs[0].shape
    _attn_bwd_atomic[row_grid("BLOCK_N", seq, batch * heads)](
        *inputs,
        dk,
        dv,
        acc,
        *strides,
        *dk.stride(),
        *dv.stride(),
        *acc.stride(),
        *scalars,
        SEQ=seq,
        ATOMIC_DQ=True,
        **split,
    )
    if acc is not dq:
        dq.copy_(acc)
