"""Latent data for training: the torch DataLoader path, the synthetic source and the loader factory.

Every source yields an endless stream of ``(x, y)`` batches: ``x`` (B, C, H, W) float32 normalised latents,
``y`` (B,) int64 labels, on the requested device. For a latent dataset (format: :mod:`imf.data_format`) a
batch is ``x = flip((mean + std * eps - channel_mean) / channel_std)`` with ``eps ~ N(0, I)`` drawn per step
(a fresh sample of the VAE posterior every time a sample is seen) and a random horizontal flip with p = 0.5:
with stored flipped copies (``manifest.flipped``) the flip picks the flipped image's encoding, otherwise
the sampled latent is flipped spatially (an approximation: the VAE is not exactly flip-equivariant).

Determinism and sharding (defined in :class:`imf.data_format.BatchPlan`): epoch ``e`` uses a permutation
drawn from ``(seed, e)``; rank ``r`` of ``W`` takes the ``r``-th contiguous block of ``N // W`` entries (the
``N % W`` tail is dropped, a different one each epoch), cut into ``(N // W) // B`` full batches (the
incomplete last batch is dropped too); so within an epoch every kept sample is seen exactly once across
ranks. Flips and ``eps`` of a batch come from ``(seed, e, r, step)``. The DALI pipeline
(:mod:`imf.data_dali`) computes the same inputs and yields the same values.

Loaders hold their position: ``state_dict()`` is ``{"epoch", "step"}`` of the next batch (plus the
settings it is only valid for); ``load_state_dict()`` then a new ``iter()`` resumes there, yielding exactly
the batches the uninterrupted loader would have yielded. ``loader.epoch`` is the epoch of the last
yielded batch.

CLI: ``python -m imf.data verify DIR [--no-checksums]`` checks a dataset and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from imf.data_format import (
    BatchPlan,
    DataError,
    LatentIndex,
    ShardWriter,
    check_dataset,
    normalized_latents,
)

__all__ = [
    "DataError",
    "ShardWriter",
    "LatentLoader",
    "SyntheticLatents",
    "DigitsLoader",
    "build_loader",
    "check_dataset",
    "main",
]

_ANNOUNCED = False


class _PositionedSource:
    """Position bookkeeping shared by all sources: ``epoch``/``step`` of the next batch, state dicts."""

    backend = "base"

    def _init_position(self, steps_per_epoch: int | None) -> None:
        self.steps_per_epoch = steps_per_epoch
        self._next = (0, 0)
        self.epoch = 0  # epoch of the last yielded batch (0 before the first)

    def _advance(self) -> None:
        e, s = self._next
        self.epoch = e
        s += 1
        if self.steps_per_epoch is not None and s == self.steps_per_epoch:
            e, s = e + 1, 0
        self._next = (e, s)

    def _identity(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        """Position of the next batch (``epoch``, ``step`` in the epoch) and the settings it belongs to."""
        return {"epoch": self._next[0], "step": self._next[1], **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position; the next ``iter()`` starts there. Raises ``ValueError`` when the
        state was saved with different sharding/batch settings (the position would mean other samples)."""
        for k, v in self._identity().items():
            if k in state and state[k] != v:
                raise ValueError(
                    f"loader state has {k}={state[k]!r}, this loader has {k}={v!r}: "
                    "cannot resume the data position exactly"
                )
        e, s = int(state["epoch"]), int(state["step"])
        if e < 0 or s < 0 or (self.steps_per_epoch is not None and s >= self.steps_per_epoch):
            raise ValueError(
                f"loader state position epoch={e} step={s} is invalid "
                f"(steps_per_epoch={self.steps_per_epoch})"
            )
        self._reset()
        self._next = (e, s)
        self.epoch = e

    def _reset(self) -> None:
        pass

    def iter_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless iterator over ``(x, y)`` batches from the current position (same as ``iter(self)``)."""
        return iter(self)

    def close(self) -> None:
        self._reset()


class _PlanLoader(_PositionedSource):
    """A source over a latent dataset directory whose batches come from a :class:`BatchPlan`
    (:class:`LatentLoader`, :class:`imf.data_dali.DaliLatentLoader`): builds the plan and holds the
    settings a saved position belongs to."""

    def _init_plan(
        self,
        root: str | os.PathLike,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: str | torch.device,
        flip: bool,
        verify_checksums: bool,
        checked: dict | None,
    ) -> None:
        """Validate ``root`` (unless ``checked`` holds its summary already), build the plan, set the
        settings, ``shape``, ``num_classes``, ``device`` and the position at the start."""
        self.root = Path(root)
        if checked is None:
            check_dataset(self.root, checksums=verify_checksums)
        self.index = LatentIndex(self.root)
        self.plan = BatchPlan(
            self.index, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, flip=flip
        )
        self.batch_size, self.rank, self.world_size, self.seed, self.flip = (
            self.plan.batch_size,
            rank,
            world_size,
            seed,
            flip,
        )
        self.shape, self.num_classes = self.index.latent_shape, self.index.num_classes
        self.device = torch.device(device)
        self._init_position(self.plan.steps_per_epoch)

    def _identity(self) -> dict:
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "flip": self.flip,
        }

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices of ``epoch`` in order (batch ``k`` is entries ``k*B:(k+1)*B``)."""
        return self.plan.epoch_indices(epoch).copy()


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


