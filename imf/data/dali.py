"""NVIDIA DALI pipeline for latent datasets: the same batches as the torch loader (:class:`imf.data.LatentLoader`).

Design: a batch-mode ``fn.external_source`` feeds, for global iteration ``g``, the inputs of batch
``(epoch, step) = start + g`` computed by :class:`imf.data.plan.BatchPlan` (memory-mapped gather of the
float16 moments and labels in the permuted order, and the Philox-drawn ``eps`` and flip flags of that
batch). The pipeline then computes ``x = flip((mean + std * eps - channel_mean) / channel_std)`` in float32
on the GPU (``device_id``) when the target device is CUDA, on the CPU otherwise. Feeding the plan's indices
and noise (instead of ``fn.readers.numpy`` + ``fn.random.normal``) is what makes the values identical to
the torch path and exactly resumable mid-epoch: DALI's own random operators carry hidden per-sample state
that cannot be restored at an arbitrary step. The source never raises ``StopIteration``: epochs are counted
by the plan, so there is no pipeline drain at epoch boundaries. With ``py_num_workers > 0`` the source runs
in DALI's parallel (spawned) Python workers, which prefetch batches ahead.

Tested here: CPU pipeline (``device_id=None``), serial and parallel source, values equal to the torch path
bit for bit. The GPU branch (``.gpu()`` + GPU arithmetic) is written for CUDA machines and not exercised by
the CPU test suite. ``nvidia.dali`` is imported lazily, through :func:`imf.cli.require` (only when this loader is
built): without it the loader raises :class:`imf.cli.MissingDependencyError` with the install command.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from imf.cli import require
from imf.data.plan import BatchPlan
from imf.data.source import LoaderSettings, PlanSource


def require_dali():
    """``nvidia.dali``, or :class:`imf.cli.MissingDependencyError` with the install command."""
    return require("nvidia.dali", extra="data", package="nvidia-dali-cuda130", purpose="the DALI latent loader")


class PlanFeed:
    """Picklable batch-mode source for ``fn.external_source``: iteration ``g`` -> the plan's batch at
    position ``start + g`` as (mean, std, eps, flip, labels)."""

    def __init__(self, plan: BatchPlan, start: tuple[int, int]):
        self.plan, self.start = plan, start

    def __call__(self, info):
        steps = self.plan.steps_per_epoch
        pos = self.start[0] * steps + self.start[1] + int(info.iteration)
        inp = self.plan.inputs(pos // steps, pos % steps)
        return inp["mean"], inp["std"], inp["eps"], inp["flip"], inp["labels"]


def _build_pipeline(
    source: PlanFeed,
    *,
    batch_size: int,
    device_id: int | None,
    num_threads: int,
    py_num_workers: int,
    py_start_method: str,
    prefetch: int,
    channel_mean: np.ndarray,
    channel_std: np.ndarray,
):
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        py_num_workers=max(1, py_num_workers),
        py_start_method=py_start_method,
        seed=0,
    )
    gpu = device_id is not None
    dev = "gpu" if gpu else "cpu"
    with pipe:
        m, s, e, f, y = fn.external_source(
            source=source,
            num_outputs=5,
            batch=True,
            batch_info=True,
            parallel=py_num_workers > 0,
            layout=["CHW", "CHW", "CHW", "", ""],
            dtype=[types.FLOAT16, types.FLOAT16, types.FLOAT, types.INT32, types.INT64],
        )
        if gpu:
            m, s, e, y = m.gpu(), s.gpu(), e.gpu(), y.gpu()
        cm = types.Constant(channel_mean.reshape(-1, 1, 1).astype(np.float32), device=dev)
        cs = types.Constant(channel_std.reshape(-1, 1, 1).astype(np.float32), device=dev)
        z = fn.cast(m, dtype=types.FLOAT) + fn.cast(s, dtype=types.FLOAT) * e
        x = fn.flip((z - cm) / cs, horizontal=f, vertical=0)  # f stays on the CPU: a per-sample argument
        pipe.set_outputs(x, y)
    pipe.build()
    return pipe


class DaliLatentLoader(PlanSource):
    """DALI loader with the interface and the exact batches of :class:`imf.data.LatentLoader`.

    ``DaliLatentLoader(root, settings)`` or ``DaliLatentLoader(root, batch_size=..., ...)`` (any
    :class:`LoaderSettings` field). ``device``: CUDA device -> the pipeline runs there (``device_id`` = its
    index), else on the CPU. ``num_workers``: DALI Python worker processes for the source (0 = serial, in this
    process; they start with "fork" for a CPU pipeline, "spawn" for CUDA, where forking an initialised CUDA
    context is unsafe; spawn needs an importable ``__main__``); ``dali_threads``: DALI CPU threads;
    ``prefetch``: pipeline queue depth (default 2). Resuming (``load_state_dict``) rebuilds the pipeline at the
    new position."""

    backend = "dali"

    def __init__(self, root, settings: LoaderSettings | None = None, *, shape=None, num_classes=None, **fields):
        require_dali()  # fail early, before reading the dataset
        super().__init__(root, LoaderSettings.resolve(settings, fields), shape=shape, num_classes=num_classes)
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None
        self.py_start_method = "spawn" if self.device_id is not None else "fork"
        self.py_num_workers = self.settings.workers
        self.num_threads = self.settings.dali_threads
        self.prefetch = self.settings.prefetch or 2
        self._pipe = None
        self._live = None

    def reset(self) -> None:
        self._live = None
        self._pipe = None  # dropping the pipeline stops its workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.reset()
        pipe = _build_pipeline(
            PlanFeed(self.plan, self.position),
            batch_size=self.batch_size,
            device_id=self.device_id,
            num_threads=self.num_threads,
            py_num_workers=self.py_num_workers,
            py_start_method=self.py_start_method,
            prefetch=self.prefetch,
            channel_mean=self.index.channel_mean,
            channel_std=self.index.channel_std,
        )
        self._pipe = pipe
        dit = DALIGenericIterator(pipe, ["x", "y"], size=-1, auto_reset=False, prepare_first_batch=False)
        token = object()
        self._live = token
        non_blocking = self.device.type == "cuda"
        while self._live is token:
            out = next(dit)[0]
            self.advance()
            yield (
                out["x"].to(self.device, non_blocking=non_blocking),
                out["y"].to(self.device, non_blocking=non_blocking),
            )
