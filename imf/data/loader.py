"""Training data sources: the torch DataLoader path over latent datasets, the synthetic and digits sources, the factory.

Every source yields an endless stream of ``(x, y)`` batches: ``x`` (B, C, H, W) float32, ``y`` (B,) int64 labels,
on the requested device, and holds its position (:mod:`imf.data.source`). For a latent dataset (format:
:mod:`imf.data.format`) a batch is ``x = flip((mean + std * eps - channel_mean) / channel_std)`` with
``eps ~ N(0, I)`` drawn per step (a fresh sample of the VAE posterior every time a sample is seen) and a random
horizontal flip with p = 0.5: with stored flipped copies (``manifest.flipped``) the flip picks the flipped
image's encoding, otherwise the sampled latent is flipped spatially (an approximation: the VAE is not exactly
flip-equivariant). Which samples and which noise make up each batch is defined by :class:`imf.data.plan.BatchPlan`,
deterministic in (seed, epoch, rank); the DALI pipeline (:mod:`imf.data.dali`) computes the same inputs and
yields the same values.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import numpy as np
import torch

from imf.cli import MissingDependencyError
from imf.data.digits import NUM_CLASSES, load_digits_tensors
from imf.data.format import DataError
from imf.data.plan import BatchPlan, normalized_latents
from imf.data.source import LoaderSettings, PlanSource, PositionedSource
from imf.seeding import derive_seed, philox

__all__ = ["DigitsLoader", "LatentLoader", "SyntheticLatents", "build_loader"]

_ANNOUNCED = False


class _EpochStepDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item ``(epoch, step)`` is a whole normalised batch (built in the worker)."""

    def __init__(self, plan: BatchPlan):
        self.plan = plan

    def __getitem__(self, key):
        epoch, step = key
        inp = self.plan.inputs(epoch, step)
        x = normalized_latents(inp, self.plan.index.channel_mean, self.plan.index.channel_std)
        return torch.from_numpy(x), torch.from_numpy(inp["labels"]), epoch, step


class _Positions(torch.utils.data.Sampler):
    """Endless ``(epoch, step)`` keys from a start position."""

    def __init__(self, start: tuple[int, int], steps_per_epoch: int):
        self.start, self.steps = start, steps_per_epoch

    def __iter__(self):
        e, s = self.start
        while True:
            yield (e, s)
            s += 1
            if s == self.steps:
                e, s = e + 1, 0


class LatentLoader(PlanSource):
    """Torch ``DataLoader`` over a latent dataset directory (memory-mapped shards, ``settings.num_workers`` worker
    processes, pinned memory and ``non_blocking`` copies when the target device is CUDA).

    ``LatentLoader(root, settings)`` or ``LatentLoader(root, batch_size=..., ...)`` (any
    :class:`LoaderSettings` field); ``shape`` / ``num_classes``: what the run expects of the dataset. The
    dataset is validated at construction (:class:`DataError` naming the file or field)."""

    backend = "torch"

    def __init__(self, root, settings: LoaderSettings | None = None, *, shape=None, num_classes=None, **fields):
        super().__init__(root, LoaderSettings.resolve(settings, fields), shape=shape, num_classes=num_classes)
        self.num_workers = self.settings.workers
        self.prefetch_factor = self.settings.prefetch or 4
        self._it = None

    def reset(self) -> None:
        self._it = None  # drops the DataLoader iterator (its workers shut down)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.reset()
        kw = {}
        if self.num_workers > 0:
            kw = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
        dl = torch.utils.data.DataLoader(
            _EpochStepDataset(self.plan),
            batch_size=None,
            sampler=_Positions(self.position, self.plan.steps_per_epoch),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            **kw,
        )
        it = iter(dl)
        self._it = it
        non_blocking = self.device.type == "cuda"
        while self._it is it:
            try:
                x, y, e, s = next(it)
            except DataError as err:  # raised in a worker: torch wraps it with the worker's traceback
                lines = str(err).strip().splitlines()
                if len(lines) < 2:
                    raise
                raise DataError(f"{lines[-1].split('DataError: ', 1)[-1]} (in a loader worker)") from err
            if (e, s) != self.position:  # cannot happen unless the sampler and the bookkeeping diverge
                raise RuntimeError(f"loader position mismatch: got batch {(e, s)}, expected {self.position}")
            self.advance()
            yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)


