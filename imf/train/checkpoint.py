"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): atomic save, recovery, resolution, load.

Layout under the checkpoint root::

    step_000001000/   .metadata, __<rank>_0.distcp   DCP: the trainer's sharded state (model, optimizer, EMAs)
                      train_state_rank<r>.pt          per rank: the trainer's ``rank`` entry (step, scheduler,
                                                      counters, RNG states, data loader position)
                      meta.json                       step, world size, EMA decays, model + run config,
                                                      size and sha256 of every file (checked on resume)
    latest            the name of the newest complete step directory
    superseded/<UTC time>/step_...   checkpoints newer than the step a run resumed from (moved, never deleted)

What is saved is :meth:`imf.train.trainer.Trainer.state_dict`: its ``rank`` entry goes to the per-rank file,
everything else through DCP (so FSDP2-sharded and plain modules store the same keys, and the weights load
across world sizes; exact resumption needs the world size it was written with).

**Atomic and idempotent.** Every rank writes into ``.tmp-step_...``; after a barrier rank 0 writes
``meta.json`` (fsync), renames the directory to its final name, then replaces ``latest`` (write + fsync +
``os.replace``). A crash at any point leaves every visible ``step_*`` directory complete. :func:`recover`
(rank 0, at the start of every run) removes partial ``.tmp-*`` directories and re-points ``latest`` at the
newest complete directory when a crash came between the rename and the pointer write (or the pointer is
unreadable). A save that finds its target step already present (from a run that got further) moves that
one aside first. Only the newest ``keep_last`` step directories are kept. The root must be on a file
system all ranks share (multi-node: a shared mount).

**Resuming from an earlier step** (``--resume root/step_...``) is supported: :func:`supersede` moves the
newer step directories into ``superseded/<UTC time>/`` (and ``latest`` back to the resumed one), so the
resumed run can save the same step numbers again; nothing is deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from imf import dist
from imf.cli import UserError
from imf.config import network_differences

LATEST = "latest"
META = "meta.json"
PREFIX = "step_"
RANK_ENTRY = "rank"  # the key of a trainer state's per-rank (not sharded) part
SUPERSEDED = "superseded"


class CheckpointError(UserError):
    """A missing, incomplete or unreadable checkpoint, or one that does not fit the run."""

    exit_code = 4


def _dcp(fn, state: dict, path: Path) -> None:
    """``dcp.save``/``dcp.load`` of ``state`` at ``path``; in one process without a process group, quietly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        fn(state, checkpoint_id=path, no_dist=not dist.is_distributed())


def rank_file(rank: int) -> str:
    return f"train_state_rank{rank}.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def file_digests(path: Path) -> dict[str, dict]:
    """``{name: {"bytes", "sha256"}}`` of every file in checkpoint directory ``path`` except ``meta.json``."""
    out = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name != META:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            out[f.name] = {"bytes": f.stat().st_size, "sha256": h.hexdigest()}
    return out


def verify(path: Path, meta: dict) -> str | None:
    """None when every file ``meta["files"]`` lists is present with its size and hash, else what is wrong."""
    expected = meta.get("files")
    if expected is None:  # written before the digests existed
        return None
    found = file_digests(path)
    for name, want in expected.items():
        got = found.get(name)
        if got is None:
            return f"{name} is missing"
        if got["bytes"] != want["bytes"]:
            return f"{name} has {got['bytes']} bytes, {want['bytes']} were written (truncated?)"
        if got["sha256"] != want["sha256"]:
            return f"{name} does not match its sha256 (corrupted)"
    return None


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def step_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root`` (visible ``step_*`` ones with ``meta.json``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted((p for p in found if (p / META).is_file()), key=step_of)


def latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer} cannot be read ({e}); pass --resume with a step directory") from None
    target = Path(root) / name
    if not name.startswith(PREFIX) or "/" in name or not (target / META).is_file():
        raise CheckpointError(
            f"{pointer} names {name[:60]!r}, which is missing or incomplete; pass --resume with "
            f"one of {[p.name for p in step_dirs(root)][-3:] or 'no checkpoints'}"
        )
    return target


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step directory from what a user may pass as a checkpoint: the step directory itself, a ``latest``
    pointer file, or a checkpoint root holding one. Raises :class:`CheckpointError` naming ``path``."""
    p = Path(path)
    if p.is_file():
        if p.name != LATEST:
            raise CheckpointError(f"checkpoint {p} is a file, not a checkpoint directory or a {LATEST!r} pointer")
        return latest(p.parent)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if (p / META).is_file() or p.name.startswith(PREFIX) or p.name.startswith(f".tmp-{PREFIX}"):
        return p
    if (p / LATEST).exists():
        return latest(p)
    raise CheckpointError(
        f"{p} is not a checkpoint: no {META} and no {LATEST!r} pointer (expected a step_... "
        "directory, a checkpoint root or its 'latest' file)"
    )


