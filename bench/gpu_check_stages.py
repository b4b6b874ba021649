"""The stages of ``python -m bench gpu-check``, in priority order, and the plan that boxes them.

Each stage function runs in its own child process (:mod:`bench.gpu_check_runner`) and gets a
:class:`bench.gpu_check_runner.StageContext` ``ctx``; it writes every measurement as it goes and checks
``ctx.expired()`` between measurements, recording what the time box left out with ``ctx.skip``.
The measurements reuse the benchmark library (``bench.common``, ``bench.attention_bench``,
``bench.step_bench``); nothing here times anything its own way.

1. :func:`environment`: GPU, driver, CUDA, cuDNN, torch, triton, commit (:func:`bench.common.env_info`),
   the measured bf16 matmul peak (8192^3, :func:`bench.common.matmul_peak`) and the device-to-device
   copy bandwidth: the two ceilings the later ratios use.
2. :func:`correctness`: the GPU-marked tests (``pytest -m gpu``: bf16 and fp16 of every kernel, forward,
   backward and tangent against an fp64 reference on fresh random inputs, odd shapes, head_dim 72),
   in-process with a plugin that records every test's outcome as it finishes.
3. :func:`kernels`: :func:`bench.attention_bench.bench_op` for attention and attention_jvp at the
   headline shapes, one shape at a time, most important first; each row gains ``pct_matmul_peak``.
   Attention fwd+bwd runs with both backwards (``imf_kernels``: deterministic, the default;
   ``imf_kernels_atomic_bwd``: ``IMF_KERNELS_ATTN_BWD=atomic``; its ``imf_speedup`` is atomic / deterministic).
4. :func:`training_step`: :func:`bench.step_bench.run_variant` for a list of (preset, variant, batch);
   used twice: iMF-B/2 (engine, reference eager, flow matching compiled, reference compiled), then
   iMF-XL/2 (its MFU target) and MF-B/2 while the budget lasts.

``--smoke`` runs the same functions on a CPU on tiny shapes (the kernels through the Triton
interpreter): they check the plumbing, not speed.
"""

from __future__ import annotations

import contextlib
import os
import time

from bench.gpu_check_runner import Stage

# (seq, head_dim, heads), most important first: the JVP targets (seq 4096 / 8192, d64), the iMF-B/2
# training shape (256 image + 20 condition tokens), MF-XL/2 (head_dim 72), then the rest of the grid.
KERNEL_SHAPES = (
    (4096, 64, 12),
    (8192, 64, 12),
    (276, 64, 12),
    (256, 72, 16),
    (1024, 64, 12),
    (1024, 128, 12),
    (4096, 128, 12),
    (8192, 128, 12),
    (1024, 72, 16),
)
SMOKE_KERNEL_SHAPES = ((33, 64, 2), (17, 72, 2))
KERNEL_TOKENS = 32768  # batch = tokens // seq (bench_op's default)

# (preset, variant, batch) in priority order. The step targets are iMF-B/2's; the second list adds
# iMF-XL/2 (MFU >= 50%) before MF-B/2 (no target of its own).
STEP_RUNS = (
    ("iMF-B/2", "engine", 256),
    ("iMF-B/2", "baseline_eager", 256),
    ("iMF-B/2", "fm_compiled", 256),
    ("iMF-B/2", "baseline_compiled", 256),
)
STEP_MORE_RUNS = (("iMF-XL/2", "engine", 128), ("MF-B/2", "engine", 256), ("MF-B/2", "baseline_eager", 256))
SMOKE_BATCH = 4

GPU_TESTS = ("tests", "-m", "gpu")
# Interpreter stand-ins for the smoke run (CPU tensors, small odd shapes): the plumbing, not the GPU.
SMOKE_TESTS = ("tests/test_attention.py", "-m", "not gpu", "-k", "explicit_scale or primal_equals_attention")

PYTEST_OPTIONS = ("-q", "-p", "no:cacheprovider")


