"""The stage runner of ``python -m bench gpu-check``: time boxes that really cut, and results on disk after every stage.

A :class:`Stage` names a function (``"module:function"``) that is run in its **own child process**
(``python -m bench.gpu_check_runner <spec>``, in a new session) with a time box:

* the child gets a *soft* deadline (the box less a small reserve); its function checks
  :meth:`StageContext.expired` between measurements and records what it had to leave out;
* the parent waits at most the box, then ends the child's process group (SIGTERM, SIGKILL after
  :data:`KILL_GRACE_S`) and records the stage as ``cut``: a CUDA call that hangs costs its stage's
  box, never the whole budget; the child also arms ``alarm()`` in case the parent itself is killed.

The child writes ``<stage>.json`` (status, result, rows, skipped items) after every measurement
(atomic replace), so a stage that is cut or a run that is killed keeps everything measured so far.
After every stage the parent writes :data:`SUMMARY_JSON` and :data:`REPORT_MD` (the report callback
renders them). The output directory holds at most :data:`FILES_MAX` files and no subfolders: only
those two and one JSON per stage; anything else that appears there during a run is removed and named
in the run record. A directory holding files gpu-check did not write is refused; the files of an
earlier run (``known`` names, e.g. the stages a ``--stages`` subset leaves out) are replaced.

**Time is carried forward.** Stage *i* may run until the plan's end of stage *i* (the sum of the boxes
and kill graces up to it, from the start), so it gets its own box plus whatever the stages before it left
unused, never more than what is left of the budget. A stage whose time is below its ``min_s`` (the least
in which it yields its first result from a cold Triton cache: process start, imports, the first compiles
and timing) is recorded ``not run`` instead of being started and cut with nothing. Inside a stage the
same rule holds per item: a stage lists its items with the seconds each needs (``needs``), and
:meth:`StageContext.begin` refuses, and records as left out, an item that would not fit in the time left.
:func:`plan_total` is the worst case (every box used in full); :func:`plan_rows` shows the boxes, the
minimum of each stage, when each ends at the latest, and the items with their needs.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUMMARY_JSON = "gpu_check.json"
REPORT_MD = "gpu_check.md"
FILES_MAX = 8
KILL_GRACE_S = 3.0  # after SIGTERM, before SIGKILL
RUNNER_OVERHEAD_S = 5.0  # writing the report, verdict, process bookkeeping
MIN_BOX_S = 5.0  # the default min_s: a child process cannot do anything in less


@dataclass(frozen=True)
class Stage:
    """One stage: ``name`` (its file is ``<name>.json``), a title, what it runs (for the plan), its time
    box in seconds, the ``"module:function"`` the child calls with a :class:`StageContext`, options, and
    the items it runs with the seconds each needs from a cold cache (the first ``core`` must fit the box)."""

    name: str
    title: str
    runs: str
    box_s: float
    target: str
    options: dict = field(default_factory=dict)
    needs: tuple[tuple[str, float], ...] = ()  # (item, seconds it needs from a cold cache), in run order
    core: int = 0  # how many of the first ``needs`` items the stage is sized for (its box holds them)

    @property
    def min_s(self) -> float:
        """The least time worth starting the stage with: its first item's need (or :data:`MIN_BOX_S`)."""
        return max(MIN_BOX_S, self.needs[0][1]) if self.needs else MIN_BOX_S

    def core_s(self) -> float:
        return sum(s for _, s in self.needs[: self.core])


def allowed_files(stages: Sequence[Stage]) -> set[str]:
    return {SUMMARY_JSON, REPORT_MD} | {f"{s.name}.json" for s in stages}


