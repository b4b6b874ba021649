"""The verdict and the report of ``python -m bench gpu-check``, from the run state of the stage runner.

:func:`verdict` turns the stages' rows into one row per target of docs/design.md section 7 (GPU
table): the goal, the measured value (the worst case over the shapes a target covers), and met / not
met / not measured (with why: the stage was cut, failed, not run, or has no such row). A smoke run
makes no claim. :func:`report` renders ``gpu_check.md``: stages and their status, the measured
ceilings, failed tests, the kernel and step rows, what the time boxes left out, and the verdict last.
"""

from __future__ import annotations

from bench.provenance import describe

MET, NOT_MET, NOT_MEASURED, SMOKE = "met", "not met", "not measured", "smoke: no claim"


def _rows(state: dict, *stages: str) -> list[dict]:
    return [r for s in stages for r in state["stages"].get(s, {}).get("rows", [])]


def _missing(state: dict, stage: str, what: str) -> tuple[None, str]:
    """``(None, why)``: the stage's status when it has no rows, else that ``what`` is not among them."""
    data = state["stages"].get(stage, {})
    if data.get("rows"):
        return None, f"no {what} in stage {stage} ({data.get('status')})"
    return None, f"stage {stage}: {data['status']}" if data.get("status") else f"stage {stage} not in this run"


def _worst_ratio(state, op, mode, impl, seqs=(0, 1 << 30), head_dims=None):
    """The smallest ``imf_speedup`` (baseline time / ours) over the kernel rows that match."""
    sel = [
        r
        for r in _rows(state, "kernels")
        if r["op"] == op
        and r["mode"] == mode
        and r["impl"] == impl
        and seqs[0] <= r["seq"] <= seqs[1]
        and (head_dims is None or r["head_dim"] in head_dims)
        and isinstance(r.get("imf_speedup"), int | float)
    ]
    if not sel:
        return _missing(state, "kernels", f"timed {impl} {op} {mode} row")
    w = min(sel, key=lambda r: r["imf_speedup"])
    return w["imf_speedup"], f"min of {len(sel)} shapes, at seq {w['seq']} d{w['head_dim']}"


def _jvp_tflops(state, seq):
    sel = [
        r
        for r in _rows(state, "kernels")
        if (r["op"], r["mode"], r["impl"], r["seq"], r["head_dim"]) == ("attention_jvp", "fwd", "imf_kernels", seq, 64)
        and "tflops" in r
    ]
    return (
        (sel[0]["tflops"], "dual forward, 6-matmul count") if sel else _missing(state, "kernels", f"seq {seq} d64 row")
    )


def _jvp_memory(state):
    """Peak memory per token of attention_jvp fwd+bwd (d64) at the longest over the shortest sequence; the
    token count per call is fixed, so O(seq) memory gives about 1 and O(seq^2) gives seq_max / seq_min."""
    sel = sorted(
        (
            r
            for r in _rows(state, "kernels")
            if (r["op"], r["mode"], r["impl"], r["head_dim"]) == ("attention_jvp", "fwd+bwd", "imf_kernels", 64)
            and r.get("peak_mem_mb")
        ),
        key=lambda r: r["seq"],
    )
    if len(sel) < 2:
        return _missing(state, "kernels", "two d64 sequence lengths with memory numbers")
    per_token = [r["peak_mem_mb"] / (r["batch"] * r["seq"]) for r in (sel[0], sel[-1])]
    return per_token[1] / per_token[
        0
    ], f"seq {sel[0]['seq']} -> {sel[-1]['seq']} (quadratic: {sel[-1]['seq'] / sel[0]['seq']:.0f})"


def _step_rows(state, preset, variant) -> list[dict]:
    """The timed rows of ``preset`` / ``variant``, largest batch first."""
    rows = [
        r for r in _rows(state, "step", "step_more") if r["preset"] == preset and r["variant"] == variant and "ms" in r
    ]
    return sorted(rows, key=lambda r: -r["batch"])


