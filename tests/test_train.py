"""Trainer, single process on CPU: config layering and --help, digits loader, LR schedule, exact resume,
keep-last-K, NaN guard, SIGTERM, export, sample grids, bf16, MF, threads, demo CLI. (Bad inputs and
checkpoint faults: tests/test_faults.py; the golden loss curve and the full demo: tests/test_golden.py.)"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_vae
from safetensors import safe_open

import imf.train.checkpoint as ckpt_mod
from bench.common import one_cpu_thread
from imf import build_model
from imf.config import ModelConfig
from imf.data import build_loader
from imf.sample import generate
from imf.train import NonFiniteError, lr_factor, main, run
from imf.train.args import build_config, load_config
from imf.train.checkpoint import CheckpointError
from imf.train.config import ConfigError
from imf.train.export import export_ema, load_exported

TINY = {"dim": 32, "heads": 2}
# tiny_config(out) as command-line options (add --steps, --out, checkpoint options)
TINY_CLI = [
    "--preset",
    "demo",
    "--model.dim",
    "32",
    "--model.heads",
    "2",
    "--batch",
    "16",
    "--lr",
    "1e-3",
    "--schedule.warmup_steps",
    "2",
    "--schedule.decay",
    "constant",
    "--log.every_steps",
    "1",
    "--log.progress",
    "false",
    "--threads",
    "1",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest, and steady on a shared CPU."""
    with one_cpu_thread():
        yield


