"""Evaluation as the official code measures it: uint8 conversion, sample set, reference statistics, latent
normalisation of converted models."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from imf.evaluate.options import EvalError
from imf.evaluate.sampling import CONVENTIONS, official_labels_of, official_noise_of, to_uint8_rounded
from imf.evaluate.scorers import load_reference
from imf.vae import LatentDecoder, official_latent_norm


def test_rounded_uint8_is_the_official_torch_conversion():
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.rand(2, 3, 5, 5, generator=g).flatten() * 2.4 - 1.2, torch.tensor([-1.0, 1.0, 0.0, 2 * 127.5 / 255 - 1])]
    )
    # evaluate.py: np.round(np.clip(((x + 1) / 2) * 255, 0, 255)).astype(np.uint8)
    want = np.round(np.clip(((x.numpy().astype(np.float32) + 1) / 2) * 255, 0, 255)).astype(np.uint8)
    assert np.array_equal(to_uint8_rounded(x).numpy(), want)
    assert CONVENTIONS["official-torch"].uint8(x).dtype == torch.uint8
    # the engine (ADM / official JAX) conversion truncates 127.5 x + 128 = 255 (x + 1) / 2 + 0.5: the same
    # integers except at exact ties (round-half-even against half-up), which random values do not hit
    engine = CONVENTIONS["engine"].uint8(x).numpy()
    assert np.array_equal(engine, want)
    tie = torch.tensor([2 * 126.5 / 255 - 1], dtype=torch.float64)  # 255 (x + 1) / 2 = 126.5 exactly in fp64
    assert to_uint8_rounded(tie).item() == 126 and CONVENTIONS["engine"].uint8(tie).item() == 127


def test_official_sample_set():
    num, k = 20, 5
    labels = official_labels_of(range(num), num, k)
    assert labels.tolist() == [c for c in range(k) for _ in range(num // k)]  # np.arange(K).repeat(num // K)
    idx = range(3, 7)
    noise = official_noise_of(idx, 42, (2, 3, 3))
    for row, i in enumerate(idx):  # BatchGenerator(seeds=sample_idx ^ seed): one CPU generator per sample
        gen = torch.Generator("cpu").manual_seed(int(i ^ 42) % (1 << 32))
        assert torch.equal(noise[row], torch.randn((2, 3, 3), generator=gen))


def test_reference_stats_of_both_official_evaluations(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4) * 2
    np.savez(tmp_path / "torch.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "jax.npz", ref_mu=mu, ref_sigma=sigma)
    for name in ("torch", "jax"):
        ref = load_reference(tmp_path / f"{name}.npz")
        assert np.array_equal(ref["mu"], mu) and np.array_equal(ref["sigma"], sigma)
    np.savez(tmp_path / "neither.npz", m=mu)
    with pytest.raises(EvalError, match=r"lacks \['mu', 'sigma'\]"):
        load_reference(tmp_path / "neither.npz")


def test_official_latent_normalisation_decodes_as_the_official_wrapper():
    vae = torch.nn.Linear(1, 1)
    vae.config = types.SimpleNamespace(latent_channels=4, scaling_factor=0.18215, shift_factor=None)
    dec = LatentDecoder(vae, official_latent_norm())
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    # VAEWrapper.decode: latents * std + mean, then vae.decode (no scaling factor)
    mean = torch.tensor([0.86488, -0.27787343, 0.21616915, 0.3738409]).view(-1, 1, 1)
    std = torch.tensor([4.85503674, 5.31922414, 3.93725398, 3.9870003]).view(-1, 1, 1)
    assert torch.allclose(dec.unnormalize(x), x * std + mean, rtol=1e-6, atol=1e-6)


def test_converted_model_evaluates_as_the_official_torch_script(tmp_path):
    """A converted official checkpoint through imf.evaluate without a dataset: the samples it writes are the
    official script's: class-block labels, per-sample seeds ``i ^ seed``, ``vae.decode(x * std + mean)``, rounded
    uint8."""
    from conftest import tiny_vae
    from official_reference import imf_official_weights

    from imf.convert.cli import entry
    from imf.evaluate import parse_args, run
    from imf.evaluate.loading import load_checkpoint
    from imf.sample import generate
    from imf.vae import load_vae

    tiny_vae(tmp_path / "vae")
    spec = dict(dim=32, heads=2, depth=2, head_depth=1, hidden=85, patch=2, channels=4, classes=3, tokens=(2, 1, 1, 1))
    w = imf_official_weights(torch.Generator().manual_seed(0), v_heads=False, dtype=torch.float32, freq=16, **spec)
    torch.save(w, tmp_path / "iMF.pth")
    assert entry([str(tmp_path / "iMF.pth"), "--out", str(tmp_path / "m.safetensors"), "--input-size", "4"]) == 0

    class Pixels:
        name = "pixels"

        def features(self, images):
            return {"x": images.float().cpu()}

        def score(self, features, labels):
            return {"label_sum": float(labels.sum())}

    argv = ["--ckpt", str(tmp_path / "m.safetensors"), "--num", "6", "--batch", "4", "--vae", str(tmp_path / "vae")]
    argv += ["--convention", "official-torch", "--seed", "42", "--omega", "2.0", "--interval", "0.2:0.8"]
    report = run(parse_args([*argv, "--out", str(tmp_path / "eval"), "--no-progress"]), scorer=Pixels())
    cell = report["cells"][0]
    assert cell["metrics"]["label_sum"] == 0 + 0 + 1 + 1 + 2 + 2
    got = np.load(cell["npz"])["arr_0"]
    # the official evaluate.py, step by step, on the converted model
    model = load_checkpoint(tmp_path / "m.safetensors").model
    labels = torch.arange(3).repeat_interleave(2)
    noise = torch.stack([torch.randn((4, 4, 4), generator=torch.Generator().manual_seed(i ^ 42)) for i in range(6)])
    with torch.no_grad():
        z = generate(model, labels, 2.0, 0.2, 0.8, steps=1, noise=noise)
        mean = torch.tensor([0.86488, -0.27787343, 0.21616915, 0.3738409]).view(1, -1, 1, 1)
        std = torch.tensor([4.85503674, 5.31922414, 3.93725398, 3.9870003]).view(1, -1, 1, 1)
        images = load_vae(tmp_path / "vae").decode(z * std + mean).sample
    want = np.round(np.clip((images.permute(0, 2, 3, 1).numpy() + 1) / 2 * 255, 0, 255)).astype(np.uint8)
    # equal here; one level of slack for batch-size-dependent CPU matmul rounding on other machines
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1 and np.mean(got == want) > 0.99
