"""Flash attention backward: :func:`flash_backward`, the one place that picks the path.

Given ``do = dLoss/do`` and the forward's ``o`` and log-sum-exp ``lse`` (the math is in
:mod:`imf_kernels.attention_op`)::

    delta = rowsum(o * do)      dP = do v^T      dS = P * (dP - delta)
    dv = P^T do                 dk = s dS^T q    dq = s dS k

The preprocess kernel writes ``delta`` and a padded copy of ``lse``
(:func:`imf_kernels.attention_bwd_op.backward_stats`); then ``IMF_KERNELS_ATTN_BWD``, read at each
call (:func:`backward_path`), picks one of two paths that fill ``dq, dk, dv``:

* ``deterministic`` (default, :func:`imf_kernels.attention_bwd_op.deterministic_backward`): a dk/dv
  kernel and a dq kernel without atomics, 7 matmuls, bitwise reproducible;
* ``atomic`` (opt-in, :func:`imf_kernels.attention_bwd_atomic_op.atomic_backward`): the dk/dv kernel
  also adding ``dq`` with fp32 atomics, 5 matmuls, ``dq`` reproducible only up to the order of the adds.

Imports run one way: this module -> the two path modules -> :mod:`imf_kernels.attention_common`
(``tests/test_kernel_imports.py`` checks that no module of the package imports itself back).
"""

from __future__ import annotations

import os
import warnings

import torch

from .attention_bwd_atomic_op import atomic_backward
from .attention_bwd_op import backward_stats, deterministic_backward
from .attention_common import LOG2E, alloc, kernel_meta, split_meta

BWD_ENV = "IMF_KERNELS_ATTN_BWD"
BWD_PATHS = ("deterministic", "atomic")


def backward_path() -> str:
    """The backward ``IMF_KERNELS_ATTN_BWD`` asks for (unset or empty: ``deterministic``), read at each
    call. ``ValueError`` for any other value; ``RuntimeError`` for ``atomic`` while
    ``torch.are_deterministic_algorithms_enabled()`` (a warning instead under ``warn_only=True``)."""
    path = os.environ.get(BWD_ENV) or "deterministic"
    if path not in BWD_PATHS:
        raise ValueError(f"{BWD_ENV}: got {path!r}, expected one of {', '.join(map(repr, BWD_PATHS))}")
    if path == "atomic" and torch.are_deterministic_algorithms_enabled():
        message = (
            f"{BWD_ENV}=atomic: the atomic flash-attention backward accumulates dq with fp32 atomic adds "
            "and is not deterministic, but torch.use_deterministic_algorithms(True) is set; unset "
            f"{BWD_ENV} (or set it to 'deterministic') or turn deterministic algorithms off"
        )
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, stacklevel=3)
    return path


def flash_backward(do, q, k, v, o, lse, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` from the saved forward (shared by :mod:`imf_kernels.attention_op` and
    :mod:`imf_kernels.attention_jvp_op`) on the path :func:`backward_path` names."""
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    if q.numel() == 0:
        return dq, dk, dv
    path = backward_path()
    meta = kernel_meta(q, k, v, do, o, dq, dk, dv)  # the preprocess reads whole (padded) rows
    split = split_meta(q, k, v, do, o, dq, dk, dv)
    lse_pad, delta = backward_stats(o, do, lse, meta)
    inputs = (q, k, v, do, lse_pad, delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    scalars = (q.shape[1], scale * LOG2E, scale)
    launch = atomic_backward if path == "atomic" else deterministic_backward
    launch(inputs, strides, scalars, dq, dk, dv, split)
    return dq, dk, dv
