"""``run(cfg)``: the training loop around a :class:`~imf.train.trainer.Trainer` (resume, logging, grids, saves).

Start-up (``--out`` and the checkpoint root checked first, :func:`imf.cli.check_out_dir`; then rank 0
repairs the checkpoint root, :func:`imf.train.checkpoint.recover`): a fresh run refuses a checkpoint root
that already holds checkpoints; ``checkpoint.resume`` "auto" continues from ``latest`` (or starts fresh
when there is none), a path resumes from that checkpoint, and checkpoints newer than it are moved aside
(:func:`imf.train.checkpoint.supersede`). A resume must keep the settings the checkpoint was trained
with; accepted changes (more steps, ...) are recorded (:mod:`imf.train.record`). One line before the
progress bar says what trains where; the bar follows the headline error
(:class:`imf.train.metrics.HeadlineError`); one line at the end says where the results are. Then every
step: the trainer's :meth:`~imf.train.trainer.Trainer.train_step`, a metrics record every ``log.every_steps``
(:mod:`imf.train.metrics`), sample grids every ``log.sample_every``, a checkpoint every
``checkpoint.every_steps`` and at the end. After ``max_nonfinite`` non-finite steps in a row the run
writes a checkpoint and stops with :class:`NonFiniteError`. SIGTERM/SIGINT end the current step, write
a checkpoint and return (``TrainResult.stopped``); a second SIGINT aborts at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import imf.train.checkpoint as checkpoint
import imf.train.metrics as metrics
import imf.train.profile as profile
import imf.train.record as record
from imf import dist
from imf.cli import UserError, check_out_dir
from imf.phases import phase
from imf.train.args import dump_config
from imf.train.config import ConfigError, TrainConfig
from imf.train.ema import EMA
from imf.train.grids import SampleGrids
from imf.train.signals import StopSignals
from imf.train.trainer import Trainer


class NonFiniteError(UserError):
    """Training stopped after too many non-finite steps in a row (a checkpoint was written)."""

    exit_code = 3


@dataclass
class TrainResult:
    """What :func:`run` returns. ``losses[i]`` is the (rank-averaged) loss of step ``first_step + i``
    (NaN for a non-finite one); ``stopped`` is None when all steps ran, else why the run ended early.
    ``model`` (sharded when distributed) and ``ema`` are the live training objects; ``rank`` is this process's."""

    step: int
    first_step: int
    losses: list[float]
    skipped: int
    stopped: str | None
    checkpoint: Path | None
    train_seconds: float
    model: torch.nn.Module = field(repr=False)
    ema: EMA = field(repr=False)
    rank: int = 0


def _note(env: dist.DistEnv, text: str) -> None:
    if env.is_main:
        print(f"imf.train: {text}", file=sys.stderr)


def _resume_path(cfg: TrainConfig) -> Path | None:
    root, resume = cfg.checkpoint_dir, cfg.checkpoint.resume
    if resume is None:
        if checkpoint.step_dirs(root):
            raise ConfigError(
                f"{root} already holds checkpoints: pass --resume (auto) to continue that run, "
                "or use another out_dir / checkpoint.dir"
            )
        return None
    if resume == "auto":
        return checkpoint.latest(root)
    return checkpoint.resolve_checkpoint(resume)


def run(cfg: TrainConfig) -> TrainResult:
    """Train per ``cfg`` (validated here against the world size); collective under torchrun."""
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    check_out_dir(cfg.out_dir)
    check_out_dir(cfg.checkpoint_dir, "--checkpoint.dir")
    if cfg.profile.enabled:
        check_out_dir(cfg.profile_dir, "--profile.dir")
    env = dist.describe(cfg.device, arg="device")
    threads = cfg.torch_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads is not None:
        torch.set_num_threads(threads)
    env = dist.init(env)
    try:
        return _train(cfg, env)
    finally:
        dist.destroy(env)


def _resume_changes(cfg: TrainConfig, resume: Path) -> dict:
    """The accepted setting changes against the checkpoint's own config (:func:`imf.train.record.check_resume`)."""
    resume = checkpoint.resolve_checkpoint(resume)
    own = resume.parent.resolve() == cfg.checkpoint_dir.resolve()
    where = f"the run in {cfg.out_dir}" if own else f"checkpoint {resume}"
    return record.check_resume(cfg, checkpoint.read_meta(resume)["config"], where)


def _start(cfg: TrainConfig, env: dist.DistEnv, trainer: Trainer, resume: Path | None, changed: dict) -> None:
    """Load the resume checkpoint, move newer ones aside, and prepare ``out_dir`` (config and its history,
    metrics)."""
    root = cfg.checkpoint_dir
    if resume is not None:
        checkpoint.load(resume, trainer)
        if env.is_main:
            moved, dest = checkpoint.supersede(root, trainer.step)
            if moved:
                _note(env, f"resumed from step {trainer.step}; moved the newer checkpoints {moved} to {dest}")
            if changed:
                _note(env, f"resuming at step {trainer.step} with {record.describe(changed)} ({record.HISTORY})")
    if env.is_main:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        record.write(out, dump_config(cfg), step=trainer.step, resumed_from=resume, changed=changed)
        metrics.truncate_after(out, trainer.step)
    dist.barrier()


