"""Periodic sample grids from the first EMA, at fixed labels and noise, one grid per omega x interval.

Pixel data (digits): PNG grids (one row per label). Latent data: the latents as ``.pt``, and PNGs decoded
with the local diffusers ``AutoencoderKL`` at ``log.vae`` (:class:`imf.vae.LatentDecoder`, un-normalised
with the dataset's channel statistics and latent factors).
"""

from __future__ import annotations

from pathlib import Path

import torch

from imf.model import build_model
from imf.sample import generate, save_grid


class SampleGrids:
    """Call ``grids(step, ema)`` on every rank (gathering sharded EMA weights is collective); rank 0 writes."""

    def __init__(self, cfg, model_cfg, backend: str, device, compute_dtype, rank: int):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.autocast = compute_dtype if compute_dtype != torch.float32 else None
        self.pixel = cfg.data.source == "digits"
        self.dir = Path(cfg.out_dir) / "samples"
        labels = cfg.log.sample_labels or tuple(range(min(10, model_cfg.num_classes)))
        self.per_label = cfg.log.sample_per_label
        self.y = torch.tensor(labels, device=device).repeat_interleave(self.per_label)
        shape = (len(self.y), model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size)
        self.noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        self.model = None
        if rank == 0:
            with torch.random.fork_rng(devices=[]):  # its weights come from the EMA; leave the global RNG alone
                self.model = build_model(model_cfg, backend=backend, device=device).eval()
        self.decoder = None

    @torch.no_grad()
    def __call__(self, step: int, ema) -> None:
        weights = ema.full_tensors()  # collective when sharded
        if self.rank != 0:
            return
        for n, p in self.model.named_parameters():
            p.copy_(weights[n])
        self.dir.mkdir(parents=True, exist_ok=True)
        g = self.cfg.log
        for omega in g.sample_omegas:
            for t_min, t_max in g.sample_intervals:
                x = generate(
                    self.model,
                    self.y,
                    omega,
                    t_min,
                    t_max,
                    steps=g.sample_steps,
                    noise=self.noise,
                    autocast_dtype=self.autocast,
                )
                name = f"step{step:09d}_w{omega:g}_t{t_min:g}-{t_max:g}"
                if self.pixel:
                    save_grid(x, self.dir / f"{name}.png", nrow=self.per_label, upscale=max(1, 64 // x.shape[-1]))
                    continue
                torch.save(x.cpu(), self.dir / f"{name}.pt")
                if g.vae is not None:
                    save_grid(self._decode(x), self.dir / f"{name}.png", nrow=self.per_label)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            from imf.data import load_manifest
            from imf.vae import LatentDecoder, load_vae

            source = self.cfg.data.source
            manifest = None if source == "synthetic" else load_manifest(source)
            self.decoder = LatentDecoder(load_vae(self.cfg.log.vae, device=self.device, arg="log.vae"), manifest)
        return self.decoder(x)


__all__ = ["SampleGrids"]