class LatentLoader(_PlanLoader):
    """Torch ``DataLoader`` over a latent dataset directory (memory-mapped shards, worker processes,
    pinned memory when the target device is CUDA). See the module docstring for the sampling semantics.

    ``root``: directory with ``manifest.json``; ``batch_size``: per-rank batch; ``rank``/``world_size``:
    data-parallel sharding; ``seed``: permutation/noise seed; ``device``: where batches go (moved with
    ``non_blocking``); ``num_workers``: DataLoader worker processes (0 = in the main process);
    ``flip``: random horizontal flips; ``verify_checksums``: sha256 of every shard at startup (slow for
    big datasets: ``python -m imf.data verify`` does it offline). Sizes, shapes, dtypes and label ranges are
    always checked at construction (:class:`DataError` on failure)."""

    backend = "torch"

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_workers: int = 2,
        flip: bool = True,
        verify_checksums: bool = False,
        prefetch_factor: int = 4,
        _checked: dict | None = None,
    ):
        self._init_plan(root, batch_size, rank, world_size, seed, device, flip, verify_checksums, _checked)
        self.num_workers = int(num_workers)
        self.prefetch_factor = prefetch_factor
        self._it = None

    def _reset(self) -> None:
        self._it = None  # drops the DataLoader iterator (its workers shut down)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._reset()
        kw = {}
        if self.num_workers > 0:
            kw = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
        dl = torch.utils.data.DataLoader(
            _EpochStepDataset(self.plan),
            batch_size=None,
            sampler=_Positions(self._next, self.plan.steps_per_epoch),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            **kw,
        )
        it = iter(dl)
        self._it = it
        non_blocking = self.device.type == "cuda"
        while self._it is it:
            x, y, e, s = next(it)
            if (e, s) != self._next:  # cannot happen unless the sampler and the bookkeeping diverge
                raise RuntimeError(f"loader position mismatch: got batch {(e, s)}, expected {self._next}")
            self._advance()
            yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)


