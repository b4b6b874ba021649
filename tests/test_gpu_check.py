"""``python -m bench gpu-check`` on the CPU: the stage runner with fake fast, slow and hung stages (time boxes,
cutting, incremental writes, the 8-file / no-subfolder rule), the verdict table, the dry run, and smoke
versions of the real stages on tiny shapes (plumbing only: no number here is a measurement).

The fake stages below are module-level functions: the runner's child processes import this file by name
(``tests/`` goes on their ``PYTHONPATH``), so its top-level imports stay light (no torch).
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bench.gpu_check_runner import (
    FILES_MAX,
    KILL_GRACE_S,
    REPORT_MD,
    SUMMARY_JSON,
    Stage,
    StageContext,
    allowed_files,
    check_plan,
    plan_total,
    run_stages,
)

TESTS = Path(__file__).resolve().parent
ME = Path(__file__).stem


# ---- fake stages (run in the runner's child processes) -------------------------------------------------


def fake_fast(ctx):
    ctx.add_row({"value": 1})
    ctx.update(answer=42)


def fake_hang(ctx):
    """Writes a row, then hangs past its box without looking at the deadline (a stuck CUDA call)."""
    ctx.add_row({"value": "before the hang"})
    time.sleep(600)


def fake_cooperative(ctx):
    """Measures until the soft deadline, then records what it left out."""
    for i in range(10_000):
        if ctx.expired():
            ctx.skip(f"item {i}")
            break
        ctx.add_row({"i": i})
        time.sleep(0.05)


def fake_reads_summary(ctx):
    """What the parent had written before this stage started (proves the writes after every stage)."""
    summary = json.loads((ctx.out / SUMMARY_JSON).read_text())
    ctx.update(seen={name: s.get("status") for name, s in summary["stages"].items()})


def fake_litter(ctx):
    (ctx.out / "stray.txt").write_text("x")
    (ctx.out / "sub").mkdir()
    (ctx.out / "sub" / "deep.json").write_text("{}")


def fake_raise(ctx):
    ctx.add_row({"value": 1})
    raise RuntimeError("boom in the stage")


# ---- helpers ----------------------------------------------------------------------------------------------


def stage(name, fn, box=20.0, **options):
    return Stage(name, name, f"fake {fn}", box, f"{ME}:{fn}", options)


def simple_report(state):
    return {"n_stages": len(state["stages"])}, "# fake report\n"


def run(tmp_path, stages, budget=120.0, report=simple_report, monkeypatch=None, known=()):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return run_stages(
        stages, tmp_path, budget_s=budget, smoke=True, env={}, report=report, known=known, log=lambda m: None
    )


def assert_folder_rule(out: Path):
    entries = list(out.iterdir())
    assert len(entries) <= FILES_MAX
    assert not [p for p in entries if p.is_dir()]


# ---- the stage runner -------------------------------------------------------------------------------------


def test_runner_cuts_a_hung_stage_and_keeps_what_every_stage_wrote(tmp_path, monkeypatch):
    stages = [
        stage("fast", "fake_fast", box=6.0),
        stage("hang", "fake_hang", box=2.0),
        stage("coop", "fake_cooperative", 4.0),
        stage("reader", "fake_reads_summary"),
    ]
    t0 = time.monotonic()
    state = run(tmp_path, stages, monkeypatch=monkeypatch)
    wall = time.monotonic() - t0
    st = state["stages"]
    assert [st[n]["status"] for n in ("fast", "hang", "coop", "reader")] == ["done", "cut", "done", "done"]
    assert st["fast"]["result"] == {"answer": 42} and st["fast"]["rows"] == [{"value": 1}]
    # the hung stage cost its box plus what "fast" left of its own (time carried forward) and the kill,
    # not the sleep; its row from before the hang survives
    box = st["hang"]["run"]["box_s"]
    planned = 6.0 + KILL_GRACE_S + 2.0  # the hang stage may run until the plan's end of its own box
    assert planned - st["fast"]["run"]["wall_s"] - 1.0 <= box <= planned
    assert box - 0.1 <= st["hang"]["run"]["wall_s"] <= box + KILL_GRACE_S + 1.0  # box_s is rounded to 0.1 s
    assert st["hang"]["rows"] == [{"value": "before the hang"}]
    with pytest.raises(ProcessLookupError):
        os.kill(st["hang"]["pid"], 0)
    # the cooperative stage stopped at its soft deadline, before the box, and said what it left out
    assert st["coop"]["run"]["wall_s"] < st["coop"]["run"]["box_s"] and st["coop"]["rows"] and st["coop"]["skipped"]
    # the parent had written the summary after each earlier stage
    assert st["reader"]["result"]["seen"] == {"fast": "done", "hang": "cut", "coop": "done", "reader": None}
    assert wall < 45
    summary = json.loads((tmp_path / SUMMARY_JSON).read_text())
    assert summary["n_stages"] == 4 and summary["stages"]["hang"]["status"] == "cut"
    assert (tmp_path / REPORT_MD).read_text() == "# fake report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [SUMMARY_JSON, REPORT_MD, "fast.json", "hang.json", "coop.json", "reader.json"]
    )


def test_runner_removes_what_a_stage_leaves_in_the_folder(tmp_path, monkeypatch):
    state = run(tmp_path, [stage("litter", "fake_litter"), stage("fast", "fake_fast")], monkeypatch=monkeypatch)
    assert sorted(state["removed"]) == ["stray.txt", "sub"]
    assert_folder_rule(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {SUMMARY_JSON, REPORT_MD, "litter.json", "fast.json"}


def test_a_rerun_replaces_the_earlier_run(tmp_path, monkeypatch):
    first = [stage("a", "fake_fast"), stage("b", "fake_cooperative", box=0.5)]
    run(tmp_path, first, monkeypatch=monkeypatch)
    with pytest.raises(ValueError, match="a.json"):  # not a file of this run, and not declared as known
        run(tmp_path, [stage("b", "fake_fast")], monkeypatch=monkeypatch)
    state = run(tmp_path, [stage("b", "fake_fast")], monkeypatch=monkeypatch, known=allowed_files(first))
    assert {p.name for p in tmp_path.iterdir()} == {SUMMARY_JSON, REPORT_MD, "b.json"}
    assert state["stages"]["b"]["rows"] == [{"value": 1}]  # the new b, not the earlier one


def test_runner_records_a_failed_stage_and_goes_on(tmp_path, monkeypatch):
    state = run(tmp_path, [stage("bad", "fake_raise"), stage("fast", "fake_fast")], monkeypatch=monkeypatch)
    bad = state["stages"]["bad"]
    assert bad["status"] == "failed" and "boom in the stage" in bad["error"] and bad["rows"] == [{"value": 1}]
    assert "boom in the stage" in bad["run"]["stderr_tail"]
    assert state["stages"]["fast"]["status"] == "done"


def test_runner_keeps_to_the_budget(tmp_path, monkeypatch):
    stages = [stage("coop", "fake_cooperative", box=100.0), stage("late", "fake_fast")]
    t0 = time.monotonic()
    state = run(tmp_path, stages, budget=14.0, monkeypatch=monkeypatch)
    assert time.monotonic() - t0 < 14.0
    assert state["stages"]["coop"]["status"] in ("done", "cut") and state["stages"]["coop"]["rows"]
    assert (
        state["stages"]["late"]["status"] == "not run"
        and "needs 5 s to yield a first result" in state["stages"]["late"]["reason"]
    )


def test_a_killed_run_leaves_what_it_finished(tmp_path):
    """SIGTERM to the gpu-check process mid-stage: the running child goes with it, the files stay."""
    script = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); from pathlib import Path; import {ME} as t; "
        f"t.run_stages([t.stage('fast', 'fake_fast'), t.stage('hang', 'fake_hang', 60.0)], Path(sys.argv[1]), "
        f"budget_s=120, smoke=True, env={{}}, report=t.simple_report)"
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        env=env,
        cwd=TESTS.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    hang = tmp_path / "hang.json"
    deadline = time.monotonic() + 30
    while not (hang.exists() and json.loads(hang.read_text())["rows"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = json.loads(hang.read_text())["pid"]
    proc.terminate()
    assert proc.wait(timeout=15) != 0
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    summary = json.loads((tmp_path / SUMMARY_JSON).read_text())
    assert summary["stages"]["fast"]["status"] == "done" and summary["stages"]["fast"]["result"] == {"answer": 42}
    assert summary["stages"]["hang"]["status"] == "interrupted"
    assert summary["stages"]["hang"]["rows"] == [{"value": "before the hang"}]


def test_plan_rules(tmp_path):
    check_plan([stage(f"s{i}", "fake_fast") for i in range(FILES_MAX - 2)])
    with pytest.raises(ValueError, match="holds 8"):
        check_plan([stage(f"s{i}", "fake_fast") for i in range(FILES_MAX - 1)])
    with pytest.raises(ValueError, match="unique"):
        check_plan([stage("a", "fake_fast"), stage("a", "fake_fast")])
    with pytest.raises(ValueError, match="letters"):
        check_plan([stage("../a", "fake_fast")])
    assert plan_total([stage("a", "x", 10), stage("b", "x", 20)]) == pytest.approx(30 + 2 * KILL_GRACE_S + 5)


def test_out_dir_with_foreign_files_is_refused(tmp_path, capsys):
    from bench.gpu_check import main

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        run_stages([stage("a", "fake_fast")], tmp_path, budget_s=60, smoke=True, env={}, report=simple_report)
    assert main(["--smoke", "--stages", "env", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.txt" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


# ---- verdict ----------------------------------------------------------------------------------------------


def _kernel(op, mode, impl, seq, head_dim, **kw):
    return {"op": op, "mode": mode, "impl": impl, "seq": seq, "head_dim": head_dim, "batch": 32768 // seq, **kw}


def _state(kernel_rows=(), step_rows=(), outcomes=(), smoke=False, status="done"):
    tests = [{"test": f"tests/test_x.py::test_{i}", "outcome": o} for i, o in enumerate(outcomes)]
    stages = {
        "kernels": {"status": status, "rows": list(kernel_rows)},
        "step": {"status": status, "rows": list(step_rows)},
        "correctness": {"status": status, "rows": tests},
    }
    return {"smoke": smoke, "stages": stages, "budget_s": 420, "started_utc": "now", "plan": []}


def _by_target(rows):
    return {r["target"]: r for r in rows}


def test_verdict_met_not_met_and_not_measured():
    from bench.gpu_check_report import NOT_MEASURED, verdict

    kernels = [
        _kernel("attention", "fwd", "sdpa_flash", 276, 64, imf_speedup=1.5),
        _kernel("attention", "fwd", "sdpa_flash", 4096, 72, imf_speedup=1.1),  # the worst in range: not met
        _kernel("attention", "fwd", "sdpa_flash", 8192, 64, imf_speedup=0.1),  # outside seq 256-4096: ignored
        _kernel("attention", "fwd+bwd", "sdpa_flash", 1024, 64, imf_speedup=1.05),
        _kernel("attention_jvp", "fwd", "imf_kernels", 4096, 64, tflops=410.0),
        _kernel("attention_jvp", "fwd", "imf_kernels", 8192, 64, tflops=500.0),
        _kernel("attention_jvp", "fwd+bwd", "imf_kernels", 1024, 64, peak_mem_mb=100.0),
        _kernel("attention_jvp", "fwd+bwd", "imf_kernels", 8192, 64, peak_mem_mb=120.0),
        _kernel("attention_jvp", "fwd+bwd", "torch_func_jvp_math", 1024, 64, imf_speedup=6.0),
        _kernel("attention_jvp", "fwd+bwd", "torch_func_jvp_math", 8192, 64, error="OutOfMemoryError"),
    ]
    eng = {
        "preset": "iMF-B/2",
        "variant": "engine",
        "batch": 256,
        "ms": 100.0,
        "images_per_s": 2560.0,
        "mfu": 0.35,
        "flops_per_step": 7.0,
    }
    steps = [
        eng,
        {**eng, "variant": "baseline_eager", "ms": 400.0},
        {**eng, "variant": "baseline_compiled", "ms": 120.0},
        {**eng, "variant": "fm_compiled", "ms": 50.0, "flops_per_step": 3.0},
    ]
    got = _by_target(verdict(_state(kernels, steps, ["passed"] * 10 + ["failed", "skipped"])))
    expect = {
        "GPU correctness: every kernel, bf16 + fp16 vs fp64 (gpu-check stage 2)": ("not met", "1 failed tests"),
        "attention fwd+bwd vs SDPA flash, seq 256-4096, d64/72": ("met", "1.05x"),
        "attention fwd vs SDPA flash, seq 256-4096, d64/72": ("not met", "1.1x"),
        "attention fwd vs SDPA cuDNN, seq 256-4096, d64/72": (NOT_MEASURED, None),
        "attention_jvp fwd+bwd vs torch.func.jvp over math attention": ("met", "6x"),
        "attention_jvp memory O(seq): per-token peak, longest / shortest seq": ("met", "1.2x"),
        "attention_jvp fwd+bwd vs jvp-flash-attention": (NOT_MEASURED, None),
        "attention_jvp TFLOP/s, seq 4096, d64": ("met", "410 TFLOP/s"),
        "attention_jvp TFLOP/s, seq 8192, d64": ("not met", "500 TFLOP/s"),
        "iMF-B/2 step vs plain-PyTorch reference, eager (same batch)": ("met", "4x"),
        "iMF-B/2 step vs plain-PyTorch reference, compiled (same batch)": ("not met", "1.2x"),
        "iMF-B/2 images/s per GPU (target set for an H100)": ("met", "2.56e+03 img/s"),
        # (100 / 50) / (7 / 3) = 0.857
        "iMF step / flow-matching step, over their FLOP ratio": ("met", "0.857x"),
        "MFU iMF-B/2 (counted FLOPs / measured bf16 matmul peak)": ("not met", "35 %"),
        "MFU iMF-XL/2": (NOT_MEASURED, None),
    }
    for target, (status, measured) in expect.items():
        assert (got[target]["verdict"], got[target]["measured"]) == (status, measured), target
    assert "no timed sdpa_cudnn" in got["attention fwd vs SDPA cuDNN, seq 256-4096, d64/72"]["detail"]
    assert got["MFU iMF-XL/2"]["detail"] == "stage step_more not in this run"
    assert {r["verdict"] for r in got.values() if r["goal"] == "outside gpu-check"} == {NOT_MEASURED}


def test_verdict_makes_no_claim_on_a_smoke_run_and_says_why_nothing_was_measured():
    from bench.gpu_check_report import NOT_MEASURED, SMOKE, report, verdict

    rows = [_kernel("attention_jvp", "fwd", "imf_kernels", 4096, 64, tflops=1e-6)]
    got = _by_target(verdict(_state(rows, smoke=True)))
    assert got["attention_jvp TFLOP/s, seq 4096, d64"]["verdict"] == SMOKE
    cut = _by_target(verdict(_state(status="cut")))
    assert cut["attention_jvp TFLOP/s, seq 8192, d64"] == {
        **cut["attention_jvp TFLOP/s, seq 8192, d64"],
        "verdict": NOT_MEASURED,
        "detail": "stage kernels: cut",
    }
    cut_tests = _by_target(verdict(_state(outcomes=["passed", "failed"], status="cut")))  # counted from the rows
    assert cut_tests["GPU correctness: every kernel, bf16 + fp16 vs fp64 (gpu-check stage 2)"]["verdict"] == "not met"
    extra, md = report(_state(rows, smoke=True))
    assert extra["verdict"] and md.rstrip().splitlines()[-1].startswith("| scaling to 8 GPUs")
    assert "Smoke run on a CPU" in md


# ---- the CLI: dry run and errors ----------------------------------------------------------------------------


def test_dry_run_plans_the_whole_check_within_420_s(capsys):
    from bench.__main__ import main
    from bench.gpu_check_stages import plan

    assert plan_total(plan()) <= 420
    assert main(["gpu-check", "--dry-run", "--budget-s", "420"]) == 0
    out = capsys.readouterr().out
    for s in plan():
        assert f"| {s.name} | {s.box_s:g} |" in out
    assert "IMF_KERNELS_PINNED=1" in out and out.rstrip().endswith("fits")


def test_dry_run_with_a_small_budget_fails(capsys):
    from bench.gpu_check import main

    assert main(["--dry-run", "--budget-s", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--budget-s is 100" in err
    assert main(["--dry-run", "--budget-s", "100", "--stages", "env"]) == 0
    assert main(["--dry-run", "--stages", "env,nope"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err


def test_a_real_run_without_cuda_is_one_line(tmp_path, capsys):
    import torch

    from bench.gpu_check import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["--budget-s", "420", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CUDA device" in err
    assert not (tmp_path / "out").exists()


# ---- smoke versions of the real stages (CPU tensors, tiny shapes; plumbing only) ------------------------------


needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the kernel smoke runs need TRITON_INTERPRET=1"
)


def _ctx(tmp_path, s):
    return StageContext(s.name, tmp_path, time.time() + s.box_s, True, s.options, s.needs)


def test_stage_file_records_the_kernel_configs_used(tmp_path, monkeypatch):
    """Every stage write carries the configs the autotuner chose so far (``imf_kernels.tuned_configs()``),
    so a GPU run can be replayed with ``IMF_KERNELS_CONFIGS``; a stage that never imported the kernels has
    none."""
    import imf_kernels

    monkeypatch.setitem(sys.modules, "imf_kernels", None)  # as in a child that has not imported it
    ctx = StageContext("env", tmp_path, time.time() + 5, True, {})
    assert "kernel_configs" not in json.loads((tmp_path / "env.json").read_text())
    monkeypatch.setitem(sys.modules, "imf_kernels", imf_kernels)
    chosen = {"kwargs": {"BLOCK_M": 64, "BLOCK_N": 64}, "num_warps": 4, "num_stages": 3}
    monkeypatch.setitem(imf_kernels._tuning._choices, "attention_op._attn_fwd", {"276|64|False": chosen})
    ctx.add_row({"op": "attention"})
    saved = json.loads((tmp_path / "env.json").read_text())["kernel_configs"]
    assert saved["kernels"]["attention_op._attn_fwd"] == {"276|64|False": chosen}
    monkeypatch.setattr(imf_kernels._tuning, "_loaded", {})  # load_cache below must not leak into other tests
    replay = tmp_path / "configs.json"
    replay.write_text(json.dumps(saved))  # the stage's record, as is, is a config cache
    assert imf_kernels._tuning.load_cache(replay) == sum(len(t) for t in saved["kernels"].values())


@needs_interpreter
def test_smoke_environment_kernels_and_step(tmp_path):
    from bench import gpu_check_stages as stages

    plan = {s.name: s for s in stages.plan(smoke=True)}
    stages.environment(_ctx(tmp_path, plan["env"]))
    peak = json.loads((tmp_path / "env.json").read_text())["result"]
    assert peak["matmul_peak"]["tflops"] > 0 and peak["copy_bandwidth"]["gbps"] > 0
    assert {"device", "torch", "triton", "git_commit"} <= set(peak["env"])

    items = [["attention_jvp", 17, 72, 2, 1], ["attention", 17, 72, 2, 1]]
    kernels = replace(plan["kernels"], options={**plan["kernels"].options, "items": items})
    ctx = _ctx(tmp_path, kernels)
    stages.kernels(ctx)
    rows = ctx.data["rows"]
    assert {(r["op"], r["mode"]) for r in rows} == {
        (o, m) for o in ("attention", "attention_jvp") for m in ("fwd", "fwd+bwd")
    }
    assert all("error" not in r and r["head_dim"] == 72 and r["pct_matmul_peak"] > 0 for r in rows), rows

    runs = [["iMF-B/2", "engine", 2, 1], ["iMF-B/2", "baseline_eager", "shared", 1]]
    step = replace(plan["step"], options={**plan["step"].options, "runs": runs})
    ctx = _ctx(tmp_path, step)
    stages.training_step(ctx)
    assert [(r["variant"], r["batch"]) for r in ctx.data["rows"]] == [("engine", 2), ("baseline_eager", 4)]
    assert all(r["images_per_s"] > 0 and r["mfu"] > 0 and r["ms_backward"] > 0 for r in ctx.data["rows"]), ctx.data


def test_smoke_stage_time_box_leaves_items_out(tmp_path):
    from bench import gpu_check_stages as stages

    kernels = next(s for s in stages.plan(smoke=True) if s.name == "kernels")
    ctx = StageContext("kernels", tmp_path, time.time() - 1, True, kernels.options, kernels.needs)  # deadline past
    stages.kernels(ctx)
    assert not ctx.data["rows"] and len(ctx.data["skipped"]) == len(kernels.options["items"])
    assert all(s["reason"].startswith("needs 1 s") for s in ctx.data["skipped"]), ctx.data["skipped"]


@pytest.mark.slow
def test_smoke_correctness_records_every_test(tmp_path, monkeypatch):
    """The correctness stage through the runner (pytest in the child), on its interpreter stand-in selection."""
    from bench.gpu_check_report import report, test_counts
    from bench.gpu_check_stages import plan

    s = next(s for s in plan(smoke=True) if s.name == "correctness")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    state = run_stages([s], tmp_path, budget_s=120, smoke=True, env={}, report=report, log=lambda m: None)
    data = state["stages"]["correctness"]
    assert data["status"] == "done", data.get("run")
    n = len(data["rows"])
    assert test_counts(state) == {"passed": n, "failed": 0, "skipped": 0, "collected": n, "never started": 0}
    assert n >= 2 and sum(data["result"]["collected_by_tier"].values()) == n
    assert [t for t, _ in data["result"]["order"]] == [r["test"] for r in data["rows"]]
    assert all(r["outcome"] == "passed" and "::" in r["test"] for r in data["rows"])
    assert "## Correctness" in (tmp_path / REPORT_MD).read_text()


# ---- time carried forward, minimum times, the plan ------------------------------------------------------------


def fake_time_left(ctx):
    ctx.update(time_left=ctx.time_left(), begin_big=ctx.begin("big item", 1e6), begin_small=ctx.begin("small", 0.1))


def test_unused_time_carries_forward_and_a_stage_needs_its_minimum(tmp_path, monkeypatch):
    """A stage that finishes early leaves its time to the next (box 30 + ~40 carried); a stage whose
    first item needs more than the budget left is not started; ``begin`` refuses an item that would not fit."""
    stages = [
        stage("quick", "fake_fast", box=40.0),
        stage("late", "fake_time_left", box=30.0),
        replace(stage("never", "fake_fast", box=30.0), needs=(("a compile and a timing", 500.0),)),
    ]
    state = run(tmp_path, stages, budget=200.0, monkeypatch=monkeypatch)
    st = state["stages"]
    assert st["late"]["run"]["box_s"] > 30.0 + 40.0 - st["quick"]["run"]["wall_s"] - 1.0
    assert st["late"]["result"]["time_left"] > 30.0 and st["late"]["result"]["begin_small"] is True
    assert st["late"]["result"]["begin_big"] is False
    assert st["late"]["skipped"] == [{"item": "big item", "reason": st["late"]["skipped"][0]["reason"]}]
    assert st["late"]["skipped"][0]["reason"].startswith("needs 1000000 s")
    assert st["never"]["status"] == "not run" and st["never"]["reason"].startswith("needs 500 s")


def test_plan_core_items_must_fit_their_box():
    ok = replace(stage("a", "fake_fast", box=10.0), needs=(("x", 4.0), ("y", 6.0), ("z", 50.0)), core=2)
    check_plan([ok])
    assert ok.min_s == 5.0 and ok.core_s() == 10.0  # min_s: the first need, at least the runner's floor
    with pytest.raises(ValueError, match="3 core items need 60 s"):
        check_plan([replace(ok, core=3)])


def test_dry_run_shows_minimums_items_and_the_cold_cache_fit(capsys):
    """The window's plan: correctness (training-step kernels), the iMF-B/2 step with both baselines at one
    batch, and the JVP headline shapes are core items, sized for a cold cache, within 420 s."""
    from bench.gpu_check import main
    from bench.gpu_check_runner import plan_ends
    from bench.gpu_check_stages import plan

    stages = plan()
    assert [s.name for s in stages] == ["env", "correctness", "step", "kernels", "step_more"]
    core = {s.name: [item for item, _ in s.needs[: s.core]] for s in stages}
    assert core["correctness"] == ["training-step kernels (bf16, iMF-B/2 and MF-B/2 shapes)"]
    assert [i.split(" batch")[0] for i in core["step"][1:]] == [
        "iMF-B/2 engine",
        "iMF-B/2 baseline_eager",
        "iMF-B/2 engine",
        "iMF-B/2 baseline_compiled",
    ]
    assert core["kernels"] == [f"attention_jvp seq {s} head_dim 64" for s in (4096, 8192, 276)]
    assert plan_ends(stages)[-1] + 5 <= 420 and all(s.core_s() <= s.box_s for s in stages)
    assert main(["--dry-run", "--budget-s", "420"]) == 0
    out = capsys.readouterr().out
    assert "| 3 | step | 170 | 20 | 170 | " in out and "baseline_compiled batch shared 75" in out
    assert "sized for a cold Triton cache" in out and out.rstrip().endswith("fits")


# ---- correctness: order and verdict -----------------------------------------------------------------------------


def test_correctness_order_puts_the_training_step_kernels_first():
    import torch

    from bench.gpu_check_stages import _training_dims, order_items, tier_of

    dims, head_dims = _training_dims()
    assert {276, 256, 768, 12, 64, 2048, 3072, 2304} <= dims and head_dims == {64}
    bf16, fp16 = torch.bfloat16, torch.float16
    assert tier_of("tests/test_dual_ops.py", {"shape": (16, 276, 768), "dtype": bf16}, dims) == 0
    assert tier_of("tests/test_dual_ops.py", {"shape": (16, 276, 768), "dtype": fp16}, dims) == 1  # seq 276
    assert tier_of("tests/test_dual_ops.py", {"shape": (4, 276, 1152), "dtype": bf16}, dims) == 1
    assert tier_of("tests/test_dual_ops.py", {"shape": (8, 276, 16, 72), "dtype": bf16}, dims) == 1
    assert tier_of("tests/test_dual_ops.py", {"dtype": bf16, "mode": "full"}, dims) == 0  # linear at B/2
    assert tier_of("tests/test_attention.py", {"seq": 1024, "head_dim": 128, "dtype": bf16}, dims) == 2
    assert tier_of("tests/test_attention_bwd_atomic.py", {"seq": 256, "head_dim": 64, "dtype": bf16}, dims) == 2
    assert tier_of("tests/test_attention.py", {}, dims) == 2

    class Item:
        def __init__(self, nodeid, **params):
            self.nodeid, self.callspec = nodeid, type("CallSpec", (), {"params": params})()

    items = [
        Item(
            "tests/test_attention.py::m",
        ),
        Item("tests/test_attention.py::a[fp16]", seq=256, head_dim=64, dtype=fp16),
        Item("tests/test_attention.py::a[1024]", seq=1024, head_dim=64, dtype=bf16),
        Item("tests/test_attention.py::a[72]", seq=276, head_dim=72, dtype=fp16),
        Item("tests/test_attention.py::a[72b]", seq=276, head_dim=72, dtype=bf16),
        Item("tests/test_attention.py::a[bf16]", seq=256, head_dim=64, dtype=bf16),
    ]
    tiers = order_items(items)
    assert [i.nodeid.split("::")[1] for i in items] == ["a[bf16]", "a[72b]", "a[72]", "a[1024]", "m", "a[fp16]"]
    assert [tiers[i.nodeid] for i in items] == [0, 1, 1, 2, 2, 2]


def test_correctness_stage_runs_on_past_a_module_that_does_not_import(tmp_path, monkeypatch):
    """The correctness stage as the runner runs it, on two test modules of which one fails to import: the
    other's tests still run, the broken one is a failed row, and the verdict is not met."""
    from bench.gpu_check_report import test_counts, verdict

    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "test_ok.py").write_text("def test_a():\n    pass\n\n\ndef test_b():\n    pass\n")
    (tests / "test_broken.py").write_text("import a_module_that_is_not_there\n")
    s = Stage("correctness", "c", "c", 60, "bench.gpu_check_stages:correctness", {"pytest_args": [str(tests)]})
    out = tmp_path / "out"
    state = run_stages([s], out, budget_s=90, smoke=True, env={}, report=lambda st: ({}, ""), log=lambda m: None)
    rows = state["stages"]["correctness"]["rows"]
    assert sorted((r["test"].split("/")[-1], r["outcome"]) for r in rows) == [
        ("test_broken.py", "failed"),
        ("test_ok.py::test_a", "passed"),
        ("test_ok.py::test_b", "passed"),
    ]
    assert test_counts(state)["failed"] == 1
    row = _by_target(verdict({**state, "smoke": False}))
    assert row["GPU correctness: every kernel, bf16 + fp16 vs fp64 (gpu-check stage 2)"]["verdict"] == "not met"


