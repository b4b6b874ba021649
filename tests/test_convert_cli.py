"""``python -m imf.convert``: file formats in and out, and one clear line for every bad input."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from official_reference import flax_msgpack_bytes, imf_official_weights, mf_official_params, torch_to_flax_imf

from imf.convert import from_official, to_official
from imf.convert.cli import entry
from imf.evaluate.loading import load_checkpoint
from imf.vae import OFFICIAL_LATENT_MEAN, OFFICIAL_LATENT_STD

SPEC = dict(
    dim=32, heads=2, depth=3, head_depth=1, hidden=85, patch=2, channels=4, classes=5, tokens=(2, 1, 1, 2), freq=16
)


def _weights(seed=0, v_heads=False):
    return imf_official_weights(torch.Generator().manual_seed(seed), v_heads=v_heads, dtype=torch.float32, **SPEC)


def _run(argv, capsys):
    code = entry([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pth_to_export_is_what_evaluate_loads(tmp_path, capsys):
    w = _weights()
    torch.save(w, tmp_path / "iMF-T-2.pth")
    out = tmp_path / "t.safetensors"
    code, msg, err = _run([tmp_path / "iMF-T-2.pth", "--out", out, "--input-size", 8], capsys)
    assert code == 0, err
    assert "v_head=boundary" in msg
    loaded = load_checkpoint(out)
    cfg, weights = from_official(w, input_size=8)
    assert loaded.model.cfg == cfg
    assert _same({k: v for k, v in loaded.model.state_dict().items()}, weights)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        norm = json.loads(f.metadata()["imf.latent_norm"])
    assert norm["channel_mean"] == list(OFFICIAL_LATENT_MEAN) and norm["channel_std"] == list(OFFICIAL_LATENT_STD)
    assert norm["metadata"] == {"scaling_factor": 1.0, "shift_factor": 0.0}


def _full_state(w_params, w_ema, step=100, with_opt=True):
    tree = {
        "step": step,
        "params": torch_to_flax_imf(w_params)["params"],
        "ema_params": torch_to_flax_imf(w_ema)["params"],
    }
    if with_opt:
        mu = torch_to_flax_imf({k: v * 0.01 for k, v in w_params.items()})["params"]
        nu = torch_to_flax_imf({k: v * v * 1e-4 for k, v in w_params.items()})["params"]
        tree["opt_state"] = {"0": {"count": np.int32(step), "mu": mu, "nu": nu}, "1": {}}
    return tree


@pytest.mark.parametrize("layout", ["msgpack", "zip"])
def test_flax_full_state_gives_the_ema(tmp_path, capsys, layout):
    params, ema = _weights(1, v_heads=True), _weights(2, v_heads=True)
    data = flax_msgpack_bytes(_full_state(params, ema))
    src = tmp_path / "checkpoint_100"
    src.write_bytes(data)
    if layout == "zip":
        with zipfile.ZipFile(tmp_path / "iMF-T-2-full.zip", "w") as z:
            z.write(src, "iMF-T-2-full/checkpoint_100")
        src = tmp_path / "iMF-T-2-full.zip"
    out = tmp_path / "t.safetensors"
    code, msg, err = _run([src, "--out", out, "--input-size", 8], capsys)
    assert code == 0, err
    loaded = load_checkpoint(out)
    assert loaded.step == 100 and loaded.model.cfg.v_head == "aux"
    assert _same(loaded.model.state_dict(), from_official(ema, input_size=8)[1])


def test_mf_flax_checkpoint(tmp_path, capsys):
    params = mf_official_params(
        torch.Generator().manual_seed(4), dim=48, depth=2, hidden=96, patch=2, channels=4, classes=6, freq=16
    )
    (tmp_path / "checkpoint_7").write_bytes(
        flax_msgpack_bytes({"step": 7, "params": params["params"], "ema_params": params["params"]})
    )
    out = tmp_path / "mf.safetensors"
    code, msg, err = _run([tmp_path, "--out", out, "--input-size", 8, "--heads", 4], capsys)
    assert code == 0, err
    loaded = load_checkpoint(out)
    assert loaded.model.cfg.arch == "mf" and loaded.model.cfg.heads == 4 and loaded.step == 7
    assert _same(loaded.model.state_dict(), from_official(params, arch="mf", heads=4, input_size=8)[1])


def test_to_official_round_trip(tmp_path, capsys):
    w = _weights(3, v_heads=True)
    torch.save(w, tmp_path / "a.pth")
    assert _run([tmp_path / "a.pth", "--out", tmp_path / "a.safetensors", "--input-size", 8], capsys)[0] == 0
    for form, extra in (("eval", []), ("training", ["--training-form"])):
        out = tmp_path / f"{form}.pth"
        code, msg, err = _run([tmp_path / "a.safetensors", "--to-official", "--out", out, *extra], capsys)
        assert code == 0, err
        back = torch.load(out, weights_only=True)
        model = load_checkpoint(tmp_path / "a.safetensors").model
        assert _same(back, to_official(model, training_form=form == "training"))
        if form == "training":  # the official training form back is the input, bitwise
            assert _same(back, w)
        else:
            assert _same(back, {k: v for k, v in w.items() if not k.startswith("net.v_heads.")})


def _bad_inputs(tmp_path):
    w = _weights()
    torch.save(w, tmp_path / "good.pth")
    raw = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save({k: v for k, v in w.items() if "u_heads.0.mlp.w3" not in k}, tmp_path / "missing.pth")
    torch.save({**w, "net.pos_embed": torch.zeros(3)}, tmp_path / "extra.pth")
    (tmp_path / "half.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    params = mf_official_params(
        torch.Generator().manual_seed(0), dim=48, depth=1, hidden=96, patch=2, channels=4, classes=6, freq=16
    )
    (tmp_path / "mf_ckpt").write_bytes(flax_msgpack_bytes(params))
    state = _full_state(_weights(1, True), _weights(2, True), with_opt=False)
    (tmp_path / "checkpoint_5").write_bytes(flax_msgpack_bytes(state))
    out = ["--out", tmp_path / "o.safetensors"]
    return {
        "not a checkpoint": ([tmp_path / "notes.txt", *out], "notes.txt is not a checkpoint"),
        "truncated file": ([tmp_path / "truncated.pth", *out], "truncated.pth is not a readable torch checkpoint"),
        "truncated zip": ([tmp_path / "half.zip", *out], "half.zip is not a readable zip archive"),
        "missing keys": ([tmp_path / "missing.pth", *out], r"missing.pth: missing keys \['u_heads.0.mlp.w3"),
        "extra keys": ([tmp_path / "extra.pth", *out], r"extra.pth: unexpected keys \['pos_embed'\]"),
        "no such preset shape": (
            [tmp_path / "good.pth", *out, "--preset", "iMF-B/2"],
            "good.pth: the weights are not preset 'iMF-B/2': dim 32",
        ),
        "MF read as iMF": ([tmp_path / "mf_ckpt", *out, "--arch", "imf"], "mf_ckpt: these are MeanFlow"),
        "--dcp without optimizer state": (
            [tmp_path / "checkpoint_5", "--dcp", tmp_path / "dcp"],
            "checkpoint_5 holds no optimizer state",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "not a checkpoint",
        "truncated file",
        "truncated zip",
        "missing keys",
        "extra keys",
        "no such preset shape",
        "MF read as iMF",
        "--dcp without optimizer state",
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, case):
    argv, pattern = _bad_inputs(tmp_path)[case]
    code, out, err = _run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("imf.convert: error: ")
    import re

    assert re.search(pattern, lines[0]), lines[0]


DEMO = dict(
    dim=96, heads=4, depth=4, head_depth=1, hidden=256, patch=2, channels=1, classes=10, tokens=(2, 1, 1, 2), freq=64
)


@pytest.mark.parametrize("world", [1, 2])
def test_dcp_from_full_state_resumes(tmp_path, capsys, world):
    """A full official state (demo-sized) -> DCP; a trainer of the same config resumes it: weights, EMA, AdamW
    moments and step are the official ones, and it trains on."""
    from imf import dist
    from imf.train import checkpoint
    from imf.train.args import load_config
    from imf.train.trainer import Trainer

    g = torch.Generator().manual_seed(11)
    official = {n: imf_official_weights(g, v_heads=True, dtype=torch.float32, **DEMO) for n in ("p", "e", "m", "v")}
    tree = {
        "step": 40,
        "params": torch_to_flax_imf(official["p"])["params"],
        "ema_params": torch_to_flax_imf(official["e"])["params"],
        "opt_state": {
            "0": {
                "count": np.int32(40),
                "mu": torch_to_flax_imf(official["m"])["params"],
                "nu": torch_to_flax_imf({k: v.abs() for k, v in official["v"].items()})["params"],
            },
            "1": {},
        },
    }
    (tmp_path / "checkpoint_40").write_bytes(flax_msgpack_bytes(tree))
    train_args = ["--preset", "demo", "--steps", "41", "--out", tmp_path / "run", "--world-size", world]
    code, msg, err = _run([tmp_path / "checkpoint_40", "--dcp", tmp_path / "dcp", *train_args], capsys)
    assert code == 0, err
    assert (tmp_path / "dcp" / "step_000000040" / "meta.json").is_file()
    if world > 1:  # two processes (gloo) resume it and train on
        from conftest import run_torchrun

        proc = run_torchrun("imf.train", *map(str, train_args[:-2]), "--resume", str(tmp_path / "dcp"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines if '"step"' in line][-1] == 41
        return
    cfg = load_config(["--preset", "demo", "--steps", "41", "--out", str(tmp_path / "run")])
    trainer = Trainer(cfg, dist.DistEnv(0, 1, 0, torch.device("cpu"), launched=False))
    checkpoint.load(tmp_path / "dcp", trainer)
    assert trainer.step == 40
    want = {k: from_official(official[k], input_size=8)[1] for k in ("p", "e", "m")}
    want["v"] = from_official({k: v.abs() for k, v in official["v"].items()}, input_size=8)[1]
    params = dict(trainer.model.named_parameters())
    assert _same({n: p.detach() for n, p in params.items()}, want["p"])
    assert _same(trainer.ema.full_tensors(), want["e"])
    for n, p in params.items():
        st = trainer.optimizer.state[p]
        assert torch.equal(st["exp_avg"], want["m"][n]) and torch.equal(st["exp_avg_sq"], want["v"][n])
        assert float(st["step"]) == 40
    result = trainer.train_step()
    assert result.step == 41 and not result.skipped
    trainer.close()


def test_flax_msgpack_reader():
    """Every value kind flax writes (arrays incl. bfloat16 and the chunked form, numpy scalars as arrays, ints,
    floats, strings, nested maps) and one clear error for truncated or foreign bytes."""
    from imf.convert.errors import ConvertError
    from imf.convert.flax_msgpack import loads

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    bf16 = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    tree = {
        "a": a,
        "i": np.int64(-7),
        "n": -3,
        "f": 0.25,
        "s": "x",
        "nested": {"0": np.ones((2, 2), dtype=np.float16)},
        "big": {
            "__msgpack_chunked_array__": True,
            "shape": {"0": 2, "1": 3},
            "chunks": {"0": np.arange(4.0), "1": np.arange(4.0, 6.0)},
        },
    }
    data = bytearray(flax_msgpack_bytes(tree))
    # a bfloat16 array: the payload's dtype name is 'bfloat16' (ml_dtypes), its bytes the raw 16-bit values
    raw = bf16.view(torch.int16).numpy().tobytes()
    payload = flax_msgpack_bytes([[3], "bfloat16", raw])
    import struct

    data = (
        data[:1]
        + struct.pack(">I", len(tree) + 1)
        + data[5:]
        + flax_msgpack_bytes("b")
        + b"\xc9"
        + struct.pack(">I", len(payload))
        + b"\x01"
        + payload
    )
    out = loads(bytes(data))
    assert torch.equal(out["a"], torch.from_numpy(a)) and out["i"].item() == -7 and out["n"] == -3
    assert out["f"] == 0.25 and out["s"] == "x" and out["nested"]["0"].dtype == torch.float16
    assert torch.equal(out["big"], torch.arange(6.0, dtype=torch.float64).reshape(2, 3))
    assert torch.equal(out["b"], bf16)
    with pytest.raises(ConvertError, match="truncated"):
        loads(bytes(data[:-10]))
    with pytest.raises(ConvertError, match="not msgpack"):
        loads(b"\xc1\x00")


def test_cli_process_exit_code_and_one_line(tmp_path):
    """The real entry point: ``python -m imf.convert`` on a non-checkpoint exits 2 with one line on stderr."""
    import subprocess
    import sys

    (tmp_path / "notes.txt").write_text("hello\n")
    cmd = [sys.executable, "-m", "imf.convert", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "o.safetensors")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"imf.convert: error: {tmp_path / 'notes.txt'} is not a checkpoint: not a torch file, a zip archive, a flax "
        "msgpack state or a checkpoint directory"
    ]
