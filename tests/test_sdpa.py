"""The SDPA drop-in (``imf_kernels.scaled_dot_product_attention``): reverse mode, ``torch.func.jvp``,
``forward_ad`` and ``torch.compile``, against math attention in fp64 (bound: :func:`numerics.assert_bound`).

CPU cases run under ``TRITON_INTERPRET=1`` in fp32/fp16 on odd shapes; compile tests use the
``aot_eager`` backend (graph capture and AOT autograd, no code generation).
"""

from __future__ import annotations

import re

import imf_kernels
import pytest
import torch
import torch._dynamo
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from imf_kernels import attention_jvp, custom_ops, reference, scaled_dot_product_attention
from numerics import DEVICE, assert_bound
from torch._dynamo.utils import counters

pytestmark = pytest.mark.triton

F32, F16 = torch.float32, torch.float16
# (seq, head_dim): seq 1, 17, 33 and head_dim 16, 64, 72, each value twice
SHAPES = [(1, 16), (17, 64), (33, 72), (17, 16), (33, 64), (1, 72)]


def vit_qkv(batch, heads, seq, head_dim, dtype, grad=False):
    """``q, k, v`` as a timm/DiT attention module makes them: ``qkv.reshape(B, L, 3, H, D).permute(2, 0, 3, 1, 4)``."""
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, device=DEVICE, dtype=dtype)
    q, k, v = qkv.reshape(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return [x.requires_grad_(grad) for x in (q, k, v)]


def math_jvp(primals, tangents, dtype):
    """``torch.func.jvp`` of math attention on the inputs cast to ``dtype``."""
    cast = [x.detach().to(dtype) for x in (*primals, *tangents)]
    return torch.func.jvp(reference.attention, tuple(cast[:3]), tuple(cast[3:]))


def math_grads(primals, do, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in primals]
    return torch.autograd.grad(reference.attention(*leaves), leaves, do.to(dtype))


def check_primal_and_tangent(o, o_t, primals, tangents, dtype):
    o64, o_t64 = math_jvp(primals, tangents, torch.float64)
    o_lo, o_t_lo = math_jvp(primals, tangents, dtype)
    assert_bound("o", o, o_lo, o64)
    assert_bound("o_t", o_t, o_t_lo, o_t64)


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("seq, head_dim", SHAPES)
def test_func_jvp_and_backward_match_math_attention(dtype, seq, head_dim, seeded, poisoned):
    """``u, dudt = torch.func.jvp(sdpa, ...)`` (primal, tangent) and ``u.backward()`` (the py-meanflow
    pattern) against ``torch.func.jvp`` / autograd of math attention in fp64."""
    primals = vit_qkv(2, 2, seq, head_dim, dtype, grad=True)
    tangents = tuple(torch.randn_like(x) for x in primals)
    o, o_t = torch.func.jvp(scaled_dot_product_attention, tuple(primals), tangents)
    assert o.dtype == o_t.dtype == dtype and o_t.shape == o.shape
    check_primal_and_tangent(o, o_t, primals, tangents, dtype)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, primals, do)
    grads64, grads_lo = math_grads(primals, do, torch.float64), math_grads(primals, do, dtype)
    norm = torch.cat([g.flatten() for g in grads64]).norm()
    for name, g, g_lo, g64 in zip(("dq", "dk", "dv"), grads, grads_lo, grads64, strict=True):
        assert_bound(name, g, g_lo, g64, norm=norm)


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("seq, head_dim", SHAPES[:3])
def test_forward_ad_matches_math_attention(dtype, seq, head_dim, seeded):
    """``torch.autograd.forward_ad`` dual tensors on all of query, key and value."""
    primals = vit_qkv(1, 2, seq, head_dim, dtype)
    tangents = [torch.randn_like(x) for x in primals]
    with fwad.dual_level():
        duals = [fwad.make_dual(x, t) for x, t in zip(primals, tangents, strict=True)]
        o, o_t = fwad.unpack_dual(scaled_dot_product_attention(*duals))
    check_primal_and_tangent(o, o_t, primals, tangents, dtype)


def test_semantics_match_torch_sdpa(seeded):
    """Same result as ``F.scaled_dot_product_attention`` (CPU math backend), with an explicit scale and
    with grouped-query attention (key/value with a divisor of query's heads)."""
    q = torch.randn(2, 4, 17, 16, device=DEVICE, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 17, 16, device=DEVICE, dtype=torch.float64) for _ in range(2))
    for kwargs, (kk, vv) in (
        ({"scale": 0.3}, (k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1))),
        ({"enable_gqa": True}, (k, v)),
    ):
        want = F.scaled_dot_product_attention(q, kk, vv, **kwargs)
        same = F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), **kwargs)
        got = scaled_dot_product_attention(q.float(), kk.float(), vv.float(), **kwargs)
        assert_bound(f"o {kwargs}", got, same, want)


