"""The main job on built-in data: train the ``demo`` iMF on scikit-learn digits on a CPU, then score it.

    python -m imf.demo                      # ~7.5 minutes on 2 cores
    python -m imf.demo --steps 200 --out runs/quick

Training is :func:`imf.train.run` (the same as ``python -m imf.train --preset demo --data digits``); a
rerun with the same ``--out`` resumes from its latest checkpoint (``--resume DIR/step_N``: from an
earlier one), with the settings that trained it: another ``--lr`` (or seed, batch, ...) is refused,
more ``--steps`` continue the run and are recorded in ``config_history.jsonl``. The training options
are the trainer's own fields (``--steps``, ``--batch`` = the global batch of one optimizer step,
``--lr``, ``--warmup``, ``--ema``, ``--seed``, ``--backend``, ``--threads``, ``--out``, ``--resume``),
with the demo preset's values as defaults; every argument is validated before training. Ctrl-C (or
SIGTERM) writes a checkpoint and exits 130 (143). Writes to ``--out``: ``checkpoints/`` (resumable training
state), ``model.safetensors`` (EMA weights, :func:`imf.train.export.load_exported`), ``metrics.jsonl``
(training curve), ``samples_1nfe.png`` and ``samples_2nfe.png`` (one row per class), and ``metrics.json``
(class accuracy and Frechet distance of 1- and 2-NFE samples, per guidance scale, plus wall time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from imf.cli import DEBUG_HELP, ArgumentParser, run_cli
from imf.data.digits import NUM_CLASSES, DigitsJudge
from imf.sample import generate, save_grid
from imf.train.args import add_config_options, build_config, normalise, overrides_of
from imf.train.config import ConfigError, TrainConfig
from imf.train.export import export_ema, load_exported
from imf.train.loop import run
from imf.train.signals import exit_code

# The demo's run on top of the demo preset's training defaults (imf.train.config.PRESET_DEFAULTS["demo"]).
DEMO_RUN = {"preset": "demo", "backend": "reference", "checkpoint": {"resume": "auto"}, "log": {"every_steps": 20}}
TRAIN_OPTIONS = [
    "steps",
    "data.batch_size",
    "optim.lr",
    "schedule.warmup_steps",
    "ema_decays",
    "seed",
    "backend",
    "threads",
    "out_dir",
    "checkpoint.resume",
]
MIN_EVAL_SAMPLES = 100  # the sample grids show 10 per class


def parser() -> ArgumentParser:
    p = ArgumentParser(
        error_type=ConfigError,
        prog="python -m imf.demo",
        usage="python -m imf.demo [--OPTION VALUE ...]",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    add_config_options(p, build_config(DEMO_RUN), TRAIN_OPTIONS)
    e = p.add_argument_group("evaluation options")
    e.add_argument("--omegas", default="1.0,1.25,1.5,2.0", help="guidance scales to evaluate, comma-separated, >= 1")
    e.add_argument("--eval_samples", default="1000", help=f"generated samples per evaluation (>= {MIN_EVAL_SAMPLES})")
    return p


def _omegas(text: str) -> list[float]:
    try:
        omegas = [float(w) for w in text.split(",")]
    except ValueError:
        omegas = []
    if not omegas or any(not w >= 1.0 for w in omegas):
        raise ConfigError(f"--omegas must be comma-separated numbers >= 1 (e.g. 1,1.5,2), got {text!r}")
    return omegas


def _eval_samples(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < MIN_EVAL_SAMPLES:
        raise ConfigError(
            f"--eval-samples must be an integer >= {MIN_EVAL_SAMPLES} (the grids show 10 per class), got {text!r}"
        )
    return n


def configure(argv: list[str]) -> tuple[TrainConfig, list[float], int]:
    """The validated training config, guidance scales and sample count of a demo command line."""
    args = parser().parse_args(normalise(argv))
    omegas, n = _omegas(args.omegas), _eval_samples(args.eval_samples)
    cfg = build_config(DEMO_RUN, overrides_of(args, TRAIN_OPTIONS)).validate()
    return cfg, omegas, n


def evaluate(model, omegas, n: int, seed: int, out: Path) -> dict:
    """1- and 2-NFE samples per guidance scale, scored by :class:`DigitsJudge`; grids of the best."""
    judge = DigitsJudge()
    labels = torch.arange(n) % NUM_CLASSES
    results = {}
    for steps in (1, 2):
        best = None
        for omega in omegas:
            gen = torch.Generator().manual_seed(seed)
            start = time.perf_counter()
            samples = generate(model, labels, omega=omega, steps=steps, generator=gen)
            rate = n / (time.perf_counter() - start)
            score = judge.score(samples, labels)
            results[f"{steps}nfe_omega{omega:g}"] = dict(score, steps=steps, omega=omega, images_per_s=rate)
            if best is None or score["frechet"] < best[0]["frechet"]:
                best = (score, samples)
        grid = best[1][: 10 * NUM_CLASSES].view(10, NUM_CLASSES, 1, 8, 8).transpose(0, 1).reshape(-1, 1, 8, 8)
        save_grid(grid, out / f"samples_{steps}nfe.png", nrow=10, upscale=4)
    return results


def run_demo(argv: list[str] | None = None) -> dict:
    """Validate, train (or resume), export, evaluate; returns the summary written to ``metrics.json``."""
    cfg, omegas, n = configure(list(sys.argv[1:] if argv is None else argv))
    out = Path(cfg.out_dir)
    result = run(cfg)
    if result.stopped is not None:
        raise Interrupted(result)
    weights = export_ema(result.checkpoint, out / "model.safetensors")
    model = load_exported(weights, backend="triton" if cfg.backend == "triton" else "reference")  # CPU sampling
    results = evaluate(model, omegas, n, cfg.seed, out)
    summary = {
        "train_seconds": result.train_seconds,
        "steps": result.step,
        "skipped_steps": result.skipped,
        "results": results,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(
        f"trained to step {result.step} ({result.train_seconds:.0f} s in this run); wrote {weights}, "
        f"{out / 'samples_1nfe.png'}"
    )
    print(f"{'NFE':>3} {'omega':>6} {'accuracy':>9} {'frechet':>8}")
    for r in results.values():
        print(f"{r['steps']:>3} {r['omega']:>6g} {r['accuracy']:>9.3f} {r['frechet']:>8.3f}")
    return summary


class Interrupted(Exception):
    """Training stopped early (a signal): the checkpoint is written; the same command resumes it."""

    def __init__(self, result):
        super().__init__(f"interrupted at step {result.step} ({result.stopped})")
        self.result = result


def _main(argv: list[str]) -> int:
    try:
        run_demo(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except Interrupted as e:
        r = e.result
        print(
            f"imf.demo: interrupted at step {r.step} ({r.stopped}); checkpoint {r.checkpoint}; run the same "
            "command again to resume",
            file=sys.stderr,
        )
        return exit_code(r.stopped)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m imf.demo`` / ``imf-demo``: 0 on success, one line and a non-zero code on a user error."""
    return run_cli("imf.demo", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
