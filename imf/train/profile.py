"""Profiling a training run (``--profile.*``): torch.profiler windows, CUDA memory snapshots, phase tables.

:func:`open_session` returns None unless ``profile.active > 0`` or ``profile.memory`` is set and this
rank is one of ``profile.ranks``: without them no profiler object exists. A :class:`ProfileSession`
follows ``torch.profiler.schedule(wait, warmup, active, repeat, skip_first)``; the loop calls
:meth:`ProfileSession.step` after every optimizer step (checkpoint saves included). At the end of each
window it writes, under ``profile.dir`` (default ``<out_dir>/profile``)::

    rank<r>.<step>.pt.trace.json        the Chrome trace format: ui.perfetto.dev, chrome://tracing, and
                                        TensorBoard's profiler plugin (worker rank<r>, span <step>)
    summary_rank<r>_step<step>.md/.json the per-phase table (:mod:`imf.train.profile_table`), also printed
    memory_rank<r>_step<step>.pickle    CUDA with profile.memory: the allocator history (pytorch.org/memory_viz)

With ``profile.memory`` on CUDA the allocator history (``torch.cuda.memory._record_memory_history``, the
last ``memory_entries`` events, with stacks) is recorded from the first step, so a snapshot at a
window's end also shows the steps before it, and an out-of-memory error anywhere in the run writes
``memory_rank<r>_oom_step<step>.pickle`` before it propagates. On CUDA during active steps a
:class:`~imf.train.profile_table.PhasePeaks` probe measures each phase's peak memory; it resets the
allocator's peak counter at phase boundaries, so ``peak_mem_gib`` in ``metrics.jsonl`` counts from
the last profiled phase on. On a CPU the CUDA-only parts are skipped with one note.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from imf.phases import set_memory_probe
from imf.train.config import ProfileConfig
from imf.train.profile_table import PhasePeaks, markdown, phase_rows

_RECORDING = (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE)


def _note(text: str) -> None:
    print(f"imf.train: profile: {text}", file=sys.stderr)


class ProfileSession:
    """One rank's profiling of a run (see the module docstring); a context manager around the loop."""

    def __init__(
        self,
        cfg: ProfileConfig,
        folder: Path,
        *,
        rank: int,
        device: torch.device,
        first_step: int = 0,
        echo: bool = True,
    ):
        self.cfg, self.folder, self.rank, self.echo = cfg, Path(folder), rank, echo
        self.summaries: list[dict] = []  # one per finished window (what summary_*.json holds)
        self.cuda = device.type == "cuda"
        self.device = device
        self.last_step = first_step
        self.folder.mkdir(parents=True, exist_ok=True)  # checked writable before training (imf.train.loop.run)
        if not self.cuda and echo:
            what = "per-phase peak memory" + (" and memory snapshots (profile.memory)" if cfg.memory else "")
            _note(f"CUDA only, not recorded on {device.type}: {what}")
        self.profiler = None
        self.schedule = None
        if cfg.active > 0:
            self.schedule = torch.profiler.schedule(
                wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=cfg.repeat, skip_first=cfg.skip_first
            )
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.profiler = torch.profiler.profile(
                activities=activities,
                schedule=self.schedule,
                on_trace_ready=self._window_done,
                record_shapes=cfg.record_shapes,
                with_stack=cfg.with_stack,
                profile_memory=cfg.profile_memory,
            )
        self.peaks = (
            PhasePeaks(
                lambda: torch.cuda.max_memory_allocated(device), lambda: torch.cuda.reset_peak_memory_stats(device)
            )
            if self.cuda and self.profiler is not None
            else None
        )

    # --- lifetime ------------------------------------------------------------------------------------------

    def __enter__(self) -> ProfileSession:
        if self.cfg.memory and self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=self.cfg.memory_entries)
        if self.profiler is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Profiler clears events at the end of each cycle")
                self.profiler.start()
            self._arm_probe()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and issubclass(exc_type, torch.OutOfMemoryError) and self.cfg.memory and self.cuda:
            self._snapshot(f"memory_rank{self.rank}_oom_step{self.last_step + 1:06d}.pickle", "out of memory: ")
        set_memory_probe(None)
        if self.profiler is not None:
            self.profiler.stop()  # a window cut short (signal, error) is still written
        if self.cfg.memory and self.cuda:
            torch.cuda.memory._record_memory_history(enabled=None)
        return False

    def step(self, step: int) -> None:
        """Optimizer step ``step`` (1-based) is done, checkpoint included."""
        self.last_step = step
        if self.profiler is not None:
            self.profiler.step()
            self._arm_probe()

    # --- internals -----------------------------------------------------------------------------------------

    def _arm_probe(self) -> None:
        """Measure phase peaks during the active steps only (the probe resets the allocator's peak counter)."""
        if self.peaks is not None:
            active = self.schedule(self.profiler.step_num) in _RECORDING
            set_memory_probe(self.peaks if active else None)

    def _snapshot(self, name: str, why: str = "") -> None:
        path = self.folder / name
        torch.cuda.memory._dump_snapshot(str(path))
        _note(f"{why}memory snapshot {path} (open it at https://pytorch.org/memory_viz)")

    def _window_done(self, prof) -> None:
        """``on_trace_ready``: the trace, the phase table (written and printed) and the memory snapshot."""
        step, r = self.last_step, self.rank
        trace = self.folder / f"rank{r}.{step}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        peaks = dict(self.peaks.peaks) if self.peaks is not None else None
        rows, window = phase_rows(prof.events(), top_ops=self.cfg.top_ops, cuda=self.cuda, peaks=peaks)
        if self.peaks is not None:
            self.peaks.peaks.clear()
        first = step - window["steps"] + 1
        title = f"Step phases, rank {r}, steps {first}-{step} ({self.device.type})"
        table = markdown(rows, window, title=title, cuda=self.cuda)
        stem = self.folder / f"summary_rank{r}_step{step:06d}"
        stem.with_suffix(".md").write_text(table)
        summary = {"rank": r, "first_step": first, "last_step": step, **window, "rows": rows, "trace": str(trace)}
        stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
        self.summaries.append(summary)
        if self.echo:
            print(f"\n{table}", file=sys.stderr)
            _note(f"trace {trace} (open it at https://ui.perfetto.dev), summary {stem.with_suffix('.md')}")
        if self.cfg.memory and self.cuda:
            self._snapshot(f"memory_rank{r}_step{step:06d}.pickle")


def open_session(cfg: ProfileConfig, folder: Path, *, rank: int, device: torch.device, first_step: int = 0):
    """A :class:`ProfileSession` when ``cfg`` asks for profiling on ``rank``, else None (nothing is created)."""
    if not cfg.enabled or rank not in cfg.ranks:
        return None
    return ProfileSession(cfg, folder, rank=rank, device=device, first_step=first_step)


__all__ = ["ProfileSession", "open_session"]
