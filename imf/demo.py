"""The main job on built-in data: train the ``demo`` iMF on scikit-learn digits on a CPU, then score it.

    python -m imf.demo                      # ~7.5 minutes on 2 cores
    python -m imf.demo --steps 200 --out runs/quick

Training is :func:`imf.train.run` (the same as ``python -m imf.train --preset demo --data digits``); a
rerun with the same ``--out`` resumes from its latest checkpoint. Writes to ``--out``: ``checkpoints/``
(resumable training state), ``model.safetensors`` (EMA weights, :func:`imf.checkpoint.load_exported`),
``metrics.jsonl`` (training curve), ``samples_1nfe.png`` and ``samples_2nfe.png`` (one row per class), and
``metrics.json`` (class accuracy and Frechet distance of 1- and 2-NFE samples, per guidance scale, plus
wall time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from imf.checkpoint import export_ema, load_exported
from imf.data.digits import NUM_CLASSES, DigitsJudge
from imf.sample import generate, save_grid
from imf.train import TrainResult, run
from imf.train_config import build_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="optimizer steps (default: the demo preset's)")
    p.add_argument("--batch", type=int, help="batch size (default: the demo preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the demo preset's)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default: the demo preset's)")
    p.add_argument("--ema", type=float, help="EMA decay (default: the demo preset's)")
    p.add_argument("--omegas", default="1.0,1.25,1.5,2.0", help="guidance scales to evaluate")
    p.add_argument("--eval-samples", type=int, default=1000, help="generated samples per evaluation")
    p.add_argument("--backend", default="reference", choices=("reference", "triton"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--out", default="runs/demo")
    return p.parse_args(argv)


def train(args) -> TrainResult:
    """Train with :func:`imf.train.run` on the demo preset's settings (resumes from ``--out``)."""
    given = {"steps": args.steps, "data.batch_size": args.batch, "optim.lr": args.lr,
             "schedule.warmup_steps": args.warmup, "ema_decays": None if args.ema is None else [args.ema]}
    overrides = {"preset": "demo", "data": {"source": "digits"}, "backend": args.backend, "seed": args.seed,
                 "out_dir": args.out, "checkpoint": {"resume": "auto"}, "log": {"every_steps": 20}}
    for key, value in given.items():
        if value is not None:
            section, _, name = key.rpartition(".")
            (overrides.setdefault(section, {}) if section else overrides)[name] = value
    cfg = build_config(overrides=overrides)
    return run(cfg)


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


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    result = train(args)
    if result.stopped is not None:
        raise SystemExit(f"training stopped at step {result.step} ({result.stopped}); run the same command again "
                         "to resume")
    weights = export_ema(result.checkpoint, out / "model.safetensors")
    model = load_exported(weights, backend=args.backend)
    omegas = [float(w) for w in args.omegas.split(",")]
    results = evaluate(model, omegas, args.eval_samples, args.seed, out)
    summary = {"train_seconds": result.train_seconds, "steps": result.step,
               "skipped_steps": result.skipped, "results": results}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(f"trained to step {result.step} ({result.train_seconds:.0f} s in this run); wrote {weights}, "
          f"{out / 'samples_1nfe.png'}")
    print(f"{'NFE':>3} {'omega':>6} {'accuracy':>9} {'frechet':>8}")
    for r in results.values():
        print(f"{r['steps']:>3} {r['omega']:>6g} {r['accuracy']:>9.3f} {r['frechet']:>8.3f}")
    return summary


if __name__ == "__main__":
    main()