def _train(cfg: TrainConfig, env: dist.DistEnv) -> TrainResult:
    if env.is_main:
        for note in checkpoint.recover(cfg.checkpoint_dir):
            _note(env, f"checkpoint recovery: {note}")
    dist.barrier()
    resume = _resume_path(cfg)
    changed = _resume_changes(cfg, resume) if resume is not None else {}
    trainer = Trainer(cfg, env)
    try:
        _start(cfg, env, trainer, resume, changed)
        return _loop(cfg, env, trainer, resume)
    finally:
        trainer.close()


def _headline(cfg: TrainConfig, env: dist.DistEnv, trainer: Trainer) -> str:
    """The line before the progress bar: model and size, data, world size, steps, output folder."""
    m = trainer.model_cfg
    params = sum(p.numel() for p in trainer.model.parameters())
    procs = f"{env.world} processes" if env.world > 1 else "1 process"
    return (
        f"{cfg.preset} ({m.arch}, dim {m.dim}, depth {m.depth}, {params / 1e6:.2f} M parameters, {trainer.backend} "
        f"ops) on {cfg.data.source}, batch {cfg.data.batch_size}, {procs} on {env.device.type}; steps "
        f"{trainer.step + 1}-{trainer.total}; out {cfg.out_dir}"
    )


def _summary(cfg: TrainConfig, result: TrainResult, grids: bool) -> str:
    """The line at the end of a run: steps, time, where the checkpoint, metrics and samples are."""
    done = result.step - result.first_step + 1
    where = [f"checkpoint {result.checkpoint}", f"metrics {Path(cfg.out_dir) / metrics.METRICS}"]
    if grids:
        where.append(f"samples {Path(cfg.out_dir) / 'samples'}")
    return f"trained {done} steps (to step {result.step}) in {result.train_seconds:.0f} s; " + ", ".join(where)


def _loop(cfg: TrainConfig, env: dist.DistEnv, trainer: Trainer, resume: Path | None) -> TrainResult:
    log = metrics.MetricsLog(Path(cfg.out_dir), env.is_main, cfg.log.tensorboard)
    grids = (
        SampleGrids(cfg, trainer.model_cfg, trainer.backend, env.device, trainer.compute_dtype, env.rank)
        if cfg.log.sample_every > 0
        else None
    )
    window = metrics.Window(
        images_per_step=trainer.micro * trainer.accum,
        world=env.world,
        flops_per_step=trainer.flops_per_step,
        peak=trainer.peak_flops,
        device=env.device,
    )
    meta, every = trainer.meta(), cfg.checkpoint.every_steps
    first_step, losses, ckpt_path, stopped = trainer.step + 1, [], resume, None

    def save() -> Path:
        with phase("imf.checkpoint"):
            return checkpoint.save(
                cfg.checkpoint_dir, trainer.step, trainer.state_dict(), meta=meta, keep_last=cfg.checkpoint.keep_last
            )

    profiler = profile.open_session(
        cfg.profile, cfg.profile_dir, rank=env.rank, device=env.device, first_step=trainer.step
    )  # None without --profile.*
    _note(env, _headline(cfg, env, trainer))
    shown = metrics.HeadlineError()
    start = time.perf_counter()
    bar = tqdm(
        total=trainer.total,
        initial=trainer.step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not env.is_main or not cfg.log.progress,
    )
    try:
        with StopSignals() as signals, profiler or contextlib.nullcontext():
            while trainer.step < trainer.total:
                interrupt = cfg.debug.interrupt_at_step == trainer.step + 1
                r = trainer.train_step(stop=signals.requested is not None or interrupt)
                losses.append(r.metrics["loss"])
                shown.add(r.metrics)
                window.add(r.seconds, r.data_seconds)
                bar.update(1)
                last = r.step == trainer.total
                if r.step % cfg.log.every_steps == 0 or last or r.stop or trainer.in_a_row:
                    img_s = window.images_per_s()
                    log.write(window.record(r, epoch=trainer.epoch, skipped=trainer.skipped, in_a_row=trainer.in_a_row))
                    bar.set_postfix(metrics.progress_postfix(shown.mean(), img_s, trainer.skipped))
                if trainer.in_a_row >= cfg.max_nonfinite:
                    ckpt_path = save()
                    raise NonFiniteError(
                        f"{trainer.in_a_row} non-finite steps in a row (loss or grad norm NaN/inf; {trainer.skipped} "
                        f"skipped in total), stopped at step {r.step}; checkpoint {ckpt_path}. Lower the learning "
                        "rate, check the data, or resume from an earlier checkpoint (--resume DIR/step_...)."
                    )
                if grids is not None and (r.step % cfg.log.sample_every == 0 or last):
                    grids(r.step, trainer.ema)
                if r.stop or last or (every and r.step % every == 0):
                    ckpt_path = save()
                if profiler is not None:
                    profiler.step(r.step)
                if r.stop:
                    stopped = (
                        f"signal {signal.Signals(signals.requested).name}"
                        if signals.requested is not None
                        else f"debug.interrupt_at_step {r.step}"
                        if interrupt
                        else "stop requested on another rank"
                    )
                    break
    finally:
        bar.close()
        log.close()
    result = TrainResult(
        step=trainer.step,
        first_step=first_step,
        losses=losses,
        skipped=trainer.skipped,
        stopped=stopped,
        checkpoint=ckpt_path,
        train_seconds=time.perf_counter() - start,
        model=trainer.model,
        ema=trainer.ema,
        rank=env.rank,
    )
    if stopped is None:
        _note(env, _summary(cfg, result, grids is not None))
    return result


__all__ = ["NonFiniteError", "TrainResult", "run"]
