"""The stages of ``python -m bench gpu-check``, in priority order, and the plan that boxes them.

Each stage function runs in its own child process (:mod:`bench.gpu_check_runner`) and gets a
:class:`bench.gpu_check_runner.StageContext` ``ctx``; it writes every measurement as it goes and asks
``ctx.begin(item)`` before each, which refuses (and records as left out) an item that would not fit the
time left. The measurements reuse the benchmark library (``bench.common``, ``bench.attention_bench``,
``bench.step_bench``); nothing here times anything its own way.

The priorities of a short window (bench/results/README.md), in this order:

1. :func:`environment`: GPU, driver, CUDA, cuDNN, torch, triton, commit (:func:`bench.common.env_info`),
   the measured bf16 matmul peak (8192^3, :func:`bench.common.matmul_peak`) and the device-to-device
   copy bandwidth: the two ceilings the later ratios use; the Triton cache it starts from.
2. :func:`correctness`: the GPU-marked tests (``pytest -m gpu``: forward, backward and tangent of every
   kernel against an fp64 reference on fresh random inputs), in-process with a plugin that orders them
   (:func:`tier_of`: the kernels the iMF-B/2 and MF-B/2 steps launch, at their shapes, in bf16 first;
   then odd shapes; then the rest) and records every test's outcome as it finishes.
3. :func:`training_step` on iMF-B/2: the engine and both plain-PyTorch baselines (eager, compiled) at one
   batch fitted to the measured free memory (:func:`bench.step_bench.fit_batch`), for the two ratios;
   then the engine alone at the training batch (images/s, MFU).
4. :func:`kernels`: :func:`bench.attention_bench.bench_op` for attention_jvp at the headline shapes
   (seq 4096 / 8192 and the training shape), then attention against SDPA flash / cuDNN; each row gains
   ``pct_matmul_peak``. Attention fwd+bwd runs with both backwards (``imf_kernels``: deterministic, the
   default; ``imf_kernels_atomic_bwd``: ``IMF_KERNELS_ATTN_BWD=atomic``).
5. :func:`training_step` again while time remains: the flow-matching floor, iMF-XL/2 (its MFU target;
   the model is built on the GPU), MF-B/2.

**Sizing.** Every stage is sized for a cold Triton cache (no compiled kernel on the machine): the
seconds each item needs (``needs``) are its compiles plus its first timing, from the compile report's
own per-kernel compile times (bench/results/compile: 0.9-1.6 s for the block kernels, 1.1-5.7 s for the
attention kernels, one pinned config each) plus process start and imports; see bench/results/README.md.
Kernels compiled by an earlier stage are reused by the later ones (the same cache directory).

``--smoke`` runs the same functions on a CPU on tiny shapes (the kernels through the Triton
interpreter): they check the plumbing, not speed.
"""

from __future__ import annotations

import contextlib
import os
import time

from bench.gpu_check_runner import Stage

# The attention kernel items, most important first: (op, seq, head_dim, heads, seconds needed from a
# cold cache: ~5 compiles at 1-6 s, then do_bench of ours and the baselines). The JVP targets (seq 4096
# and 8192, d64) and the iMF-B/2 training shape (256 image + 20 condition tokens) lead; attention itself
# follows at the SDPA-flash target shapes, then MF-XL/2's head_dim 72 and d128.
KERNEL_ITEMS = (
    ("attention_jvp", 4096, 64, 12, 20),
    ("attention_jvp", 8192, 64, 12, 20),
    ("attention_jvp", 276, 64, 12, 15),
    ("attention", 4096, 64, 12, 15),
    ("attention", 276, 64, 12, 12),
    ("attention", 256, 72, 16, 15),
    ("attention_jvp", 256, 72, 16, 15),
    ("attention", 1024, 64, 12, 12),
    ("attention_jvp", 1024, 128, 12, 15),
    ("attention", 1024, 128, 12, 15),
)
KERNEL_CORE = 3  # the JVP headline shapes
SMOKE_KERNEL_ITEMS = (("attention_jvp", 33, 64, 2, 1), ("attention", 33, 64, 2, 1), ("attention", 17, 72, 2, 1))
KERNEL_TOKENS = 32768  # batch = tokens // seq (bench_op's default)

