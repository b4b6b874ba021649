"""``python -m bench gpu-check``: one bounded command that validates a GPU and records every headline number.

    python -m bench gpu-check --dry-run                 # the plan, its time boxes, whether it fits (CPU)
    python -m bench gpu-check --budget-s 420 --out DIR  # on a GPU node: the first thing to run

The stages (:mod:`bench.gpu_check_stages`), in priority order, each in a child process with its own
time box plus what the stages before it left (:mod:`bench.gpu_check_runner`): environment and ceilings,
correctness on the GPU (the training step's kernels first), the iMF-B/2 training step (engine and both
baselines at one batch that fits), the attention kernels, more steps while time remains. On a machine
that has torch and triton but not this project, ``bash bench/gpu_window.sh`` installs the tree offline
and runs this (see bench/results/README.md). The children run with
``IMF_KERNELS_PINNED=1`` unless the environment sets it (one kernel config per shape class, no timing
of candidates; ``--configs`` passes a saved cache as ``IMF_KERNELS_CONFIGS``, which takes precedence) and
``TRITON_INTERPRET=0`` (the GPU tests skip under the interpreter). ``DIR`` gets ``gpu_check.json`` (everything),
``gpu_check.md`` (the report) and one JSON per stage, rewritten as the run goes: at most 8 files, no
subfolders. The last thing printed is the verdict (:mod:`bench.gpu_check_report`): every target of
docs/design.md section 7, the measured value, met / not met / not measured.

Exit code: 0 when every stage finished or was cut by its box and no GPU test failed; 1 when a stage
failed or a test failed; 2 for a user error (no CUDA device, a plan that does not fit ``--budget-s``
in a dry run, a bad option). ``--smoke`` runs the same stages on a CPU on tiny shapes (the kernels
under the Triton interpreter): a harness check, never a measurement.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.gpu_check_report import report, test_counts, verdict
from bench.gpu_check_runner import (
    KILL_GRACE_S,
    RUNNER_OVERHEAD_S,
    allowed_files,
    plan_rows,
    plan_total,
    prepare_out_dir,
    run_stages,
)
from bench.gpu_check_stages import plan
from imf.cli import ArgumentParser, UserError, run_cli

PROG = "python -m bench gpu-check"


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=PROG, description="One bounded run that validates a GPU node and records every headline number."
    )
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole run (default 420)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default bench/results/<gpu>/gpu-check; a temp dir with --smoke)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit: 0 if it fits --budget-s")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of every stage: checks the harness only")
    p.add_argument("--stages", default=None, help="comma-separated subset of the stages, e.g. env,kernels")
    p.add_argument("--configs", type=Path, default=None, help="kernel config cache for IMF_KERNELS_CONFIGS")
    return p


def _select(stages, names: str | None):
    if names is None:
        return stages
    want = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(want) - {s.name for s in stages})
    if unknown or not want:
        raise UserError(f"--stages {names!r}: unknown {unknown}; choose from {', '.join(s.name for s in stages)}")
    return [s for s in stages if s.name in want]


def _child_env(args) -> dict[str, str]:
    import os

    env = {"IMF_KERNELS_PINNED": os.environ.get("IMF_KERNELS_PINNED", "1")}
    if args.configs is not None:
        if not args.configs.is_file():
            raise UserError(f"--configs {args.configs}: no such file; give a kernel config cache (JSON)")
        env["IMF_KERNELS_CONFIGS"] = str(args.configs.resolve())
    # the GPU tests skip under the interpreter, so a real run turns it off whatever the shell says
    env.update({"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"} if args.smoke else {"TRITON_INTERPRET": "0"})
    return env


def _main(argv: list[str]) -> int:
    from bench.common import markdown_table

    args = _parser().parse_args(argv)
    if args.budget_s <= 0:
        raise UserError(f"--budget-s must be > 0, got {args.budget_s:g}")
    stages = _select(plan(smoke=args.smoke), args.stages)
    env = _child_env(args)
    total = plan_total(stages)
    fits = total <= args.budget_s
    print(
        f"gpu-check plan{' (smoke)' if args.smoke else ''}: {len(stages)} stages, each in its own process "
        f"with its time box; children run with {' '.join(f'{k}={v}' for k, v in env.items())}"
    )
    print(
        markdown_table(
            plan_rows(stages),
            ["#", "stage", "box_s", "min_s", "core_s", "ends_by_s", "items (s needed, cold cache)"],
        ),
        end="",
    )
    core = sum(s.core_s() for s in stages)
    print(
        f"sized for a cold Triton cache: the core items (before '|') need {core:.0f} s and fit their boxes; "
        f"a stage starts only with its min_s, an item only with its need; unused time carries forward\n"
        f"estimated total {total:.0f} s (every box used in full + {KILL_GRACE_S:g} s kill grace per stage + "
        f"{RUNNER_OVERHEAD_S:g} s) for --budget-s {args.budget_s:g}: {'fits' if fits else 'does NOT fit'}"
    )
    if args.dry_run:
        if not fits:
            raise UserError(
                f"the plan needs {total:.0f} s but --budget-s is {args.budget_s:g}; raise --budget-s "
                f"or run fewer stages with --stages"
            )
        return 0
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                "gpu-check needs a CUDA device (torch.cuda.is_available() is False); use --dry-run for "
                "the plan or --smoke to check the harness on a CPU"
            )
    if not fits:
        print(f"the budget is short: the later stages get what is left of --budget-s {args.budget_s:g}")
    if args.out is None:
        from bench.common import default_out_dir

        args.out = (
            Path(tempfile.mkdtemp(prefix="imf-gpu-check-smoke-"))
            if args.smoke
            else default_out_dir(False) / "gpu-check"
        )
    known = allowed_files(plan(smoke=args.smoke))  # files of an earlier, fuller run: replaced
    try:
        prepare_out_dir(args.out, stages, known)
    except ValueError as err:
        raise UserError(str(err)) from err
    state = run_stages(stages, args.out, budget_s=args.budget_s, smoke=args.smoke, env=env, report=report, known=known)
    rows = verdict(state)
    print(f"\nwrote {args.out} ({len(list(args.out.iterdir()))} files); verdict (targets: docs/design.md section 7):")
    print(markdown_table(rows, ["target", "goal", "measured", "verdict", "detail"]), end="")
    failed = [n for n, s in state["stages"].items() if s.get("status") == "failed"]
    return 1 if failed or test_counts(state)["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)
