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
