"""``imf.evaluate``: Frechet distance against scipy, the reproducible sample set, argument errors, the latent path
end to end (images -> imf.prepare with a tiny random AutoencoderKL -> a short imf.train run -> export -> sampling,
decoding, a stand-in feature network), and the digits path on a freshly trained demo checkpoint, in one process
and two (gloo)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import randomize_, run_torchrun, tiny_vae
from PIL import Image

from bench.common import one_cpu_thread
from imf import build_model
from imf.data.digits import DigitsJudge, frechet_distance
from imf.evaluate import (
    EvalError,
    check_num,
    labels_of,
    load_reference,
    main,
    noise_of,
    parse_args,
    parse_intervals,
    parse_omegas,
    parse_steps,
    run,
    sample_batches,
    shard,
    sweep_cells,
    to_uint8,
)
from imf.sample import generate
from imf.train import run as train
from imf.train.args import build_config
from imf.train.export import export_ema, load_exported

TINY = {"dim": 32, "heads": 2}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest and steady on a shared CPU (module scope: before the fixtures
    that train)."""
    with one_cpu_thread():
        yield


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


@pytest.mark.parametrize("d", [2, 7, 64])
def test_frechet_distance_matches_scipy(d):
    rng = np.random.default_rng(d)
    mix_a, mix_b = rng.standard_normal((d, d)), rng.standard_normal((d, d)) * 0.5
    a = rng.standard_normal((400, d)) @ mix_a + 1.0
    b = rng.standard_normal((300, d)) @ mix_b - 0.5
    want = _scipy_frechet(a, b)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-6, abs=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6 * np.trace(np.cov(a, rowvar=False)))


def test_argument_errors():
    assert parse_omegas("1,2.5") == [1.0, 2.5]
    assert parse_intervals("0.0:1.0,0.4:0.65") == [(0.0, 1.0), (0.4, 0.65)]
    assert parse_steps("1,2") == [1, 2]
    for bad, match in [("1,x", "comma-separated"), ("0.5", ">= 1"), ("nan", "finite")]:
        with pytest.raises(EvalError, match=match):
            parse_omegas(bad)
    for bad, match in [
        ("0.4-0.6", "t_min:t_max"),
        ("0.7:0.3", "t_min <= t_max"),
        ("0:1.5", "<= 1"),
        ("a:b", "numbers"),
    ]:
        with pytest.raises(EvalError, match=match):
            parse_intervals(bad)
    with pytest.raises(EvalError, match=">= 1"):
        parse_steps("0")
    check_num(50000, 1000, 8)
    with pytest.raises(EvalError, match=r"multiple of 3000 = lcm\(num_classes 1000, world size 3\).*--num 48000"):
        check_num(50000, 1000, 3)
    with pytest.raises(EvalError, match="multiple of 10"):
        check_num(1005, 10, 1)
    for num, hint in [
        (-1, "e.g. --num 10$"),
        (0, "e.g. --num 10$"),
        (5, "e.g. --num 10$"),
        (25, "--num 20 or --num 30$"),
    ]:
        with pytest.raises(EvalError, match=hint):
            check_num(num, 10, 1)
    # published settings fill in what is not given
    assert sweep_cells([1], None, None, "iMF-B/2") == [(1, 8.0, 0.4, 0.65)]
    assert sweep_cells([2], None, None, "iMF-XL/2") == [(2, 4.0, 0.36, 0.64)]
    assert sweep_cells([1, 2], [1.0, 2.0], [(0.0, 1.0)], "demo") == [
        (1, 1.0, 0.0, 1.0),
        (1, 2.0, 0.0, 1.0),
        (2, 1.0, 0.0, 1.0),
        (2, 2.0, 0.0, 1.0),
    ]


