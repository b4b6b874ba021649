"""FLOP counter (imf/flops.py): an independent closed form, FlopCounterMode on the reference model,
the published per-forward counts, and the step expectation against the sampler."""

import dataclasses

import pytest
import torch
from conftest import randomize_
from torch.utils.flop_counter import FlopCounterMode

from imf import build_model, flops
from imf.config import LossConfig, preset
from imf.loss import imf_loss, mf_loss, sample_training_inputs


def sizes(cfg):
    """``(L, d, H, P, c, cond)``: tokens, width, MLP hidden, patches, patch values, one condition MLP's FLOPs."""
    L, d, H, P = cfg.seq_len, cfg.dim, cfg.hidden, cfg.num_patches
    return L, d, H, P, cfg.patch_size**2 * cfg.in_channels, 2 * (cfg.freq_dim * d + d * d)


def closed_form(cfg, head):
    """Per-sample forward FLOPs written out independently of imf/flops.py (2 per MAC)."""
    L, d, H, P, c, cond = sizes(cfg)
    if cfg.arch == "mf":
        block = 2 * (4 * L * d * d + 2 * L * d * H + 2 * L * L * d + 6 * d * d)
        return 2 * P * c * d + 2 * cond + cfg.depth * block + 2 * (2 * d * d + P * d * c)
    block = 2 * (4 * L * d * d + 3 * L * d * H + 2 * L * L * d)
    heads = {"u": 1, "v": 1, "u+v": 2}[head]
    return 2 * P * c * d + 4 * cond + (cfg.trunk_depth + heads * cfg.head_depth) * block + heads * 2 * P * d * c


def tangent_closed_form(cfg):
    """Extra FLOPs of one sample's tangent through the u path: linears again, attention +4 L^2 d MACs."""
    L, d, H, P, c, cond = sizes(cfg)
    if cfg.arch == "mf":
        block = 2 * (4 * L * d * d + 2 * L * d * H + 4 * L * L * d + 6 * d * d)
        return 2 * P * c * d + 2 * cond + cfg.depth * block + 2 * (2 * d * d + P * d * c)
    block = 2 * (4 * L * d * d + 3 * L * d * H + 4 * L * L * d)
    return 2 * P * c * d + cond + cfg.depth * block + 2 * P * d * c


@pytest.mark.parametrize("name", ["iMF-B/2", "iMF-M/2", "iMF-L/2", "iMF-XL/2", "MF-B/2", "MF-XL/2", "demo"])
def test_closed_form(name):
    cfg = preset(name)
    heads = ["u", "v", "u+v"] if cfg.arch == "imf" else ["u", "v"]
    for head in heads:
        assert flops.forward_flops(cfg, 3, head) == pytest.approx(3 * closed_form(cfg, head), rel=1e-12)
    assert flops.tangent_flops(cfg, 3) == pytest.approx(3 * tangent_closed_form(cfg), rel=1e-12)
    rows = flops.breakdown(cfg, 5)
    assert sum(r["forward"] for r in rows if r["part"] != "v_head") == pytest.approx(5 * closed_form(cfg, "u"))


@pytest.mark.parametrize("name, paper_gmacs", [("iMF-B/2", 24.9), ("iMF-L/2", 116.4), ("iMF-XL/2", 174.6)])
def test_paper_forward_flops(name, paper_gmacs):
    """Papers' "GFLOPs" are multiply-accumulates: 2x them in real FLOPs (256x256, 276 tokens)."""
    cfg = preset(name)
    assert cfg.seq_len == 276
    assert flops.forward_flops(cfg, 1, "u") == pytest.approx(2 * paper_gmacs * 1e9, rel=0.01)


def test_dit_published_counts():
    """MF-B/2 / MF-XL/2 are DiT-B/2 / DiT-XL/2 (23.0 / 118.6 GMACs) plus the h-embedding MLP."""
    assert flops.forward_flops(preset("MF-B/2"), 1) == pytest.approx(2 * 23.0e9, rel=0.01)
    assert flops.forward_flops(preset("MF-XL/2"), 1) == pytest.approx(2 * 118.6e9, rel=0.01)


