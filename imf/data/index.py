"""Random access into a latent dataset (:mod:`imf.data.format`): global sample index -> shard row, memory-mapped."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from imf.data.format import DTYPES, load_manifest, open_npy


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
        sh, dtype = self.manifest["shards"], DTYPES[self.manifest["dtype"]]
        rows = (self.views, 2, *self.latent_shape)
        self._mom = [open_npy(self.root / s["moments"], (s["count"], *rows), dtype) for s in sh]
        self._lab = [open_npy(self.root / s["labels"], (s["count"],), np.int64) for s in sh]

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
