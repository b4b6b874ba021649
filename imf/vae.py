"""The VAE between images and the latents the model trains on: loading, encoding (prepare), decoding (train, evaluate).

A latent dataset (:mod:`imf.data.format`) stores the posterior moments of a diffusers ``AutoencoderKL`` *after*
``z = (latent - shift_factor) * scaling_factor`` (SD-VAE: scale 0.18215, no shift); the model sees them normalised
per channel, ``x = (z - channel_mean) / channel_std``. Decoding inverts both::

    latent = (x * channel_std + channel_mean) / scaling_factor + shift_factor

with the channel statistics and the factors from the dataset's manifest (``metadata.scaling_factor`` /
``metadata.shift_factor``, written by :mod:`imf.prepare`), else the VAE's own config (and identity statistics when
there is no dataset, e.g. synthetic latents). The VAE always comes from a local ``from_pretrained`` directory; nothing
is downloaded. Models converted from the official checkpoints (:mod:`imf.convert`) carry the official
normalisation (:func:`official_latent_norm`) in their export instead of a dataset manifest. ``diffusers`` is
optional (the ``data`` extra): without it the loaders raise
:class:`imf.cli.MissingDependencyError` with the install command.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from imf.cli import require
from imf.data.format import DataError

__all__ = ["OFFICIAL_LATENT_MEAN", "OFFICIAL_LATENT_STD", "LatentDecoder", "LatentEncoder", "latent_factors"]
__all__ += ["load_vae", "official_latent_norm"]

# The official iMF / MF latent normalisation: fixed per-channel mean and std of sd-vae-ft-mse posterior samples
# of ImageNet 256 *before* the SD scaling factor (``Lyy-iiis/imeanflow`` ``utils/vae_util.py``, both branches):
# the model sees ``(latent - mean) / std`` and its samples decode as ``vae.decode(x * std + mean)``.
OFFICIAL_LATENT_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)
OFFICIAL_LATENT_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)


def official_latent_norm() -> dict:
    """The official normalisation as a manifest-like dict :class:`LatentDecoder` takes (``channel_mean``,
    ``channel_std``, and ``metadata`` with ``scaling_factor`` 1 and no shift: the statistics are of the
    unscaled latent)."""
    return {
        "channel_mean": list(OFFICIAL_LATENT_MEAN),
        "channel_std": list(OFFICIAL_LATENT_STD),
        "metadata": {"scaling_factor": 1.0, "shift_factor": 0.0},
        "source": "official iMF/MF (sd-vae-ft-mse, unscaled latents)",
    }


def load_vae(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype = torch.float32, arg: str = "--vae"):
    """``AutoencoderKL.from_pretrained(path, local_files_only=True)`` on ``device`` in ``dtype``, in eval mode.

    ``arg`` names the option the path came from in error messages. A missing diffusers raises
    :class:`imf.cli.MissingDependencyError`; a path that is not a loadable AutoencoderKL directory a
    :class:`imf.data.DataError` that names it and says what is wrong."""
    diffusers = require("diffusers", extra="data", purpose=f"{arg} (the diffusers AutoencoderKL)")
    p = Path(path)
    if not p.is_dir():
        what = "is a file, not a directory" if p.exists() else "does not exist"
        raise DataError(
            f"{arg} {p} {what} (expected a local AutoencoderKL.from_pretrained directory; nothing is downloaded)"
        )
    lib = logging.getLogger("diffusers")  # hold diffusers' warnings: replayed on success, dropped on failure
    held: list[logging.LogRecord] = []
    keep = logging.Handler(logging.WARNING)
    keep.emit = held.append
    handlers, propagate = lib.handlers, lib.propagate
    lib.handlers, lib.propagate = [keep], False
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(
            str(p), local_files_only=True, low_cpu_mem_usage=False, torch_dtype=dtype
        )
    except (OSError, ValueError, RuntimeError) as e:
        first = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{arg} {p} is not a loadable AutoencoderKL directory: {first}") from e
    finally:
        lib.handlers, lib.propagate = handlers, propagate
    for record in held:
        lib.handle(record)
    return vae.to(device).eval()


def latent_factors(vae, manifest: dict | None = None) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` the dataset was encoded with: the manifest's metadata, else the VAE's."""
    meta = (manifest or {}).get("metadata") or {}
    scale = meta.get("scaling_factor", vae.config.scaling_factor)
    shift = meta.get("shift_factor", getattr(vae.config, "shift_factor", None))
    return float(scale), float(shift or 0.0)


class LatentEncoder:
    """Images in ``[-1, 1]`` ``(B, 3, S, S)`` -> the scaled posterior moments a latent dataset stores.

    ``encoder(x)`` returns ``((mean - shift) * scale, std * scale)`` in float32; ``latent_shape(resolution)``
    the ``(C, H, W)`` of one image's latent (a :class:`DataError` when the resolution does not fit)."""

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.scale = float(cfg.scaling_factor)
        shift = getattr(cfg, "shift_factor", None)
        self.shift = float(shift) if shift is not None else None
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.channels = int(cfg.latent_channels)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.downsample:
            raise DataError(
                f"--resolution {resolution} is not divisible by the VAE's downsampling factor {self.downsample}"
            )
        side = resolution // self.downsample
        return self.channels, side, side

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        mean = dist.mean.float()
        if self.shift is not None:
            mean = mean - self.shift
        return mean * self.scale, dist.std.float() * self.scale


class LatentDecoder:
    """Model latents ``x`` (normalised, ``(B, C, H, W)``) -> images in ``[-1, 1]``, decoded ``batch`` at a time.

    ``manifest``: the latent dataset's (channel statistics and factors); ``None`` means identity statistics and
    the VAE's own factors. The VAE's latent channels must match the manifest's (a :class:`DataError` otherwise)."""

    def __init__(self, vae, manifest: dict | None = None, *, batch: int = 64):
        if batch <= 0:
            raise DataError(f"VAE decode batch must be positive, got {batch}")
        self.vae, self.batch = vae, int(batch)
        channels = int(vae.config.latent_channels)
        device = next(vae.parameters()).device
        if manifest is None:
            mean, std = torch.zeros(channels), torch.ones(channels)
        else:
            if len(manifest["channel_mean"]) != channels:
                raise DataError(
                    f"the VAE has {channels} latent channels, the dataset's manifest "
                    f"{len(manifest['channel_mean'])} (latent_shape {manifest.get('latent_shape')})"
                )
            mean, std = torch.tensor(manifest["channel_mean"]), torch.tensor(manifest["channel_std"])
        self.mean = mean.float().view(1, -1, 1, 1).to(device)
        self.std = std.float().view(1, -1, 1, 1).to(device)
        self.scale, self.shift = latent_factors(vae, manifest)

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x * channel_std + channel_mean) / scaling_factor + shift_factor``: the VAE's own latent."""
        return (x.float().to(self.mean.device) * self.std + self.mean) / self.scale + self.shift

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = self.unnormalize(x)
        return torch.cat([self.vae.decode(c.to(self.vae.dtype)).sample.float() for c in z.split(self.batch)])
