"""Layers with an explicit dual (primal + tangent) forward.

Each layer's ``forward(x, x_t=None, ...)`` returns ``(y, y_t)``; with ``x_t=None`` it is the
ordinary forward (``y_t`` is ``None``). One code path serves both, so the dual pass cannot drift
from the primal. The op implementations come from the backend object ``self.ops``
(:mod:`imf.ops`), which the model sets on every layer.

Construction may happen on the meta device; :meth:`ConditionEmbedder.init_buffers` recomputes the
one buffer a layer holds after ``to_empty``. Parameter initialisation is the model's ``init_weights``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from imf.ops import ReferenceOps


class DualModule(nn.Module):
    """A module whose ops come from a swappable backend."""

    ops: ReferenceOps = ReferenceOps()


class RMSNorm(DualModule):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, and its tangent."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, x_t=None):
        return self.ops.rms_norm(x, x_t, self.weight, self.eps)


class ConditionEmbedder(DualModule):
    """Scalar condition -> vector: DiT sinusoidal features, then ``Linear -> SiLU -> Linear``.

    Features ``[cos(a f_k), sin(a f_k)]`` with ``a = scale * s`` and ``f_k = 10000^(-k/half)``; their
    tangent is ``[-sin(a f_k), cos(a f_k)] * scale * f_k * s_t``.
    """

    def __init__(self, freq_dim: int, dim: int, scale: float):
        super().__init__()
        if freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {freq_dim}")
        self.freq_dim, self.scale = freq_dim, scale
        self.register_buffer("freqs", torch.empty(freq_dim // 2), persistent=False)
        self.init_buffers()
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def init_buffers(self) -> None:
        """Recompute ``freqs`` (after construction on the meta device and ``to_empty``)."""
        if self.freqs.is_meta:
            return
        half = self.freq_dim // 2
        k = torch.arange(half, dtype=torch.float32, device=self.freqs.device)
        with torch.no_grad():
            self.freqs.copy_(self.scale * torch.exp(-math.log(10000.0) * k / half))

    def forward(self, s: torch.Tensor, s_t: torch.Tensor | None = None):
        args = s[:, None] * self.freqs.to(torch.promote_types(s.dtype, torch.float32))
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        feats_t = None
        if s_t is not None:
            with torch.no_grad():
                d = s_t[:, None] * self.freqs.to(args.dtype)
                a = args[: s_t.shape[0]]
                feats_t = torch.cat([-torch.sin(a) * d, torch.cos(a) * d], dim=-1)
        h, h_t = self.ops.linear(feats, feats_t, self.fc1.weight, self.fc1.bias)
        h, h_t = self.ops.silu(h, h_t)
        return self.ops.linear(h, h_t, self.fc2.weight, self.fc2.bias)


def add_tangent(x_t, delta_t):
    """``x_t + delta_t`` where a missing tangent counts as zero (tangents carry no grad)."""
    if delta_t is None:
        return x_t
    return delta_t if x_t is None else x_t + delta_t


# SwiGLU halves are padded to this many units (16-byte aligned rows and halves; whole 64-column tiles).
SWIGLU_ALIGN = 64


class IMFBlock(DualModule):
    """Pre-norm block of the iMF in-context transformer (no adaLN).

    ``x += g1 * Wo Attn(rope(qknorm(Wq h)), rope(qknorm(Wk h)), Wv h)``, ``h = RMSNorm(x)``;
    ``x += g2 * W3 (silu(W1 h) * W2 h)``, ``h = RMSNorm(x)``. Bias-free projections; ``g1, g2``
    per-channel gates initialised to zero (each block starts as the identity).

    **SwiGLU padding.** ``W1`` and ``W2`` are one ``fc12`` projection whose output halves the SwiGLU
    kernel reads in place. Each half is ``hidden_padded`` = ``hidden`` rounded up to a multiple of
    :data:`SWIGLU_ALIGN` (64) units, so both halves start and every row stride is 16-byte aligned
    (unpadded, iMF-L/2's and XL/2's hidden 2730 puts the second half 5,460 bytes in and every load of
    the kernel is scalar). The padded units are zero (:meth:`zero_padding_`, called by
    ``init_weights``) and provably stay zero: their ``W1 h`` is 0, so their ``silu(0) * W2 h = 0``;
    every gradient they receive (``fc12`` rows: ``dh * b * silu'(0)`` with ``dh = dy W3[:, pad] = 0``;
    ``fc3`` columns: ``dy^T * 0``) is exactly 0, and AdamW (decoupled decay of 0 is 0), clipping and
    EMA keep 0 at 0 (``tests/test_dual_ops.py`` checks all of it). The model computes exactly the
    unpadded function. **State-dict shapes change only where ``hidden % 64 != 0``:** iMF-L/2 and
    XL/2 (hidden 2730 -> 2752: ``fc12.weight`` ``(5504, 1024)``, ``fc3.weight`` ``(1024, 2752)``,
    +0.8% MLP FLOPs); B/2, M/2 (2048) and the demo (256) are unchanged, and the MF DiT has no SwiGLU.
    """

    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.heads, self.head_dim, self.hidden, self.eps = heads, dim // heads, hidden, eps
        self.norm1 = RMSNorm(dim, eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.gate_attn = nn.Parameter(torch.zeros(dim))
        self.norm2 = RMSNorm(dim, eps)
        self.hidden_padded = -(-hidden // SWIGLU_ALIGN) * SWIGLU_ALIGN
        self.fc12 = nn.Linear(dim, 2 * self.hidden_padded, bias=False)
        self.fc3 = nn.Linear(self.hidden_padded, dim, bias=False)
        self.gate_mlp = nn.Parameter(torch.zeros(dim))

    def zero_padding_(self) -> None:
        """Zero the padded SwiGLU units: rows ``hidden:`` of each ``fc12`` half and those ``fc3`` columns."""
        with torch.no_grad():
            self.fc12.weight.view(2, self.hidden_padded, -1)[:, self.hidden :].zero_()
            self.fc3.weight[:, self.hidden :].zero_()

    def forward(self, x, x_t, cos, sin):
        ops = self.ops
        a, a_t = self._attention(x, x_t, cos, sin)
        x = x + self.gate_attn * a
        x_t = add_tangent(x_t, None if a_t is None else self.gate_attn.detach() * a_t)
        h, h_t = self.norm2(x, x_t)
        ab, ab_t = ops.linear(h, h_t, self.fc12.weight)
        gate_in, up = ab.chunk(2, dim=-1)
        gate_in_t, up_t = ab_t.chunk(2, dim=-1) if ab_t is not None else (None, None)
        m, m_t = ops.swiglu(gate_in, up, gate_in_t, up_t)
        f, f_t = ops.linear(m, m_t, self.fc3.weight)
        x = x + self.gate_mlp * f
        x_t = add_tangent(x_t, None if f_t is None else self.gate_mlp.detach() * f_t)
        return x, x_t

    def _attention(self, x, x_t, cos, sin):
        ops = self.ops
        batch, seq, dim = x.shape
        h, h_t = self.norm1(x, x_t)
        qkv, qkv_t = ops.linear(h, h_t, self.qkv.weight)
        split = lambda t: t.view(t.shape[0], seq, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = split(qkv)
        q_t = k_t = v_t = None
        if qkv_t is not None:
            q_t, k_t, v_t = split(qkv_t)
            v_t = v_t.transpose(1, 2)
        q, q_t = ops.qk_norm_rope(q, q_t, self.q_norm.weight, cos, sin, self.eps)
        k, k_t = ops.qk_norm_rope(k, k_t, self.k_norm.weight, cos, sin, self.eps)
        o, o_t = ops.attention(q, k, v.transpose(1, 2), q_t, k_t, v_t)
        merge = lambda t: t.transpose(1, 2).reshape(t.shape[0], seq, dim)
        return ops.linear(merge(o), None if o_t is None else merge(o_t), self.proj.weight)


class OutputHead(DualModule):
    """Final RMSNorm + linear from tokens to patch pixels (the model zero-initialises the linear)."""

    def __init__(self, dim: int, out_dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, x_t, first: int = 0):
        """Tokens ``first:`` of ``x`` to patch pixels (the norm runs on all rows: cheaper than a copy)."""
        h, h_t = self.norm(x, x_t)
        return self.ops.linear(
            h[:, first:], None if h_t is None else h_t[:, first:], self.linear.weight, self.linear.bias
        )
