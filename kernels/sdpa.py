"""Drop-in ``torch.nn.functional.scaled_dot_product_attention`` on the fused kernels, forward-mode AD included.

Every public MeanFlow codebase takes ``du/dt`` with ``torch.func.jvp`` and has to run math attention
for it, because SDPA's flash / efficient backends have no forward-mode AD (pytorch #128971,
#165530, #154226). :func:`scaled_dot_product_attention` has SDPA's signature, layout
``(batch, heads, seq, head_dim)`` and semantics (``softmax(q k^T * scale) v``, ``scale`` defaulting
to ``head_dim ** -0.5``), so swapping it in is a one-line change::

    from imf_kernels import scaled_dot_product_attention
    o = scaled_dot_product_attention(q, k, v)          # instead of F.scaled_dot_product_attention

* backward: the flash backward (O(seq) memory);
* ``torch.func.jvp`` and ``torch.autograd.forward_ad`` dual tensors: the ``jvp`` rule of
  :func:`imf_kernels.attention` (the fused JVP kernel); the primal output keeps its ordinary graph,
  so ``u, dudt = torch.func.jvp(f, ...)`` followed by a loss on ``u`` and ``.backward()`` trains
  (``dudt`` must be detached: it is a stop-gradient output);
* ``torch.compile``: traced as a custom op, forward and backward, no graph break;
  ``torch.func.jvp`` *inside* ``torch.compile`` raises instead of returning wrong tangents (see
  :mod:`imf_kernels.custom_ops`).

Supported: fp32/fp16/bf16 on CUDA (CPU tensors under ``TRITON_INTERPRET=1``), query and key of
equal length, ``1 <= head_dim <= 128`` shared by query, key and value, any strides, ``enable_gqa``
(key/value heads repeated to the query's, as SDPA's math path does). Not supported, each a
``ValueError`` naming the argument: ``attn_mask``, ``dropout_p > 0``, ``is_causal=True``, other
ranks or dtypes, different query/key lengths or head dims.

Tested: CPU Triton interpreter in fp32/fp16 against ``torch.func.jvp`` / autograd of math attention in fp64.
"""

from __future__ import annotations

import torch

from . import custom_ops
from ._checks import check_float, describe
from .attention_op import MAX_HEAD_DIM


def _validate(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> None:
    if attn_mask is not None:
        got = describe(attn_mask) if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
        raise ValueError(f"attn_mask must be None (the fused kernels have no attention mask), got {got}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or dropout_p != 0:
        raise ValueError(f"dropout_p must be 0.0 (the fused kernels have no attention dropout), got {dropout_p!r}")
    if is_causal:
        raise ValueError(f"is_causal must be False (the fused kernels are non-causal), got {is_causal!r}")
    if not isinstance(enable_gqa, bool):
        raise ValueError(f"enable_gqa must be a bool, got {enable_gqa!r}")
    check_float("query", query, ndim=4)
    batch, heads, seq, head_dim = query.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"query: head_dim must be in [1, {MAX_HEAD_DIM}], got {describe(query)}")
    for name, t in (("key", key), ("value", value)):
        check_float(name, t, ndim=4)
        if t.dtype != query.dtype or t.device != query.device:
            raise ValueError(
                f"{name} must have the dtype and device of query ({query.dtype}, {query.device}), got {describe(t)}"
            )
        if t.shape[0] != batch or t.shape[2:] != (seq, head_dim):
            raise ValueError(
                f"{name} must have shape ({batch}, heads, {seq}, {head_dim}) (query's batch, sequence "
                f"length and head_dim), got {describe(t)}"
            )
    if key.shape[1] != heads and not (enable_gqa and heads % key.shape[1] == 0):
        hint = "a divisor of query's heads" if enable_gqa else "pass enable_gqa=True for grouped-query attention"
        raise ValueError(f"key has {key.shape[1]} heads and query {heads} ({hint}), got {describe(key)}")
    if value.shape[1] != key.shape[1]:
        raise ValueError(f"value must have the heads of key ({key.shape[1]}), got {describe(value)}")


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``softmax(query key^T * scale) value`` with :func:`torch.nn.functional.scaled_dot_product_attention`'s
    signature, on the fused kernels; differentiable in reverse and forward mode (module docstring).

    ``query, key, value``: ``(batch, heads, seq, head_dim)``; with ``enable_gqa``, key and value may have
    fewer heads (a divisor of query's). Returns ``(batch, heads, seq, head_dim)`` in query's dtype.
    """
    _validate(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return custom_ops.attention(query, key, value, scale=scale)