def check_plan(stages: Sequence[Stage]) -> None:
    """Unique, file-safe stage names, positive boxes, and at most :data:`FILES_MAX` files in all."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    for s in stages:
        if not s.name or not all(c.isalnum() or c == "_" for c in s.name):
            raise ValueError(f"stage name must be letters, digits and '_', got {s.name!r}")
        if s.box_s <= 0:
            raise ValueError(f"stage {s.name!r}: box_s must be > 0, got {s.box_s}")
        if s.core_s() > s.box_s:
            raise ValueError(
                f"stage {s.name!r}: its {s.core} core items need {s.core_s():g} s, its box is {s.box_s:g} s"
            )
    if len(allowed_files(stages)) > FILES_MAX:
        raise ValueError(f"{len(stages)} stages need {len(stages) + 2} files; the output folder holds {FILES_MAX}")


def plan_total(stages: Sequence[Stage]) -> float:
    """Worst-case wall time: the last stage's latest end (:func:`plan_ends`) plus the runner's overhead."""
    return (plan_ends(stages)[-1] if stages else 0.0) + RUNNER_OVERHEAD_S


def plan_ends(stages: Sequence[Stage]) -> list[float]:
    """Seconds from the start by which each stage has ended at the latest: its box and kill grace plus
    those of every stage before it (what :func:`run_stages` lets it run until)."""
    ends, t = [], 0.0
    for s in stages:
        t += s.box_s + KILL_GRACE_S
        ends.append(t)
    return ends


def _needs_text(s: Stage) -> str:
    core = "; ".join(f"{item} {sec:g}" for item, sec in s.needs[: s.core])
    more = "; ".join(f"{item} {sec:g}" for item, sec in s.needs[s.core :])
    return f"{core}{' | then, with time carried: ' + more if more else ''}"


def plan_rows(stages: Sequence[Stage]) -> list[dict]:
    return [
        {
            "#": i,
            "stage": s.name,
            "title": s.title,
            "runs": s.runs,
            "box_s": s.box_s,
            "min_s": s.min_s,
            "core_s": s.core_s(),
            "ends_by_s": end,
            "items (s needed, cold cache)": _needs_text(s),
        }
        for i, (s, end) in enumerate(zip(stages, plan_ends(stages), strict=True), 1)
    ]


def prepare_out_dir(out: Path, stages: Sequence[Stage], known: Iterable[str] = ()) -> None:
    """Create ``out``; refuse (``ValueError``) one that holds a subfolder or a file that is neither one of
    the run's files nor in ``known`` (the other files an earlier gpu-check run may have left)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory (created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    ours = allowed_files(stages) | set(known)
    foreign = sorted(p.name for p in out.iterdir() if p.is_dir() or p.name not in ours)
    if foreign:
        raise ValueError(
            f"--out {out} holds {', '.join(foreign[:5])}, which gpu-check does not write; "
            f"give an empty or new directory"
        )


def enforce_out_dir(out: Path, stages: Sequence[Stage]) -> list[str]:
    """Remove anything in ``out`` that is not one of the run's files (a stage's stray temp file or
    folder); returns the names removed."""
    import shutil

    removed = []
    for p in sorted(out.iterdir()):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.name in allowed_files(stages):
            continue
        else:
            p.unlink()
        removed.append(p.name)
    return removed