def _corr_state(outcomes, collected, tiers=None):
    rows = [
        {"test": f"tests/test_x.py::t{i}", "when": "call", "outcome": o, "tier": (tiers or {}).get(i)}
        for i, o in enumerate(outcomes)
    ]
    return {"stages": {"correctness": {"status": "done", "rows": rows, "result": {"collected": collected}}}}


@pytest.mark.parametrize(
    "outcomes, collected, expect",
    [
        (["passed"] * 5, 5, "met"),
        (["passed"] * 5, 93, "not measured"),  # 88 never started: the stage was cut
        (["passed"] * 4 + ["skipped"], 5, "not measured"),  # skipped by the time box
        (["passed"] * 4 + ["failed"], 93, "not met"),
    ],
)
def test_correctness_is_met_only_when_every_collected_test_ran_and_passed(outcomes, collected, expect):
    from bench.gpu_check_report import test_counts, verdict

    state = {**_corr_state(outcomes, collected), "smoke": False}
    row = _by_target(verdict(state))["GPU correctness: every kernel, bf16 + fp16 vs fp64 (gpu-check stage 2)"]
    assert row["verdict"] == expect, row
    n = test_counts(state)
    assert n["never started"] == collected - len(outcomes)
    assert f"{n['never started']} never started of {collected} collected" in row["detail"]


