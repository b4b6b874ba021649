"""``torch.compile`` support: flash attention as ``torch.library`` custom ops, and the compile-aware entry point.

**Why custom ops.** :func:`imf_kernels.attention`'s ``torch.autograd.Function`` has a ``jvp`` rule, so
that ``torch.func.jvp`` and ``torch.autograd.forward_ad`` see the fused kernels in eager mode. Dynamo
(torch 2.13, checked) cannot trace such a Function:

* if an input requires grad, it stops at the Function ("Unsupported custom jvp"): a graph break,
  an error under ``fullgraph=True`` (declaring ``jvp`` is what breaks the compiled model; cf.
  pytorch #180284);
* if not, it inlines ``forward`` and drops the rule: ``torch.func.jvp`` inside ``torch.compile``
  returns the tangent of whatever ``forward`` traced to, not the rule's (pytorch #192985).

A custom op is opaque to Dynamo: ``register_fake`` gives its output metadata and ``register_autograd``
its backward (the flash backward, itself a custom op), so a compiled model traces forward and
backward in one graph. But custom ops have no forward-mode rule: ``torch.func.jvp`` or forward AD
over one silently yields a zero (or no) tangent (torch 2.13, checked). Hence :func:`attention`::

    eager                                   -> imf_kernels.attention (jvp rule + flash backward)
    compiling                               -> custom op imf_kernels::flash_attention (+ backward op)
    compiling under forward-mode AD         -> RuntimeError (torch.func.jvp traced by Dynamo, or a
                                               forward_ad dual level)

The error is raised while Dynamo traces, so a tangent is never silently wrong: without
``fullgraph=True`` Dynamo gives up on that frame and runs it eagerly, where the jvp rules apply
(right tangents, that frame not compiled); with ``fullgraph=True`` the error reaches the caller
inside ``torch._dynamo.exc.Unsupported``. ``torch.func.jvp`` of an already compiled function,
called from eager, is refused by Dynamo itself (pytorch #128711) and also runs eagerly.

The explicit dual path (:func:`attention_jvp`: primal + tangent in one fused pass, primal-only
backward, prefix tangents) is a custom op the same way (``imf_kernels::flash_attention_dual``), so
the engine's ``forward_with_tangent`` compiles too; that is the way to combine JVPs and ``torch.compile``.

The elementwise kernels (RMSNorm, QK-norm + RoPE, SwiGLU) are not registered here: under
``torch.compile`` the model's triton backend uses their plain-PyTorch references, which Inductor
fuses with their neighbours (:mod:`imf.ops`).
"""

from __future__ import annotations

import torch
from torch._C._functorch import TransformType
from torch.autograd import forward_ad

from . import attention_jvp_op
from . import attention_op as flash

JVP_UNDER_COMPILE = (
    "imf_kernels: torch.func.jvp / forward-mode AD inside torch.compile is not supported: Dynamo drops "
    "custom autograd.Function jvp rules (pytorch #192985) and custom ops have no forward-mode rule, so "
    "the tangent would be wrong. Call torch.func.jvp outside torch.compile (eager runs the fused jvp "
    "kernels), or compile the explicit dual path (attention_jvp / model.forward_with_tangent)"
)


@torch.compiler.assume_constant_result
def forward_mode_active() -> bool:
    """True inside a ``torch.func.jvp`` transform (at any level) or a ``forward_ad.dual_level``.

    Dynamo evaluates it while tracing (it guards on the functorch stack and the dual level, so a
    graph traced without forward-mode AD is not reused under it)."""
    jvp = any(level.key() == TransformType.Jvp for level in torch._C._functorch.get_interpreter_stack() or ())
    return jvp or forward_ad._current_level >= 0


@torch.library.custom_op("imf_kernels::flash_attention", mutates_args=())
def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of the flash forward kernel on validated inputs (``lse``: fp32, ``(batch, heads, seq)``)."""
    o, lse = flash.empty_outputs(q)
    flash.flash_forward_into(q, k, v, o, lse, scale)
    return o, lse


@flash_attention.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("imf_kernels::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of the flash backward kernels."""
    return flash.flash_backward(do, q, k, v, o, lse, scale)


@flash_attention_backward.register_fake
def _(do, q, k, v, o, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("imf_kernels::flash_attention_dual", mutates_args=())
def flash_attention_dual(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tangents: list[torch.Tensor], scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, o_t, lse)`` of the fused JVP kernel on validated inputs, ``tangents = [q_t, k_t, v_t]`` for
    every sample (unlike ``imf_kernels::attention_tangent``, which keeps only ``o_t``: it has no backward)."""
    o, lse = flash.empty_outputs(q)
    o_t = flash.alloc(tangents[0])
    flash.flash_forward_into(q, k, v, o, lse, scale, (*tangents, o_t))
    return o, o_t, lse


@flash_attention_dual.register_fake
def _(q, k, v, tangents, scale):
    return torch.empty_like(q), torch.empty_like(tangents[0]), q.new_empty(q.shape[:3], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, *_, ctx.scale = inputs
    o, *_, lse = output
    ctx.no_grads = [[None] * len(x) if isinstance(x, list) else None for x in inputs[3:]]
    ctx.save_for_backward(q, k, v, o, lse)


def _backward(ctx, do, *_):
    """The flash backward of ``o`` only (``o_t`` is a stop-gradient output, ``lse`` a statistic)."""
    return (*flash_attention_backward(do, *ctx.saved_tensors, ctx.scale), *ctx.no_grads)


flash_attention.register_autograd(_backward, setup_context=_setup_context)
flash_attention_dual.register_autograd(_backward, setup_context=_setup_context)


def _check_compilable() -> None:
    if forward_mode_active():
        raise RuntimeError(JVP_UNDER_COMPILE)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """:func:`imf_kernels.attention` that also compiles: the custom op while ``torch.compile`` traces,
    the ``autograd.Function`` (with its jvp rule) otherwise; see the module docstring."""
    if not torch.compiler.is_compiling():
        return _eager_attention(q, k, v, scale)
    _check_compilable()
    return flash_attention(q, k, v, flash.validate(q, k, v, scale))[0]


@torch.compiler.disable
def _eager_attention(q, k, v, scale):
    """The eager route, kept out of Dynamo: when a frame falls back to eager after the error above,
    Dynamo still compiles the frames it calls; this one must run as plain Python (jvp rule)."""
    return flash.attention(q, k, v, scale=scale)


def attention_jvp(q, k, v, q_t, k_t, v_t, *, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`imf_kernels.attention_jvp` (the explicit dual path) that also compiles: its custom ops while
    ``torch.compile`` traces. Prefix tangents (``n = q_t.shape[0] <= batch``): the dual op on ``[:n]``,
    the primal op on the rest, concatenated. ``o_t`` is detached, as there."""
    if not torch.compiler.is_compiling():
        return attention_jvp_op.attention_jvp(q, k, v, q_t, k_t, v_t, scale=scale)
    _check_compilable()
    scale = flash.validate(q, k, v, scale)
    attention_jvp_op.validate_tangents(q, q_t, k_t, v_t)
    n = q_t.shape[0]
    o, o_t, _ = flash_attention_dual(q[:n], k[:n], v[:n], [q_t, k_t, v_t], scale)
    if n < q.shape[0]:
        o = torch.cat([o, flash_attention(q[n:], k[n:], v[n:], scale)[0]])
    return o, o_t.detach()
