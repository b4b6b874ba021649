"""Backends: the ops a network layer calls, each with an optional tangent.

Every method takes primal inputs and their tangents (``None`` for a primal-only call) and
returns ``(y, y_t)`` with ``y_t = None`` when no tangent was given. The tangents may cover a
leading-batch prefix of the primal rows (see :mod:`imf_kernels.reference`). Tangent outputs are
detached: the MeanFlow losses stop their gradient, so only the primal path is differentiated.

``ReferenceOps`` is plain PyTorch (math attention): its primal-only path is made of ops with
forward-mode AD, so ``torch.func.jvp`` runs through a model built on it. ``TritonOps`` swaps in
the fused kernels of ``imf_kernels``; their forward-mode rules make ``torch.func.jvp`` run through
it as well (eager), and under ``torch.compile`` it traces without graph breaks (see its docstring).
"""

from __future__ import annotations

import math

import imf_kernels
import torch
import torch.nn.functional as F
from imf_kernels import custom_ops
from imf_kernels import reference as ref

Pair = tuple[torch.Tensor, torch.Tensor | None]


def matmul_operands(x, x_t, weight, bias):
    """Cast a linear layer's operands to one dtype: autocast's when it is on, else the weight's.

    Under bf16 autocast (fp32 master weights) or an FSDP2 bf16 ``param_dtype``, inputs computed in
    fp32 (time-embedding features, the fp32 residual stream) meet bf16 weights; the fused kernels
    need one dtype, and this is the cast autocast would have made for ``F.linear``.
    """
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
    cast = lambda v: v if v is None or v.dtype == dtype else v.to(dtype)
    return cast(x), cast(x_t), cast(weight), cast(bias)


class ReferenceOps:
    """Plain-PyTorch ops. Primal-only calls are pure torch and differentiable in both AD modes."""

    name = "reference"

    def linear(self, x, x_t, weight, bias=None) -> Pair:
        x, x_t, weight, bias = matmul_operands(x, x_t, weight, bias)
        if x_t is None:
            return F.linear(x, weight, bias), None
        return ref.linear_dual(x, x_t, weight, bias)

    def rms_norm(self, x, x_t, weight, eps) -> Pair:
        if x_t is None:
            return ref.rms_norm(x, weight, eps), None
        return ref.rms_norm_jvp(x, x_t, weight, eps)

    def qk_norm_rope(self, x, x_t, weight, cos, sin, eps) -> Pair:
        """RMSNorm over head_dim, then RoPE; ``x`` is ``(B, L, H, Dh)``, the result ``(B, H, L, Dh)``."""
        y, y_t = self.rms_norm(x, x_t, weight, eps)
        cos, sin = cos[:, None], sin[:, None]
        y = ref.rope(y, cos, sin).transpose(1, 2)
        if y_t is not None:
            with torch.no_grad():
                y_t = ref.rope(y_t, cos, sin).transpose(1, 2)
        return y, y_t

    def attention(self, q, k, v, q_t=None, k_t=None, v_t=None) -> Pair:
        if q_t is None:
            return ref.attention(q, k, v), None
        return ref.attention_jvp(q, k, v, q_t, k_t, v_t)

    def swiglu(self, a, b, a_t, b_t) -> Pair:
        if a_t is None:
            return ref.swiglu(a, b), None
        return ref.swiglu_jvp(a, b, a_t, b_t)

    # Small glue ops (embedding MLPs, the MF DiT's adaLN blocks): plain torch in every backend.

    @staticmethod
    def silu(x, x_t) -> Pair:
        y = F.silu(x)
        if x_t is None:
            return y, None
        with torch.no_grad():
            s = torch.sigmoid(x[: x_t.shape[0]].detach())
            return y, x_t * s * (1 + x[: x_t.shape[0]].detach() * (1 - s))

    @staticmethod
    def gelu_tanh(x, x_t) -> Pair:
        """``gelu(a) = a/2 (1 + tanh(c (a + 0.044715 a^3)))``, ``c = sqrt(2/pi)``."""
        y = F.gelu(x, approximate="tanh")
        if x_t is None:
            return y, None
        with torch.no_grad():
            a = x[: x_t.shape[0]].detach().to(torch.promote_types(x.dtype, torch.float32))
            c = math.sqrt(2.0 / math.pi)
            th = torch.tanh(c * (a + 0.044715 * a.pow(3)))
            d = 0.5 * (1 + th) + 0.5 * a * (1 - th * th) * c * (1 + 3 * 0.044715 * a * a)
            return y, (x_t * d).to(x_t.dtype)

    @staticmethod
    def layer_norm(x, x_t, eps) -> Pair:
        """Affine-free LayerNorm; ``y_t = rstd (xc_t - y mean(y xc_t))`` with ``xc_t = x_t - mean(x_t)``."""
        y = F.layer_norm(x, x.shape[-1:], eps=eps)
        if x_t is None:
            return y, None
        with torch.no_grad():
            acc = torch.promote_types(x.dtype, torch.float32)
            xp = x[: x_t.shape[0]].detach().to(acc)
            rstd = torch.rsqrt(xp.var(-1, unbiased=False, keepdim=True) + eps)
            yp = (xp - xp.mean(-1, keepdim=True)) * rstd
            xc_t = x_t.to(acc) - x_t.to(acc).mean(-1, keepdim=True)
            return y, (rstd * (xc_t - yp * (yp * xc_t).mean(-1, keepdim=True))).to(x_t.dtype)


