"""On-disk format of latent datasets: shards of VAE posterior moments, labels and a JSON manifest.

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
resolution, scaling factor, ...).

Sampling randomness is defined here too (numpy only, so that the torch DataLoader workers and DALI's
external-source workers compute bit-identical inputs): the epoch permutation is drawn from
``SeedSequence([seed, epoch, PERM_TAG])``; the flips and ``eps`` of batch ``step`` on ``rank`` from
``SeedSequence([seed, epoch, rank, step, NOISE_TAG])`` (Philox). Every rank sees ``N // world_size``
samples of each epoch (the ``N % world_size`` tail of the permutation is dropped, a different tail every
epoch), cut into ``(N // world_size) // batch_size`` full batches (the incomplete last batch is dropped).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "imf-latents"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PERM_TAG = 0x5045524D  # "PERM": stream tag of the epoch permutation
NOISE_TAG = 0x4E4F4953  # "NOIS": stream tag of the per-batch flips and eps
_DTYPES = {"float16": np.float16}


class DataError(ValueError):
    """A latent dataset is missing, malformed or inconsistent with its manifest (message names the file)."""


def shard_names(i: int) -> tuple[str, str, str]:
    """File names (moments, labels, sidecar) of shard ``i``."""
    stem = f"shard-{i:05d}"
    return f"{stem}.moments.npy", f"{stem}.labels.npy", f"{stem}.json"


class _HashingFile:
    """File wrapper that feeds every written byte into a sha256 (so a shard is hashed while it is written)."""

    def __init__(self, f):
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, b) -> int:
        b = memoryview(b).cast("B")
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> tuple[str, int]:
    """Write ``arr`` to ``path`` via a temp file + fsync + rename; returns (sha256 hex, size in bytes)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        hf = _HashingFile(f)
        np.lib.format.write_array(hf, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hf.h.hexdigest(), hf.n


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor; no torch import needed here
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            a = a.float()
        a = a.numpy()
    return np.asarray(a)


class ShardWriter:
    """Writes a latent dataset: fixed-size shards of posterior moments + labels, then ``manifest.json``.

    Usage::

        with ShardWriter(out, latent_shape=(4, 32, 32), num_classes=1000, flipped=True) as w:
            w.add(mean, std, labels, mean_flipped, std_flipped)   # batches (B, C, H, W), (B,)
        # w.manifest holds the written manifest

    ``mean``/``std`` are the VAE posterior moments *already multiplied by the scaling factor* (numpy arrays
    or CPU/GPU torch tensors, any float dtype; stored as float16). A shard is written (atomically, hashed
    while written, with a sidecar JSON) as soon as ``shard_size`` samples are buffered; ``close()`` writes
    the last, partial shard and the manifest (with channel statistics aggregated from the sidecars).

    ``resume=True`` keeps the leading run of complete shards (sidecar present, ``count == shard_size``,
    files of the recorded sizes, same ``fingerprint``) and deletes anything after them; ``self.count`` then
    says how many input samples are already stored (the caller skips them). Without ``resume`` the
    directory must not already hold shards or a manifest.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        latent_shape: tuple[int, int, int],
        num_classes: int,
        shard_size: int = 10000,
        flipped: bool = False,
        dtype: str = "float16",
        class_names: list[str] | None = None,
        metadata: dict | None = None,
        fingerprint: str = "",
        resume: bool = False,
    ):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported (supported: {sorted(_DTYPES)})")
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries, num_classes is {num_classes}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        if len(self.latent_shape) != 3:
            raise ValueError(f"latent_shape must be (C, H, W), got {latent_shape}")
        self.num_classes = int(num_classes)
        self.shard_size = int(shard_size)
        self.flipped = bool(flipped)
        self.views = 2 if flipped else 1
        self.dtype = dtype
        self.class_names = list(class_names) if class_names is not None else None
        self.metadata = dict(metadata or {})
        self.fingerprint = fingerprint
        self.sidecars: list[dict] = []  # one per written shard, in order
        self.manifest: dict | None = None
        self._buf = np.empty((self.shard_size, self.views, 2, *self.latent_shape), dtype=_DTYPES[dtype])
        self._lab = np.empty((self.shard_size,), dtype=np.int64)
        self._n = 0  # samples in the buffer
        existing = sorted(self.out.glob("shard-*")) + (
            [self.out / MANIFEST] if (self.out / MANIFEST).exists() else []
        )
        if resume:
            self._resume()
        elif existing:
            raise DataError(
                f"{self.out} already holds a dataset ({existing[0].name}); use an empty directory "
                "or resume=True"
            )

    @property
    def count(self) -> int:
        """Samples stored so far (complete shards + buffered)."""
        return sum(s["count"] for s in self.sidecars) + self._n

    def _resume(self) -> None:
        (self.out / MANIFEST).unlink(missing_ok=True)
        i = 0
        while True:
            mom, lab, side = (self.out / n for n in shard_names(i))
            if not side.exists():
                break
            try:
                meta = json.loads(side.read_text())
            except (OSError, json.JSONDecodeError):
                break
            ok = (
                meta.get("count") == self.shard_size
                and meta.get("fingerprint") == self.fingerprint
                and mom.exists()
                and lab.exists()
                and mom.stat().st_size == meta["bytes"]["moments"]
                and lab.stat().st_size == meta["bytes"]["labels"]
            )
            if not ok:
                break
            self.sidecars.append(meta)
            i += 1
        for p in self.out.glob("shard-*"):  # anything after the kept run is partial or stale: rewrite it
            try:
                idx = int(p.name.split(".")[0].split("-")[1])
            except (IndexError, ValueError):
                continue
            if idx >= i:
                p.unlink()

    def add(self, mean, std, labels, mean_flipped=None, std_flipped=None) -> None:
        """Append a batch: ``mean``/``std`` (B, C, H, W) scaled posterior moments, ``labels`` (B,) ints;
        ``mean_flipped``/``std_flipped`` (moments of the horizontally flipped images) iff ``flipped``."""
        mean, std, labels = _to_numpy(mean), _to_numpy(std), _to_numpy(labels).astype(np.int64).reshape(-1)
        b = labels.shape[0]
        want = (b, *self.latent_shape)
        parts = [mean, std]
        if self.flipped:
            if mean_flipped is None or std_flipped is None:
                raise ValueError("writer has flipped=True: pass mean_flipped and std_flipped")
            parts += [_to_numpy(mean_flipped), _to_numpy(std_flipped)]
        elif mean_flipped is not None or std_flipped is not None:
            raise ValueError("writer has flipped=False: do not pass flipped moments")
        for name, p in zip(("mean", "std", "mean_flipped", "std_flipped"), parts, strict=False):
            if p.shape != want:
                raise ValueError(f"{name} has shape {p.shape}, expected {want}")
        if b and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must be in [0, {self.num_classes}), got [{labels.min()}, {labels.max()}]"
            )
        stacked = np.stack(parts, axis=1).reshape(b, self.views, 2, *self.latent_shape)
        start = 0
        while start < b:
            take = min(b - start, self.shard_size - self._n)
            self._buf[self._n : self._n + take] = stacked[start : start + take]
            self._lab[self._n : self._n + take] = labels[start : start + take]
            self._n += take
            start += take
            if self._n == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if self._n == 0:
            return
        i = len(self.sidecars)
        mom_name, lab_name, side_name = shard_names(i)
        mom, lab = self._buf[: self._n], self._lab[: self._n]
        m = mom[:, :, 0].astype(np.float64)  # (n, V, C, H, W)
        s = mom[:, :, 1].astype(np.float64)
        axes = (0, 1, 3, 4)
        h_m, n_m = _atomic_save_npy(self.out / mom_name, mom)
        h_l, n_l = _atomic_save_npy(self.out / lab_name, lab)
        meta = {
            "index": i,
            "count": int(self._n),
            "moments": mom_name,
            "labels": lab_name,
            "sha256": {"moments": h_m, "labels": h_l},
            "bytes": {"moments": n_m, "labels": n_l},
            "sum_mean": m.sum(axis=axes).tolist(),
            "sum_mean_sq": (m * m).sum(axis=axes).tolist(),
            "sum_std_sq": (s * s).sum(axis=axes).tolist(),
            "elements_per_channel": int(m.shape[0] * m.shape[1] * m.shape[3] * m.shape[4]),
            "fingerprint": self.fingerprint,
        }
        atomic_write_json(self.out / side_name, meta)  # sidecar last: its presence marks the shard complete
        self.sidecars.append(meta)
        self._n = 0

    def close(self) -> dict:
        """Write the last partial shard and ``manifest.json``; returns the manifest."""
        if self.manifest is not None:
            return self.manifest
        self._flush()
        c = self.latent_shape[0]
        n_el = sum(s["elements_per_channel"] for s in self.sidecars)
        if n_el:
            sm = np.sum([s["sum_mean"] for s in self.sidecars], axis=0) / n_el
            smq = np.sum([s["sum_mean_sq"] for s in self.sidecars], axis=0) / n_el
            ssq = np.sum([s["sum_std_sq"] for s in self.sidecars], axis=0) / n_el
            var = np.maximum(smq + ssq - sm * sm, 0.0)
            ch_mean, ch_std = sm.tolist(), np.sqrt(var).tolist()
        else:
            ch_mean, ch_std = [None] * c, [None] * c
        self.manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "count": int(sum(s["count"] for s in self.sidecars)),
            "latent_shape": list(self.latent_shape),
            "dtype": self.dtype,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "flipped": self.flipped,
            "views": self.views,
            "channel_mean": ch_mean,
            "channel_std": ch_std,
            "shards": [
                {k: s[k] for k in ("moments", "labels", "count", "sha256", "bytes")} for s in self.sidecars
            ],
            "metadata": self.metadata,
        }
        atomic_write_json(self.out / MANIFEST, self.manifest)
        return self.manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


# ----------------------------------------------------------------------------------------------------------
# reading and validation


def load_manifest(root: str | os.PathLike) -> dict:
    """Read and schema-check ``root/manifest.json``; raises :class:`DataError` naming the problem."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} is missing (not a latent dataset directory; create one with imf.prepare)")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    for key in (
        "format",
        "version",
        "count",
        "latent_shape",
        "dtype",
        "num_classes",
        "flipped",
        "views",
        "channel_mean",
        "channel_std",
        "shards",
    ):
        if key not in man:
            raise DataError(f"{path}: field '{key}' is missing")
    if man["format"] != FORMAT_NAME or man["version"] != FORMAT_VERSION:
        raise DataError(
            f"{path}: format {man['format']!r} version {man['version']} not supported "
            f"(expected {FORMAT_NAME!r} version {FORMAT_VERSION})"
        )
    if man["dtype"] not in _DTYPES:
        raise DataError(f"{path}: field 'dtype' is {man['dtype']!r}, supported: {sorted(_DTYPES)}")
    if len(man["latent_shape"]) != 3 or min(man["latent_shape"]) <= 0:
        raise DataError(f"{path}: field 'latent_shape' must be [C, H, W] > 0, got {man['latent_shape']}")
    if man["views"] != (2 if man["flipped"] else 1):
        raise DataError(f"{path}: field 'views' is {man['views']} but 'flipped' is {man['flipped']}")
    if int(man["num_classes"]) <= 0:
        raise DataError(f"{path}: field 'num_classes' must be positive, got {man['num_classes']}")
    total = sum(int(s["count"]) for s in man["shards"])
    if total != man["count"]:
        raise DataError(f"{path}: field 'count' is {man['count']} but the shards hold {total}")
    if man["count"] == 0:
        raise DataError(f"{path}: the dataset is empty (count 0)")
    c = man["latent_shape"][0]
    for key in ("channel_mean", "channel_std"):
        v = man[key]
        if len(v) != c or any(x is None or not math.isfinite(x) for x in v):
            raise DataError(f"{path}: field '{key}' must hold {c} finite numbers, got {v}")
    if min(man["channel_std"]) <= 0:
        raise DataError(f"{path}: field 'channel_std' must be positive, got {man['channel_std']}")
    return man


