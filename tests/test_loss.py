"""Losses against an independent re-derivation with torch.func.jvp, and their limiting cases. Fixed seeds."""

import math

import numpy as np
import pytest
import torch
from conftest import randomize_
from scipy import stats

import imf
from imf.baseline import imf_loss_func_jvp, mf_loss_func_jvp
from imf.config import LossConfig
from imf.loss import imf_loss, mf_loss, sample_training_inputs

TINY_IMF = dict(dim=32, heads=2, depth=3, head_depth=1, input_size=4, num_classes=5, freq_dim=16)
TINY_MF = dict(dim=32, heads=2, depth=2, input_size=4, num_classes=5, freq_dim=16)


def _batch(model, n, gen, dtype=torch.float64):
    c = model.cfg
    x = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=gen, dtype=dtype)
    e = torch.randn(x.shape, generator=gen, dtype=dtype)
    y = torch.randint(0, c.num_classes, (n,), generator=gen)
    return x, y, e


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("v_head", ["aux", "boundary"])
def test_imf_loss_matches_reference(v_head):
    gen = torch.Generator().manual_seed(11 if v_head == "aux" else 12)
    model = randomize_(imf.build_model("iMF-B/2", v_head=v_head, **TINY_IMF).double(), generator=gen)
    n = 12
    x, y, e = _batch(model, n, gen)
    t, r, omega, t_min, t_max, drop = sample_training_inputs(n, LossConfig(class_drop=0.3), gen)
    t, r, omega, t_min, t_max = (v.double() for v in (t, r, omega, t_min, t_max))
    perm = torch.randperm(n, generator=gen)  # FM samples scattered: the loss must reorder them itself
    args = [v[perm] for v in (x, y, e, t, r, omega, t_min, t_max, drop)]
    loss, metrics = imf_loss(model, *args)
    loss.backward()
    g = _grads(model)
    model.zero_grad()
    ref, mse_V = imf_loss_func_jvp(model, *args)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-10
    assert abs(metrics["mse_V"].item() - mse_V.item()) < 1e-10 * max(1.0, mse_V.item())
    assert ((g - _grads(model)).norm() / _grads(model).norm()).item() < 1e-9
    assert metrics["n_tangent"] == int((args[4] < args[3]).sum())


def test_mf_loss_matches_reference():
    gen = torch.Generator().manual_seed(13)
    model = randomize_(imf.build_model("MF-B/2", **TINY_MF).double(), generator=gen)
    n = 10
    x, y, e = _batch(model, n, gen)
    kw = dict(omega=2.5, kappa=0.4, t_start=0.1, t_end=0.7)
    cfg = LossConfig.for_method("mf", class_drop=0.3, **kw)
    t, r, _, _, _, drop = sample_training_inputs(n, cfg, gen)
    t, r = t.double(), r.double()
    loss, metrics = mf_loss(model, x, y, e, t, r, drop=drop, cfg=cfg)
    loss.backward()
    g = _grads(model)
    model.zero_grad()
    ref, mse = mf_loss_func_jvp(model, x, y, e, t, r, kw["omega"], kw["kappa"], kw["t_start"], kw["t_end"], drop)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-10
    assert abs(metrics["mse_u"].item() - mse.item()) < 1e-10 * max(1.0, mse.item())
    assert ((g - _grads(model)).norm() / _grads(model).norm()).item() < 1e-9


def _plain_inputs(model, n, gen):
    x, y, e = _batch(model, n, gen)
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    return x, y, e, t


def test_r_equal_t_reduces_to_flow_matching():
    """With r = t, omega = 1 and no v-head: per-sample loss terms are adp(|u(z_t | h=0) - (e - x)|^2)."""
    gen = torch.Generator().manual_seed(3)
    model = randomize_(imf.build_model("iMF-B/2", v_head="boundary", **TINY_IMF).double(), generator=gen)
    x, y, e, t = _plain_inputs(model, 6, gen)
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    loss, metrics = imf_loss(model, x, y, e, t, t, ones * 3.0, zeros, ones * 0.05)  # t outside: no guidance
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    u = model(z, t, t, y, ones * 3.0, zeros, ones * 0.05)
    sq = (u - (e - x)).pow(2).flatten(1).sum(1)
    assert metrics["n_tangent"] == 0
    assert abs(loss.item() - (sq / (sq + 0.01)).mean().item()) < 1e-12


def test_omega_one_means_no_guidance_and_outside_interval_target_is_v_t():
    """omega = 1, or t outside [t_min, t_max], makes the target v_t = e - x exactly (r = t isolates it)."""
    gen = torch.Generator().manual_seed(4)
    model = randomize_(imf.build_model("iMF-B/2", v_head="boundary", **TINY_IMF).double(), generator=gen)
    x, y, e, t = _plain_inputs(model, 6, gen)
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    for omega, t_min, t_max in ((ones, zeros, ones), (ones * 5, zeros, t * 0.5), (ones * 5, (t + 1) / 2, ones)):
        _, metrics = imf_loss(model, x, y, e, t, t, omega, t_min, t_max)
        u = model(z, t, t, y, omega, t_min, t_max)
        assert abs(metrics["mse_V"].item() - (u - (e - x)).pow(2).mean().item()) < 1e-12
    # ... and inside the interval with omega > 1 the target moves.
    _, metrics = imf_loss(model, x, y, e, t, t, ones * 5, zeros, ones)
    u = model(z, t, t, y, ones * 5, zeros, ones)
    assert abs(metrics["mse_V"].item() - (u - (e - x)).pow(2).mean().item()) > 1e-6


