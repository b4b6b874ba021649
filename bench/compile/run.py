"""Plan and run the compile sweep: capture every shape, compile each distinct (kernel, config, arch)
once in a process pool, and check every result against the static targets.

A *variant* is one distinct launch signature of a kernel within a shape (e.g. ``rms_norm`` with and
without tangent, or on a differently strided input); its rows are the configs the autotuner may
consider for it on each arch.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import sys
import time

from . import shapes as shape_classes
from .build import bind, compile_one, describe_config
from .capture import DEVICES, Launch

GRID_AXIS_LIMIT = 65535  # grid axes 1 and 2 (axis 0: 2**31 - 1)
_JOBS: list[tuple[Launch, object, int]] = []  # read by the forked workers


def variant_label(launch: Launch) -> str:
    """The first tensor argument and the launcher's scalar keyword arguments, e.g.
    ``X bf16[8832, 768] D=768 WITH_TANGENT=True``."""
    name, first = next(iter(launch.inputs().items()), ("", None))
    head = f"{name} {str(first.dtype).removeprefix('torch.')}{list(first.shape)}" if first is not None else ""
    scalars = " ".join(f"{k}={v}" for k, v in launch.kwargs.items() if isinstance(v, int | float | str | bool))
    return f"{head} {scalars}".strip()


def unaligned_inputs(launch: Launch) -> list[str]:
    """16-bit tensor arguments whose start or row strides are not 16-byte multiples."""
    return [f"{n}: {t.describe()}" for n, t in launch.inputs().items() if t.itemsize == 2 and not t.aligned()]


def problems(row: dict) -> list[str]:
    """What a compiled row violates: compile error, shared memory over the device limit, spills,
    scalar 16-bit loads on aligned inputs, mma.sync (or no tensor core) on sm_90, grid axis limits."""
    if row["status"] != "ok":
        return [f"compile error: {row['error']}"]
    out = []
    limit = DEVICES[row["arch"]]["shared_memory_per_block_optin"]
    if row["shared"] > limit:
        out.append(f"shared memory {row['shared']:,} B > {limit:,} B")
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']:,} B stores / {row['spill_loads']:,} B loads")
    if row["loads"]["scalar16bit"] and not row["unaligned"]:
        out.append(f"{row['loads']['scalar16bit']} scalar 16-bit global loads on 16-byte aligned inputs")
    if row["arch"] == 90 and row["dot"] in ("mma.sync", "fma") and row["dtype16"]:
        out.append(f"{row['dot']} instead of wgmma")
    if any(max(g[1:], default=1) > GRID_AXIS_LIMIT for g in row["grids"]):
        out.append(f"grid {row['grids'][0]} exceeds {GRID_AXIS_LIMIT} on axis 1 or 2")
    return out


def plan(shapes: list[str], archs: tuple[int, ...], kernel: str | None = None, progress=print):
    """``(rows, jobs)``: one row per (shape, variant, arch, config) pointing at a job index."""
    rows, jobs, index, binders = [], [], {}, {}
    for shape in shapes:
        t0 = time.perf_counter()
        variants: dict[tuple, Launch] = {}
        for launch in shape_classes.capture(shape, archs):
            if kernel and kernel not in launch.kernel:
                continue
            first = launch.configs[archs[0]][0]
            variants.setdefault((launch.kernel, bind(launch, first, archs[0], binders)[2]), launch)
        for launch in variants.values():
            label, unaligned = variant_label(launch), unaligned_inputs(launch)
            dtype16 = any(t.itemsize == 2 for t in launch.inputs().values())
            for arch in archs:
                pinned = launch.pinned[arch]
                for config, grid in zip(launch.configs[arch], launch.grid[arch], strict=True):
                    key = bind(launch, config, arch, binders)[2]
                    if key not in index:
                        index[key] = len(jobs)
                        jobs.append((launch, config, arch))
                    rows.append(
                        {
                            "shape": shape,
                            "kernel": launch.kernel,
                            "variant": label,
                            "arch": arch,
                            "config": describe_config(config),
                            "pinned": pinned is not None and config == pinned,
                            "candidates": launch.candidates,
                            "considered": len(launch.configs[arch]),
                            "grids": [grid],
                            "unaligned": unaligned,
                            "dtype16": dtype16,
                            "job": index[key],
                        }
                    )
        progress(f"[compile] captured {shape}: {len(variants)} launch variants ({time.perf_counter() - t0:.1f} s)")
    return rows, jobs


def _work(i: int) -> dict:
    return compile_one(*_JOBS[i])


def compile_all(jobs: list, workers: int = 2, stream=sys.stderr) -> list[dict]:
    """Results of every job, compiled by ``workers`` forked processes, with a progress line."""
    _JOBS[:] = jobs
    results: list[dict | None] = [None] * len(jobs)
    t0, done = time.perf_counter(), 0
    tty, every = stream.isatty(), max(1, len(jobs) // 20)  # a line per 5% when not on a terminal
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(_work, i): i for i in range(len(jobs))}
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            done += 1
            launch, config, arch = jobs[i]
            elapsed = time.perf_counter() - t0
            eta = elapsed / done * (len(jobs) - done)
            line = (
                f"[compile] {done}/{len(jobs)} sm_{arch} {launch.kernel} {describe_config(config)}"
                f" | {elapsed:.0f} s, ~{eta:.0f} s left"
            )
            if tty:
                stream.write(f"\r{line}\x1b[K")
            elif done % every == 0 or done == len(jobs):
                stream.write(line + "\n")
            stream.flush()
    if tty:
        stream.write("\n")
    return results


def run(
    shapes: list[str], archs: tuple[int, ...], kernel: str | None = None, workers: int = 2, progress=print
) -> list[dict]:
    """Every row of the sweep with its compile result and its ``problems``."""
    rows, jobs = plan(shapes, archs, kernel, progress)
    progress(f"[compile] {len(rows)} rows, {len(jobs)} distinct compiles on {workers} processes")
    results = compile_all(jobs, workers)
    for row in rows:
        row.update(results[row.pop("job")])
        row["problems"] = problems(row)
    return rows