class TritonOps(ReferenceOps):
    """The fused Triton kernels of ``imf_kernels``.

    Eager: every fused op. Their ``autograd.Function``s carry ``jvp`` rules, so ``torch.func.jvp``
    and ``forward_ad`` through the plain forward (tangent ``None``) run the fused kernels too.

    Under ``torch.compile`` (see :mod:`imf_kernels.custom_ops`): attention, primal and dual, goes
    through its custom ops (opaque to Dynamo, flash backward, no graph break); RMSNorm, QK-norm +
    RoPE, SwiGLU and the dual linear use the plain-PyTorch reference, which Inductor fuses with its
    neighbours (the kernels' jvp rules would be graph breaks). ``torch.func.jvp`` inside
    ``torch.compile`` raises rather than return wrong tangents.
    """

    name = "triton"

    def linear(self, x, x_t, weight, bias=None) -> Pair:
        if x_t is None or torch.compiler.is_compiling():
            return super().linear(x, x_t, weight, bias)
        return imf_kernels.linear_dual(*matmul_operands(x, x_t, weight, bias))

    def rms_norm(self, x, x_t, weight, eps) -> Pair:
        if torch.compiler.is_compiling():
            return super().rms_norm(x, x_t, weight, eps)
        if x_t is None:
            return imf_kernels.rms_norm(x, weight, eps), None
        return imf_kernels.rms_norm_jvp(x, x_t, weight, eps)

    def qk_norm_rope(self, x, x_t, weight, cos, sin, eps) -> Pair:
        if torch.compiler.is_compiling():
            return super().qk_norm_rope(x, x_t, weight, cos, sin, eps)
        if x_t is None:
            return imf_kernels.qk_norm_rope(x, weight, cos, sin, eps), None
        return imf_kernels.qk_norm_rope_jvp(x, x_t, weight, cos, sin, eps)

    def attention(self, q, k, v, q_t=None, k_t=None, v_t=None) -> Pair:
        if q_t is None:
            return custom_ops.attention(q, k, v), None
        return custom_ops.attention_jvp(q, k, v, q_t, k_t, v_t)

    def swiglu(self, a, b, a_t, b_t) -> Pair:
        if torch.compiler.is_compiling():
            return super().swiglu(a, b, a_t, b_t)
        if a_t is None:
            return imf_kernels.swiglu(a, b), None
        return imf_kernels.swiglu_jvp(a, b, a_t, b_t)


def make_ops(backend: str) -> ReferenceOps:
    if backend == "reference":
        return ReferenceOps()
    if backend == "triton":
        return TritonOps()
    raise ValueError(f"backend must be 'reference' or 'triton', got {backend!r}")
