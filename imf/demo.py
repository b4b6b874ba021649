"""The main job on built-in data: train the ``demo`` iMF on scikit-learn digits on a CPU.

    python -m imf.demo                      # ~5 minutes on 2 cores
    python -m imf.demo --steps 200 --out runs/quick

Writes to ``--out``: ``checkpoint.pt`` (model, EMA, config, step), ``samples_1nfe.png`` and
``samples_2nfe.png`` (one row per class), and ``metrics.json`` (class accuracy and Frechet
distance of 1- and 2-NFE samples, per guidance scale, plus wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from imf.config import LossConfig
from imf.digits import NUM_CLASSES, DigitsJudge, load_digits_tensors
from imf.ema import EMA
from imf.loss import imf_loss, sample_training_inputs
from imf.model import build_model
from imf.sample import generate, save_grid


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--omegas", default="1.0,1.5,2.0,3.0", help="guidance scales to evaluate")
    p.add_argument("--eval-samples", type=int, default=1000, help="generated samples per evaluation")
    p.add_argument("--backend", default="reference", choices=("reference", "triton"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--out", default="runs/demo")
    return p.parse_args(argv)


def train(args) -> tuple[torch.nn.Module, EMA, float]:
    torch.manual_seed(args.seed)
    x_all, y_all = load_digits_tensors()
    model = build_model("demo", backend=args.backend)
    ema = EMA(model, (args.ema,))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    cfg = LossConfig()
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="demo", unit="step", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(x_all), (args.batch,), generator=gen)
        x, y = x_all[idx], y_all[idx]
        e = torch.randn(x.shape, generator=gen)
        t, r, omega, t_min, t_max, drop = sample_training_inputs(args.batch, cfg, gen)
        loss, metrics = imf_loss(model, x, y, e, t, r, omega, t_min, t_max, drop, cfg=cfg)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", mse_V=f"{metrics['mse_V'].item():.3f}")
    return model, ema, time.perf_counter() - start


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
    out.mkdir(parents=True, exist_ok=True)
    model, ema, train_s = train(args)
    ema.copy_to(model)
    model.eval()
    ckpt = out / "checkpoint.pt"
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "config": model.cfg.__dict__, "step": args.steps}, tmp)
    tmp.replace(ckpt)
    omegas = [float(w) for w in args.omegas.split(",")]
    results = evaluate(model, omegas, args.eval_samples, args.seed, out)
    summary = {"train_seconds": train_s, "steps": args.steps, "batch": args.batch, "results": results}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(f"trained {args.steps} steps in {train_s:.0f} s; wrote {ckpt}, {out / 'samples_1nfe.png'}")
    print(f"{'NFE':>3} {'omega':>6} {'accuracy':>9} {'frechet':>8}")
    for r in results.values():
        print(f"{r['steps']:>3} {r['omega']:>6g} {r['accuracy']:>9.3f} {r['frechet']:>8.3f}")
    return summary


if __name__ == "__main__":
    main()