def plan(smoke: bool = False) -> list[Stage]:
    """The stages with their time boxes (seconds; the same boxes for ``--smoke``)."""
    me = __name__
    step = (
        {"dtype": "fp32", "warmup": 1, "iters": 2, "engine_backend": "reference", "compile_backend": "eager"}
        if smoke
        else {"dtype": "bf16", "warmup": 2, "iters": 5, "engine_backend": "triton", "compile_backend": "inductor"}
    )

    def step_stage(name: str, title: str, spec, seconds: float) -> Stage:
        runs = [[p, v, SMOKE_BATCH if smoke else b] for p, v, b in spec]
        what = "; ".join(f"{p} {v} b{b}" for p, v, b in runs)
        return Stage(name, title, what, seconds, f"{me}:training_step", {"runs": runs, **step})

    return [
        Stage(
            "env",
            "environment and ceilings",
            "versions, commit; bf16 matmul 8192^3 and device copy bandwidth",
            25,
            f"{me}:environment",
        ),
        Stage(
            "correctness",
            "correctness on the GPU",
            f"pytest {' '.join(SMOKE_TESTS if smoke else GPU_TESTS)} (bf16 + fp16, fwd/bwd/tangent vs fp64)",
            90,
            f"{me}:correctness",
            {"pytest_args": list(SMOKE_TESTS if smoke else GPU_TESTS)},
        ),
        Stage(
            "kernels",
            "attention kernels vs SDPA flash / cuDNN / torch.func.jvp / jvp-flash-attention",
            "attention + attention_jvp, fwd and fwd+bwd (attention fwd+bwd also with the atomic backward), "
            "(seq, head_dim): "
            + ", ".join(f"{s}x{d}" for s, d, _ in (SMOKE_KERNEL_SHAPES if smoke else KERNEL_SHAPES)),
            115,
            f"{me}:kernels",
            {
                "shapes": [list(s) for s in (SMOKE_KERNEL_SHAPES if smoke else KERNEL_SHAPES)],
                "dtype": "fp32" if smoke else "bf16",
            },
        ),
        step_stage("step", "iMF-B/2 training step", STEP_RUNS, 130),
        step_stage("step_more", "more training steps while time remains", STEP_MORE_RUNS, 35),
    ]


def _device(ctx) -> str:
    return "cpu" if ctx.smoke else "cuda"


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _cpu_threads(ctx):
    from bench.common import one_cpu_thread

    return one_cpu_thread() if ctx.smoke else contextlib.nullcontext()


def copy_bandwidth(device, nbytes: int) -> dict:
    """Device-to-device copy of ``nbytes`` timed with :func:`bench.common.bench_callable`; bandwidth
    counts the bytes read and written (``2 * nbytes`` per copy)."""
    import torch

    from bench.common import bench_callable

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    stats = bench_callable(lambda: dst.copy_(src), device)
    return {
        "bytes": nbytes,
        "ms": stats["ms"],
        "ms_min": stats["ms_min"],
        "gbps": 2 * nbytes / (stats["ms"] * 1e-3) / 1e9,
        "times_ms": stats["times_ms"],
    }


def environment(ctx) -> None:
    import torch

    from bench.common import env_info, matmul_peak
    from imf import flops

    device = _device(ctx)
    env = env_info(device)
    env.update(
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        kernel_env={k: v for k, v in os.environ.items() if k.startswith("IMF_KERNELS_")},
    )
    datasheet = flops.peak_flops(device)
    ctx.update(env=env, datasheet_bf16_tflops=datasheet / 1e12 if datasheet else None)
    with _cpu_threads(ctx):
        peak = matmul_peak(device, dtype=torch.float32 if ctx.smoke else torch.bfloat16, n=256 if ctx.smoke else 8192)
        ctx.update(matmul_peak=peak)
        ctx.update(copy_bandwidth=copy_bandwidth(device, 2**22 if ctx.smoke else 2**30))


