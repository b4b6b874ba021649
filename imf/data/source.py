"""What every training data source shares: the loader settings (written once, here) and the position bookkeeping.

:class:`LoaderOptions` are the user's choices about reading a latent dataset (the run config's ``data`` section
holds these fields); :class:`LoaderSettings` adds where the batches go (per-rank batch size, rank, world size,
seed, device). The torch loader, the DALI loader and :func:`imf.data.build_loader` all take one
:class:`LoaderSettings`; keyword arguments named like its fields override it (``LatentLoader(root, batch_size=8)``).

A source yields an endless stream of ``(x, y)`` batches and holds its position: ``state_dict()`` is
``{"epoch", "step"}`` of the next batch (plus the settings it is only valid for); ``load_state_dict()`` then a new
``iter()`` resumes there, yielding exactly the batches the uninterrupted source would have yielded.
``source.epoch`` is the epoch of the last yielded batch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imf.data.format import DataError, check_dataset
from imf.data.index import LatentIndex
from imf.data.plan import BatchPlan

BACKENDS = ("auto", "dali", "torch")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class LoaderOptions:
    """How a latent dataset is read (the user's choices; the batches' values depend only on ``flip``)."""

    backend: str = field(
        default="auto", metadata=_help("latent loader: auto (DALI if installed, else torch), dali, torch")
    )
    num_workers: int | None = field(
        default=None, metadata=_help("loader worker processes (0 = in the main process; default min(4, CPUs))")
    )
    flip: bool = field(default=True, metadata=_help("random horizontal flips (stored flipped copies if present)"))
    verify_checksums: bool = field(
        default=False, metadata=_help("sha256 of every shard before training (slow; imf.data verify does it offline)")
    )
    prefetch: int | None = field(
        default=None, metadata=_help("batches queued ahead (default: torch 4 per worker, DALI queue depth 2)")
    )
    dali_threads: int = field(default=2, metadata=_help("DALI CPU threads"))


@dataclass(kw_only=True)
class LoaderSettings(LoaderOptions):
    """:class:`LoaderOptions` plus the placement: ``batch_size`` per rank, ``rank`` of ``world_size``, ``seed``
    (permutation and noise), ``device`` the batches are moved to. ``validate()`` raises :class:`DataError`."""

    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    device: str | torch.device = "cpu"

    @classmethod
    def of(cls, options: LoaderOptions, **placement) -> LoaderSettings:
        """Settings from any object carrying the :class:`LoaderOptions` fields (e.g. the run config's ``data``)."""
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(LoaderOptions)}, **placement)

    @classmethod
    def resolve(cls, settings: LoaderSettings | None, overrides: dict) -> LoaderSettings:
        """``settings`` with ``overrides`` (field name -> value) applied, validated."""
        s = cls(**overrides) if settings is None else dataclasses.replace(settings, **overrides)
        s.validate()
        return s

    def validate(self) -> None:
        def bad(name: str, want: str) -> DataError:
            return DataError(f"loader setting {name} must be {want}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        if self.backend not in BACKENDS:
            raise bad("backend", " or ".join(repr(b) for b in BACKENDS))
        if not is_int(self.batch_size) or self.batch_size <= 0:
            raise bad("batch_size", "a positive int")
        if not is_int(self.world_size) or self.world_size <= 0:
            raise bad("world_size", "a positive int")
        if not is_int(self.rank) or not 0 <= self.rank < self.world_size:
            raise bad("rank", f"an int in [0, world_size={self.world_size})")
        if not is_int(self.seed) or self.seed < 0:
            raise bad("seed", "a non-negative int")
        if self.num_workers is not None and (not is_int(self.num_workers) or self.num_workers < 0):
            raise bad("num_workers", "None or an int >= 0")
        if self.prefetch is not None and (not is_int(self.prefetch) or self.prefetch <= 0):
            raise bad("prefetch", "None or a positive int")
        if not is_int(self.dali_threads) or self.dali_threads <= 0:
            raise bad("dali_threads", "a positive int")

    @property
    def workers(self) -> int:
        """``num_workers`` with its default filled in."""
        return min(4, os.cpu_count() or 1) if self.num_workers is None else int(self.num_workers)


class PositionedSource:
    """Position bookkeeping shared by all sources: ``position`` = (epoch, step) of the next batch."""

    backend = "base"

    def __init__(self, steps_per_epoch: int | None):
        self.steps_per_epoch = steps_per_epoch
        self.position = (0, 0)
        self.epoch = 0  # epoch of the last yielded batch (0 before the first)

    def advance(self) -> None:
        """Count one yielded batch."""
        e, s = self.position
        self.epoch = e
        s += 1
        if self.steps_per_epoch is not None and s == self.steps_per_epoch:
            e, s = e + 1, 0
        self.position = (e, s)

    def identity(self) -> dict:
        """The settings a saved position is only valid for."""
        return {}

    def state_dict(self) -> dict:
        """Position of the next batch (``epoch``, ``step`` in the epoch) and the settings it belongs to."""
        return {"epoch": self.position[0], "step": self.position[1], **self.identity()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position; the next ``iter()`` starts there. Raises :class:`DataError` when the
        state was saved with different sharding/batch settings (the position would mean other samples)."""
        for k, v in self.identity().items():
            if k in state and state[k] != v:
                raise DataError(
                    f"loader state has {k}={state[k]!r}, this loader has {k}={v!r}: "
                    "cannot resume the data position exactly"
                )
        e, s = int(state["epoch"]), int(state["step"])
        if e < 0 or s < 0 or (self.steps_per_epoch is not None and s >= self.steps_per_epoch):
            raise DataError(
                f"loader state position epoch={e} step={s} is invalid (steps_per_epoch={self.steps_per_epoch})"
            )
        self.reset()
        self.position = (e, s)
        self.epoch = e

    def reset(self) -> None:
        """Drop any running iterator (its workers shut down); subclasses that hold one override this."""

    def close(self) -> None:
        self.reset()


class PlanSource(PositionedSource):
    """A source over a latent dataset directory whose batches come from a :class:`BatchPlan` (the torch and
    DALI loaders). Construction validates the dataset (manifest, shard files, shapes/dtypes/sizes, label range;
    checksums with ``verify_checksums``) and, if given, that it holds latents of ``shape`` and ``num_classes``
    classes: every problem is a :class:`DataError` naming the file or field."""

    def __init__(
        self,
        root: str | os.PathLike,
        settings: LoaderSettings,
        *,
        shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
    ):
        self.root, self.settings = Path(root), settings
        summary = check_dataset(self.root, checksums=settings.verify_checksums)
        manifest = self.root / "manifest.json"
        if shape is not None and tuple(shape) != tuple(summary["latent_shape"]):
            raise DataError(
                f"{manifest}: field 'latent_shape' is {summary['latent_shape']}, the run expects {list(shape)}"
            )
        if num_classes is not None and num_classes != summary["num_classes"]:
            raise DataError(
                f"{manifest}: field 'num_classes' is {summary['num_classes']}, the run expects {num_classes}"
            )
        self.index = LatentIndex(self.root)
        s = settings
        self.plan = BatchPlan(
            self.index, batch_size=s.batch_size, rank=s.rank, world_size=s.world_size, seed=s.seed, flip=s.flip
        )
        self.batch_size, self.rank, self.world_size, self.seed, self.flip = (
            s.batch_size,
            s.rank,
            s.world_size,
            s.seed,
            s.flip,
        )
        self.shape, self.num_classes = self.index.latent_shape, self.index.num_classes
        self.device = torch.device(s.device)
        super().__init__(self.plan.steps_per_epoch)

    def identity(self) -> dict:
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