def test_gqa_func_jvp(seeded):
    """``enable_gqa``: the tangent and the key/value gradients flow through the head repeat."""
    q, q_t = (torch.randn(1, 4, 9, 16, device=DEVICE) for _ in range(2))
    k, v, k_t, v_t = (torch.randn(1, 2, 9, 16, device=DEVICE) for _ in range(4))
    k.requires_grad_()
    o, o_t = torch.func.jvp(
        lambda a, b, c: scaled_dot_product_attention(a, b, c, enable_gqa=True), (q, k, v), (q_t, k_t, v_t)
    )
    (dk,) = torch.autograd.grad(o.sum(), k)
    want, same = (gqa_reference(q, k, v, (q_t, k_t, v_t), dtype) for dtype in (torch.float64, F32))
    for name, got, same_math, ref in zip(("o", "o_t", "dk"), (o, o_t, dk), same, want, strict=True):
        assert_bound(name, got, same_math, ref)


def gqa_reference(q, k, v, tangents, dtype):
    """``(o, o_t, dk)`` of math attention with ``k, v`` (and their tangents) repeated to ``q``'s heads,
    in ``dtype``: ``torch.func.jvp`` for ``o, o_t``, autograd of ``o.sum()`` for ``dk``."""
    q, k, v, q_t, k_t, v_t = (x.detach().to(dtype) for x in (q, k, v, *tangents))
    rep = lambda x: x.repeat_interleave(2, dim=1)
    o, o_t = torch.func.jvp(reference.attention, (q, rep(k), rep(v)), (q_t, rep(k_t), rep(v_t)))
    k.requires_grad_()
    (dk,) = torch.autograd.grad(reference.attention(q, rep(k), rep(v)).sum(), k)
    return o, o_t, dk


def _qkv(shape=(1, 2, 9, 16), dtype=F32):
    return [torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(3)]


BAD_ARGUMENTS = [
    (
        {"attn_mask": torch.ones(9, 9, dtype=torch.bool)},
        "attn_mask must be None (the fused kernels have no attention mask), got shape (9, 9), dtype torch.bool",
    ),
    ({"dropout_p": 0.1}, "dropout_p must be 0.0 (the fused kernels have no attention dropout), got 0.1"),
    ({"is_causal": True}, "is_causal must be False (the fused kernels are non-causal), got True"),
    ({"query": torch.randn(2, 9, 16)}, "query must have 4 dims, got shape (2, 9, 16)"),
    (
        {"query": torch.randn(1, 2, 9, 16, dtype=torch.float64)},
        "query must be float32, float16 or bfloat16, got shape (1, 2, 9, 16), dtype torch.float64",
    ),
    ({"key": torch.randn(1, 2, 9, 16, dtype=F16)}, "key must have the dtype and device of query (torch.float32, cpu)"),
    (
        {"key": torch.randn(1, 2, 9, 32)},
        "key must have shape (1, heads, 9, 16) (query's batch, sequence length and head_dim), got shape (1, 2, 9, 32)",
    ),
    ({"value": torch.randn(1, 2, 5, 16)}, "value must have shape (1, heads, 9, 16)"),
    (
        {"key": torch.randn(1, 1, 9, 16)},
        "key has 1 heads and query 2 (pass enable_gqa=True for grouped-query attention)",
    ),
    ({"value": torch.randn(1, 1, 9, 16), "enable_gqa": True}, "value must have the heads of key (2)"),
    (
        {"query": torch.randn(1, 3, 9, 16), "enable_gqa": True},
        "key has 2 heads and query 3 (a divisor of query's heads)",
    ),
    (
        {"query": torch.randn(1, 2, 9, 136), "key": torch.randn(1, 2, 9, 136), "value": torch.randn(1, 2, 9, 136)},
        "query: head_dim must be in [1, 128], got shape (1, 2, 9, 136)",
    ),
    ({"scale": "0.5"}, "scale must be a float or None, got str"),
]


@pytest.mark.parametrize("kwargs, message", BAD_ARGUMENTS, ids=range(len(BAD_ARGUMENTS)))
def test_bad_arguments_raise(kwargs, message):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=re.escape(message)):
        scaled_dot_product_attention(**{"query": q, "key": k, "value": v, **kwargs})


def _compiled(fn, **kwargs):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(fn, backend="aot_eager", **kwargs)


@pytest.mark.parametrize("fullgraph", [True, False])
def test_compile_forward_and_backward_without_graph_breaks(fullgraph, seeded):
    """Under ``torch.compile`` the drop-in is a custom op: one graph, the flash backward; loss and
    gradients bounded against fp64 math attention as tightly as the eager drop-in is."""
    inputs = [x.requires_grad_() for x in _qkv((1, 2, 17, 16))] + [torch.randn(16, 16, device=DEVICE).requires_grad_()]

    def loss_fn(attention, q, k, v, w):
        return attention(q @ w, k, v).square().sum()

    compiled = _compiled(lambda *xs: loss_fn(scaled_dot_product_attention, *xs), fullgraph=fullgraph)
    loss = compiled(*inputs)
    assert not counters["graph_break"], dict(counters["graph_break"])
    grads = torch.autograd.grad(loss, inputs)
    eager = loss_fn(scaled_dot_product_attention, *inputs)
    grads_eager = torch.autograd.grad(eager, inputs)
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    loss64 = loss_fn(reference.attention, *inputs64)
    assert_bound("loss", loss, eager, loss64)
    for name, g, g_eager, g64 in zip("qkvw", grads, grads_eager, torch.autograd.grad(loss64, inputs64), strict=True):
        assert_bound(f"d{name}", g, g_eager, g64)


