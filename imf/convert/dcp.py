"""``--dcp DIR``: a full official training state (``iMF-*-2-full.zip``) as a DCP checkpoint ``imf.train
--resume DIR`` continues from (fine-tuning from the official state).

The flax ``TrainState`` holds ``params`` (with the v-heads), ``ema_params`` (one EMA, decay 0.9999 in the
official config), optax AdamW's first and second moments ``mu``, ``nu`` with their update ``count``, and
``step``. Each tree goes through the same mapping as the weights (:func:`imf.convert.from_official`: a
re-layout, so the moments map elementwise like their parameters; SwiGLU padding units get zero moments, as
they would have had training here). The run's configuration comes from the imf.train options after ``--dcp
DIR`` (``--config FILE``, ``--key value``); its model must be the checkpoint's. A :class:`imf.train.trainer.
Trainer` of that configuration (one process, CPU) takes the converted model, every EMA decay of the run gets
the official EMA, AdamW gets ``exp_avg = mu``, ``exp_avg_sq = nu``, ``step = count`` (optax and torch use the
same bias correction by update count), the step counter and LR schedule continue at ``step``, and
:func:`imf.train.checkpoint.save` writes it. ``--world-size W`` writes the per-rank entries (data shard,
noise generator) of a ``W``-process run, which ``imf.train --resume`` requires for exact resumption.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from imf.cli import ArgumentParser
from imf.config import network_differences
from imf.convert.errors import ConvertError
from imf.convert.official import canonical, from_official, official_arch
from imf.convert.readers import read_official


def _world_size(rest: list[str]) -> tuple[int, list[str]]:
    p = ArgumentParser(error_type=ConvertError, prog="python -m imf.convert --dcp", add_help=False)
    p.add_argument("--world-size", type=int, default=1, help="processes of the run that resumes (default 1)")
    ns, rest = p.parse_known_args(rest)
    if ns.world_size < 1:
        raise ConvertError(f"--world-size must be >= 1, got {ns.world_size}")
    return ns.world_size, rest


def _require_moments(src) -> None:
    if src.adam_mu is None or src.adam_nu is None:
        raise ConvertError(
            f"{src.path} holds no optimizer state (no opt_state with Adam mu/nu): --dcp needs the full "
            "training-state checkpoint (the official iMF-*-2-full.zip)"
        )


def _convert(src, args, ours) -> tuple:
    params = src.params if src.params is not None else src.weights
    arch = args.arch or official_arch(canonical(params)) or "imf"
    # what the weights cannot tell comes from the run's model config
    overrides = {"input_size": args.input_size or ours.input_size}
    if arch == "mf":
        overrides["heads"] = args.heads or ours.heads
    try:
        cfg, weights = from_official(params, arch=arch, **overrides)
        trees = [from_official(t, arch=arch, **overrides) for t in (src.weights, src.adam_mu, src.adam_nu)]
    except ConvertError as e:
        raise ConvertError(f"{src.path}: {e}") from None
    if any(c != cfg for c, _ in trees):
        raise ConvertError(f"{src.path}: the EMA or optimizer trees do not have the shapes of params")
    return cfg, weights, *(sd for _, sd in trees)


def _rank_entries(base: dict, trainer, cfg, world: int) -> list[dict]:
    """Rank entries of a ``world``-process run: rank 0's trainer entry ``base`` with each rank's data and noise
    stream."""
    from imf.train.trainer import input_stream

    if world == 1:
        return [base]
    micro = cfg.data.batch_size // (world * cfg.data.grad_accum)
    out = []
    for rank in range(world):
        stream = input_stream(
            cfg,
            trainer.model_cfg,
            trainer.loss_cfg,
            rank=rank,
            world=world,
            batch_size=micro,
            device=torch.device("cpu"),
        )
        try:
            out.append(dict(base, rng_cuda=None, **stream.state_dict()))
        finally:
            stream.close()
    return out


def write_dcp(args, rest: list[str]) -> str:
    """Convert ``args.input`` (a full official state) into a DCP checkpoint under ``args.dcp``; a summary line."""
    from imf import dist
    from imf.train import checkpoint
    from imf.train.args import load_config
    from imf.train.trainer import Trainer

    world, rest = _world_size(rest)
    src = read_official(args.input)
    _require_moments(src)
    if args.preset is not None:  # the training config's preset too
        rest = ["--preset", args.preset, *rest]
    run_cfg = load_config(rest, world)
    ours = run_cfg.model_config()
    cfg, weights, ema, mu, nu = _convert(src, args, ours)
    diff = network_differences(dataclasses.asdict(cfg), dataclasses.asdict(ours))
    if diff:
        raise ConvertError(
            f"--dcp: {src.path} is another model than the training config's: {', '.join(diff[:4])} "
            "(set --preset / --model.*)"
        )
    run_cfg = dataclasses.replace(run_cfg, device="cpu")
    trainer = Trainer(run_cfg, dist.DistEnv(0, 1, 0, torch.device("cpu"), launched=False))
    try:
        step = src.step if src.step is not None else (src.adam_count or 0)
        with torch.no_grad():
            trainer.model.load_state_dict(weights)
            params = dict(trainer.model.named_parameters())
            for name, p in params.items():
                trainer.optimizer.state[p] = {
                    "step": torch.tensor(float(src.adam_count if src.adam_count is not None else step)),
                    "exp_avg": mu[name].clone(),
                    "exp_avg_sq": nu[name].clone(),
                }
        trainer.ema.load_state_dict({**{f"{d}": ema for d in trainer.ema.decays}, "updates": step})
        sched = trainer.scheduler
        sched.last_epoch = step
        sched._last_lr = [base * f(step) for base, f in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
        for group, lr in zip(trainer.optimizer.param_groups, sched._last_lr, strict=True):
            group["lr"] = lr
        trainer.step = step
        state = trainer.state_dict()
        entries = _rank_entries(state[checkpoint.RANK_ENTRY], trainer, run_cfg, world)
    finally:
        trainer.close()
    path = checkpoint.save(args.dcp, step, dict(state, rank=entries[0]), meta=trainer.meta(), keep_last=sys.maxsize)
    for rank, entry in enumerate(entries[1:], start=1):
        torch.save(entry, path / checkpoint.rank_file(rank))
    if world > 1:
        _rewrite_meta(path, world)
    what = f"step {step}, {world} rank(s); EMA and AdamW moments from {src.path}"
    return f"wrote {path} ({what}); continue with: imf.train ... --resume {path}"


def _rewrite_meta(path, world: int) -> None:
    from imf.train.checkpoint import META, atomic_write, file_digests

    meta = json.loads((path / META).read_text())
    meta.update(world_size=world, files=file_digests(path))
    atomic_write(path / META, json.dumps(meta, indent=1))


__all__ = ["write_dcp"]
