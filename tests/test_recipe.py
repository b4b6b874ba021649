"""The official training recipe (docs/recipe.md): initialisation statistics per layer type, class-dropout
placement, MF guidance and every default against the official value.

Every expected number is written here from the official code (Lyy-iiis/imeanflow branch main: configs/default.py,
configs/train_config.yml, imf.py, models/imfDiT.py, models/embedder.py, models/torch_models.py; Gsunshine/meanflow:
configs/default.py, configs/run_b4.yml, meanflow.py, models/models_dit.py, models/torch_models.py), never read
from the code under test. Fixed seeds; the statistical bounds are several standard errors wide and still far
from the alternative they rule out (e.g. the Xavier init the engine had before).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import imf
from imf.config import LossConfig, network_differences
from imf.loss import imf_loss, mf_loss, sample_training_inputs
from imf.train.args import build_config, read_file

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _from_file(name: str):
    return build_config(read_file(str(CONFIGS / name)), file=name)


def _std_close(w: torch.Tensor, want: float, rel: float) -> None:
    w = w.detach().double().flatten()
    assert abs(w.std().item() / want - 1) < rel, (w.std().item(), want)
    assert abs(w.mean().item()) < 4 * want / math.sqrt(w.numel()), w.mean().item()


def _normal(w: torch.Tensor, std: float) -> None:
    """``w`` looks like N(0, std^2): KS test on up to 20000 entries (a uniform of the same std fails it)."""
    x = w.detach().double().flatten()[:20000].numpy() / std
    assert stats.kstest(x, "norm").pvalue > 1e-4


def _xavier_uniform(w: torch.Tensor, fan_in: int, fan_out: int) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    assert w.abs().max().item() <= bound
    _std_close(w, bound / math.sqrt(3.0), 0.03)
    assert (
        stats.kstest(w.detach().double().flatten()[:20000].numpy(), "uniform", args=(-bound, 2 * bound)).pvalue > 1e-4
    )


def _zero(*tensors) -> None:
    for t in tensors:
        assert not t.detach().any()


def test_imf_official_init_per_layer_type():
    """iMF-B/2: block linears N(0, (0.32 / sqrt(fan_in))^2) (attention 0.0115, not the 0.036 of Xavier), condition
    MLPs N(0, 1 / fan_in), class table and tokens N(0, 1 / 768), Xavier patch embedding, zero heads and gates."""
    torch.manual_seed(0)
    m = imf.build_model("iMF-B/2")
    d = 768
    blocks = [*m.trunk, *m.u_blocks, *m.v_blocks]
    assert len(blocks) == 20
    for blk in (blocks[0], blocks[-1]):
        for w in (blk.qkv.weight, blk.proj.weight, blk.fc12.weight):  # q, k, v, out, SwiGLU w1 and w3: fan_in 768
            _std_close(w, 0.32 / math.sqrt(d), 0.01)
        _std_close(blk.fc3.weight, 0.32 / math.sqrt(2048), 0.01)  # SwiGLU w2: fan_in = int(8 / 3 * 768) = 2048
        _normal(blk.qkv.weight, 0.32 / math.sqrt(d))
        _normal(blk.fc3.weight, 0.32 / math.sqrt(2048))
        _zero(blk.gate_attn, blk.gate_mlp)
        for norm in (blk.norm1, blk.norm2, blk.q_norm, blk.k_norm):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    for emb in (m.omega_embed, m.t_min_embed, m.t_max_embed, m.time_embed):
        _std_close(emb.fc1.weight, 1 / math.sqrt(256), 0.01)
        _std_close(emb.fc2.weight, 1 / math.sqrt(d), 0.01)
        _normal(emb.fc1.weight, 1 / math.sqrt(256))
        _zero(emb.fc1.bias, emb.fc2.bias)
    _std_close(m.class_embed.weight, 1 / math.sqrt(d), 0.01)
    _normal(m.class_embed.weight, 1 / math.sqrt(d))
    tokens = torch.cat([p for p in m.cond_tokens.values()])
    assert tokens.shape == (20, d)
    _std_close(tokens, 1 / math.sqrt(d), 0.03)
    _xavier_uniform(m.patch_embed.weight, 2 * 2 * 4, d)
    _zero(m.patch_embed.bias)
    for head in (m.u_out, m.v_out):
        _zero(head.linear.weight, head.linear.bias)
        assert torch.equal(head.norm.weight, torch.ones(d))


def test_imf_official_init_uses_the_unpadded_swiglu_width():
    """W3's fan_in is the SwiGLU hidden width (official int(8/3 dim), 2730 at L/XL), not the padded 2752: with
    hidden 100 (padded to 128) the live columns have std 0.32 / 10, not 0.32 / sqrt(128) (13% apart)."""
    torch.manual_seed(1)
    m = imf.build_model("iMF-B/2", dim=96, heads=4, depth=2, head_depth=1, mlp_hidden=100)
    for blk in m.trunk:
        _std_close(blk.fc3.weight[:, :100], 0.32 / 10, 0.05)
        _zero(blk.fc3.weight[:, 100:], blk.fc12.weight.view(2, 128, 96)[:, 100:])


def test_mf_official_init_per_layer_type():
    """MF-B/2: Xavier-uniform block linears (the fused qkv as one 768 -> 2304 matrix) with zero biases, time MLPs
    and class table N(0, 0.02^2), Xavier patch embedding, adaLN and final projections zero."""
    torch.manual_seed(2)
    m = imf.build_model("MF-B/2")
    d = 768
    for blk in (m.blocks[0], m.blocks[-1]):
        _xavier_uniform(blk.qkv.weight, d, 3 * d)
        _xavier_uniform(blk.proj.weight, d, d)
        _xavier_uniform(blk.fc1.weight, d, 4 * d)
        _xavier_uniform(blk.fc2.weight, 4 * d, d)
        _zero(blk.qkv.bias, blk.proj.bias, blk.fc1.bias, blk.fc2.bias, blk.ada.weight, blk.ada.bias)
    for emb in (m.t_embed, m.h_embed):
        for lin in (emb.fc1, emb.fc2):
            _std_close(lin.weight, 0.02, 0.01)
            _normal(lin.weight, 0.02)
            _zero(lin.bias)
    _std_close(m.class_embed.weight, 0.02, 0.01)
    _xavier_uniform(m.patch_embed.weight, 16, d)
    _zero(m.patch_embed.bias, m.final_ada.weight, m.final_ada.bias, m.final.weight, m.final.bias)


def test_xavier_init_is_the_named_alternative():
    """``init="xavier"``: Xavier-uniform block linears (the engine's earlier init), selectable by name only."""
    torch.manual_seed(3)
    m = imf.build_model("iMF-B/2", dim=96, heads=4, depth=2, head_depth=1, init="xavier")
    _xavier_uniform(m.trunk[0].qkv.weight, 96, 3 * 96)
    _std_close(m.class_embed.weight, 0.02, 0.05)
    with pytest.raises(ValueError, match="init must be 'official' or 'xavier', got 'he'"):
        imf.build_model("iMF-B/2", init="he")


def test_init_does_not_make_another_network():
    """A checkpoint started with one init loads into a model configured with the other (the weights replace the
    init); a real difference is still named."""
    official = dataclasses.asdict(imf.config.preset("demo", init="official"))
    xavier = dataclasses.asdict(imf.config.preset("demo"))
    assert xavier["init"] == "xavier" and network_differences(official, xavier) == []
    wider = dataclasses.asdict(imf.config.preset("demo", dim=64, init="official"))
    assert network_differences(wider, xavier) == [f"dim 64 (checkpoint) vs {xavier['dim']}"]


def test_class_dropout_drops_the_first_binomial_count_and_r_equal_t_comes_first():
    """Official ``sample_tr`` / ``cond_drop``: the first int(B * fm_fraction) samples have r = t, and the labels of
    the first K ~ Binomial(B, p) samples are dropped (so, with K <= n_fm, only r = t samples). The sampler returns
    that order rotated by n_fm (the FM block last, so the tangent samples lead): position i is official sample
    (i + n_fm) mod B."""
    gen = torch.Generator().manual_seed(4)
    B, counts = 32, []
    official = (torch.arange(B) + 16) % B
    for _ in range(3000):
        t, r, omega, t_min, t_max, drop = sample_training_inputs(B, LossConfig(), gen)
        k = int(drop.sum())
        assert torch.equal(drop, official < k)
        assert torch.equal(r[16:], t[16:]) and (r[:16] < t[:16]).all()
        assert (t_min[16:] == 0).all() and (t_max[16:] == 1).all()
        counts.append(k)
    # K ~ Binomial(32, 0.1): chi-square over K = 0..6 and >= 7 (expected count per cell >= 49)
    observed = np.bincount(np.minimum(counts, 7), minlength=8)
    p = stats.binom.pmf(np.arange(7), B, 0.1)
    expected = 3000 * np.append(p, 1 - p.sum())
    assert stats.chisquare(observed, expected).pvalue > 1e-4
    # MF: int(10 * 0.75) = 7 samples with r = t (the official truncation; rounding would give 8)
    t, r, *_ = sample_training_inputs(10, LossConfig.for_method("mf"), gen)
    assert torch.equal(r[3:], t[3:]) and (r[:3] < t[:3]).all()


TINY_IMF = dict(dim=32, heads=2, depth=3, head_depth=1, input_size=4, num_classes=5, freq_dim=16, v_head="boundary")


def test_dropped_samples_keep_the_true_label_in_the_tangent():
    """Official iMF computes the guidance (and the JVP tangent v_c) before dropping labels: a dropped sample's tangent
    is v(z_t | h = 0, y, omega_eff) with its true label y, while u is evaluated at the null class."""
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = imf.build_model("iMF-B/2", **TINY_IMF).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    n = 6
    x = torch.randn(n, 4, 4, 4, generator=gen, dtype=torch.float64)
    e = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (n,), generator=gen)
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5 + 0.4
    r = t * 0.5
    omega = torch.full((n,), 3.0, dtype=torch.float64)
    t_min, t_max = torch.zeros_like(t), torch.ones_like(t)
    drop = torch.ones(n, dtype=torch.bool)
    loss, metrics = imf_loss(model, x, y, e, t, r, omega, t_min, t_max, drop)
    tb = t.view(-1, 1, 1, 1)
    z, v_t = (1 - tb) * x + tb * e, e - x
    null = torch.full_like(y, 5)

    def expected(tangent_label):
        with torch.no_grad():
            v_c = model.velocity(z, t, t, tangent_label, omega, t_min, t_max)
            u, du = torch.func.jvp(lambda zz, tt: model(zz, tt, r, null, omega, t_min, t_max), (z, t), (v_c, t * 0 + 1))
        sq = (u + (t - r).view(-1, 1, 1, 1) * du - v_t).pow(2).flatten(1).sum(1)  # dropped: target v_t
        return (sq / (sq + 0.01)).mean().item(), sq.mean().item() / 64

    (want_loss, want_mse), (_, null_mse) = expected(y), expected(null)
    assert abs(loss.item() - want_loss) < 1e-10
    assert abs(metrics["mse_V"].item() - want_mse) < 1e-10 * want_mse
    assert abs(metrics["mse_V"].item() - null_mse) > 1e-5 * want_mse  # 6e-4 relative here


