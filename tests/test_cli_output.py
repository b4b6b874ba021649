"""What a user sees and keeps: output that fails, reruns into an existing run folder, ``--out`` checks,
``--help`` from the truth, one-line messages (issue 23).

* Output can fail; training cannot lose work: a consumer that exits early (``| head -1``) and a killed
  ``tee`` followed by SIGINT (real processes) leave the checkpoint, exit with the code that says what
  happened, and the run resumes bitwise.
* A run folder records what trained it: a rerun with another setting is refused with one line naming
  the fields; more steps are accepted and recorded in ``config_history.jsonl``.
"""

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
from test_train import TINY_CLI, tiny_config

import imf.train.checkpoint as ckpt
from bench.common import one_cpu_thread
from imf.train import main, run
from imf.train.record import HISTORY

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
# TINY_CLI with the progress bar on: it writes to stderr at every update, the write that fails
SHOWN = [*TINY_CLI, "--log.progress", "true"]


@pytest.fixture(autouse=True)
def one_thread():
    with one_cpu_thread():
        yield


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / HISTORY).read_text().splitlines()]


# --- item 1: output can fail ---------------------------------------------------------------------------


def test_consumer_that_exits_early_does_not_stop_training(tmp_path):
    """``imf.train ... 2>&1 | head -1``: the first line arrives, every later write hits a closed pipe; the run
    still trains all its steps, writes its checkpoint and exits 0."""
    out = tmp_path / "run"
    train = " ".join([sys.executable, "-m", "imf.train", *SHOWN, "--steps", "4", "--out", str(out)])
    proc = subprocess.run(
        ["bash", "-c", f'{train} 2>&1 | head -1; exit "${{PIPESTATUS[0]}}"'],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("imf.train: demo (imf, dim 32") and proc.stdout.count("\n") == 1, proc.stdout
    assert ckpt.latest(out / "checkpoints").name == "step_000000004"
    assert len(_losses(out)) == 4


def test_killed_tee_then_sigint_keeps_the_checkpoint(tmp_path):
    """The issue's case: ``imf.train ... 2>&1 | tee LOG``, then Ctrl-C kills ``tee`` first. Here the reader of
    the process's output closes its end after the first line, then SIGINT arrives: the run writes its
    checkpoint and exits 130 (128 + SIGINT); resumed to two steps more, it equals an uninterrupted run bitwise,
    and the changed run length is recorded."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "imf.train", *SHOWN, "--steps", "100000", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    first = proc.stdout.readline().decode()
    assert first.startswith("imf.train: demo"), first
    proc.stdout.close()  # tee is gone: every later write of the process fails with EPIPE
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, f"the run died with exit code {proc.returncode} after its output closed"
        assert time.time() < deadline, "no training steps within 120 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    step = ckpt.read_meta(ckpt.latest(out / "checkpoints"))["step"]
    assert 3 <= step < 100000

    run(tiny_config(out, steps=step + 2, checkpoint={"every_steps": 0, "resume": "auto"}))
    reference = tmp_path / "reference"
    run(tiny_config(reference, steps=step + 2))
    assert _losses(out) == _losses(reference)  # bitwise, each step once
    assert _history(out)[-1]["changed"]["steps"] == {"was": 100000, "now": step + 2}


# --- item 2: a run folder records what trained it ------------------------------------------------------


def test_rerun_with_another_setting_is_refused(tmp_path, capsys):
    """Rerunning into a finished run with another learning rate and seed names both fields, the options
    that continue the run and how to start anew; nothing in the run folder changes."""
    out = tmp_path / "run"
    argv = [*TINY_CLI, "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    before = (out / "config.yaml").read_text(), (out / HISTORY).read_text()
    capsys.readouterr()
    assert main([*argv, "--resume", "--lr", "5e-4", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (
        f"imf.train: error: the run in {out} was trained with optim.lr 0.001, seed 0; this command asks for "
        "optim.lr 0.0005, seed 3. To continue that run, drop those options or pass --optim.lr 0.001 --seed 0; "
        "to start a new run, use another --out"
    )
    assert ((out / "config.yaml").read_text(), (out / HISTORY).read_text()) == before


def test_more_steps_on_resume_are_recorded(tmp_path, capsys):
    """A longer run length is a legitimate change: the run continues, says so, and the history keeps both
    sessions; config.yaml holds the current session's settings."""
    out = tmp_path / "run"
    argv = [*TINY_CLI, "--out", str(out)]
    assert main([*argv, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*argv, "--steps", "3", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "imf.train: resuming at step 2 with steps 2 -> 3 (config_history.jsonl)" in err
    assert "imf.train: trained 1 steps (to step 3) in " in err and f"metrics {out / 'metrics.jsonl'}" in err
    first, second = _history(out)
    assert (first["start_step"], first["resumed_from"], first["changed"]) == (0, None, {})
    assert second["start_step"] == 2 and second["resumed_from"].endswith("step_000000002")
    assert second["changed"] == {"steps": {"was": 2, "now": 3}}
    assert "steps: 3" in (out / "config.yaml").read_text()


def test_demo_rerun_with_another_lr_is_refused(tmp_path, capsys):
    """The issue's ``imf.demo --out runs/demo_rerun --lr 5e-4`` on a finished run: refused before any work."""
    from imf.demo import main as demo_main

    out = tmp_path / "demo"
    run(tiny_config(out, steps=2, model={}, data={"batch_size": 32}, optim={"lr": 1e-3}))
    capsys.readouterr()
    assert demo_main(["--out", str(out), "--lr", "5e-4", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"imf.demo: error: the run in {out} was trained with ") and "\n" not in err
    assert "optim.lr 0.001" in err and "to start a new run, use another --out" in err


# --- item 6: help from the truth -----------------------------------------------------------------------


def _help(capsys, entry, argv) -> str:
    assert entry(argv) == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("name", ["demo", "iMF-B/2", "MF-B/2"])
def test_train_help_shows_the_chosen_presets_defaults(capsys, name):
    """``--preset NAME --help``: the defaults of that preset (from its resolved config), a line of help and a
    default for every model and loss field, and --debug."""
    import dataclasses

    from imf.train.args import build_config

    cfg = build_config(overrides={"preset": name})
    out = _help(capsys, main, ["--preset", name, "--help"])
    assert f"Defaults shown are those of --preset {name};" in out
    assert f"--lr FLOAT peak learning rate (default: {cfg.optim.lr})" in out
    assert f"micro-batches) (default: {cfg.data.batch_size})" in out
    assert f"or 'digits' (default: {cfg.data.source})" in out
    for section, resolved in (("model", cfg.model_config()), ("loss", cfg.loss_config())):
        for f in dataclasses.fields(resolved):
            if f.name == "method":
                continue
            value = getattr(resolved, f.name)
            value = list(value) if isinstance(value, tuple) else value
            entry = out[out.index(f"--{section}.{f.name} ") :].split(" --", 1)[0]
            if value is None:  # "(default: none)" or the field's help says what None means
                assert "default" in entry, entry
            else:
                assert f"(default: {value})" in entry, entry
            assert "(default: the preset's)" not in entry and "field (default" not in entry, entry
    assert "--debug also print the traceback of a user error" in out
    assert "(default: from epochs) (default:" not in out


def test_demo_help_says_each_default_once(capsys):
    from imf.demo import main as demo_main

    out = _help(capsys, demo_main, ["--help"])
    assert "--steps INT | NONE optimizer steps (default: 5000)" in out or "optimizer steps (default: " in out
    assert out.count("(default: from epochs)") == 0 and "--resume" in out and "--debug" in out


def test_evaluate_help_documents_every_option(capsys):
    from imf.evaluate.cli import main as evaluate_main
    from imf.evaluate.cli import parser

    undocumented = [a.option_strings for a in parser()._actions if not a.help]
    assert not undocumented, undocumented
    with pytest.raises(SystemExit):
        evaluate_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--out OUT output folder: results.md, results.json, one .npz per cell (default: runs/eval)" in out
    assert "--seed SEED seed of the sampling noise (default: 0)" in out
    assert "--progress, --no-progress progress bar per cell (default: on)" in out


def test_debug_keeps_the_exit_code(capsys):
    """--debug adds the traceback; the one line and the exit code are those without it."""
    assert main(["--preset", "nope", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("imf.train: error: unknown preset 'nope'")


# --- item 7: messages ----------------------------------------------------------------------------------


def test_demo_reports_an_interruption_not_an_error(tmp_path, capsys, monkeypatch):
    """A Ctrl-C during the demo's training: one line saying where it stopped and how to resume, exit 130."""
    import imf.demo as demo

    out = tmp_path / "demo"

    def ctrl_c_at_step_3(cfg):  # the run as the trainer returns it after a SIGINT during step 3
        result = run(tiny_config(out, steps=8, debug={"interrupt_at_step": 3}))
        result.stopped = "signal SIGINT"
        return result

    monkeypatch.setattr(demo, "run", ctrl_c_at_step_3)
    assert demo.main(["--out", str(out), "--threads", "1"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("imf.train: demo (imf, ")  # the line before the bar
    assert len(err) == 2 and err[1].startswith("imf.demo: interrupted at step 3 (signal SIGINT); checkpoint "), err
    assert err[1].endswith("run the same command again to resume") and "error" not in err[1], err


def test_progress_bar_follows_the_headline_error():
    """The bar shows the method's unweighted error averaged since its last update (not the adaptively
    weighted loss, which stays near its fixed point), images/s, and skipped steps only when there are any."""
    from imf.train.metrics import HeadlineError, progress_postfix

    shown = HeadlineError()
    for v in (0.5, 0.3, float("nan"), 0.1):
        shown.add({"loss": 0.99, "loss_V": 0.99, "mse_V": v, "mse_v": 9.0})
    assert shown.mean() == pytest.approx(0.3) and math.isnan(shown.mean())
    shown.add({"loss": 0.98, "mse_u": 0.25})
    assert progress_postfix(shown.mean(), 123.4, 0) == {"mse": "0.25", "img/s": "123"}
    assert progress_postfix(0.5, 10.0, 2)["skipped"] == 2


# --- items 3-4: --out checked before work in every CLI ----------------------------------------------------


def _entry_points():
    from bench.__main__ import main as bench_main
    from imf.demo import main as demo_main
    from imf.evaluate import main as evaluate_main
    from imf.prepare import main as prepare_main

    return {
        "imf.train": (main, [*TINY_CLI, "--steps", "1", "--out", "{out}"]),
        "imf.train export": (main, ["export", "--ckpt", "/no/ckpt", "--out", "{out}/m.safetensors"]),
        "imf.demo": (demo_main, ["--out", "{out}"]),
        "imf.evaluate": (evaluate_main, ["--ckpt", "/no/ckpt", "--out", "{out}"]),
        "imf.prepare": (prepare_main, ["--images", "/no/images", "--vae", "/no/vae", "--out", "{out}"]),
        "bench": (bench_main, ["scaling", "--out", "{out}"]),
    }


@pytest.mark.parametrize("prog", list(_entry_points()))
@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_every_cli_checks_out_before_work(tmp_path, capsys, prog, where):
    """An --out below a file or where nothing can be created: one line naming it, exit 2, nothing done."""
    (tmp_path / "a_file").write_text("x")
    out = str(tmp_path / "a_file" / "x") if where == "under a file" else "/proc/imf_out"
    entry, argv = _entry_points()[prog]
    assert entry([a.format(out=out) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: --out '{out}"), err
    assert ("a_file' is a file, not a directory" if where == "under a file" else "cannot be created in") in err[0]
