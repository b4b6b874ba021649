"""Dual (primal + tangent) block ops: RMSNorm, QK-RMSNorm + RoPE, SwiGLU, linear.

Each op is checked against the plain-PyTorch reference (:mod:`imf_kernels.reference`) run in
fp64: the primal output, the tangent against ``torch.func.jvp`` of the reference *primal*, and the
gradient of every differentiable input against autograd of the reference, with the shared bound of
:mod:`numerics` (``err <= 2 * err(reference math in the kernel's dtype) + floor``). Every
allocation made while a test runs is NaN-poisoned and every test draws a fresh, printed seed.

CPU (Triton interpreter): fp32 and fp16 at small, odd sizes. GPU-marked: bf16/fp16/fp32 at model
sizes.
"""

from __future__ import annotations

import copy
import functools

import imf_kernels
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from imf_kernels import reference as ref
from numerics import DEVICE, INTERPRETING, assert_bound

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("poisoned", "seeded")]
CPU_DTYPES = [torch.float32, torch.float16]


def test_outputs_come_from_poisoned_buffers(poisoned):
    """The NaN fixture covers the ops' outputs, so the bounds catch unwritten elements."""
    x, w = torch.randn(3, 5, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    y, y_t = imf_kernels.rms_norm_jvp(x, x[:2], w)
    h, h_t = imf_kernels.swiglu_jvp(x, x, x[:1], x[:1])
    for out in (y, y_t, h, h_t):
        assert any(out is b for b in poisoned) and not out.isnan().any()


def test_bound_can_fail():
    """The shared bound rejects one NaN element and an error a few times that of the dtype's rounding."""
    ref64 = torch.randn(1000, dtype=torch.float64)
    same = ref64.half()
    assert_bound("exact", ref64.half(), same, ref64)
    nan = ref64.half()
    nan[7] = float("nan")
    worse = (ref64 + 4 * (same.double() - ref64)).half()
    for name, out in (("nan", nan), ("worse", worse)):
        with pytest.raises(AssertionError, match=name):
            assert_bound(name, out, same, ref64)


# ---------------------------------------------------------------------------------------------
# Harness: run an op and its reference, compare outputs, tangents and gradients.


def reference_run(reference, args, tangents, dy):
    """``(y, y_t, grads)`` of ``reference(*args)``: ``y_t`` by ``torch.func.jvp`` along ``tangents``
    (one per arg; ``None`` = constant), grads of every arg by autograd of ``y`` against ``dy``."""
    args = [a.detach().requires_grad_() for a in args]
    moving = [i for i, t in enumerate(tangents) if t is not None]

    def f(*m):
        full = list(args)
        for i, v in zip(moving, m, strict=True):
            full[i] = v
        return reference(*full)

    y, y_t = torch.func.jvp(f, tuple(args[i] for i in moving), tuple(tangents[i] for i in moving))
    return y, y_t, torch.autograd.grad(y, args, dy)


def kernel_run(fused, args, tangents, dy):
    """``(y, y_t or None, grads)`` of ``fused(*args, *tangents)`` (``tangents`` empty: primal call)."""
    args = [a.detach().requires_grad_() for a in args]
    out = fused(*args, *tangents)
    y, y_t = out if tangents else (out, None)
    assert y.requires_grad
    if y_t is not None:
        assert not y_t.requires_grad, "tangent output must be detached"
    return y, y_t, torch.autograd.grad(y, args, dy)


def check_op(fused_primal, fused_dual, reference, args64, tangents64, dtype, mode, names):
    """Compare ``fused`` with ``reference`` in ``dtype``; ``mode``: "primal", "full" or "prefix".

    ``args64`` are the fp64 differentiable inputs; ``tangents64`` one per arg (``None``: no tangent).
    The kernel sees the first ``n`` rows of each tangent (``n = batch``, or ``batch - 1`` for "prefix").
    """
    n = args64[0].shape[0] - (mode == "prefix")
    tangents64 = [None if t is None else t.to(DEVICE) for t in tangents64]
    args64 = [a.to(DEVICE) for a in args64]
    dy64 = torch.randn(reference(*args64).shape, dtype=torch.float64, device=DEVICE)
    y64, yt64, g64 = reference_run(reference, args64, tangents64, dy64)

    low = lambda ts: [None if t is None else t.to(dtype) for t in ts]
    dy = dy64.to(dtype)
    y_r, yt_r, g_r = reference_run(reference, low(args64), low(tangents64), dy)
    if mode == "primal":
        y, y_t, g = kernel_run(fused_primal, low(args64), [], dy)
    else:
        y, y_t, g = kernel_run(fused_dual, low(args64), [t[:n] for t in low(tangents64) if t is not None], dy)
        assert_bound("tangent", y_t, yt_r[:n], yt64[:n])
    assert_bound("primal", y, y_r, y64)
    for name, gk, gw, gr in zip(names, g, g64, g_r, strict=True):
        assert_bound(f"grad {name}", gk, gr, gw)


MODES = ["primal", "full", "prefix"]


def randn(*shape, scale=1.0):
    return scale * torch.randn(*shape, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# RMSNorm


def run_rms_norm(shape, dtype, mode):
    x, w = randn(*shape, scale=2.0), 1 + 0.2 * randn(shape[-1])
    check_op(
        imf_kernels.rms_norm,
        lambda x, w, x_t: imf_kernels.rms_norm_jvp(x, x_t, w),
        ref.rms_norm,
        [x, w],
        [randn(*shape), None],
        dtype,
        mode,
        ["x", "weight"],
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(2, 37, 72), (3, 5, 100), (2, 40, 768)])
def test_rms_norm(shape, dtype, mode):
    """(2, 40, 768): 80 rows make five backward programs (16 rows each at D = 768)."""
    run_rms_norm(shape, dtype, mode)


def test_rms_norm_tangent_for_no_rows():
    x = torch.randn(2, 3, 8, device=DEVICE)
    y, y_t = imf_kernels.rms_norm_jvp(x, x[:0], torch.ones(8, device=DEVICE))
    assert y_t.shape == (0, 3, 8)
    w = torch.ones(8, device=DEVICE)
    assert_bound("primal", y, ref.rms_norm(x, w), ref.rms_norm(x.double(), w.double()))


# ---------------------------------------------------------------------------------------------
# QK-RMSNorm + RoPE: x is (B, L, H, D); the kernel returns (B, H, L, D).


def run_qk_norm_rope(shape, packed, dtype, mode):
    """``packed``: x is ``qkv[:, :, 1]`` of a ``(B, L, 3, H, D)`` projection (a strided view)."""
    batch, seq, heads, d = shape
    cos, sin = (t.to(DEVICE) for t in ref.rope_tables(seq, d))
    reference = lambda x, w: ref.qk_norm_rope(x, w, cos, sin)
    if packed:
        pick = lambda qkv: qkv[:, :, 1]
        leaf_shape = (batch, seq, 3, heads, d)
        fused_primal = lambda qkv, w: imf_kernels.qk_norm_rope(pick(qkv), w, cos, sin)
        fused_dual = lambda qkv, w, qkv_t: imf_kernels.qk_norm_rope_jvp(pick(qkv), pick(qkv_t), w, cos, sin)
        reference = functools.partial(lambda f, qkv, w: f(pick(qkv), w), reference)
    else:
        leaf_shape = shape
        fused_primal = lambda x, w: imf_kernels.qk_norm_rope(x, w, cos, sin)
        fused_dual = lambda x, w, x_t: imf_kernels.qk_norm_rope_jvp(x, x_t, w, cos, sin)
    check_op(
        fused_primal,
        fused_dual,
        reference,
        [randn(*leaf_shape, scale=2.0), 1 + 0.2 * randn(d)],
        [randn(*leaf_shape), None],
        dtype,
        mode,
        ["x", "weight"],
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "shape, packed",
    [
        ((2, 37, 3, 64), True),
        ((2, 37, 3, 64), False),
        ((3, 17, 2, 72), True),
        ((1, 276, 2, 64), True),
        ((2, 9, 3, 6), True),  # strides not 16-byte multiples: the unaligned (ALIGN = 1) path
    ],
)
def test_qk_norm_rope(shape, packed, dtype, mode):
    run_qk_norm_rope(shape, packed, dtype, mode)


def test_qk_norm_rope_output_layout():
    x = torch.randn(2, 5, 3, 8, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in ref.rope_tables(5, 8))
    y, y_t = imf_kernels.qk_norm_rope_jvp(x, x[:1], torch.ones(8, device=DEVICE), cos, sin)
    assert y.shape == (2, 3, 5, 8) and y.is_contiguous()
    assert y_t.shape == (1, 3, 5, 8) and y_t.is_contiguous()


# ---------------------------------------------------------------------------------------------
# SwiGLU


def run_swiglu(shape, packed, dtype, mode):
    """``packed``: ``a, b`` are the last-dim halves of one ``(..., 2 * hidden)`` tensor (strided views)."""
    if packed:
        halves = lambda ab: ab.chunk(2, dim=-1)
        leaves = [randn(*shape[:-1], 2 * shape[-1], scale=2.0)]
        tangents = [randn(*shape[:-1], 2 * shape[-1])]
        fused_primal = lambda ab: imf_kernels.swiglu(*halves(ab))
        fused_dual = lambda ab, ab_t: imf_kernels.swiglu_jvp(*halves(ab), *halves(ab_t))
        reference, names = lambda ab: ref.swiglu(*halves(ab)), ["ab"]
    else:
        leaves = [randn(*shape, scale=2.0), randn(*shape)]
        tangents = [randn(*shape), randn(*shape)]
        fused_primal, fused_dual, reference = imf_kernels.swiglu, imf_kernels.swiglu_jvp, ref.swiglu
        names = ["a", "b"]
    check_op(fused_primal, fused_dual, reference, leaves, tangents, dtype, mode, names)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "shape, packed",
    [((2, 37, 144), True), ((2, 37, 144), False), ((1, 276, 72), True), ((2, 5, 37), True)],  # 37: unaligned halves
)
def test_swiglu(shape, packed, dtype, mode):
    run_swiglu(shape, packed, dtype, mode)


