"""The distributed trainer: FSDP2 + bf16, fused AdamW, EMA, DCP checkpoint/resume, NaN guard, logging.

Launch::

    python -m imf.train --preset demo --data digits            # one process (CPU or one GPU)
    python -m imf.train --config configs/imf_b2.yaml --data.source /data/in1k_latents --lr 2e-4
    torchrun --nproc_per_node=8 -m imf.train --config configs/imf_b2.yaml   # one node, 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_id=JOB \\
             --rdzv_endpoint=HOST:29500 -m imf.train --config configs/imf_b2.yaml   # 4 nodes
    python -m imf.train ... --resume            # continue from <checkpoint dir>/latest
    python -m imf.train export --ckpt runs/x/checkpoints/step_000010000 --out model.safetensors [--decay D]

Every node runs the same ``torchrun`` line; the c10d rendezvous at ``HOST:29500`` (any one node) forms
the group. The process group is nccl on GPU, gloo on CPU; without torchrun (no ``RANK`` in the
environment) the run is one plain process. Configuration: :mod:`imf.train_config` (file + ``--key value``
overrides, validated before anything starts).

One optimizer step: every rank draws ``batch_size / (world * grad_accum)`` samples per micro-batch from
its data shard and its own noise generator (seeded by ``(seed, rank)``: ranks draw different ``t, r, e``),
runs :func:`imf.loss.imf_loss` (or ``mf_loss``) under ``torch.autocast`` in the compute dtype (bf16 on
CUDA by default; fp32 on CPU unless ``--precision bf16``) with FSDP2 gathering bf16 parameters
(fp32 master weights, fp32 gradient reduction), accumulates gradients, clips the global grad norm,
and steps AdamW (fused on CUDA, foreach elsewhere), the LR schedule and the fp32 EMAs. A step whose
loss or grad norm is not finite on any rank (one all-reduce, so all ranks agree) is skipped: no
optimizer/EMA update, counted and logged; after ``max_nonfinite`` in a row the run writes a
checkpoint and stops with :class:`NonFiniteError`. SIGTERM/SIGINT end the current step, write a
checkpoint and return (exit code 128 + signal); a second SIGINT aborts at once.

Outputs under ``out_dir``: ``config.yaml`` (resolved), ``metrics.jsonl`` (every ``log.every_steps``:
loss terms, grad norm, lr, images/s per device and in total, TFLOP/s per device and MFU (when the
device's peak is known, :func:`imf.flops.peak_flops`), peak memory (CUDA allocator, or the process's
max RSS on CPU), data-wait fraction, skipped steps), ``tb/`` (TensorBoard, optional),
``samples/`` (sample grids from the first EMA), ``checkpoints/`` (:mod:`imf.checkpoint`).

Model initialisation: every rank builds the model on the CPU from the same seed (identical weights, no
broadcast needed), moves it to its device and shards it (not on the meta device: the model computes
its non-persistent buffers, e.g. RoPE tables, in ``__init__`` and has no re-initialisation method).
One process is not sharded: its parameters stay fp32 under autocast, so elementwise ops on parameters
(gates, norm weights) and the residual stream run in fp32 there, and in bf16 under FSDP's bf16
``param_dtype``; matmuls are bf16 either way. Verified here: CPU/gloo with 1 and 2 processes
(fp32 and bf16 parameters). Not verified here: nccl, CUDA, multi-node, ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from tqdm import tqdm

from imf import checkpoint
from imf.data import build_loader
from imf.ema import EMA
from imf.flops import peak_flops, train_step_flops
from imf.loss import imf_loss, mf_loss, sample_training_inputs
from imf.model import build_model
from imf.parallel import parallelize
from imf.sample import generate, save_grid
from imf.train_config import ConfigError, TrainConfig, dump_config, load_config


class NonFiniteError(RuntimeError):
    """Training stopped after too many non-finite steps in a row."""


@dataclass
class TrainResult:
    """What :func:`run` returns. ``losses[i]`` is the (rank-averaged) loss of step ``first_step + i``
    (NaN for a non-finite one); ``stopped`` is None when all steps ran, else why the run ended early.
    ``model`` (sharded when distributed) and ``ema`` are the live training objects."""

    step: int
    first_step: int
    losses: list[float]
    skipped: int
    stopped: str | None
    checkpoint: Path | None
    train_seconds: float
    model: torch.nn.Module = field(repr=False)
    ema: EMA = field(repr=False)


@dataclass
class _Dist:
    rank: int
    world: int
    device: torch.device
    mesh: object
    owns_group: bool


def _setup_distributed(cfg: TrainConfig) -> _Dist:
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r} requested but CUDA is not available")
    if "RANK" not in os.environ:
        device = torch.device(cfg.device if cfg.device.startswith("cuda") else ("cuda" if use_cuda else "cpu"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return _Dist(0, 1, device, None, False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    owns = not dist.is_initialized()
    if use_cuda:
        torch.cuda.set_device(device)
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,)) if world > 1 else None
    return _Dist(dist.get_rank(), world, device, mesh, owns)


def lr_factor(step: int, total: int, warmup: int, decay: str, min_ratio: float) -> float:
    """LR multiplier after ``step`` completed steps (``LambdaLR`` convention): linear warm-up
    ``(step + 1) / warmup``, then 1 (constant) or a cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _StopSignals:
    """SIGTERM/SIGINT set ``requested`` (the loop checkpoints and returns); a second SIGINT aborts."""

    def __init__(self):
        self.requested: int | None = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class _MetricsLog:
    """``metrics.jsonl`` (+ TensorBoard) on rank 0; non-finite values are written as null."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        self.path = out_dir / "metrics.jsonl"
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError(f"log.tensorboard needs the tensorboard package ({e})") from None
            self.tb = SummaryWriter(str(out_dir / "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _SampleGrids:
    """Samples from the first EMA at fixed labels and noise, one grid per omega x interval.

    Pixel data (digits): PNG grids (one row per label). Latent data: the latents as ``.pt``, and PNGs
    decoded with the diffusers ``AutoencoderKL`` at ``log.vae`` (latents un-normalised with the
    dataset's channel statistics and VAE scaling factor)."""

    def __init__(self, cfg: TrainConfig, model_cfg, backend: str, device, compute_dtype, rank: int):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.autocast = compute_dtype if compute_dtype != torch.float32 else None
        self.pixel = cfg.data.source == "digits"
        self.dir = Path(cfg.out_dir) / "samples"
        labels = cfg.log.sample_labels or tuple(range(min(10, model_cfg.num_classes)))
        self.per_label = cfg.log.sample_per_label
        self.y = torch.tensor(labels, device=device).repeat_interleave(self.per_label)
        shape = (len(self.y), model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size)
        self.noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        self.model = build_model(model_cfg, backend=backend).to(device).eval() if rank == 0 else None
        self.vae = None

    @torch.no_grad()
    def __call__(self, step: int, ema: EMA) -> None:
        weights = ema.full_tensors()  # collective when sharded
        if self.rank != 0:
            return
        for n, p in self.model.named_parameters():
            p.copy_(weights[n])
        self.dir.mkdir(parents=True, exist_ok=True)
        g = self.cfg.log
        for omega in g.sample_omegas:
            for t_min, t_max in g.sample_intervals:
                x = generate(self.model, self.y, omega, t_min, t_max, steps=g.sample_steps, noise=self.noise,
                             autocast_dtype=self.autocast)
                name = f"step{step:09d}_w{omega:g}_t{t_min:g}-{t_max:g}"
                if self.pixel:
                    save_grid(x, self.dir / f"{name}.png", nrow=self.per_label, upscale=max(1, 64 // x.shape[-1]))
                    continue
                torch.save(x.cpu(), self.dir / f"{name}.pt")
                if g.vae is not None:
                    save_grid(self._decode(x), self.dir / f"{name}.png", nrow=self.per_label)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            from diffusers import AutoencoderKL

            from imf.data import load_manifest

            self.vae = AutoencoderKL.from_pretrained(self.cfg.log.vae, local_files_only=True).to(self.device).eval()
            mean, std, meta = torch.zeros(x.shape[1]), torch.ones(x.shape[1]), {}
            if self.cfg.data.source != "synthetic":
                man = load_manifest(self.cfg.data.source)
                mean, std = torch.tensor(man["channel_mean"]), torch.tensor(man["channel_std"])
                meta = man.get("metadata", {})
            scale = meta.get("scaling_factor", self.vae.config.scaling_factor)
            shift = meta.get("shift_factor", getattr(self.vae.config, "shift_factor", None))
            self.stats = (mean.view(1, -1, 1, 1).to(self.device), std.view(1, -1, 1, 1).to(self.device),
                          float(scale), float(shift or 0.0))
        mean, std, scale, shift = self.stats
        z = (x.float() * std + mean) / scale + shift
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _noise_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank, 0x6E6F]).generate_state(1, np.uint64)[0] >> 1)


