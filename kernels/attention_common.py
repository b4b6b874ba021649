"""Pieces shared by the attention forward (:mod:`imf_kernels.attention_op`) and backward
(:mod:`imf_kernels.attention_bwd_op`) kernels: the 1-D program grid and per-program offsets, the tile
configs and the compile-time arguments (head-dim tiles, split, dot precision, alignment) of a launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import interpreting
from ._layout import stride_align

LOG2E = 1.4426950408889634


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


SMEM_SLACK = 4096


def tile_configs(tiles, num_stages) -> list:
    """``triton.Config`` per ``(BLOCK_M, BLOCK_N, num_warps)`` tile and pipeline depth."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n_}, num_warps=w, num_stages=n)
        for m, n_, w in tiles
        for n in num_stages
    ]


def head_columns(meta: dict) -> int:
    """Head-dim columns a program computes: ``BLOCK_D`` (+ ``BLOCK_D2`` when split)."""
    return meta["BLOCK_D"] + (meta["BLOCK_D2"] if meta.get("SPLIT") else 0)


def device_arch(t: torch.Tensor) -> int:
    """Compute capability of ``t``'s CUDA device as one number (90 for sm_90)."""
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


# sm_8x (Ampere; no wgmma: mma.sync takes both dot operands from registers, so tiles that are clean on
# sm_90 can spill): the configs `python -m bench compile --arch 80` shows spilling, per kernel (and
# tangent mode) and head-tile columns (64: d64, 80: d72 = 64 + 16, 128: d128), as
# (BLOCK_M, BLOCK_N, warps, stages): spill bytes, the worst over every shape class (presets, seq
# 256-8192, bf16/fp16; 2026-12-01, triton 3.6). A width between two classes uses the wider one.
SM8X_SPILLS = {
    "fwd_tangent": {
        64: {(128, 64, 8, 3): 40, (128, 64, 8, 2): 8, (64, 64, 4, 3): 92, (64, 64, 4, 2): 68},
        80: {(128, 64, 8, 3): 40, (128, 64, 8, 2): 140, (64, 64, 4, 3): 364, (64, 64, 4, 2): 228},
        128: {
            (128, 32, 8, 2): 168,
            (64, 32, 4, 3): 36,
            (64, 32, 4, 2): 32,
            (128, 64, 8, 3): 40,
            (128, 64, 8, 2): 140,
            (64, 64, 4, 3): 364,
            (64, 64, 4, 2): 228,
        },
    },  # fmt: skip
    "dkdv": {64: {}, 80: {(64, 64, 8, 3): 8}, 128: {(64, 128, 8, 2): 12, (32, 128, 8, 3): 12, (64, 64, 8, 3): 8}},
    "dq": {64: {(128, 64, 8, 2): 8, (64, 64, 4, 2): 80}, 80: {}, 128: {}},
    "atomic": {
        64: {},
        80: {(64, 128, 8, 2): 64, (64, 128, 8, 3): 68, (64, 64, 8, 3): 4},
        128: {(32, 128, 8, 2): 20, (32, 128, 8, 3): 44, (64, 64, 8, 3): 4},
    },
}


def drop_sm8x_spills(kernel: str, configs: list, meta: dict, tensor_arg: str = "Q") -> list:
    """``configs`` without those :data:`SM8X_SPILLS` lists for ``kernel`` at this launch's head-tile
    width, on a device below sm_90 (on sm_90 and later: unchanged). If every config spills there, the
    one that spills least is kept (at d128 with the tangent no tile of the list is spill-free on sm_80:
    64x32 on 4 warps, 2 stages, spills 32 B)."""
    if device_arch(meta[tensor_arg]) >= 90:
        return configs
    table = SM8X_SPILLS[kernel]
    width = head_columns(meta)
    spills = table[min((w for w in table if w >= width), default=max(table))]

    def key(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)

    clean = [c for c in configs if key(c) not in spills]
    return clean or sorted(configs, key=lambda c: spills[key(c)])[:1]


def least_padding(configs: list, block: str, seq: int):
    """The first of ``configs`` whose ``block`` tile pads ``seq`` to the fewest rows, e.g. a 64-row
    tile at iMF's 276 tokens (320 rows, 86% useful) before a 128-row one (384, 72%); at a multiple of
    128 the list order decides. The pinned rule of the attention kernels: the tile the program keeps
    resident wastes the least work, the rest is the list's preference."""
    return min(configs, key=lambda c: triton.cdiv(seq, c.kwargs[block]) * c.kwargs[block])


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
