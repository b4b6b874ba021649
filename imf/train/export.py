"""EMA weights out of a training checkpoint: as a model (:func:`load_ema`) or a safetensors file (``export``).

``python -m imf.train export --ckpt CKPT --out model.safetensors [--decay D]`` writes one EMA's weights as a
single safetensors file (mode 0644 under the usual umask) whose metadata holds the model config
(``imf.model_config``, JSON), the preset, the decay, the step and the run config; :func:`load_exported`
builds the model back. ``CKPT`` is a step directory, a checkpoint root or its ``latest`` file
(:func:`imf.train.checkpoint.resolve_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from imf.cli import DEBUG_HELP, ArgumentParser, check_out_file, require
from imf.config import ModelConfig
from imf.model import build_model
from imf.train.checkpoint import CheckpointError, read_meta, read_sharded, resolve_checkpoint, verify


def load_ema(
    ckpt: str | os.PathLike,
    decay: float | None = None,
    *,
    backend: str = "reference",
    device: str | torch.device = "cpu",
):
    """The model of checkpoint ``ckpt`` holding the EMA weights of ``decay`` (default: the first), in eval mode,
    and the metadata an export writes (``imf.model_config``, ``imf.preset``, ...). Single process; loaded on the
    CPU, then moved to ``device``."""
    ckpt = resolve_checkpoint(ckpt)
    meta = read_meta(ckpt)
    problem = verify(ckpt, meta)  # a truncated or altered file, named with its size or digest mismatch
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {problem}")
    decays = meta["ema_decays"]
    decay = decays[0] if decay is None else decay
    if decay not in decays:
        raise CheckpointError(f"checkpoint {ckpt} has EMA decays {decays}, not {decay}")
    model = build_model(ModelConfig(**meta["model_config"]), backend=backend)
    weights = model.state_dict()
    names = [n for n, p in model.named_parameters() if p.is_floating_point()]
    template = {"model": weights, "ema": {f"{decay}": {n: weights[n].clone() for n in names}}}
    read_sharded(ckpt, template)
    weights.update(template["ema"][f"{decay}"])
    model.load_state_dict(weights)
    metadata = {
        "format": "pt",
        "imf.model_config": json.dumps(meta["model_config"]),
        "imf.preset": str(meta["config"]["preset"]),
        "imf.ema_decay": repr(decay),
        "imf.step": str(meta["step"]),
        "imf.train_config": json.dumps(meta["config"]),
    }
    return model.to(device).eval(), metadata


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_ema(ckpt: str | os.PathLike, out: str | os.PathLike, decay: float | None = None) -> Path:
    """Write the EMA weights of ``decay`` (default: the first) from checkpoint ``ckpt`` to the safetensors
    file ``out`` (single process, CPU; atomic: a temp file renamed)."""
    out = Path(out)
    if out.is_dir():
        raise CheckpointError(f"--out {out} is a directory; give a file path such as {out / 'model.safetensors'}")
    model, metadata = load_ema(ckpt, decay)
    return write_export(model.state_dict(), out, metadata)


def write_export(weights: dict[str, torch.Tensor], out: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """``weights`` as the safetensors file ``out`` with ``metadata`` (atomic: a temp file renamed; mode 0644
    under the usual umask). ``metadata`` must hold ``imf.model_config`` for :func:`load_exported`."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, out)
    return out


def load_exported(path: str | os.PathLike, backend: str = "reference", device: str | torch.device = "cpu"):
    """The model of an exported safetensors file (config from its metadata), in eval mode."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        weights = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    if "imf.model_config" not in meta:
        raise CheckpointError(f"{path} has no imf.model_config metadata (not written by imf.train export)")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in json.loads(meta["imf.model_config"]).items() if k in fields})
    model = build_model(cfg, backend=backend)
    model.load_state_dict(weights)
    return model.to(device).eval()


def main(argv: list[str]) -> int:
    """``python -m imf.train export``: one EMA of a checkpoint to a safetensors file."""
    from imf.train.config import ConfigError

    require("safetensors", package="safetensors", purpose="imf.train export")
    p = ArgumentParser(
        error_type=ConfigError,
        prog="python -m imf.train export",
        description="write one EMA of a checkpoint to a safetensors file",
    )
    p.add_argument("--ckpt", required=True, help="a step directory, a checkpoint root or its 'latest' file")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--decay", type=float, default=None, help="EMA decay (default: the first of the run)")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = p.parse_args(argv)
    check_out_file(args.out)
    ckpt = resolve_checkpoint(args.ckpt)
    out = export_ema(ckpt, args.out, args.decay)
    print(f"wrote {out} (EMA of {ckpt})")
    return 0


__all__ = ["export_ema", "load_ema", "load_exported", "main", "write_export"]
