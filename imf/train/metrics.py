"""Training metrics: ``metrics.jsonl`` (+ TensorBoard) on rank 0, each step at most once, and the per-window record.

A record is written every ``log.every_steps`` steps (and at the last, a stopping or a non-finite step):
the rank-averaged loss terms, grad norm, lr, images/s per device and in total, step time, TFLOP/s per
device and MFU (when the device's peak is known, :func:`imf.flops.peak_flops`), peak memory (CUDA
allocator, or the process's max RSS on CPU), data-wait fraction and the skipped-step counters.
Non-finite values are written as null.

**Each step once.** A run that resumes from step ``S`` first moves the records after ``S`` (written by
the interrupted run after its last checkpoint, and a torn last line of a ``kill -9``) to
``metrics.superseded.jsonl``; the resumed run writes those steps again. A fresh run moves every
earlier record there.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from imf.train.trainer import StepResult

METRICS = "metrics.jsonl"
SUPERSEDED = "metrics.superseded.jsonl"


def _step_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def truncate_after(out_dir: str | Path, step: int) -> int:
    """Keep the records of steps ``<= step`` in ``metrics.jsonl`` (each once, the last copy); move the rest
    (and unreadable lines) to ``metrics.superseded.jsonl``. Returns how many lines moved."""
    path = Path(out_dir) / METRICS
    if not path.is_file():
        return 0
    keep: dict[int, str] = {}
    moved = []
    for line in path.read_text().splitlines():
        s = _step_of(line)
        if s is not None and s <= step:
            if s in keep:
                moved.append(keep[s])
            keep[s] = line
        elif line.strip():
            moved.append(line)
    if moved:
        with open(path.with_name(SUPERSEDED), "a") as f:
            f.write("".join(m + "\n" for m in moved))
    tmp = path.with_name(f".{METRICS}.tmp")
    tmp.write_text("".join(keep[s] + "\n" for s in sorted(keep)))
    tmp.replace(path)
    return len(moved)


class MetricsLog:
    """Appends records to ``<out_dir>/metrics.jsonl`` (and TensorBoard) when ``enabled`` (rank 0)."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled, self.tb, self.path = enabled, None, Path(out_dir) / METRICS
        if enabled and tensorboard:
            from imf.cli import require

            require("torch.utils.tensorboard", package="tensorboard", purpose="log.tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Window:
    """Time and throughput since the last record; ``record()`` builds one and starts a new window."""

    def __init__(self, *, images_per_step: int, world: int, flops_per_step: float, peak: float | None, device):
        self.images, self.world, self.flops, self.peak = images_per_step, world, flops_per_step, peak
        self.device = device
        self.steps, self.time, self.data = 0, 0.0, 0.0

    def add(self, seconds: float, data_seconds: float) -> None:
        self.steps += 1
        self.time += seconds
        self.data += data_seconds

    def images_per_s(self) -> float:
        return self.images * self.steps / self.time * self.world

    def record(self, result: StepResult, *, epoch: int, skipped: int, in_a_row: int) -> dict:
        """The ``metrics.jsonl`` record of step ``result`` (its loss terms, grad norm and LR), the epoch, the
        non-finite counters and this window's throughput; then the window starts again."""
        per_device = self.images * self.steps / self.time
        rec = {
            "step": result.step,
            "epoch": epoch,
            **result.metrics,
            "grad_norm": result.grad_norm,
            "lr": result.lr,
            "img_per_s_per_device": per_device,
            "img_per_s": per_device * self.world,
            "step_time_s": self.time / self.steps,
            "tflops_per_device": self.flops * self.steps / self.time / 1e12,
            "peak_mem_gib": peak_memory_gib(self.device),
            "data_wait_frac": self.data / self.time,
            "skipped_total": skipped,
            "nonfinite_in_a_row": in_a_row,
        }
        if self.peak:
            rec["mfu"] = self.flops * self.steps / self.time / self.peak
        self.steps, self.time, self.data = 0, 0.0, 0.0
        return rec


class HeadlineError:
    """The one number the progress bar follows: the method's unweighted error (``mse_V`` for iMF, ``mse_u`` for
    MF; the adaptively weighted ``loss`` sits near its fixed point and does not show progress), averaged
    over the steps since the bar last showed it, so its slow fall is not hidden by step-to-step noise.
    The other terms (``mse_v``, ``loss_V``, ...) are in ``metrics.jsonl``."""

    KEYS = ("mse_V", "mse_u")

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, step_metrics: dict) -> None:
        key = next((k for k in self.KEYS if k in step_metrics), "loss")
        value = float(step_metrics[key])
        if math.isfinite(value):
            self.total, self.count = self.total + value, self.count + 1

    def mean(self) -> float:
        """The average since the last call (NaN when no step was finite); starts a new average."""
        value = self.total / self.count if self.count else float("nan")
        self.total, self.count = 0.0, 0
        return value


def progress_postfix(error: float, img_s: float, skipped: int) -> dict:
    """What the progress bar shows after the count: the headline error (:class:`HeadlineError`), images/s,
    and the skipped (non-finite) steps when there are any."""
    shown = {"mse": f"{error:.4g}", "img/s": f"{img_s:.0f}"}
    return {**shown, "skipped": skipped} if skipped else shown


__all__ = [
    "METRICS",
    "SUPERSEDED",
    "HeadlineError",
    "MetricsLog",
    "Window",
    "peak_memory_gib",
    "progress_postfix",
    "truncate_after",
]
