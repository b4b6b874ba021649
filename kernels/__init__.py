"""Fused Triton kernels for MeanFlow-family training (import name ``imf_kernels``).

Public API (stable)::

    attention(q, k, v, *, scale=None) -> o
    attention_jvp(q, k, v, q_t, k_t, v_t, *, scale=None) -> (o, o_t)
    rms_norm(x, weight, eps=1e-6) -> y
    rms_norm_jvp(x, x_t, weight, eps=1e-6) -> (y, y_t)

Plain-PyTorch references of every op live in :mod:`imf_kernels.reference`.
"""

from . import reference

__all__ = ["reference"]
