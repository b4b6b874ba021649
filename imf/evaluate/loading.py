"""The model an evaluation samples from: the EMA export of the trainer, or the EMA inside a DCP checkpoint.

``--ckpt`` accepts an exported ``.safetensors`` file (``python -m imf.train export``; its metadata holds
the model config, preset, EMA decay, step and training config), a DCP checkpoint directory
(``step_...``), a checkpoint root (the one its ``latest`` names) or the ``latest`` pointer file itself.
The path is resolved by :func:`imf.train.checkpoint.resolve_checkpoint`; a DCP checkpoint's EMA
(``--decay``, default the run's first) is loaded straight into the model (:func:`imf.train.export.load_ema`),
with no file written. A missing, truncated or mismatched file is an
:class:`EvalError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from imf.config import PRESETS
from imf.evaluate.options import EvalError
from imf.train.checkpoint import LATEST, CheckpointError, resolve_checkpoint
from imf.train.export import load_ema, load_exported


@dataclasses.dataclass
class Loaded:
    """An EMA model in eval mode and what its checkpoint says about it."""

    model: torch.nn.Module
    preset: str | None
    train_config: dict
    step: int | None
    decay: float | None
    source: str
    latent_norm: dict | None = None  # the official latent normalisation of a converted checkpoint (imf.convert)


def _metadata(meta: dict, source: str, model) -> Loaded:
    return Loaded(
        model=model,
        preset=meta.get("imf.preset"),
        train_config=json.loads(meta.get("imf.train_config", "{}")),
        step=int(meta["imf.step"]) if "imf.step" in meta else None,
        decay=float(meta["imf.ema_decay"]) if "imf.ema_decay" in meta else None,
        source=source,
        latent_norm=json.loads(meta["imf.latent_norm"]) if "imf.latent_norm" in meta else None,
    )


def _load_safetensors(path: Path, decay, backend, device) -> Loaded:
    from safetensors import safe_open

    model = load_exported(path, backend=backend, device=device)  # CheckpointError for an unreadable file
    with safe_open(str(path), framework="pt") as f:
        loaded = _metadata(f.metadata() or {}, str(path), model)
    if decay is not None and loaded.decay is not None and decay != loaded.decay:
        raise EvalError(f"--decay {decay}: {path} holds the EMA with decay {loaded.decay}")
    return loaded


def load_checkpoint(
    path, *, decay: float | None = None, backend: str = "reference", device: str | torch.device = "cpu"
) -> Loaded:
    """The EMA model of an exported safetensors file or of a DCP checkpoint, in eval mode (see the module doc)."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"--ckpt {path} does not exist")
    if path.is_file() and path.suffix != ".safetensors" and path.name != LATEST:
        raise EvalError(
            f"--ckpt {path}: expected the trainer's EMA export (.safetensors, python -m imf.train "
            "export), a DCP checkpoint directory, a checkpoint root or its 'latest' file"
        )
    try:
        if path.suffix == ".safetensors" and path.is_file():
            return _load_safetensors(path, decay, backend, device)
        step_dir = resolve_checkpoint(path)
        model, meta = load_ema(step_dir, decay, backend=backend, device=device)
    except CheckpointError as e:
        raise EvalError(f"--ckpt: {e}") from None
    except RuntimeError as e:  # load_state_dict: the weights do not fit the config in the metadata
        first = str(e).strip().splitlines()
        raise EvalError(
            f"--ckpt {path}: the weights do not match its model config ({first[0] if first else e})"
        ) from None
    return _metadata(meta, str(step_dir), model)


def check_preset(loaded: Loaded, preset: str | None) -> None:
    """``--preset`` must name the preset the checkpoint was trained as."""
    if preset is None:
        return
    if preset not in PRESETS:
        raise EvalError(f"unknown --preset {preset!r}; choose one of {sorted(PRESETS)}")
    if loaded.preset is not None and loaded.preset != preset:
        raise EvalError(f"checkpoint {loaded.source} is a {loaded.preset!r} model, not --preset {preset!r}")
    cfg, ref = loaded.model.cfg, PRESETS[preset]
    shape = ("arch", "in_channels", "input_size", "num_classes")
    if loaded.preset is None and any(getattr(cfg, f) != getattr(ref, f) for f in shape):
        raise EvalError(
            f"checkpoint {loaded.source} ({', '.join(f'{f}={getattr(cfg, f)}' for f in shape)}) does "
            f"not match --preset {preset!r} ({', '.join(f'{f}={getattr(ref, f)}' for f in shape)})"
        )


__all__ = ["Loaded", "check_preset", "load_checkpoint"]
