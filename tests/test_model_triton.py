"""Whole-model parity of the "triton" backend (fused kernels, interpreter on CPU) with the reference, eager and
under ``torch.compile`` (``aot_eager`` backend: graph capture and AOT autograd without code generation)."""

from functools import partial

import pytest
import torch
import torch._dynamo
from numerics import assert_bound
from test_func_jvp import build_models, conditions, engine_loss, func_jvp, grads, loss_inputs, models
from torch._dynamo.utils import counters

from imf.config import LossConfig
from imf.loss import imf_loss, mf_loss, sample_training_inputs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)


def _cast(dtype):
    return lambda v: v.to(dtype) if v.is_floating_point() else v


def test_triton_dual_forward_matches_func_jvp_of_reference(seeded):
    """The explicit dual forward (prefix tangent) and the gradients of a loss on its primal against
    ``torch.func.jvp`` of the reference model, fp64-anchored (:func:`numerics.assert_bound`)."""
    ref, ref64, tri, gen = build_models("demo", seeded, heads=2)  # head_dim 32
    c, n = ref.cfg, 3
    z = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=gen)
    t = torch.rand(n, generator=gen) * 0.8 + 0.2
    r = t * torch.rand(n, generator=gen)
    y = torch.randint(0, c.num_classes + 1, (n,), generator=gen)
    omega, t_min = 1 + 3 * torch.rand(n, generator=gen), 0.4 * torch.rand(n, generator=gen)
    t_max = 0.6 + 0.4 * torch.rand(n, generator=gen)
    z_t = torch.randn(z.shape, generator=gen)
    u, u_t = tri.forward_with_tangent(z, z_t[:2], t, r, y, omega, t_min, t_max)
    u.square().sum().backward()
    same, want = [], []
    for model, out in ((ref, same), (ref64, want)):
        cast = _cast(next(model.parameters()).dtype)
        rest = [cast(v) for v in (r, y, omega, t_min, t_max)]
        u_m, u_t_m = torch.func.jvp(
            lambda zz, tt: model(zz, tt, *rest),  # noqa: B023
            (cast(z), cast(t)),
            (cast(z_t), torch.ones_like(cast(t))),
        )
        u_m.square().sum().backward()
        out.extend([u_m.detach(), u_t_m[:2]])
    assert_bound("u", u, same[0], want[0])
    assert_bound("u_t", u_t, same[1], want[1])
    for (name, p), q, q64 in zip(tri.named_parameters(), ref.parameters(), ref64.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert_bound(f"grad {name}", p.grad, q.grad, q64.grad)


@pytest.mark.parametrize("method", ["imf", "mf"])
def test_triton_loss_and_gradients_match_reference(method, seeded):
    if method == "imf":
        ref, ref64, tri, gen = build_models("demo", seeded, heads=2)
    else:
        ref, ref64, tri, gen = build_models(
            "MF-B/2", seeded, dim=64, heads=2, depth=2, input_size=4, in_channels=1, num_classes=5, freq_dim=16
        )
    c, n = ref.cfg, 6
    cfg = LossConfig.for_method(method, class_drop=0.3, **({"omega": 2.0, "kappa": 0.3} if method == "mf" else {}))
    x = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=gen)
    e = torch.randn(x.shape, generator=gen)
    y = torch.randint(0, c.num_classes, (n,), generator=gen)
    sampled = sample_training_inputs(n, cfg, gen)
    results = []
    for model, dtype in ((tri, torch.float32), (ref, torch.float32), (ref64, torch.float64)):
        cast = _cast(dtype)
        t, r, omega, t_min, t_max, drop = (cast(v) for v in sampled)
        if method == "imf":
            loss, _ = imf_loss(model, cast(x), y, cast(e), t, r, omega, t_min, t_max, drop, cfg=cfg)
        else:
            loss, _ = mf_loss(model, cast(x), y, cast(e), t, r, drop=drop, cfg=cfg)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    for i, name in enumerate(("loss", "grads")):
        assert_bound(name, results[0][i], results[1][i], results[2][i])


def _compiled(fn, **kwargs):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(fn, backend="aot_eager", **kwargs)


def test_compiled_triton_model_is_one_graph_forward_and_backward():
    """``torch.compile(fullgraph=True)`` of the plain forward and of ``forward_with_tangent`` (prefix
    tangent): attention as custom ops, no graph break; outputs and gradients as eager's, against fp64."""
    ref, ref64, tri, gen = models("imf", seed=23)
    z, cond = conditions(ref, 2, gen)
    z_t = torch.randn(1, *z.shape[1:], generator=gen)
    runs = {
        "forward": lambda m, zz, zt, *c: (m(zz, *c, check_values=False),),
        "forward_with_tangent": lambda m, zz, zt, *c: m.forward_with_tangent(zz, zt, *c, check_values=False),
    }
    for name, run in runs.items():
        results = []
        for model, compile_it in ((tri, True), (ref, False), (ref64, False)):
            model.zero_grad()
            fn = _compiled(partial(run, model), fullgraph=True) if compile_it else partial(run, model)
            cast = (lambda v: v.double() if v.is_floating_point() else v) if model is ref64 else (lambda v: v)
            outs = fn(cast(z), cast(z_t), *map(cast, cond))
            if compile_it:
                assert not counters["graph_break"], dict(counters["graph_break"])
            outs[0].square().sum().backward()
            results.append([o.detach() for o in outs] + [grads(model)])
        for i, (out, same, want) in enumerate(zip(*results, strict=True)):
            assert_bound(f"{name} output {i}", out, same, want)


def test_func_jvp_inside_compile_is_never_wrong():
    """``torch.func.jvp`` of the triton model inside ``torch.compile``: a clear error with ``fullgraph=True``;
    without, Dynamo runs it eagerly and the tangent is the reference model's (never a dropped jvp rule)."""
    ref, ref64, tri, gen = models("mf", seed=24)
    z, cond = conditions(ref, 2, gen)
    z_t = torch.randn(z.shape, generator=gen)
    with pytest.raises(Exception, match="forward-mode AD inside torch.compile is not supported"):
        _compiled(lambda *a: func_jvp(tri, *a, check_values=False), fullgraph=True)(z, z_t, cond)
    u, u_t = _compiled(lambda *a: func_jvp(tri, *a, check_values=False))(z, z_t, cond)
    u_ref, u_t_ref = func_jvp(ref, z, z_t, cond)
    u64, u_t64 = func_jvp(ref64, z, z_t, cond, torch.float64)
    assert_bound("u", u, u_ref, u64)
    assert_bound("u_t", u_t, u_t_ref, u_t64)


def test_compiled_blocks_train_like_the_reference():
    """Each block compiled with ``fullgraph=True``, as ``imf.train.parallel`` compiles them: the iMF loss
    (guidance passes, dual forward with prefix tangents, backward) matches the reference backend."""
    ref, ref64, tri, gen = models("imf", seed=25)
    for blk in (*tri.trunk, *tri.u_blocks, *tri.v_blocks):
        blk.compile(backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    cfg, x, y, e, sampled = loss_inputs(ref, "imf", 4, gen)
    results = []
    for model, dtype in ((tri, torch.float32), (ref, torch.float32), (ref64, torch.float64)):
        cast = lambda v: v.to(dtype) if v.is_floating_point() else v  # noqa: B023
        loss = engine_loss(model, "imf", cfg, cast(x), y, cast(e), [cast(v) for v in sampled])
        loss.backward()
        results.append((loss.detach(), grads(model)))
    for i, name in enumerate(("loss", "grads")):
        assert_bound(name, results[0][i], results[1][i], results[2][i])
