"""Data faults and bad inputs (issue 16): each gives one clear error, before any training, naming what is wrong.

Three tables, each row a fault injected into a fresh small dataset (or a bad argument) and the pattern its message
must match (the file or field it names and what is wrong):

* ``DATASET_FAULTS``: a corrupted dataset directory, opened by :func:`imf.data.build_loader` (the trainer's path);
  the error must be a :class:`DataError` (an :class:`imf.cli.UserError`) with a one-line message;
* ``SETTING_FAULTS``: bad loader settings, run expectations and resume states;
* ``CLI_FAULTS``: ``python -m imf.data verify`` and ``python -m imf.prepare`` (in-process ``main``, which goes through
  :func:`imf.cli.run_cli` like the console entry): exit code 2 (3 for a missing dependency), exactly one line on
  stderr, no traceback; two of them also as real subprocesses.

The counts of these tables are what docs/reliability.md reports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imf.cli import MissingDependencyError, UserError
from imf.data import DataError, LatentLoader, ShardWriter, build_loader, main, shard_names

SHAPE = (2, 3, 3)


def _dataset(root: Path, n: int = 30, shard_size: int = 12, flipped: bool = False) -> dict:
    rng = np.random.default_rng(0)
    with ShardWriter(root, latent_shape=SHAPE, num_classes=4, shard_size=shard_size, flipped=flipped) as w:
        m, s, y = rng.normal(size=(n, *SHAPE)), rng.uniform(0.1, 1, (n, *SHAPE)), rng.integers(0, 4, n)
        w.add(m, s, y, *((m[..., ::-1], s[..., ::-1]) if flipped else ()))
    return w.manifest


def _edit_manifest(root: Path, fn) -> None:
    p = root / "manifest.json"
    man = json.loads(p.read_text())
    fn(man)
    p.write_text(json.dumps(man))


def _set(key, value):
    return lambda r: _edit_manifest(r, lambda m: m.__setitem__(key, value))


def _del(key):
    return lambda r: _edit_manifest(r, lambda m: m.pop(key))


def _shard_field(i, key, value):
    return lambda r: _edit_manifest(r, lambda m: m["shards"][i].__setitem__(key, value))


def _file(i: int, kind: int) -> str:
    return shard_names(i)[kind]


def _resave(i: int, kind: int, fn):
    """Rewrite shard ``i``'s moments (kind 0) or labels (1) as ``fn(array)``; with ``rehash`` the manifest's sha256
    and byte size follow, so only the content check can catch it."""

    def go(root: Path, rehash: bool = False):
        p = root / _file(i, kind)
        arr = fn(np.load(p))
        with open(p, "wb") as f:
            np.save(f, arr)
        if rehash:
            from imf.data.format import sha256_file

            key = ("moments", "labels")[kind]
            _edit_manifest(root, lambda m: m["shards"][i]["sha256"].__setitem__(key, sha256_file(p)))

    return go


def _rehashed(fn):
    return lambda r: fn(r, rehash=True)


def _truncate(i, kind, keep=-40):
    def go(root):
        p = root / _file(i, kind)
        p.write_bytes(p.read_bytes()[:keep])

    return go


def _pad(i, kind):
    def go(root):
        p = root / _file(i, kind)
        p.write_bytes(p.read_bytes() + b"\0" * 64)

    return go


def _flip_byte(i, kind):
    """Same size and header, other content: a float16 moment changes, or a label's lowest bit (stays in range)."""

    def go(root):
        p = root / _file(i, kind)
        raw = bytearray(p.read_bytes())
        raw[-8 if kind else -3] ^= 0x01 if kind else 0x5A
        p.write_bytes(bytes(raw))

    return go


def _remove(i, kind):
    return lambda r: (r / _file(i, kind)).unlink()


def _garbage(i, kind):
    return lambda r: (r / _file(i, kind)).write_bytes(b"this is not a .npy file at all, just text " * 4)


def _labels(value):
    def fn(lab):
        lab[5] = value
        return lab

    return fn


def _nan(mom):
    mom[2, 0, 0, 0, 1, 1] = np.nan
    return mom


def _neg_std(mom):
    mom[3, 0, 1] = -mom[3, 0, 1]
    return mom


def _write_text(text):
    return lambda r: (r / "manifest.json").write_text(text)


def _manifest_file_is_dir(root):
    (root / "manifest.json").unlink()
    (root / "manifest.json").mkdir()