class SyntheticLatents(PositionedSource):
    """Endless normal latents ``x ~ N(0, I)`` of ``shape`` with uniform labels in ``[0, num_classes)``,
    drawn on ``device`` (no I/O: benchmarks and smoke runs). Batch ``k`` is drawn from a generator seeded
    by ``(seed, k)``, so it is deterministic and resumable; ``steps_per_epoch`` only defines a virtual
    epoch for the ``epoch`` attribute."""

    backend = "synthetic"

    def __init__(
        self,
        batch_size: int,
        shape: tuple[int, ...] = (4, 32, 32),
        num_classes: int = 1000,
        device: str | torch.device = "cpu",
        seed: int = 0,
        steps_per_epoch: int = 1000,
    ):
        for name, v in (("batch_size", batch_size), ("num_classes", num_classes), ("steps_per_epoch", steps_per_epoch)):
            if v <= 0:
                raise DataError(f"synthetic data: {name} must be positive, got {v}")
        self.batch_size, self.shape, self.num_classes = int(batch_size), tuple(shape), int(num_classes)
        self.device, self.seed = torch.device(device), int(seed)
        super().__init__(steps_per_epoch)
        self._gen = torch.Generator(device=self.device)

    def identity(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            e, s = self.position
            k = e * self.steps_per_epoch + s
            self._gen.manual_seed(derive_seed(self.seed, k))
            x = torch.randn((self.batch_size, *self.shape), generator=self._gen, device=self.device)
            y = torch.randint(0, self.num_classes, (self.batch_size,), generator=self._gen, device=self.device)
            self.advance()
            yield x, y


class DigitsLoader(PositionedSource):
    """The built-in pixel-space data: scikit-learn's 8x8 ``digits`` (:func:`imf.data.digits.load_digits_tensors`,
    1797 images ``(1, 8, 8)`` in [-1, 1], 10 classes), no augmentation. Sharding and order follow the
    latent loader's rule: epoch ``e`` permutes all images with a generator seeded by ``(seed, e)``, rank ``r``
    of ``W`` takes the ``r``-th contiguous block of ``N // W`` and cuts it into ``(N // W) // B`` full batches.
    Held in memory; batches are moved to ``device``. Takes ``batch_size``, ``rank``, ``world_size``, ``seed``
    and ``device`` of its :class:`LoaderSettings` (``DigitsLoader(settings)`` or ``DigitsLoader(batch_size=8)``)."""

    backend = "digits"

    def __init__(self, settings: LoaderSettings | None = None, **fields):
        s = LoaderSettings.resolve(settings, fields)
        self.x, self.y = load_digits_tensors()
        self.shape, self.num_classes = tuple(self.x.shape[1:]), NUM_CLASSES
        self.per_rank = len(self.x) // s.world_size
        if s.batch_size > self.per_rank:
            raise DataError(
                f"batch_size {s.batch_size} is larger than the per-rank digits set ({len(self.x)} "
                f"images // world_size {s.world_size} = {self.per_rank})"
            )
        self.batch_size, self.rank, self.world_size, self.seed = s.batch_size, s.rank, s.world_size, s.seed
        self.device = torch.device(s.device)
        super().__init__(self.per_rank // self.batch_size)

    def identity(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size}

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's image indices of ``epoch`` in order (batch ``k`` is entries ``k*B:(k+1)*B``)."""
        rng = philox(self.seed, epoch)
        a = self.rank * self.per_rank
        return rng.permutation(len(self.x))[a : a + self.per_rank]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, order_epoch = None, None
        while True:
            e, s = self.position
            if order_epoch != e:
                order, order_epoch = torch.from_numpy(self.epoch_indices(e)), e
            idx = order[s * self.batch_size : (s + 1) * self.batch_size]
            self.advance()
            yield self.x[idx].to(self.device), self.y[idx].to(self.device)


def _expect(source: str, name: str, want, have) -> None:
    if want is not None and tuple(np.atleast_1d(want)) != tuple(np.atleast_1d(have)):
        raise DataError(f"the {source} data has {name} {have}, the run expects {want}")


def build_loader(
    data: str | os.PathLike,
    settings: LoaderSettings | None = None,
    *,
    shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    **fields,
):
    """Build the training data source from ``settings`` (a :class:`LoaderSettings`; keyword arguments named like
    its fields override it: ``build_loader(dir, batch_size=64, rank=r, world_size=w)``).

    ``data``: a dataset directory (with ``manifest.json``), ``"synthetic"`` (then ``shape`` defaults to
    (4, 32, 32) and ``num_classes`` to 1000; the seed is offset per rank) or ``"digits"`` (the built-in 8x8
    pixel-space set, :class:`DigitsLoader`; ``backend``, ``num_workers``, ``flip`` and ``verify_checksums`` do
    not apply). ``backend``: ``"dali"``, ``"torch"`` or ``"auto"`` (DALI when ``nvidia.dali`` imports, else
    torch; rank 0 says which once). For a directory the dataset is validated first and ``shape`` /
    ``num_classes``, if given, must match the manifest: every problem raises :class:`DataError` (an
    :class:`imf.cli.UserError`) naming the file or field; ``backend="dali"`` without DALI raises
    :class:`imf.cli.MissingDependencyError` with the install command. Returns a source with ``iter`` -> endless
    ``(x, y)``, ``epoch``, ``steps_per_epoch``, ``state_dict`` / ``load_state_dict``."""
    global _ANNOUNCED
    s = LoaderSettings.resolve(settings, fields)
    if str(data) == "digits":
        digits = DigitsLoader(s)
        _expect("digits", "shape", shape, digits.shape)
        _expect("digits", "num_classes", num_classes, digits.num_classes)
        return digits
    if str(data) == "synthetic":
        return SyntheticLatents(
            s.batch_size,
            (4, 32, 32) if shape is None else tuple(shape),
            1000 if num_classes is None else num_classes,
            device=s.device,
            seed=s.seed + 1_000_003 * s.rank,
        )
    backend = s.backend
    if backend != "torch":
        from imf.data import dali  # imports no DALI itself: DaliLatentLoader does, via imf.cli.require

        if backend == "auto":
            try:
                dali.require_dali()
                backend = "dali"
            except MissingDependencyError:
                backend = "torch"
    if backend == "dali":
        loader = dali.DaliLatentLoader(data, s, shape=shape, num_classes=num_classes)
    else:
        loader = LatentLoader(data, s, shape=shape, num_classes=num_classes)
    if s.backend == "auto" and s.rank == 0 and not _ANNOUNCED:  # after validation: a data error stays one line
        why = "" if backend == "dali" else " (nvidia.dali not importable)"
        print(f"imf.data: using the {backend} latent loader{why}", file=sys.stderr)
        _ANNOUNCED = True
    return loader
