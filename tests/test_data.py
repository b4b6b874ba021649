"""Latent data: shard format + verify, torch loader (statistics, flips, sharding, determinism, resume),
DALI pipeline (bit-identical to the torch path), validation errors, imf.prepare with a tiny VAE, synthetic."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_vae

from imf.data import (
    DataError,
    LatentLoader,
    LoaderOptions,
    LoaderSettings,
    ShardWriter,
    SyntheticLatents,
    build_loader,
    check_dataset,
    main,
    shard_names,
)

HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali is not installed")


def _write_random(root: Path, n=96, shape=(4, 6, 6), num_classes=5, shard_size=40, flipped=False, seed=0):
    """Random moments: mean ~ N(mu_c, sd_c), std ~ U(0.2, 0.8) * c-dependent factor."""
    rng = np.random.default_rng(seed)
    c = shape[0]
    mu = np.linspace(-1.0, 2.0, c).reshape(1, c, 1, 1)
    sd = np.linspace(0.5, 3.0, c).reshape(1, c, 1, 1)
    with ShardWriter(root, latent_shape=shape, num_classes=num_classes, shard_size=shard_size, flipped=flipped) as w:
        for a in range(0, n, 17):
            b = min(17, n - a)
            m = mu + sd * rng.standard_normal((b, *shape))
            s = rng.uniform(0.2, 0.8, (b, *shape)) * sd
            y = rng.integers(0, num_classes, b)
            if flipped:
                w.add(m, s, y, m[..., ::-1] + 0.01, s[..., ::-1])
            else:
                w.add(m, s, y)
    return w.manifest


def _write_index(root: Path, n: int, shape=(1, 2, 3), shard_size=7, flipped=False):
    """std = 0 and mean[i] = i + a spatial pattern (view 1: -(i + 1) - pattern): every value identifies its
    sample, view and orientation."""
    pattern = np.arange(np.prod(shape[1:]), dtype=np.float64).reshape(shape[1:]) / 4.0  # exact in float16 up to i = 256
    with ShardWriter(root, latent_shape=shape, num_classes=n, shard_size=shard_size, flipped=flipped) as w:
        for i in range(n):
            m = np.full((1, *shape), float(i)) + pattern
            z = np.zeros((1, *shape))
            if flipped:
                w.add(m, z, [i], -m - 1.0, z)
            else:
                w.add(m, z, [i])
    return pattern


def _denorm(loader, x: torch.Tensor) -> np.ndarray:
    cm = loader.index.channel_mean.reshape(1, -1, 1, 1)
    cs = loader.index.channel_std.reshape(1, -1, 1, 1)
    return x.double().numpy() * cs + cm


def _take(it, k):
    return [next(it) for _ in range(k)]


# ---------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize("flipped", [False, True])
def test_writer_verify_roundtrip(tmp_path, flipped, capsys):
    man = _write_random(tmp_path, flipped=flipped)
    assert man["count"] == 96 and [s["count"] for s in man["shards"]] == [40, 40, 16]
    assert man["latent_shape"] == [4, 6, 6] and man["dtype"] == "float16" and man["num_classes"] == 5
    assert man["flipped"] is flipped and man["views"] == (2 if flipped else 1)
    assert json.loads((tmp_path / "manifest.json").read_text()) == man
    # statistics of the sampled latent, recomputed from the stored float16 moments
    mom = np.concatenate([np.load(tmp_path / s["moments"]) for s in man["shards"]]).astype(np.float64)
    assert mom.shape == (96, man["views"], 2, 4, 6, 6) and mom.dtype == np.float64
    m, s = mom[:, :, 0], mom[:, :, 1]
    mean = m.mean(axis=(0, 1, 3, 4))
    var = (m**2).mean(axis=(0, 1, 3, 4)) + (s**2).mean(axis=(0, 1, 3, 4)) - mean**2
    np.testing.assert_allclose(man["channel_mean"], mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(man["channel_std"], np.sqrt(var), rtol=1e-9)
    labels = np.concatenate([np.load(tmp_path / s["labels"]) for s in man["shards"]])
    assert labels.dtype == np.int64 and labels.shape == (96,)
    s = check_dataset(tmp_path, checksums=True)
    assert s["count"] == 96 and s["shards"] == 3 and s["checksums_verified"]
    assert main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "96 samples in 3 shards" in out


def test_writer_rejects_bad_input(tmp_path):
    w = ShardWriter(tmp_path / "a", latent_shape=(4, 2, 2), num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        w.add(np.zeros((2, 4, 2, 3)), np.zeros((2, 4, 2, 3)), [0, 1])
    with pytest.raises(ValueError, match="labels"):
        w.add(np.zeros((2, 4, 2, 2)), np.zeros((2, 4, 2, 2)), [0, 3])
    with pytest.raises(ValueError, match="flipped"):
        w.add(
            np.zeros((1, 4, 2, 2)),
            np.zeros((1, 4, 2, 2)),
            [0],
            np.zeros((1, 4, 2, 2)),
            np.zeros((1, 4, 2, 2)),
        )
    _write_random(tmp_path / "b", n=10)
    with pytest.raises(DataError, match="already holds"):
        ShardWriter(tmp_path / "b", latent_shape=(4, 6, 6), num_classes=5)


def test_writer_resume_keeps_complete_shards(tmp_path):
    rng = np.random.default_rng(1)
    m, s, y = rng.normal(size=(25, 2, 3, 3)), rng.uniform(size=(25, 2, 3, 3)), rng.integers(0, 4, 25)
    kw = dict(latent_shape=(2, 3, 3), num_classes=4, shard_size=10, fingerprint="x")
    ref = ShardWriter(tmp_path / "ref", **kw)
    ref.add(m, s, y)
    ref.close()
    w = ShardWriter(tmp_path / "r", **kw)
    w.add(m[:15], s[:15], y[:15])  # shard 0 complete, 5 samples buffered: "interrupted" here
    (tmp_path / "r" / shard_names(1)[0]).write_bytes(b"partial garbage")  # a stale partial shard file
    w2 = ShardWriter(tmp_path / "r", resume=True, **kw)
    assert w2.count == 10
    assert not (tmp_path / "r" / shard_names(1)[0]).exists()
    w2.add(m[10:], s[10:], y[10:])
    man = w2.close()
    assert man["shards"] == ref.manifest["shards"] and man["channel_std"] == ref.manifest["channel_std"]
    other = ShardWriter(tmp_path / "r", resume=True, **{**kw, "fingerprint": "y"})
    assert other.count == 0  # a different fingerprint keeps nothing


# ---------------------------------------------------------------------------------------------- torch loader


def test_normalised_statistics(tmp_path):
    _write_random(tmp_path, n=600, shape=(4, 8, 8), shard_size=256)
    loader = LatentLoader(tmp_path, batch_size=100, num_workers=0)
    xs, ys = zip(*_take(iter(loader), loader.steps_per_epoch), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == torch.float32 and x.shape == (600, 4, 8, 8) and y.dtype == torch.int64
    # 600 * 64 samples per channel: standard error of the mean ~0.005, of the std ~0.004
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.03
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.03
    assert int(y.min()) >= 0 and int(y.max()) < 5


def test_eps_is_resampled_each_epoch(tmp_path):
    _write_index(tmp_path, 12)
    man = json.loads((tmp_path / "manifest.json").read_text())
    # std := 1 so x depends on eps (checksums are not checked at startup, only sizes and shapes)
    s0 = man["shards"][0]
    mom = np.load(tmp_path / s0["moments"])
    mom[:, :, 1] = 1.0
    np.save(tmp_path / s0["moments"], mom)
    loader = LatentLoader(tmp_path, batch_size=7, num_workers=0, flip=False)
    it = iter(loader)
    (x0, y0), (x1, y1) = next(it), next(it)  # one step per epoch (12 // 7 = 1)
    v0 = {int(l): x0[i] for i, l in enumerate(y0) if l < 7}
    v1 = {int(l): x1[i] for i, l in enumerate(y1) if l < 7}
    common = set(v0) & set(v1)
    assert common and all(not torch.equal(v0[k], v1[k]) for k in common)


def test_flip_spatial(tmp_path):
    pattern = _write_index(tmp_path, 64)
    loader = LatentLoader(tmp_path, batch_size=64, num_workers=0)
    flips = 0
    for x, y in _take(iter(loader), 4):
        z = _denorm(loader, x)[:, 0]
        for zi, yi in zip(z, y.numpy(), strict=True):
            plain = yi + pattern
            if np.allclose(zi, plain, atol=1e-3):
                continue
            np.testing.assert_allclose(zi, plain[:, ::-1], atol=1e-3)
            flips += 1
    assert 96 <= flips <= 160  # Binomial(256, 0.5): mean 128, sd 8
    noflip = LatentLoader(tmp_path, batch_size=64, num_workers=0, flip=False)
    x, y = next(iter(noflip))
    np.testing.assert_allclose(_denorm(noflip, x)[:, 0], y.numpy()[:, None, None] + pattern, atol=1e-3)


def test_flip_selects_stored_copy(tmp_path):
    pattern = _write_index(tmp_path, 64, flipped=True)
    loader = LatentLoader(tmp_path, batch_size=64, num_workers=0)
    picked = 0
    for x, y in _take(iter(loader), 4):
        z = _denorm(loader, x)[:, 0]
        for zi, yi in zip(z, y.numpy(), strict=True):
            if np.allclose(zi, yi + pattern, atol=1e-2):
                continue
            np.testing.assert_allclose(zi, -(yi + pattern) - 1, atol=1e-2)  # view 1, not spatially flipped
            picked += 1
    assert 96 <= picked <= 160


@pytest.mark.parametrize("n,world_size", [(60, 2), (60, 3), (61, 2)])
def test_rank_sharding_covers_each_sample_once(tmp_path, n, world_size):
    _write_index(tmp_path, n)
    batch = 5
    for epoch in range(2):
        seen = []
        for rank in range(world_size):
            loader = LatentLoader(tmp_path, batch_size=batch, rank=rank, world_size=world_size, num_workers=0)
            loader.load_state_dict({"epoch": epoch, "step": 0})
            for _x, y in _take(iter(loader), loader.steps_per_epoch):
                seen += y.tolist()
            assert loader.state_dict()["epoch"] == epoch + 1 and loader.epoch == epoch
        per_rank = n // world_size
        assert len(seen) == len(set(seen)) == world_size * (per_rank // batch) * batch
        if n % world_size == 0 and per_rank % batch == 0:
            assert sorted(seen) == list(range(n))


def test_determinism_seed_epoch_rank(tmp_path):
    _write_random(tmp_path, n=80)

    def run(**kw):
        loader = LatentLoader(tmp_path, batch_size=8, num_workers=0, **kw)
        return _take(iter(loader), 12)

    a, b = run(seed=3, rank=1, world_size=2), run(seed=3, rank=1, world_size=2)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    c = run(seed=4, rank=1, world_size=2)
    d = run(seed=3, rank=0, world_size=2)
    assert not any(torch.equal(p[0], q[0]) for p, q in zip(a, c, strict=True))
    assert not any(torch.equal(p[0], q[0]) for p, q in zip(a, d, strict=True))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch(tmp_path, num_workers):
    _write_random(tmp_path, n=70)
    ref = LatentLoader(tmp_path, batch_size=6, num_workers=num_workers, seed=7)
    assert ref.steps_per_epoch == 11
    it = iter(ref)
    _take(it, 8)
    state = ref.state_dict()
    assert state["epoch"] == 0 and state["step"] == 8
    want = _take(it, 10)  # crosses into epoch 1
    assert ref.epoch == 1
    new = LatentLoader(tmp_path, batch_size=6, num_workers=num_workers, seed=7)
    new.load_state_dict(state)
    got = _take(iter(new), 10)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(want, got, strict=True))
    assert new.state_dict() == ref.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        LatentLoader(tmp_path, batch_size=5, num_workers=0, seed=7).load_state_dict(state)


def test_loader_settings_one_source(tmp_path):
    """The run config's options + placement (LoaderSettings.of) give the same batches as keyword arguments."""
    _write_random(tmp_path, n=40)
    settings = LoaderSettings.of(LoaderOptions(num_workers=0, flip=False), batch_size=4, rank=1, world_size=2, seed=2)
    a = _take(iter(build_loader(tmp_path, settings, backend="torch")), 3)
    b = _take(iter(LatentLoader(tmp_path, batch_size=4, rank=1, world_size=2, seed=2, num_workers=0, flip=False)), 3)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    c = _take(iter(LatentLoader(tmp_path, settings, flip=True)), 3)  # a keyword overrides the settings
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c, strict=True))
    with pytest.raises(TypeError, match="py_num_workers"):
        LoaderSettings.resolve(settings, {"py_num_workers": 1})