# (id, inject(root), checksums, message pattern). Every row: DataError, one line, names the file/field.
DATASET_FAULTS = [
    ("manifest-missing", lambda r: (r / "manifest.json").unlink(), False, r"manifest\.json is missing"),
    ("manifest-is-dir", _manifest_file_is_dir, False, r"manifest\.json is missing"),
    ("manifest-not-json", _write_text("{"), False, r"manifest\.json is not valid JSON"),
    ("manifest-binary", lambda r: (r / "manifest.json").write_bytes(b"\xff\xfe\x00"), False, "not valid JSON"),
    ("manifest-not-object", _write_text("[1, 2]"), False, "must hold a JSON object, got list"),
    ("manifest-no-count", _del("count"), False, r"field 'count' is missing"),
    ("manifest-no-shards", _del("shards"), False, r"field 'shards' is missing"),
    ("count-is-string", _set("count", "30"), False, r"field 'count' must be int, got '30'"),
    ("count-is-bool", _set("num_classes", True), False, r"field 'num_classes' must be int"),
    ("count-mismatch", _set("count", 31), False, r"field 'count' is 31 but the shards hold 30"),
    ("wrong-format", _set("format", "webdataset"), False, r"format 'webdataset' version 1 not supported"),
    ("wrong-version", _set("version", 9), False, r"version 9 not supported"),
    ("dtype-unsupported", _set("dtype", "bfloat16"), False, r"field 'dtype' is 'bfloat16'"),
    ("latent-shape-2d", _set("latent_shape", [2, 3]), False, r"field 'latent_shape' must be \[C, H, W\]"),
    ("latent-shape-zero", _set("latent_shape", [2, 0, 3]), False, r"field 'latent_shape'"),
    ("views-vs-flipped", _set("views", 2), False, r"field 'views' is 2 but 'flipped' is False"),
    ("num-classes-zero", _set("num_classes", 0), False, r"field 'num_classes' must be positive"),
    ("channel-mean-length", _set("channel_mean", [0.0]), False, r"field 'channel_mean' must hold 2 finite"),
    ("channel-std-zero", _set("channel_std", [1.0, 0.0]), False, r"field 'channel_std' must be positive"),
    ("channel-std-null", _set("channel_std", [1.0, None]), False, r"field 'channel_std' must hold 2 finite"),
    ("empty-dataset", _set("shards", []), False, r"field 'count' is 30 but the shards hold 0"),
    ("shard-not-object", _set("shards", ["shard-00000.moments.npy"]), False, r"shards\[0\] must be an object"),
    (
        "shard-no-labels",
        lambda r: _edit_manifest(r, lambda m: m["shards"][1].pop("labels")),
        False,
        r"shards\[1\]: field 'labels' is missing",
    ),
    ("shard-count-zero", _shard_field(0, "count", 0), False, r"shards\[0\]: field 'count' must be positive"),
    (
        "shard-path-escape",
        _shard_field(0, "moments", "../elsewhere.npy"),
        False,
        r"shards\[0\]: field 'moments' must be a file name in the dataset directory",
    ),
    ("shard-no-sha", _shard_field(2, "sha256", {}), False, r"shards\[2\]: field 'sha256' has no entry 'moments'"),
    ("moments-missing", _remove(1, 0), False, r"shard-00001\.moments\.npy is missing"),
    ("labels-missing", _remove(2, 1), False, r"shard-00002\.labels\.npy is missing"),
    ("moments-truncated", _truncate(0, 0), False, r"shard-00000\.moments\.npy is truncated \(\d+ of \d+ bytes\)"),
    ("labels-truncated", _truncate(1, 1, keep=100), False, r"shard-00001\.labels\.npy is truncated"),
    ("moments-header-only", _truncate(0, 0, keep=20), False, r"shard-00000\.moments\.npy is truncated"),
    ("moments-padded", _pad(0, 0), False, r"shard-00000\.moments\.npy has \d+ bytes, the manifest records \d+"),
    ("moments-garbage", _garbage(1, 0), False, r"shard-00001\.moments\.npy is truncated|unreadable"),
    ("moments-shape", _resave(0, 0, lambda a: a[:, :, :, :, :2]), False, r"shard-00000\.moments\.npy has shape"),
    ("moments-rows", _resave(0, 0, lambda a: a[:-1]), False, r"shard-00000\.moments\.npy has shape \(11,"),
    (
        "moments-dtype",
        _resave(1, 0, lambda a: a.astype(np.float32)),
        False,
        r"shard-00001\.moments\.npy has dtype float32, manifest says float16",
    ),
    (
        "labels-dtype",
        _resave(0, 1, lambda a: a.astype(np.int32)),
        False,
        r"shard-00000\.labels\.npy has dtype int32, manifest says int64",
    ),
    (
        "labels-too-high",
        _resave(1, 1, _labels(4)),
        False,
        r"shard-00001\.labels\.npy: labels out of range \[0, 4\): min \d+, max 4",
    ),
    ("labels-negative", _resave(2, 1, _labels(-1)), False, r"shard-00002\.labels\.npy: labels out of range.*min -1"),
    ("moments-bitflip", _flip_byte(0, 0), True, r"shard-00000\.moments\.npy: sha256 mismatch"),
    ("labels-bitflip", _flip_byte(2, 1), True, r"shard-00002\.labels\.npy: sha256 mismatch"),
    ("moments-nan", _rehashed(_resave(1, 0, _nan)), True, r"shard-00001\.moments\.npy: non-finite moments"),
    ("moments-negative-std", _rehashed(_resave(0, 0, _neg_std)), True, r"shard-00000\.moments\.npy: negative std"),
]


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


