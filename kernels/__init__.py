"""Fused Triton kernels for MeanFlow-family training (import name ``imf_kernels``).

Public API (stable)::

    attention(q, k, v, *, scale=None) -> o
    attention_jvp(q, k, v, q_t, k_t, v_t, *, scale=None) -> (o, o_t)
    rms_norm(x, weight, eps=1e-6) -> y
    rms_norm_jvp(x, x_t, weight, eps=1e-6) -> (y, y_t)
    qk_norm_rope(x, weight, cos, sin, eps=1e-6) -> y                # x (B, L, H, Dh) view -> y (B, H, L, Dh)
    qk_norm_rope_jvp(x, x_t, weight, cos, sin, eps=1e-6) -> (y, y_t)
    swiglu(a, b) -> h
    swiglu_jvp(a, b, a_t, b_t) -> (h, h_t)
    linear_dual(x, x_t, weight, bias=None) -> (y, y_t)
    scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False) -> o   # SDPA drop-in, torch.func.jvp-able

Plain-PyTorch references of every op live in :mod:`imf_kernels.reference`.

Reproducible kernel configs (see :mod:`imf_kernels._tuning`): ``tuned_configs()`` returns every config
the autotuner chose in this process as the JSON object that ``IMF_KERNELS_CONFIGS=path`` replays
without timing, ``save_tuned_configs(path)`` writes it to ``path``; ``IMF_KERNELS_PINNED=1`` uses one fixed config
per kernel and shape instead.
"""

from . import reference
from ._tuning import cache_document as tuned_configs
from ._tuning import save_cache as save_tuned_configs
from .attention_jvp_op import attention_jvp
from .attention_op import attention
from .linear_dual_op import linear_dual
from .rms_norm_op import rms_norm, rms_norm_jvp
from .rope_op import qk_norm_rope, qk_norm_rope_jvp
from .sdpa import scaled_dot_product_attention
from .swiglu_op import swiglu, swiglu_jvp

__all__ = [
    "attention",
    "attention_jvp",
    "linear_dual",
    "qk_norm_rope",
    "qk_norm_rope_jvp",
    "reference",
    "rms_norm",
    "rms_norm_jvp",
    "save_tuned_configs",
    "scaled_dot_product_attention",
    "swiglu",
    "swiglu_jvp",
    "tuned_configs",
]