# ---------------------------------------------------------------------------------------------- DALI


@needs_dali
@pytest.mark.parametrize("flipped", [False, True])
def test_dali_equals_torch(tmp_path, flipped):
    from imf.data.dali import DaliLatentLoader

    _write_random(tmp_path, n=70, flipped=flipped)
    kw = dict(batch_size=6, rank=1, world_size=2, seed=5)
    ref = _take(iter(LatentLoader(tmp_path, num_workers=0, **kw)), 9)  # 5 steps per epoch: crosses epochs
    dali = DaliLatentLoader(tmp_path, num_workers=0, **kw)
    got = _take(iter(dali), 9)
    for (x, y), (xd, yd) in zip(ref, got, strict=True):
        assert xd.dtype == torch.float32 and yd.dtype == torch.int64 and xd.device.type == "cpu"
        assert torch.equal(x, xd) and torch.equal(y, yd)
    assert dali.state_dict() == {
        "epoch": 1,
        "step": 4,
        "seed": 5,
        "rank": 1,
        "world_size": 2,
        "batch_size": 6,
        "flip": True,
    }
    # resume, with DALI's parallel (forked) source workers
    par = DaliLatentLoader(tmp_path, num_workers=2, **kw)
    par.load_state_dict({"epoch": 0, "step": 3})
    for (x, y), (xd, yd) in zip(ref[3:], _take(iter(par), 6), strict=True):
        assert torch.equal(x, xd) and torch.equal(y, yd)
    par.close()


