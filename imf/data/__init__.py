"""Training data: latent datasets (format, writer, index, sampling plan), the torch and DALI loaders, digits.

Modules, in dependency order:

    format   the on-disk schema (manifest + ``.npy`` shards) and its validation; :class:`DataError`
    writer   :class:`ShardWriter`: atomic, hashed, resumable shard writing (used by :mod:`imf.prepare`)
    index    :class:`LatentIndex`: global sample index -> memory-mapped shard row
    plan     :class:`BatchPlan`: the samples, flips and noise of every batch, deterministic in (seed, epoch, rank)
    source   :class:`LoaderSettings` (every loader setting, written once) and the position bookkeeping
    digits   the built-in 8x8 digits set and its metrics
    loader   the torch DataLoader path, the synthetic and digits sources, :func:`build_loader`
    dali     the DALI pipeline (same batches as the torch path; ``nvidia.dali`` imported lazily)
    verify   ``python -m imf.data verify DIR``

The design is in ``docs/design.md`` (section 4, "Data") and ``docs/data.md``.
"""

from imf.data.format import MANIFEST, DataError, check_dataset, load_manifest, shard_names
from imf.data.index import LatentIndex
from imf.data.loader import DigitsLoader, LatentLoader, SyntheticLatents, build_loader
from imf.data.plan import BatchPlan, normalized_latents
from imf.data.source import LoaderOptions, LoaderSettings
from imf.data.verify import main
from imf.data.writer import ShardWriter

__all__ = [
    "MANIFEST",
    "BatchPlan",
    "DataError",
    "DigitsLoader",
    "LatentIndex",
    "LatentLoader",
    "LoaderOptions",
    "LoaderSettings",
    "ShardWriter",
    "SyntheticLatents",
    "build_loader",
    "check_dataset",
    "load_manifest",
    "main",
    "normalized_latents",
    "shard_names",
]
