"""On-disk format of latent datasets (schema and validation): shards of VAE posterior moments, labels, a manifest.

Layout of a dataset directory (everything plain ``.npy`` + JSON, so DALI's numpy reader, numpy memmaps
and any other tool read it natively)::

    manifest.json                  the dataset description (below); written last, atomically
    shard-00000.moments.npy        (n, V, 2, C, H, W) float16 (or bfloat16 stored as uint16 bits: not
                                   supported by numpy's .npy, so float16 is the default and the tested one)
                                   axis 1: view, 0 = the image as given, 1 = the horizontally flipped image
                                           (present only when ``flipped`` is true, i.e. V = 2)
                                   axis 2: 0 = posterior mean, 1 = posterior std, both already multiplied by
                                           the VAE scaling factor (SD-VAE: 0.18215), so mean + std * eps is
                                           a sample of the *scaled* latent the model trains on
    shard-00000.labels.npy         (n,) int64 class labels in [0, num_classes)
    shard-00000.json               sidecar of a completed shard (count, checksums, channel sums); lets
                                   ``ShardWriter(resume=True)`` and ``imf.prepare`` skip finished shards
    ...

``manifest.json`` holds: ``format`` ("imf-latents"), ``version`` (1), ``count`` (total samples),
``latent_shape`` [C, H, W], ``dtype`` ("float16"), ``num_classes``, ``class_names`` (list or null),
``flipped`` (flipped copies stored), ``views`` (1 or 2), ``channel_mean`` / ``channel_std`` (per-channel
statistics of the *sampled* latent z = mean + std * eps over the whole dataset and all stored views:
``channel_mean = E[mean]``, ``channel_var = E[mean^2] + E[std^2] - channel_mean^2``), ``shards`` (per shard:
file names, ``count``, ``sha256`` of both files, byte sizes) and ``metadata`` (free-form: VAE path,
resolution, scaling factor, ...). Writing: :mod:`imf.data.writer`; sampling: :mod:`imf.data.plan`.

Every problem found here raises :class:`DataError` (an :class:`imf.cli.UserError`) with one line that names
the file or manifest field, what it holds and what is expected.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from imf.cli import UserError

FORMAT_NAME = "imf-latents"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float16": np.float16}
# manifest fields and their JSON types (bool is checked apart from int: JSON true is not a count)
_FIELDS: dict[str, type] = {
    "format": str,
    "version": int,
    "count": int,
    "latent_shape": list,
    "dtype": str,
    "num_classes": int,
    "flipped": bool,
    "views": int,
    "channel_mean": list,
    "channel_std": list,
    "shards": list,
}
_SHARD_FIELDS: dict[str, type] = {"moments": str, "labels": str, "count": int, "sha256": dict, "bytes": dict}


class DataError(UserError):
    """A latent dataset is missing, malformed or inconsistent with its manifest (message names the file)."""


def shard_names(i: int) -> tuple[str, str, str]:
    """File names (moments, labels, sidecar) of shard ``i``."""
    stem = f"shard-{i:05d}"
    return f"{stem}.moments.npy", f"{stem}.labels.npy", f"{stem}.json"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _type_ok(value: Any, want: type | tuple[type, ...]) -> bool:
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


def _check_fields(where: str, obj: dict, fields: dict[str, type]) -> None:
    for key, want in fields.items():
        if key not in obj:
            raise DataError(f"{where}: field '{key}' is missing")
        if not _type_ok(obj[key], want):
            raise DataError(f"{where}: field '{key}' must be {want.__name__}, got {obj[key]!r}")


def _check_shard_entries(path: Path, shards: list) -> None:
    for i, s in enumerate(shards):
        where = f"{path}: shards[{i}]"
        if not isinstance(s, dict):
            raise DataError(f"{where} must be an object with {sorted(_SHARD_FIELDS)}, got {type(s).__name__}")
        _check_fields(where, s, _SHARD_FIELDS)
        for key in ("moments", "labels"):
            name = s[key]
            if not name or Path(name).name != name or name in (".", ".."):
                raise DataError(f"{where}: field '{key}' must be a file name in the dataset directory, got {name!r}")
            for table in ("sha256", "bytes"):
                if key not in s[table]:
                    raise DataError(f"{where}: field '{table}' has no entry '{key}'")
        if s["count"] <= 0:
            raise DataError(f"{where}: field 'count' must be positive, got {s['count']}")


def load_manifest(root: str | os.PathLike) -> dict:
    """Read and schema-check ``root/manifest.json``; raises :class:`DataError` naming the problem."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "does not exist"
        raise DataError(f"data directory {root} {what}")
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} is missing (not a latent dataset directory; create one with imf.prepare)")
    try:
        man = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(man, dict):
        raise DataError(f"{path} must hold a JSON object, got {type(man).__name__}")
    _check_fields(str(path), man, _FIELDS)
    if man["format"] != FORMAT_NAME or man["version"] != FORMAT_VERSION:
        raise DataError(
            f"{path}: format {man['format']!r} version {man['version']} not supported "
            f"(expected {FORMAT_NAME!r} version {FORMAT_VERSION})"
        )
    if man["dtype"] not in DTYPES:
        raise DataError(f"{path}: field 'dtype' is {man['dtype']!r}, supported: {sorted(DTYPES)}")
    shape = man["latent_shape"]
    if len(shape) != 3 or not all(_type_ok(s, int) and s > 0 for s in shape):
        raise DataError(f"{path}: field 'latent_shape' must be [C, H, W] of positive ints, got {shape}")
    if man["views"] != (2 if man["flipped"] else 1):
        raise DataError(f"{path}: field 'views' is {man['views']} but 'flipped' is {man['flipped']}")
    if man["num_classes"] <= 0:
        raise DataError(f"{path}: field 'num_classes' must be positive, got {man['num_classes']}")
    _check_shard_entries(path, man["shards"])
    total = sum(s["count"] for s in man["shards"])
    if total != man["count"]:
        raise DataError(f"{path}: field 'count' is {man['count']} but the shards hold {total}")
    if man["count"] == 0:
        raise DataError(f"{path}: the dataset is empty (count 0)")
    c = shape[0]
    for key in ("channel_mean", "channel_std"):
        v = man[key]
        if len(v) != c or not all(_type_ok(x, (int, float)) and math.isfinite(x) for x in v):
            raise DataError(f"{path}: field '{key}' must hold {c} finite numbers, got {v}")
    if min(man["channel_std"]) <= 0:
        raise DataError(f"{path}: field 'channel_std' must be positive, got {man['channel_std']}")
    return man


