"""Input validation shared by the kernel launchers.

Every launcher validates its arguments before touching Triton, so a bad call fails with a
``ValueError`` that names the argument, what it got (shape / dtype / device) and what was
expected, instead of a Triton compile error or a silent wrong answer.
"""

from __future__ import annotations

import os

import torch

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
    if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{name} must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got {describe(t)}"
        )


def check_like(name: str, t, ref_name: str, ref: torch.Tensor, *, shape: bool = True) -> None:
    """``t`` matches ``ref`` in dtype and device (and shape unless ``shape=False``)."""
    check_float(name, t, ndim=ref.dim() if shape else None)
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {describe(t)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {describe(t)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {describe(t)}")