def _open_npy(path: Path, shape: tuple, dtype) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"shard file {path} is missing")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"shard file {path} is unreadable or truncated: {e}") from e
    if arr.shape != shape:
        raise DataError(f"shard file {path} has shape {arr.shape}, manifest says {shape}")
    if arr.dtype != np.dtype(dtype):
        raise DataError(f"shard file {path} has dtype {arr.dtype}, manifest says {np.dtype(dtype)}")
    return arr


def check_dataset(root: str | os.PathLike, *, checksums: bool = False, progress: bool = False) -> dict:
    """Validate a dataset against its manifest; returns a summary dict, raises :class:`DataError`.

    Always: manifest schema, every shard file present and readable, shapes/dtypes/counts match, labels in
    ``[0, num_classes)``. With ``checksums``: sha256 of every file and finite moments with ``std >= 0``
    (reads the whole dataset)."""
    root = Path(root)
    man = load_manifest(root)
    views, shape, k = man["views"], tuple(man["latent_shape"]), man["num_classes"]
    class_counts = np.zeros(k, dtype=np.int64)
    shards = man["shards"]
    it = shards
    if progress:
        from tqdm import tqdm

        it = tqdm(shards, desc="verify", unit="shard")
    size = 0
    for s in it:
        n = int(s["count"])
        if n <= 0:
            raise DataError(f"{root / MANIFEST}: shard {s['moments']} has count {n}")
        mom = _open_npy(root / s["moments"], (n, views, 2, *shape), _DTYPES[man["dtype"]])
        lab = _open_npy(root / s["labels"], (n,), np.int64)
        lab_arr = np.asarray(lab)
        if lab_arr.min() < 0 or lab_arr.max() >= k:
            raise DataError(
                f"shard file {root / s['labels']}: labels out of range [0, {k}): "
                f"min {lab_arr.min()}, max {lab_arr.max()}"
            )
        class_counts += np.bincount(lab_arr, minlength=k)
        for key in ("moments", "labels"):
            size += (root / s[key]).stat().st_size
        if checksums:
            for key in ("moments", "labels"):
                got = sha256_file(root / s[key])
                if got != s["sha256"][key]:
                    raise DataError(
                        f"shard file {root / s[key]}: sha256 mismatch (file {got[:12]}..., "
                        f"manifest {s['sha256'][key][:12]}...): the file is corrupt or was replaced"
                    )
            step = max(1, (1 << 26) // max(1, mom[0].nbytes))
            for a in range(0, n, step):
                blk = np.asarray(mom[a : a + step], dtype=np.float32)
                if not np.isfinite(blk).all():
                    raise DataError(f"shard file {root / s['moments']}: non-finite moments near sample {a}")
                if (blk[:, :, 1] < 0).any():
                    raise DataError(f"shard file {root / s['moments']}: negative std near sample {a}")
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


class LatentIndex:
    """Read access to a validated dataset: global sample index -> (shard, row), memory-mapped lazily.

    Picklable (memmaps are reopened in each process: DataLoader / DALI workers)."""

    def __init__(self, root: str | os.PathLike, manifest: dict | None = None):
        self.root = Path(root)
        self.manifest = manifest if manifest is not None else load_manifest(root)
        m = self.manifest
        self.count = int(m["count"])
        self.views = int(m["views"])
        self.flipped = bool(m["flipped"])
        self.latent_shape = tuple(m["latent_shape"])
        self.num_classes = int(m["num_classes"])
        self.channel_mean = np.asarray(m["channel_mean"], dtype=np.float32)
        self.channel_std = np.asarray(m["channel_std"], dtype=np.float32)
        counts = np.array([s["count"] for s in m["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self._mom: list | None = None
        self._lab: list | None = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_mom"] = d["_lab"] = None
        return d

    def _open(self) -> None:
        sh = self.manifest["shards"]
        self._mom = [np.load(self.root / s["moments"], mmap_mode="r") for s in sh]
        self._lab = [np.load(self.root / s["labels"], mmap_mode="r") for s in sh]

    def gather(self, idx: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``idx`` (global indices) in view ``view`` (0/1 per row): (mean, std) float16 (B, C, H, W)
        and labels int64 (B,), in the order of ``idx``."""
        if self._mom is None:
            self._open()
        b = len(idx)
        mean = np.empty((b, *self.latent_shape), dtype=np.float16)
        std = np.empty((b, *self.latent_shape), dtype=np.float16)
        lab = np.empty((b,), dtype=np.int64)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            rows = idx[sel] - self.offsets[s]
            order = np.argsort(rows, kind="stable")  # ascending rows: sequential-ish reads of the memmap
            sel, rows = sel[order], rows[order]
            mom = self._mom[s][rows, view[sel]]  # (k, 2, C, H, W), one read per row
            mean[sel], std[sel] = mom[:, 0], mom[:, 1]
            lab[sel] = self._lab[s][rows]
        return mean, std, lab


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
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.per_rank = index.count // self.world_size
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if self.batch_size > self.per_rank:
            raise ValueError(
                f"batch_size {batch_size} is larger than the per-rank dataset ({index.count} samples "
                f"// world_size {world_size} = {self.per_rank})"
            )
        self.steps_per_epoch = self.per_rank // self.batch_size
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's global sample indices for ``epoch``, in order (length ``N // world_size``)."""
        if self._perm_epoch != epoch:
            rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, epoch, PERM_TAG])))
            self._perm = rng.permutation(self.index.count)
            self._perm_epoch = epoch
        a = self.rank * self.per_rank
        return self._perm[a : a + self.per_rank]

    def inputs(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside [0, {self.steps_per_epoch})")
        b = self.batch_size
        idx = self.epoch_indices(epoch)[step * b : (step + 1) * b]
        rng = np.random.Generator(
            np.random.Philox(np.random.SeedSequence([self.seed, epoch, self.rank, step, NOISE_TAG]))
        )
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


def normalized_latents(
    inp: dict[str, np.ndarray], channel_mean: np.ndarray, channel_std: np.ndarray
) -> np.ndarray:
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