# The step runs: (preset, variant, batch, seconds needed from a cold cache). ``SHARED`` is the one batch
# at which the engine and both baselines run (fitted to the free memory measured by two probe steps of
# the eager baseline, the hungriest variant: ~0.9 GiB per iMF-B/2 sample); 256 is the training batch.
SHARED = "shared"
PROBE_S = 20  # two one-step probes of the eager baseline (batch 2 and 4), the models built on the GPU
STEP_RUNS = (
    ("iMF-B/2", "engine", SHARED, 45),  # ~15 kernel compiles (fewer if correctness compiled them), 7 steps
    ("iMF-B/2", "baseline_eager", SHARED, 15),  # no compile: math attention, torch.func.jvp
    ("iMF-B/2", "engine", 256, 15),  # the kernels are compiled by now: images/s and MFU
    ("iMF-B/2", "baseline_compiled", SHARED, 75),  # Inductor over jvp + backward of 20 blocks: last, longest
)
STEP_MORE_RUNS = (
    ("iMF-B/2", "fm_compiled", SHARED, 45),  # the efficiency floor (Inductor, primal only)
    ("iMF-XL/2", "engine", 128, 40),  # built on the GPU (meta device + init_weights): MFU target
    ("MF-B/2", "engine", 256, 30),
    ("MF-B/2", "baseline_eager", SHARED, 15),
)
SHARED_BATCHES = (64, 32, 16, 8)  # the shared batch: the largest that fits, of these
SMOKE_BATCH = 4

GPU_TESTS = ("tests", "-m", "gpu")
# Interpreter stand-ins for the smoke run (CPU tensors, small odd shapes): the plumbing, not the GPU.
SMOKE_TESTS = ("tests/test_attention.py", "-m", "not gpu", "-k", "explicit_scale or primal_equals_attention")
CORRECTNESS_NEEDS = (
    ("training-step kernels (bf16, iMF-B/2 and MF-B/2 shapes)", 70),  # ~25 compiles, pytest start-up
    ("odd shapes", 60),
    ("the rest", 90),
)

# A test module that fails to import is a failed row (see _Recorder), not the end of the session.
PYTEST_OPTIONS = ("-q", "-p", "no:cacheprovider", "--continue-on-collection-errors")


PROBE_ITEM = "batch fit (two probe steps)"


def _step_needs(runs, probe: bool) -> tuple[tuple[str, float], ...]:
    needs = [(run_item(p, v, b), sec) for p, v, b, sec in runs]
    return ((PROBE_ITEM, PROBE_S), *needs) if probe else tuple(needs)


def run_item(preset: str, variant: str, batch) -> str:
    return f"{preset} {variant} batch {batch}"


def plan(smoke: bool = False) -> list[Stage]:
    """The stages with their time boxes (seconds; the same boxes for ``--smoke``)."""
    me = __name__
    step = (
        {"dtype": "fp32", "warmup": 1, "iters": 2, "engine_backend": "reference", "compile_backend": "eager"}
        if smoke
        else {"dtype": "bf16", "warmup": 2, "iters": 5, "engine_backend": "triton", "compile_backend": "inductor"}
    )

    def step_stage(name: str, title: str, spec, seconds: float, core: int, probe: bool) -> Stage:
        """``probe``: this stage fits the shared batch; the others take the one an earlier stage fitted."""
        runs = [[p, v, SMOKE_BATCH if smoke and b != SHARED else b, sec] for p, v, b, sec in spec]
        what = "; ".join(f"{p} {v} b{b}" for p, v, b, _ in runs)
        options = {"runs": runs, "shared_batches": list(SHARED_BATCHES), **step}
        return Stage(name, title, what, seconds, f"{me}:training_step", options, _step_needs(runs, probe), core)

    items = SMOKE_KERNEL_ITEMS if smoke else KERNEL_ITEMS
    return [
        Stage(
            "env",
            "environment and ceilings",
            "versions, commit, Triton cache; bf16 matmul 8192^3 and device copy bandwidth",
            25,
            f"{me}:environment",
            needs=(("start, CUDA init, matmul peak, copy bandwidth", 15),),
            core=1,
        ),
        Stage(
            "correctness",
            "correctness on the GPU, training-step kernels first",
            f"pytest {' '.join(SMOKE_TESTS if smoke else GPU_TESTS)} (fwd/bwd/tangent vs fp64), ordered by tier",
            100,
            f"{me}:correctness",
            {"pytest_args": list(SMOKE_TESTS if smoke else GPU_TESTS)},
            CORRECTNESS_NEEDS,
            core=1,
        ),
        step_stage("step", "iMF-B/2 training step: engine and both baselines at one batch", STEP_RUNS, 170, 5, True),
        Stage(
            "kernels",
            "attention kernels vs SDPA flash / cuDNN / torch.func.jvp / jvp-flash-attention",
            "fwd and fwd+bwd (attention fwd+bwd also with the atomic backward): "
            + ", ".join(f"{op} {s}x{d}" for op, s, d, _, _ in items),
            80,
            f"{me}:kernels",
            {"items": [list(i) for i in items], "dtype": "fp32" if smoke else "bf16"},
            tuple((kernel_item(op, s, d), sec) for op, s, d, _, sec in items),
            core=KERNEL_CORE,
        ),
        step_stage("step_more", "more training steps while time remains", STEP_MORE_RUNS, 20, 0, False),
    ]


