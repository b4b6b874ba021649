"""Fault injection for the trainer, its export and the demo: bad inputs and damaged or interrupted checkpoints.

* A table of bad command lines for ``python -m imf.train``, ``... export`` and ``python -m imf.demo`` (run
  in-process through their ``main``, the console scripts' code path): each must exit with the expected code
  and print exactly one line on stderr that names the problem, with no traceback; the demo must fail before
  it trains anything.
* Checkpoint faults: a crash before and after every file operation of a save (in-process), ``kill -9`` at
  random moments of a run that saves every step (subprocess, a few tries, delays printed), truncated and
  flipped files, a bad ``latest`` pointer, resume from an earlier step. After every fault the run resumes,
  its losses equal an uninterrupted run's bitwise and ``metrics.jsonl`` holds each step exactly once, or the
  fault is reported as one clear line (exit code 4) naming the damaged file.

docs/reliability.md reports the counts of these tables.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import TINY_CLI, tiny_config

import imf.train.checkpoint as ckpt
from bench.common import one_cpu_thread
from imf.demo import main as demo_main
from imf.train import main, run

STEPS = 6


@pytest.fixture(autouse=True)
def one_thread():
    with one_cpu_thread():
        yield


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run (checkpoints every 2 steps), the run every fault must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    run(tiny_config(out, steps=STEPS, checkpoint={"every_steps": 2, "keep_last": 2}))
    return out


def _cfg(out: Path, resume: str = "auto", **over):
    return tiny_config(out, steps=STEPS, checkpoint={"every_steps": 2, "keep_last": 2, "resume": resume}, **over)


def _assert_like_reference(out: Path, reference: Path) -> None:
    assert _steps(out) == list(range(1, STEPS + 1))  # each step once
    assert _losses(out) == _losses(reference)  # bitwise: no step lost or changed
    assert ckpt.latest(out / "checkpoints").name == f"step_{STEPS:09d}"
    assert not list((out / "checkpoints").glob(".tmp-*"))


# --- bad command lines -------------------------------------------------------------------------------------

CLI = [*TINY_CLI, "--steps", "2"]
# _cfg(out) as options: a run of STEPS steps that checkpoints every 2 and keeps 2
RUN = [*TINY_CLI, "--steps", str(STEPS), "--checkpoint.every_steps", "2", "--checkpoint.keep_last", "2"]


def _bad_inputs(tmp: Path, good_ckpt: Path) -> list[tuple[str, list[str], dict, int, str]]:
    """(name, train argv, env, exit code, message fragment)."""
    (tmp / "a_file").write_text("x")
    (tmp / "tab.yaml").write_text("preset: demo\noptim:\n\tlr: 1\n")
    (tmp / "indent.yaml").write_text("preset: demo\noptim:\n  lr: 1\n bad: 2\n")
    (tmp / "unknown.yaml").write_text("preset: demo\noptimizer: {lr: 1}\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "bad.toml").write_text("preset = demo\n")
    (tmp / "nomanifest").mkdir(exist_ok=True)
    (tmp / "badmanifest").mkdir(exist_ok=True)
    (tmp / "badmanifest" / "manifest.json").write_text("{not json")
    f = str(tmp / "a_file")
    return [
        ("unknown preset", ["--preset", "iMF-Q/7"], {}, 2, "unknown preset 'iMF-Q/7'"),
        (
            "batch vs world",
            ["--preset", "demo", "--batch", "30"],
            {"WORLD_SIZE": "4"},
            2,
            "batch_size 30 is not divisible by world_size 4",
        ),
        ("batch vs accum", [*CLI, "--batch", "64", "--data.grad_accum", "3"], {}, 2, "grad_accum 3"),
        ("batch 0", [*CLI, "--batch", "0"], {}, 2, "data.batch_size must be > 0"),
        ("missing data dir", [*CLI, "--data", "/no/such/dir"], {}, 2, "'/no/such/dir' is not 'synthetic'"),
        (
            "dir without manifest",
            [*CLI, "--model.in_channels", "4", "--data", str(tmp / "nomanifest")],
            {},
            2,
            "has no manifest.json",
        ),
        ("corrupt manifest", [*CLI, "--model.in_channels", "4", "--data", str(tmp / "badmanifest")], {}, 2, "manifest"),
        ("digits on a latent model", ["--preset", "iMF-B/2", "--data", "digits"], {}, 2, "data 'digits' is 1x8x8"),
        ("negative lr", [*CLI, "--lr", "-1"], {}, 2, "optim.lr must be > 0"),
        ("lr not a number", [*CLI, "--lr", "fast"], {}, 2, "optim.lr: cannot use 'fast' as float"),
        ("betas out of range", [*CLI, "--optim.betas", "[0.9, 1.5]"], {}, 2, "optim.betas must be two values"),
        ("unknown section", [*CLI, "--optimizer.lr", "1"], {}, 2, "unrecognized arguments: --optimizer.lr"),
        ("unknown model field", [*CLI, "--model.dimm", "8"], {}, 2, "unrecognized arguments: --model.dimm"),
        ("bad model field", [*CLI, "--model.heads", "5"], {}, 2, "model: dim (32) must be divisible by heads (5)"),
        ("bad loss field", [*CLI, "--loss.class_drop", "1.5"], {}, 2, "loss: class_drop must be in [0, 1)"),
        ("bad EMA decay", [*CLI, "--ema", "[1.5]"], {}, 2, "ema_decays must be one or more values in [0, 1)"),
        ("negative steps", [*CLI, "--steps", "-5"], {}, 2, "steps must be > 0, got -5"),
        ("fractional steps", [*CLI, "--steps", "1.5"], {}, 2, "steps: cannot use 1.5 as int"),
        ("zero threads", [*CLI, "--threads", "0"], {}, 2, "threads must be > 0"),
        ("bad precision", [*CLI, "--precision", "fp16"], {}, 2, "precision must be one of"),
        ("bad decay", [*CLI, "--schedule.decay", "linear"], {}, 2, "schedule.decay must be one of"),
        ("bad loader backend", [*CLI, "--data.backend", "nvdali"], {}, 2, "loader setting backend"),
        ("bad device", [*CLI, "--device", "tpu"], {}, 2, "device must be 'auto', 'cpu' or 'cuda[:i]'"),
        ("cuda without cuda", [*CLI, "--device", "cuda"], {}, 2, "CUDA is not available"),
        (
            "triton on cpu",
            [*CLI, "--backend", "triton", "--device", "cpu"],
            {"TRITON_INTERPRET": "0"},
            2,
            "backend 'triton' needs a CUDA device",
        ),
        ("omega below 1", [*CLI, "--log.sample_omegas", "[0.5]"], {}, 2, "log.sample_omegas must be >= 1"),
        ("missing vae", [*CLI, "--vae", "/no/vae"], {}, 2, "log.vae '/no/vae' is not a directory"),
        ("keep_last 0", [*CLI, "--checkpoint.keep_last", "0"], {}, 2, "checkpoint.keep_last must be > 0"),
        ("missing resume", [*CLI, "--resume", "/no/such/ckpt"], {}, 2, "checkpoint.resume '/no/such/ckpt' does not"),
        (
            "resume another model",
            [*CLI, "--model.dim", "64", "--out", str(tmp / "other"), "--resume", str(good_ckpt)],
            {},
            4,
            "is of another model: dim 32 (checkpoint) vs 64",
        ),
        (
            "resume not a checkpoint",
            [*CLI, "--out", str(tmp / "o2"), "--resume", str(tmp / "nomanifest")],
            {},
            4,
            "is not a checkpoint",
        ),
        ("out is a file", [*CLI, "--out", f], {}, 2, f"out_dir {f!r} is an existing file"),
        (
            "fresh run over checkpoints",
            [*CLI, "--out", str(good_ckpt.parent.parent)],
            {},
            2,
            "already holds checkpoints",
        ),
        ("missing config", ["--config", "/no/such.yaml"], {}, 2, "config file '/no/such.yaml' does not exist"),
        ("yaml tab", ["--config", str(tmp / "tab.yaml")], {}, 2, "tab.yaml line 3, column 1: invalid YAML"),
        ("yaml indentation", ["--config", str(tmp / "indent.yaml")], {}, 2, "indent.yaml line 4"),
        (
            "unknown field in file",
            ["--config", str(tmp / "unknown.yaml")],
            {},
            2,
            "unknown.yaml: unknown config field 'optimizer'",
        ),
        ("file not a mapping", ["--config", str(tmp / "list.yaml")], {}, 2, "must hold a mapping at the top level"),
        ("toml syntax", ["--config", str(tmp / "bad.toml")], {}, 2, "bad.toml: invalid TOML"),
        ("config suffix", ["--config", f], {}, 2, "use .yaml, .yml, .toml or .json"),
        ("stray argument", [*CLI, "stray"], {}, 2, "unrecognized arguments: stray"),
        (
            "export without --ckpt",
            ["export", "--out", str(tmp / "m.safetensors")],
            {},
            2,
            "the following arguments are required: --ckpt",
        ),
        (
            "export missing ckpt",
            ["export", "--ckpt", "/no/ckpt", "--out", str(tmp / "m.safetensors")],
            {},
            4,
            "checkpoint /no/ckpt does not exist",
        ),
        (
            "export file as ckpt",
            ["export", "--ckpt", f, "--out", str(tmp / "m.safetensors")],
            {},
            4,
            "is a file, not a checkpoint directory",
        ),
        (
            "export unknown decay",
            ["export", "--ckpt", str(good_ckpt), "--out", str(tmp / "m.safetensors"), "--decay", "0.5"],
            {},
            4,
            "has EMA decays [0.999], not 0.5",
        ),
        (
            "export decay not a number",
            ["export", "--ckpt", str(good_ckpt), "--out", str(tmp / "m.st"), "--decay", "abc"],
            {},
            2,
            "argument --decay: invalid float value: 'abc'",
        ),
        ("export out is a dir", ["export", "--ckpt", str(good_ckpt), "--out", str(tmp)], {}, 2, "is a directory"),
        (
            "export out under a file",
            ["export", "--ckpt", str(good_ckpt), "--out", str(tmp / "a_file" / "m.safetensors")],
            {},
            2,
            "its folder",
        ),
        ("out under a file", [*CLI, "--out", str(tmp / "a_file" / "run")], {}, 2, "a_file' is a file, not a directory"),
        ("out in /proc", [*CLI, "--out", "/proc/imf_run"], {}, 2, "--out '/proc/imf_run' cannot be created in '/proc'"),
    ]


DEMO_BAD = [
    ("omegas not numbers", ["--omegas", "abc"], "--omegas must be comma-separated numbers >= 1"),
    ("omega below 1", ["--omegas", "1,0.5"], "--omegas must be comma-separated numbers >= 1"),
    ("no eval samples", ["--eval-samples", "0"], "--eval-samples must be an integer >= 100"),
    ("too few eval samples", ["--eval-samples", "50"], "--eval-samples must be an integer >= 100"),
    ("eval samples not a number", ["--eval-samples", "x"], "--eval-samples must be an integer >= 100"),
    ("negative steps", ["--steps", "-5"], "steps must be > 0, got -5"),
    ("batch 0", ["--batch", "0"], "data.batch_size must be > 0"),
    ("lr not a number", ["--lr", "fast"], "optim.lr: cannot use 'fast' as float"),
    ("bad EMA decay", ["--ema", "1.0"], "ema_decays must be one or more values in [0, 1)"),
    ("triton on cpu", ["--backend", "triton"], "backend 'triton' needs a CUDA device"),
    ("unknown option", ["--stepz", "5"], "unrecognized arguments: --stepz"),
    ("resume a missing checkpoint", ["--resume", "/no/such/ckpt"], "checkpoint.resume '/no/such/ckpt' does not"),
]


def _one_line_error(capsys, prog: str, fragment: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    return lines[0]


def test_bad_command_lines_give_one_clear_line(tmp_path, capsys, monkeypatch):
    good = tmp_path / "good"
    run(tiny_config(good, steps=2))
    good_ckpt = good / "checkpoints" / "step_000000002"
    capsys.readouterr()
    cases = _bad_inputs(tmp_path, good_ckpt)
    for name, argv, env, code, fragment in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            rc = main(argv)
        assert rc == code, (name, rc, capsys.readouterr().err)
        _one_line_error(capsys, "imf.train export" if argv[0] == "export" else "imf.train", fragment)
    for name, argv, fragment in DEMO_BAD:
        out = tmp_path / f"demo_{len(name)}"
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert demo_main([*argv, "--out", str(out)]) == 2, name
        _one_line_error(capsys, "imf.demo", fragment)
        assert not out.exists(), f"{name}: the demo started before validating"
    (tmp_path / "a_file").write_text("x")
    assert demo_main(["--out", str(tmp_path / "a_file")]) == 2
    _one_line_error(capsys, "imf.demo", "is an existing file")
    assert demo_main(["--out", str(tmp_path / "a_file" / "demo")]) == 2
    _one_line_error(capsys, "imf.demo", "a_file' is a file, not a directory")
    print(f"bad inputs: {len(cases) + len(DEMO_BAD) + 1} tried, all one clear line")


def test_cli_entry_points_exit_codes(tmp_path):
    """The real processes: one line and exit 2 for a bad argument; the imf-demo console script exits 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    bad = subprocess.run(
        [sys.executable, "-m", "imf.train", "--preset", "nope"], capture_output=True, text=True, env=env, timeout=120
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip().splitlines() == [bad.stderr.strip().splitlines()[-1]]
        and "unknown preset 'nope'" in bad.stderr
    ), bad.stderr
    demo = Path(sys.executable).with_name("imf-demo")
    cmd = [str(demo)] if demo.exists() else [sys.executable, "-m", "imf.demo"]
    ok = subprocess.run(
        [
            *cmd,
            "--steps",
            "2",
            "--batch",
            "16",
            "--eval-samples",
            "100",
            "--omegas",
            "1",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "demo" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- crashes during a save ---------------------------------------------------------------------------------


class Crash(BaseException):
    """A simulated power cut (BaseException: nothing in the engine catches it)."""


def _crash_points() -> list[tuple[str, str, int]]:
    """(function, before|after, which call) for every file operation of the save of step 4 (pruning: step 6)."""
    ops = [("_dcp", 1), ("torch.save", 1), ("os.replace", 1), ("os.replace", 2), ("os.replace", 3)]
    return [(fn, when, k) for fn, k in ops for when in ("before", "after")] + [("shutil.rmtree", "before", 1)]


@pytest.mark.parametrize("fn, when, k", _crash_points(), ids=lambda v: str(v))
def test_crash_at_every_point_of_a_save(tmp_path, monkeypatch, reference, fn, when, k):
    """A crash before/after each file operation of a save (meta.json, rename, ``latest`` are the 3 replaces,
    the third 'before' is the crash between the rename and the pointer write) is survived: resume gives the
    uninterrupted run, each step once."""
    out = tmp_path / "run"
    owner, name = {
        "_dcp": (ckpt, "_dcp"),
        "torch.save": (ckpt.torch, "save"),
        "os.replace": (ckpt.os, "replace"),
        "shutil.rmtree": (ckpt.shutil, "rmtree"),
    }[fn]
    real, calls = getattr(owner, name), {"n": 0, "armed": False}
    real_save, real_dcp = ckpt.save, ckpt._dcp

    def save(root, step, state, **kw):
        calls.update(n=0, armed=step == (6 if fn == "shutil.rmtree" else 4), dcp_done=False)
        return real_save(root, step, state, **kw)

    def dcp(*args):  # DCP pickles small objects with torch.save itself: count our torch.save calls only
        (op if fn == "_dcp" else real_dcp)(*args)
        calls["dcp_done"] = True

    def op(*args, **kwargs):
        if calls["armed"] and (fn != "torch.save" or calls["dcp_done"]):
            calls["n"] += 1
            if calls["n"] == k and when == "before":
                raise Crash
        result = real(*args, **kwargs)
        if calls["armed"] and calls["n"] == k and when == "after" and (fn != "torch.save" or calls["dcp_done"]):
            raise Crash
        return result

    monkeypatch.setattr(ckpt, "save", save)
    if fn != "_dcp":
        monkeypatch.setattr(owner, name, op)
    monkeypatch.setattr(ckpt, "_dcp", dcp)
    with pytest.raises(Crash):
        run(_cfg(out))
    monkeypatch.undo()
    run(_cfg(out))
    _assert_like_reference(out, reference)


@pytest.mark.slow  # real processes killed at random moments
def test_kill_9_at_random_moments(tmp_path, reference):
    """SIGKILL of a real process that saves every 2 steps, at random moments (a few tries, seeded, printed)."""
    rng = random.Random(1234)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        cmd = [sys.executable, "-m", "imf.train", *RUN, "--out", str(out)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        delay = rng.uniform(0.0, 0.8)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        done = ckpt.step_dirs(out / "checkpoints")
        print(
            f"kill -9 attempt {attempt}: {delay:.2f} s after the first step, latest complete "
            f"{done[-1].name if done else None}, partial {[p.name for p in (out / 'checkpoints').glob('.tmp-*')]}"
        )
        run(_cfg(out))
        _assert_like_reference(out, reference)


# --- damaged files -----------------------------------------------------------------------------------------


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


DAMAGE = [  # (what, file in the newest checkpoint or the root, damage, survived?)
    ("truncated .distcp", "step/__0_0.distcp", _truncate, False),
    ("flipped byte in .distcp", "step/__0_0.distcp", _flip, False),
    ("truncated .metadata", "step/.metadata", _truncate, False),
    ("truncated rank state", "step/train_state_rank0.pt", _truncate, False),
    ("missing rank state", "step/train_state_rank0.pt", Path.unlink, False),
    ("truncated meta.json", "step/meta.json", _truncate, False),
    ("missing meta.json", "step/meta.json", Path.unlink, True),
    ("garbage latest", "latest", lambda p: p.write_bytes(b"\x00\xff garbage"), True),
    ("empty latest", "latest", lambda p: p.write_text(""), True),
    ("latest names a missing step", "latest", lambda p: p.write_text("step_000000099"), True),
    ("missing latest", "latest", Path.unlink, True),
]


@pytest.mark.parametrize("what, target, damage, survived", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_checkpoint(tmp_path, capsys, reference, what, target, damage, survived):
    """Damage the newest checkpoint (step 4 of 6) or the pointer, then resume with the CLI: either the run
    recovers (falls back to the newest intact checkpoint, reproduces the reference, each step once) or it
    stops with one line naming the damaged checkpoint and exit code 4."""
    out = tmp_path / "run"
    run(_cfg(out, debug={"interrupt_at_step": 4}))
    root = out / "checkpoints"
    damage(root / target.replace("step/", "step_000000004/"))
    capsys.readouterr()
    argv = [*RUN, "--out", str(out), "--resume"]
    rc = main(argv)
    if survived:
        assert rc == 0, capsys.readouterr().err
        _assert_like_reference(out, reference)
    else:
        assert rc == 4
        line = _one_line_error(capsys, "imf.train", "step_000000004")
        assert "damaged" in line or "corrupt" in line or "incomplete" in line, line


def test_export_and_evaluate_name_a_truncated_file(tmp_path, capsys, reference):
    """A truncated shard: export and evaluate name the file and its size mismatch, as a resumed run does."""
    from imf.evaluate import main as evaluate_main

    out = tmp_path / "run"
    run(_cfg(out, debug={"interrupt_at_step": 4}))
    step = out / "checkpoints" / "step_000000004"
    _truncate(step / "__0_0.distcp")
    capsys.readouterr()
    assert main(["export", "--ckpt", str(step), "--out", str(tmp_path / "m.safetensors")]) == 4
    line = _one_line_error(capsys, "imf.train export", f"checkpoint {step} is damaged: __0_0.distcp has ")
    assert "were written (truncated?)" in line
    argv = ["--ckpt", str(step), "--num", "10", "--out", str(tmp_path / "eval"), "--no-progress"]
    assert evaluate_main(argv) == 2
    line = _one_line_error(capsys, "imf.evaluate", f"checkpoint {step} is damaged: __0_0.distcp has ")


def test_resume_from_an_earlier_step(tmp_path, capsys, reference):
    """--resume DIR/step_4 with step 6 present: the newer ones are moved to superseded/, the run
    continues from step 2 and reproduces the reference; metrics.jsonl keeps each step once."""
    out = tmp_path / "run"
    run(_cfg(out))
    root = out / "checkpoints"
    assert [p.name for p in ckpt.step_dirs(root)] == ["step_000000004", "step_000000006"]
    capsys.readouterr()
    run(_cfg(out, resume=str(root / "step_000000004")))
    assert "moved the newer checkpoints ['step_000000006']" in capsys.readouterr().err
    moved = list((root / ckpt.SUPERSEDED).glob("*/step_000000006"))
    assert len(moved) == 1 and (moved[0] / ckpt.META).is_file()  # kept, not deleted
    _assert_like_reference(out, reference)
    assert (out / "metrics.superseded.jsonl").is_file()
