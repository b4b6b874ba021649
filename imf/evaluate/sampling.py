"""The sample set of an evaluation: which samples a rank draws, their labels and noise, and the sampling loop.

Global sample ``i`` in ``[0, num)`` has label ``i mod num_classes`` (class-balanced) and noise from its own
generator seeded by ``derive_seed(seed, i)`` (:mod:`imf.seeding`); rank ``r`` of ``W`` takes the contiguous
block ``[r num/W, (r+1) num/W)``. So the set is the same for any world size and batch size.
"""

from __future__ import annotations

import time

import torch

from imf.sample import generate
from imf.seeding import derive_seed


def shard(num: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous block of the global sample indices ``[0, num)``."""
    per = num // world
    return range(rank * per, (rank + 1) * per)


def labels_of(indices, num_classes: int) -> torch.Tensor:
    """Class-balanced labels: sample ``i`` has class ``i mod num_classes``."""
    return torch.as_tensor(list(indices), dtype=torch.int64) % num_classes


def noise_of(indices, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``(len(indices), *shape)`` fp32 noise; sample ``i``'s from a generator seeded by ``(seed, i)`` only."""
    out, gen = torch.empty((len(indices), *shape)), torch.Generator()
    for row, i in enumerate(indices):
        gen.manual_seed(derive_seed(seed, i))
        out[row] = torch.randn(shape, generator=gen)
    return out


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) so wall-clock timings cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_batches(
    model,
    indices: range,
    *,
    seed: int,
    steps: int,
    omega: float,
    t_min: float,
    t_max: float,
    batch: int,
    autocast_dtype: torch.dtype | None,
    device: torch.device,
):
    """Yield ``(indices, labels, latents, seconds)`` per batch of ``indices`` (``seconds``: the network time)."""
    cfg = model.cfg
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    for start in range(0, len(indices), batch):
        idx = indices[start : start + batch]
        y = labels_of(idx, cfg.num_classes).to(device)
        noise = noise_of(idx, seed, shape).to(device)
        sync(device)
        t0 = time.perf_counter()
        x = generate(model, y, omega, t_min, t_max, steps=steps, noise=noise, autocast_dtype=autocast_dtype)
        sync(device)
        yield idx, y, x, time.perf_counter() - t0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` floats -> uint8 ``clamp(127.5 x + 128, 0, 255)`` (same layout)."""
    return (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8)


__all__ = ["labels_of", "noise_of", "sample_batches", "shard", "sync", "to_uint8"]