def kernel_item(op: str, seq: int, head_dim: int) -> str:
    return f"{op} seq {seq} head_dim {head_dim}"


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
    try:
        ctx.update(triton_cache_key=triton_cache_key())
    except Exception as err:  # a record, not a measurement: never worth the ceilings after it
        ctx.update(triton_cache_key={"error": f"{type(err).__name__}: {err}"[:300]})
    with _cpu_threads(ctx):
        peak = matmul_peak(device, dtype=torch.float32 if ctx.smoke else torch.bfloat16, n=256 if ctx.smoke else 8192)
        ctx.update(matmul_peak=peak)
        ctx.update(copy_bandwidth=copy_bandwidth(device, 2**22 if ctx.smoke else 2**30))


def triton_cache_key() -> dict:
    """What Triton's compile cache key starts with on this machine (``triton_key()``: its version, the
    hashes of its Python sources and of ``libtriton.so``, whose build differs per Python ABI), the
    interpreter's ABI and the ptxas version (the CUDA backend's part of the key): a kernel cache built
    elsewhere can only be hit where these are equal (bench/results/README.md, "Triton cache")."""
    import hashlib
    import sysconfig

    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version
    from triton.runtime.cache import triton_key

    key = triton_key()
    return {
        "triton": triton.__version__,
        "triton_key_sha256": hashlib.sha256(key.encode()).hexdigest(),
        "ptxas_sm90": get_ptxas_version(90).strip().splitlines()[-2],
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
    }


def _last_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if ln.startswith("E ")), lines[-1] if lines else "")[:300]


TIERS = ("training-step", "odd shapes", "rest")


def _training_dims() -> tuple[set[int], set[int]]:
    """The sizes the iMF-B/2 and MF-B/2 steps launch kernels at (besides the batch): sequence lengths,
    width, heads, head_dim, MLP hidden and QKV width; and their head_dims."""
    from imf.config import preset

    dims, head_dims = set(), set()
    for name in ("iMF-B/2", "MF-B/2"):
        c = preset(name)
        dims |= {c.seq_len, c.num_patches, c.dim, c.heads, c.head_dim, c.hidden, 3 * c.dim}
        head_dims.add(c.head_dim)
    return dims, head_dims


def _shape_sizes(params: dict) -> list[int]:
    """The sizes a test's parameters name: ``shape`` without its batch (first) entry, ``seq``, ``head_dim``."""
    sizes = list(params["shape"][1:]) if isinstance(params.get("shape"), tuple | list) else []
    return sizes + [params[k] for k in ("seq", "head_dim") if isinstance(params.get(k), int)]


def tier_of(module: str, params: dict, training_dims: set[int]) -> int:
    """0: a kernel the iMF-B/2 / MF-B/2 step launches, at its sizes, in bf16 (the default backward: not
    ``test_attention_bwd_atomic``); 1: an odd shape (a size not a multiple of 64: seq 276, head_dim 72,
    hidden 2730); 2: the rest. ``params`` are the test's parametrize values (``item.callspec.params``)."""
    import torch

    sizes = _shape_sizes(params)
    if params.get("dtype") is torch.bfloat16 and "bwd_atomic" not in module and all(n in training_dims for n in sizes):
        return 0
    return 1 if any(n % 64 for n in sizes) else 2


