"""The official MeanFlow (MF) DiT parameter layout (``Gsunshine/meanflow``, ``models/models_dit.py``) and its
mapping onto :class:`imf.model.dit.MFDiT`.

MF was released only as a flax checkpoint; :mod:`imf.convert.flax_tree` gives its parameters torch-style
dotted names and layouts (``kernel`` -> transposed ``weight``, ``layers_<i>`` of an ``nn.Sequential`` ->
``<i>``), relative to ``net.``::

    x_embedder.proj.{weight (D, C, p, p), bias}
    {t,h}_embedder.mlp.{0,2}._flax_linear.{weight, bias}
    y_embedder.embedding_table._flax_embedding.weight         (num_classes + 1, D)
    blocks.<i>.attn.qkv / attn.proj / mlp.fc1 / mlp.fc2 / adaLN_modulation.1  ._flax_linear.{weight, bias}
    final_layer.linear / final_layer.adaLN_modulation.1       ._flax_linear.{weight, bias}

Same function as ours: ``c = emb(t) + emb(h) + emb(y)``, each adaLN projection applied to ``silu(c)`` (ours
applies the SiLU once and shares it), the fused ``qkv`` in the same ``(3, heads, head_dim)`` order, tanh-GELU
MLP, fixed 2-D sin-cos positions (not stored). The number of heads is not in the weights (``qkv`` has no
per-head structure): it comes from a preset, an override, or the DiT family's width -> heads table.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from imf.config import ModelConfig
from imf.convert.errors import ConvertError

LIN = "._flax_linear"
PATCH = "x_embedder.proj.weight"
LABELS = "y_embedder.embedding_table._flax_embedding.weight"
DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT-S/B/L(M)/XL widths (models_dit.py configs)
BLOCK = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2", "adaLN_modulation.1": "ada"}
TOP = {"final_layer.linear": "final", "final_layer.adaLN_modulation.1": "final_ada"}
for _e in ("t", "h"):
    TOP[f"{_e}_embedder.mlp.0"], TOP[f"{_e}_embedder.mlp.2"] = f"{_e}_embed.fc1", f"{_e}_embed.fc2"


def _depth(sd: dict) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def official_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, p, c = cfg.dim, cfg.patch_size, cfg.in_channels
    shapes = {PATCH: (d, c, p, p), "x_embedder.proj.bias": (d,), LABELS: (cfg.num_classes + 1, d)}
    sizes = {"final_layer.linear": (p * p * c, d), "final_layer.adaLN_modulation.1": (2 * d, d)}
    for e in ("t", "h"):
        sizes[f"{e}_embedder.mlp.0"], sizes[f"{e}_embedder.mlp.2"] = (d, cfg.freq_dim), (d, d)
    block = {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (cfg.hidden, d), "mlp.fc2": (d, cfg.hidden)}
    block["adaLN_modulation.1"] = (6 * d, d)
    for i in range(cfg.depth):
        sizes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    for k, (o, i) in sizes.items():
        shapes[f"{k}{LIN}.weight"], shapes[f"{k}{LIN}.bias"] = (o, i), (o,)
    return shapes


def infer_config(sd: dict, base: ModelConfig | None = None, **overrides) -> ModelConfig:
    """The MF :class:`ModelConfig` of official weights ``sd`` (dotted, no ``net.``); ``heads`` from ``base``/
    ``overrides`` or :data:`DIT_HEADS`, ``input_size`` from ``base``/``overrides`` (default 32)."""
    need = [PATCH, LABELS, f"t_embedder.mlp.0{LIN}.weight", f"blocks.0.mlp.fc1{LIN}.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ConvertError(f"missing official MF keys {missing}")
    d, c, p, _ = sd[PATCH].shape
    found = dict(
        arch="mf",
        dim=d,
        in_channels=c,
        patch_size=p,
        depth=_depth(sd),
        num_classes=sd[LABELS].shape[0] - 1,
        freq_dim=sd[f"t_embedder.mlp.0{LIN}.weight"].shape[1],
    )
    hidden = sd[f"blocks.0.mlp.fc1{LIN}.weight"].shape[0]
    found["mlp_hidden"] = None if hidden == 4 * d else hidden
    if "heads" not in overrides and (base is None or base.arch != "mf"):
        if d not in DIT_HEADS:
            raise ConvertError(f"MF weights of width {d}: the number of heads is not in the weights; pass heads=")
        found["heads"] = DIT_HEADS[d]
    found.update(overrides)
    try:
        return dataclasses.replace(base or ModelConfig(), **found).validate()
    except (TypeError, ValueError) as e:
        raise ConvertError(f"the weights give no valid model config ({e})") from None


def check_shapes(sd: dict, cfg: ModelConfig) -> None:
    want = official_shapes(cfg)
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing:
        raise ConvertError(f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''} (of {len(want)} expected)")
    if extra:
        raise ConvertError(f"unexpected keys {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise ConvertError(f"{k} has shape {tuple(sd[k].shape)}, expected {shape}")


def to_ours(sd: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Official MF weights (dotted, no ``net.``, shapes checked) -> our ``MFDiT`` state dict, fp32."""
    g = lambda k: sd[k].detach().to(torch.float32)
    out = {
        "patch_embed.weight": g(PATCH).permute(0, 2, 3, 1).reshape(cfg.dim, -1),
        "patch_embed.bias": g("x_embedder.proj.bias"),
    }
    out["class_embed.weight"] = g(LABELS)
    names = dict(TOP)
    for i in range(cfg.depth):
        names.update({f"blocks.{i}.{k}": f"blocks.{i}.{v}" for k, v in BLOCK.items()})
    for theirs, ours in names.items():
        out[f"{ours}.weight"], out[f"{ours}.bias"] = g(f"{theirs}{LIN}.weight"), g(f"{theirs}{LIN}.bias")
    return out


__all__ = ["DIT_HEADS", "check_shapes", "infer_config", "official_shapes", "to_ours"]