def test_mf_trains_with_the_official_guidance_by_default():
    """Official MF: omega 1, kappa 0.5 on t in [0, 1] (effective scale omega / (1 - kappa) = 2), 25% r != t. The
    default MF loss therefore differs from the unguided one (kappa 0) on the same inputs."""
    cfg = LossConfig.for_method("mf")
    assert (cfg.omega, cfg.kappa, cfg.t_start, cfg.t_end, cfg.fm_fraction) == (1.0, 0.5, 0.0, 1.0, 0.75)
    assert cfg.omega / (1 - cfg.kappa) == 2.0
    for name in ("MF-B/2", "MF-XL/2"):
        train = build_config(overrides={"preset": name})
        assert train.loss_config() == cfg
    from_file = _from_file("mf_b2.yaml")
    assert from_file.loss_config() == cfg
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    model = imf.build_model("MF-B/2", dim=32, heads=2, depth=2, input_size=4, num_classes=5, freq_dim=16).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    x = torch.randn(8, 4, 4, 4, generator=gen, dtype=torch.float64)
    e = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (8,), generator=gen)
    t, r, *_ = sample_training_inputs(8, cfg, gen)
    guided = mf_loss(model, x, y, e, t.double(), r.double(), cfg=cfg)[1]["mse_u"].item()
    plain = mf_loss(model, x, y, e, t.double(), r.double(), cfg=LossConfig.for_method("mf", kappa=0.0))[1][
        "mse_u"
    ].item()
    assert abs(guided - plain) > 1e-5 * plain
    with pytest.raises(ValueError, match=r"kappa must be in \[0, 1\), got 1.0"):
        LossConfig.for_method("mf", kappa=1.0)


