"""Shared benchmark discipline: timing, memory, environment, and writing results.

**Timing.** Kernels and short calls use ``triton.testing.do_bench`` (warm-up excluded, L2 flushed
before every run, every sample kept: ``return_mode="all"``). Whole training steps take tens to
hundreds of milliseconds, longer than ``do_bench``'s repetition budget, so :func:`time_steps`
runs explicit warm-up steps (compilation and autotuning happen there) and then records CUDA
events at phase boundaries of every timed step (:class:`PhaseTimer`), synchronising once per step.
Every timing is reported as median with min / max (and 20th / 80th percentiles for kernels). On a
CPU the same code uses ``time.perf_counter`` (ops are synchronous there); those numbers only show
that the harness runs.

**Inputs.** Benchmarks draw random non-zero data (``randn``, randomised parameters) and rotate
through several input sets so consecutive steps do not read the same, possibly L2-resident, data.

**Results.** :func:`write_results` writes ``<name>.json`` (every row, every raw timing, the
configuration and :func:`env_info`), ``<name>.md`` (a markdown table) and PNG plots (matplotlib,
imported lazily) into the output directory.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench.provenance import describe, provenance
from imf.markdown import markdown_table

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def one_cpu_thread():
    """Run on one intra-op thread (CPU smoke benchmarks, the tests' tiny models): their ops are tiny, and on a
    shared CPU the OpenMP threads of several processes spin against each other (100x slower steps seen here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def summarize(times_ms: Sequence[float]) -> dict:
    """``ms`` (median), ``ms_min``, ``ms_max``, ``ms_p20``, ``ms_p80`` and ``n`` of a list of timings."""
    xs = sorted(times_ms)
    if not xs:
        raise ValueError("summarize() needs at least one timing")

    def pct(q):
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {
        "ms": statistics.median(xs),
        "ms_min": xs[0],
        "ms_max": xs[-1],
        "ms_p20": pct(0.2),
        "ms_p80": pct(0.8),
        "n": len(xs),
    }


def bench_callable(fn: Callable[[], object], device, *, reps: int = 3, rep_ms: int = 100, grad_to_none=None) -> dict:
    """Time ``fn``: ``do_bench`` on CUDA (``rep_ms`` of timed calls, at least one), ``reps`` wall-clock
    calls after one warm-up call on a CPU. Returns :func:`summarize`'s fields plus ``times_ms``."""
    if is_cuda(device):
        import triton.testing

        times = triton.testing.do_bench(fn, rep=rep_ms, grad_to_none=grad_to_none, return_mode="all")
    else:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return {**summarize(times), "times_ms": [float(t) for t in times]}


class PhaseTimer:
    """Marks named points of one step: CUDA events on a GPU, ``perf_counter`` on a CPU.

    ``mark(name)`` records (or re-records: the last mark of a name wins) a point; ``durations(order)``
    returns the milliseconds between consecutive marks of ``order`` that were recorded, after a sync.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.marks: dict[str, object] = {}

    def mark(self, name: str) -> None:
        if is_cuda(self.device):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def durations(self, order: Sequence[str]) -> dict[str, float]:
        sync(self.device)
        seen = [n for n in order if n in self.marks]
        out = {}
        for a, b in zip(seen, seen[1:], strict=False):
            if is_cuda(self.device):
                out[b] = self.marks[a].elapsed_time(self.marks[b])
            else:
                out[b] = 1e3 * (self.marks[b] - self.marks[a])
        return out


def time_steps(
    step: Callable[[int, PhaseTimer], None], device, *, warmup: int, iters: int, order: Sequence[str]
) -> dict:
    """Run ``step(i, timer)`` ``warmup`` times untimed, then ``iters`` times with phase marks.

    ``step`` must call ``timer.mark(order[0])`` first and ``timer.mark(order[-1])`` last. Returns
    ``{"phases": {name: [ms per step]}, "total": [ms per step], "warmup_s": [s per warm-up step],
    "peak_mem_gb"}``; the peak is ``torch.cuda.max_memory_allocated`` over the timed steps (None on a
    CPU)."""
    warm = []
    for i in range(warmup):
        t0 = time.perf_counter()
        step(i, PhaseTimer(device))
        sync(device)
        warm.append(time.perf_counter() - t0)
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
    phases: dict[str, list[float]] = {}
    total = []
    for i in range(iters):
        timer = PhaseTimer(device)
        step(warmup + i, timer)
        d = timer.durations(order)
        for name, ms in d.items():
            phases.setdefault(name, []).append(ms)
        total.append(sum(d.values()))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if is_cuda(device) else None
    return {"phases": phases, "total": total, "warmup_s": warm, "peak_mem_gb": peak}


def matmul_peak(device, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> dict:
    """Measured dense matmul throughput of this device: ``n x n x n`` GEMMs timed with ``do_bench``.

    Four operand pairs are rotated so no call reads the previous call's inputs from L2. Returns
    ``{"n", "dtype", "ms", "tflops", "times_ms"}``; this is the MFU denominator of the same run."""
    gen = torch.Generator(device=device).manual_seed(0)
    pairs = [
        (
            torch.randn(n, n, device=device, dtype=dtype, generator=gen),
            torch.randn(n, n, device=device, dtype=dtype, generator=gen),
        )
        for _ in range(4)
    ]
    counter = iter(range(1 << 62))

    def gemm():
        a, b = pairs[next(counter) % len(pairs)]
        return a @ b

    stats = bench_callable(gemm, device)
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "ms": stats["ms"],
        "ms_min": stats["ms_min"],
        "tflops": 2.0 * n**3 / (stats["ms"] * 1e-3) / 1e12,
        "tflops_best": 2.0 * n**3 / (stats["ms_min"] * 1e-3) / 1e12,
        "times_ms": stats["times_ms"],
    }


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def env_info(device) -> dict:
    """Device, driver, CUDA, torch, triton, Python, git commit and dirty state (:func:`bench.provenance.provenance`:
    also on a tree without ``.git``, ``"unknown"`` when nothing says), date (UTC), host."""
    import triton

    dev = torch.device(device)
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if is_cuda(dev) else f"cpu ({platform.machine()})",
        "device_type": dev.type,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **provenance(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    if is_cuda(dev):
        props = torch.cuda.get_device_properties(dev)
        info["gpu_memory_gb"] = props.total_memory / 2**30
        info["sm_count"] = props.multi_processor_count
        info["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return info


def default_out_dir(smoke: bool) -> Path:
    """A fresh temp dir for smoke runs (never committed), else ``bench/results/<device slug>``."""
    if smoke:
        return Path(tempfile.mkdtemp(prefix="imf-bench-smoke-"))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return REPO / "bench" / "results" / slug


def plot_lines(
    path: Path, rows: Sequence[dict], *, x: str, ys: Sequence[str], series: str, title: str, logx: bool = False
) -> Path | None:
    """One PNG with a panel per metric in ``ys``: ``x`` against the metric, a line per ``series``
    value. Rows without a number for the metric are skipped. None when nothing can be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(5.5 * len(ys), 4), squeeze=False)
    drawn = False
    for ax, y in zip(axes[0], ys, strict=True):
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if isinstance(r.get(x), int | float) and isinstance(r.get(y), int | float):
                groups.setdefault(str(r.get(series)), []).append((r[x], r[y]))
        for name, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            drawn = True
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if logx:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        if groups:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if drawn else None


def write_results(
    out_dir: str | os.PathLike,
    name: str,
    rows: list[dict],
    *,
    config: dict,
    env: dict,
    summary: dict | None = None,
    columns: Sequence[str] | None = None,
    plots: Sequence[dict] = (),
    notes: str = "",
) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and the PNGs described by ``plots`` (keyword dicts for
    :func:`plot_lines` plus ``file``). Returns ``{"json", "md", <plot file>...}`` paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    payload = {"benchmark": name, "env": env, "config": config, "summary": summary or {}, "rows": rows}
    paths["json"].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    md = [f"# {name}", ""]
    if env.get("device_type") != "cuda":
        md += ["**Smoke run on a CPU: checks the harness; the timings are not performance numbers.**", ""]
    md += [
        f"{env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
        f"driver {env.get('driver')}; {describe(env)}; "
        f"{env.get('date_utc')}",
        "",
    ]
    if notes:
        md += [notes.strip(), ""]
    if summary:
        md += ["## Summary", "", markdown_table([{"metric": k, "value": v} for k, v in summary.items()]), ""]
    md += ["## Rows", "", markdown_table(rows, columns)]
    for spec in plots:
        spec = dict(spec)
        file = spec.pop("file")
        plot_rows = spec.pop("rows", rows)
        png = plot_lines(out / file, plot_rows, **spec)
        if png is not None:
            paths[file] = png
            md += ["", f"![{file}]({file})"]
    paths["md"].write_text("\n".join(md) + "\n")
    return paths
