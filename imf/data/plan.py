"""The sampling plan: which samples and which randomness make up each batch (numpy only).

The torch DataLoader workers (:mod:`imf.data.loader`) and DALI's external-source workers (:mod:`imf.data.dali`)
both compute their batches from a :class:`BatchPlan`, so they yield bit-identical values. The epoch permutation is
drawn from ``SeedSequence([seed, epoch, PERM_TAG])``; the flips and ``eps`` of batch ``step`` on ``rank`` from
``SeedSequence([seed, epoch, rank, step, NOISE_TAG])`` (Philox). Every rank sees ``N // world_size`` samples of
each epoch (the ``N % world_size`` tail of the permutation is dropped, a different tail every epoch), cut into
``(N // world_size) // batch_size`` full batches (the incomplete last batch is dropped); so within an epoch every
kept sample is seen exactly once across ranks.
"""

from __future__ import annotations

import numpy as np

from imf.data.format import DataError
from imf.data.index import LatentIndex
from imf.seeding import philox

PERM_TAG = 0x5045524D  # "PERM": stream tag of the epoch permutation
NOISE_TAG = 0x4E4F4953  # "NOIS": stream tag of the per-batch flips and eps


class BatchPlan:
    """Which samples and which randomness make up batch ``step`` of ``epoch`` on ``rank`` (numpy only).

    Shared by the torch loader and the DALI pipeline so both produce identical batches. ``inputs(epoch,
    step)`` returns dict(mean, std (B, C, H, W) float16, eps (B, C, H, W) float32, flip (B,) int32 (1 =
    flip the sampled latent spatially), labels (B,) int64, index (B,) int64). With stored flipped copies
    the drawn flip selects view 1 instead and ``flip`` is 0."""

    def __init__(
        self,
        index: LatentIndex,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        flip: bool = True,
    ):
        self.index = index
        self.batch_size = int(batch_size)
        self.rank, self.world_size, self.seed, self.flip = int(rank), int(world_size), int(seed), bool(flip)
        if self.world_size <= 0 or not 0 <= self.rank < self.world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if self.seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        self.per_rank = index.count // self.world_size
        if self.batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if self.batch_size > self.per_rank:
            raise DataError(
                f"batch_size {batch_size} is larger than the per-rank dataset ({index.count} samples "
                f"// world_size {world_size} = {self.per_rank}) of {index.root}"
            )
        self.steps_per_epoch = self.per_rank // self.batch_size
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's global sample indices for ``epoch``, in order (length ``N // world_size``)."""
        if self._perm_epoch != epoch:
            rng = philox(self.seed, epoch, PERM_TAG)
            self._perm = rng.permutation(self.index.count)
            self._perm_epoch = epoch
        a = self.rank * self.per_rank
        return self._perm[a : a + self.per_rank]

    def inputs(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside [0, {self.steps_per_epoch})")
        b = self.batch_size
        idx = self.epoch_indices(epoch)[step * b : (step + 1) * b]
        rng = philox(self.seed, epoch, self.rank, step, NOISE_TAG)
        drawn = (rng.random(b) < 0.5) & self.flip
        eps = rng.standard_normal((b, *self.index.latent_shape), dtype=np.float32)
        if self.index.flipped:
            view, flip = drawn.astype(np.int64), np.zeros(b, dtype=np.int32)
        else:
            view, flip = np.zeros(b, dtype=np.int64), drawn.astype(np.int32)
        mean, std, labels = self.index.gather(idx, view)
        return {
            "mean": mean,
            "std": std,
            "eps": eps,
            "flip": flip,
            "labels": labels,
            "index": idx.astype(np.int64),
        }


def normalized_latents(inp: dict[str, np.ndarray], channel_mean: np.ndarray, channel_std: np.ndarray) -> np.ndarray:
    """x = flip((mean + std * eps - channel_mean) / channel_std) in float32, the exact op order the DALI
    pipeline uses (so both paths agree bit for bit)."""
    cm = channel_mean.reshape(-1, 1, 1)
    cs = channel_std.reshape(-1, 1, 1)
    z = inp["mean"].astype(np.float32) + inp["std"].astype(np.float32) * inp["eps"]
    x = (z - cm) / cs
    f = inp["flip"].astype(bool)
    if f.any():
        x[f] = x[f][..., ::-1]
    return x