def _last_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if ln.startswith("E ")), lines[-1] if lines else "")[:300]


class _Recorder:
    """pytest plugin: one row per test as it finishes; tests not started by the soft deadline are skipped."""

    def __init__(self, ctx):
        self.ctx = ctx

    def pytest_collection_finish(self, session) -> None:
        self.ctx.update(collected=len(session.items))

    def pytest_collectreport(self, report) -> None:
        if report.failed:  # a test module that does not import: every test in it is lost, so it counts
            self.ctx.add_row(
                {
                    "test": report.nodeid,
                    "when": "collect",
                    "outcome": "failed",
                    "duration_s": None,
                    "message": _last_error_line(report.longreprtext),
                }
            )

    def pytest_runtest_setup(self, item) -> None:
        import pytest

        if self.ctx.expired():
            pytest.skip("gpu-check: time box reached")

    def pytest_runtest_logreport(self, report) -> None:
        if report.when != "call" and report.passed:
            return  # setup / teardown that went fine; the call reports the test
        message = None
        if report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        elif report.failed:
            message = _last_error_line(report.longreprtext)
        self.ctx.add_row(
            {
                "test": report.nodeid,
                "when": report.when,
                "outcome": report.outcome,
                "duration_s": round(report.duration, 3),
                "message": (message or "")[:300] or None,
            }
        )


def correctness(ctx) -> None:
    import pytest

    from bench.common import REPO

    args = [*ctx.options["pytest_args"], *PYTEST_OPTIONS, "--rootdir", str(REPO)]
    t0 = time.perf_counter()
    code = pytest.main(args, plugins=[_Recorder(ctx)])
    ctx.update(pytest_args=args, pytest_exit_code=int(code), wall_s=time.perf_counter() - t0)


def kernels(ctx) -> None:
    import torch

    from bench import attention_bench

    device = _device(ctx)
    peak = ctx.earlier("env").get("matmul_peak", {}).get("tflops")
    ctx.update(matmul_peak_tflops=peak, tokens=KERNEL_TOKENS)
    for seq, head_dim, heads in ctx.options["shapes"]:
        for op in ("attention_jvp", "attention"):
            item = f"{op} seq {seq} head_dim {head_dim}"
            if ctx.expired():
                ctx.skip(item)
                continue
            print(f"  kernels: {item}", flush=True)
            rows = attention_bench.bench_op(
                op,
                seqs=(seq,),
                head_dims=(head_dim,),
                heads=heads,
                tokens=seq if ctx.smoke else KERNEL_TOKENS,
                dtype=_dtype(ctx.options["dtype"]),
                device=device,
                reps=1,
            )
            for row in rows:
                row["pct_matmul_peak"] = 100 * row["tflops"] / peak if peak and "tflops" in row else None
                ctx.add_row(row)
            if device == "cuda":
                torch.cuda.empty_cache()


def training_step(ctx) -> None:
    from bench import step_bench

    o = ctx.options
    peak = ctx.earlier("env").get("matmul_peak", {}).get("tflops")
    ctx.update(
        matmul_peak_tflops=peak, **{k: o[k] for k in ("dtype", "warmup", "iters", "engine_backend", "compile_backend")}
    )
    for preset, variant, batch in o["runs"]:
        item = f"{preset} {variant} batch {batch}"
        if ctx.expired():
            ctx.skip(item)
            continue
        print(f"  step: {item}", flush=True)
        with _cpu_threads(ctx):
            row = step_bench.run_variant(
                variant,
                preset,
                batch,
                dtype=_dtype(o["dtype"]),
                device=_device(ctx),
                warmup=o["warmup"],
                iters=o["iters"],
                overrides=step_bench.smoke_overrides(preset) if ctx.smoke else None,
                engine_backend=o["engine_backend"],
                compile_backend=o["compile_backend"],
                peak_measured=peak * 1e12 if peak else None,
            )
        ctx.add_row(row)
