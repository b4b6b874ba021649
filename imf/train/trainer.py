"""The :class:`Trainer`: everything one optimizer step needs, and its whole state (torchtitan-style Stateful).

One optimizer step (:meth:`Trainer.train_step`): every rank takes ``batch_size / (world * grad_accum)``
samples per micro-batch from its :class:`InputStream` (its data shard and its own noise generator, seeded
by ``(seed, rank)`` via :func:`imf.seeding.rank_noise_seed`: ranks draw different ``t, r, e``), runs
:func:`imf.loss.imf_loss` (or ``mf_loss``) under ``torch.autocast`` in the compute dtype (bf16 on CUDA by
default; fp32 on CPU unless ``precision: bf16``) with FSDP2 gathering bf16 parameters (fp32 master
weights, fp32 gradient reduction), accumulates gradients, clips the global grad norm, and steps AdamW
(fused on CUDA, foreach elsewhere), the LR schedule and the fp32 EMAs. A step whose loss or grad norm
is not finite on any rank (one all-reduce, which also carries the loss terms and a stop request, so
all ranks agree) is skipped: no optimizer/EMA update, counted.

:meth:`Trainer.state_dict` is the whole resumable state: ``model``, ``optim`` and ``ema`` (sharded, for
DCP) and ``rank`` (this rank's step, scheduler, counters, RNG states and data position);
:meth:`Trainer.load_state_dict` restores it, so a resumed run continues bitwise.

One process is not sharded: its parameters stay fp32 under autocast, so elementwise ops on parameters
(gates, norm weights) and the residual stream run in fp32 there, and in bf16 under FSDP's bf16
``param_dtype``; matmuls are bf16 either way.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

import imf.train.parallel as parallel
import imf.train.schedule as schedule
from imf.data import LoaderSettings, build_loader
from imf.dist import DistEnv
from imf.flops import peak_flops, train_step_flops
from imf.loss import imf_loss, mf_loss, sample_training_inputs
from imf.phases import phase
from imf.seeding import rank_noise_seed
from imf.train.checkpoint import RANK_ENTRY
from imf.train.config import TrainConfig
from imf.train.ema import EMA


@dataclass
class StepResult:
    """What one :meth:`Trainer.train_step` did: rank-averaged ``metrics`` (loss terms), the global grad norm,
    the LR it used, whether it was ``skipped`` (non-finite), whether any rank asked to ``stop``, and timings."""

    step: int
    metrics: dict[str, float]
    grad_norm: float
    lr: float
    skipped: bool
    stop: bool
    seconds: float
    data_seconds: float


class InputStream:
    """This rank's training inputs: ``(x, y)`` from its data shard, and the noise ``e`` and
    ``(t, r, omega, t_min, t_max, drop)`` from its own generator. Stateful: loader position + generator."""

    def __init__(self, loader, loss_cfg, generator: torch.Generator, device: torch.device):
        self.loader, self.loss_cfg, self.generator, self.device = loader, loss_cfg, generator, device
        self._it = None

    def next(self) -> tuple[tuple, float]:
        """The next micro-batch's loss inputs ``(x, y, e, t, r, omega, t_min, t_max, drop)`` and the seconds
        spent waiting for the data."""
        if self._it is None:
            self._it = iter(self.loader)
        start = time.perf_counter()
        x, y = next(self._it)
        waited = time.perf_counter() - start
        e = torch.randn(x.shape, generator=self.generator, device=self.device)
        inputs = sample_training_inputs(x.shape[0], self.loss_cfg, self.generator, self.device)
        return (x, y, e, *inputs), waited

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "rng_noise": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.generator.set_state(state["rng_noise"])
        self._it = None

    def close(self) -> None:
        self.loader.close()


def input_stream(
    cfg: TrainConfig, model_cfg, loss_cfg, *, rank: int, world: int, batch_size: int, device: torch.device
) -> InputStream:
    """Rank ``rank`` of ``world``'s input stream: its data shard (``batch_size`` per micro-batch) and its
    noise generator, seeded by ``(cfg.seed, rank)``."""
    shape = (model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size)
    settings = LoaderSettings.of(
        cfg.data, batch_size=batch_size, rank=rank, world_size=world, seed=cfg.seed, device=device
    )
    loader = build_loader(cfg.data.source, settings, shape=shape, num_classes=model_cfg.num_classes)
    generator = torch.Generator(device).manual_seed(rank_noise_seed(cfg.seed, rank))
    return InputStream(loader, loss_cfg, generator, device)


class Trainer(Stateful):
    """Model (built on meta, parallelized, initialised: :func:`imf.train.parallel.build`), AdamW, LR schedule,
    EMAs, input stream and counters of one run on this rank; collective under torchrun."""

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.model_cfg, self.loss_cfg = cfg.model_config(), cfg.loss_config()
        device = env.device
        self.compute_dtype = (
            torch.bfloat16
            if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
            else torch.float32
        )
        self.backend = cfg.backend if cfg.backend != "auto" else ("triton" if device.type == "cuda" else "reference")
        self.accum = cfg.data.grad_accum
        self.micro = cfg.data.batch_size // (env.world * self.accum)
        self.inputs = input_stream(
            cfg, self.model_cfg, self.loss_cfg, rank=env.rank, world=env.world, batch_size=self.micro, device=device
        )
        loader = self.inputs.loader
        self.steps_per_epoch = max(1, loader.steps_per_epoch // self.accum)
        self.total = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * self.steps_per_epoch)
        s = cfg.schedule
        warmup = s.warmup_steps if s.warmup_steps is not None else round(s.warmup_epochs * self.steps_per_epoch)

        p = cfg.parallel
        self.model = parallel.build(
            self.model_cfg,
            backend=self.backend,
            env=env,
            seed=cfg.seed,
            param_dtype=None if self.compute_dtype == torch.float32 else self.compute_dtype,
            reduce_dtype=torch.float32,
            activation_checkpointing=p.activation_checkpointing,
            compile=p.compile,
            reshard_after_forward=p.reshard_after_forward,
        )
        o = cfg.optim
        fused = o.fused if o.fused is not None else device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
            fused=fused,
            foreach=None if fused else True,
        )
        self.scheduler = schedule.scheduler(
            self.optimizer, total=self.total, warmup=warmup, decay=s.decay, min_ratio=s.min_lr_ratio
        )
        self.ema = EMA(self.model, cfg.ema_decays, warmup=cfg.ema_warmup)
        self.step = self.skipped = self.in_a_row = 0
        self.flops_per_step = train_step_flops(self.model_cfg, self.loss_cfg, self.micro * self.accum)
        self.peak_flops = peak_flops(device)

    # --- one optimizer step --------------------------------------------------------------------------------

    def loss(self, x, y, e, t, r, omega, t_min, t_max, drop):
        """The method's loss of one micro-batch (the preset's arch decides iMF or MF)."""
        if self.model_cfg.arch == "imf":
            return imf_loss(self.model, x, y, e, t, r, omega, t_min, t_max, drop, cfg=self.loss_cfg)
        return mf_loss(self.model, x, y, e, t, r, drop, cfg=self.loss_cfg)

    def _poisoned(self, step: int) -> bool:
        d = self.cfg.debug
        return step in d.nan_steps and d.nan_rank in (None, self.env.rank)

    def train_step(self, stop: bool = False) -> StepResult:
        """Run optimizer step ``self.step + 1``; ``stop``: this rank asks the run to end after it."""
        self.step += 1
        start = time.perf_counter()
        device, data_s, sums = self.env.device, 0.0, {}
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(self.accum):
            with phase("imf.data"):
                batch, waited = self.inputs.next()
            data_s += waited
            autocast = torch.autocast(
                device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32
            )
            with phase("imf.loss"), autocast:
                loss, metrics = self.loss(*batch)
            if self._poisoned(self.step):
                loss = loss * float("nan")
                metrics["loss"] = loss.detach()
            with phase("imf.backward"):
                (loss / self.accum).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32, device=device) / self.accum
        with phase("imf.grad_sync"):
            reduced, norm, flags = self._reduce(sums, stop)
        skipped = flags[0] > 0 or not math.isfinite(norm)
        if skipped:
            self.skipped += 1
            self.in_a_row += 1
        else:
            with phase("imf.optimizer"):
                self.optimizer.step()
            with phase("imf.ema"):
                self.ema.update(self.model)
            self.in_a_row = 0
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return StepResult(self.step, reduced, norm, lr, skipped, flags[1] > 0, time.perf_counter() - start, data_s)

    def _reduce(self, sums: dict, stop: bool) -> tuple[dict[str, float], float, list[float]]:
        """Clip the global grad norm; all-reduce the loss terms, a non-finite flag and ``stop`` (one collective).
        Returns the rank-averaged terms, the norm and ``[any non-finite loss, any stop]``."""
        device = self.env.device
        clip = self.cfg.optim.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        names = sorted(sums)
        packed = torch.stack(
            [sums[k] for k in names]
            + [(~torch.isfinite(sums["loss"])).float(), torch.tensor(float(stop), device=device)]
        )
        if self.env.world > 1:
            dist.all_reduce(packed)
        # one host read for the terms, the flags and the norm (fp64 holds either dtype exactly)
        values = torch.cat([packed.double(), grad_norm.reshape(1).double()]).tolist()
        reduced = {k: v / self.env.world for k, v in zip(names, values[:-3], strict=True)}
        return reduced, values[-1], values[-3:-1]

    # --- state ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        device = self.env.device
        rank = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "skipped": self.skipped,
            "in_a_row": self.in_a_row,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            **self.inputs.state_dict(),
        }
        return {"model": model_sd, "optim": optim_sd, "ema": self.ema.state_dict(), RANK_ENTRY: rank}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.ema.load_state_dict(state["ema"])
        rank = state[RANK_ENTRY]
        self.scheduler.load_state_dict(rank["scheduler"])
        self.step, self.skipped, self.in_a_row = rank["step"], rank["skipped"], rank["in_a_row"]
        torch.set_rng_state(rank["rng_cpu"])
        if self.env.device.type == "cuda" and rank["rng_cuda"] is not None:
            torch.cuda.set_rng_state(rank["rng_cuda"], self.env.device)
        self.inputs.load_state_dict({"loader": rank["loader"], "rng_noise": rank["rng_noise"]})

    def meta(self) -> dict:
        """What a checkpoint's ``meta.json`` says about the run (besides step and world size)."""
        return {
            "ema_decays": list(self.cfg.ema_decays),
            "model_config": dataclasses.asdict(self.model_cfg),
            "config": self.cfg.to_dict(),
        }

    @property
    def epoch(self) -> int:
        return self.inputs.loader.epoch

    def close(self) -> None:
        self.inputs.close()


__all__ = ["InputStream", "StepResult", "Trainer", "input_stream"]