def _same_batch(state, preset, a, b):
    """The rows of variants ``a`` and ``b`` at the largest batch both were timed at, or None."""
    rows_b = {r["batch"]: r for r in _step_rows(state, preset, b)}
    return next(((r, rows_b[r["batch"]]) for r in _step_rows(state, preset, a) if r["batch"] in rows_b), None)


def _step_speedup(state, baseline):
    pair = _same_batch(state, "iMF-B/2", "engine", baseline)
    if pair is None:
        return _missing(state, "step", f"timed engine and {baseline} rows at one batch")
    eng, base = pair
    return base["ms"] / eng["ms"], f"batch {eng['batch']}"


def _step_value(state, preset, key, scale=1.0):
    """``key`` of the engine row at the largest batch timed (the training batch when it ran)."""
    eng = next((r for r in _step_rows(state, preset, "engine") if r.get(key) is not None), None)
    if eng is None:
        return _missing(state, "step" if preset == "iMF-B/2" else "step_more", f"{key} of a timed {preset} engine row")
    return eng[key] * scale, f"batch {eng['batch']}"


def _efficiency(state):
    pair = _same_batch(state, "iMF-B/2", "engine", "fm_compiled")
    if pair is None:
        return _missing(state, "step_more", "timed engine and fm_compiled rows at one batch")
    eng, fm = pair
    time_ratio, flop_ratio = eng["ms"] / fm["ms"], eng["flops_per_step"] / fm["flops_per_step"]
    return time_ratio / flop_ratio, f"batch {eng['batch']}: time ratio {time_ratio:.2f} / FLOP ratio {flop_ratio:.2f}"


def test_counts(state: dict) -> dict[str, int]:
    """Tests of the correctness stage by outcome, from its rows (so a cut stage counts too), plus
    ``collected`` and ``never started`` (collected, with no row: the stage was cut or failed first)."""
    data = state["stages"].get("correctness", {})
    rows = data.get("rows", [])
    n = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "failed", "skipped")}
    collected = data.get("result", {}).get("collected")
    ran = {r["test"] for r in rows if r.get("when") != "collect"}
    n["collected"] = collected if collected is not None else len(ran)
    n["never started"] = max(n["collected"] - len(ran), 0)
    return n


def _correctness(state):
    """The failed tests; met only when every collected test ran and passed (see :func:`verdict`)."""
    n = test_counts(state)
    if not n["passed"] and not n["failed"]:
        return _missing(state, "correctness", "passed or failed test")
    data = state["stages"]["correctness"]
    tier = {}
    for r in data.get("rows", []):
        if r.get("tier") and r["outcome"] == "passed":
            tier[r["tier"]] = tier.get(r["tier"], 0) + 1
    by_tier = data.get("result", {}).get("collected_by_tier", {})
    tiers = ", ".join(f"{t} {tier.get(t, 0)}/{c}" for t, c in by_tier.items())
    detail = (
        f"{n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped, {n['never started']} never started "
        f"of {n['collected']} collected{'; passed by tier: ' + tiers if tiers else ''}"
    )
    complete = n["passed"] == n["collected"] and not n["skipped"] and not n["never started"]
    return n["failed"], detail, complete


