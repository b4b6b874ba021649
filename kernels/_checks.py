"""Input validation shared by the kernel launchers.

Every launcher validates its arguments before touching Triton, so a bad call fails with a
``ValueError`` that names the argument, what it got (shape / dtype / device) and what was
expected, instead of a Triton compile error or a silent wrong answer.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch._C import _functorch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_float(name: str, t, *, ndim: int | None = None) -> None:
    """``t`` is a floating tensor (fp32/fp16/bf16) with ``ndim`` dims on a device Triton can run on."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {describe(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got {describe(t)}")
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dim, got {describe(t)}")
    if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreting()):
        raise ValueError(f"{name} must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got {describe(t)}")


def check_eps(eps) -> None:
    """``eps`` is a finite real number > 0 (``rsqrt(mean(x^2) + eps)`` is NaN or inf otherwise)."""
    ok = isinstance(eps, int | float) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0
    if not ok:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def check_like(name: str, t, ref_name: str, ref: torch.Tensor, *, shape: bool = True) -> None:
    """``t`` matches ``ref`` in dtype and device (and shape unless ``shape=False``)."""
    check_float(name, t, ndim=ref.dim() if shape else None)
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {describe(t)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {describe(t)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {describe(t)}")


def check_prefix(name: str, t, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` is a prefix tangent of ``ref``: ``ref``'s dtype, device and trailing dims, and
    ``t.shape[0] <= ref.shape[0]`` (the convention in :mod:`imf_kernels.reference`).

    ``ref`` needs a leading batch dim.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ref.dim() < 2:
        raise ValueError(f"{ref_name} needs a leading batch dim to take tangent {name}, got {describe(ref)}")
    if t.dim() != ref.dim() or t.shape[1:] != ref.shape[1:] or t.shape[0] > ref.shape[0]:
        raise ValueError(
            f"{name} must have shape (n, {', '.join(map(str, ref.shape[1:]))}) with n <= {ref.shape[0]} "
            f"(a batch prefix of {ref_name}), got {describe(t)}"
        )
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {describe(t)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {describe(t)}")


def plain(t):
    """``t`` without ``torch.func``'s per-level wrappers (anything but a tensor is returned as is)."""
    if not isinstance(t, torch.Tensor):
        return t
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            raise ValueError("imf_kernels ops do not support torch.func.vmap (got a batched tensor)")
        t = _functorch.get_unwrapped(t)
    return t


def saved(ctx) -> tuple:
    """``ctx.saved_tensors`` without ``torch.func`` wrappers (see :func:`kernel_rule`)."""
    return tuple(map(plain, ctx.saved_tensors))


def kernel_rule(rule):
    """Decorates the ``jvp`` / ``backward`` rule of an ``autograd.Function`` that launches kernels.

    Under ``torch.func.jvp`` (or ``grad``) the rule receives its tangents and saved tensors wrapped
    for the transform's level, and every tensor it creates is wrapped too; Triton needs plain
    storage. The rule runs with the transforms and autograd disabled on unwrapped arguments (read
    saved tensors with :func:`saved`), and what it returns is a constant to every enclosing
    transform: the kernels' tangents and gradients are not differentiated again (no second order). ``vmap`` is not
    supported (a clear ``ValueError``).
    """

    @functools.wraps(rule)
    def run(ctx, *args):
        with torch._C._DisableFuncTorch(), torch.no_grad():
            return rule(ctx, *map(plain, args))

    return run


def per_thread(config, elements: int) -> int:
    """Tile elements (of a program's ``elements``) each thread of a ``triton.Config`` holds."""
    return elements // (32 * config.num_warps)


def preferred(configs: list, elements) -> object | None:
    """The pinned-mode choice (``IMF_KERNELS_PINNED=1``, no timing) among an elementwise kernel's
    surviving ``configs``: closest to 16 tile elements per thread (``elements(c)`` per program; the
    middle of the spill-free range of the compile report), then the most warps, then the earlier in
    ``configs`` (callers sort by their own tie-break). ``None`` if there is no config."""
    key = lambda c: (abs(per_thread(c, elements(c)) - 16), -c.num_warps)
    return min(configs, key=key) if configs else None