class SyntheticLatents(_PositionedSource):
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
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        self.batch_size, self.shape, self.num_classes = int(batch_size), tuple(shape), int(num_classes)
        self.device, self.seed = torch.device(device), int(seed)
        self._init_position(steps_per_epoch)
        self._gen = torch.Generator(device=self.device)

    def _identity(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            e, s = self._next
            k = e * self.steps_per_epoch + s
            self._gen.manual_seed(
                int(np.random.SeedSequence([self.seed, k]).generate_state(1, np.uint64)[0] >> 1)
            )
            x = torch.randn((self.batch_size, *self.shape), generator=self._gen, device=self.device)
            y = torch.randint(
                0, self.num_classes, (self.batch_size,), generator=self._gen, device=self.device
            )
            self._advance()
            yield x, y


class DigitsLoader(_PositionedSource):
    """The built-in pixel-space data: scikit-learn's 8x8 ``digits`` (:func:`imf.digits.load_digits_tensors`,
    1797 images ``(1, 8, 8)`` in [-1, 1], 10 classes), no augmentation. Sharding and order follow the
    latent loader's rule: epoch ``e`` permutes all images with a generator seeded by ``(seed, e)``, rank ``r``
    of ``W`` takes the ``r``-th contiguous block of ``N // W`` and cuts it into ``(N // W) // B`` full batches.
    Held in memory; batches are moved to ``device``."""

    backend = "digits"

    def __init__(self, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: str | torch.device = "cpu"):
        from imf.digits import load_digits_tensors

        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.x, self.y = load_digits_tensors()
        self.shape, self.num_classes = tuple(self.x.shape[1:]), 10
        self.per_rank = len(self.x) // world_size
        if batch_size > self.per_rank:
            raise ValueError(f"batch_size {batch_size} is larger than the per-rank digits set ({len(self.x)} "
                             f"images // world_size {world_size} = {self.per_rank})")
        self.batch_size, self.rank, self.world_size, self.seed = int(batch_size), rank, world_size, int(seed)
        self.device = torch.device(device)
        self._init_position(self.per_rank // self.batch_size)

    def _identity(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size}

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's image indices of ``epoch`` in order (batch ``k`` is entries ``k*B:(k+1)*B``)."""
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, epoch])))
        a = self.rank * self.per_rank
        return rng.permutation(len(self.x))[a : a + self.per_rank]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, order_epoch = None, None
        while True:
            e, s = self._next
            if order_epoch != e:
                order, order_epoch = torch.from_numpy(self.epoch_indices(e)), e
            idx = order[s * self.batch_size : (s + 1) * self.batch_size]
            self._advance()
            yield self.x[idx].to(self.device), self.y[idx].to(self.device)


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_loader(
    data: str | os.PathLike,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    num_workers: int | None = None,
    shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    flip: bool = True,
    verify_checksums: bool = False,
):
    """Build the training data source.

    ``data``: a dataset directory (with ``manifest.json``), ``"synthetic"`` (then ``shape`` defaults to
    (4, 32, 32) and ``num_classes`` to 1000) or ``"digits"`` (the built-in 8x8 pixel-space set,
    :class:`DigitsLoader`; ``backend``, ``num_workers``, ``flip`` and ``verify_checksums`` do not apply).
    ``backend``: ``"dali"``, ``"torch"`` or ``"auto"`` (DALI when ``nvidia.dali`` imports, else torch; rank 0
    says which once). For a directory the dataset is validated first (manifest, shard files, shapes/dtypes,
    counts, label range; checksums with ``verify_checksums``) and ``shape``/``num_classes``, if given, must
    match the manifest: every problem raises :class:`DataError` (a ``ValueError``) naming the file or field.
    Returns a loader with the iterator protocol of :class:`LatentLoader` (``iter`` -> endless ``(x, y)``,
    ``epoch``, ``steps_per_epoch``, ``state_dict``/``load_state_dict``)."""
    global _ANNOUNCED
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"backend must be 'auto', 'dali' or 'torch', got {backend!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if str(data) == "digits":
        digits = DigitsLoader(batch_size, rank=rank, world_size=world_size, seed=seed, device=device)
        for name, want, have in (("shape", shape, digits.shape), ("num_classes", num_classes, digits.num_classes)):
            if want is not None and tuple(np.atleast_1d(want)) != tuple(np.atleast_1d(have)):
                raise DataError(f"the digits data has {name} {have}, the run expects {want}")
        return digits
    if str(data) == "synthetic":
        return SyntheticLatents(
            batch_size,
            tuple(shape or (4, 32, 32)),
            num_classes or 1000,
            device=device,
            seed=seed + 1_000_003 * rank,
        )
    summary = check_dataset(data, checksums=verify_checksums)
    if shape is not None and tuple(shape) != tuple(summary["latent_shape"]):
        raise DataError(
            f"{Path(data) / 'manifest.json'}: field 'latent_shape' is {summary['latent_shape']}, "
            f"the run expects {list(shape)}"
        )
    if num_classes is not None and num_classes != summary["num_classes"]:
        raise DataError(
            f"{Path(data) / 'manifest.json'}: field 'num_classes' is {summary['num_classes']}, "
            f"the run expects {num_classes}"
        )
    per_rank = summary["count"] // world_size if world_size > 0 else 0
    if batch_size > per_rank:
        raise ValueError(
            f"batch_size {batch_size} is larger than the per-rank dataset ({summary['count']} "
            f"samples // world_size {world_size} = {per_rank})"
        )
    if backend == "auto":
        backend = "dali" if _dali_available() else "torch"
        if rank == 0 and not _ANNOUNCED:
            print(
                f"imf.data: using the {backend} latent loader"
                + ("" if backend == "dali" else " (nvidia.dali not importable)"),
                file=sys.stderr,
            )
            _ANNOUNCED = True
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    kw = dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=device, flip=flip)
    if backend == "dali":
        from imf.data_dali import DaliLatentLoader

        return DaliLatentLoader(data, py_num_workers=num_workers, _checked=summary, **kw)
    return LatentLoader(data, num_workers=num_workers, _checked=summary, **kw)


def main(argv: list[str] | None = None) -> int:
    """``python -m imf.data verify DIR [--no-checksums] [--json]``: exit 0 + summary, or 1 + the error."""
    ap = argparse.ArgumentParser(prog="python -m imf.data", description="latent dataset tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check a latent dataset directory against its manifest")
    v.add_argument("dir")
    v.add_argument("--no-checksums", action="store_true", help="skip sha256 and the full read (fast)")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    try:
        s = check_dataset(args.dir, checksums=not args.no_checksums, progress=True)
    except DataError as e:
        print(f"verify FAILED: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print(
            f"OK {s['root']}: {s['count']} samples in {s['shards']} shards, latent {s['latent_shape']} "
            f"{s['dtype']}, {s['num_classes']} classes (per class {s['samples_per_class_min']}.."
            f"{s['samples_per_class_max']}), flipped copies: {s['flipped']}, {s['bytes'] / 2**20:.1f} MiB, "
            f"checksums {'verified' if s['checksums_verified'] else 'not checked'}"
        )
        print("  channel_mean " + " ".join(f"{m:+.4f}" for m in s["channel_mean"]))
        print("  channel_std  " + " ".join(f"{m:.4f}" for m in s["channel_std"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
