"""``python -m bench compile [--arch 90,80] [--out DIR] [--kernel NAME] [--shapes S ...] [--jobs N]``.

Captures every shape class (default: every preset's training step and attention at seq 256-8192 x
head_dim 64/72/128), compiles each kernel x each config the autotuner may consider for each arch,
and writes ``compile.json`` + ``compile.md`` to ``--out`` (default ``bench/results/compile``). The
report is static: nothing runs on a GPU. Exit status 1 if any row has a problem (``--check``).

Kernels must be imported without the Triton interpreter; with ``TRITON_INTERPRET=1`` in the
environment the command re-runs itself in a subprocess with the variable removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from imf.cli import ArgumentParser, UserError, run_cli

DEFAULT_OUT = Path("bench/results/compile")
PROG = "python -m bench compile"


def parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (90, 80)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (created)")
    p.add_argument("--kernel", default=None, help="only kernels whose name contains this (e.g. _attn_jvp_fwd)")
    p.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="shape classes: preset:<name>, attn:<bf16|fp16>:s<seq>:d<head_dim> or head-dims (head_dim 8-128 in "
        "steps of 8 at seq 1000 and 4096) (default: presets and attention at d64/72/128)",
    )
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument(
        "--no-jvp-loop",
        dest="jvp_loop",
        action="store_false",
        help="skip the attention_jvp before/after loop comparison",
    )
    p.add_argument("--check", action="store_true", help="exit 1 if any row has a problem")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "bench", "compile", *argv], env=env).returncode
    return run_cli(PROG, _run, argv)


def _archs(text: str) -> tuple[int, ...]:
    from .capture import DEVICES

    try:
        archs = tuple(int(a) for a in text.split(","))
    except ValueError:
        archs = ()
    if not archs or not set(archs) <= set(DEVICES):
        raise UserError(f"--arch: got {text!r}, expected a comma-separated subset of {','.join(map(str, DEVICES))}")
    return archs


def _run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from . import shapes as shape_classes

    archs = _archs(args.arch)
    if args.jobs < 1:
        raise UserError(f"--jobs: got {args.jobs}, expected >= 1")
    shapes = shape_classes.expand(args.shapes) if args.shapes else shape_classes.default_shapes()
    for s in shapes:
        try:
            shape_classes.parse(s)
        except ValueError as err:
            raise UserError(str(err)) from err
    from . import jvp_loop, report, run

    t0 = time.perf_counter()
    rows = run.run(shapes, archs, args.kernel, args.jobs)
    loop = jvp_loop.compare() if args.jvp_loop and 90 in archs else None
    paths = report.write(args.out, rows, shapes, loop, " ".join([PROG, *argv]))
    bad = sum(1 for r in rows if r["problems"])
    print(
        f"[compile] {len(rows)} rows, {bad} with problems, {time.perf_counter() - t0:.0f} s; "
        f"wrote {paths['json']} and {paths['md']} (static: no GPU ran)"
    )
    return 1 if args.check and bad else 0