def _deep(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_config(out: Path, **over):
    """The demo preset shrunk to dim 32 / batch 16 on digits, metrics every step, no progress bar.

    The optimizer settings are pinned (lr 1e-3, constant after warm-up) so that tuning the demo preset's
    schedule for its full-length run does not change what these short runs test.
    """
    base = {
        "preset": "demo",
        "model": TINY,
        "threads": 1,
        "steps": 8,
        "data": {"source": "digits", "batch_size": 16},
        "optim": {"lr": 1e-3},
        "schedule": {"warmup_steps": 2, "decay": "constant"},
        "out_dir": str(out),
        "log": {"every_steps": 1, "progress": False},
        "checkpoint": {"every_steps": 0},
    }
    return build_config(overrides=_deep(base, over))


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- configuration -----------------------------------------------------------------------------------------


def test_config_layers_file_then_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: demo\noptim: {lr: 0.002}\nmodel: {dim: 32}\nlog: {sample_intervals: [[0.1, 0.9]]}\n")
    cfg = load_config(["--config", str(f), "--model.heads", "2", "--resume", "--batch", "64", "--data.grad-accum", "2"])
    assert cfg.optim.lr == 0.002 and cfg.model == {"dim": 32, "heads": 2}
    assert cfg.checkpoint.resume == "auto" and cfg.data.batch_size == 64 and cfg.data.source == "digits"
    assert cfg.data.grad_accum == 2
    assert cfg.schedule.warmup_steps == 200 and cfg.ema_decays == (0.999,)  # demo preset defaults
    assert cfg.log.sample_intervals == ((0.1, 0.9),)
    t = tmp_path / "c.toml"
    t.write_text('preset = "demo"\nsteps = 7\n[optim]\nlr = 0.003\n')
    cfg = load_config(["--config", str(t), "--ema", "0.9", "--warmup", "5", "--parallel.compile"])
    assert (cfg.steps, cfg.optim.lr, cfg.ema_decays, cfg.schedule.warmup_steps) == (7, 0.003, (0.9,), 5)
    assert cfg.parallel.compile is True


def test_help_lists_every_field(capsys):
    """--help is generated from the schema: every field with its type, default and one line of help."""
    from imf.train.config import TrainConfig

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in (
        "--optim.lr FLOAT, --lr FLOAT",
        "--data.batch_size INT, --batch INT",
        "--model.dim INT",
        "--loss.fm_fraction FLOAT",
        "--checkpoint.resume",
        "--threads",
        "--data.num_workers",
        "--parallel.activation_checkpointing",
        "--log.sample_intervals",
    ):
        assert option in out, option
    assert "peak learning rate (default: 0.0001)" in " ".join(out.split())
    top = [f.name for f in __import__("dataclasses").fields(TrainConfig)]
    assert all(f"--{name}" in out for name in top if name not in ("model", "loss"))


def test_demo_config_file_is_the_demo_preset():
    """configs/demo.yaml is `--preset demo --data digits`; the preset's settings have one source."""
    path = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    from_file = load_config(["--config", str(path)]).to_dict()
    from_preset = load_config(["--preset", "demo", "--data", "digits"]).to_dict()
    assert from_file == from_preset
    assert from_file["loss"] == {"fm_fraction": 0.0, "p_std": 1.6} and from_file["steps"] == 5000


def test_main_reports_config_error(capsys):
    assert main(["--preset", "nope"]) == 2
    assert capsys.readouterr().err.strip() == (
        "imf.train: error: unknown preset 'nope'; choose one of ['MF-B/2', 'MF-XL/2', 'demo', 'iMF-B/2', "
        "'iMF-L/2', 'iMF-M/2', 'iMF-XL/2']"
    )


def test_lr_schedule():
    assert [lr_factor(k, 10, 4, "constant", 0.0) for k in (0, 1, 3, 4, 9)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_factor(4, 10, 4, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(7, 10, 4, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_factor(10, 10, 4, "cosine", 0.1) == pytest.approx(0.1)


# --- the digits source -------------------------------------------------------------------------------------


def test_digits_loader_shards_and_resumes():
    loaders = [build_loader("digits", batch_size=100, rank=r, world_size=2, seed=3) for r in range(2)]
    assert loaders[0].steps_per_epoch == 8  # 1797 // 2 = 898 per rank -> 8 full batches
    shards = [set(loader.epoch_indices(0).tolist()) for loader in loaders]
    assert len(shards[0]) == len(shards[1]) == 898 and not shards[0] & shards[1]
    it = iter(loaders[0])
    batches = [next(it) for _ in range(11)]
    assert loaders[0].epoch == 1 and batches[0][0].shape == (100, 1, 8, 8) and batches[0][1].dtype == torch.int64
    state = loaders[0].state_dict()
    after = [next(it) for _ in range(3)]
    fresh = build_loader("digits", batch_size=100, rank=0, world_size=2, seed=3)
    fresh.load_state_dict(state)
    again = iter(fresh)
    for x, y in after:
        x2, y2 = next(again)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="expects"):
        build_loader("digits", batch_size=8, shape=(4, 8, 8))


# --- resume, checkpoints, export ---------------------------------------------------------------------------


def test_resume_is_bitwise_identical(tmp_path):
    full = run(tiny_config(tmp_path / "full"))
    assert full.step == 8 and len(full.losses) == 8 and full.stopped is None
    first = run(tiny_config(tmp_path / "cut", debug={"interrupt_at_step": 4}))
    assert first.step == 4 and first.stopped == "debug.interrupt_at_step 4"
    assert first.losses == full.losses[:4]
    latest = tmp_path / "cut" / "checkpoints" / "latest"  # the pointer file is accepted as a checkpoint path
    resumed = run(tiny_config(tmp_path / "cut", checkpoint={"resume": str(latest)}))
    assert resumed.first_step == 5 and resumed.step == 8
    assert resumed.losses == full.losses[4:]  # bitwise: the same floats
    for k, v in _params(full.model).items():
        assert torch.equal(v, _params(resumed.model)[k]), k
    for a, b in zip(full.ema.shadows[0.999], resumed.ema.shadows[0.999], strict=True):
        assert torch.equal(a, b)
    # a fresh run refuses a directory with checkpoints instead of mixing runs
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run(tiny_config(tmp_path / "cut"))


def test_keep_last(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    run(tiny_config(tmp_path / "run", steps=6, checkpoint={"every_steps": 2, "keep_last": 2}))
    assert [p.name for p in ckpt_mod.step_dirs(root)] == ["step_000000004", "step_000000006"]
    assert ckpt_mod.latest(root).name == "step_000000006"
    assert [r["step"] for r in _read_jsonl(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 7))


def test_export_matches_ema_model_and_sample_grids(tmp_path):
    res = run(tiny_config(tmp_path / "run", steps=12, ema_decays=[0.9, 0.5], log={"sample_every": 12}))
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [
        "step000000012_w1_t0-1.png",
        "step000000012_w4_t0-1.png",
    ]
    out = tmp_path / "ema.safetensors"
    root = tmp_path / "run" / "checkpoints"
    assert main(["export", "--ckpt", str(root), "--out", str(tmp_path / "root.safetensors"), "--decay", "0.5"]) == 0
    assert main(["export", "--ckpt", str(root / "latest"), "--out", str(out), "--decay", "0.5"]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["imf.preset"] == "demo" and meta["imf.ema_decay"] == "0.5" and meta["imf.step"] == "12"
    cfg = ModelConfig(**json.loads(meta["imf.model_config"]))
    assert (cfg.dim, cfg.heads) == (32, 2)

    reference = build_model(cfg)
    reference.load_state_dict(res.ema.full_tensors(0.5))
    exported = load_exported(out)
    y = torch.arange(10)
    a = generate(reference.eval(), y, omega=2.0, generator=torch.Generator().manual_seed(1))
    b = generate(exported, y, omega=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(
        res.ema.full_tensors(0.5)["u_out.linear.weight"],  # (past the EMA warm-up)
        res.ema.full_tensors(0.9)["u_out.linear.weight"],
    )
    with pytest.raises(CheckpointError, match="not 0.25"):
        export_ema(res.checkpoint, tmp_path / "x.safetensors", decay=0.25)


def test_latent_sample_grids_decode_with_vae(tmp_path):
    tiny_vae(tmp_path / "vae")
    cfg = tiny_config(
        tmp_path / "run",
        steps=2,
        model={"in_channels": 4},
        data={"source": "synthetic"},
        log={
            "sample_every": 2,
            "sample_omegas": [2.0],
            "sample_intervals": [[0.2, 0.8]],
            "sample_labels": [3, 7],
            "sample_per_label": 3,
            "vae": str(tmp_path / "vae"),
        },
    )
    run(cfg)
    samples = tmp_path / "run" / "samples"
    latents = torch.load(samples / "step000000002_w2_t0.2-0.8.pt")
    assert latents.shape == (6, 4, 8, 8) and torch.isfinite(latents).all()
    from PIL import Image

    grid = Image.open(samples / "step000000002_w2_t0.2-0.8.png")
    assert grid.size == (3 * 17 + 1, 2 * 17 + 1)  # 3 per row, 2 labels, 16x16 decoded images + 1 px borders


# --- robustness --------------------------------------------------------------------------------------------


def test_nonfinite_step_is_skipped(tmp_path):
    one = run(tiny_config(tmp_path / "one", steps=1))
    skip = run(tiny_config(tmp_path / "skip", steps=2, debug={"nan_steps": [2]}))
    assert skip.skipped == 1 and math.isnan(skip.losses[1]) and skip.losses[0] == one.losses[0]
    for k, v in _params(one.model).items():  # step 2 changed nothing
        assert torch.equal(v, _params(skip.model)[k]), k
    rec = _read_jsonl(tmp_path / "skip" / "metrics.jsonl")
    assert rec[1]["loss"] is None and rec[1]["skipped_total"] == 1 and rec[0]["skipped_total"] == 0


def test_nonfinite_in_a_row_stops_with_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row") as err:
        run(tiny_config(tmp_path / "run", steps=10, max_nonfinite=3, debug={"nan_steps": [2, 4, 5, 6, 7]}))
    assert "stopped at step 6" in str(err.value)
    root = tmp_path / "run" / "checkpoints"
    assert ckpt_mod.latest(root).name == "step_000000006"
    assert ckpt_mod.read_meta(ckpt_mod.latest(root))["step"] == 6
    rec = _read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rec[-1]["skipped_total"] == 4 and rec[-1]["nonfinite_in_a_row"] == 3


def test_sigterm_writes_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "imf.train", *TINY_CLI, "--steps", "100000", "--out", str(out)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 90
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no training steps within 90 s"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped at step" in err and "signal SIGTERM" in err
    step = ckpt_mod.read_meta(ckpt_mod.latest(out / "checkpoints"))["step"]
    assert 2 <= step < 100000


# --- precision and the demo wrapper ------------------------------------------------------------------------


def test_bf16_on_cpu_single_process(tmp_path):
    res = run(tiny_config(tmp_path / "run", steps=3, precision="bf16"))
    assert all(math.isfinite(v) for v in res.losses)
    assert all(p.dtype == torch.float32 for p in res.model.parameters())  # master weights stay fp32


def test_mf_loss_on_the_mf_dit(tmp_path):
    mf = {
        "arch": "mf",
        "input_size": 8,
        "in_channels": 1,
        "patch_size": 2,
        "num_classes": 10,
        "dim": 32,
        "heads": 2,
        "depth": 2,
        "freq_dim": 32,
    }
    res = run(
        tiny_config(tmp_path / "run", preset="MF-B/2", model=mf, steps=3, loss={"omega": 2.0}, data={"batch_size": 16})
    )
    assert res.step == 3 and all(math.isfinite(v) for v in res.losses)
    assert "mse_u" in _read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]


def test_demo_cli_runs_through_the_trainer(tmp_path):
    from imf.demo import run_demo

    out = tmp_path / "demo"
    summary = run_demo(
        [
            "--steps",
            "3",
            "--batch",
            "32",
            "--eval-samples",
            "100",
            "--omegas",
            "1,2",
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    assert summary["steps"] == 3 and set(summary["results"]) == {
        "1nfe_omega1",
        "1nfe_omega2",
        "2nfe_omega1",
        "2nfe_omega2",
    }
    for name in ("model.safetensors", "metrics.json", "metrics.jsonl", "samples_1nfe.png", "samples_2nfe.png"):
        assert (out / name).is_file(), name
    assert ckpt_mod.latest(out / "checkpoints").name == "step_000000003"


def test_thread_default(monkeypatch):
    cfg = tiny_config(Path("unused"), threads=None)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cfg.torch_threads() is None  # torch follows OMP_NUM_THREADS
    monkeypatch.delenv("OMP_NUM_THREADS")
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cfg.torch_threads(1) == max(1, min(8, cpus)) and cfg.torch_threads(2 * cpus) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cpus), 0.0, 0.0))
    assert cfg.torch_threads(1) == 1  # a busy machine: one thread
    assert tiny_config(Path("unused"), threads=3).torch_threads(4) == 3


@pytest.mark.parametrize("name", ["demo.yaml", "imf_b2.yaml", "mf_b2.yaml"])
def test_config_files_load(name):
    path = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = load_config(["--config", str(path), "--data", "synthetic" if name != "demo.yaml" else "digits"])
    assert cfg.preset in ("demo", "iMF-B/2", "MF-B/2") and cfg.loss_config().method == cfg.model_config().arch
