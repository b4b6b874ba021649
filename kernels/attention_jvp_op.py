"""Explicit-tangent attention: ``attention_jvp(q, k, v, q_t, k_t, v_t) -> (o, o_t)``, the fast training route.

The math and the fused kernel (primal and tangent in one flash-style pass, 6 matmuls of
``L x L x D``) are in :mod:`imf_kernels.attention_op`; this module is the autograd wrapper the
engine's dual forward calls: ``o`` is differentiable through the flash backward, ``o_t`` is
detached (the MeanFlow losses stop its gradient) and nothing is saved for it.

Prefix tangents (see :mod:`imf_kernels.reference`): ``q_t, k_t, v_t`` may cover only the first
``n <= batch`` samples. The fused kernel runs on ``q[:n]`` and the plain forward kernel on
``q[n:]``, both writing views of one ``o`` and one ``lse`` (batch is the leading dim, so the views
are plain strided tensors); one backward then covers the whole batch.

Tested: CPU Triton interpreter in fp32/fp16 against ``torch.func.jvp`` of math attention in fp64;
bf16 and long sequences only in the GPU-marked tests.
"""

from __future__ import annotations

import torch

from . import attention_op as flash
from ._checks import check_like, check_prefix


def validate_tangents(q, q_t, k_t, v_t) -> None:
    """``q_t`` is a batch prefix of ``q`` (``n <= batch`` samples); ``k_t, v_t`` are shaped like ``q_t``."""
    check_prefix("q_t", q_t, "q", q)
    check_like("k_t", k_t, "q_t", q_t)
    check_like("v_t", v_t, "q_t", q_t)


class _AttentionJVP(torch.autograd.Function):
    """``(o, o_t, lse)``: ``o`` differentiable through the flash backward, ``o_t`` and ``lse`` not."""

    @staticmethod
    def forward(q, k, v, q_t, k_t, v_t, scale):
        n = q_t.shape[0]
        o, lse = flash.empty_outputs(q)
        o_t = flash.alloc(q_t)
        flash.flash_forward_into(q[:n], k[:n], v[:n], o[:n], lse[:n], scale, (q_t, k_t, v_t, o_t))
        flash.flash_forward_into(q[n:], k[n:], v[n:], o[n:], lse[n:], scale)
        return o, o_t, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, *_, scale = inputs
        o, o_t, lse = output
        ctx.mark_non_differentiable(o_t, lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, do, _do_t, _dlse):
        return (*flash.flash_backward(do, *ctx.saved_tensors, ctx.scale), None, None, None, None)


def attention_jvp(q, k, v, q_t, k_t, v_t, *, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, o_t)``: flash attention and its forward-mode derivative along ``(q_t, k_t, v_t)``.

    Inputs as :func:`imf_kernels.attention`; the tangents may cover a leading-batch prefix
    (``q_t.shape[0] = n <= q.shape[0]``, ``k_t, v_t`` shaped like ``q_t``), and ``o_t`` has
    ``q_t``'s shape. ``o`` is differentiable w.r.t. ``q, k, v``; ``o_t`` is detached.
    """
    scale = flash.validate(q, k, v, scale)
    validate_tangents(q, q_t, k_t, v_t)
    o, o_t, _ = _AttentionJVP.apply(q, k, v, q_t, k_t, v_t, scale)
    return o, o_t
