"""The ``imf.evaluate`` command line: its options, and ``main`` through the one error path (:func:`imf.cli.run_cli`).

A user error (bad option, missing or corrupt checkpoint, missing torch-fidelity) prints one line on stderr and
exits 2 (3 for a missing dependency); ``--debug`` or ``IMF_DEBUG=1`` adds the traceback (same exit code). The
table goes to stdout, and the last line on stderr names the output folder.
"""

from __future__ import annotations

import argparse
import sys

from imf.cli import DEBUG_HELP, ArgumentParser, run_cli
from imf.evaluate.options import EvalError
from imf.evaluate.report import report_markdown
from imf.evaluate.run import run
from imf.evaluate.scorers import INCEPTION_WEIGHTS

PROG = "python -m imf.evaluate"
DESCRIPTION = "Evaluation at scale: 1-/2-NFE sampling with guidance sweeps, VAE decode, FID / IS (or digits metrics)."


def parser() -> ArgumentParser:
    """The options of ``imf.evaluate`` (errors raise :class:`EvalError`)."""
    p = ArgumentParser(
        error_type=EvalError, prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ckpt",
        required=True,
        help="EMA export (.safetensors), DCP checkpoint directory, checkpoint root or its 'latest' file",
    )
    p.add_argument(
        "--decay", type=float, default=None, help="EMA decay to load from a DCP checkpoint (default: the run's first)"
    )
    p.add_argument("--preset", default=None, help="the preset the checkpoint must be (checked; default: its own)")
    p.add_argument(
        "--num",
        "--num-samples",
        dest="num",
        type=int,
        default=50000,
        help="samples per cell (multiple of num_classes and world; under torchrun write --num-samples; "
        "default: %(default)s)",
    )
    p.add_argument("--steps", default="1", help="sampling steps (NFE) per cell, e.g. 1 or 1,2 (default: %(default)s)")
    p.add_argument("--omega", default=None, help="guidance scales, e.g. 1.0,2.0 (default: the published one)")
    p.add_argument(
        "--interval",
        default=None,
        help="guidance intervals t_min:t_max, e.g. 0.0:1.0,0.4:0.65 (default: the published one)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default: %(default)s)")
    p.add_argument(
        "--convention",
        default="engine",
        choices=("engine", "official-torch"),
        help="sample set and uint8 conversion: engine (labels i mod K, clamp(127.5x+128)) or as the official "
        "iMF PyTorch evaluate.py (class blocks, seeds i^seed, round; its --seed is 42) (default: %(default)s)",
    )
    p.add_argument("--batch", type=int, default=250, help="samples per forward on each rank (default: %(default)s)")
    p.add_argument(
        "--metrics",
        default="auto",
        choices=("auto", "inception", "digits"),
        help="auto: digits if the checkpoint was trained on digits, else inception",
    )
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory (latent models)")
    p.add_argument("--vae-batch", type=int, default=64, help="images per VAE decode call (default: %(default)s)")
    p.add_argument(
        "--vae-dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="VAE decode dtype (default: %(default)s)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="latent dataset directory with manifest.json (channel statistics; default: the checkpoint's data.source)",
    )
    p.add_argument("--ref-stats", default=None, help="reference .npz with mu, sigma (and arr_0 for --prc)")
    p.add_argument(
        "--inception",
        default=None,
        help=f"torch-fidelity Inception weights ({INCEPTION_WEIGHTS}; default: the torch hub cache)",
    )
    p.add_argument("--prc", action="store_true", help="also precision/recall (needs arr_0 images in --ref-stats)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="sampling autocast: auto = bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "reference", "triton"),
        help="model op backend: auto = triton on CUDA, reference on CPU",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument(
        "--out",
        default="runs/eval",
        help="output folder: results.md, results.json, one .npz per cell (default: %(default)s)",
    )
    p.add_argument("--png", action="store_true", help="also write every sample as a PNG (under OUT/png/)")
    p.add_argument(
        "--npz",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write each cell's samples as an ADM .npz (uint8 NHWC, arr_0; default: on)",
    )
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar per cell (default: on)"
    )
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    report = run(args)
    if report is not None:
        print(report_markdown(report))
        print(f"imf.evaluate: results in {args.out} (results.md, results.json)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """``python -m imf.evaluate`` / ``imf-evaluate``: returns the exit code."""
    return run_cli(PROG, _main, sys.argv[1:] if argv is None else argv)


__all__ = ["DESCRIPTION", "PROG", "main", "parse_args", "parser"]