def test_step_ratios_use_rows_at_one_batch_and_images_per_s_the_largest():
    from bench.gpu_check_report import verdict

    eng = {"preset": "iMF-B/2", "variant": "engine", "batch": 32, "ms": 40.0, "mfu": 0.3, "images_per_s": 800.0}
    steps = [
        eng,
        {**eng, "batch": 256, "ms": 200.0, "mfu": 0.45, "images_per_s": 1280.0},
        {**eng, "variant": "baseline_eager", "ms": 160.0},
        {**eng, "variant": "baseline_compiled", "batch": 16, "ms": 30.0},  # no engine row at 16
    ]
    got = _by_target(verdict(_state(step_rows=steps)))
    assert got["iMF-B/2 step vs plain-PyTorch reference, eager (same batch)"]["measured"] == "4x"
    assert got["iMF-B/2 step vs plain-PyTorch reference, eager (same batch)"]["detail"] == "batch 32"
    assert got["iMF-B/2 step vs plain-PyTorch reference, compiled (same batch)"]["verdict"] == "not measured"
    assert got["iMF-B/2 images/s per GPU (target set for an H100)"]["measured"] == "1.28e+03 img/s"
    assert got["MFU iMF-B/2 (counted FLOPs / measured bf16 matmul peak)"]["detail"] == "batch 256"