def order_items(items: list) -> dict[str, int]:
    """Sort pytest ``items`` in place by (tier, bf16 first), stable; returns each nodeid's tier."""
    import torch

    dims, _ = _training_dims()
    tiers = {}
    for item in items:
        params = dict(getattr(getattr(item, "callspec", None), "params", {}))
        tiers[item.nodeid] = tier_of(item.nodeid.split("::")[0], params, dims)
    bf16 = {i.nodeid: getattr(getattr(i, "callspec", None), "params", {}).get("dtype") is torch.bfloat16 for i in items}
    items.sort(key=lambda i: (tiers[i.nodeid], not bf16[i.nodeid]))
    return tiers


class _Recorder:
    """pytest plugin: orders the tests by tier, records every collected test id (so the report can count
    tests never started, e.g. when the stage is cut), then one row per test as it finishes; tests not
    started by the soft deadline are skipped, with the reason."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.tiers: dict[str, int] = {}

    def pytest_collection_modifyitems(self, session, config, items) -> None:
        self.tiers = order_items(items)

    def pytest_collection_finish(self, session) -> None:
        ids = [i.nodeid for i in session.items]
        self.ctx.update(
            collected=len(ids),
            collected_by_tier={t: sum(self.tiers.get(n) == k for n in ids) for k, t in enumerate(TIERS)},
            order=[[n, self.tiers.get(n)] for n in ids],
        )

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
                "tier": TIERS[self.tiers.get(report.nodeid, 2)],
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
    for op, seq, head_dim, heads, _ in ctx.options["items"]:
        item = kernel_item(op, seq, head_dim)
        if not ctx.begin(item):
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


def _shared_batch(ctx, preset: str, kw: dict) -> int | None:
    """The batch the engine and the baselines share: fitted by this stage (two probe steps of the eager
    baseline and the free memory, :func:`bench.step_bench.fit_batch`), or taken from an earlier stage's
    fit; :data:`SMOKE_BATCH` on a smoke run. None when there is no time for the probes."""
    from bench import step_bench

    if ctx.smoke:
        return SMOKE_BATCH
    fits = ctx.data["result"].setdefault("batch_fit", {})
    if preset in fits:
        return fits[preset]["batch"]
    earlier = ctx.earlier("step").get("batch_fit", {}).get(preset) if ctx.name != "step" else None
    if earlier:
        fits[preset] = {**earlier, "from": "stage step"}
        return earlier["batch"]
    if not ctx.begin(f"{PROBE_ITEM} {preset}", PROBE_S):
        return None
    try:
        fit = step_bench.fit_shared_batch(preset, ctx.options["shared_batches"], **kw)
    except Exception as err:  # the runs still get a batch: the smallest, and the row says why
        fit = {"batch": min(ctx.options["shared_batches"]), "error": f"{type(err).__name__}: {err}"[:300]}
    fits[preset] = fit
    ctx.update(batch_fit=fits)
    return fit["batch"]


def training_step(ctx) -> None:
    from bench import step_bench

    o = ctx.options
    peak = ctx.earlier("env").get("matmul_peak", {}).get("tflops")
    ctx.update(
        matmul_peak_tflops=peak, **{k: o[k] for k in ("dtype", "warmup", "iters", "engine_backend", "compile_backend")}
    )
    kw = {"dtype": _dtype(o["dtype"]), "device": _device(ctx)}
    for preset, variant, batch, need in o["runs"]:
        if batch == SHARED:
            batch = _shared_batch(ctx, preset, kw)
            if batch is None:
                ctx.skip(run_item(preset, variant, SHARED), "no shared batch (no time for the probe steps)")
                continue
        item = run_item(preset, variant, batch)
        if not ctx.begin(item, need):
            continue
        print(f"  step: {item}", flush=True)
        with _cpu_threads(ctx):
            row = step_bench.run_variant(
                variant,
                preset,
                batch,
                warmup=o["warmup"],
                iters=o["iters"],
                overrides=step_bench.smoke_overrides(preset) if ctx.smoke else None,
                engine_backend=o["engine_backend"],
                compile_backend=o["compile_backend"],
                peak_measured=peak * 1e12 if peak else None,
                **kw,
            )
        ctx.add_row(row)