def verdict(state: dict) -> list[dict]:
    """One row per target: ``target``, ``goal``, ``measured``, ``detail``, ``verdict`` (met / not met / not
    measured; a smoke run makes no claim). Correctness is met only when every collected test ran and
    passed: a failure is not met, anything else (skipped, never started, the stage cut) not measured."""
    flash = ((256, 4096), (64, 72))
    checks = [
        (
            "GPU correctness: every kernel, bf16 + fp16 vs fp64 (gpu-check stage 2)",
            "<=",
            0,
            "failed tests",
            _correctness(state),
        ),
        (
            "attention fwd+bwd vs SDPA flash, seq 256-4096, d64/72",
            ">=",
            1.0,
            "x",
            _worst_ratio(state, "attention", "fwd+bwd", "sdpa_flash", *flash),
        ),
        (
            "attention fwd vs SDPA flash, seq 256-4096, d64/72",
            ">=",
            1.2,
            "x",
            _worst_ratio(state, "attention", "fwd", "sdpa_flash", *flash),
        ),
        (
            "attention fwd vs SDPA cuDNN, seq 256-4096, d64/72",
            ">=",
            0.9,
            "x",
            _worst_ratio(state, "attention", "fwd", "sdpa_cudnn", *flash),
        ),
        (
            "attention_jvp fwd+bwd vs torch.func.jvp over math attention",
            ">=",
            5.0,
            "x",
            _worst_ratio(state, "attention_jvp", "fwd+bwd", "torch_func_jvp_math"),
        ),
        ("attention_jvp memory O(seq): per-token peak, longest / shortest seq", "<=", 2.0, "x", _jvp_memory(state)),
        (
            "attention_jvp fwd+bwd vs jvp-flash-attention",
            ">=",
            3.0,
            "x",
            _worst_ratio(state, "attention_jvp", "fwd+bwd", "jvp_flash_attention"),
        ),
        ("attention_jvp TFLOP/s, seq 4096, d64", ">=", 400.0, "TFLOP/s", _jvp_tflops(state, 4096)),
        ("attention_jvp TFLOP/s, seq 8192, d64", ">=", 520.0, "TFLOP/s", _jvp_tflops(state, 8192)),
        (
            "iMF-B/2 step vs plain-PyTorch reference, eager (same batch)",
            ">=",
            3.0,
            "x",
            _step_speedup(state, "baseline_eager"),
        ),
        (
            "iMF-B/2 step vs plain-PyTorch reference, compiled (same batch)",
            ">=",
            1.5,
            "x",
            _step_speedup(state, "baseline_compiled"),
        ),
        (
            "iMF-B/2 images/s per GPU (target set for an H100)",
            ">=",
            1000.0,
            "img/s",
            _step_value(state, "iMF-B/2", "images_per_s"),
        ),
        ("iMF step / flow-matching step, over their FLOP ratio", "<=", 1.1, "x", _efficiency(state)),
        (
            "MFU iMF-B/2 (counted FLOPs / measured bf16 matmul peak)",
            ">=",
            40.0,
            "%",
            _step_value(state, "iMF-B/2", "mfu", 100.0),
        ),
        ("MFU iMF-XL/2", ">=", 50.0, "%", _step_value(state, "iMF-XL/2", "mfu", 100.0)),
        ("DALI latent loader: >= 20x the step's demand, >= 2x torch", None, None, "", (None, "python -m bench loader")),
        ("scaling to 8 GPUs per node", None, None, "", (None, "python -m bench scaling (a model, not measured)")),
    ]
    out = []
    for target, op, threshold, unit, (value, detail, *complete) in checks:
        sep = "" if unit == "x" else " "
        goal = f"{op} {threshold:g}{sep}{unit}" if op else "outside gpu-check"
        met = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        if value is None:
            status = NOT_MEASURED
        elif state.get("smoke"):
            status = SMOKE
        elif met and complete and not complete[0]:  # nothing failed, but not everything ran
            status = NOT_MEASURED
        else:
            status = MET if met else NOT_MET
        measured = None if value is None else f"{value:.3g}{sep}{unit}"
        out.append({"target": target, "goal": goal, "measured": measured, "verdict": status, "detail": detail})
    return out


def _compiles(stage: dict) -> int | None:
    """New entries in the Triton cache during the stage (its kernel and launcher compiles: cache misses)."""
    cache = stage.get("triton_cache")
    return cache["entries_now"] - cache["entries_at_start"] if cache else None


