"""Profiling (``--profile.*``, :mod:`imf.train.profile`): a profiled window of the demo writes a trace with
every step phase and the phase table; no profiler exists without it; bad settings are one line before
training; the table's arithmetic on hand-made events; the per-phase memory peaks on a fake allocator."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_train import TINY_CLI, one_thread, tiny_config  # noqa: F401  (one_thread: autouse fixture)

import imf.phases
import imf.train.profile as profile_mod
from imf.phases import PHASES
from imf.train import main, run
from imf.train.profile_table import UNLABELLED, PhasePeaks, phase_rows


def test_profiled_window_of_the_demo(tmp_path, capsys):
    """Steps 3-5 profiled (wait 1, warmup 1, active 3), a checkpoint at step 5 inside the window."""
    cfg = tiny_config(tmp_path, steps=6, profile={"wait": 1, "warmup": 1, "active": 3}, checkpoint={"every_steps": 5})
    run(cfg)
    folder = tmp_path / "profile"
    assert sorted(p.name for p in folder.iterdir()) == [
        "rank0.5.pt.trace.json",
        "summary_rank0_step000005.json",
        "summary_rank0_step000005.md",
    ]
    trace = json.loads((folder / "rank0.5.pt.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert set(PHASES) <= names
    assert sum(1 for n in names if str(n).startswith("ProfilerStep#")) == 3

    summary = json.loads((folder / "summary_rank0_step000005.json").read_text())
    assert (summary["first_step"], summary["last_step"], summary["steps"]) == (3, 5, 3)
    rows = {r["phase"]: r for r in summary["rows"]}
    assert list(rows) == [*PHASES, UNLABELLED]
    assert rows["imf.checkpoint"]["calls"] == pytest.approx(1 / 3)  # one save in three steps
    for name in ("imf.guidance", "imf.dual_forward", "imf.backward"):
        assert rows[name]["calls"] == 1 and rows[name]["ms"] > 0 and "aten::" in rows[name]["top"]
    assert sum(r["ms"] for r in summary["rows"]) == pytest.approx(summary["step_ms"], rel=1e-6)

    table = (folder / "summary_rank0_step000005.md").read_text()
    for name in PHASES:
        assert f"| {name} |" in table
    err = capsys.readouterr().err
    assert err.count("### Step phases, rank 0, steps 3-5 (cpu)") == 1  # printed once
    assert "CUDA only, not recorded on cpu: per-phase peak memory" in err
    assert imf.phases._probe is None


def test_no_profiler_without_profile_options(tmp_path, monkeypatch):
    """No profiler, no session, and the phases make no record_function (torch's optimizer makes its own)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a profiler was created")

    labels = []
    record_function = torch.autograd.profiler.record_function

    def recorded(name, *args):
        labels.append(name)
        return record_function(name, *args)

    monkeypatch.setattr(torch.profiler.profile, "__init__", refuse)
    monkeypatch.setattr(profile_mod.ProfileSession, "__init__", refuse)
    monkeypatch.setattr(torch.autograd.profiler, "record_function", recorded)
    result = run(tiny_config(tmp_path, steps=2))
    assert result.step == 2
    assert not (tmp_path / "profile").exists()
    assert "Optimizer.zero_grad#AdamW.zero_grad" in labels  # the patch is seen
    assert not set(labels) & set(PHASES)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--profile.active", "-1"], "profile.active must be >= 0, got -1"),
        (["--profile.wait", "5"], "profile.active is 0 (profiling off), but the schedule wait=5"),
        (["--profile.active", "3", "--profile.ranks", "[0,1]"], "profile.ranks must be ranks in [0, 1), got [0, 1]"),
        (["--profile.active", "3", "--profile.wait", "9"], "the profile window ends at step 13"),
        (["--profile.memory", "--profile.dir", "FILE/profile"], "--profile.dir '{}/profile' cannot be created"),
    ],
)
def test_bad_profile_settings_are_one_line(tmp_path, capsys, options, message):
    blocker = tmp_path / "file"
    blocker.write_text("")
    options = [o.replace("FILE", str(blocker)) for o in options]
    message = message.replace("{}", str(blocker))
    assert main([*TINY_CLI, "--steps", "10", "--out", str(tmp_path / "run"), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imf.train: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def _event(name, start, end, thread=1, self_us=0.0):
    span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
    kind = SimpleNamespace(name="CPU")
    return SimpleNamespace(
        name=name, thread=thread, time_range=span, self_cpu_time_total=self_us, kernels=[], device_type=kind
    )


def test_phase_rows_exclusive_times_and_owners():
    """Two steps of 100 us; loss 10-60 holds guidance 15-25 and dual 30-50; an op of the autograd thread
    during backward belongs to backward."""
    events = []
    for base in (0, 100):
        events += [
            _event("ProfilerStep#1", base, base + 100),
            _event("imf.data", base, base + 10),
            _event("imf.loss", base + 10, base + 60),
            _event("imf.guidance", base + 15, base + 25),
            _event("aten::mm", base + 16, base + 20, self_us=4.0),
            _event("imf.dual_forward", base + 30, base + 50),
            _event("aten::bmm", base + 32, base + 40, self_us=8.0),
            _event("aten::sum", base + 55, base + 57, self_us=2.0),
            _event("imf.backward", base + 60, base + 90),
            _event("aten::mm", base + 70, base + 80, thread=2, self_us=10.0),
            _event("aten::zero_", base + 95, base + 96, self_us=1.0),
        ]
    rows, window = phase_rows(events, top_ops=2)
    assert window == {"steps": 2, "step_ms": 0.1}
    got = {r["phase"]: (round(r["ms"] * 1e3, 6), r["top"]) for r in rows}
    assert got == {
        "imf.data": (10.0, ""),
        "imf.loss": (20.0, "aten::sum 0.002"),
        "imf.guidance": (10.0, "aten::mm 0.004"),
        "imf.dual_forward": (20.0, "aten::bmm 0.008"),
        "imf.backward": (30.0, "aten::mm 0.01"),
        UNLABELLED: (10.0, "aten::zero_ 0.001"),
    }
    assert rows[0]["share"] == pytest.approx(0.1)


def test_phase_peaks_on_a_fake_allocator():
    """Peaks per phase with nesting: an outer phase sees its nested phase's peak, a later sibling does not."""
    mem = {"now": 0, "peak": 0}

    def alloc(n):
        mem["now"] += n
        mem["peak"] = max(mem["peak"], mem["now"])

    peaks = PhasePeaks(lambda: mem["peak"], lambda: mem.update(peak=mem["now"]))
    alloc(10)
    peaks.enter("imf.loss")
    alloc(5)  # 15
    peaks.enter("imf.guidance")
    alloc(20)  # 35
    alloc(-20)  # 15
    peaks.exit("imf.guidance")
    peaks.enter("imf.dual_forward")
    alloc(8)  # 23
    peaks.exit("imf.dual_forward")
    alloc(-8)
    peaks.exit("imf.loss")
    peaks.enter("imf.backward")
    alloc(3)  # 18
    peaks.exit("imf.backward")
    peaks.exit("imf.ema")  # opened before the probe: ignored
    assert peaks.peaks == {"imf.guidance": 35, "imf.dual_forward": 23, "imf.loss": 35, "imf.backward": 18}


def test_bench_step_profile_smoke(tmp_path, monkeypatch, capsys):
    """``python -m bench step --smoke --profile`` (two variants here, to stay quick): a trace and a phase table
    per variant, and the side-by-side table with the engine's and the torch.func.jvp step's phases."""
    from bench import step_profile
    from bench.__main__ import main as bench_main

    monkeypatch.setattr(step_profile, "PROFILED", ("engine", "baseline_eager"))
    assert bench_main(["step", "--smoke", "--profile", "--preset", "iMF-B/2", "--out", str(tmp_path)]) == 0
    for variant in ("engine", "baseline_eager"):
        folder = tmp_path / "profile" / f"iMF-B_2_{variant}"
        trace = json.loads((folder / "rank0.5.pt.trace.json").read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"imf.loss", "imf.guidance", "imf.dual_forward", "imf.backward", "imf.optimizer"} <= names
    data = json.loads((tmp_path / "step_profile.json").read_text())
    rows = {r["phase"]: r for r in data["rows"]}
    assert list(rows) == [
        "imf.loss",
        "imf.guidance",
        "imf.dual_forward",
        "imf.backward",
        "imf.optimizer",
        UNLABELLED,
        "step",
    ]
    assert all("engine" in r and "baseline_eager" in r for r in rows.values())
    assert "| iMF-B/2 | imf.dual_forward |" in capsys.readouterr().err


def test_phase_rows_on_cuda_count_kernels_and_peaks():
    """CUDA columns: a phase's device time is its ops' kernels, the top list is kernels, peaks come in bytes."""
    mm = _event("aten::mm", 12, 14, self_us=2.0)
    mm.kernels = [SimpleNamespace(name="sm90_gemm", device=0, duration=30.0)]
    bwd = _event("aten::mm", 52, 54, thread=2, self_us=2.0)  # the autograd engine's thread
    bwd.kernels = [
        SimpleNamespace(name="sm90_gemm", device=0, duration=50.0),
        SimpleNamespace(name="k2", device=0, duration=5.0),
    ]
    events = [
        _event("ProfilerStep#1", 0, 100),
        _event("imf.dual_forward", 10, 40),
        mm,
        _event("imf.backward", 50, 90),
        bwd,
    ]
    rows, _ = phase_rows(events, cuda=True, peaks={"imf.backward": 3 * 2**30})
    got = {r["phase"]: (r["gpu_ms"] * 1e3, r["peak_gb"], r["top"]) for r in rows}
    assert got == {
        "imf.dual_forward": (30.0, None, "sm90_gemm 0.03"),
        "imf.backward": (55.0, 3.0, "sm90_gemm 0.05; k2 0.005"),
        UNLABELLED: (0.0, None, ""),
    }
