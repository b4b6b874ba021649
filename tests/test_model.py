"""Model-level tests: the explicit dual forward equals torch.func.jvp of the reference forward; meta-device
construction with init_weights equals eager construction. Every random input comes from a fixed seed."""

import dataclasses

import pytest
import torch
from conftest import randomize_

import imf
from imf.config import PRESETS
from imf.model import patchify, unpatchify

TINY = {
    "iMF-B/2": dict(dim=48, heads=4, depth=3, head_depth=1, input_size=6, num_classes=7),
    "iMF-XL/2": dict(dim=32, heads=2, depth=4, head_depth=2, input_size=10, num_classes=5, v_head="boundary"),
    "MF-B/2": dict(dim=48, heads=4, depth=2, input_size=6, num_classes=7),
    "MF-XL/2": dict(dim=36, heads=2, depth=2, input_size=10, num_classes=5),
    "demo": {},
}


def _inputs(cfg, batch, dtype, gen):
    z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, dtype=dtype, generator=gen)
    t = torch.rand(batch, dtype=dtype, generator=gen) * 0.9 + 0.1
    r = t * torch.rand(batch, dtype=dtype, generator=gen)
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=gen)  # includes the null label
    omega = 1 + 6 * torch.rand(batch, dtype=dtype, generator=gen)
    t_min = 0.5 * torch.rand(batch, dtype=dtype, generator=gen)
    t_max = 0.5 + 0.5 * torch.rand(batch, dtype=dtype, generator=gen)
    return z, t, r, y, omega, t_min, t_max


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_forward_with_tangent_matches_func_jvp(name, dtype, bound):
    gen = torch.Generator().manual_seed(sorted(TINY).index(name) + 10)
    model = randomize_(imf.build_model(name, **TINY[name]).to(dtype), generator=gen)
    z, t, r, y, omega, t_min, t_max = _inputs(model.cfg, 5, dtype, gen)
    z_t = torch.randn(z.shape, dtype=dtype, generator=gen)
    u_ref, u_t_ref = torch.func.jvp(
        lambda zz, tt: model(zz, tt, r, y, omega, t_min, t_max), (z, t), (z_t, torch.ones_like(t))
    )
    u, u_t = model.forward_with_tangent(z, z_t, t, r, y, omega, t_min, t_max)
    assert _rel(u, u_ref) < bound
    assert _rel(u_t, u_t_ref) < bound
    assert u.requires_grad and not u_t.requires_grad
    # A tangent prefix gives the same first rows and the same primal for every row.
    u2, u2_t = model.forward_with_tangent(z, z_t[:2], t, r, y, omega, t_min, t_max)
    assert u2_t.shape == (2, *z.shape[1:])
    assert _rel(u2, u_ref) < bound
    assert _rel(u2_t, u_t_ref[:2]) < bound


@pytest.mark.parametrize("name", ["iMF-B/2", "MF-B/2"])
def test_tangent_carries_the_time_condition(name):
    """With z_t = 0 the tangent is the pure d/dt through h = t - r (iMF) or (t, h) (MF): non-zero."""
    gen = torch.Generator().manual_seed(1)
    model = randomize_(imf.build_model(name, **TINY[name]).double(), generator=gen)
    z, t, r, y, omega, t_min, t_max = _inputs(model.cfg, 3, torch.float64, gen)
    _, u_t = model.forward_with_tangent(z, torch.zeros_like(z), t, r, y, omega, t_min, t_max)
    _, ref = torch.func.jvp(lambda tt: model(z, tt, r, y, omega, t_min, t_max), (t,), (torch.ones_like(t),))
    assert ref.abs().max() > 1e-3
    assert _rel(u_t, ref) < 1e-10


def test_gradients_flow_only_through_the_primal():
    gen = torch.Generator().manual_seed(2)
    model = randomize_(imf.build_model("demo").double(), generator=gen)
    z, t, r, y, omega, t_min, t_max = _inputs(model.cfg, 4, torch.float64, gen)
    z_t = torch.randn(z.shape, dtype=z.dtype, generator=gen)
    u, u_t, v = model.forward_with_tangent(z, z_t, t, r, y, omega, t_min, t_max, with_velocity=True)
    (u.square().sum() + v.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (
        model(z, t, r, y, omega, t_min, t_max).square().sum() + model.velocity(z, t, r, y, omega, t_min, t_max).sum()
    ).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, rtol=1e-10, atol=1e-12), n


def test_velocity_heads():
    gen = torch.Generator().manual_seed(3)
    model = randomize_(imf.build_model("demo").double(), generator=gen)
    z, t, r, y, omega, t_min, t_max = _inputs(model.cfg, 3, torch.float64, gen)
    v = model.velocity(z, t, r, y, omega, t_min, t_max)
    assert _rel(v, model(z, t, r, y, omega, t_min, t_max)) > 1e-3  # separate v-head
    boundary = imf.build_model("demo", v_head="boundary").double()
    boundary.load_state_dict({k: w for k, w in model.state_dict().items() if k in boundary.state_dict()})
    vb = boundary.velocity(z, t, r, y, omega, t_min, t_max)
    assert torch.equal(vb, boundary(z, t, t, y, omega, t_min, t_max))  # u at h = 0
    with pytest.raises(ValueError, match="with_velocity"):
        boundary.forward_with_tangent(z, z, t, r, y, omega, t_min, t_max, with_velocity=True)