def write_json(path: Path, data: dict) -> None:
    """Atomic: write a hidden temp file next to ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class StageContext:
    """What a stage function gets in its child process: options, deadlines and incremental result writes.

    ``result`` (a dict) and ``rows`` (a list) go to ``<out>/<name>.json`` on every :meth:`update`,
    :meth:`add_row` and :meth:`skip`. :meth:`earlier` reads the result of a stage that ran before.
    """

    def __init__(self, name: str, out: Path, deadline: float, smoke: bool, options: dict, needs=()):
        self.name, self.out, self.deadline, self.smoke, self.options = name, Path(out), deadline, smoke, options
        self.needs = {item: float(sec) for item, sec in needs}
        self.cache = triton_cache_dir()
        entries = cache_entries(self.cache)
        self.path = self.out / f"{name}.json"
        self.data = {
            "stage": name,
            "status": "running",
            "started_utc": _utc(),
            "pid": os.getpid(),
            "smoke": smoke,
            "options": options,
            "result": {},
            "rows": [],
            "skipped": [],
            "triton_cache": {"dir": str(self.cache), "entries_at_start": entries, "entries_now": entries},
        }
        self.save()

    def time_left(self) -> float:
        return self.deadline - time.time()

    def expired(self) -> bool:
        return self.time_left() <= 0

    def save(self) -> None:
        kernels = sys.modules.get("imf_kernels")  # the kernel configs this stage ran, once it used them
        if kernels is not None:
            self.data["kernel_configs"] = kernels.tuned_configs()
        self.data["triton_cache"]["entries_now"] = cache_entries(self.cache)  # less at start: compiles so far
        write_json(self.path, self.data)

    def update(self, **result) -> None:
        self.data["result"].update(result)
        self.save()

    def add_row(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()

    def begin(self, item: str, need_s: float | None = None) -> bool:
        """True if ``item`` fits in the time left (``need_s``, else its entry in the stage's needs, else 0);
        otherwise records it as left out, with both numbers, and returns False."""
        need = self.needs.get(item, 0.0) if need_s is None else need_s
        left = self.time_left()
        if left > 0 and left >= need:
            return True
        self.skip(item, f"needs {need:.0f} s (cold compile + first timing), {max(left, 0.0):.0f} s left")
        return False

    def skip(self, item: str, reason: str = "time box reached") -> None:
        """Record an item the stage did not run."""
        self.data["skipped"].append({"item": item, "reason": reason})
        self.save()

    def earlier(self, name: str) -> dict:
        path = self.out / f"{name}.json"
        return json.loads(path.read_text()).get("result", {}) if path.exists() else {}


def triton_cache_dir() -> Path:
    """Where Triton caches compiled kernels: ``TRITON_CACHE_DIR``, else its default ``~/.triton/cache``."""
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def cache_entries(cache: Path) -> int:
    """Entries of the Triton cache (one folder per compiled kernel or launcher): the difference over a
    stage is how many compiles it made, the cache misses of a cold machine."""
    return sum(1 for _ in cache.iterdir()) if cache.is_dir() else 0


def child_main(argv: Sequence[str]) -> int:
    """Entry of the child process: ``argv[0]`` is the JSON spec the parent wrote (see :func:`run_stage`)."""
    spec = json.loads(argv[0])
    signal.alarm(int(spec["hard_s"] + 2 * KILL_GRACE_S) + 1)  # backstop if the parent is gone
    ctx = StageContext(
        spec["stage"], Path(spec["out"]), spec["deadline"], spec["smoke"], spec["options"], spec["needs"]
    )
    module, _, function = spec["target"].partition(":")
    try:
        getattr(importlib.import_module(module), function)(ctx)
    except BaseException as err:
        import traceback

        ctx.data.update(
            status="failed", error=f"{type(err).__name__}: {err}"[:500], traceback=traceback.format_exc()[-3000:]
        )
        ctx.save()
        raise
    ctx.data["status"] = "done"
    ctx.save()
    return 0


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (its own session), SIGKILL it if still there after the grace."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _reserve(box: float) -> float:
    """How much before the hard limit the child's soft deadline lies: time to write and exit."""
    return min(10.0, max(1.0, 0.1 * box), 0.5 * box)


def run_stage(stage: Stage, out: Path, box: float, *, smoke: bool, env: dict[str, str]) -> dict:
    """Run ``stage`` in a child for at most ``box`` seconds; returns its run record (status, wall_s, ...)."""
    spec = {
        "stage": stage.name,
        "target": stage.target,
        "out": str(out),
        "hard_s": box,
        "smoke": smoke,
        "deadline": time.time() + box - _reserve(box),
        "options": stage.options,
        "needs": [list(n) for n in stage.needs],
    }
    child_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "bench.gpu_check_runner", json.dumps(spec)]
    t0 = time.monotonic()
    record = {"stage": stage.name, "box_s": round(box, 1), "started_utc": _utc()}
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=box)
            record["status"] = "done" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _end_group(proc)
            record["status"] = "cut"
        except BaseException:  # Ctrl-C or SIGTERM of the parent: take the child down too
            _end_group(proc)
            record["status"] = "interrupted"
            raise
        finally:
            record.update(wall_s=round(time.monotonic() - t0, 2), returncode=proc.returncode)
            err.seek(0)
            tail = err.read()[-2000:]
            if record.get("status") != "done":
                record["stderr_tail"] = tail
            _finish_stage_file(out / f"{stage.name}.json", stage, record)
    return record


