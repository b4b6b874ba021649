"""Latent loader throughput: DALI pipeline vs torch DataLoader vs synthetic, against a training step's demand.

Library only (the CLI lives in ``bench/__main__.py``). ``measure_loaders`` writes (or takes) a latent
dataset, builds each loader with ``imf.data.build_loader`` and times ``steps`` batches after ``warmup``
batches (the clock stops after the batch is on the device, CUDA synchronised). Each row holds
``latents_per_s`` and how many times the given step demand (images/s one training step consumes, e.g.
1,000 img/s for iMF-B/2 on one H100) the loader delivers; the target (docs/design.md section 7) is
>= 20x the demand for DALI and >= 2x the torch loader. ``smoke()`` runs tiny sizes on the CPU to check the
harness, not speed.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imf.cli import MissingDependencyError
from imf.data import ShardWriter, build_loader


def make_dataset(
    root: str | os.PathLike,
    num_samples: int,
    shape=(4, 32, 32),
    num_classes: int = 1000,
    shard_size: int = 4096,
    seed: int = 0,
) -> Path:
    """Random latent moments (mean ~ N(0, 1), std ~ U(0.05, 0.3), float16) written with ShardWriter."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    with ShardWriter(root, latent_shape=tuple(shape), num_classes=num_classes, shard_size=shard_size) as w:
        for a in range(0, num_samples, 1024):
            b = min(1024, num_samples - a)
            w.add(
                rng.standard_normal((b, *shape), dtype=np.float32),
                rng.uniform(0.05, 0.3, (b, *shape)).astype(np.float32),
                rng.integers(0, num_classes, b),
            )
    return root


def _time(loader, steps: int, warmup: int, device: torch.device) -> float:
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    n = 0
    for _ in range(steps):
        x, _y = next(it)
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    loader.close()
    return n / dt


def measure_loaders(
    data: str | os.PathLike | None = None,
    *,
    batch_size: int = 256,
    shape=(4, 32, 32),
    num_samples: int | None = None,
    steps: int = 50,
    warmup: int = 5,
    demand_images_per_s: float = 1000.0,
    device: str | None = None,
    num_workers: int | None = None,
    backends: tuple[str, ...] = ("synthetic", "torch", "dali"),
) -> list[dict]:
    """Rows ``{backend, device, batch_size, shape, num_workers, latents_per_s, demand_images_per_s,
    x_demand, x_torch}`` (``x_torch``: speed relative to the torch loader in the same run, if measured).

    ``data``: an existing dataset directory, or None to write ``num_samples`` (default 32 batches) random
    samples of ``shape`` to a temp dir. ``device``: default CUDA when present. A DALI row is skipped when
    ``nvidia.dali`` is not installed (the row says so)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    tmp = None
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="imf-loader-bench-")
        data = make_dataset(Path(tmp.name) / "lat", num_samples or 32 * batch_size, shape)
    rows = []
    try:
        for backend in backends:
            row = {
                "backend": backend,
                "device": str(dev),
                "batch_size": batch_size,
                "shape": list(shape),
                "num_workers": workers if backend != "synthetic" else 0,
                "demand_images_per_s": demand_images_per_s,
            }
            try:
                if backend == "synthetic":
                    loader = build_loader("synthetic", batch_size=batch_size, shape=shape, device=dev)
                else:
                    loader = build_loader(data, batch_size=batch_size, device=dev, backend=backend, num_workers=workers)
            except MissingDependencyError as e:  # DALI not installed
                rows.append({**row, "latents_per_s": None, "skipped": f"{backend}: {e}"})
                continue
            rate = _time(loader, steps, warmup, dev)
            rows.append({**row, "latents_per_s": rate, "x_demand": rate / demand_images_per_s})
    finally:
        if tmp is not None:
            tmp.cleanup()
    torch_rate = next((r["latents_per_s"] for r in rows if r["backend"] == "torch"), None)
    for r in rows:
        if torch_rate and r["latents_per_s"]:
            r["x_torch"] = r["latents_per_s"] / torch_rate
    return rows


def smoke() -> list[dict]:
    """Tiny CPU run of every backend (harness check): batch 16 of 4x8x8, 256 samples, 4 timed steps."""
    return measure_loaders(
        batch_size=16, shape=(4, 8, 8), num_samples=256, steps=4, warmup=1, device="cpu", num_workers=1
    )