def test_report_counts_each_stage_s_compiles():
    from bench.gpu_check_report import report

    state = _state()
    state["plan"] = [{"#": 1, "stage": "kernels", "title": "k", "box_s": 80}]
    state["stages"]["kernels"]["triton_cache"] = {"dir": "/c", "entries_at_start": 12, "entries_now": 19}
    _, md = report(state)
    assert "| 1 | kernels | k | 80 | done |  | 0 | 0 | 7 |" in md


def test_fit_batch():
    from bench.step_bench import fit_batch

    # iMF-B/2's eager reference: ~0.9 GiB per sample; an H100 with ~79 GiB free, ~2 GiB of weights and state
    assert fit_batch(0.9, 2.0, 79.0, (64, 32, 16, 8)) == 64
    assert fit_batch(0.9, 2.0, 40.0, (64, 32, 16, 8)) == 32
    assert fit_batch(0.9, 2.0, 5.0, (64, 32, 16, 8)) == 8  # none fits: the smallest (its row says OOM)


def test_fit_shared_batch_reads_the_memory_line_from_two_probe_steps(monkeypatch):
    """Peak memory 3.8 GiB at batch 2 and 5.6 at batch 4: 0.9 GiB per sample on 2 GiB fixed; with 40 GiB
    free, 32 fits (2 + 28.8 <= 34) and 64 does not (2 + 57.6 > 34)."""
    import torch

    from bench import step_bench

    calls = []

    def probe(variant, preset, batch, **kw):
        calls.append((variant, preset, batch, kw["warmup"], kw["iters"]))
        return {"peak_mem_gb": 2.0 + 0.9 * batch}

    monkeypatch.setattr(step_bench, "run_variant", probe)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))
    fit = step_bench.fit_shared_batch("iMF-B/2", (64, 32, 16, 8), dtype=torch.bfloat16, device="cuda")
    assert calls == [("baseline_eager", "iMF-B/2", 2, 0, 1), ("baseline_eager", "iMF-B/2", 4, 0, 1)]
    assert fit["batch"] == 32
    assert fit["per_sample_gb"] == pytest.approx(0.9) and fit["fixed_gb"] == pytest.approx(2.0)