def _finish_stage_file(path: Path, stage: Stage, record: dict) -> None:
    """Write the parent's verdict on the child (done / cut / failed) into the stage's own file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # the child died before its first write
        data = {"stage": stage.name, "result": {}, "rows": [], "skipped": []}
    if data.get("status") == "failed" and record["status"] == "done":
        record["status"] = "failed"
    data["status"] = record["status"]
    data["run"] = {k: v for k, v in record.items() if k != "stage"}
    write_json(path, data)


def load_stage(out: Path, name: str) -> dict:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_stages(
    stages: Sequence[Stage],
    out: Path,
    *,
    budget_s: float,
    smoke: bool,
    env: dict[str, str],
    report: Callable[[dict], tuple[dict, str]],
    known: Iterable[str] = (),
    log: Callable[[str], None] = print,
) -> dict:
    """Run ``stages`` in order within ``budget_s``; before the first and after each, write
    :data:`SUMMARY_JSON` (the run state plus what ``report(state)`` adds) and :data:`REPORT_MD` (its
    markdown). Returns the final state. What an earlier run left in ``out`` (its files, or ``known``
    names) is removed first. SIGTERM is turned into ``KeyboardInterrupt`` meanwhile, so the running
    child is ended with the run."""
    check_plan(stages)
    out = Path(out)
    prepare_out_dir(out, stages, known)
    t0 = time.monotonic()
    state = {
        "tool": "gpu-check",
        "smoke": smoke,
        "budget_s": budget_s,
        "started_utc": _utc(),
        "plan": plan_rows(stages),
        "plan_total_s": plan_total(stages),
        "env_vars": env,
        "stages": {},
        "removed": [],
    }

    def write() -> None:
        state["removed"] += enforce_out_dir(out, stages)
        state["stages"] = {s.name: load_stage(out, s.name) for s in stages}
        state["elapsed_s"] = round(time.monotonic() - t0, 2)
        extra, markdown = report(state)
        write_json(out / SUMMARY_JSON, {**state, **extra})
        (out / REPORT_MD).write_text(markdown)

    for p in out.iterdir():  # prepare_out_dir checked that each is a file of an earlier run
        p.unlink()
    write()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for i, (stage, end) in enumerate(zip(stages, plan_ends(stages), strict=True), 1):
            tag = f"[gpu-check {i}/{len(stages)}] {stage.name}"
            elapsed = time.monotonic() - t0
            left = budget_s - elapsed - RUNNER_OVERHEAD_S - KILL_GRACE_S
            box = min(end - KILL_GRACE_S - elapsed, left)  # its box plus what the stages before it left
            if box < stage.min_s:
                reason = (
                    f"needs {stage.min_s:.0f} s to yield a first result, {max(box, 0.0):.0f} s left "
                    f"({max(left, 0.0):.0f} s of --budget-s {budget_s:g})"
                )
                write_json(
                    out / f"{stage.name}.json",
                    {
                        "stage": stage.name,
                        "status": "not run",
                        "reason": reason,
                        "result": {},
                        "rows": [],
                        "skipped": [],
                    },
                )
                log(f"{tag}: not run, {reason}")
                write()
                continue
            log(f"{tag}: {stage.title} (box {stage.box_s:g} s + {box - stage.box_s:+.0f} s carried = {box:.0f} s)")
            try:
                record = run_stage(stage, out, box, smoke=smoke, env=env)
            finally:
                write()
            log(f"{tag}: {record['status']} in {record['wall_s']:.1f} s")
            if record["status"] != "done" and record.get("stderr_tail"):
                log("  " + "\n  ".join(record["stderr_tail"].strip().splitlines()[-8:]))
    finally:
        signal.signal(signal.SIGTERM, previous)
    return state


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
