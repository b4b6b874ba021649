"""imf.convert: official iMF / MF weights give the same function here as in the official code.

The official side is :mod:`official_reference` (written from the official code's facts, independent of
imf.model and imf.convert); the weights are random, under the documented official names and shapes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from official_reference import (
    imf_official_forward,
    imf_official_generate,
    imf_official_weights,
    mf_official_forward,
    mf_official_params,
    torch_to_flax_imf,
)

import imf
from imf.convert import ConvertError, from_official, to_official
from imf.sample import generate

# two tiny official-layout iMF sizes: hidden 85 (int(32 * 8/3), padded to 128 here) and 64 (no padding)
IMF_SIZES = {
    "d32": dict(
        dim=32,
        heads=2,
        depth=3,
        head_depth=1,
        hidden=85,
        patch=2,
        channels=3,
        classes=5,
        tokens=(3, 2, 1, 2),
        freq=16,
        input_size=8,
    ),
    "d48": dict(
        dim=48,
        heads=3,
        depth=4,
        head_depth=2,
        hidden=64,
        patch=1,
        channels=2,
        classes=4,
        tokens=(1, 1, 2, 3),
        freq=8,
        input_size=4,
    ),
}


def _official(size, v_heads=True, seed=0):
    spec = dict(IMF_SIZES[size])
    input_size = spec.pop("input_size")
    w = imf_official_weights(torch.Generator().manual_seed(seed), v_heads=v_heads, **spec)
    return w, spec, input_size


def _conditions(batch, cfg, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype) * 0.9 + 0.1
    r = t * torch.rand(batch, generator=g, dtype=dtype)
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    omega = 1 + 6 * torch.rand(batch, generator=g, dtype=dtype)
    t_min, t_max = (
        0.5 * torch.rand(batch, generator=g, dtype=dtype),
        0.5 + 0.5 * torch.rand(batch, generator=g, dtype=dtype),
    )
    return z, t, r, y, omega, t_min, t_max


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _ours(cfg, weights, dtype):
    model = imf.build_model(cfg)
    model.load_state_dict(weights)
    return model.to(dtype).eval()


@pytest.mark.parametrize("size", list(IMF_SIZES))
@pytest.mark.parametrize("v_heads", [True, False], ids=["training_form", "eval_form"])
def test_imf_u_v_match_official(size, v_heads):
    w, spec, input_size = _official(size, v_heads)
    cfg, weights = from_official(w, input_size=input_size)
    assert cfg.v_head == ("aux" if v_heads else "boundary")
    assert (cfg.dim, cfg.heads, cfg.depth, cfg.head_depth, cfg.hidden) == (
        spec["dim"],
        spec["heads"],
        spec["depth"],
        spec["head_depth"],
        spec["hidden"],
    )
    assert (cfg.class_tokens, cfg.omega_tokens, cfg.t_min_tokens, cfg.t_max_tokens, cfg.time_tokens) == (
        spec["tokens"][0],
        spec["tokens"][1],
        spec["tokens"][2],
        spec["tokens"][2],
        spec["tokens"][3],
    )
    z, t, r, y, omega, t_min, t_max = _conditions(5, cfg, torch.float64)
    u_ref, v_ref = imf_official_forward(
        w, z, t, t - r, omega, t_min, t_max, y, heads=spec["heads"], patch=spec["patch"]
    )
    model = _ours(cfg, weights, torch.float64)
    with torch.no_grad():
        u = model(z, t, r, y, omega, t_min, t_max)
        v = model.velocity(z, t, r, y, omega, t_min, t_max)
    # fp64 model vs fp64 reference: only our fp32 constant tables (RoPE cos/sin, sinusoid frequencies) differ
    assert _rel(u, u_ref) < 1e-6
    if v_heads:
        assert _rel(v, v_ref) < 1e-6
    # fp32: the converted model within twice the error of the official math itself in fp32 (+ a floor)
    m32 = _ours(cfg, weights, torch.float32)
    f32 = lambda *a: [v.float() if v.is_floating_point() else v for v in a]
    with torch.no_grad():
        u32 = m32(*f32(z, t, r, y, omega, t_min, t_max))
    w32 = {k: v.float() for k, v in w.items()}
    u_ref32, _ = imf_official_forward(
        w32, *f32(z, t, t - r, omega, t_min, t_max, y), heads=spec["heads"], patch=spec["patch"]
    )
    assert _rel(u32.double(), u_ref) <= 2 * _rel(u_ref32.double(), u_ref) + 1e-7


@pytest.mark.parametrize("steps", [1, 2])
def test_imf_samples_match_official(steps):
    w, spec, input_size = _official("d32", v_heads=False)
    cfg, weights = from_official(w, input_size=input_size)
    model = _ours(cfg, weights, torch.float64)
    y = torch.tensor([0, 3, 5, 1])
    noise = torch.randn(
        4, cfg.in_channels, input_size, input_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    kw = dict(heads=spec["heads"], patch=spec["patch"])
    ref = imf_official_generate(w, noise, y, 4.0, 0.3, 0.7, steps, **kw)
    ref32 = imf_official_generate({k: v.float() for k, v in w.items()}, noise.float(), y, 4.0, 0.3, 0.7, steps, **kw)
    with torch.no_grad():
        ours = generate(model.float(), y, 4.0, 0.3, 0.7, steps=steps, noise=noise.float())
    assert _rel(ours.double(), ref) <= 2 * _rel(ref32.double(), ref) + 1e-7


def test_flax_tree_gives_the_same_weights():
    w, _, input_size = _official("d32")
    cfg_t, from_torch = from_official(w, input_size=input_size)
    cfg_f, from_flax = from_official(torch_to_flax_imf(w), input_size=input_size)
    assert cfg_t == cfg_f
    assert from_torch.keys() == from_flax.keys()
    assert all(torch.equal(from_torch[k], from_flax[k]) for k in from_torch)


def test_round_trip_is_bitwise():
    for v_head in ("aux", "boundary"):
        model = imf.build_model("demo", v_head=v_head)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            for blk in [*model.trunk, *model.u_blocks, *getattr(model, "v_blocks", [])]:
                blk.zero_padding_()
        official = to_official(model, training_form=v_head == "aux")
        cfg, back = from_official(official, input_size=model.cfg.input_size)
        assert cfg == dataclasses.replace(model.cfg, init="official")  # weights read back as the official's
        ours = model.state_dict()
        assert back.keys() == ours.keys()
        assert all(torch.equal(back[k], ours[k]) for k in ours), v_head


def test_to_official_eval_form_matches_the_official_forward():
    """Ours -> official eval form (what iMeanFlow loads) computes our u in the official reference."""
    cfg = dataclasses.replace(imf.config.PRESETS["demo"], dim=40, heads=4, mlp_hidden=None, input_size=6, num_classes=3)
    model = imf.build_model(cfg, v_head="aux").double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for blk in [*model.trunk, *model.u_blocks, *model.v_blocks]:
            blk.zero_padding_()
    official = to_official(model)
    assert not any(k.startswith("net.v_heads.") for k in official)
    assert "net.v_final_layer.linear._flax_linear.weight" in official
    z, t, r, y, omega, t_min, t_max = _conditions(3, model.cfg, torch.float64, seed=5)
    u_ref, _ = imf_official_forward(official, z, t, t - r, omega, t_min, t_max, y, heads=4, patch=cfg.patch_size)
    with torch.no_grad():
        u = model(z, t, r, y, omega, t_min, t_max)
    assert _rel(u, u_ref) < 1e-6


MF_SIZE = dict(dim=48, depth=2, hidden=96, patch=2, channels=4, classes=6, freq=16)


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_mf_matches_official_flax_model(steps):
    params = mf_official_params(torch.Generator().manual_seed(7), **MF_SIZE)
    cfg, weights = from_official(params, arch="mf", heads=4, input_size=8)
    assert (cfg.arch, cfg.dim, cfg.depth, cfg.hidden, cfg.freq_dim, cfg.num_classes) == ("mf", 48, 2, 96, 16, 6)
    model = _ours(cfg, weights, torch.float64)
    z, t, r, y, *_ = _conditions(4, cfg, torch.float64, seed=9)
    if steps == 0:
        with torch.no_grad():
            u = model(z, t, r, y)
        assert _rel(u, mf_official_forward(params, z, t, t - r, y, heads=4, patch=2)) < 1e-6
        return

    def official_samples(tree, dtype):
        x = z.to(dtype)
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=dtype)
        for k in range(steps):
            tk, rk = (torch.full((4,), float(v), dtype=dtype) for v in (times[k], times[k + 1]))
            x = x - (tk - rk)[:, None, None, None] * mf_official_forward(tree, x, tk, tk - rk, y, heads=4, patch=2)
        return x.double()

    as32 = lambda tree: {k: as32(v) for k, v in tree.items()} if isinstance(tree, dict) else tree.astype(np.float32)
    ref, ref32 = official_samples(params, torch.float64), official_samples(as32(params), torch.float32)
    with torch.no_grad():
        ours = generate(model.float(), y, steps=steps, noise=z.float()).double()
    assert _rel(ours, ref) <= 2 * _rel(ref32, ref) + 1e-7


def test_bad_state_dicts_are_one_clear_error():
    w, _, _ = _official("d32")
    with pytest.raises(ConvertError, match="missing keys"):
        from_official({k: v for k, v in w.items() if "u_heads.0.attn.k_proj" not in k})
    with pytest.raises(ConvertError, match="unexpected keys"):
        from_official({**w, "net.extra.weight": torch.zeros(2)})
    bad = dict(w)
    bad["net.shared_blocks.1.mlp.w2._flax_linear.weight"] = torch.zeros(32, 80)
    with pytest.raises(ConvertError, match=r"shared_blocks.1.mlp.w2._flax_linear.weight has shape \(32, 80\)"):
        from_official(bad)
    with pytest.raises(ConvertError, match="not preset 'iMF-B/2'"):
        from_official(w, preset="iMF-B/2")
    params = mf_official_params(torch.Generator().manual_seed(0), **MF_SIZE)
    with pytest.raises(ConvertError, match="MeanFlow .* read as arch='imf'"):
        from_official(params)
    with pytest.raises(ConvertError, match="iMF .* read as arch='mf'"):
        from_official(w, arch="mf")