def test_func_jvp_inside_fullgraph_compile_raises(seeded):
    """``torch.func.jvp`` traced by Dynamo would drop the jvp rule (pytorch #192985): a clear error."""
    q, k, v = _qkv()
    fn = _compiled(lambda a, b, c: torch.func.jvp(scaled_dot_product_attention, (a, b, c), (a, b, c)), fullgraph=True)
    with pytest.raises(Exception, match=r"torch.func.jvp / forward-mode AD inside torch.compile is not supported"):
        fn(q, k, v)


def test_forward_ad_inside_fullgraph_compile_raises(seeded):
    q, k, v = _qkv()

    def fn(a, b, c):
        with fwad.dual_level():
            return fwad.unpack_dual(scaled_dot_product_attention(fwad.make_dual(a, b), b, c)).tangent

    with pytest.raises(Exception, match=r"forward-mode AD inside torch.compile is not supported"):
        _compiled(fn, fullgraph=True)(q, k, v)


@pytest.mark.parametrize("where", ["jvp inside compile", "compiled function under eager jvp"])
def test_func_jvp_and_compile_never_return_a_wrong_tangent(where, seeded):
    """Without ``fullgraph``: after the error Dynamo runs the frame eagerly, where the jvp rule applies;
    ``torch.func.jvp`` of a compiled function is refused by Dynamo (pytorch #128711) and runs eagerly."""
    primals, tangents = _qkv(), tuple(_qkv())
    if where == "jvp inside compile":
        o, o_t = _compiled(lambda p, t: torch.func.jvp(scaled_dot_product_attention, p, t))(tuple(primals), tangents)
    else:
        o, o_t = torch.func.jvp(_compiled(scaled_dot_product_attention), tuple(primals), tangents)
    check_primal_and_tangent(o, o_t, primals, tangents, F32)


def test_dynamo_drops_a_custom_jvp_rule():
    """Why the guard exists (torch 2.13): ``torch.func.jvp`` inside ``torch.compile`` ignores a custom
    ``autograd.Function.jvp`` and differentiates its forward instead (pytorch #192985). If this starts
    failing, torch fixed it and :mod:`imf_kernels.custom_ops` can let forward-mode AD through."""

    class Tagged(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def jvp(ctx, x_t):
            return x_t * 3  # not the derivative of forward: shows which one ran

    x, x_t = torch.randn(4), torch.ones(4)
    assert torch.equal(torch.func.jvp(Tagged.apply, (x,), (x_t,))[1], 3 * x_t)
    compiled = _compiled(lambda a, b: torch.func.jvp(Tagged.apply, (a,), (b,)))(x, x_t)[1]
    assert torch.equal(compiled, 2 * x_t)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_compiled_explicit_dual_path_matches_eager(n, seeded):
    """:func:`imf_kernels.custom_ops.attention_jvp` (the engine's dual attention) under ``fullgraph=True``:
    prefix tangents of ``n`` of 2 samples, ``o_t`` detached, the gradients of ``o`` as in eager."""
    q, k, v = (x.requires_grad_() for x in _qkv((2, 2, 17, 16)))
    tangents = [torch.randn(n, 2, 17, 16, device=DEVICE) for _ in range(3)]
    compiled = _compiled(custom_ops.attention_jvp, fullgraph=True)
    (o, o_t), (o_eager, o_t_eager) = compiled(q, k, v, *tangents), attention_jvp(q, k, v, *tangents)
    assert not counters["graph_break"] and not o_t.requires_grad and o_t.shape == (n, 2, 17, 16)
    do = torch.randn_like(o)
    grads, grads_eager = torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(o_eager, (q, k, v), do)
    for a, b in zip((o, o_t, *grads), (o_eager, o_t_eager, *grads_eager), strict=True):
        assert torch.equal(a, b)


def test_dynamo_cannot_trace_a_function_with_a_jvp_rule():
    """Why compiled calls go through custom ops (torch 2.13; cf. pytorch #180284): ``imf_kernels.attention``
    itself (an ``autograd.Function`` with a ``jvp`` rule) stops a ``fullgraph=True`` compile when its inputs
    require grad. If this starts failing, torch traces such Functions and the custom ops may be dropped."""
    q, k, v = (x.requires_grad_() for x in _qkv())
    with pytest.raises(torch._dynamo.exc.Unsupported, match="Unsupported custom jvp"):
        _compiled(imf_kernels.attention, fullgraph=True)(q, k, v)
