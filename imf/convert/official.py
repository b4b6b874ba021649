"""``from_official`` / ``to_official``: official iMF and MF weights to our models and back."""

from __future__ import annotations

import torch

from imf.config import PRESETS, ModelConfig
from imf.convert import imf_layout, mf_layout
from imf.convert.errors import ConvertError
from imf.convert.flax_tree import torch_layout

MF_MARKERS = ("t_embedder.", "blocks.", "final_layer.")
IMF_MARKERS = ("shared_blocks.", "u_heads.", "u_final_layer.", "omega_embedder.", "class_tokens")
SHAPE_FIELDS = ("dim", "depth", "heads", "head_depth", "patch_size", "in_channels", "num_classes", "hidden")


def canonical(state: dict) -> dict[str, torch.Tensor]:
    """Official weights in the torch-style dotted layout without ``net.``: a torch state dict (with or without
    ``net.``) as is, a flax parameter tree (nested, or flattened with ``/``) through :func:`torch_layout`."""
    if not isinstance(state, dict) or not state:
        raise ConvertError(f"expected a non-empty state dict, got {type(state).__name__}")
    nested = any(isinstance(v, dict) for v in state.values())
    if nested or any("/" in str(k) for k in state):
        state = torch_layout(state)
        state = {k.removeprefix("params."): v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConvertError(f"{bad[0]!r} holds a {type(state[bad[0]]).__name__}, not a tensor (not a state dict)")
    if all(k.startswith("net.") for k in state):
        state = {k[len("net.") :]: v for k, v in state.items()}
    return state


def official_arch(sd: dict) -> str | None:
    """``"imf"`` or ``"mf"`` by the official top-level names of ``sd`` (canonical form), else None."""
    if any(k.startswith(IMF_MARKERS) for k in sd):
        return "imf"
    if any(k.startswith(MF_MARKERS) for k in sd):
        return "mf"
    return None


def from_official(state_dict: dict, *, arch: str = "imf", preset: str | None = None, **config_overrides):
    """Official weights -> ``(ModelConfig, our state dict)``.

    ``state_dict``: the official PyTorch layout (with or without ``net.``; training form with ``v_heads`` or eval
    form without, which gives ``v_head="boundary"``), or a flax parameter tree (iMF, or MF with ``arch="mf"``).
    The config is read off the shapes (any size); ``preset`` names the preset the weights must match (and
    supplies what weights cannot tell); ``config_overrides`` set such fields directly (``input_size``, MF
    ``heads``, ...). Raises :class:`ConvertError` for weights that do not fit."""
    if arch not in ("imf", "mf"):
        raise ConvertError(f"arch must be 'imf' or 'mf', got {arch!r}")
    sd = canonical(state_dict)
    found = official_arch(sd)
    if found is not None and found != arch:
        names = {"imf": "iMF (in-context transformer)", "mf": "MeanFlow (MF, adaLN DiT)"}
        raise ConvertError(f"these are {names[found]} weights, read as arch={arch!r}; use arch={found!r}")
    base = None
    if preset is not None:
        if preset not in PRESETS:
            raise ConvertError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        base = PRESETS[preset]
        if base.arch != arch:
            raise ConvertError(f"preset {preset!r} is arch {base.arch!r}, the weights are {arch!r}")
    layout = imf_layout if arch == "imf" else mf_layout
    cfg = layout.infer_config(sd, base, **config_overrides)
    if base is not None:
        diff = [
            f"{f} {getattr(cfg, f)} (weights) vs {getattr(base, f)}"
            for f in SHAPE_FIELDS
            if getattr(cfg, f) != getattr(base, f)
        ]
        if diff:
            raise ConvertError(f"the weights are not preset {preset!r}: {', '.join(diff[:4])}")
    if arch == "imf":
        imf_layout.check_shapes(sd, cfg, eval_form=cfg.v_head == "boundary")
    else:
        mf_layout.check_shapes(sd, cfg)
    return cfg, layout.to_ours(sd, cfg)


def to_official(model, *, training_form: bool = False) -> dict[str, torch.Tensor]:
    """Our iMF model (or its ``(cfg, state dict)``) -> the official PyTorch state dict with the ``net.`` prefix.

    Default: the eval form, which ``iMeanFlow(model_str)`` of the official torch branch loads with
    ``strict=True``; ``training_form=True`` adds ``v_heads`` (``imfDiT(eval_mode=False)``)."""
    cfg, sd = model if isinstance(model, tuple) else (model.cfg, model.state_dict())
    if not isinstance(cfg, ModelConfig) or cfg.arch != "imf":
        raise ConvertError("to_official writes the official iMF layout; this is not an iMF model")
    return imf_layout.from_ours(sd, cfg, training_form=training_form)


__all__ = ["canonical", "from_official", "official_arch", "to_official"]
