"""The shard writer of latent datasets (format: :mod:`imf.data.format`): atomic, hashed while written, resumable."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from imf.data.format import DTYPES, FORMAT_NAME, FORMAT_VERSION, MANIFEST, DataError, atomic_write_json, shard_names


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
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported (supported: {sorted(DTYPES)})")
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
        self._buf = np.empty((self.shard_size, self.views, 2, *self.latent_shape), dtype=DTYPES[dtype])
        self._lab = np.empty((self.shard_size,), dtype=np.int64)
        self._n = 0  # samples in the buffer
        existing = sorted(self.out.glob("shard-*")) + ([self.out / MANIFEST] if (self.out / MANIFEST).exists() else [])
        if resume:
            self._resume()
        elif existing:
            raise DataError(
                f"{self.out} already holds a dataset ({existing[0].name}); use an empty directory or resume=True"
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
                ok = (
                    meta.get("count") == self.shard_size
                    and meta.get("fingerprint") == self.fingerprint
                    and mom.exists()
                    and lab.exists()
                    and mom.stat().st_size == meta["bytes"]["moments"]
                    and lab.stat().st_size == meta["bytes"]["labels"]
                )
            except (OSError, ValueError, AttributeError, KeyError, TypeError):  # unreadable sidecar: rewrite
                ok = False
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
            raise ValueError(f"labels must be in [0, {self.num_classes}), got [{labels.min()}, {labels.max()}]")
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
            "shards": [{k: s[k] for k in ("moments", "labels", "count", "sha256", "bytes")} for s in self.sidecars],
            "metadata": self.metadata,
        }
        atomic_write_json(self.out / MANIFEST, self.manifest)
        return self.manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