KERNEL_COLUMNS = (
    "op mode impl dtype batch heads seq head_dim ms tflops pct_matmul_peak imf_speedup peak_mem_mb error"
).split()
STEP_COLUMNS = (
    "preset variant backend compiled batch ms ms_guidance ms_dual_forward ms_forward ms_backward ms_optimizer "
    "images_per_s tflops mfu mfu_datasheet peak_mem_gb compile_s error skipped"
).split()


def report(state: dict) -> tuple[dict, str]:
    """``({"verdict": rows}, markdown)`` for :func:`bench.gpu_check_runner.run_stages`."""
    from bench.common import markdown_table

    rows = verdict(state)
    stages = state["stages"]
    env_res = stages.get("env", {}).get("result", {})
    env = env_res.get("env", {})
    md = ["# gpu-check", ""]
    if state.get("smoke"):
        md += ["**Smoke run on a CPU: checks the harness; no number here is a measurement.**", ""]
    if env:
        md += [
            f"{env.get('device')}; driver {env.get('driver')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
            f"torch {env.get('torch')}, triton {env.get('triton')}; {describe(env)} from {env.get('commit_source')}; "
            f"kernel settings {env.get('kernel_env')}",
            "",
        ]
    md += [
        f"Budget {state['budget_s']:g} s, elapsed {state.get('elapsed_s', 0):.0f} s, started {state['started_utc']}.",
        "",
        "## Stages",
        "",
    ]
    table = [
        {
            **p,
            "status": stages.get(p["stage"], {}).get("status", "pending"),
            "wall_s": stages.get(p["stage"], {}).get("run", {}).get("wall_s"),
            "rows": len(stages.get(p["stage"], {}).get("rows", [])),
            "left out": len(stages.get(p["stage"], {}).get("skipped", [])),
            "compiles": _compiles(stages.get(p["stage"], {})),
        }
        for p in state["plan"]
    ]
    md += [markdown_table(table, ["#", "stage", "title", "box_s", "status", "wall_s", "rows", "left out", "compiles"])]
    if env_res.get("matmul_peak"):
        mm = env_res["matmul_peak"]
        ceil = [
            {"ceiling": f"{mm['dtype']} matmul {mm['n']}^3 (measured)", "value": f"{mm['tflops']:.1f} TFLOP/s"},
            {
                "ceiling": "device copy (measured, read + write)",
                "value": f"{env_res.get('copy_bandwidth', {}).get('gbps', float('nan')):.0f} GB/s",
            },
            {"ceiling": "datasheet dense bf16", "value": env_res.get("datasheet_bf16_tflops")},
        ]
        md += ["## Ceilings", "", markdown_table(ceil)]
    corr = stages.get("correctness", {})
    if corr.get("rows"):
        bad = [r for r in corr["rows"] if r["outcome"] == "failed"]
        n = test_counts(state)
        md += [
            "## Correctness",
            "",
            f"{n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped, {n['never started']} never "
            f"started of {n['collected']} collected (in the order run: training-step kernels in bf16, odd "
            f"shapes, the rest; by tier: {corr.get('result', {}).get('collected_by_tier')}).",
            "",
        ]
        if bad:
            md += [markdown_table(bad, ["test", "when", "message"])]
    if stages.get("kernels", {}).get("rows"):
        md += ["## Kernels", "", markdown_table(stages["kernels"]["rows"], KERNEL_COLUMNS)]
    step_rows = _rows(state, "step", "step_more")
    if step_rows:
        md += ["## Training step", "", markdown_table(step_rows, STEP_COLUMNS)]
    left_out = [{"stage": name, **s} for name, st in stages.items() for s in st.get("skipped", [])]
    if left_out:
        md += ["## Left out by the time boxes", "", markdown_table(left_out)]
    md += ["## Verdict (targets: docs/design.md section 7)", "", markdown_table(rows)]
    return {"verdict": rows}, "\n".join(md) + "\n"
