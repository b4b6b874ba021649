"""Flash attention and the fused attention JVP against the math references.

Bound: :func:`numerics.assert_bound` (``err(kernel) <= 2 * err(the same math in the kernel's
dtype) + floor`` against fp64), where "the same math" is :mod:`imf_kernels.reference` (autograd /
``torch.func.jvp`` of math attention) run on the kernel's inputs in their own dtype. Gradients
are normalised by the norm of all three reference gradients together (at ``seq = 1``, ``dq`` and
``dk`` are exactly zero). Every buffer allocated while a test runs is NaN-filled
(``numerics.poisoned``), so an unwritten element fails the bound. CPU cases run under
``TRITON_INTERPRET=1`` in fp32/fp16 (interpreted bf16 ``tl.dot`` is wrong); bf16 and long
sequences are in the GPU-marked tests.
"""

from __future__ import annotations

import pytest
import torch
from imf_kernels import (
    _layout,
    _tuning,
    attention,
    attention_bwd_op,
    attention_common,
    attention_jvp,
    attention_op,
    reference,
)
from numerics import DEVICE, INTERPRETING, assert_bound

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("poisoned", "seeded")]


def make(shape, dtype, layout="blhd", device=DEVICE, grad=False):
    """A ``(B, H, L, D)`` tensor; ``"blhd"`` is the model's layout: a transposed ``(B, L, H, D)`` view."""
    b, h, seq, d = shape
    if layout == "blhd":
        x = torch.randn(b, seq, h, d, device=device, dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(b, h, seq, d, device=device, dtype=dtype)
    return x.requires_grad_(grad)


def reference_grads(q, k, v, do, dtype):
    """``(o, (dq, dk, dv))`` of math attention on ``q, k, v`` cast to ``dtype``."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    o = reference.attention(*leaves)
    return o, torch.autograd.grad(o, leaves, do.to(dtype))


def check_attention_grads(o, q, k, v, dtype):
    """Bound ``o`` and its ``q, k, v`` gradients (``o`` from our kernels) against fp64 and ``dtype`` math."""
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o64, grads64 = reference_grads(q, k, v, do, torch.float64)
    o_lo, grads_lo = reference_grads(q, k, v, do, dtype)
    assert_bound("o", o, o_lo, o64)
    norm = torch.cat([g.flatten() for g in grads64]).norm()
    for name, g, g_lo, g64 in zip(("dq", "dk", "dv"), grads, grads_lo, grads64, strict=True):
        assert g.dtype == dtype and g.shape == g64.shape
        assert_bound(name, g, g_lo, g64, norm=norm)


def check_attention_jvp(b, h, seq, d, n, dtype, layout, key_offset):
    """``key_offset`` adds a shared vector to every key of a head: ``S_t`` then has a large common
    offset per row, which a kernel that rounds ``P * S_t`` (not ``P * (S_t - mu)``) gets wrong."""
    q, k, v = (make((b, h, seq, d), dtype, layout) for _ in range(3))
    k = k + key_offset * torch.randn(b, h, 1, d, device=DEVICE, dtype=dtype)
    for x in (q, k, v):
        x.requires_grad_()
    q_t, k_t, v_t = (make((n, h, seq, d), dtype, layout) for _ in range(3))
    o, o_t = attention_jvp(q, k, v, q_t, k_t, v_t)
    assert o_t.shape == q_t.shape and o_t.dtype == dtype and not o_t.requires_grad
    if n:
        args64 = [x[:n].detach().double() for x in (q, k, v)] + [x.double() for x in (q_t, k_t, v_t)]
        _, o_t64 = reference.attention_jvp_autodiff(*args64)
        _, o_t_lo = reference.attention_jvp_autodiff(*[x.to(dtype) for x in args64])
        assert_bound("o_t", o_t, o_t_lo, o_t64)
    check_attention_grads(o, q, k, v, dtype)


F32, F16, F64 = torch.float32, torch.float16, torch.float64
ATTENTION_CASES = [
    (F32, (2, 3, 17, 72), "blhd"),
    (F16, (2, 3, 17, 72), "blhd"),
    (F32, (1, 2, 33, 64), "bhld"),
    (F16, (1, 2, 33, 64), "bhld"),
    (F32, (2, 2, 1, 64), "blhd"),
    (F16, (2, 2, 1, 64), "blhd"),
    (F16, (1, 2, 33, 128), "blhd"),
    (F32, (1, 2, 17, 8), "bhld"),
    (F16, (1, 1, 17, 80), "blhd"),
    (F32, (1, 1, 17, 96), "blhd"),
    (F16, (1, 2, 276, 72), "blhd"),
]


@pytest.mark.parametrize("dtype, shape, layout", ATTENTION_CASES)
def test_attention_matches_reference(dtype, shape, layout):
    q, k, v = (make(shape, dtype, layout, grad=True) for _ in range(3))
    o = attention(q, k, v)
    assert o.shape == q.shape and o.dtype == dtype
    check_attention_grads(o, q, k, v, dtype)


JVP_CASES = [
    (F32, (3, 2, 17, 72), 2, "blhd", 0.0),
    (F16, (3, 2, 17, 72), 2, "blhd", 0.0),
    (F32, (2, 2, 33, 64), 2, "bhld", 4.0),
    (F16, (2, 2, 33, 64), 2, "bhld", 4.0),
    (F32, (2, 1, 1, 64), 1, "blhd", 0.0),
    (F16, (2, 1, 1, 64), 1, "blhd", 0.0),
    (F32, (3, 2, 33, 64), 0, "blhd", 0.0),
    (F16, (2, 2, 33, 128), 1, "blhd", 0.0),
    (F16, (2, 1, 17, 96), 1, "bhld", 0.0),
    (F32, (2, 1, 276, 64), 1, "blhd", 0.0),
    (F16, (2, 1, 33, 48), 1, "bhld", 4.0),
]


@pytest.mark.parametrize("dtype, shape, n, layout, key_offset", JVP_CASES)
def test_attention_jvp_matches_reference(dtype, shape, n, layout, key_offset):
    check_attention_jvp(*shape, n, dtype, layout, key_offset)


FUNC_JVP_CASES = [
    (F32, (2, 1, 1, 16), "blhd"),
    (F16, (1, 2, 17, 72), "blhd"),
    (F32, (1, 2, 33, 64), "bhld"),
    (F16, (1, 1, 33, 16), "bhld"),
    (F32, (2, 1, 17, 72), "blhd"),
]


def reference_jvp(primals, tangents, dtype):
    """``torch.func.jvp`` of math attention on the inputs cast to ``dtype``."""
    cast = [x.detach().to(dtype) for x in (*primals, *tangents)]
    return torch.func.jvp(reference.attention, tuple(cast[:3]), tuple(cast[3:]))


@pytest.mark.parametrize("dtype, shape, layout", FUNC_JVP_CASES)
def test_func_jvp_through_attention(dtype, shape, layout):
    """``torch.func.jvp(attention, ...)``: primal and tangent against fp64 math attention, and the
    primal stays differentiable for an ordinary backward (the py-meanflow pattern)."""
    q, k, v = (make(shape, dtype, layout, grad=True) for _ in range(3))
    tangents = tuple(make(shape, dtype, layout) for _ in range(3))
    o, o_t = torch.func.jvp(attention, (q, k, v), tangents)
    assert o_t.shape == q.shape and o_t.dtype == dtype
    o64, o_t64 = reference_jvp((q, k, v), tangents, torch.float64)
    o_lo, o_t_lo = reference_jvp((q, k, v), tangents, dtype)
    assert_bound("o", o, o_lo, o64)
    assert_bound("o_t", o_t, o_t_lo, o_t64)
    check_attention_grads(o, q, k, v, dtype)


def test_forward_ad_dual_tensors():
    """``torch.autograd.forward_ad``: a tangent on ``q`` only (``k, v`` reach the rule without one)."""
    import torch.autograd.forward_ad as fwad

    q, k, v, q_t = (make((2, 2, 17, 72), F32) for _ in range(4))
    zeros = torch.zeros_like(q_t)
    o64, o_t64 = reference_jvp((q, k, v), (q_t, zeros, zeros), torch.float64)
    o_lo, o_t_lo = reference_jvp((q, k, v), (q_t, zeros, zeros), F32)
    with fwad.dual_level():
        o, o_t = fwad.unpack_dual(attention(fwad.make_dual(q, q_t), k, v, scale=None))
    assert_bound("o", o, o_lo, o64)
    assert_bound("o_t", o_t, o_t_lo, o_t64)


def test_func_jvp_tangent_is_stop_gradient():
    """Under ``torch.func.jvp`` of a model with weights, the primal trains and backward through the
    tangent raises (it would otherwise drop the attention term of ``d(dudt)/dW`` silently)."""
    w = (torch.randn(16, 16, device=DEVICE) / 4).requires_grad_()  # z @ w: unit variance, as initialised
    x, x_t = (torch.randn(1, 2, 9, 16, device=DEVICE) for _ in range(2))

    def model(z):
        return attention(z @ w, z @ w.T, z)

    def reference_grad(dtype):
        """``d(sum u^2)/dw`` of the same model on math attention, in ``dtype``."""
        w_ref, z = w.detach().to(dtype).requires_grad_(), x.to(dtype)
        reference.attention(z @ w_ref, z @ w_ref.T, z).square().sum().backward()
        return w_ref.grad

    u, dudt = torch.func.jvp(model, (x,), (x_t,))
    (u.square().sum() + dudt.detach().sum()).backward()
    assert_bound("dw", w.grad, reference_grad(w.dtype), reference_grad(torch.float64))
    with pytest.raises(RuntimeError, match="stop-gradient"):
        dudt.sum().backward()


def test_attention_jvp_primal_equals_attention():
    """The fused forward's ``o`` is the plain forward's ``o``: bitwise on the rows without a tangent (the
    same kernel), within the attention bound on the tangent rows; and backward is shared."""
    q, k, v = (make((2, 2, 33, 72), F32, grad=True) for _ in range(3))
    q_t, k_t, v_t = (make((1, 2, 33, 72), F32) for _ in range(3))
    o, _ = attention_jvp(q, k, v, q_t, k_t, v_t, scale=0.3)
    assert torch.equal(o[1:], attention(q, k, v, scale=0.3)[1:])
    o64, o_lo = (reference.attention(*(x[:1].detach().to(d) for x in (q, k, v)), scale=0.3) for d in (F64, F32))
    assert_bound("o (tangent rows)", o[:1], o_lo, o64)
    assert o.grad_fn is not None and type(o.grad_fn).__name__.startswith("_AttentionJVP")


def test_stride_alignment_rule():
    """16-byte aligned starts and strides give the aligned fast path; anything else falls back to 1."""
    x = torch.randn(2, 17, 3, 72, dtype=F16, device=DEVICE).transpose(1, 2)
    assert _layout.stride_align(x) == 8 and _layout.stride_align(x.float()) == 4
    assert _layout.stride_align(torch.randn(2, 3, 17, 80, dtype=F16, device=DEVICE)[..., 1:73]) == 1
    assert _layout.stride_align(x, torch.randn(2, 3, 17, 36, dtype=F16, device=DEVICE)) == 1


def test_unaligned_inputs_match_reference():
    """A view starting 2 bytes into its buffer runs the unaligned path (``ALIGN = 1``) and is exact."""
    q, k, v = (torch.randn(1, 2, 17, 73, dtype=F16, device=DEVICE)[..., 1:].requires_grad_() for _ in range(3))
    check_attention_grads(attention(q, k, v), q, k, v, F16)


@pytest.mark.parametrize(
    "head_dim, blocks",
    [
        (72, (64, 16, True)),
        (96, (64, 32, True)),
        (48, (32, 16, True)),
        (80, (64, 16, True)),
        (64, (64, 16, False)),
        (100, (128, 64, False)),
        (128, (128, 16, False)),
        (17, (32, 16, False)),
        (8, (16, 16, False)),
    ],
)
def test_kernels_split_the_head_dim_when_it_saves_work(head_dim, blocks):
    """72 runs as 64 + 16 columns (1.11x the work) instead of one padded 128 tile (1.78x)."""
    meta = attention_common.split_meta(torch.empty(1, 1, 1, head_dim, device=DEVICE))
    assert (meta["BLOCK_D"], meta["BLOCK_D2"], meta["SPLIT"]) == blocks


def test_grid_is_one_axis():
    """Batch x heads beyond 65,535 fits: the grid is one axis of blocks x (batch * heads) programs."""
    grid = attention_common.row_grid("BLOCK_M", 276, 70_000)({"BLOCK_M": 64})
    assert grid == (5 * 70_000,)


def test_buffers_are_poisoned(poisoned):
    """The NaN fixture really covers the ops' outputs (so the bounds above catch unwritten elements)."""
    q, k, v = (make((2, 1, 17, 64), F32, grad=True) for _ in range(3))
    q_t, k_t, v_t = (make((1, 1, 17, 64), F32) for _ in range(3))
    o, o_t = attention_jvp(q, k, v, q_t, k_t, v_t)
    grads = torch.autograd.grad(o.sum(), (q, k, v))
    for out in (o, o_t, *grads):
        assert any(out is buf for buf in poisoned)
        assert not out.isnan().any()


def test_backward_is_deterministic():
    q, k, v = (make((2, 2, 33, 72), F32, grad=True) for _ in range(3))
    do = torch.randn(2, 2, 33, 72)
    o = attention(q, k, v)
    first = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    second = torch.autograd.grad(o, (q, k, v), do)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_no_grad_dual_forward():
    """Guidance passes run without autograd: same values, nothing requires grad."""
    q, k, v = (make((2, 2, 17, 64), F16, grad=True) for _ in range(3))
    q_t, k_t, v_t = (make((2, 2, 17, 64), F16) for _ in range(3))
    o, o_t = attention_jvp(q, k, v, q_t, k_t, v_t)
    with torch.no_grad():
        o_ng, o_t_ng = attention_jvp(q, k, v, q_t, k_t, v_t)
        o_plain = attention(q, k, v)
    assert not (o_ng.requires_grad or o_t_ng.requires_grad or o_plain.requires_grad)
    assert torch.equal(o, o_ng) and torch.equal(o_t, o_t_ng)


def test_broadcast_grad_output():
    """``o.sum()`` backpropagates a stride-0 ``do``; it must give what a dense ``do`` of ones gives."""
    q, k, v = (make((1, 2, 17, 72), F32, grad=True) for _ in range(3))
    o = attention(q, k, v)
    from_sum = torch.autograd.grad(o.sum(), (q, k, v), retain_graph=True)
    from_ones = torch.autograd.grad(o, (q, k, v), torch.ones(o.shape, device=o.device))
    for a, b in zip(from_sum, from_ones, strict=True):
        assert torch.equal(a, b)


def test_explicit_scale():
    q, k, v = (make((1, 2, 17, 64), F32, grad=True) for _ in range(3))
    q_t, k_t, v_t = (make((1, 2, 17, 64), F32) for _ in range(3))
    o, o_t = attention_jvp(q, k, v, q_t, k_t, v_t, scale=0.5)
    args64 = [x.detach().double() for x in (q, k, v, q_t, k_t, v_t)]
    o64, o_t64 = reference.attention_jvp_autodiff(*args64, scale=0.5)
    o_lo, o_t_lo = reference.attention_jvp_autodiff(*[x.float() for x in args64], scale=0.5)
    assert_bound("o", o, o_lo, o64)
    assert_bound("o_t", o_t, o_t_lo, o_t64)


def _bad_calls():
    x = torch.randn(2, 2, 17, 64, device=DEVICE)
    t = torch.randn(1, 2, 17, 64, device=DEVICE)
    return [
        ("q", lambda: attention(x[0], x, x)),
        ("k", lambda: attention(x, x[:, :1], x)),
        ("v", lambda: attention(x, x, x.half())),
        ("q", lambda: attention(x.long(), x.long(), x.long())),
        ("k", lambda: attention(x, x.to("meta"), x)),
        ("q: head_dim", lambda: attention(*(torch.randn(1, 1, 4, 160, device=DEVICE),) * 3)),
        ("scale", lambda: attention(x, x, x, scale="0.1")),
        ("scale", lambda: attention(x, x, x, scale=-0.1)),
        ("q_t", lambda: attention_jvp(x, x, x, torch.randn(3, 2, 17, 64, device=DEVICE), t, t)),
        ("q_t", lambda: attention_jvp(x, x, x, torch.randn(1, 1, 17, 64, device=DEVICE), t, t)),
        ("q_t", lambda: attention_jvp(x, x, x, t.half(), t, t)),
        ("k_t", lambda: attention_jvp(x, x, x, t, x, t)),
        ("v_t", lambda: attention_jvp(x, x, x, t, t, t.half())),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_inputs_raise(index):
    """Each bad call raises a ValueError whose message starts with the offending argument."""
    name, call = _bad_calls()[index]
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()


H100_SMEM = 227 * 1024  # opt-in shared memory per block


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    "candidates, smem, with_tangent",
    [
        (attention_op.FWD_PRIMAL_CONFIGS, attention_op._fwd_smem, False),
        (attention_op.FWD_TANGENT_CONFIGS, attention_op._fwd_smem, True),
        (attention_bwd_op.DKDV_CONFIGS, attention_bwd_op._dkdv_smem, None),
        (attention_bwd_op.DQ_CONFIGS, attention_bwd_op._dq_smem, None),
    ],
)
def test_autotune_prune_keeps_exactly_the_fitting_configs(candidates, smem, with_tangent, dtype):
    meta = {"Q": torch.empty(0, dtype=dtype), "BLOCK_D": 128, "WITH_TANGENT": with_tangent, "SPLIT": False}
    fits = [c for c in candidates if smem({**meta, **c.kwargs}, c.num_stages) <= H100_SMEM]
    assert fits and _tuning.prune_by_shared_memory(candidates, meta, smem, H100_SMEM) == fits
    assert len(_tuning.prune_by_shared_memory(candidates, meta, smem, 0)) == 1


def test_forward_configs_follow_their_rule():
    """Each mode tries only its own list; the lists keep the compile rule written next to them."""
    tangent, primal = attention_op.FWD_TANGENT_CONFIGS, attention_op.FWD_PRIMAL_CONFIGS
    d64 = {"BLOCK_D": 64, "BLOCK_D2": 16, "SPLIT": False}
    assert attention_op.fwd_mode_configs(attention_op.FWD_CONFIGS, {**d64, "WITH_TANGENT": True}) == tangent
    assert attention_op.fwd_mode_configs(attention_op.FWD_CONFIGS, {**d64, "WITH_TANGENT": False}) == primal
    d128 = {"BLOCK_D": 128, "BLOCK_D2": 16, "SPLIT": False, "WITH_TANGENT": True}
    wide = attention_op.fwd_mode_configs(attention_op.FWD_CONFIGS, d128)
    assert wide == [c for c in tangent if c.kwargs["BLOCK_N"] == 32]  # the clean ones at d128
    d96 = {"BLOCK_D": 64, "BLOCK_D2": 32, "SPLIT": True, "WITH_TANGENT": True}  # d88, d96: 64 + 32 columns
    split = attention_op.fwd_mode_configs(attention_op.FWD_CONFIGS, d96)
    assert split == [c for c in tangent if c.kwargs["BLOCK_N"] == 32 or c.num_warps == 8]
    dkdv = attention_bwd_op.DKDV_CONFIGS
    assert attention_bwd_op._dkdv_rule(dkdv, d96) == dkdv
    assert attention_bwd_op._dkdv_rule(dkdv, d128) == [c for c in dkdv if _tile(c)[:2] != (64, 128)]
    for configs in (primal, tangent, attention_bwd_op.DKDV_CONFIGS, attention_bwd_op.DQ_CONFIGS):
        assert 6 <= len(configs) <= 12 and all(c.num_stages in (2, 3) for c in configs)
    assert all(c.num_warps == 8 for c in primal + tangent + attention_bwd_op.DQ_CONFIGS if c.kwargs["BLOCK_M"] == 128)
    assert all(c.num_warps == 8 for c in attention_bwd_op.DKDV_CONFIGS + primal if c.kwargs["BLOCK_N"] == 128)
    assert all(c.kwargs["BLOCK_N"] <= 64 for c in tangent)


def _tile(config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


@pytest.mark.parametrize("arch", [80, 86, 90, 100])
@pytest.mark.parametrize("head_dim", [32, 64, 72, 96, 128])
def test_sm8x_prune_drops_exactly_the_spilling_tiles(monkeypatch, arch, head_dim):
    """Below sm_90 every kernel's prune drops the tiles of its SM8X_SPILLS entry (the wider width class
    for a head tile between two) and keeps the rest in order; if none is clean, the least spilling one."""
    monkeypatch.setattr(attention_common, "device_arch", lambda _t: arch)
    q = torch.empty(2, 3, 276, head_dim, dtype=torch.bfloat16)
    meta = {"Q": q, "SEQ": 276, "WITH_TANGENT": True, **attention_common.split_meta(q)}
    width = attention_common.head_columns(meta)
    cases = [
        ("fwd_tangent", attention_op.fwd_mode_configs(attention_op.FWD_CONFIGS, meta), attention_op._fwd_prune),
        ("dkdv", attention_bwd_op.DKDV_CONFIGS, lambda c, m: attention_common.drop_sm8x_spills("dkdv", c, m)),
        ("dq", attention_bwd_op.DQ_CONFIGS, lambda c, m: attention_common.drop_sm8x_spills("dq", c, m)),
    ]
    for kernel, configs, prune in cases:
        kept = prune(list(configs), meta)
        if arch >= 90:
            assert kept == list(configs), kernel
            continue
        table = attention_common.SM8X_SPILLS[kernel]
        spills = table[min(w for w in table if w >= width)]
        clean = [c for c in configs if _tile(c) not in spills]
        assert kept == (clean or [min(configs, key=lambda c: spills[_tile(c)])]), (kernel, width)
    if arch < 90 and width == 64:  # the tangent keeps only its 32-wide tiles on sm_8x at d64
        assert {_tile(c)[1] for c in attention_op._fwd_prune(attention_op.FWD_CONFIGS, meta)} == {32}


@pytest.mark.parametrize(
    "seq, expected", [(276, (64, 64, 4, 3)), (256, (128, 64, 8, 3)), (4096, (128, 64, 8, 3)), (17, (64, 64, 4, 3))]
)
@pytest.mark.parametrize("with_tangent", [False, True])
def test_pinned_forward_tile_pads_the_fewest_query_rows(monkeypatch, seq, expected, with_tangent):
    """sm_90, d64: the mode's first config unless a 64-row tile pads fewer rows (iMF's 276 tokens: 320
    rows, 86% useful, against 384 and 72% for 128 rows)."""
    monkeypatch.setattr(attention_common, "device_arch", lambda _t: 90)
    q = torch.empty(2, 3, seq, 64, dtype=torch.bfloat16)
    meta = {"Q": q, "SEQ": seq, "WITH_TANGENT": with_tangent, **attention_common.split_meta(q)}
    assert _tile(attention_op._fwd_pinned(meta)) == expected
    reversed_list = attention_op.FWD_TANGENT_CONFIGS[::-1]  # at 4096 every tile pads nothing: list order
    assert attention_common.least_padding(reversed_list, "BLOCK_M", 4096) == reversed_list[0]


def test_padded_statistics_cover_every_backward_row_block():
    """lse/delta are padded to STATS_PAD rows per (batch, head): every backward row block divides it."""
    pad = attention_bwd_op.STATS_PAD.value
    for configs in (attention_bwd_op.DKDV_CONFIGS, attention_bwd_op.DQ_CONFIGS, attention_bwd_op.PREPROCESS_CONFIGS):
        assert all(pad % c.kwargs["BLOCK_M"] == 0 for c in configs)
    assert [attention_bwd_op.padded_seq(n) for n in (1, 128, 129, 276)] == [128, 128, 256, 384]


def test_prune_drops_the_tangent_tile_that_overflows_shared_memory():
    """fp16, ``BLOCK_D = 128``: 64x64 with 3 stages compiles to more than the estimate (slack)."""
    meta = {"Q": torch.empty(0, dtype=torch.float16), "BLOCK_D": 128, "WITH_TANGENT": True, "SPLIT": False}
    kept = _tuning.prune_by_shared_memory(attention_op.FWD_TANGENT_CONFIGS, meta, attention_op._fwd_smem, H100_SMEM)
    assert 0 < len(kept) < len(attention_op.FWD_TANGENT_CONFIGS)
    assert not any(c.kwargs == {"BLOCK_M": 64, "BLOCK_N": 64} and c.num_stages == 3 for c in kept)
    split = {**meta, "BLOCK_D": 64, "BLOCK_D2": 16, "SPLIT": True}  # head_dim 72: 80 columns, all tiles fit
    assert all(
        attention_op._fwd_smem({**split, **c.kwargs}, c.num_stages) <= H100_SMEM
        for c in attention_op.FWD_TANGENT_CONFIGS
    )


@pytest.mark.skipif(not INTERPRETING, reason="the smoke run uses CPU tensors")
def test_bench_smoke():
    """The benchmark harness produces a row with numbers for every implementation, op and mode."""
    from bench import attention_bench

    assert attention_bench.flops("attention_jvp", "fwd", 2, 3, 5, 8) == 3 * attention_bench.flops(
        "attention", "fwd", 2, 3, 5, 8
    )
    rows = attention_bench.smoke()
    expected = {
        (op, mode, impl)
        for op, impls in (
            ("attention", ("imf_kernels", "sdpa_flash")),
            ("attention_jvp", ("imf_kernels", "sdpa_dropin_func_jvp", "torch_func_jvp_math")),
        )
        for mode in ("fwd", "fwd+bwd")
        for impl in impls
    } | {("attention", "fwd+bwd", "imf_kernels_atomic_bwd")}  # the opt-in backward, fwd+bwd only
    assert {(r["op"], r["mode"], r["impl"]) for r in rows} == expected
    assert all("error" not in r and r["ms"] > 0 and r["tflops"] > 0 for r in rows)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq, head_dim", [(256, 64), (276, 72), (1024, 64), (1024, 128), (4096, 64)])
def test_attention_gpu(dtype, seq, head_dim):
    batch, heads = (4, 6) if seq <= 1024 else (1, 4)
    q, k, v = (make((batch, heads, seq, head_dim), dtype, grad=True, device="cuda") for _ in range(3))
    check_attention_grads(attention(q, k, v), q, k, v, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "seq, head_dim, n", [(256, 64, 3), (276, 64, 3), (276, 72, 2), (1024, 64, 4), (4096, 64, 1)]
)  # 276 x 64: iMF-B/2's training shape (256 image + 20 condition tokens, tangents on a prefix)
def test_attention_jvp_gpu(dtype, seq, head_dim, n):
    batch, heads = (4, 6) if seq <= 1024 else (1, 4)
    q, k, v = (make((batch, heads, seq, head_dim), dtype, grad=True, device="cuda") for _ in range(3))
    tangents = [make((n, heads, seq, head_dim), dtype, device="cuda") for _ in range(3)]
    o, o_t = attention_jvp(q, k, v, *tangents)
    args64 = [x[:n].detach().double() for x in (q, k, v)] + [x.double() for x in tangents]
    _, o_t64 = reference.attention_jvp_autodiff(*args64)
    _, o_t_lo = reference.attention_jvp_autodiff(*[x.to(dtype) for x in args64])
    assert_bound("o_t", o_t, o_t_lo, o_t64)
    check_attention_grads(o, q, k, v, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq, head_dim", [(276, 64), (256, 72), (1024, 128)])
def test_func_jvp_gpu(dtype, seq, head_dim):
    """``torch.func.jvp`` through the jvp rule at model shapes (the split 72, the BLOCK_N-32 d128 tangent)."""
    q, k, v = (make((2, 6, seq, head_dim), dtype, grad=True, device="cuda") for _ in range(3))
    tangents = tuple(make((2, 6, seq, head_dim), dtype, device="cuda") for _ in range(3))
    o, o_t = torch.func.jvp(attention, (q, k, v), tangents)
    o64, o_t64 = reference_jvp((q, k, v), tangents, torch.float64)
    o_lo, o_t_lo = reference_jvp((q, k, v), tangents, dtype)
    assert_bound("o", o, o_lo, o64)
    assert_bound("o_t", o_t, o_t_lo, o_t64)
    check_attention_grads(o, q, k, v, dtype)


@pytest.mark.gpu
def test_attention_jvp_gpu_memory_is_linear_in_seq():
    """Peak memory of the fused op beyond its inputs grows O(seq) (outputs and ``lse``), not O(seq^2)."""
    extra = []
    for seq in (2048, 8192):
        inputs = [make((1, 8, seq, 64), torch.bfloat16, device="cuda") for _ in range(6)]
        attention_jvp(*inputs)  # autotunes (its timing buffers are not part of the op's footprint)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        attention_jvp(*inputs)
        torch.cuda.synchronize()
        extra.append(torch.cuda.max_memory_allocated() - base)
    assert extra[1] <= 4 * extra[0] + 2**20
