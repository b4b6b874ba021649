"""The benchmark harness on the CPU: every subcommand's smoke run through the CLI code path, the
files it writes, the timing/stat helpers and the scaling model. Smoke numbers check the harness only.

The kernel-running smokes (kernels, block) need ``TRITON_INTERPRET=1`` (as CI sets it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from imf_kernels._checks import interpreting

from bench import common, scaling
from bench.__main__ import main
from bench.step_bench import smoke_overrides
from imf import flops
from imf.config import LossConfig, preset

REPO = Path(__file__).resolve().parent.parent
ENV_FIELDS = ("date_utc", "device", "device_type", "torch", "triton", "cuda", "python", "git_commit")
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="kernel smoke runs need TRITON_INTERPRET=1")


def _run_cli(benchmark, *argv):
    """One round of the CLI through pytest-benchmark (the smoke wall time lands in its table)."""
    return benchmark.pedantic(main, args=(list(argv),), rounds=1, iterations=1)


def _load(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert data["benchmark"] == name
    assert all(k in data["env"] for k in ENV_FIELDS)
    assert data["env"]["device_type"] == "cpu" and data["config"]["smoke"] is True
    md = (out / f"{name}.md").read_text()
    assert md.startswith(f"# {name}") and "Smoke run on a CPU" in md and "| " in md
    assert data["rows"]
    return data


def _timed(row: dict) -> bool:
    """A timed row: no error, a positive median inside its spread (min/max where the row keeps them, else the
    20th/80th percentiles, as the kernel rows do)."""
    low, high = row.get("ms_min", row.get("ms_p20")), row.get("ms_max", row.get("ms_p80"))
    return "error" not in row and row["ms"] > 0 and low <= row["ms"] <= high


@needs_interpreter
def test_kernels_smoke(benchmark, tmp_path):
    assert _run_cli(benchmark, "kernels", "--smoke", "--out", str(tmp_path)) == 0
    data = _load(tmp_path, "kernels")
    rows = data["rows"]
    assert {(r["op"], r["mode"]) for r in rows} == {
        (o, m) for o in ("attention", "attention_jvp") for m in ("fwd", "fwd+bwd")
    }
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["tflops"] > 0 and r["imf_speedup"] > 0
    assert any(k.startswith("attention_jvp fwd+bwd torch_func_jvp_math") for k in data["summary"])
    assert list(tmp_path.glob("kernels_*.png"))


@needs_interpreter
def test_block_smoke(benchmark, tmp_path):
    assert _run_cli(benchmark, "block", "--smoke", "--out", str(tmp_path)) == 0
    ops = _load(tmp_path, "block_ops")["rows"]
    assert {r["op"] for r in ops} == {"rms_norm", "qk_norm_rope", "swiglu", "linear"}
    rows = _load(tmp_path, "block")["rows"]
    assert {(r["scope"], r["impl"]) for r in rows} == {
        (s, i) for s in ("block", "model") for i in ("engine", "torch_func_jvp", "torch_func_jvp_compiled")
    }
    for r in rows:
        assert _timed(r), r
        assert r["flops"] > 0 and r["engine_speedup"] > 0
    cfg = preset("iMF-B/2", **smoke_overrides("iMF-B/2"))
    block = next(r for r in rows if r["scope"] == "block")
    bf = flops.block_flops(cfg, 2)
    assert block["flops"] == 3 * bf["forward"] + bf["tangent"]


STEP_FIELDS = (
    "variant",
    "backend",
    "batch",
    "seq_len",
    "ms",
    "ms_min",
    "ms_max",
    "ms_forward",
    "ms_backward",
    "ms_optimizer",
    "images_per_s",
    "flops_per_step",
    "tflops",
    "mfu",
    "times_ms",
)


def test_step_smoke(benchmark, tmp_path):
    assert _run_cli(benchmark, "step", "--smoke", "--out", str(tmp_path)) == 0
    data = _load(tmp_path, "step")
    rows = data["rows"]
    main_rows = {(r["preset"], r["variant"]): r for r in rows if r["sweep"] == "main"}
    for name in ("iMF-B/2", "MF-B/2"):
        for variant in ("engine", "engine_fsdp2", "baseline_eager", "baseline_compiled", "fm_compiled"):
            r = main_rows[(name, variant)]
            assert "error" not in r, r
            if "skipped" in r:  # only when imf.parallel is not importable
                assert variant == "engine_fsdp2"
                continue
            assert all(k in r for k in STEP_FIELDS), sorted(set(STEP_FIELDS) - set(r))
            assert _timed(r) and len(r["times_ms"]) == data["config"]["iters"]
            if variant in ("engine", "baseline_eager"):
                assert r["ms_guidance"] is not None and r["ms_dual_forward"] is not None
    imf_cfg = preset("iMF-B/2", **smoke_overrides("iMF-B/2"))
    eng = main_rows[("iMF-B/2", "engine")]
    assert eng["flops_per_step"] == flops.train_step_flops(imf_cfg, LossConfig(), 4)
    assert main_rows[("iMF-B/2", "fm_compiled")]["flops_per_step"] == flops.fm_step_flops(imf_cfg, 4)
    assert main_rows[("MF-B/2", "engine")]["ms_guidance"] > 0.0  # the published MF guidance (kappa 0.5) runs one
    s = data["summary"]
    for key in (
        "engine_images_per_s",
        "engine_mfu",
        "speedup_vs_baseline_eager",
        "speedup_vs_baseline_compiled",
        "efficiency_ratio",
        "measured_matmul_peak_tflops",
    ):
        assert s[key] > 0, key
    assert s["efficiency_ratio"] == pytest.approx(s["step_time_over_fm"] / s["step_flops_over_fm"])
    assert {r["sweep"] for r in rows} == {"main", "batch", "seq"}
    assert (tmp_path / "step_batch_sweep.png").exists() and (tmp_path / "step_seq_sweep.png").exists()


def test_loader_and_scaling_smoke(benchmark, tmp_path):
    assert _run_cli(benchmark, "loader", "--smoke", "--out", str(tmp_path)) == 0
    rows = _load(tmp_path, "loader")["rows"]
    assert {r["backend"] for r in rows} == {"synthetic", "torch", "dali"}
    assert all(r["latents_per_s"] > 0 for r in rows if "skipped" not in r)
    assert main(["scaling", "--smoke", "--out", str(tmp_path)]) == 0
    data = _load(tmp_path, "scaling")
    assert [r["gpus"] for r in data["rows"]] == [1, 2, 4, 8, 16, 32, 64]
    assert "t_compute_ms" not in data["rows"][0]  # no step.json in this dir: communication only
    assert "a model, not a measurement" in (tmp_path / "scaling.md").read_text()


def _bench_process(*argv: str, interpreter: bool = True) -> subprocess.CompletedProcess:
    """``python -m bench ARGV`` in a fresh process, with or without ``TRITON_INTERPRET=1`` set."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    env |= {"TRITON_INTERPRET": "1"} if interpreter else {}
    cmd = [sys.executable, "-m", "bench", *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_cli_subprocess_step(tmp_path):
    out = _bench_process("step", "--smoke", "--preset", "iMF-B/2", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    data = _load(tmp_path, "step")
    assert {r["preset"] for r in data["rows"]} == {"iMF-B/2"}
    assert json.loads(out.stdout[out.stdout.index("{") :])["written"]["step"]["json"] == str(tmp_path / "step.json")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU smoke default")
def test_cli_kernels_smoke_without_the_variable(tmp_path):
    """``python -m bench kernels`` on a CPU, TRITON_INTERPRET unset: the CLI sets it before the kernels load;
    every row is timed (none is an error row)."""
    out = _bench_process("kernels", "--out", str(tmp_path), interpreter=False)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _load(tmp_path, "kernels")["rows"]
    assert rows and all(_timed(r) for r in rows), [r.get("error") for r in rows]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU smoke default")
def test_cli_runs_again_when_the_kernels_loaded_without_the_variable(tmp_path, monkeypatch):
    """Called in a process that already imported the kernels (as tests do), without the variable: it runs
    itself again with it instead of sending CPU tensors to compiled kernels."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "imf_kernels" in sys.modules
    assert main(["scaling", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "scaling.json").is_file()


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("kernels", "block", "step", "loader", "scaling", "all", "gpu-check", "compile"):
        assert f"\n    {command} " in out, command


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cli_refuses_full_run_without_gpu(capsys):
    assert main(["step", "--no-smoke"]) == 2
    err = capsys.readouterr().err.strip()
    assert "need a CUDA device" in err and "\n" not in err


def test_cli_argument_error_is_one_line(capsys):
    assert main(["step", "--batch", "many"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench: error: argument --batch: invalid int value") and "\n" not in err


def test_summarize_and_table(benchmark):
    times = [float(x) for x in range(1, 102)]
    s = benchmark(common.summarize, times)
    assert (s["ms"], s["ms_min"], s["ms_max"], s["ms_p20"], s["ms_p80"], s["n"]) == (51, 1, 101, 21, 81, 101)
    with pytest.raises(ValueError):
        common.summarize([])
    md = common.markdown_table([{"a": 1.23456, "b": None, "c": [1, 2]}, {"a": 2e-5, "b": "x|y"}])
    assert md.splitlines()[0] == "| a | b |" and "x\\|y" in md and "1.235" in md and "2e-05" in md


def test_phase_timer_and_time_steps():
    def step(i, timer):
        timer.mark("start")
        torch.randn(64, 64) @ torch.randn(64, 64)
        timer.mark("a")
        timer.mark("b")

    res = common.time_steps(step, "cpu", warmup=1, iters=3, order=("start", "a", "missing", "b"))
    assert set(res["phases"]) == {"a", "b"} and len(res["total"]) == 3 and len(res["warmup_s"]) == 1
    assert res["peak_mem_gb"] is None
    assert all(t >= 0 for t in res["total"])


def test_step_flops_microbench(benchmark):
    """The trainer calls train_step_flops every log step: it must be cheap (quadrature cached)."""
    cfg, lc = preset("iMF-XL/2"), LossConfig()
    total = benchmark(flops.train_step_flops, cfg, lc, 256)
    assert total == pytest.approx(sum(flops.train_step_breakdown(cfg, lc, 256).values()))


def test_scaling_model():
    n = scaling.param_counts("iMF-B/2")
    assert n["total"] - n["blocks"] < 0.05 * n["total"]
    # the guidance forward gathers everything but the u-head
    assert n["guidance"] < n["total"] and n["guidance_calls"] == 1
    vol = scaling.comm_bytes("iMF-B/2")
    assert vol["allgather"] == 2 * (n["total"] + n["blocks"] + n["guidance"])
    assert vol["reduce_scatter"] == 4 * n["total"]
    rows = scaling.project("iMF-B/2", step_ms=100.0, batch=32)
    links = scaling.Links()
    for r in rows:
        g = r["gpus"]
        expect = (g - 1) / g * (vol["allgather"] + vol["reduce_scatter"]) / (links.busbw(r["nodes"]) * 1e9) * 1e3
        assert r["t_comm_ms"] == pytest.approx(expect)
        assert r["efficiency_serial"] <= r["efficiency_overlap"] <= 1.0
    assert rows[0]["t_comm_ms"] == 0 and rows[0]["efficiency_serial"] == 1.0
    assert links.busbw(1) == 360.0 and links.busbw(2) == 320.0
    assert scaling.param_counts("MF-B/2")["guidance_calls"] == 0
    with pytest.raises(ValueError, match="both"):
        scaling.project("iMF-B/2", step_ms=1.0)