def _resume_path(cfg: TrainConfig) -> Path | None:
    root, resume = cfg.checkpoint_dir, cfg.checkpoint.resume
    if resume is None:
        if checkpoint.step_dirs(root):
            raise ConfigError(f"{root} already holds checkpoints: pass --resume (auto) to continue that run, "
                              "or use another out_dir / checkpoint.dir")
        return None
    if resume == "auto":
        return checkpoint.latest(root)
    return Path(resume)


def run(cfg: TrainConfig) -> TrainResult:
    """Train per ``cfg`` (validated here against the world size); collective under torchrun."""
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    env = _setup_distributed(cfg)
    try:
        return _train(cfg, env)
    finally:
        if env.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: _Dist) -> TrainResult:
    rank, world, device = env.rank, env.world, env.device
    model_cfg, loss_cfg = cfg.model_config(), cfg.loss_config()
    compute_dtype = torch.bfloat16 if cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda") else torch.float32
    backend = cfg.backend if cfg.backend != "auto" else ("triton" if device.type == "cuda" else "reference")
    accum = cfg.data.grad_accum
    micro = cfg.data.batch_size // (world * accum)
    out_dir = Path(cfg.out_dir)
    resume = _resume_path(cfg)

    shape = (model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size)
    loader_kw = dict(seed=cfg.seed, device=device, backend=cfg.data.backend, num_workers=cfg.data.num_workers,
                     shape=shape, num_classes=model_cfg.num_classes, flip=cfg.data.flip,
                     verify_checksums=cfg.data.verify_checksums)
    if cfg.debug.global_batch:
        loader = build_loader(cfg.data.source, batch_size=micro * world, **loader_kw)
    else:
        loader = build_loader(cfg.data.source, batch_size=micro, rank=rank, world_size=world, **loader_kw)
    steps_per_epoch = max(1, loader.steps_per_epoch // accum)
    total = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * steps_per_epoch)
    s = cfg.schedule
    warmup = s.warmup_steps if s.warmup_steps is not None else round(s.warmup_epochs * steps_per_epoch)

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, backend=backend).to(device)
    parallelize(model, mesh=env.mesh, param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                reduce_dtype=torch.float32, activation_checkpointing=cfg.parallel.activation_checkpointing,
                compile=cfg.parallel.compile, reshard_after_forward=cfg.parallel.reshard_after_forward)
    o = cfg.optim
    fused = o.fused if o.fused is not None else device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                  fused=fused, foreach=None if fused else True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k, total, warmup, s.decay, s.min_lr_ratio))
    ema = EMA(model, cfg.ema_decays)
    noise_gen = torch.Generator(device).manual_seed(_noise_seed(cfg.seed, 0 if cfg.debug.global_batch else rank))

    step, skipped, in_a_row = 0, 0, 0
    if resume is not None:
        state = checkpoint.load(resume, model=model, optimizer=optimizer, ema=ema)
        scheduler.load_state_dict(state["scheduler"])
        step, skipped, in_a_row = state["step"], state["skipped"], state["in_a_row"]
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        noise_gen.set_state(state["rng_noise"])
        loader.load_state_dict(state["loader"])
    first_step = step + 1

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg))
    log = _MetricsLog(out_dir, rank == 0, cfg.log.tensorboard)
    grids = (_SampleGrids(cfg, model_cfg, backend, device, compute_dtype, rank)
             if cfg.log.sample_every > 0 else None)
    flops_per_step = train_step_flops(model_cfg, loss_cfg, micro * accum)
    peak = peak_flops(device)
    meta = {"ema_decays": list(cfg.ema_decays), "model_config": dataclasses.asdict(model_cfg), "config": cfg.to_dict()}

    def save() -> Path:
        rank_state = {"step": step, "scheduler": scheduler.state_dict(), "skipped": skipped, "in_a_row": in_a_row,
                      "rng_cpu": torch.get_rng_state(), "rng_noise": noise_gen.get_state(),
                      "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                      "loader": loader.state_dict()}
        path = checkpoint.save(cfg.checkpoint_dir, step, model=model, optimizer=optimizer, ema=ema,
                               rank_state=rank_state, meta=meta, keep_last=cfg.checkpoint.keep_last)
        return path

    def draw(x, y):
        """Noise and training inputs for this rank's micro-batch ``(x, y)``."""
        n = x.shape[0]
        e = torch.randn(x.shape, generator=noise_gen, device=device)
        inputs = sample_training_inputs(n, loss_cfg, noise_gen, device)
        if cfg.debug.global_batch:
            part = slice(rank * micro, (rank + 1) * micro)
            return (x[part], y[part], e[part], *(v[part] for v in inputs))
        return (x, y, e, *inputs)

    def loss_fn(x, y, e, t, r, omega, t_min, t_max, drop):
        if cfg.loss == "imf":
            return imf_loss(model, x, y, e, t, r, omega, t_min, t_max, drop, cfg=loss_cfg)
        return mf_loss(model, x, y, e, t, r, drop, cfg=loss_cfg)

    losses, names = [], None
    window = {"steps": 0, "time": 0.0, "data": 0.0}
    ckpt_path, stopped = resume, None
    data_iter = iter(loader)
    start = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=rank != 0 or not cfg.log.progress)
    try:
        with _StopSignals() as signals:
            while step < total:
                step += 1
                t0 = time.perf_counter()
                data_s = 0.0
                optimizer.zero_grad(set_to_none=True)
                sums = {}
                for _ in range(accum):
                    td = time.perf_counter()
                    x, y = next(data_iter)
                    data_s += time.perf_counter() - td
                    with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                        loss, metrics = loss_fn(*draw(x, y))
                    if step in cfg.debug.nan_steps and cfg.debug.nan_rank in (None, rank):
                        loss = loss * float("nan")
                        metrics["loss"] = loss.detach()
                    (loss / accum).backward()
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32, device=device) / accum
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip or math.inf, foreach=True)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                names = names or sorted(sums)
                stop_now = signals.requested is not None or cfg.debug.interrupt_at_step == step
                packed = torch.stack([sums[k] for k in names] + [
                    (~torch.isfinite(sums["loss"])).float(), torch.tensor(float(stop_now), device=device)])
                if world > 1:
                    dist.all_reduce(packed)
                values = packed.tolist()
                reduced = {k: v / world for k, v in zip(names, values[:-2], strict=True)}
                bad = values[-2] > 0 or not math.isfinite(grad_norm.item())
                stop_now = values[-1] > 0
                if bad:
                    skipped += 1
                    in_a_row += 1
                else:
                    optimizer.step()
                    ema.update(model)
                    in_a_row = 0
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                losses.append(reduced["loss"])
                dt = time.perf_counter() - t0
                window["steps"] += 1
                window["time"] += dt
                window["data"] += data_s
                bar.update(1)

                if step % cfg.log.every_steps == 0 or step == total or stop_now or in_a_row:
                    img_s = micro * accum * window["steps"] / window["time"]
                    rec = {"step": step, "epoch": loader.epoch, **reduced, "grad_norm": grad_norm.item(), "lr": lr,
                           "img_per_s_per_device": img_s, "img_per_s": img_s * world,
                           "step_time_s": window["time"] / window["steps"],
                           "tflops_per_device": flops_per_step * window["steps"] / window["time"] / 1e12,
                           "peak_mem_gib": _peak_memory_gib(device), "data_wait_frac": window["data"] / window["time"],
                           "skipped_total": skipped, "nonfinite_in_a_row": in_a_row}
                    if peak:
                        rec["mfu"] = flops_per_step * window["steps"] / window["time"] / peak
                    log.write(rec)
                    bar.set_postfix(loss=f"{reduced['loss']:.4f}", img_s=f"{img_s * world:.0f}", skipped=skipped)
                    window = {"steps": 0, "time": 0.0, "data": 0.0}

                if in_a_row >= cfg.max_nonfinite:
                    ckpt_path = save()
                    raise NonFiniteError(
                        f"{in_a_row} non-finite steps in a row (loss or grad norm NaN/inf; {skipped} skipped in "
                        f"total), stopped at step {step}; checkpoint {ckpt_path}. Lower the learning rate, check the "
                        "data, or resume from an earlier checkpoint.")
                if grids is not None and (step % cfg.log.sample_every == 0 or step == total):
                    grids(step, ema)
                every = cfg.checkpoint.every_steps
                if stop_now or step == total or (every and step % every == 0):
                    ckpt_path = save()
                if stop_now:
                    stopped = (f"signal {signal.Signals(signals.requested).name}" if signals.requested is not None
                               else f"debug.interrupt_at_step {step}" if cfg.debug.interrupt_at_step == step
                               else "stop requested on another rank")
                    break
    finally:
        bar.close()
        log.close()
        loader.close()
    return TrainResult(step=step, first_step=first_step, losses=losses, skipped=skipped, stopped=stopped,
                       checkpoint=ckpt_path, train_seconds=time.perf_counter() - start, model=model, ema=ema)


