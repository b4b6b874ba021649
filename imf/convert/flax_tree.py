"""Flax parameter trees in the official torch-style names and layouts.

Both official flax models (iMF ``Lyy-iiis/imeanflow@main``, MF ``Gsunshine/meanflow``) wrap every layer in a
``TorchLinear`` / ``TorchEmbedding`` / ``RMSNorm`` module, so a flax path maps onto the PyTorch port's key by
four rules: ``/`` -> ``.``; a list-of-modules child ``name_<i>`` -> ``name.<i>`` (``shared_blocks_3``), and an
``nn.Sequential``'s ``layers_<i>`` -> ``<i>``; ``Dense`` ``kernel`` ``(in, out)`` -> ``weight`` ``(out, in)``,
``Conv`` ``kernel`` ``(kh, kw, in, out)`` -> ``weight`` ``(out, in, kh, kw)``, ``Embed`` ``embedding`` and
``RMSNorm`` ``kernel`` (1-D) -> ``weight``. The MF model's blocks live in an ``nn.Sequential``, so ``blocks/
layers_3`` becomes ``blocks.3``.
"""

from __future__ import annotations

import re

import torch

LIST_CHILD = re.compile(r"^(.*[a-z])_(\d+)$")


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, torch.Tensor]:
    """``{path tuple: leaf}`` of a nested dict."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _name(part: str) -> str:
    m = LIST_CHILD.match(part)
    if m is None:
        return part
    return m.group(2) if m.group(1) == "layers" else f"{m.group(1)}.{m.group(2)}"


def torch_layout(params: dict) -> dict[str, torch.Tensor]:
    """A nested (or ``/``-flattened) flax parameter tree -> ``{dotted torch name: tensor}`` (see the module doc)."""
    if all(not isinstance(v, dict) for v in params.values()):
        flat = {tuple(k.split("/")): v for k, v in params.items()}
    else:
        flat = flatten(params)
    out = {}
    for path, leaf in flat.items():
        leaf = torch.as_tensor(leaf)
        *mods, last = path
        if last == "kernel" and leaf.dim() == 2:
            last, leaf = "weight", leaf.t()
        elif last == "kernel" and leaf.dim() == 4:
            last, leaf = "weight", leaf.permute(3, 2, 0, 1)
        elif last in ("kernel", "embedding"):
            last = "weight"
        out[".".join([_name(m) for m in mods] + [last])] = leaf.contiguous()
    return out


__all__ = ["flatten", "torch_layout"]
