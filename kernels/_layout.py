"""Memory-layout helpers shared by every kernel module: row views of the elementwise ops' operands,
16-byte stride alignment (launcher check and in-kernel stride rebuild) and strided
``(batch, heads, seq, head_dim)`` tile pointers and loads."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import describe


def as_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as a ``(rows, t.shape[-1])`` view (no copy) with unit stride in the last dim.

    Contiguous tensors qualify, and so do last-dim slices of them (e.g. the halves of a packed
    ``Linear`` output): the launchers pass the row stride to the kernel.
    """
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError as err:
        raise ValueError(
            f"{name} must flatten to (rows, {t.shape[-1]}) without a copy (contiguous, or a last-dim slice "
            f"of a contiguous tensor), got {describe(t)}, strides {t.stride()}"
        ) from err
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride in the last dim, got {describe(t)}, {t.stride()}")
    return rows


def rows_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if :func:`as_rows` can view it, else a contiguous copy. For forward-mode tangents,
    which ``torch.func.jvp`` / ``forward_ad`` may hand over in any layout (expanded, transposed)."""
    try:
        as_rows("tangent", t)
    except ValueError:
        return t.contiguous()
    return t


def stride_align(*tensors: torch.Tensor) -> int:
    """Elements per 16 bytes if every tensor starts 16-byte aligned, has unit last-dim stride and all
    other strides multiples of 16 bytes (the kernels then rebuild their strides with :func:`aligned`
    and get vectorised, pipelined loads, e.g. at head_dim 72); else 1."""
    per_16b = 16 // tensors[0].element_size()
    ok = all(
        t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(s % per_16b == 0 for s in t.stride()[:-1]) for t in tensors
    )
    return per_16b if ok else 1


@triton.jit
def aligned(stride, ALIGN: tl.constexpr):
    """``stride`` rebuilt as a visible multiple of ``ALIGN`` (the launcher checked it is one): Triton
    does not specialise a stride like 72 and ignores ``tl.multiple_of`` on scalars, so without this a
    head_dim-72 tile falls back to scalar 2-byte loads and no ``cp.async`` pipelining."""
    return (stride // ALIGN) * ALIGN


@triton.jit
def tile_ptrs(X, off_b, off_h, rows, offs_d, stride_b, stride_h, stride_l, stride_d, ALIGN: tl.constexpr):
    """Pointers to ``X[off_b, off_h, rows, offs_d]`` of a strided ``(batch, heads, seq, head_dim)`` tensor."""
    stride_b = aligned(stride_b, ALIGN)
    stride_h = aligned(stride_h, ALIGN)
    stride_l = aligned(stride_l, ALIGN)
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
def add_rows(ptrs, x, rows, n_rows, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """``atomic_add`` of a ``(rows, BLOCK_D)`` fp32 tile (relaxed: only the final sum is read), skipping
    rows ``>= n_rows`` (if ``MASK_ROWS``) and padded head-dim columns (unless ``EVEN_D``); the
    accumulating mirror of :func:`load_rows`."""
    if MASK_ROWS:
        tl.atomic_add(ptrs, x, mask=(rows < n_rows)[:, None] & d_ok[None, :], sem="relaxed")
    elif EVEN_D:
        tl.atomic_add(ptrs, x, sem="relaxed")
    else:
        tl.atomic_add(ptrs, x, mask=d_ok[None, :], sem="relaxed")