def open_npy(path: Path, shape: tuple, dtype, nbytes: int | None = None) -> np.ndarray:
    """Memory-map the ``.npy`` at ``path`` and check it holds ``shape`` / ``dtype`` (and ``nbytes`` bytes)."""
    if not path.is_file():
        raise DataError(f"shard file {path} is missing")
    size = path.stat().st_size
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        if nbytes is not None and size < nbytes:
            raise DataError(f"shard file {path} is truncated ({size} of {nbytes} bytes): {e}") from e
        raise DataError(f"shard file {path} is unreadable or truncated: {e}") from e
    if arr.shape != shape:
        raise DataError(f"shard file {path} has shape {arr.shape}, manifest says {shape}")
    if arr.dtype != np.dtype(dtype):
        raise DataError(f"shard file {path} has dtype {arr.dtype}, manifest says {np.dtype(dtype)}")
    if nbytes is not None and size != nbytes:
        raise DataError(f"shard file {path} has {size} bytes, the manifest records {nbytes} (replaced or padded)")
    return arr


def _check_values(path: Path, mom: np.ndarray) -> None:
    """Finite moments and ``std >= 0`` (read in blocks of about 64 MiB)."""
    step = max(1, (1 << 26) // max(1, mom[0].nbytes))
    for a in range(0, len(mom), step):
        blk = np.asarray(mom[a : a + step], dtype=np.float32)
        if not np.isfinite(blk).all():
            raise DataError(f"shard file {path}: non-finite moments near sample {a}")
        if (blk[:, :, 1] < 0).any():
            raise DataError(f"shard file {path}: negative std near sample {a}")


def check_dataset(root: str | os.PathLike, *, checksums: bool = False, progress: bool = False) -> dict:
    """Validate a dataset against its manifest; returns a summary dict, raises :class:`DataError`.

    Always: manifest schema, every shard file present and readable, shapes/dtypes/counts/byte sizes match,
    labels in ``[0, num_classes)``. With ``checksums``: sha256 of every file and finite moments with
    ``std >= 0`` (reads the whole dataset)."""
    root = Path(root)
    man = load_manifest(root)
    views, shape, k = man["views"], tuple(man["latent_shape"]), man["num_classes"]
    class_counts = np.zeros(k, dtype=np.int64)
    shards = man["shards"]
    it = shards
    if progress:
        from tqdm import tqdm

        it = tqdm(shards, desc="verify", unit="shard", disable=None)  # None: only on a terminal
    size = 0
    for s in it:
        n = s["count"]
        mom = open_npy(root / s["moments"], (n, views, 2, *shape), DTYPES[man["dtype"]], s["bytes"]["moments"])
        lab = np.asarray(open_npy(root / s["labels"], (n,), np.int64, s["bytes"]["labels"]))
        if lab.min() < 0 or lab.max() >= k:
            raise DataError(
                f"shard file {root / s['labels']}: labels out of range [0, {k}): min {lab.min()}, max {lab.max()}"
            )
        class_counts += np.bincount(lab, minlength=k)
        size += s["bytes"]["moments"] + s["bytes"]["labels"]
        if checksums:
            for key in ("moments", "labels"):
                got = sha256_file(root / s[key])
                if got != s["sha256"][key]:
                    raise DataError(
                        f"shard file {root / s[key]}: sha256 mismatch (file {got[:12]}..., "
                        f"manifest {str(s['sha256'][key])[:12]}...): the file is corrupt or was replaced"
                    )
            _check_values(root / s["moments"], mom)
        del mom, lab
    return {
        "root": str(root),
        "count": man["count"],
        "shards": len(shards),
        "latent_shape": list(shape),
        "dtype": man["dtype"],
        "num_classes": k,
        "flipped": man["flipped"],
        "bytes": size,
        "samples_per_class_min": int(class_counts.min()),
        "samples_per_class_max": int(class_counts.max()),
        "channel_mean": man["channel_mean"],
        "channel_std": man["channel_std"],
        "checksums_verified": checksums,
    }