@needs_dali
def test_build_loader_auto_picks_dali(tmp_path, capsys):
    _write_random(tmp_path, n=30)
    loader = build_loader(tmp_path, batch_size=4, backend="auto", num_workers=0)
    assert loader.backend == "dali"
    x, y = next(iter(loader))
    assert x.shape == (4, 4, 6, 6) and y.shape == (4,)


# ---------------------------------------------------------------------------------------------- errors


def _rewrite_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)


def test_error_missing_dir_and_manifest(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_loader(tmp_path / "nope", batch_size=2, backend="torch")
    with pytest.raises(DataError, match="manifest.json is missing"):
        build_loader(tmp_path, batch_size=2, backend="torch")
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        build_loader(tmp_path, batch_size=2, backend="torch")


def test_error_missing_shard(tmp_path):
    man = _write_random(tmp_path, n=50)
    (tmp_path / man["shards"][1]["labels"]).unlink()
    with pytest.raises(DataError, match=r"shard-00001\.labels\.npy is missing"):
        build_loader(tmp_path, batch_size=2, backend="torch")


def test_error_corrupt_checksum(tmp_path, capsys):
    man = _write_random(tmp_path, n=50)
    p = tmp_path / man["shards"][0]["moments"]
    raw = bytearray(p.read_bytes())
    raw[-10] ^= 0xFF  # same size and header, different data
    p.write_bytes(bytes(raw))
    build_loader(tmp_path, batch_size=2, backend="torch")  # sizes/shapes fine: no checksum by default
    with pytest.raises(DataError, match=r"shard-00000\.moments\.npy: sha256 mismatch"):
        build_loader(tmp_path, batch_size=2, backend="torch", verify_checksums=True)
    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "sha256 mismatch" in err[0]


def test_error_shape_mismatch_and_truncation(tmp_path):
    man = _write_random(tmp_path, n=50)
    p = tmp_path / man["shards"][0]["moments"]
    good = np.load(p)
    _rewrite_npy(p, good[:, :, :, :, :5])
    with pytest.raises(DataError, match=r"shard-00000\.moments\.npy has shape"):
        build_loader(tmp_path, batch_size=2, backend="torch")
    _rewrite_npy(p, good.astype(np.float32))
    with pytest.raises(DataError, match="has dtype float32"):
        build_loader(tmp_path, batch_size=2, backend="torch")
    _rewrite_npy(p, good)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"shard-00000\.moments\.npy is truncated \(\d+ of \d+ bytes\)"):
        build_loader(tmp_path, batch_size=2, backend="torch")
    _write_random(tmp_path / "ok", n=20)
    with pytest.raises(DataError, match="latent_shape"):
        build_loader(tmp_path / "ok", batch_size=2, backend="torch", shape=(4, 32, 32))
    with pytest.raises(DataError, match="num_classes"):
        build_loader(tmp_path / "ok", batch_size=2, backend="torch", num_classes=1000)


