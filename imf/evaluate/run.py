"""One evaluation: load the model, sample every sweep cell on every rank, decode, score, write the report.

Collective under torchrun (:mod:`imf.dist`): each rank samples its block of the sample set
(:mod:`imf.evaluate.sampling`), features are gathered on rank 0, which scores them and writes per cell
``<cell>.npz`` (ADM layout: uint8 NHWC under ``arr_0``, index order; ``--no-npz`` skips it), with ``--png``
``png/<cell>/<index>.png``, and ``results.json`` / ``results.md`` (:mod:`imf.evaluate.report`).
Every argument is checked before the process group is joined. Sampling runs under bf16 autocast on
CUDA (``--precision auto``), fp32 on a CPU.

**Decoding** (latent models): :class:`imf.vae.LatentDecoder` with the VAE at ``--vae`` (a local diffusers
``AutoencoderKL`` directory) and the channel statistics and factors of the dataset's manifest (``--data``,
default the checkpoint's ``data.source``), or, for a model converted from an official checkpoint
(:mod:`imf.convert`), the official latent normalisation its export carries. Images in ``[-1, 1]`` become uint8 as
``clamp(127.5 x + 128, 0, 255)`` (DiT / ADM sampling scripts, the official JAX evaluation), or with
``--convention official-torch`` as the official PyTorch evaluation does (:mod:`imf.evaluate.sampling`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from imf import dist
from imf.cli import check_out_dir
from imf.config import ModelConfig
from imf.evaluate.loading import Loaded, check_preset, load_checkpoint
from imf.evaluate.options import (
    EvalError,
    check_num,
    check_positive,
    parse_intervals,
    parse_omegas,
    parse_steps,
    sweep_cells,
)
from imf.evaluate.report import fmt, git_commit, write_npz, write_report
from imf.evaluate.sampling import CONVENTIONS, sample_batches, shard, sync
from imf.evaluate.scorers import DigitsScorer, InceptionScorer
from imf.vae import LatentDecoder, load_vae


def make_decoder(
    vae_path,
    data_dir,
    model_cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    latent_norm: dict | None = None,
) -> LatentDecoder:
    """The VAE decoder of a latent model, checked against the dataset's manifest (or the checkpoint's own
    ``latent_norm``, used when there is no ``data_dir``) and the model."""
    side = f"{model_cfg.in_channels}x{model_cfg.input_size}x{model_cfg.input_size}"
    if vae_path is None:
        raise EvalError(
            f"a latent model ({side}) needs --vae PATH (a local diffusers AutoencoderKL directory) to decode images"
        )
    if data_dir is None and latent_norm is not None:
        man = dict(latent_norm, latent_shape=[model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size])
        if len(man["channel_mean"]) != model_cfg.in_channels:
            raise EvalError(
                f"the checkpoint's latent normalisation has {len(man['channel_mean'])} channels, the model "
                f"{model_cfg.in_channels}"
            )
    elif data_dir is None:
        raise EvalError(
            "decoding needs the dataset's channel statistics: pass --data DIR (the latent dataset "
            "with manifest.json; the checkpoint's training data.source is not a dataset directory)"
        )
    else:
        from imf.data import DataError, load_manifest

        try:
            man = load_manifest(data_dir)
        except DataError as e:
            raise EvalError(f"--data: {e}") from None
    want = [model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size]
    if list(man["latent_shape"]) != want:
        raise EvalError(f"--data {data_dir} holds latents {man['latent_shape']}, the checkpoint's model expects {want}")
    vae = load_vae(vae_path, device=device, dtype=dtype, arg="--vae")
    if vae.config.latent_channels != model_cfg.in_channels:
        raise EvalError(
            f"--vae {vae_path} has {vae.config.latent_channels} latent channels, the model {model_cfg.in_channels}"
        )
    return LatentDecoder(vae, man, batch=batch)


def _data_dir(args, loaded: Loaded) -> str | None:
    if args.data is not None:
        return args.data
    source = loaded.train_config.get("data", {}).get("source")
    return source if source is not None and Path(source).is_dir() else None


def run(args, scorer=None) -> dict | None:
    """Evaluate per ``args`` (a namespace of :func:`imf.evaluate.cli.parse_args`); collective under torchrun.
    Returns the report on rank 0 (None on other ranks). ``scorer``: see :mod:`imf.evaluate.scorers` (default:
    by ``--metrics``)."""
    env = dist.describe(args.device, arg="--device")
    check_positive(batch=args.batch, vae_batch=args.vae_batch)
    check_out_dir(args.out)
    steps = parse_steps(args.steps)  # bad strings fail before the model loads
    omegas = parse_omegas(args.omega) if args.omega else None
    intervals = parse_intervals(args.interval) if args.interval else None
    backend = args.backend if args.backend != "auto" else ("triton" if env.device.type == "cuda" else "reference")
    if backend == "triton" and env.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise EvalError(
            "--backend triton on a CPU needs TRITON_INTERPRET=1 (the Triton interpreter); use --backend reference"
        )
    loaded = load_checkpoint(args.ckpt, decay=args.decay, backend=backend, device=env.device)
    check_preset(loaded, args.preset)
    cfg = loaded.model.cfg
    check_num(args.num, cfg.num_classes, env.world)
    convention = CONVENTIONS[args.convention]  # class blocks: check_num made num a multiple of num_classes
    cells = sweep_cells(steps, omegas, intervals, loaded.preset)
    digits = (
        args.metrics == "digits"
        or args.metrics == "auto"
        and (loaded.train_config.get("data", {}).get("source") == "digits" or loaded.preset == "demo")
    )
    side = f"{cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, {cfg.num_classes} classes"
    pixel = (cfg.in_channels, cfg.input_size, cfg.num_classes) == (1, 8, 10)  # the digits demo's images
    if digits and not pixel:
        raise EvalError(
            f"--metrics digits scores the 8x8 pixel-space digits model (the demo preset); this checkpoint is a "
            f"latent model ({side}): use --metrics inception (FID/IS of VAE-decoded images, with --vae)"
        )
    if not digits and pixel:
        raise EvalError(
            f"--metrics inception scores VAE-decoded images of a latent model; this checkpoint is the pixel-space "
            f"digits model ({side}): use --metrics digits (or auto)"
        )
    if digits:
        if args.vae or args.ref_stats or args.prc:
            raise EvalError("the digits demo is in pixel space: --vae, --ref-stats and --prc do not apply")
        decode = None
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.vae_dtype]
        decode = make_decoder(
            args.vae, _data_dir(args, loaded), cfg, env.device, dtype, args.vae_batch, loaded.latent_norm
        )
    if scorer is None:
        scorer = (
            DigitsScorer()
            if digits
            else InceptionScorer(
                args.ref_stats, args.inception, env.device, prc=args.prc, batch=args.batch, uint8=convention.uint8
            )
        )
    precision = args.precision if args.precision != "auto" else ("bf16" if env.device.type == "cuda" else "fp32")
    autocast = torch.bfloat16 if precision == "bf16" else None

    env = dist.init(env)
    try:
        return _sweep(args, env, loaded, cells, decode, scorer, autocast, precision, backend)
    finally:
        dist.destroy(env)


def _sweep(
    args, env: dist.DistEnv, loaded: Loaded, cells, decode, scorer, autocast, precision: str, backend: str
) -> dict | None:
    out = Path(args.out)
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    convention = CONVENTIONS[args.convention]
    labels = convention.labels(range(args.num), args.num, loaded.model.cfg.num_classes)
    results = []
    for steps, omega, t_min, t_max in cells:
        name = f"nfe{steps}_w{omega:g}_t{t_min:g}-{t_max:g}"
        parts = out / f".parts-{name}"
        if args.npz and env.rank == 0:
            parts.mkdir(exist_ok=True)
        dist.barrier()
        start = time.perf_counter()
        sampling = dict(steps=steps, omega=omega, t_min=t_min, t_max=t_max, autocast_dtype=autocast)
        gathered = dist.gather(
            _sample_cell(args, env, loaded.model, sampling, decode, scorer, out / "png" / name, parts)
        )
        dist.barrier()
        if env.rank != 0:
            continue
        full = {k: torch.cat([g[0][k] for g in gathered]) for k in gathered[0][0]}
        metrics = scorer.score(full, labels)
        npz = None
        if args.npz:
            npz = str(write_npz(out / f"{name}.npz", [parts / f"rank{r:05d}.npy" for r in range(env.world)]))
            shutil.rmtree(parts)
        gen_s, dec_s = max(g[1] for g in gathered), max(g[2] for g in gathered)
        cell = {
            "name": name,
            "steps": steps,
            "omega": omega,
            "t_min": t_min,
            "t_max": t_max,
            "metrics": metrics,
            "sample_img_per_s": args.num / gen_s,
            "decode_img_per_s": args.num / dec_s if decode else None,
            "sample_seconds": gen_s,
            "wall_seconds": time.perf_counter() - start,
            "npz": npz,
        }
        results.append(cell)
        print(
            f"imf.evaluate: {name}: "
            + ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items())
            + f"; {cell['sample_img_per_s']:.1f} img/s sampling",
            file=sys.stderr,
        )
    if env.rank != 0:
        return None
    report = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "torch": torch.__version__,
        "device": _device_name(env.device),
        "world_size": env.world,
        "precision": precision,
        "backend": backend,
        "scorer": scorer.name,
        "checkpoint": {"source": loaded.source, "preset": loaded.preset, "step": loaded.step, "decay": loaded.decay},
        "model_config": dataclasses.asdict(loaded.model.cfg),
        "train_config": loaded.train_config,
        "config": vars(args),
        "cells": results,
    }
    write_report(out, report)
    return report


def _sample_cell(args, env: dist.DistEnv, model, sampling: dict, decode, scorer, png_dir: Path, parts: Path):
    """This rank's share of one cell: sample, decode, write its ``.npy`` part (and PNGs), compute features.

    Returns ``(features, sampling seconds, decoding seconds)`` for the gather on rank 0.
    """
    indices = shard(args.num, env.rank, env.world)
    memmap = None
    feats: dict[str, list[torch.Tensor]] = {}
    t_gen = t_dec = 0.0
    bar = tqdm(
        total=len(indices) * env.world,
        desc=png_dir.name,
        unit="img",
        dynamic_ncols=True,
        disable=env.rank != 0 or not args.progress,
    )
    convention = CONVENTIONS[args.convention]
    batches = sample_batches(
        model,
        indices,
        seed=args.seed,
        batch=args.batch,
        device=env.device,
        convention=convention,
        num=args.num,
        **sampling,
    )
    for idx, _, x, seconds in batches:
        t_gen += seconds
        t0 = time.perf_counter()
        images = decode(x) if decode is not None else x
        sync(env.device)
        t_dec += time.perf_counter() - t0
        u8 = convention.uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        if args.npz:
            if memmap is None:
                memmap = np.lib.format.open_memmap(
                    parts / f"rank{env.rank:05d}.npy", mode="w+", dtype=np.uint8, shape=(len(indices), *u8.shape[1:])
                )
            memmap[idx.start - indices.start : idx.stop - indices.start] = u8
        if args.png:
            _write_pngs(png_dir, idx, u8)
        for k, v in scorer.features(images).items():
            feats.setdefault(k, []).append(v)
        bar.update(len(idx) * env.world)
    bar.close()
    if memmap is not None:
        memmap.flush()
        del memmap
    return {k: torch.cat(v) for k, v in feats.items()}, t_gen, t_dec


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _write_pngs(folder: Path, idx: range, u8: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in zip(idx, u8, strict=True):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")


__all__ = ["make_decoder", "run"]