# ---- provenance: the commit without .git ------------------------------------------------------------------------


def _git_tree(path: Path) -> str:
    (path / "bench").mkdir(parents=True)
    (path / "a.txt").write_text("one\n")
    (path / "b.txt").write_text("two\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@x"
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=path, check=True, env=env)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()


def test_provenance_from_git_stamp_env_or_unknown(tmp_path):
    import shutil

    from bench.provenance import UNKNOWN, describe, provenance, stamp

    src = tmp_path / "src"
    commit = _git_tree(src)
    assert provenance(src, environ={}) == {"git_commit": commit, "git_dirty": False, "commit_source": "git"}
    stamp(src)
    bare = tmp_path / "bare"
    shutil.copytree(src, bare, ignore=shutil.ignore_patterns(".git"))
    got = provenance(bare, environ={})
    assert (got["git_commit"], got["git_dirty"], got["stamp_matches_tree"]) == (commit, False, True)
    (bare / "b.txt").write_text("changed\n")
    got = provenance(bare, environ={})
    assert (got["git_dirty"], got["changed_since_stamp"]) == (True, ["b.txt"])
    env = {"IMF_GIT_COMMIT": "abc123"}
    assert provenance(bare, environ=env)["git_commit"] == "abc123"  # the environment wins over a stamp
    assert provenance(bare, environ=env)["git_dirty"] == UNKNOWN
    (bare / "bench" / ".commit").unlink()
    got = provenance(bare, environ={})
    assert (got["git_commit"], got["git_dirty"]) == (UNKNOWN, UNKNOWN)
    assert describe(got) == "commit unknown (dirty state unknown)"
    with pytest.raises(ValueError, match="not a git work tree"):
        stamp(bare)