# (depth, dim, heads) of the official imfDiT_{B,M,L,XL}_2 (models/imfDiT.py) and DiT_{B,XL}_2 (models_dit.py)
OFFICIAL_SHAPES = {
    "iMF-B/2": (12, 768, 12),
    "iMF-M/2": (24, 768, 12),
    "iMF-L/2": (32, 1024, 16),
    "iMF-XL/2": (48, 1024, 16),
    "MF-B/2": (12, 768, 12),
    "MF-XL/2": (28, 1152, 16),
}


@pytest.mark.parametrize("name", list(OFFICIAL_SHAPES))
def test_presets_match_the_official_networks(name):
    cfg = imf.preset(name)
    assert (cfg.depth, cfg.dim, cfg.heads) == OFFICIAL_SHAPES[name]
    assert (cfg.input_size, cfg.in_channels, cfg.patch_size, cfg.num_classes) == (32, 4, 2, 1000)
    assert (cfg.freq_dim, cfg.time_scale, cfg.norm_eps, cfg.init) == (256, 1.0, 1e-6, "official")
    if cfg.arch == "imf":
        tokens = (cfg.class_tokens, cfg.omega_tokens, cfg.t_min_tokens, cfg.t_max_tokens, cfg.time_tokens)
        assert tokens == (8, 4, 2, 2, 4) and cfg.head_depth == 8 and cfg.v_head == "aux"
        assert cfg.hidden == int(cfg.dim * 8 / 3) and cfg.rope_theta == 10000.0
    else:
        assert cfg.hidden == 4 * cfg.dim