def _export_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m imf.train export",
                                description="write one EMA of a checkpoint to a safetensors file")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (step_...) or a root with a 'latest' file")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--decay", type=float, default=None, help="EMA decay (default: the first of the run)")
    args = p.parse_args(argv)
    ckpt = Path(args.ckpt)
    try:
        if not (ckpt / checkpoint.META).exists() and (ckpt / checkpoint.LATEST).exists():
            ckpt = checkpoint.latest(ckpt)
        out = checkpoint.export_ema(ckpt, args.out, args.decay)
    except checkpoint.CheckpointError as e:
        print(f"imf.train export: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (EMA of {ckpt})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "export":
        return _export_main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        import imf.train_config

        print(__doc__, imf.train_config.__doc__, sep="\n")
        return 0
    try:
        cfg = load_config(argv, int(os.environ.get("WORLD_SIZE", "1")))
        result = run(cfg)
    except ConfigError as e:
        print(f"imf.train: configuration error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"imf.train: {e}", file=sys.stderr)
        return 3
    except checkpoint.CheckpointError as e:
        print(f"imf.train: {e}", file=sys.stderr)
        return 4
    if result.stopped is not None:
        print(f"imf.train: stopped at step {result.step} ({result.stopped}); checkpoint {result.checkpoint}",
              file=sys.stderr)
        codes = {"signal SIGTERM": 128 + signal.SIGTERM, "signal SIGINT": 128 + signal.SIGINT}
        return int(codes.get(result.stopped, 0))
    return 0


__all__ = ["run", "main", "TrainResult", "NonFiniteError", "lr_factor"]

if __name__ == "__main__":
    sys.exit(main())
