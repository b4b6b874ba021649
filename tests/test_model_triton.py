"""Whole-model parity of the "triton" backend (fused kernels, interpreter on CPU) with the reference."""

import pytest
import torch
from conftest import randomize_

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
    u_ref, u_t_ref = torch.func.jvp(lambda zz, tt: ref(zz, tt, r, y, omega, t_min, t_max), (z, t),
                                    (z_t, torch.ones_like(t)))
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
        ref, tri, gen = _pair("MF-B/2", dim=64, heads=2, depth=2, input_size=4, in_channels=1, num_classes=5,
                              freq_dim=16)
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
