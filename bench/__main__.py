"""CLI: ``python -m bench {kernels,block,step,loader,scaling,all} [options]`` (also ``imf-bench``).

    kernels   attention and attention_jvp vs SDPA (flash, cuDNN), torch.func.jvp over math attention
              and jvp-flash-attention                                  -> kernels.{json,md,png}
    block     per-op dual kernels (block_ops_bench), then one block and the whole network, dual
              forward + primal backward vs torch.func.jvp (eager and compiled)
                                                                       -> block_ops.*, block.*
    step      full training step: engine vs the plain-PyTorch reference step (eager, compiled),
              FSDP2 variant, flow-matching floor, MFU, batch and sequence sweeps -> step.*
              ``--profile``: instead, each variant's step under torch.profiler, phase by phase
              (bench/step_profile.py)             -> step_profile.*, profile/<preset>_<variant>/
    loader    latent loaders (DALI, torch, synthetic) against the step's demand -> loader.*
    scaling   FSDP2 scaling projection (a model) from the step's measured time  -> scaling.*
    all       all of the above, in that order (loader and scaling use the step's numbers)
    gpu-check one bounded run (``--budget-s 420``) that validates a GPU node and prints the verdict
              against every target; ``--dry-run`` prints its plan (see :mod:`bench.gpu_check`)
    compile   static sm_90/sm_80 compile report of every kernel x config x shape, no GPU needed
              (``--arch 90,80 --out bench/results/compile``; see :mod:`bench.compile.cli`)

``--smoke`` (the default without a GPU) runs tiny CPU versions that check the harness, not speed;
it sets ``TRITON_INTERPRET=1`` before the kernels load (or, called after they did, runs itself
again with it), so it works with or without the variable; and it writes to a fresh temp dir unless
``--out`` is given: smoke numbers are never performance results. On a GPU the default output is
``bench/results/<gpu name>``; the committed H100 results come from ``python -m bench all --out
bench/results/h100``. ``gpu-check`` and ``compile`` take their own options (``python -m bench compile
--help``).

A bad option, or a full run asked for without a CUDA device, is one line on stderr and exit code 2
(:func:`imf.cli.run_cli`; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# Nothing from imf or imf_kernels is imported at the top: a smoke run must set TRITON_INTERPRET first.

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMMANDS = ("kernels", "block", "step", "loader", "scaling")
PROG = "python -m bench"


def _parser():
    from imf.cli import DEBUG_HELP, ArgumentParser

    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=(*COMMANDS, "all", "gpu-check", "compile"), help="what to run (above)")
    p.add_argument(
        "--preset",
        action="append",
        default=None,
        help="model preset (repeatable); step default iMF-B/2 and MF-B/2, block default iMF-B/2 and "
        "iMF-XL/2; the first one is swept and projected by scaling",
    )
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (step default 256, block 64, loader 256)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--out", type=Path, default=None, help="output directory (created)")
    smoke = p.add_mutually_exclusive_group()
    smoke.add_argument(
        "--smoke",
        dest="smoke",
        action="store_true",
        default=None,
        help="tiny CPU run that checks the harness (default without a GPU)",
    )
    smoke.add_argument("--no-smoke", dest="smoke", action="store_false", help="full GPU benchmark")
    p.add_argument(
        "--profile",
        action="store_true",
        help="step: profile each variant's step phase by phase (traces + side-by-side table) instead of timing it",
    )
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p


def _speedup_summary(rows: list[dict], keys: tuple[str, ...], ratio: str, ours: str) -> dict:
    """``"<keys...> <impl>": "min - max"`` of ``ratio`` (a baseline's time over ours) over the rows of
    each group; our own rows and failed rows are skipped."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r.get("impl") != ours and isinstance(r.get(ratio), int | float):
            groups.setdefault(" ".join(str(r[k]) for k in (*keys, "impl")), []).append(r[ratio])
    return {f"{k}: {ratio}": f"{min(v):.3g} - {max(v):.3g}" for k, v in groups.items()}


def cmd_kernels(args, device, env) -> dict:
    from bench import attention_bench

    rows = attention_bench.smoke() if args.smoke else attention_bench.run(dtype=DTYPES[args.dtype], device=device)
    plots = []
    for op in ("attention", "attention_jvp"):
        for mode in ("fwd", "fwd+bwd"):
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
            for hd in sorted({r["head_dim"] for r in sel}):
                plots.append(
                    {
                        "file": f"kernels_{op}_{mode.replace('+', '_')}_d{hd}.png",
                        "x": "seq",
                        "ys": ["tflops", "peak_mem_mb"],
                        "series": "impl",
                        "logx": True,
                        "title": f"{op} {mode}, head_dim {hd}",
                        "rows": [r for r in sel if r["head_dim"] == hd],
                    }
                )
    columns = (
        "op mode impl dtype batch heads seq head_dim ms ms_p20 ms_p80 tflops peak_mem_mb imf_speedup error"
    ).split()
    summary = _speedup_summary(rows, ("op", "mode"), "imf_speedup", "imf_kernels")
    tf = [r["tflops"] for r in rows if r["op"] == "attention_jvp" and r["impl"] == "imf_kernels" and "tflops" in r]
    if tf:
        summary["attention_jvp imf_kernels max TFLOP/s (6-matmul fwd count)"] = max(tf)
    return {
        "kernels": _write(
            args,
            "kernels",
            rows,
            env,
            summary=summary,
            columns=columns,
            plots=plots,
            config={"smoke": args.smoke, "dtype": args.dtype, "device": device},
        )
    }


def cmd_block(args, device, env) -> dict:
    from bench import block_bench, block_ops_bench

    dtype = DTYPES[args.dtype]
    ops_rows = block_ops_bench.smoke() if args.smoke else block_ops_bench.run(dtype=dtype, device=device)
    out = {
        "block_ops": _write(
            args,
            "block_ops",
            ops_rows,
            env,
            config={"smoke": args.smoke, "dtype": args.dtype},
            summary=_speedup_summary(ops_rows, ("op",), "imf_speedup", "imf_kernels"),
        )
    }
    if args.smoke:
        rows = block_bench.smoke()
    else:
        rows = block_bench.run(
            tuple(args.preset or ("iMF-B/2", "iMF-XL/2")), batch=args.batch or 64, dtype=dtype, device=device
        )
    columns = (
        "preset scope impl compiled engine_backend batch seq_len dtype ms ms_min ms_max tflops peak_mem_mb "
        "engine_speedup error"
    ).split()
    config = {"smoke": args.smoke, "dtype": args.dtype, "batch": rows[0]["batch"] if rows else None}
    out["block"] = _write(
        args,
        "block",
        rows,
        env,
        columns=columns,
        config=config,
        summary=_speedup_summary(rows, ("preset", "scope"), "engine_speedup", "engine"),
    )
    return out


def cmd_step_profile(args, device, env) -> dict:
    from bench import step_profile

    presets = tuple(args.preset or ("iMF-B/2", "MF-B/2"))
    if args.smoke:
        results = step_profile.smoke(presets, out_dir=args.out)
    else:
        results = step_profile.run(
            presets, batch=args.batch or 256, dtype=DTYPES[args.dtype], device=device, out_dir=args.out
        )
    rows, table = step_profile.side_by_side(results, cuda=device == "cuda")
    print(table, file=sys.stderr)
    config = {"smoke": args.smoke, "dtype": args.dtype, "presets": list(presets), "variants": results}
    return {"step_profile": _write(args, "step_profile", rows, env, config=config, notes=table.split("\n")[0])}


def cmd_step(args, device, env) -> dict:
    from bench import step_bench

    if args.profile:
        return cmd_step_profile(args, device, env)
    if args.smoke:
        result = step_bench.smoke(tuple(args.preset or ("iMF-B/2", "MF-B/2")))
    else:
        result = step_bench.run(
            tuple(args.preset or ("iMF-B/2", "MF-B/2")),
            batch=args.batch or 256,
            dtype=DTYPES[args.dtype],
            device=device,
        )
    rows = result["rows"]
    first = rows[0]["preset"]
    sweep_variants = result["config"]["sweep_variants"]
    main = [r for r in rows if r["sweep"] == "main" and r["preset"] == first and r["variant"] in sweep_variants]
    sweeps = [  # (sweep, x axis, y axes, title)
        ("batch", "batch", ["images_per_s", "peak_mem_gb", "mfu"], "batch sweep"),
        ("seq", "seq_len", ["images_per_s", "tflops", "peak_mem_gb"], "sequence sweep (constant tokens per step)"),
    ]
    plots = [
        {
            "file": f"step_{sweep}_sweep.png",
            "x": x,
            "ys": ys,
            "series": "variant",
            "logx": True,
            "title": f"{first}: {title}",
            "rows": main + [r for r in rows if r["sweep"] == sweep],
        }
        for sweep, x, ys, title in sweeps
    ]
    columns = (
        "sweep preset method variant backend compiled batch seq_len dtype ms ms_min ms_max ms_guidance "
        "ms_dual_forward ms_forward ms_backward ms_optimizer images_per_s peak_mem_gb flops_per_step tflops mfu "
        "mfu_datasheet compile_s skipped error"
    ).split()
    config = {
        **result["config"],
        "matmul_peak": {k: v for k, v in result["matmul_peak"].items() if k != "times_ms"},
        "matmul_peak_times_ms": result["matmul_peak"]["times_ms"],
    }
    summary = {**result["summary"], "measured_matmul_peak_tflops": result["matmul_peak"]["tflops"]}
    return {"step": _write(args, "step", rows, env, summary=summary, columns=columns, plots=plots, config=config)}


def _step_summary(out_dir: Path) -> dict | None:
    path = out_dir / "step.json"
    return json.loads(path.read_text())["summary"] if path.exists() else None


def cmd_loader(args, device, env) -> dict:
    from bench import loader_bench

    step = _step_summary(args.out)
    demand = step.get("engine_images_per_s") if step else None
    if args.smoke:
        rows = loader_bench.smoke()
    else:
        rows = loader_bench.measure_loaders(
            batch_size=args.batch or 256, device=device, demand_images_per_s=demand or 1000.0
        )
    source = "the step benchmark's engine images/s in this output dir" if demand else "1,000 img/s (target)"
    return {"loader": _write(args, "loader", rows, env, config={"smoke": args.smoke, "demand_source": source})}


def cmd_scaling(args, device, env) -> dict:
    """The projection for the step's first preset from its measured engine time (``step.json`` in the
    output dir), or communication only for ``--preset`` (default iMF-B/2) without one."""
    from bench import scaling

    step = _step_summary(args.out)
    want = (args.preset or [None])[0]
    if step and isinstance(step.get("engine_images_per_s"), float) and want in (None, step["preset"]):
        batch = step["batch"]
        ms = batch / step["engine_images_per_s"] * 1e3
        source = f"the {step.get('engine_variant')} row of step.json, {env['device']}"
        rows, notes = scaling.report(step["preset"], step_ms=ms, batch=batch, source=source)
    else:
        rows, notes = scaling.report(want or "iMF-B/2")
    config = {"smoke": args.smoke, "links_GBps": dataclasses.asdict(scaling.Links())}
    return {"scaling": _write(args, "scaling", rows, env, config=config, notes=notes)}


def _write(args, name, rows, env, **kw) -> dict:
    from bench.common import write_results

    paths = write_results(args.out, name, rows, env=env, **kw)
    for p in paths.values():
        print(f"wrote {p}")
    return {k: str(v) for k, v in paths.items()}


def _smoke_requested(argv: list[str]) -> bool:
    """Whether ``argv`` asks for a smoke run (``--smoke``, or no ``--no-smoke`` and no GPU)."""
    return "--smoke" in argv or ("--no-smoke" not in argv and not torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gpu-check"]:  # its own options and error path
        from bench.gpu_check import main as gpu_check

        return gpu_check(argv[1:])
    if argv[:1] == ["compile"]:  # its own options; needs no GPU
        from bench.compile.cli import main as compile_report

        return compile_report(argv[1:])
    helping = "-h" in argv or "--help" in argv
    if _smoke_requested(argv) and os.environ.get("TRITON_INTERPRET") != "1" and not helping:
        # CPU tensors through the kernels need the Triton interpreter, chosen when imf_kernels is imported
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        if "imf_kernels" in sys.modules:  # too late in this process: run again with it
            return subprocess.run([sys.executable, "-m", "bench", *argv], env=env).returncode
        os.environ["TRITON_INTERPRET"] = "1"
    from imf.cli import run_cli

    return run_cli(PROG, _run, argv)


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.smoke is None:
        args.smoke = not cuda
    if not args.smoke and not cuda:
        from imf.cli import UserError

        raise UserError("full benchmarks need a CUDA device; run with --smoke on a CPU")
    from bench.common import default_out_dir, env_info
    from imf.cli import check_out_dir

    device = "cuda" if cuda and not args.smoke else "cpu"
    if args.out is not None:
        check_out_dir(args.out)
    args.out = Path(args.out) if args.out is not None else default_out_dir(args.smoke)
    env = env_info(device)
    commands = COMMANDS if args.command == "all" else (args.command,)
    handlers = {
        "kernels": cmd_kernels,
        "block": cmd_block,
        "step": cmd_step,
        "loader": cmd_loader,
        "scaling": cmd_scaling,
    }
    written = {}
    for command in commands:
        written.update(handlers[command](args, device, env))
    print(json.dumps({"out": str(args.out), "smoke": args.smoke, "written": written}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