def test_backends_share_the_state_dict():
    ref = imf.build_model("demo", backend="reference")
    tri = imf.build_model("demo", backend="triton")
    assert ref.state_dict().keys() == tri.state_dict().keys()
    for k, w in ref.state_dict().items():
        assert w.shape == tri.state_dict()[k].shape
    tri.load_state_dict(ref.state_dict())


def test_patchify_roundtrip():
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    x = patchify(z, 2)
    assert x.shape == (2, 16, 16)
    assert torch.equal(x[0, 1], z[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(x, 2, 4), z)


@pytest.mark.parametrize("name", ["iMF-B/2", "iMF-L/2", "iMF-XL/2"])
def test_paper_parameter_counts(name):
    """Inference parameters (trunk + u-head) within 3% of the paper's 89M / 409M / 610M."""
    paper = {"iMF-B/2": 89e6, "iMF-L/2": 409e6, "iMF-XL/2": 610e6}[name]
    with torch.device("meta"):
        model = imf.build_model(name)
    total = sum(p.numel() for p in model.parameters())
    v_head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("v_blocks", "v_out")))
    assert abs((total - v_head) - paper) / paper < 0.03


def test_presets_are_valid():
    for name, cfg in PRESETS.items():
        assert dataclasses.replace(cfg).validate() == cfg, name
    assert PRESETS["iMF-XL/2"].head_dim == 64 and PRESETS["MF-XL/2"].head_dim == 72
    assert PRESETS["iMF-B/2"].seq_len == 276


def test_bf16_autocast_and_bf16_parameters_track_fp32():
    """fp32 master weights under bf16 autocast, and bf16 parameters (FSDP2 param_dtype), both run and agree."""
    gen = torch.Generator().manual_seed(5)
    model = randomize_(imf.build_model("demo"), generator=gen)
    z, t, r, y, omega, t_min, t_max = _inputs(model.cfg, 4, torch.float32, gen)
    u32, ut32 = model.forward_with_tangent(z, z, t, r, y, omega, t_min, t_max)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u16, ut16 = model.forward_with_tangent(z, z, t, r, y, omega, t_min, t_max)
    assert _rel(u16.float(), u32) < 0.05 and _rel(ut16.float(), ut32) < 0.05
    model.to(torch.bfloat16)
    ub, utb = model.forward_with_tangent(z.bfloat16(), z.bfloat16(), t, r, y, omega, t_min, t_max)
    assert ub.dtype == torch.bfloat16
    assert _rel(ub.float(), u32) < 0.05 and _rel(utb.float(), ut32) < 0.05


@pytest.mark.parametrize("name", ["demo", "iMF-XL/2", "MF-B/2"])
def test_meta_construction_with_init_weights_equals_eager(name):
    """build_model(device="meta") + to_empty + init_weights() gives the eager weights and buffers for the same
    seed. The materialised storage is NaN-filled first, so anything init_weights misses shows up."""
    torch.manual_seed(7)
    eager = imf.build_model(name, **TINY[name])
    torch.manual_seed(7)
    meta = imf.build_model(name, device="meta", **TINY[name])
    assert all(p.is_meta for p in meta.parameters()) and all(b.is_meta for b in meta.buffers())
    meta.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*meta.parameters(), *meta.buffers()]:
            tensor.fill_(float("nan"))
    meta.init_weights()
    sd_eager, sd_meta = eager.state_dict(), meta.state_dict()
    assert sd_eager.keys() == sd_meta.keys()
    for k in sd_eager:
        assert torch.equal(sd_eager[k], sd_meta[k]), k
    buffers = dict(eager.named_buffers())
    assert buffers and all(torch.equal(buffers[k], b) for k, b in meta.named_buffers())
    # the weights are random (a different seed differs) and the zero-initialised parts are zero
    torch.manual_seed(8)
    other = imf.build_model(name, **TINY[name])
    assert not torch.equal(other.patch_embed.weight, eager.patch_embed.weight)
    gates = [p for n, p in eager.named_parameters() if n.endswith(("gate_attn", "gate_mlp", "ada.weight"))]
    assert gates and all(not g.any() for g in gates)


def test_swiglu_padding_is_zero_after_init():
    """hidden 100 pads each SwiGLU half to 128 units: the padded rows / columns start (and stay) zero."""
    for device in ("cpu", "meta"):
        model = imf.build_model("iMF-B/2", device=device, **{**TINY["iMF-B/2"], "mlp_hidden": 100})
        if device == "meta":
            model.to_empty(device="cpu")
            model.init_weights()
        for blk in [*model.trunk, *model.u_blocks, *model.v_blocks]:
            assert blk.hidden_padded == 128
            assert not blk.fc12.weight.view(2, 128, -1)[:, 100:].any() and not blk.fc3.weight[:, 100:].any()
            assert blk.fc12.weight.view(2, 128, -1)[:, :100].abs().amin(dim=-1).gt(0).all()