def test_error_labels_out_of_range(tmp_path):
    man = _write_random(tmp_path, n=50)
    p = tmp_path / man["shards"][1]["labels"]
    lab = np.load(p)
    lab[3] = 5
    _rewrite_npy(p, lab)
    with pytest.raises(DataError, match=r"shard-00001\.labels\.npy: labels out of range \[0, 5\)"):
        build_loader(tmp_path, batch_size=2, backend="torch")


def test_error_empty_dataset_and_batch_size(tmp_path):
    ShardWriter(tmp_path / "empty", latent_shape=(4, 2, 2), num_classes=3).close()
    with pytest.raises(DataError, match="empty"):
        build_loader(tmp_path / "empty", batch_size=2, backend="torch")
    _write_random(tmp_path / "d", n=21)
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(tmp_path / "d", batch_size=0, backend="torch")
    with pytest.raises(ValueError, match=r"larger than the per-rank dataset \(21 samples // world_size 2 = 10\)"):
        build_loader(tmp_path / "d", batch_size=11, world_size=2, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        build_loader(tmp_path / "d", batch_size=2, backend="jax")


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_source():
    src = build_loader("synthetic", batch_size=8, shape=(4, 8, 8), num_classes=10, seed=1)
    assert isinstance(src, SyntheticLatents) and src.backend == "synthetic"
    it = iter(src)
    a = _take(it, 3)
    for x, y in a:
        assert x.shape == (8, 4, 8, 8) and x.dtype == torch.float32 and y.shape == (8,) and y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) < 10
    state = src.state_dict()
    b = _take(it, 2)
    src2 = SyntheticLatents(8, (4, 8, 8), 10, seed=1)
    src2.load_state_dict(state)
    assert all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(b, _take(iter(src2), 2), strict=True)
    )
    assert not torch.equal(a[0][0], a[1][0])