def test_loss_defaults_match_the_official_configs():
    imf_cfg = LossConfig.for_method("imf")
    assert (imf_cfg.p_mean, imf_cfg.p_std, imf_cfg.fm_fraction, imf_cfg.class_drop) == (-0.4, 1.0, 0.5, 0.1)
    assert (imf_cfg.omega_beta, imf_cfg.omega_s_max) == (1.0, 7.0)  # cfg_beta 1.0, sample_cfg_scale s_max 7.0
    assert imf_cfg.t_min_range == (0.0, 0.5) and imf_cfg.t_max_range == (0.5, 1.0)
    assert (imf_cfg.adp_eps, imf_cfg.adp_power) == (0.01, 1.0)
    mf_cfg = LossConfig.for_method("mf")
    assert (mf_cfg.p_mean, mf_cfg.p_std, mf_cfg.class_drop, mf_cfg.adp_eps, mf_cfg.adp_power) == (
        -0.4,
        1.0,
        0.1,
        0.01,
        1.0,
    )


@pytest.mark.parametrize(
    "source, batch, epochs, warmup_epochs",
    [
        # iMF train_config.yml: batch 1024, 640 epochs, 10 warm-up epochs then constant
        ({"preset": "iMF-B/2"}, 1024, 640, 10),
        ("imf_b2.yaml", 1024, 640, 10),
        # MF run_b4.yml + default.py: batch 256, 240 epochs, constant LR from the first step (no warm-up)
        ({"preset": "MF-B/2"}, 256, 240, 0),
        ({"preset": "MF-XL/2"}, 256, 240, 0),
        ("mf_b2.yaml", 256, 240, 0),
    ],
)
def test_training_defaults_match_the_official_configs(source, batch, epochs, warmup_epochs):
    if isinstance(source, str):
        cfg = _from_file(source)
    else:
        cfg = build_config(overrides=source)
    assert (cfg.data.batch_size, cfg.epochs, cfg.schedule.warmup_epochs) == (batch, epochs, warmup_epochs)
    assert cfg.schedule.decay == "constant" and cfg.schedule.warmup_steps is None
    o = cfg.optim
    # optax.adamw(lr 1e-4, b1 0.9 (optax default), b2 adam_b2 0.95, eps 1e-8 (optax default), weight_decay 0),
    # no gradient clipping in either optimizer chain
    assert (o.lr, tuple(o.betas), o.eps, o.weight_decay, o.grad_clip) == (1e-4, (0.9, 0.95), 1e-8, 0.0, 0.0)
    # ema_type 'const', ema_val 0.9999 from the first update
    assert cfg.ema_decays[0] == 0.9999 and cfg.ema_warmup is False


