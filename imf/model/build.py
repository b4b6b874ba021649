"""``build_model``: a preset (or config) as a network, eagerly or on the meta device.

Call order for sharded training (FSDP2, torchtitan's)::

    model = build_model(cfg, backend=..., device="meta")   # no memory, no random draws
    parallelize(model, mesh=...)                           # activation checkpointing, compile, fully_shard
    model.to_empty(device="cuda")                          # allocate (each rank only its shards)
    model.init_weights()                                   # every parameter and buffer (RoPE tables, ...)

``build_model(cfg)`` without ``device="meta"`` does the last two steps itself on ``device`` (default:
the CPU, or the ambient ``torch.device`` context), so for the same seed and device both give the same
weights. The random draws happen in ``init_weights``, in a fixed order: the weights depend only on the
generator's state when it is called.
"""

from __future__ import annotations

import dataclasses

import torch

from imf.config import ModelConfig, preset
from imf.model.base import MeanFlowNet
from imf.model.dit import MFDiT
from imf.model.transformer import IMFTransformer


def build_model(
    name_or_cfg: str | ModelConfig = "iMF-B/2",
    backend: str = "reference",
    v_head: str | None = None,
    *,
    device: str | torch.device | None = None,
    **overrides,
) -> MeanFlowNet:
    """Build a preset (or a ``ModelConfig``) on the chosen backend.

    ``v_head`` ("aux" | "boundary") and keyword ``overrides`` replace preset fields. Both backends
    build identical parameters; switch later with ``model.set_backend(...)``. ``device="meta"``:
    parameters without storage; materialise with ``model.to_empty(device=...)`` then
    ``model.init_weights()`` (see the module docstring for the order around ``fully_shard``).
    """
    if v_head is not None:
        overrides["v_head"] = v_head
    if isinstance(name_or_cfg, ModelConfig):
        cfg = dataclasses.replace(name_or_cfg, **overrides).validate()
    else:
        cfg = preset(name_or_cfg, **overrides)
    cls = IMFTransformer if cfg.arch == "imf" else MFDiT
    with torch.device("meta"):
        model = cls(cfg)
    model.set_backend(backend)
    target = torch.get_default_device() if device is None else torch.device(device)
    if target.type != "meta":
        model.to_empty(device=target)
        model.init_weights()
    return model


__all__ = ["build_model"]
