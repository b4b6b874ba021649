"""``torch.func.jvp`` through whole models on the triton backend (the kernels' forward-mode rules).

Against an fp64 anchor with the bound of :func:`numerics.assert_bound`: the triton model in fp32
must be as close to the fp64 reference model as the fp32 reference model is (2x + floor). Checked:
``torch.func.jvp`` of the plain forward (primal, tangent, and the backward of the primal under it,
the py-meanflow pattern) equals the reference model's ``torch.func.jvp`` and the engine's explicit
``forward_with_tangent``; :mod:`imf.baseline`'s ``torch.func.jvp`` losses on the triton backend equal
the engine's losses (value and gradients). Tiny models, fixed seeds, CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_
from numerics import assert_bound

import imf
from imf.baseline import imf_loss_func_jvp, mf_loss_func_jvp
from imf.config import LossConfig
from imf.loss import imf_loss, mf_loss, sample_training_inputs

pytestmark = pytest.mark.triton

# dim 256: the rms_norm backward kernel walks a fixed number of elements per program (more, masked, rows
# at a small dim), slow under the interpreter; one token per condition group, depth 2 (trunk, u-, v-head).
ONE_TOKEN = dict(class_tokens=1, omega_tokens=1, t_min_tokens=1, t_max_tokens=1, time_tokens=1)
TINY = {
    "imf": (
        "iMF-B/2",
        dict(dim=256, heads=2, depth=2, head_depth=1, input_size=4, num_classes=5, freq_dim=16, **ONE_TOKEN),
    ),
    "mf": ("MF-B/2", dict(dim=32, heads=2, depth=1, input_size=4, num_classes=5, freq_dim=16)),
}


def models(arch: str, seed: int):
    """``(reference fp32, reference fp64, triton fp32, generator)`` of the tiny ``arch`` model (:data:`TINY`)."""
    name, overrides = TINY[arch]
    return build_models(name, seed, **overrides)


def build_models(name: str, seed: int, **overrides):
    """``(reference fp32, reference fp64, triton fp32, generator)``: preset ``name`` with ``overrides``, the
    same weights randomised by a generator seeded with ``seed``, which draws the inputs next."""
    gen = torch.Generator().manual_seed(seed)
    ref = randomize_(imf.build_model(name, backend="reference", **overrides), generator=gen)
    tri = imf.build_model(name, backend="triton", **overrides)
    tri.load_state_dict(ref.state_dict())
    ref64 = imf.build_model(name, backend="reference", **overrides).double()
    ref64.load_state_dict(ref.state_dict())
    return ref, ref64, tri, gen


def conditions(model, n: int, gen):
    c = model.cfg
    z = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=gen)
    t = torch.rand(n, generator=gen) * 0.8 + 0.2
    r = t * torch.rand(n, generator=gen)
    y = torch.randint(0, c.num_classes + 1, (n,), generator=gen)
    omega, t_min, t_max = 1 + 3 * torch.rand(n, generator=gen), 0.4 * torch.rand(n, generator=gen), 0.6 + 0.4 * t
    return z, (t, r, y, omega, t_min, t_max)


def func_jvp(model, z, z_t, cond, dtype=torch.float32, **kwargs):
    """``torch.func.jvp`` of ``(z, t) -> model(z, t, r, ..., **kwargs)`` at tangents ``(z_t, 1)``."""
    cast = lambda v: v.to(dtype) if v.is_floating_point() else v
    t, rest = cast(cond[0]), [cast(v) for v in cond[1:]]
    f = lambda zz, tt: model(zz, tt, *rest, **kwargs)
    return torch.func.jvp(f, (cast(z), t), (cast(z_t), torch.ones_like(t)))


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("arch", ["imf", "mf"])
def test_func_jvp_through_triton_model(arch):
    """Primal, tangent and the parameter gradients of a loss on the primal under ``torch.func.jvp``."""
    ref, ref64, tri, gen = models(arch, seed=21)
    z, cond = conditions(ref, 2, gen)
    z_t = torch.randn(z.shape, generator=gen)
    outs = {}
    for key, model, dtype in (
        ("tri", tri, torch.float32),
        ("ref", ref, torch.float32),
        ("ref64", ref64, torch.float64),
    ):
        u, u_t = func_jvp(model, z, z_t, cond, dtype)
        u.square().sum().backward()
        outs[key] = (u, u_t, grads(model))
    u_fw, u_t_fw = tri.forward_with_tangent(z, z_t, *cond)
    for i, name in enumerate(("u", "u_t", "grads")):
        assert_bound(name, outs["tri"][i], outs["ref"][i], outs["ref64"][i])
    assert_bound("forward_with_tangent u", u_fw, outs["ref"][0], outs["ref64"][0])
    assert_bound("forward_with_tangent u_t", u_t_fw, outs["ref"][1], outs["ref64"][1])


def loss_inputs(model, arch: str, n: int, gen):
    c = model.cfg
    cfg = LossConfig.for_method(arch, class_drop=0.3)
    x = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=gen)
    e = torch.randn(x.shape, generator=gen)
    y = torch.randint(0, c.num_classes, (n,), generator=gen)
    return cfg, x, y, e, sample_training_inputs(n, cfg, gen)


def engine_loss(model, arch, cfg, x, y, e, sampled):
    t, r, omega, t_min, t_max, drop = sampled
    if arch == "imf":
        return imf_loss(model, x, y, e, t, r, omega, t_min, t_max, drop, cfg=cfg)[0]
    return mf_loss(model, x, y, e, t, r, drop=drop, cfg=cfg)[0]


def baseline_loss(model, arch, cfg, x, y, e, sampled):
    t, r, omega, t_min, t_max, drop = sampled
    if arch == "imf":
        return imf_loss_func_jvp(model, x, y, e, t, r, omega, t_min, t_max, drop)[0]
    return mf_loss_func_jvp(model, x, y, e, t, r, cfg.omega, cfg.kappa, cfg.t_start, cfg.t_end, drop)[0]


@pytest.mark.parametrize("arch", ["imf", "mf"])
def test_baseline_losses_run_on_the_triton_backend(arch):
    """:mod:`imf.baseline` (``torch.func.jvp`` + autograd) on the triton model against the engine's loss
    (explicit dual forward) on the fp64 reference model: value and every parameter gradient."""
    ref, ref64, tri, gen = models(arch, seed=22)
    cfg, x, y, e, sampled = loss_inputs(ref, arch, 4, gen)
    results = []
    for model, loss_fn, dtype in (
        (tri, baseline_loss, torch.float32),
        (ref, baseline_loss, torch.float32),
        (ref64, engine_loss, torch.float64),
    ):
        cast = lambda v: v.to(dtype) if v.is_floating_point() else v  # noqa: B023
        loss = loss_fn(model, arch, cfg, cast(x), y, cast(e), [cast(v) for v in sampled])
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (loss_tri, g_tri), (loss_ref, g_ref), (loss64, g64) = results
    assert_bound("loss", loss_tri, loss_ref, loss64)
    assert_bound("grads", g_tri, g_ref, g64)