def test_every_model_and_loss_field_has_its_help_in_train_help(capsys):
    """One line of help per ModelConfig / LossConfig field, shown by ``python -m imf.train --help``."""
    import dataclasses

    from imf.config import ModelConfig
    from imf.train.cli import main

    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for cls, section in ((ModelConfig, "model"), (LossConfig, "loss")):
        for f in dataclasses.fields(cls):
            if section == "loss" and f.name == "method":
                continue  # follows from the preset's arch, not an option
            help_text = f.metadata.get("help", "")
            assert help_text and "\n" not in help_text, f.name
            assert f"--{section}.{f.name}" in out and " ".join(help_text.split()) in out, f.name


def test_expected_guidance_rows_follow_the_dropout_placement():
    """imf.flops counts v_u rows with the dropped samples taken first (FM samples first): its split of the expected
    drops equals scipy's Binomial sums and the sampler's empirical split."""
    from imf.flops import dropped_split

    B, p, n_fm = 10, 0.3, 5
    k = np.arange(B + 1)
    want_first = float((stats.binom.pmf(k, B, p) * np.minimum(k, n_fm)).sum())
    first, after = dropped_split(B, p, n_fm)
    assert abs(first - want_first) < 1e-12 and abs(after - (B * p - want_first)) < 1e-12
    gen = torch.Generator().manual_seed(7)
    drops = torch.stack([sample_training_inputs(B, LossConfig(class_drop=p), gen)[5] for _ in range(4000)]).double()
    emp_first, emp_after = drops[:, B - n_fm :].sum(1), drops[:, : B - n_fm].sum(1)  # the FM block comes last
    assert abs(emp_first.mean().item() - first) < 4 * emp_first.std().item() / math.sqrt(4000)
    assert abs(emp_after.mean().item() - after) < 4 * emp_after.std().item() / math.sqrt(4000)
    assert after > 0.05  # K > 5 happens here, so the split matters (independent drops would give 1.5 / 1.5)