def _mlp_params(block):
    """``(fc12 rows of the padded units, fc3 columns of the padded units)`` of an ``IMFBlock``."""
    w12 = block.fc12.weight.view(2, block.hidden_padded, -1)[:, block.hidden :]
    return w12, block.fc3.weight[:, block.hidden :]


def test_swiglu_padding_is_exact_and_stays_zero(monkeypatch):
    """SwiGLU halves padded to 64 units (issue 13: hidden 2730): the padded block computes exactly the
    unpadded function, its padded units get exactly zero gradient, and AdamW with weight decay and
    gradient clipping keeps them exactly zero."""
    from imf.model import layers

    dim, heads, hidden, seq = 32, 2, 40, 7
    block = layers.IMFBlock(dim, heads, hidden, 1e-6)
    assert block.hidden_padded == 64 and block.fc12.weight.shape == (128, dim) and block.fc3.weight.shape == (dim, 64)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    block.zero_padding_()
    monkeypatch.setattr(layers, "SWIGLU_ALIGN", 1)
    plain = layers.IMFBlock(dim, heads, hidden, 1e-6)
    assert plain.hidden_padded == hidden
    state = dict(block.state_dict())
    state["fc12.weight"] = block.fc12.weight.view(2, 64, dim)[:, :hidden].reshape(2 * hidden, dim)
    state["fc3.weight"] = block.fc3.weight[:, :hidden]
    plain.load_state_dict(state)

    cos, sin = ref.rope_tables(seq, dim // heads)
    x, x_t = torch.randn(3, seq, dim), torch.randn(2, seq, dim)
    # Same function up to fp32 summation order (the padded matmuls reduce over 64 instead of 40 units): the
    # padded block is as close to the unpadded one in fp64 as the unpadded one in fp32 is (assert_bound). A
    # padding unit that were not zero would be off by O(1) of the output scale.
    plain64 = copy.deepcopy(plain).double()
    wide = (x.double(), x_t.double(), cos.double(), sin.double())
    outs = zip(block(x, x_t, cos, sin), plain(x, x_t, cos, sin), plain64(*wide), strict=True)
    for name, (got, same, want) in zip(("y", "y_t"), outs, strict=True):
        assert_bound(name, got, same, want)

    opt = torch.optim.AdamW(block.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        y, _ = block(x, None, cos, sin)
        y.square().mean().backward()
        w12, w3 = _mlp_params(block)
        assert block.fc12.weight.grad.abs().sum() > 0
        assert (
            not block.fc12.weight.grad.view(2, 64, dim)[:, hidden:].any()
            and not block.fc3.weight.grad[:, hidden:].any()
        )
        torch.nn.utils.clip_grad_norm_(block.parameters(), 0.1)
        opt.step()
        opt.zero_grad()
        assert not w12.any() and not w3.any()


def test_swiglu_padding_keeps_aligned_presets():
    """Only hidden sizes that are not a multiple of 64 are padded: B/2, M/2 and the demo keep their state_dict."""
    from imf.model.layers import IMFBlock

    for dim, heads, hidden in ((768, 12, 2048), (96, 4, 256)):
        block = IMFBlock(dim, heads, hidden, 1e-6).to("meta")
        assert block.fc12.weight.shape == (2 * hidden, dim) and block.fc3.weight.shape == (dim, hidden)
    assert IMFBlock(1024, 16, 2730, 1e-6).to("meta").fc3.weight.shape == (1024, 2752)


# ---------------------------------------------------------------------------------------------
# Linear


def run_linear_dual(shape, out_features, bias, dtype, mode):
    x, w = randn(*shape), randn(out_features, shape[-1], scale=shape[-1] ** -0.5)
    args, tangents = [x, w], [randn(*shape), None]
    if bias:
        args, tangents = [*args, randn(out_features)], [*tangents, None]
    fused = lambda x, w, *rest: imf_kernels.linear_dual(x, rest[-1], w, rest[0] if len(rest) == 2 else None)
    reference = lambda x, w, b=None: F.linear(x, w, b)
    check_op(None, fused, reference, args, tangents, dtype, mode, ["x", "weight", "bias"][: len(args)])


@pytest.mark.parametrize("mode", ["full", "prefix"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_dual(bias, dtype, mode):
    run_linear_dual((3, 17, 72), 200, bias, dtype, mode)


# ---------------------------------------------------------------------------------------------
# Forward-mode AD: torch.func.jvp and forward_ad dual tensors through the primal public functions
# (the ops' jvp rules, tangents from the fused kernels), and the primal's backward afterwards.


def run_forward_ad(fused, reference, primals64, tangents64, dtype, via, n_grad=None):
    """``fused`` vs ``reference`` under forward-mode AD along ``tangents64`` (one per primal), then
    the gradients of the first ``n_grad`` primals (all by default) through the ``y`` that forward AD
    returned."""
    primals64 = [p.to(DEVICE) for p in primals64]
    tangents64 = [t.to(DEVICE) for t in tangents64]
    y64, yd64 = torch.func.jvp(reference, tuple(primals64), tuple(tangents64))
    low = [p.to(dtype) for p in primals64]
    low_t = [t.to(dtype) for t in tangents64]
    y_r, yd_r = torch.func.jvp(reference, tuple(low), tuple(low_t))

    leaves = [p.detach().requires_grad_() for p in low]
    if via == "func":
        y, yd = torch.func.jvp(fused, tuple(leaves), tuple(low_t))
    else:
        with fwAD.dual_level():
            dual = fused(*[fwAD.make_dual(p, t) for p, t in zip(leaves, low_t, strict=True)])
            y, yd = fwAD.unpack_dual(dual)
    assert_bound("primal", y, y_r, y64)
    assert_bound("tangent", yd, yd_r, yd64)
    assert yd.grad_fn is None, "the tangent must come from the kernel (detached), not from autograd of torch ops"
    assert y.requires_grad, "the primal must stay differentiable under forward AD"

    dy64 = torch.randn(y64.shape, dtype=torch.float64, device=DEVICE)
    for i, g in enumerate(torch.autograd.grad(y, leaves[:n_grad], dy64.to(dtype))):
        leaves64 = [p.detach().requires_grad_() for p in primals64]
        leaves_r = [p.detach().requires_grad_() for p in low]
        g64 = torch.autograd.grad(reference(*leaves64), leaves64[i], dy64)[0]
        g_r = torch.autograd.grad(reference(*leaves_r), leaves_r[i], dy64.to(dtype))[0]
        assert_bound(f"grad {i} after jvp", g, g_r, g64)


def _forward_ad_cases():
    """``(name, fused, reference, primal shapes, which primals move)``: shapes are odd on purpose."""
    qk = ref.qk_norm_rope
    pick = lambda qkv: qkv[:, :, 2]
    halves = lambda ab: ab.chunk(2, dim=-1)
    return [
        ("rms_norm", imf_kernels.rms_norm, ref.rms_norm, [(3, 7, 72), (72,)]),
        ("rms_norm_d100", imf_kernels.rms_norm, ref.rms_norm, [(2, 5, 100), (100,)]),
        (
            "qk_norm_rope_packed",
            lambda qkv, w, cos, sin: imf_kernels.qk_norm_rope(pick(qkv), w, cos, sin),
            lambda qkv, w, cos, sin: qk(pick(qkv), w, cos, sin),
            [(2, 17, 3, 2, 72), (72,), (17, 72), (17, 72)],
        ),
        ("qk_norm_rope_d64", imf_kernels.qk_norm_rope, qk, [(1, 33, 3, 64), (64,), (33, 64), (33, 64)]),
        (
            "swiglu_packed",
            lambda ab: imf_kernels.swiglu(*halves(ab)),
            lambda ab: ref.swiglu(*halves(ab)),
            [(2, 17, 2 * 72)],
        ),
        ("swiglu", imf_kernels.swiglu, ref.swiglu, [(3, 9, 100), (3, 9, 100)]),
        (
            "linear_dual",
            lambda x, w, b: imf_kernels.linear_dual(x, x[:1] * 0.5, w, b)[0],
            lambda x, w, b: F.linear(x, w, b),
            [(3, 5, 24), (40, 24), (40,)],
        ),
    ]


def _tables_or_randn(name, shape):
    """RoPE tables for the ``(L, D)`` primals of the qk cases (so ``y`` is a real rotation), else N(0, 1)."""
    if name.startswith("qk") and len(shape) == 2:
        return ref.rope_tables(*shape)[0].double() + 0.1 * randn(*shape)
    return randn(*shape)


@pytest.mark.parametrize("via", ["func", "forward_ad"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", _forward_ad_cases(), ids=lambda c: c[0])
def test_forward_ad(case, dtype, via):
    """Every primal (inputs, weights, RoPE tables) moves along a random tangent."""
    name, fused, reference, shapes = case
    primals = [_tables_or_randn(name, s) for s in shapes]
    n_grad = 2 if name.startswith("qk") else None  # cos, sin are constants to backward
    run_forward_ad(fused, reference, primals, [randn(*s) for s in shapes], dtype, via, n_grad)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_forward_ad_input_only(dtype):
    """The MeanFlow pattern: only the activations move (weights and tables are constants)."""
    cos, sin = (t.to(DEVICE, dtype) for t in ref.rope_tables(17, 72))
    w = (1 + 0.2 * randn(72)).to(DEVICE, dtype)
    fused = lambda x: imf_kernels.qk_norm_rope(x, w, cos, sin)
    reference = lambda x: ref.qk_norm_rope(x, w.to(x.dtype), cos.to(x.dtype), sin.to(x.dtype))
    run_forward_ad(fused, reference, [randn(2, 17, 3, 72)], [randn(2, 17, 3, 72)], dtype, "func")
    a, b = randn(2, 9, 40), randn(2, 9, 40).to(DEVICE)
    run_forward_ad(lambda a: imf_kernels.swiglu(a, b.to(a.dtype)), lambda a: ref.swiglu(a, b.to(a.dtype)),
                   [a], [randn(2, 9, 40)], dtype, "func")  # fmt: skip


def test_forward_ad_expanded_tangent():
    """A tangent in a layout the kernels cannot view as rows (stride 0) is copied, not rejected."""
    x, w = torch.randn(2, 3, 8, device=DEVICE), torch.randn(8, device=DEVICE)
    x_dot = torch.randn(1, 1, 8, device=DEVICE).expand(2, 3, 8)
    _, yd = torch.func.jvp(lambda x: imf_kernels.rms_norm(x, w), (x,), (x_dot,))
    _, want = torch.func.jvp(lambda x: ref.rms_norm(x, w.double()), (x.double(),), (x_dot.double(),))
    assert_bound("tangent", yd, torch.func.jvp(lambda x: ref.rms_norm(x, w), (x,), (x_dot,))[1], want)


def test_forward_ad_of_dual_op():
    """``torch.func.jvp`` through the explicit dual op: ``y`` gets its tangent, ``y_t`` is a constant."""
    x, w = torch.randn(3, 5, 8, device=DEVICE), torch.randn(8, device=DEVICE)
    x_t = torch.randn(3, 5, 8, device=DEVICE)
    (y, y_t), (yd, ytd) = torch.func.jvp(lambda x: imf_kernels.rms_norm_jvp(x, x_t, w), (x,), (x_t,))
    assert torch.equal(y_t, imf_kernels.rms_norm_jvp(x, x_t, w)[1]) and not ytd.any()
    assert_bound(
        "tangent", yd, ref.rms_norm_jvp(x, x_t, w)[1], ref.rms_norm_jvp(x.double(), x_t.double(), w.double())[1]
    )


def test_reference_tangent_formulas():
    """The explicit ``*_jvp`` references (prefix tangents) equal ``torch.func.jvp`` of their primals, fp64."""
    cos, sin = (t.double().to(DEVICE) for t in ref.rope_tables(9, 16))
    x, x_t, w = randn(3, 9, 2, 16).to(DEVICE), randn(2, 9, 2, 16).to(DEVICE), (1 + randn(16)).to(DEVICE)
    a, b, a_t, b_t = randn(3, 9, 24).to(DEVICE), randn(3, 9, 24).to(DEVICE), randn(2, 9, 24), randn(2, 9, 24)
    a_t, b_t = a_t.to(DEVICE), b_t.to(DEVICE)
    lw, lb = randn(40, 24).to(DEVICE), randn(40).to(DEVICE)
    cases = [  # (explicit (y, y_t), primal, primal args, prefix tangents)
        (ref.rms_norm_jvp(x, x_t, w), lambda x: ref.rms_norm(x, w), (x,), (x_t,)),
        (ref.qk_norm_rope_jvp(x, x_t, w, cos, sin), lambda x: ref.qk_norm_rope(x, w, cos, sin), (x,), (x_t,)),
        (ref.swiglu_jvp(a, b, a_t, b_t), ref.swiglu, (a, b), (a_t, b_t)),
        (ref.linear_dual(a, a_t, lw, lb), lambda a: F.linear(a, lw, lb), (a,), (a_t,)),
    ]
    for i, ((y, y_t), primal, args, tangents) in enumerate(cases):
        full = tuple(torch.cat([t, torch.zeros_like(p[t.shape[0] :])]) for t, p in zip(tangents, args, strict=True))
        want, want_t = torch.func.jvp(primal, args, full)
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12, msg=f"case {i} primal")
        torch.testing.assert_close(y_t, want_t[: y_t.shape[0]], rtol=1e-10, atol=1e-10, msg=f"case {i} tangent")


# ---------------------------------------------------------------------------------------------
# Backward contract: nothing saved for the tangent; deterministic gradients.


def _dual_cases():
    """``(name, fn, primal args (requiring grad), tangent args)`` with small fp32 inputs."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
    cos, sin = (t.to(DEVICE) for t in ref.rope_tables(9, 16))
    qkv, qkv_t = r(3, 9, 3, 2, 16), r(2, 9, 3, 2, 16)
    ab, ab_t = r(3, 9, 96), r(2, 9, 96)
    return [
        (
            "rms_norm",
            lambda x, w, x_t: imf_kernels.rms_norm_jvp(x, x_t, w),
            [r(3, 40, 72), r(72)],
            [r(2, 40, 72)],
        ),
        (
            "qk_norm_rope",
            lambda qkv, w, qkv_t: imf_kernels.qk_norm_rope_jvp(qkv[:, :, 0], qkv_t[:, :, 0], w, cos, sin),
            [qkv, r(16)],
            [qkv_t],
        ),
        (
            "swiglu",
            lambda ab, ab_t: imf_kernels.swiglu_jvp(*ab.chunk(2, -1), *ab_t.chunk(2, -1)),
            [ab],
            [ab_t],
        ),
        (
            "linear_dual",
            lambda x, w, x_t: imf_kernels.linear_dual(x, x_t, w),
            [r(3, 9, 24), r(40, 24)],
            [r(2, 9, 24)],
        ),
    ]


@pytest.mark.parametrize("case", _dual_cases(), ids=lambda c: c[0])
def test_nothing_saved_for_tangent(case):
    _, fn, primals, tangents = case
    primals = [p.requires_grad_() for p in primals]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, y_t = fn(*primals, *tangents)
    assert saved, "the op saved nothing for backward (the hook did not fire)"
    tangent_storages = {t.untyped_storage().data_ptr() for t in [*tangents, y_t]}
    assert all(s.untyped_storage().data_ptr() not in tangent_storages for s in saved)
    assert not y_t.requires_grad and y_t.grad_fn is None


@pytest.mark.parametrize("case", _dual_cases(), ids=lambda c: c[0])
def test_backward_is_deterministic(case):
    _, fn, primals, tangents = case
    primals = [p.requires_grad_() for p in primals]
    y, _ = fn(*primals, *tangents)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, primals, dy, retain_graph=True)
    second = torch.autograd.grad(y, primals, dy)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Bad inputs: ValueError naming the argument.


def _bad_calls():
    d = DEVICE
    x, w = torch.randn(2, 5, 8, device=d), torch.ones(8, device=d)
    cos, sin = (t.to(d) for t in ref.rope_tables(5, 8))
    q = torch.randn(2, 5, 3, 8, device=d)
    a = torch.randn(2, 5, 6, device=d)
    lw = torch.randn(4, 8, device=d)
    strided = torch.randn(2, 5, 16, device=d)[..., ::2]
    q_strided = torch.randn(2, 5, 3, 16, device=d)[..., ::2]
    return [
        ("rms_norm int x", lambda: imf_kernels.rms_norm(x.long(), w), "x must be float32"),
        (
            "rms_norm weight shape",
            lambda: imf_kernels.rms_norm(x, torch.ones(7, device=d)),
            "weight must have shape",
        ),
        ("rms_norm weight device", lambda: imf_kernels.rms_norm(x, w.to("meta")), "weight must be a CUDA"),
        (
            "rms_norm transposed x",
            lambda: imf_kernels.rms_norm(x.transpose(0, 2), torch.ones(2, device=d)),
            "x must",
        ),
        (
            "rms_norm x_t too long",
            lambda: imf_kernels.rms_norm_jvp(x, torch.cat([x, x]), w),
            "x_t must have shape",
        ),
        ("rms_norm x_t dtype", lambda: imf_kernels.rms_norm_jvp(x, x.half(), w), "x_t must have the dtype"),
        ("rms_norm empty x", lambda: imf_kernels.rms_norm(x[:0], w), "x must not be empty"),
        ("rope 3-d x", lambda: imf_kernels.qk_norm_rope(x, w, cos, sin), "x must have 4 dims"),
        ("rope odd head_dim", lambda: imf_kernels.qk_norm_rope(q[..., :7], w[:7], cos, sin), "even head_dim"),
        (
            "rope x stride",
            lambda: imf_kernels.qk_norm_rope(q[..., ::2], w[:4], cos, sin),
            "unit stride",
        ),
        ("rope cos shape", lambda: imf_kernels.qk_norm_rope(q, w, cos[:4], sin), "cos must have shape"),
        ("rope sin dtype", lambda: imf_kernels.qk_norm_rope(q, w, cos, sin.long()), "sin must be float32"),
        ("rope weight shape", lambda: imf_kernels.qk_norm_rope(q, w[:4], cos, sin), "weight must have shape"),
        (
            "rope x_t shape",
            lambda: imf_kernels.qk_norm_rope_jvp(q, q[:, :4], w, cos, sin),
            "x_t must have shape",
        ),
        ("swiglu b shape", lambda: imf_kernels.swiglu(a, a[..., :5]), "b must have the shape"),
        ("swiglu b dtype", lambda: imf_kernels.swiglu(a, a.half()), "b must have the dtype"),
        (
            "swiglu a strided",
            lambda: imf_kernels.swiglu(a.transpose(0, 1), a.transpose(0, 1)),
            "a must flatten",
        ),
        (
            "swiglu a_t batch",
            lambda: imf_kernels.swiglu_jvp(a, a, torch.cat([a, a]), a),
            "a_t must have shape",
        ),
        ("swiglu b_t shape", lambda: imf_kernels.swiglu_jvp(a, a, a[:1], a), "b_t must have the shape"),
        ("linear weight shape", lambda: imf_kernels.linear_dual(x, x, lw.t()), "weight must have shape"),
        ("linear weight dtype", lambda: imf_kernels.linear_dual(x, x, lw.half()), "weight must match x"),
        (
            "linear bias shape",
            lambda: imf_kernels.linear_dual(x, x, lw, torch.ones(5, device=d)),
            "bias must have",
        ),
        ("linear x_t shape", lambda: imf_kernels.linear_dual(x, x[..., :4], lw), "x_t must have shape"),
        ("linear x int", lambda: imf_kernels.linear_dual(x.long(), x, lw), "x must be a float"),
        ("linear bias device", lambda: imf_kernels.linear_dual(x, x, lw, lw[:, 0].to("meta")), "bias must match x"),
        ("linear x_t missing", lambda: imf_kernels.linear_dual(x, None, lw), "x_t must be a torch.Tensor"),
        # issue 16 item 9 and the launcher audit
        ("rms_norm eps -1", lambda: imf_kernels.rms_norm(x, w, eps=-1), r"eps must be a finite number > 0, got -1$"),
        ("rms_norm eps 0", lambda: imf_kernels.rms_norm_jvp(x, x, w, 0.0), r"eps must be .* got 0\.0$"),
        ("rms_norm eps nan", lambda: imf_kernels.rms_norm(x, w, float("nan")), r"eps must be .* got nan$"),
        ("rms_norm eps str", lambda: imf_kernels.rms_norm(x, w, "1e-6"), r"eps must be .* got '1e-6'$"),
        ("rms_norm 0-d x", lambda: imf_kernels.rms_norm(x[0, 0, 0], w), "x must have at least 1 dim"),
        ("rms_norm x_t stride", lambda: imf_kernels.rms_norm_jvp(x, strided, w), "x_t must have unit stride"),
        ("rms_norm weight dtype", lambda: imf_kernels.rms_norm(x, w.long()), "weight must be float32"),
        ("rope eps", lambda: imf_kernels.qk_norm_rope(q, w, cos, sin, eps=0), "eps must be a finite number > 0"),
        ("rope weight device", lambda: imf_kernels.qk_norm_rope(q, w.to("meta"), cos, sin), "weight must be a CUDA"),
        ("rope cos device", lambda: imf_kernels.qk_norm_rope(q, w, cos.to("meta"), sin), "cos must be a CUDA"),
        ("rope x_t dtype", lambda: imf_kernels.qk_norm_rope_jvp(q, q.half(), w, cos, sin), "x_t must have the dtype"),
        ("rope x_t stride", lambda: imf_kernels.qk_norm_rope_jvp(q, q_strided, w, cos, sin), "x_t must have unit"),
        ("swiglu 0-d a", lambda: imf_kernels.swiglu(a[0, 0, 0], a[0, 0, 0]), "a must have at least 1 dim"),
        ("swiglu b device", lambda: imf_kernels.swiglu(a, a.to("meta")), "b must be a CUDA"),
        (
            "swiglu a_t None",
            lambda: imf_kernels.swiglu_jvp(a, a, None, a),
            r"^a_t and b_t must be given together .* got b_t but a_t=None",
        ),
        (
            "swiglu b_t None",
            lambda: imf_kernels.swiglu_jvp(a, a, a, None),
            r"^a_t and b_t must be given together .* got a_t but b_t=None",
        ),
        ("swiglu a_t dtype", lambda: imf_kernels.swiglu_jvp(a, a, a.half(), a.half()), "a_t must have the dtype"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, call, message = case
    with pytest.raises(ValueError, match=message):
        call()


def test_swiglu_jvp_without_tangents():
    """Neither tangent: the primal alone, ``h_t`` is ``None``."""
    a = torch.randn(2, 5, 6, device=DEVICE)
    h, h_t = imf_kernels.swiglu_jvp(a, a, None, None)
    assert h_t is None
    assert_bound("primal", h, ref.swiglu(a, a), ref.swiglu(a.double(), a.double()))


# ---------------------------------------------------------------------------------------------
# GPU: model sizes (iMF-B/L: d 768/1024, head_dim 64; MF-XL: head_dim 72; 276 tokens).


GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("mode", ["primal", "prefix"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(16, 276, 768), (8, 276, 1024), (4, 276, 1152)])
@pytest.mark.gpu
def test_rms_norm_gpu(shape, dtype, mode):
    run_rms_norm(shape, dtype, mode)


@pytest.mark.parametrize("mode", ["primal", "prefix"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(
    "shape, packed", [((16, 276, 12, 64), True), ((8, 276, 16, 72), True), ((8, 276, 16, 64), False)]
)
@pytest.mark.gpu
def test_qk_norm_rope_gpu(shape, packed, dtype, mode):
    run_qk_norm_rope(shape, packed, dtype, mode)


@pytest.mark.parametrize("mode", ["primal", "prefix"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(
    "shape, packed",
    [((16, 276, 2048), True), ((16, 256, 3072), True), ((8, 276, 2730), True), ((8, 276, 2048), False)],
)  # (16, 256, 3072): MF-B/2's MLP (hidden 4 x 768 at 256 tokens)
@pytest.mark.gpu
def test_swiglu_gpu(shape, packed, dtype, mode):
    run_swiglu(shape, packed, dtype, mode)


@pytest.mark.parametrize("mode", ["full", "prefix"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.gpu
def test_linear_dual_gpu(dtype, mode):
    run_linear_dual((16, 276, 768), 2304, True, dtype, mode)


# ---------------------------------------------------------------------------------------------
# Benchmark harness (bench/block_ops_bench.py) on tiny shapes.


@pytest.mark.skipif(not INTERPRETING, reason="the smoke run uses the Triton interpreter")
def test_block_ops_bench_smoke():
    from bench.block_ops_bench import smoke

    rows = smoke()
    assert {(r["op"], r["impl"]) for r in rows} == {
        (op, impl)
        for op in ("rms_norm", "qk_norm_rope", "swiglu", "linear")
        for impl in ("imf_kernels", "torch_func_jvp", "reference_explicit")
    }
    for r in rows:
        assert r["ms"] > 0 and r["gbps"] > 0, r
        assert r["max_err_y"] < 1e-5 and r["max_err_y_t"] < 1e-5, r
