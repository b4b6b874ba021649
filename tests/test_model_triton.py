"""Whole-model parity of the "triton" backend (fused kernels, interpreter on CPU) with the reference, eager and
under ``torch.compile`` (``aot_eager`` backend: graph capture and AOT autograd without code generation)."""

from functools import partial

import pytest
import torch
import torch._dynamo
from conftest import randomize_
from numerics import assert_bound
from test_func_jvp import conditions, engine_loss, func_jvp, grads, loss_inputs, models
from torch._dynamo.utils import counters

import imf
from imf.config import LossConfig
from imf.loss import imf_loss, mf_loss, sample_training_inputs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)


def _pair(name, **overrides):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ref = randomize_(imf.build_model(name, backend="reference", **overrides), generator=gen)
    tri = imf.build_model(name, backend="triton", **overrides)
    tri.load_state_dict(ref.state_dict())
    return ref, tri, gen


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_triton_dual_forward_matches_func_jvp_of_reference():
    ref, tri, gen = _pair("demo", heads=2)  # head_dim 32
    c, n = ref.cfg, 3
    z = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=gen)
    t = torch.rand(n, generator=gen) * 0.8 + 0.2
    r = t * torch.rand(n, generator=gen)
    y = torch.randint(0, c.num_classes + 1, (n,), generator=gen)
    omega, t_min, t_max = 1 + 3 * torch.rand(n, generator=gen), 0.4 * torch.rand(n), 0.6 + 0.4 * torch.rand(n)
    z_t = torch.randn(z.shape, generator=gen)
    u_ref, u_t_ref = torch.func.jvp(
        lambda zz, tt: ref(zz, tt, r, y, omega, t_min, t_max), (z, t), (z_t, torch.ones_like(t))
    )
    u, u_t = tri.forward_with_tangent(z, z_t[:2], t, r, y, omega, t_min, t_max)
    assert _rel(u, u_ref) < 1e-5
    assert _rel(u_t, u_t_ref[:2]) < 1e-5
    u.square().sum().backward()
    u_ref.square().sum().backward()
    for (name, p), q in zip(tri.named_parameters(), ref.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None and q.grad.norm() > 0:
            assert _rel(p.grad, q.grad) < 1e-4, name


@pytest.mark.parametrize("method", ["imf", "mf"])
def test_triton_loss_and_gradients_match_reference(method):
    if method == "imf":
        ref, tri, gen = _pair("demo", heads=2)
    else:
        ref, tri, gen = _pair(
            "MF-B/2", dim=64, heads=2, depth=2, input_size=4, in_channels=1, num_classes=5, freq_dim=16
        )
    c, n = ref.cfg, 6
    cfg = LossConfig.for_method(method, class_drop=0.3, **({"omega": 2.0, "kappa": 0.3} if method == "mf" else {}))
    x = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=gen)
    e = torch.randn(x.shape, generator=gen)
    y = torch.randint(0, c.num_classes, (n,), generator=gen)
    t, r, omega, t_min, t_max, drop = sample_training_inputs(n, cfg, gen)
    losses, grads = [], []
    for model in (ref, tri):
        if method == "imf":
            loss, _ = imf_loss(model, x, y, e, t, r, omega, t_min, t_max, drop, cfg=cfg)
        else:
            loss, _ = mf_loss(model, x, y, e, t, r, drop=drop, cfg=cfg)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0])
    assert _rel(grads[1], grads[0]) < 1e-4


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