# ---------------------------------------------------------------------------------------------- prepare


def _images(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(40, 50), (70, 64), (33, 90), (128, 96), (64, 64)]
    for c, name in enumerate(["cat", "dog", "emu"]):
        (root / name).mkdir(parents=True)
        for i in range(3 + c):
            w, h = sizes[(i + c) % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_prepare_end_to_end_and_resume(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL
    from PIL import Image

    from imf.prepare import center_crop_arr, encode_folder
    from imf.prepare import main as prepare_main

    tiny_vae(tmp_path / "vae")
    _images(tmp_path / "img")
    out = tmp_path / "lat"
    rc = prepare_main(
        [
            "--images",
            str(tmp_path / "img"),
            "--vae",
            str(tmp_path / "vae"),
            "--out",
            str(out),
            "--resolution",
            "32",
            "--flip",
            "--batch-size",
            "3",
            "--shard-size",
            "4",
            "--device",
            "cpu",
            "--num-workers",
            "0",
        ]
    )
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["count"] == 12 and [s["count"] for s in man["shards"]] == [4, 4, 4]
    assert man["latent_shape"] == [4, 16, 16] and man["flipped"] and man["class_names"] == ["cat", "dog", "emu"]
    assert man["metadata"]["scaling_factor"] == pytest.approx(0.18215)
    assert check_dataset(out, checksums=True)["count"] == 12
    labels = np.concatenate([np.load(out / s["labels"]) for s in man["shards"]])
    assert labels.tolist() == [0] * 3 + [1] * 4 + [2] * 5
    # stored moments == scaling_factor * posterior moments of the ADM-cropped image (and of its mirror)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    img = tmp_path / "img" / "dog" / "1.png"  # 70 x 64 -> BOX halving, BICUBIC, crop
    arr = center_crop_arr(Image.open(img).convert("RGB"), 32)
    assert arr.shape == (32, 32, 3)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        d, df = vae.encode(x).latent_dist, vae.encode(x.flip(3)).latent_dist
    mom = np.load(out / man["shards"][1]["moments"])[0]  # global sample 4 = dog/1.png
    for view, dist in ((0, d), (1, df)):
        np.testing.assert_allclose(mom[view, 0], 0.18215 * dist.mean[0].numpy(), rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(mom[view, 1], 0.18215 * dist.std[0].numpy(), rtol=2e-3, atol=2e-4)
    # imf.vae.LatentDecoder inverts scaling and normalisation: the normalised stored mean (eps = 0) un-normalises to
    # the VAE's own posterior mean, and decodes as the VAE decodes it
    from imf.vae import LatentDecoder, load_vae

    dec = LatentDecoder(load_vae(tmp_path / "vae"), man, batch=1)
    cm, cs = (np.asarray(man[k], np.float32).reshape(1, -1, 1, 1) for k in ("channel_mean", "channel_std"))
    x = torch.from_numpy((mom[None, 0, 0].astype(np.float32) - cm) / cs)
    np.testing.assert_allclose(dec.unnormalize(x)[0].numpy(), d.mean[0].numpy(), rtol=2e-3, atol=1e-3)
    with torch.no_grad():
        want = vae.decode(dec.unnormalize(x)).sample
    got = dec(torch.cat([x, x]))
    assert got.shape == (2, 3, 32, 32) and torch.equal(got[0], got[1])
    torch.testing.assert_close(got[:1], want, rtol=0, atol=1e-5)
    with pytest.raises(DataError, match="the VAE has 4 latent channels, the dataset's manifest 3"):
        LatentDecoder(dec.vae, {**man, "channel_mean": [0.0] * 3, "channel_std": [1.0] * 3})
    # resume: drop the last two shards' completion markers and the manifest, keep shard 0 untouched
    ino = (out / shard_names(0)[0]).stat().st_mtime_ns
    for i in (1, 2):
        (out / shard_names(i)[2]).unlink()
    (out / "manifest.json").unlink()
    encode = functools.partial(
        encode_folder,
        tmp_path / "img",
        tmp_path / "vae",
        out,
        resolution=32,
        shard_size=4,
        device="cpu",
        num_workers=0,
        progress=False,
    )
    man2 = encode(flip=True, batch_size=3)
    assert (out / shard_names(0)[0]).stat().st_mtime_ns == ino
    assert man2["shards"] == man["shards"] and man2["channel_std"] == man["channel_std"]
    # a finished directory is left alone; other settings are refused
    assert encode(flip=True, batch_size=3) == man2
    with pytest.raises(DataError, match="other inputs/settings"):
        encode(flip=False)
    # and the result trains: the torch loader reads it
    loader = build_loader(out, batch_size=4, backend="torch", num_workers=0, num_classes=3, shape=(4, 16, 16))
    x, y = next(iter(loader))
    assert x.shape == (4, 4, 16, 16) and torch.isfinite(x).all()


def test_loader_bench_smoke():
    from bench.loader_bench import smoke

    rows = {r["backend"]: r for r in smoke()}
    assert set(rows) == {"synthetic", "torch", "dali"}
    for name in ("synthetic", "torch") + (("dali",) if HAS_DALI else ()):
        assert rows[name]["latents_per_s"] > 0 and rows[name]["x_demand"] > 0
