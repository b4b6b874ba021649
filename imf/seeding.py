"""The one seed derivation: a 63-bit seed (or a numpy Philox generator) from a tuple of integers.

Every stream of random numbers in the engine is named by a key such as ``(seed, rank, NOISE)`` or
``(seed, sample_index)`` and derived with numpy's ``SeedSequence``, which hashes the whole key, so
nearby keys give unrelated streams and adding a purpose tag separates streams of the same run:

* the trainer's per-rank noise and ``(t, r, omega, ...)`` generator: ``(seed, rank, NOISE)``
  (:func:`rank_noise_seed`; each rank draws different samples);
* the evaluator's noise of sample ``i``: ``(seed, i)`` (independent of the batch and the rank);
* the synthetic data of batch ``k``: ``(seed, k)``; the latent loader's permutation and per-batch
  noise: Philox generators of ``(seed, epoch, ...)`` (:func:`philox`).
"""

from __future__ import annotations

import numpy as np

NOISE = 0x6E6F  # purpose tag of the trainer's noise stream ("no")


def derive_seed(*key: int) -> int:
    """A seed in ``[0, 2**63)`` for ``torch.Generator.manual_seed``, determined by ``key`` alone."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)


def philox(*key: int) -> np.random.Generator:
    """A numpy Philox generator seeded by ``key``."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([int(k) for k in key])))


def rank_noise_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s training-noise generator in a run seeded ``seed``."""
    return derive_seed(seed, rank, NOISE)


__all__ = ["NOISE", "derive_seed", "philox", "rank_noise_seed"]
