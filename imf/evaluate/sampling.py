"""The sample set of an evaluation: which samples a rank draws, their labels and noise, and the sampling loop.

Global sample ``i`` in ``[0, num)`` has label ``i mod num_classes`` (class-balanced) and noise from its own
generator seeded by ``derive_seed(seed, i)`` (:mod:`imf.seeding`); rank ``r`` of ``W`` takes the contiguous
block ``[r num/W, (r+1) num/W)``. So the set is the same for any world size and batch size.

``--convention official-torch`` draws the sample set and the uint8 images as the official iMF PyTorch
evaluation does (``Lyy-iiis/imeanflow@torch``, ``evaluate.py``): sample ``i`` of ``num`` has label ``i // (num /
num_classes)`` (class blocks), noise ``torch.randn`` from a CPU generator seeded by ``(i XOR seed) mod 2^32``
(its ``BatchGenerator``; its default seed is 42), and images become ``round(clip(255 (x + 1) / 2, 0, 255))``
before its PNGs and torch-fidelity's Inception. The default ``engine`` convention truncates ``127.5 x + 128``
(ADM's and the official JAX evaluation's conversion, ``utils/sample_util.py``); since ``127.5 x + 128 = 255 (x +
1) / 2 + 1/2``, the two conversions give the same integers except at exact ties (half-up against numpy's
half-to-even), so what separates the conventions in practice is the sample set.
"""

from __future__ import annotations

import dataclasses
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


def official_labels_of(indices, num: int, num_classes: int) -> torch.Tensor:
    """The official PyTorch evaluation's labels: ``num / num_classes`` samples of class 0, then of class 1, ..."""
    return torch.as_tensor(list(indices), dtype=torch.int64) // (num // num_classes)


def official_noise_of(indices, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The official PyTorch evaluation's noise: sample ``i`` from a CPU generator seeded ``(i ^ seed) mod 2^32``."""
    out, gen = torch.empty((len(indices), *shape)), torch.Generator()
    for row, i in enumerate(indices):
        gen.manual_seed((i ^ seed) % (1 << 32))
        out[row] = torch.randn(shape, generator=gen)
    return out


def to_uint8_rounded(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` floats -> uint8 ``round(clip(255 (x + 1) / 2, 0, 255))`` (the official PyTorch evaluation)."""
    return torch.round(torch.clamp((images.float() + 1) / 2 * 255, 0, 255)).to(torch.uint8)


@dataclasses.dataclass(frozen=True)
class Convention:
    """How an evaluation draws its sample set and turns images into uint8 (see the module doc)."""

    name: str
    official: bool

    def labels(self, indices, num: int, num_classes: int) -> torch.Tensor:
        return official_labels_of(indices, num, num_classes) if self.official else labels_of(indices, num_classes)

    def noise(self, indices, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
        return official_noise_of(indices, seed, shape) if self.official else noise_of(indices, seed, shape)

    def uint8(self, images: torch.Tensor) -> torch.Tensor:
        return to_uint8_rounded(images) if self.official else to_uint8(images)


CONVENTIONS = {"engine": Convention("engine", False), "official-torch": Convention("official-torch", True)}


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
    convention: Convention = CONVENTIONS["engine"],
    num: int | None = None,
):
    """Yield ``(indices, labels, latents, seconds)`` per batch of ``indices`` (``seconds``: the network time);
    ``num``: the size of the whole sample set (the official convention's labels depend on it)."""
    cfg = model.cfg
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    num = indices.stop if num is None else num
    for start in range(0, len(indices), batch):
        idx = indices[start : start + batch]
        y = convention.labels(idx, num, cfg.num_classes).to(device)
        noise = convention.noise(idx, seed, shape).to(device)
        sync(device)
        t0 = time.perf_counter()
        x = generate(model, y, omega, t_min, t_max, steps=steps, noise=noise, autocast_dtype=autocast_dtype)
        sync(device)
        yield idx, y, x, time.perf_counter() - t0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` floats -> uint8 ``clamp(127.5 x + 128, 0, 255)`` (same layout)."""
    return (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8)


__all__ = ["CONVENTIONS", "Convention", "labels_of", "noise_of", "official_labels_of", "official_noise_of"]
__all__ += ["sample_batches", "shard", "sync", "to_uint8", "to_uint8_rounded"]