def recover(root: str | os.PathLike) -> list[str]:
    """Rank 0 before a run: drop partial saves and repair a stale/unreadable ``latest``; returns what was done."""
    root, done = Path(root), []
    if not root.is_dir():
        return done
    for stale in sorted(root.glob(".tmp-*")):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        done.append(f"removed the partial save {stale.name}")
    complete = step_dirs(root)
    try:
        current = latest(root)
    except CheckpointError:
        current = None
    if complete and (current is None or step_of(current) < step_of(complete[-1])):
        atomic_write(root / LATEST, complete[-1].name)
        done.append(f"pointed {LATEST} at {complete[-1].name} (was {current.name if current else 'unusable'})")
    return done


def _move_aside(paths: list[Path], root: Path) -> Path:
    dest = root / SUPERSEDED / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        os.replace(p, dest / p.name)
    _fsync_dir(root)
    return dest


def supersede(root: str | os.PathLike, step: int) -> tuple[list[str], Path | None]:
    """Rank 0 when resuming from ``step``: move the newer step directories of ``root`` aside and point
    ``latest`` at ``step``'s. Returns the moved names and where they went."""
    root = Path(root)
    newer = [p for p in step_dirs(root) if step_of(p) > step]
    if not newer:
        return [], None
    dest = _move_aside(newer, root)
    own = root / f"{PREFIX}{step:09d}"
    if (own / META).is_file():
        atomic_write(root / LATEST, own.name)
    elif (root / LATEST).exists():
        (root / LATEST).unlink()
    return [p.name for p in newer], dest


def save(root: str | os.PathLike, step: int, state: dict, *, meta: dict, keep_last: int) -> Path:
    """Write ``state`` (a trainer's ``state_dict()``) as checkpoint ``step``; collective. Returns its directory."""
    rank, world = dist.rank_world()
    root = Path(root)
    final = root / f"{PREFIX}{step:09d}"
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        if final.exists():  # from a run that got further than this one: keep it, out of the way
            _move_aside([final], root)
        tmp.mkdir()
    dist.barrier()
    sharded = {k: v for k, v in state.items() if k != RANK_ENTRY}
    _dcp(dcp.save, sharded, tmp)
    torch.save(state[RANK_ENTRY], tmp / rank_file(rank))
    dist.barrier()
    if rank == 0:
        meta = dict(meta, step=step, world_size=world, files=file_digests(tmp))
        atomic_write(tmp / META, json.dumps(meta, indent=1))
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write(root / LATEST, final.name)
        for old in step_dirs(root)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {META} (an interrupted save?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {META} is corrupt ({e})") from None
    missing = [k for k in ("step", "world_size", "ema_decays", "model_config", "config") if k not in meta]
    if not isinstance(meta, dict) or missing:
        raise CheckpointError(f"checkpoint {path}: {META} is corrupt (missing {missing or 'everything'})")
    return meta


def cause(e: BaseException) -> str:
    """The root cause of a DCP / torch.load failure as one line (DCP embeds every rank's traceback)."""
    failures = getattr(e, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    while e.__cause__ is not None and not str(e).strip():
        e = e.__cause__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = next((line for line in lines if "mismatch" in line.lower()), lines[-1] if lines else "")
    return f"{type(e).__name__}: {text}"[:400]


def read_sharded(path: Path, template: dict) -> None:
    """DCP-load ``template`` (a state dict of tensors) in place from checkpoint ``path``; one-line errors."""
    try:
        _dcp(dcp.load, template, path)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"checkpoint {path} cannot be read ({cause(e)})") from e


def load(path: str | os.PathLike, trainer) -> None:
    """Restore ``trainer`` (model, optimizer, EMAs, counters, RNG, data position) from ``path``; collective."""
    rank, world = dist.rank_world()
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    if meta["world_size"] != world:
        raise CheckpointError(
            f"checkpoint {path} was written by {meta['world_size']} ranks; exact resumption "
            f"(RNG, data position) needs the same world size, this run has {world}"
        )
    if sorted(meta["ema_decays"]) != sorted(trainer.ema.decays):
        raise CheckpointError(
            f"checkpoint {path} has EMA decays {meta['ema_decays']}, the run {list(trainer.ema.decays)}"
        )
    diff = network_differences(meta["model_config"], trainer.meta()["model_config"])
    if diff:
        raise CheckpointError(f"checkpoint {path} is of another model: {', '.join(diff[:4])}")
    rank_path = path / rank_file(rank)
    if not (path / ".metadata").is_file() or not rank_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: missing .metadata or {rank_path.name}")
    problem = [verify(path, meta) if rank == 0 else None]
    if dist.is_distributed():
        torch.distributed.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        earlier = [p.name for p in step_dirs(path.parent) if step_of(p) < meta["step"]][-1:]
        hint = f"; resume from an earlier one with --resume {path.parent / earlier[0]}" if earlier else ""
        raise CheckpointError(f"checkpoint {path} is damaged: {problem[0]}{hint}")
    state = trainer.state_dict()
    state.pop(RANK_ENTRY)
    read_sharded(path, state)
    try:
        state[RANK_ENTRY] = torch.load(rank_path, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: {rank_path.name} cannot be read ({cause(e)})") from e
    try:
        trainer.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this run ({cause(e)})") from e


__all__ = [
    "CheckpointError",
    "LATEST",
    "META",
    "RANK_ENTRY",
    "atomic_write",
    "latest",
    "load",
    "read_meta",
    "read_sharded",
    "recover",
    "resolve_checkpoint",
    "save",
    "step_dirs",
    "supersede",
]