def _images(model, num, rank, world, seed=0, batch=5, steps=1):
    parts = [
        (idx, y, x)
        for idx, y, x, _ in sample_batches(
            model,
            shard(num, rank, world),
            seed=seed,
            steps=steps,
            omega=2.0,
            t_min=0.2,
            t_max=0.8,
            batch=batch,
            autocast_dtype=None,
            device=torch.device("cpu"),
        )
    ]
    return [i for p in parts for i in p[0]], torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def test_sample_set_reproducible_and_split_across_ranks():
    num, k = 24, 3
    for world in (1, 2, 3, 4, 6, 8):
        blocks = [list(shard(num, r, world)) for r in range(world)]
        assert sorted(i for b in blocks for i in b) == list(range(num))  # disjoint, complete
    assert torch.bincount(labels_of(range(num), k)).tolist() == [num // k] * k
    assert torch.equal(noise_of([5, 7], 0, (2, 3)), torch.cat([noise_of([5], 0, (2, 3)), noise_of([7], 0, (2, 3))]))

    torch.manual_seed(0)
    model = randomize_(build_model("iMF-B/2", depth=2, head_depth=1, input_size=4, num_classes=k, **TINY)).eval()
    idx, y, one = _images(model, num, 0, 1)
    assert idx == list(range(num)) and torch.equal(y, labels_of(range(num), k))
    _, _, again = _images(model, num, 0, 1, batch=5)
    assert torch.equal(one, again)  # same seed -> same images
    _, _, other_seed = _images(model, num, 0, 1, seed=1)
    assert (other_seed - one).abs().amax() > 0.1
    for world in (2, 3):
        ranks = [_images(model, num, r, world, batch=4) for r in range(world)]
        assert [i for r in ranks for i in r[0]] == list(range(num))
        torch.testing.assert_close(torch.cat([r[2] for r in ranks]), one, rtol=1e-5, atol=1e-5)
        assert (ranks[0][2] - ranks[1][2]).abs().amax() > 0.1  # different ranks -> different images


# ---------------------------------------------------------------------------------------------------------
# The latent path end to end

LATENT = {"depth": 2, "head_depth": 1, "input_size": 4, "num_classes": 3, **TINY}


class TinyScorer:
    """Stand-in for Inception: a fixed random conv net; 'frechet' against features of random reference images."""

    name = "tiny"

    def __init__(self):
        torch.manual_seed(123)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        ).eval()
        ref = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
        self.ref = self._embed(ref)
        self.seen = 0

    @torch.no_grad()
    def _embed(self, u8: torch.Tensor) -> torch.Tensor:
        return self.net(u8.float() / 127.5 - 1.0)

    def features(self, images):
        self.seen += len(images)
        return {"f": self._embed(to_uint8(images))}

    def score(self, features, labels):
        return {
            "frechet": frechet_distance(features["f"].numpy(), self.ref.numpy()),
            "n": float(len(features["f"])),
            "label_sum": float(labels.sum()),
        }


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A tiny VAE, a 12-image dataset encoded by imf.prepare, a 2-step imf.train run and its EMA export."""
    from imf.prepare import encode_folder

    root = tmp_path_factory.mktemp("latent")
    tiny_vae(root / "vae", norm_num_groups=4, sample_size=8, scaling_factor=0.5, shift_factor=0.1)
    rng = np.random.default_rng(0)
    for i in range(12):
        folder = root / "images" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    encode_folder(
        root / "images", root / "vae", root / "data", resolution=8, batch_size=4, num_workers=0, progress=False
    )
    cfg = build_config(
        overrides={
            "preset": "iMF-B/2",
            "model": LATENT,
            "steps": 2,
            "ema_decays": [0.5],
            "out_dir": str(root / "run"),
            "data": {"source": str(root / "data"), "batch_size": 4, "num_workers": 0, "backend": "torch"},
            "schedule": {"warmup_steps": 1},
            "log": {"every_steps": 1, "progress": False},
            "checkpoint": {"every_steps": 0},
        }
    )
    result = train(cfg)
    export = export_ema(result.checkpoint, root / "model.safetensors")
    ref = root / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    return root, export, ref


def test_latent_end_to_end(latent_run, tmp_path):
    root, export, _ = latent_run
    scorer = TinyScorer()
    args = parse_args(
        [
            "--ckpt",
            str(export),
            "--num",
            "12",
            "--batch",
            "5",
            "--vae",
            str(root / "vae"),
            "--vae-batch",
            "3",
            "--steps",
            "1,2",
            "--omega",
            "1.0,3.0",
            "--interval",
            "0:1,0.3:0.7",
            "--out",
            str(tmp_path),
            "--png",
            "--no-progress",
        ]
    )
    report = run(args, scorer=scorer)
    cells = report["cells"]
    assert [(c["steps"], c["omega"], c["t_min"], c["t_max"]) for c in cells] == sweep_cells(
        [1, 2], [1.0, 3.0], [(0.0, 1.0), (0.3, 0.7)], None
    )
    assert scorer.seen == 12 * len(cells)
    for c in cells:
        assert c["metrics"]["n"] == 12 and c["metrics"]["label_sum"] == 12  # labels 0,1,2 x 4
        assert np.isfinite(c["metrics"]["frechet"]) and c["sample_img_per_s"] > 0 and c["decode_img_per_s"] > 0
    assert report["checkpoint"]["preset"] == "iMF-B/2" and report["checkpoint"]["step"] == 2
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(cells)) and saved["scorer"] == "tiny"
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == len(cells) + 1 and "| 2 | 3 | [0.3, 0.7] |" in table

    # the npz is the decoded sample set: recompute one cell independently
    from diffusers import AutoencoderKL

    from imf.data import load_manifest

    cell = cells[-1]
    arr = np.load(tmp_path / f"{cell['name']}.npz")["arr_0"]
    assert arr.shape == (12, 8, 8, 3) and arr.dtype == np.uint8
    model = load_exported(export)
    man = load_manifest(root / "data")
    y = torch.arange(12) % 3
    x = generate(
        model,
        y,
        cell["omega"],
        cell["t_min"],
        cell["t_max"],
        steps=cell["steps"],
        noise=noise_of(range(12), 0, (4, 4, 4)),
    )
    mean, std = (torch.tensor(man[k]).view(1, -1, 1, 1) for k in ("channel_mean", "channel_std"))
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    with torch.no_grad():
        img = vae.decode((x * std + mean) / 0.5 + 0.1).sample
    want = (127.5 * img + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(arr.astype(int) - want.astype(int)).max() <= 1
    assert np.asarray(Image.open(tmp_path / "png" / cell["name"] / "000007.png")).shape == (8, 8, 3)
    assert len(list((tmp_path / "png" / cell["name"]).iterdir())) == 12
    assert not list(tmp_path.glob(".parts-*"))


def test_latent_errors(latent_run, tmp_path, capsys):
    root, export, ref = latent_run
    base = ["--ckpt", str(export), "--num", "6", "--out", str(tmp_path), "--no-progress"]
    for extra, match in [
        ([], "needs --vae PATH"),
        (["--metrics", "digits"], "this checkpoint is a latent model (4x"),
        (["--vae", str(tmp_path / "nope")], "nope does not exist"),
        (["--vae", str(root / "vae"), "--data", str(tmp_path)], "manifest.json is missing"),
        (["--vae", str(root / "vae")], "needs --ref-stats PATH"),
        (["--vae", str(root / "vae"), "--ref-stats", str(tmp_path / "x.npz")], "does not exist"),
        (["--vae", str(root / "vae"), "--num", "7"], "multiple of 3"),
        (["--vae", str(root / "vae"), "--preset", "iMF-L/2"], "is a 'iMF-B/2' model, not --preset 'iMF-L/2'"),
        (["--omega", "2,0.5"], ">= 1"),
        (["--interval", "0.6:0.2"], "t_min <= t_max"),
        (["--ckpt", str(root / "run")], "is not a checkpoint: no meta.json"),
    ]:
        assert main(base + extra) == 2
        assert match in capsys.readouterr().err, extra
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3))
    with pytest.raises(EvalError, match=r"lacks \['sigma'\]"):
        load_reference(bad)
    np.savez(bad, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(EvalError, match="not"):
        load_reference(bad)
    if importlib.util.find_spec("torch_fidelity") is None:
        assert main(base + ["--vae", str(root / "vae"), "--ref-stats", str(ref)]) == 3  # MissingDependencyError
        assert "needs torch-fidelity, which is not installed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The digits demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cfg = build_config(
        overrides={
            "preset": "demo",
            "model": TINY,
            "steps": 30,
            "ema_decays": [0.9],
            "out_dir": str(root),
            "data": {"batch_size": 64},
            "schedule": {"warmup_steps": 5},
            "log": {"every_steps": 10, "progress": False},
            "checkpoint": {"every_steps": 0},
        }
    )
    result = train(cfg)
    return root, result.checkpoint, export_ema(result.checkpoint, root / "model.safetensors")


def test_digits_sweep(demo_run, tmp_path, capsys):
    root, step_dir, export = demo_run
    argv = ["--num", "200", "--batch", "64", "--steps", "1,2", "--omega", "1,2", "--no-progress"]
    assert main(["--ckpt", str(root / "checkpoints"), "--out", str(tmp_path / "dcp"), "--preset", "demo", *argv]) == 0
    assert main(["--ckpt", str(export), "--out", str(tmp_path / "st"), *argv]) == 0
    latest = root / "checkpoints" / "latest"  # the pointer file is accepted too (the README's form)
    assert (
        main(["--ckpt", str(latest), "--out", str(tmp_path / "latest"), "--num", "20", "--steps", "1", "--no-progress"])
        == 0
    )
    dcp, st = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("dcp", "st"))
    assert st["scorer"] == "digits" and dcp["checkpoint"]["source"] == str(step_dir)
    assert [c["metrics"] for c in dcp["cells"]] == [c["metrics"] for c in st["cells"]]  # same EMA either way
    printed = capsys.readouterr()
    assert len(st["cells"]) == 4 and "| 2 | 2 | [0, 1] |" in printed.out
    assert f"imf.evaluate: results in {tmp_path / 'latest'} (results.md, results.json)" in printed.err

    # the metrics are DigitsJudge's on the sample set
    model = load_exported(export)
    y = torch.arange(200) % 10
    x = generate(model, y, 2.0, steps=2, noise=noise_of(range(200), 0, (1, 8, 8)))
    want = DigitsJudge().score(x, y)
    got = st["cells"][3]["metrics"]
    assert got["accuracy"] == want["accuracy"] and got["frechet"] == pytest.approx(want["frechet"], rel=1e-5)
    arr = np.load(tmp_path / "st" / "nfe2_w2_t0-1.npz")["arr_0"]
    assert arr.shape == (200, 8, 8, 1)
    assert np.abs(arr.astype(int) - to_uint8(x).permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1

    for extra, match in [
        (["--preset", "iMF-B/2"], "is a 'demo' model"),
        (["--num", "205"], "multiple of 10"),
        (["--vae", str(root)], "pixel space"),
    ]:
        assert main(["--ckpt", str(export), "--out", str(tmp_path / "e"), *argv, *extra]) == 2
        assert match in capsys.readouterr().err


@pytest.mark.slow  # torchrun, 2 processes
def test_digits_two_ranks(demo_run, tmp_path):
    """torchrun with 2 gloo ranks writes the same sample set and metrics as one process."""
    _, _, export = demo_run
    # torchrun's own parser takes --num for an abbreviation of its --numa-binding: use the long name there
    argv = [
        "--ckpt",
        str(export),
        "--num-samples",
        "60",
        "--batch",
        "16",
        "--steps",
        "1",
        "--omega",
        "1.5",
        "--no-progress",
    ]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    proc = run_torchrun("imf.evaluate", *argv, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2
    a, b = (np.load(tmp_path / d / "nfe1_w1.5_t0-1.npz")["arr_0"].astype(int) for d in ("one", "two"))
    assert a.shape == b.shape == (60, 8, 8, 1) and np.abs(a - b).max() <= 1
    m1, m2 = one["cells"][0]["metrics"], two["cells"][0]["metrics"]
    assert m1["accuracy"] == pytest.approx(m2["accuracy"], abs=1 / 60)
    assert m1["frechet"] == pytest.approx(m2["frechet"], rel=1e-4)