@pytest.mark.parametrize(
    "inject,checksums,pattern", [c[1:] for c in DATASET_FAULTS], ids=[c[0] for c in DATASET_FAULTS]
)
def test_dataset_fault(tmp_path, inject, checksums, pattern):
    _dataset(tmp_path)
    build_loader(tmp_path, batch_size=4, backend="torch", num_workers=0, verify_checksums=checksums)  # sound first
    inject(tmp_path)
    with pytest.raises(DataError) as e:
        build_loader(tmp_path, batch_size=4, backend="torch", num_workers=0, verify_checksums=checksums)
    assert isinstance(e.value, UserError)
    assert re.search(pattern, _one_line(e.value)), str(e.value)


def test_dataset_fault_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    for path, what in ((tmp_path / "nope", "does not exist"), (tmp_path / "file", "is a file, not a directory")):
        with pytest.raises(DataError, match=f"data directory {path} {what}"):
            build_loader(path, batch_size=2, backend="torch")


@pytest.mark.parametrize("workers", [0, 1])
def test_fault_after_validation_is_still_one_line(tmp_path, workers):
    """A shard deleted between validation and the first batch: the open in the loader (or its worker) names it."""
    _dataset(tmp_path)
    loader = LatentLoader(tmp_path, batch_size=4, num_workers=workers)
    _remove(0, 0)(tmp_path)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert re.search(r"shard file \S*shard-00000\.moments\.npy is missing", _one_line(e.value)), str(e.value)


