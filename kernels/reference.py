"""Plain-PyTorch references for every kernel in ``imf_kernels``.

They define the contract the Triton kernels are tested against, serve as the ``"reference"``
backend of the model, and are the baselines the benchmarks import. Each ``*_jvp`` returns
``(y, y_t)`` where ``y`` is differentiable as usual and the tangent ``y_t`` is computed under
``torch.no_grad`` from the explicit derivative formula (the MeanFlow losses stop its gradient).
Tests check those formulas against ``torch.func.jvp`` of the primal functions below.

Shapes: attention takes ``(batch, heads, seq, head_dim)``; norms act on the last dim.

**Tangent prefix.** Every ``*_jvp`` accepts tangents that cover only a leading-batch prefix of
the primal (``x_t.shape[0] <= x.shape[0]``, all other dims equal): the primal is computed for
all rows and the tangent for the first ``x_t.shape[0]`` rows. The MeanFlow losses use this so
that samples with ``r = t`` (whose tangent is multiplied by ``t - r = 0``) cost no tangent work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: fp32, or fp64 for fp64 inputs (so fp64 tests are exact)."""
    return x.double() if x.dtype == torch.float64 else x.float()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Math attention ``softmax(q k^T * scale) v``; materialises the ``seq x seq`` scores.

    It is built from ops with forward-mode AD, so ``torch.func.jvp`` runs through it.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    p = torch.softmax(_acc(s), dim=-1).to(q.dtype)
    return torch.matmul(p, v)


def attention_jvp(q, k, v, q_t, k_t, v_t, *, scale: float | None = None):
    """``(o, o_t)`` with the explicit tangent of softmax attention.

    ``S = q k^T s``, ``P = softmax(S)``; ``S_t = (q_t k^T + q k_t^T) s``;
    ``P_t = P * (S_t - rowsum(P * S_t))``; ``o_t = P_t v + P v_t``. Tangent math in fp32.
    """
    o = attention(q, k, v, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n = q_t.shape[0]
    with torch.no_grad():
        qf, kf, vf = _acc(q[:n].detach()), _acc(k[:n].detach()), _acc(v[:n].detach())
        p = torch.softmax(torch.matmul(qf, kf.transpose(-1, -2)) * scale, dim=-1)
        s_t = (torch.matmul(_acc(q_t), kf.transpose(-1, -2)) + torch.matmul(qf, _acc(k_t).transpose(-1, -2))) * scale
        p_t = p * (s_t - (p * s_t).sum(-1, keepdim=True))
        o_t = torch.matmul(p_t, vf) + torch.matmul(p, _acc(v_t))
    return o, o_t.to(q.dtype)


def attention_jvp_autodiff(q, k, v, q_t, k_t, v_t, *, scale: float | None = None):
    """``torch.func.jvp`` of :func:`attention`: the forward-mode baseline (O(seq^2) memory)."""
    return torch.func.jvp(lambda a, b, c: attention(a, b, c, scale=scale), (q, k, v), (q_t, k_t, v_t))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``y = x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, computed in fp32."""
    xf = _acc(x)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * _acc(weight)).to(x.dtype)


def rms_norm_jvp(x, x_t, weight, eps: float = 1e-6):
    """``(y, y_t)`` with ``y_t = weight * (x_t * rstd - x * rstd^3 * mean(x * x_t))``."""
    y = rms_norm(x, weight, eps)
    with torch.no_grad():
        xf, xtf = _acc(x[: x_t.shape[0]].detach()), _acc(x_t)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y_t = _acc(weight.detach()) * (xtf * rstd - xf * rstd.pow(3) * (xf * xtf).mean(-1, keepdim=True))
    return y, y_t.to(x.dtype)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``h = silu(a) * b``."""
    return F.silu(a) * b


def swiglu_jvp(a, b, a_t, b_t):
    """``(h, h_t)``: ``h_t = silu'(a) a_t b + silu(a) b_t``, ``silu'(a) = s (1 + a (1 - s))``, ``s = sigmoid(a)``."""
    h = swiglu(a, b)
    n = a_t.shape[0]
    with torch.no_grad():
        af, bf = _acc(a[:n].detach()), _acc(b[:n].detach())
        sig = torch.sigmoid(af)
        h_t = sig * (1 + af * (1 - sig)) * _acc(a_t) * bf + af * sig * _acc(b_t)
    return h, h_t.to(a.dtype)


def linear_dual(x, x_t, weight, bias=None):
    """``(y, y_t) = (x W^T + b, x_t W^T)``: the tangent of an affine map has no bias term."""
    y = F.linear(x, weight, bias)
    with torch.no_grad():
        y_t = F.linear(x_t, weight.detach())
    return y, y_t


def rope_tables(seq: int, head_dim: int, *, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``(seq, head_dim)`` for 1-D rotary embedding (rotate-half layout), fp32."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(seq, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over the last dim: ``x * cos + rotate_half(x) * sin``.

    ``rotate_half([x1, x2]) = [-x2, x1]``. RoPE is linear in ``x``, so the tangent is ``rope(x_t)``.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (_acc(x) * cos + _acc(rotated) * sin).to(x.dtype)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6):
    """QK-RMSNorm over ``head_dim``, then RoPE, with the head transpose folded in (the contract of
    :func:`imf_kernels.qk_norm_rope`): ``x`` ``(B, L, H, D)`` -> ``rope(rms_norm(x).transpose(1, 2))``
    ``(B, H, L, D)``; ``cos``, ``sin``: ``(L, D)`` from :func:`rope_tables`."""
    return rope(rms_norm(x, weight, eps).transpose(1, 2), cos, sin)


def qk_norm_rope_jvp(x, x_t, weight, cos, sin, eps: float = 1e-6):
    """``(y, y_t)`` of :func:`qk_norm_rope`: the RMSNorm tangent, rotated (RoPE is linear in its input)."""
    y, y_t = rms_norm_jvp(x, x_t, weight, eps)
    with torch.no_grad():
        y_t = rope(y_t.transpose(1, 2), cos, sin)
    return rope(y.transpose(1, 2), cos, sin), y_t