def _inputs(cfg, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(batch, generator=g) * 0.5 + 0.5
    r = t * torch.rand(batch, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    omega = 1 + 3 * torch.rand(batch, generator=g)
    return z, t, r, y, omega, torch.full((batch,), 0.2), torch.full((batch,), 0.8)


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _recompute(cfg, n):
    """The reference attention JVP recomputes ``S = q k^T`` for its tangent rows (the fused kernel does
    not): one extra ``2 L^2 d`` per tangent sample and block on the u path."""
    blocks = cfg.depth
    return n * blocks * 2 * cfg.seq_len**2 * cfg.dim


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("demo", {}),
        ("demo", {"v_head": "boundary"}),
        ("MF-B/2", {"dim": 64, "depth": 2, "heads": 4, "input_size": 8, "num_classes": 10, "freq_dim": 32}),
    ],
)
def test_flop_counter_mode(name, overrides):
    """FlopCounterMode (matmuls only) on the reference model matches the counter exactly."""
    cfg = preset(name, **overrides)
    model = randomize_(build_model(cfg, backend="reference"), generator=torch.Generator().manual_seed(0))
    batch, n = 4, 3
    z, t, r, y, omega, t_min, t_max = _inputs(cfg, batch)
    args = (t, r, y, omega, t_min, t_max)
    with torch.no_grad():
        assert _count(lambda: model(z, *args)) == flops.forward_flops(cfg, batch, "u")
        assert _count(lambda: model.velocity(z, *args)) == flops.forward_flops(cfg, batch, "v")
    aux = cfg.arch == "imf" and cfg.v_head == "aux"
    dual = _count(lambda: model.forward_with_tangent(z, z[:n], *args, with_velocity=aux))
    expect = flops.forward_flops(cfg, batch, "u+v" if aux else "u") + flops.tangent_flops(cfg, n)
    assert dual == expect + _recompute(cfg, n)


def test_backward_is_twice_forward():
    """Autograd's matmul backward is dX + dW = 2x the forward, less the input-layer dX that nobody needs."""
    cfg = preset("demo")
    model = randomize_(build_model(cfg, backend="reference"), generator=torch.Generator().manual_seed(0))
    z, t, r, y, omega, t_min, t_max = _inputs(cfg, 4)
    out = model.forward_with_tangent(z, z[:2], t, r, y, omega, t_min, t_max, with_velocity=True)
    loss = out[0].square().sum() + out[2].square().sum()
    bwd = _count(loss.backward)
    fwd = flops.forward_flops(cfg, 4, "u+v")
    assert 1.9 * fwd < bwd <= 2 * fwd


def _exact_imf_cfg(**kw):
    # No class dropout, intervals that always contain t: every sample needs v_u, so the step is deterministic.
    return LossConfig.for_method("imf", class_drop=0.0, t_min_range=(0.0, 0.0), t_max_range=(1.0, 1.0), **kw)