def test_trainer_stops_before_training(tmp_path, capsys):
    """The README's training command on a truncated shard: one line naming it, exit 2, nothing written."""
    from imf.train import main as train

    _dataset(tmp_path / "d")
    _truncate(1, 0)(tmp_path / "d")
    argv = ["--preset", "demo", "--data.source", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--threads", "1"]
    capsys.readouterr()
    assert train(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(
        r"^imf\.train: error: shard file .*shard-00001\.moments\.npy is truncated", lines[0]
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------- settings


def _bad_state(tmp_path):
    loader = LatentLoader(tmp_path, batch_size=4, num_workers=0, seed=1)
    loader.load_state_dict({"epoch": 0, "step": 2, "seed": 1, "rank": 0, "world_size": 1, "batch_size": 5})


def _bad_position(tmp_path):
    LatentLoader(tmp_path, batch_size=4, num_workers=0).load_state_dict({"epoch": 0, "step": 7})


def _dali_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali -> ImportError
    build_loader(tmp_path, batch_size=4, backend="dali")


# (id, call(tmp_path) on a sound dataset, exception type, message pattern)
SETTING_FAULTS = [
    ("backend-unknown", lambda p: build_loader(p, batch_size=2, backend="jax"), DataError, r"backend must be"),
    ("batch-zero", lambda p: build_loader(p, batch_size=0), DataError, r"batch_size must be a positive int, got 0"),
    ("batch-float", lambda p: build_loader(p, batch_size=2.0), DataError, r"batch_size must be a positive int"),
    ("batch-bool", lambda p: build_loader(p, batch_size=True), DataError, r"batch_size must be a positive int"),
    (
        "batch-too-large",
        lambda p: build_loader(p, batch_size=16, world_size=2, backend="torch"),
        DataError,
        r"batch_size 16 is larger than the per-rank dataset \(30 samples // world_size 2 = 15\)",
    ),
    (
        "rank-out-of-range",
        lambda p: build_loader(p, batch_size=2, rank=2, world_size=2),
        DataError,
        r"rank must be an int in \[0, world_size=2\)",
    ),
    ("world-zero", lambda p: build_loader(p, batch_size=2, world_size=0), DataError, r"world_size must be"),
    ("seed-negative", lambda p: build_loader(p, batch_size=2, seed=-1), DataError, r"seed must be a non-negative"),
    ("workers-negative", lambda p: build_loader(p, batch_size=2, num_workers=-1), DataError, r"num_workers must be"),
    ("prefetch-zero", lambda p: build_loader(p, batch_size=2, prefetch=0), DataError, r"prefetch must be"),
    (
        "run-shape",
        lambda p: build_loader(p, batch_size=2, backend="torch", shape=(4, 32, 32)),
        DataError,
        r"manifest\.json: field 'latent_shape' is \[2, 3, 3\], the run expects \[4, 32, 32\]",
    ),
    (
        "run-classes",
        lambda p: build_loader(p, batch_size=2, backend="torch", num_classes=1000),
        DataError,
        r"manifest\.json: field 'num_classes' is 4, the run expects 1000",
    ),
    (
        "digits-shape",
        lambda p: build_loader("digits", batch_size=8, shape=(4, 8, 8)),
        DataError,
        r"the digits data has shape \(1, 8, 8\), the run expects \(4, 8, 8\)",
    ),
    (
        "digits-batch",
        lambda p: build_loader("digits", batch_size=1000, world_size=2),
        DataError,
        r"larger than the per-rank digits set",
    ),
    (
        "synthetic-classes",
        lambda p: build_loader("synthetic", batch_size=2, num_classes=0),
        DataError,
        r"num_classes must be positive",
    ),
    ("resume-other-batch", _bad_state, DataError, r"loader state has batch_size=5, this loader has batch_size=4"),
    ("resume-bad-position", _bad_position, DataError, r"position epoch=0 step=7 is invalid \(steps_per_epoch=7\)"),
    (
        "dali-missing",
        _dali_missing,
        MissingDependencyError,
        r"the DALI latent loader needs nvidia-dali-cuda130.*pip install -e \"\.\[data\]\"",
    ),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in SETTING_FAULTS], ids=[c[0] for c in SETTING_FAULTS])
def test_setting_fault(tmp_path, monkeypatch, call, exc, pattern):
    _dataset(tmp_path)
    args = (tmp_path, monkeypatch) if call is _dali_missing else (tmp_path,)
    with pytest.raises(exc) as e:
        call(*args)
    assert isinstance(e.value, UserError)
    assert re.search(pattern, _one_line(e.value)), str(e.value)


# ---------------------------------------------------------------------------------------------- CLIs


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random AutoencoderKL (downsampling 2), broken copies of it, and image folders."""
    pytest.importorskip("diffusers")
    from conftest import tiny_vae
    from PIL import Image

    root = tmp_path_factory.mktemp("assets")
    for name in ("vae", "vae_trunc", "vae_badcfg"):
        tiny_vae(root / name)
    (root / "vae_empty").mkdir()
    w = root / "vae_trunc" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    (root / "vae_badcfg" / "config.json").write_text("{")
    rng = np.random.default_rng(0)
    for folder in ("img/a", "img/b", "bad_img/a", "empty", "no_images/a"):
        (root / folder).mkdir(parents=True)
    for path in ("img/a/0.png", "img/a/1.png", "img/b/0.png", "img/b/1.png", "bad_img/a/0.png"):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / path)
    (root / "bad_img" / "a" / "1.png").write_bytes(b"\x89PNG not really")
    (root / "no_images" / "a" / "notes.txt").write_text("no images here")
    (root / "a_file").write_text("x")
    return root


def _prep(a: Path, out_dir: Path, **kw) -> list[str]:
    """imf.prepare arguments; ``images`` / ``vae`` / ``out`` in ``kw`` name entries of the assets folder."""
    args = {"images": "img", "vae": "vae", "out": out_dir, "resolution": 8, "device": "cpu", "num_workers": 0, **kw}
    for k in ("images", "vae", "out"):
        args[k] = a / args[k]
    return [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _check_one_line(err: str, prog: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


# (id, inject(root) into a fresh dataset or None for no dataset, message pattern); exit code 2
VERIFY_FAULTS = [
    ("missing-dir", None, r"data directory .*out does not exist"),
    ("no-manifest", lambda r: (r / "manifest.json").unlink(), r"manifest\.json is missing"),
    ("truncated", _truncate(1, 0), r"shard-00001\.moments\.npy is truncated"),
    ("bitflip", _flip_byte(0, 1), r"shard-00000\.labels\.npy: sha256 mismatch"),
]


@pytest.mark.parametrize("inject,pattern", [c[1:] for c in VERIFY_FAULTS], ids=[c[0] for c in VERIFY_FAULTS])
def test_verify_fault(tmp_path, capsys, inject, pattern):
    out = tmp_path / "out"
    if inject is not None:
        _dataset(out)
        inject(out)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 2
    _check_one_line(capsys.readouterr().err, "imf.data verify", pattern)


# (id, imf.prepare argument overrides, message pattern); exit code 2
PREPARE_FAULTS = [
    ("images-missing", {"images": "nope"}, r"--images .*nope does not exist"),
    ("images-file", {"images": "a_file"}, r"--images .*a_file is a file, not a directory"),
    ("images-empty", {"images": "empty"}, r"--images .*empty holds no images"),
    ("no-images", {"images": "no_images"}, r"--images .*no_images holds no images"),
    ("image-corrupt", {"images": "bad_img"}, r"--images: image .*1\.png cannot be read"),
    ("vae-missing", {"vae": "nope"}, r"--vae .*nope does not exist"),
    ("vae-file", {"vae": "a_file"}, r"--vae .*a_file is a file"),
    ("vae-empty", {"vae": "vae_empty"}, r"--vae .*vae_empty is not a loadable AutoencoderKL directory: .*config\.json"),
    ("vae-truncated", {"vae": "vae_trunc"}, r"--vae .*vae_trunc is not a loadable AutoencoderKL directory"),
    ("vae-bad-config", {"vae": "vae_badcfg"}, r"--vae .*vae_badcfg is not a loadable AutoencoderKL.*not a valid JSON"),
    ("out-is-file", {"out": "a_file"}, r"--out .*a_file'? is a file"),
    ("resolution-zero", {"resolution": 0}, r"--resolution must be positive"),
    ("resolution-odd", {"resolution": 9}, r"--resolution 9 is not divisible by the VAE's downsampling factor 2"),
    ("batch-zero", {"batch_size": 0}, r"--batch-size must be positive"),
    ("shard-zero", {"shard_size": 0}, r"--shard-size must be positive"),
    ("workers-negative", {"num_workers": -1}, r"--num-workers must be >= 0"),
    ("device-bogus", {"device": "tpu7"}, r"--device 'tpu7' is not a device"),
    ("device-other", {"device": "meta"}, r"--device 'meta' is not supported"),
]
if not __import__("torch").cuda.is_available():
    PREPARE_FAULTS.append(("device-no-cuda", {"device": "cuda"}, r"--device cuda: no CUDA device is available"))


@pytest.mark.parametrize("overrides,pattern", [c[1:] for c in PREPARE_FAULTS], ids=[c[0] for c in PREPARE_FAULTS])
def test_prepare_fault(assets, tmp_path, capsys, overrides, pattern):
    from imf.prepare import main as prepare

    capsys.readouterr()
    assert prepare(_prep(assets, tmp_path / "out", **overrides)) == 2
    _check_one_line(capsys.readouterr().err, "imf.prepare", pattern)


def test_prepare_fault_other_settings_and_no_diffusers(assets, tmp_path, capsys, monkeypatch):
    """Two more: an --out that holds shards of other settings (exit 2), diffusers not installed (exit 3)."""
    from imf.prepare import main as prepare

    assert prepare(_prep(assets, tmp_path / "out")) == 0
    capsys.readouterr()
    assert prepare(_prep(assets, tmp_path / "out", resolution=4)) == 2
    _check_one_line(capsys.readouterr().err, "imf.prepare", r"holds shards made from other inputs/settings")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert prepare(_prep(assets, tmp_path / "other")) == 3
    _check_one_line(capsys.readouterr().err, "imf.prepare", r"needs diffusers.*pip install -e \"\.\[data\]\"")


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
    """--debug adds the traceback; the one line and the exit code stay."""
    assert main(["verify", str(tmp_path / "nope"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "DataError" in err
    assert err.strip().splitlines()[-1].endswith("does not exist")


@pytest.mark.parametrize("module", ["imf.data", "imf.prepare"])
def test_cli_fault_subprocess(tmp_path, module):
    """The real entry points: exit code 2, one line, no traceback."""
    if module == "imf.data":
        _dataset(tmp_path / "d")
        _truncate(1, 0)(tmp_path / "d")
        argv, prog, pattern = ["verify", str(tmp_path / "d")], "imf.data verify", r"is truncated"
    else:
        argv = ["--images", str(tmp_path / "nope"), "--vae", str(tmp_path), "--out", str(tmp_path / "o")]
        prog, pattern = "imf.prepare", r"--images .*nope does not exist"
    r = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    _check_one_line(r.stderr, prog, pattern)
