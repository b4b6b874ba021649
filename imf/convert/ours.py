"""Our side of a conversion: the export written from official weights, and our models read back for
``--to-official``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from imf.config import PRESETS, ModelConfig, network_differences
from imf.convert.errors import ConvertError
from imf.train.checkpoint import CheckpointError
from imf.vae import official_latent_norm


def matching_preset(cfg: ModelConfig) -> str | None:
    """The preset that is the same network as ``cfg`` but for ``v_head`` (``mlp_hidden`` compared as ``hidden``;
    the init does not count: :func:`imf.config.network_differences`)."""
    ours = dataclasses.asdict(dataclasses.replace(cfg, mlp_hidden=cfg.hidden))
    for name, p in PRESETS.items():
        theirs = dataclasses.asdict(dataclasses.replace(p, v_head=cfg.v_head, mlp_hidden=p.hidden))
        if not network_differences(theirs, ours):
            return name
    return None


def export_metadata(cfg: ModelConfig, *, source: str, fmt: str, step: int | None) -> dict[str, str]:
    """The safetensors metadata of a converted model (what ``imf.evaluate --ckpt`` reads)."""
    meta = {
        "format": "pt",
        "imf.model_config": json.dumps(dataclasses.asdict(cfg)),
        "imf.source": f"{fmt}:{source}",
        "imf.latent_norm": json.dumps(official_latent_norm()),
    }
    preset = matching_preset(cfg)
    if preset is not None:
        meta["imf.preset"] = preset
    if step is not None:
        meta["imf.step"] = str(step)
    return meta


def load_ours(path, decay: float | None = None):
    """``(cfg, state dict)`` of one of our models: an export (``.safetensors``) or the EMA of a DCP checkpoint."""
    from imf.train.export import load_ema, load_exported

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            model = load_exported(path)
        else:
            model, _ = load_ema(path, decay)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    except RuntimeError as e:
        raise ConvertError(f"{path}: the weights do not match its model config ({str(e).splitlines()[0]})") from None
    return model.cfg, {k: v.detach() for k, v in model.state_dict().items()}


def save_official(sd: dict[str, torch.Tensor], out: Path) -> Path:
    """``torch.save`` of an official state dict, atomically (temp file renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({k: v.contiguous() for k, v in sd.items()}, tmp)
    tmp.replace(out)
    return out


__all__ = ["export_metadata", "load_ours", "matching_preset", "save_official"]