@pytest.mark.parametrize("v_head", ["aux", "boundary"])
def test_imf_step_matches_flop_counter(v_head):
    cfg = preset("demo", v_head=v_head)
    loss_cfg = _exact_imf_cfg()
    assert flops.guidance_fraction(loss_cfg) == pytest.approx(1.0, abs=1e-9)
    model = randomize_(build_model(cfg, backend="reference"), generator=torch.Generator().manual_seed(0))
    batch = 6
    g = torch.Generator().manual_seed(1)
    t, r, omega, t_min, t_max, drop = sample_training_inputs(batch, loss_cfg, g)
    x, e = torch.randn(2, batch, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    holder = {}
    fwd = _count(lambda: holder.update(loss=imf_loss(model, x, y, e, t, r, omega, t_min, t_max, drop, loss_cfg)[0]))
    bwd = _count(holder["loss"].backward)
    phases = flops.train_step_breakdown(cfg, loss_cfg, batch)
    n_tan = batch - round(loss_cfg.fm_fraction * batch)
    assert fwd == phases["guidance"] + phases["dual_forward"] + _recompute(cfg, n_tan)
    assert 0.95 * phases["backward"] < bwd <= phases["backward"]


def test_mf_step_matches_flop_counter():
    cfg = preset("MF-B/2", dim=64, depth=2, heads=4, input_size=8, num_classes=10, freq_dim=32)
    loss_cfg = LossConfig.for_method("mf", class_drop=0.0, omega=2.0, t_start=0.0, t_end=1.0)
    assert flops.guidance_fraction(loss_cfg) == pytest.approx(1.0)
    model = randomize_(build_model(cfg, backend="reference"), generator=torch.Generator().manual_seed(0))
    batch = 8
    g = torch.Generator().manual_seed(2)
    t, r, *_ = sample_training_inputs(batch, loss_cfg, g)
    x, e = torch.randn(2, batch, 4, 8, 8, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    fwd = _count(lambda: mf_loss(model, x, y, e, t, r, cfg=loss_cfg))
    phases = flops.train_step_breakdown(cfg, loss_cfg, batch)
    assert fwd == phases["guidance"] + phases["dual_forward"] + _recompute(cfg, 2)
    assert flops.train_step_breakdown(cfg, dataclasses.replace(loss_cfg, omega=1.0, kappa=0.0), batch)["guidance"] == 0


@pytest.mark.parametrize("overrides", [{}, {"p_mean": 0.3, "p_std": 0.7, "t_min_range": (0.1, 0.3)}])
def test_guidance_fraction_vs_sampler(overrides):
    """The quadrature equals the fraction of r < t samples with t_min <= t <= t_max drawn by the sampler."""
    loss_cfg = LossConfig.for_method("imf", fm_fraction=0.0, **overrides)
    t, _, _, t_min, t_max, _ = sample_training_inputs(400_000, loss_cfg, torch.Generator().manual_seed(0))
    mc = ((t_min <= t) & (t <= t_max)).double().mean().item()
    assert flops.guidance_fraction(loss_cfg) == pytest.approx(mc, abs=3e-3)
    mf_cfg = LossConfig.for_method("mf", t_start=0.3, t_end=0.7)
    t = sample_training_inputs(400_000, mf_cfg, torch.Generator().manual_seed(0))[0]
    mc = ((t >= 0.3) & (t <= 0.7)).double().mean().item()
    assert flops.guidance_fraction(mf_cfg) == pytest.approx(mc, abs=3e-3)


def test_step_flops_published_defaults():
    """iMF-B/2: ~7 inference-forward equivalents per step (docs/design.md section 1), vs 3 for FM."""
    cfg, loss_cfg = preset("iMF-B/2"), LossConfig()
    per_fwd = flops.forward_flops(cfg, 256, "u")
    total = flops.train_step_flops(cfg, loss_cfg, 256)
    assert 6.5 < total / per_fwd < 8.0
    assert flops.fm_step_flops(cfg, 256) == 3 * per_fwd
    no_guidance = dataclasses.replace(loss_cfg, omega_s_max=0.0)
    assert flops.train_step_breakdown(cfg, no_guidance, 256)["guidance"] == flops.forward_flops(cfg, 256, "v")


def test_peak_flops_and_errors():
    assert flops.peak_flops("cpu") is None
    assert flops.peak_flops_by_name("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_by_name("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops_by_name("NVIDIA H200") == 989e12
    assert flops.peak_flops_by_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops_by_name("NVIDIA GeForce RTX 4090") is None
    with pytest.raises(ValueError, match="v-head"):
        flops.forward_flops(preset("MF-B/2"), 1, "u+v")
    with pytest.raises(ValueError, match="head must be"):
        flops.forward_flops(preset("iMF-B/2"), 1, "w")
    with pytest.raises(ValueError, match="batch_size"):
        flops.train_step_flops(preset("iMF-B/2"), LossConfig(), 0)
