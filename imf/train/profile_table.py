"""The "where did the step go" table: per phase of one profiled window, from the profiler's events.

The phases (:data:`imf.phases.PHASES`) are ``record_function`` ranges on the thread that runs the step;
some nest (``imf.guidance`` and ``imf.dual_forward`` inside ``imf.loss``). A phase's time is its
*exclusive* wall time: its ranges minus the phases nested in them, so the phases never count the same
microsecond twice and ``share`` adds up to at most 100% of the step; the rest is ``(unlabelled)``.

Every other event (an op on any thread, e.g. the autograd engine's backward ops on CUDA) belongs to the
innermost phase open on the step's thread when it started; ``top`` lists the ops with the most self time
in each phase, or on CUDA the kernels with the most device time (kernels belong to the op that launched
them). ``gpu_ms`` is the device time of all the kernels a phase launched. Times are means per active
step: a phase that runs in some steps only (``imf.checkpoint``) is averaged over all of them, and
``calls`` says how often it ran per step. ``peak_gb`` (CUDA) is the allocator's peak while the phase was
open, nested phases included, the maximum over the window (:class:`PhasePeaks`).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable

from imf.markdown import markdown_table
from imf.phases import PHASES

STEP_EVENT = "ProfilerStep"
UNLABELLED = "(unlabelled)"


class PhasePeaks:
    """A memory probe for :func:`imf.phases.set_memory_probe`: the peak of ``read_peak()`` while each phase
    was open (nested ones included), with ``reset_peak()`` called at every phase boundary so that each
    phase's peak starts from the memory in use when it opened. On CUDA: ``torch.cuda.max_memory_allocated``
    and ``torch.cuda.reset_peak_memory_stats``."""

    def __init__(self, read_peak: Callable[[], int], reset_peak: Callable[[], None]):
        self.read_peak, self.reset_peak = read_peak, reset_peak
        self.peaks: dict[str, int] = {}
        self._open: list[list] = []  # [name, peak so far] of the open phases, outermost first

    def _fold(self) -> int:
        """The peak since the last boundary, folded into every open phase; then a new interval starts."""
        peak = self.read_peak()
        for entry in self._open:
            entry[1] = max(entry[1], peak)
        self.reset_peak()
        return peak

    def enter(self, name: str) -> None:
        self._fold()
        self._open.append([name, 0])

    def exit(self, name: str) -> None:
        if not self._open or self._open[-1][0] != name:  # opened before the probe was installed
            return
        self._fold()
        _, peak = self._open.pop()
        self.peaks[name] = max(self.peaks.get(name, 0), peak)


def _nest(phases: list) -> tuple[list[int], list[float]]:
    """Depths of the phase events (sorted by start, properly nested) and their exclusive durations (us)."""
    depth, exclusive, stack = [], [], []
    for i, e in enumerate(phases):
        while stack and phases[stack[-1]].time_range.end <= e.time_range.start:
            stack.pop()
        depth.append(len(stack))
        exclusive.append(e.time_range.elapsed_us())
        if stack:
            exclusive[stack[-1]] -= e.time_range.elapsed_us()
        stack.append(i)
    return depth, exclusive


def _owner(phases: list, starts: list[float], t: float) -> int | None:
    """Index of the innermost phase open at time ``t``, or None."""
    i = bisect.bisect_right(starts, t) - 1
    while i >= 0:
        if phases[i].time_range.end > t:
            return i
        i -= 1
    return None


def phase_rows(events: Iterable, *, top_ops: int = 3, cuda: bool = False, peaks: dict[str, int] | None = None):
    """The table's rows (one per phase of :data:`PHASES` that ran, then ``(unlabelled)``) and the window:
    ``(rows, {"steps", "step_ms"})``. ``events``: a profiler's ``events()`` (FunctionEvents)."""
    events = [e for e in events if getattr(e.device_type, "name", "CPU") == "CPU"]
    steps = [e for e in events if e.name.startswith(STEP_EVENT)]
    if not steps:
        return [], {"steps": 0, "step_ms": None}
    thread = steps[0].thread
    phases = sorted((e for e in events if e.name in PHASES and e.thread == thread), key=lambda e: e.time_range.start)
    starts = [e.time_range.start for e in phases]
    _, exclusive = _nest(phases)
    self_us: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    gpu_us: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name in PHASES or e.name.startswith(STEP_EVENT):
            continue
        owner = _owner(phases, starts, e.time_range.start)
        name = phases[owner].name if owner is not None else UNLABELLED
        if cuda:
            for k in e.kernels:
                self_us[name][k.name] += k.duration
                gpu_us[name] += k.duration
        else:
            self_us[name][e.name] += e.self_cpu_time_total
    n = len(steps)
    step_us = sum(s.time_range.elapsed_us() for s in steps) / n
    wall: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e, us in zip(phases, exclusive, strict=True):
        wall[e.name] += us / n
        calls[e.name] += 1
    wall[UNLABELLED] = step_us - sum(wall.values())
    rows = []
    for name in [p for p in PHASES if p in wall] + [UNLABELLED]:
        top = sorted(self_us[name].items(), key=lambda kv: -kv[1])[:top_ops]
        row = {
            "phase": name,
            "ms": wall[name] / 1e3,
            "share": wall[name] / step_us,
            "calls": calls[name] / n if name != UNLABELLED else None,
        }
        if cuda:
            row["gpu_ms"] = gpu_us[name] / n / 1e3
            row["peak_gb"] = peaks[name] / 2**30 if peaks and name in peaks else None
        row["top"] = "; ".join(f"{op} {us / n / 1e3:.3g}" for op, us in top)
        rows.append(row)
    return rows, {"steps": n, "step_ms": step_us / 1e3}


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    if column == "share":
        return f"{100 * value:.1f}%"
    if column in ("ms", "gpu_ms"):
        return f"{value:.3g}"
    if column == "peak_gb":
        return f"{value:.2f}"
    if column == "calls":
        return f"{value:.3g}"
    return str(value).replace("|", "\\|")


def markdown(rows: list[dict], window: dict, *, title: str, cuda: bool) -> str:
    """The table as markdown under a ``title`` line with the window's step count and mean step time."""
    if not rows:
        return f"### {title}\n\n(no profiled steps)\n"
    columns = ["phase", "ms", "share", "calls"] + (["gpu_ms", "peak_gb"] if cuda else []) + ["top"]
    what = "kernels by device ms" if cuda else "ops by self CPU ms"
    head = (
        f"### {title}\n\n{window['steps']} active steps, {window['step_ms']:.4g} ms per step (host wall time). "
        f"ms: exclusive wall time per step; top: {what} per step.\n\n"
    )
    cells = [{c: _cell(c, r.get(c)) for c in columns} for r in rows]
    return head + markdown_table(cells, columns, fmt=str)


__all__ = ["PhasePeaks", "markdown", "phase_rows"]
