"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP), and export of EMA weights.

Layout under the checkpoint root::

    step_000001000/   .metadata, __<rank>_0.distcp   DCP: model, optimizer, every EMA (sharded or not)
                      train_state_rank<r>.pt          per rank: step, scheduler, counters, RNG states
                                                      (torch CPU/CUDA, the rank's noise generator), data
                                                      loader position
                      meta.json                       step, world size, EMA decays, model + run config
    latest            the name of the newest complete step directory

Atomic: every rank writes into ``.tmp-step_...``; after a barrier rank 0 writes ``meta.json``, renames the
directory to its final name and then replaces ``latest`` (write + ``os.replace``). A crash at any point
leaves the previous checkpoint and ``latest`` intact; leftover ``.tmp-*`` directories are removed by the
next save. Only the newest ``keep_last`` step directories are kept. The root must be on a file system all
ranks share (multi-node: a shared mount).

Model and optimizer state go through ``get_state_dict``/``set_state_dict``
(``torch.distributed.checkpoint.state_dict``), so FSDP2-sharded and plain modules store the same keys and
a checkpoint loads across world sizes for the weights; exact resumption (RNG and data position) needs the
world size it was written with.

Export (``python -m imf.train export --ckpt DIR --out model.safetensors [--decay D]``): one EMA's weights
as a single safetensors file whose metadata holds the model config (``imf.model_config``, JSON), the
preset, the decay, the step and the run config; :func:`load_exported` builds the model back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from imf.config import ModelConfig
from imf.model import build_model

LATEST = "latest"
META = "meta.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A missing, incomplete or unreadable checkpoint."""


def _rank_world() -> tuple[int, int]:
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _dcp(fn, state: dict, path: Path) -> None:
    """``dcp.save``/``dcp.load`` of ``state`` at ``path``; in one process without a process group, quietly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        fn(state, checkpoint_id=path, no_dist=not _distributed())


def _rank_file(rank: int) -> str:
    return f"train_state_rank{rank}.pt"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    target = Path(root) / pointer.read_text().strip()
    if not (target / META).is_file():
        raise CheckpointError(f"{pointer} names {target.name!r}, which is missing or incomplete")
    return target


def save(root: str | os.PathLike, step: int, *, model, optimizer, ema, rank_state: dict, meta: dict,
         keep_last: int) -> Path:
    """Write checkpoint ``step`` (collective: every rank calls it); returns its directory."""
    rank, world = _rank_world()
    root = Path(root)
    final = root / f"{PREFIX}{step:09d}"
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        if final.exists():
            raise CheckpointError(f"checkpoint {final} already exists")
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale)
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}
    _dcp(dcp.save, state, tmp)
    torch.save(rank_state, tmp / _rank_file(rank))
    _barrier()
    if rank == 0:
        _atomic_write(tmp / META, json.dumps(dict(meta, step=step, world_size=world), indent=1))
        os.replace(tmp, final)
        _atomic_write(root / LATEST, final.name)
        for old in step_dirs(root)[:-keep_last]:
            shutil.rmtree(old)
    _barrier()
    return final


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {META} (an interrupted save?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: {META} is corrupt ({e})") from None


def load(path: str | os.PathLike, *, model, optimizer, ema) -> dict:
    """Restore model, optimizer and EMA from checkpoint ``path`` (collective); return this rank's train
    state (as given to :func:`save`)."""
    rank, world = _rank_world()
    path = Path(path)
    meta = read_meta(path)
    if meta.get("world_size") != world:
        raise CheckpointError(f"checkpoint {path} was written by {meta.get('world_size')} ranks; exact resumption "
                              f"(RNG, data position) needs the same world size, this run has {world}")
    if sorted(meta.get("ema_decays", [])) != sorted(ema.decays):
        raise CheckpointError(f"checkpoint {path} has EMA decays {meta.get('ema_decays')}, the run {list(ema.decays)}")
    rank_path = path / _rank_file(rank)
    if not (path / ".metadata").is_file() or not rank_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: missing .metadata or {rank_path.name}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}
    try:
        _dcp(dcp.load, state, path)
        rank_state = torch.load(rank_path, weights_only=True)
    except (Exception, CheckpointException) as e:  # any read/decode failure: the checkpoint is unusable
        # (DCP's CheckpointException is a BaseException)
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ema.load_state_dict(state["ema"])
    return rank_state


def load_ema(ckpt: str | os.PathLike, decay: float | None = None, *, backend: str = "reference",
             device: str | torch.device = "cpu"):
    """The model of checkpoint ``ckpt`` holding the EMA weights of ``decay`` (default: the first), in eval mode,
    and the metadata an export writes (``imf.model_config``, ``imf.preset``, ...). Single process; loaded on the
    CPU, then moved to ``device``."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    decays = meta["ema_decays"]
    decay = decays[0] if decay is None else decay
    if decay not in decays:
        raise CheckpointError(f"checkpoint {ckpt} has EMA decays {decays}, not {decay}")
    model = build_model(ModelConfig(**meta["model_config"]), backend=backend)
    weights = model.state_dict()
    names = [n for n, p in model.named_parameters() if p.is_floating_point()]
    template = {"model": weights, "ema": {f"{decay}": {n: weights[n].clone() for n in names}}}
    try:
        _dcp(dcp.load, template, ckpt)
    except (Exception, CheckpointException) as e:  # see load()
        raise CheckpointError(f"checkpoint {ckpt} cannot be read ({type(e).__name__}: {e})") from e
    weights.update(template["ema"][f"{decay}"])
    model.load_state_dict(weights)
    metadata = {"format": "pt", "imf.model_config": json.dumps(meta["model_config"]),
                "imf.preset": str(meta["config"]["preset"]), "imf.ema_decay": repr(decay),
                "imf.step": str(meta["step"]), "imf.train_config": json.dumps(meta["config"])}
    return model.to(device).eval(), metadata


def export_ema(ckpt: str | os.PathLike, out: str | os.PathLike, decay: float | None = None) -> Path:
    """Write the EMA weights of ``decay`` (default: the first) from checkpoint ``ckpt`` to one safetensors
    file ``out`` (single process, CPU)."""
    from safetensors.torch import save_file

    model, metadata = load_ema(ckpt, decay)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


def load_exported(path: str | os.PathLike, backend: str = "reference", device: str | torch.device = "cpu"):
    """The model of an exported safetensors file (config from its metadata), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "imf.model_config" not in meta:
        raise CheckpointError(f"{path} has no imf.model_config metadata (not written by imf.train export)")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in json.loads(meta["imf.model_config"]).items() if k in fields})
    model = build_model(cfg, backend=backend)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


__all__ = ["CheckpointError", "save", "load", "latest", "step_dirs", "read_meta", "load_ema", "export_ema",
           "load_exported"]