def test_tangent_gets_no_gradient():
    """The gradient is that of ``adp(|u + (t - r) C - v_t|^2)`` with ``C = du/dt`` held constant (omega = 1, so
    ``v_g = v_t``); letting the gradient flow through ``du/dt`` as well gives a different one, so this can fail."""
    gen = torch.Generator().manual_seed(5)
    model = randomize_(imf.build_model("iMF-B/2", v_head="boundary", **TINY_IMF).double(), generator=gen)
    x, y, e, t = _plain_inputs(model, 4, gen)
    r = t * 0.3
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    loss, _ = imf_loss(model, x, y, e, t, r, ones, zeros, ones)
    loss.backward()
    g = _grads(model)
    model.zero_grad()
    tb = t.view(-1, 1, 1, 1)
    z = (1 - tb) * x + tb * e
    v_c = model.velocity(z, t, t, y, ones, zeros, ones).detach()
    u, du = torch.func.jvp(lambda zz, tt: model(zz, tt, r, y, ones, zeros, ones), (z, t), (v_c, ones))

    def grad_of(du_term):
        sq = (u + (t - r).view(-1, 1, 1, 1) * du_term - (e - x)).pow(2).flatten(1).sum(1)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad((sq / (sq.detach() + 0.01)).mean(), params, retain_graph=True, allow_unused=True)
        return torch.cat([gr.flatten() for gr in grads if gr is not None])

    stopped, through = grad_of(du.detach()), grad_of(du)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(g, stopped) < 1e-9
    assert rel(g, through) > 1e-3


def test_loss_bad_inputs():
    model = imf.build_model("iMF-B/2", **TINY_IMF)
    gen = torch.Generator().manual_seed(0)
    x, y, e = _batch(model, 4, gen, torch.float32)
    t, r, omega, t_min, t_max, drop = sample_training_inputs(4, LossConfig(), gen)
    good = dict(x=x, y=y, e=e, t=t, r=r, omega=omega, t_min=t_min, t_max=t_max, drop=drop)
    cases = {
        r"y \(class labels\) must be in \[0, 5\].*got y=1\d": dict(y=y + 10),
        "r must satisfy": dict(r=t + 0.1),
        "omega must be >= 1": dict(omega=omega * 0 + 0.5),
        "t must be in": dict(t=t + 2, r=r),
        "t_min, t_max": dict(t_min=t_max + 0.1),
        "x must be a floating tensor of shape": dict(x=x[:, :, :2]),
        "e must match x": dict(e=e.double()),
        "drop must be a boolean": dict(drop=drop.int()),
        "t must be a tensor of shape": dict(t=t[:3]),
        "y must hold integer": dict(y=y.float()),
        "must be finite": dict(x=x * float("nan")),
    }
    for msg, bad in cases.items():
        with pytest.raises(ValueError, match=msg):
            imf_loss(model, **{**good, **bad})
    with pytest.raises(ValueError, match="omega must be >= 1"):
        mf_loss(imf.build_model("MF-B/2", **TINY_MF), x, y, e, t, r, cfg=LossConfig(method="mf", omega=0.5))
    with pytest.raises(ValueError, match="t_start <= t_end"):
        LossConfig.for_method("mf", t_start=0.8, t_end=0.2)


def test_samplers_follow_published_distributions():
    n = 20000
    gen = torch.Generator().manual_seed(14)
    cfg = LossConfig()
    t, r, omega, t_min, t_max, drop = sample_training_inputs(n, cfg, gen)
    fm = torch.arange(n) >= n // 2  # the official FM block, rotated behind the tangent samples
    assert torch.equal(r[fm], t[fm]) and (r[~fm] <= t[~fm]).all() and (r[~fm] < t[~fm]).float().mean() > 0.99
    # t is the max of two logit-normal(-0.4, 1) draws: P(t <= s) = Phi((logit s + 0.4))^2.
    cdf_t = lambda s: stats.norm.cdf(np.log(s / (1 - s)) + 0.4) ** 2
    assert stats.kstest(t.double().numpy(), cdf_t).pvalue > 1e-4
    # omega ~ omega^-1 on [1, 8]: log(omega) / log(8) is uniform.
    assert stats.kstest((omega.log() / math.log(8)).numpy(), "uniform").pvalue > 1e-4
    assert stats.kstest((2 * t_min[~fm]).numpy(), "uniform").pvalue > 1e-4
    assert stats.kstest((2 * t_max[~fm] - 1).numpy(), "uniform").pvalue > 1e-4
    assert (t_min[fm] == 0).all() and (t_max[fm] == 1).all()
    assert abs(drop.float().mean().item() - 0.1) < 0.01
    beta2 = sample_training_inputs(n, LossConfig(omega_beta=2.0, omega_s_max=3.0), gen)[2]
    # p ~ w^-2 on [1, 4]: CDF (1 - 1/w) / (3/4).
    assert stats.kstest(beta2.numpy(), lambda w: (1 - 1 / w) / 0.75).pvalue > 1e-4
    t, r, omega, t_min, t_max, drop = sample_training_inputs(n, LossConfig.for_method("mf", omega=2.0), gen)
    assert abs((r < t).float().mean().item() - 0.25) < 0.01 and (omega == 2.0).all()
    with pytest.raises(ValueError, match="batch_size"):
        sample_training_inputs(0, cfg)
    with pytest.raises(ValueError, match="loss method"):
        LossConfig.for_method("fm")
