"""The official iMF parameter layout (``Lyy-iiis/imeanflow``) and its mapping onto :class:`IMFTransformer`.

Official names (PyTorch port, branch ``torch``, ``models/imfDiT.py``; the JAX model on ``main`` has the same
tree, see :mod:`imf.convert.flax_tree`), relative to the ``net.`` prefix of ``iMeanFlow``::

    x_embedder.proj.{weight (D, C, p, p), bias}            Conv2d patch embedding
    {h,omega,cfg_t_start,cfg_t_end}_embedder.mlp.{0,2}._flax_linear.{weight, bias}
    y_embedder.embedding_table._flax_embedding.weight       (num_classes + 1, D)
    {class,omega,t_min,t_max,time}_tokens                   (n, D)
    {shared_blocks,u_heads,v_heads}.<i>.
        norm1.weight, norm2.weight, attn_scale, mlp_scale   (D,)
        attn.{q,k,v,out}_proj._flax_linear.weight           (D, D), bias-free
        attn.{q,k}_norm.weight                              (D / heads,)
        mlp.w1/w3._flax_linear.weight (hidden, D), mlp.w2._flax_linear.weight (D, hidden)
    {u,v}_final_layer.norm.weight, {u,v}_final_layer.linear._flax_linear.{weight, bias}

The eval form (``iMeanFlow(eval=True)``, the released ``.pth`` files) has no ``v_heads`` but keeps a
``v_final_layer``. What differs from ours, per block: q, k, v are one ``qkv`` projection here; the SwiGLU
``w1``/``w3`` are the two halves of ``fc12`` (each padded with zero units to a multiple of 64, see
:class:`imf.model.layers.IMFBlock`) and ``w2`` is ``fc3``; official RoPE rotates the interleaved pairs
``(2i, 2i + 1)`` of a head, ours the pairs ``(i, i + d/2)`` (same frequencies ``theta^(-2i/d)``), so the rows
of ``Wq``, ``Wk`` and the q/k norm weights are permuted within each head by :func:`rope_permutation`
(attention only sees ``q . k``, which a common permutation leaves unchanged). The patch embedding is a
linear over ``(row, col, channel)``-ordered patch values here, a ``Conv2d`` there.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from imf.config import ModelConfig
from imf.convert.errors import ConvertError
from imf.model.layers import SWIGLU_ALIGN

EMBEDDERS = {  # official -> ours
    "h_embedder": "time_embed",
    "omega_embedder": "omega_embed",
    "cfg_t_start_embedder": "t_min_embed",
    "cfg_t_end_embedder": "t_max_embed",
}
TOKENS = {"class": "class_tokens", "omega": "omega_tokens", "t_min": "t_min_tokens", "t_max": "t_max_tokens"}
TOKENS["time"] = "time_tokens"
STACKS = {"shared_blocks": "trunk", "u_heads": "u_blocks", "v_heads": "v_blocks"}
FINALS = {"u_final_layer": "u_out", "v_final_layer": "v_out"}
PATCH = "x_embedder.proj.weight"
LABELS = "y_embedder.embedding_table._flax_embedding.weight"
LIN = "._flax_linear.weight"


def rope_permutation(head_dim: int) -> torch.Tensor:
    """``perm`` with ``ours[j] = official[perm[j]]`` for one head: ``[0, 2, 4, ..., 1, 3, 5, ...]``.

    Official channel ``2i`` (``2i + 1``) is the first (second) element of rotation pair ``i``; ours has pair
    ``i`` at ``(i, i + d/2)``."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _per_head_rows(w: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Permute the rows of ``w`` ``(heads * d, ...)`` within each ``d``-row head by ``perm``."""
    d = perm.numel()
    return w.reshape(-1, d, *w.shape[1:])[:, perm].reshape(w.shape)


def block_count(sd: dict, stack: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"{stack}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def official_shapes(cfg: ModelConfig, *, v_heads: bool, v_final: bool = True) -> dict[str, tuple[int, ...]]:
    """Every key (without ``net.``) and shape of the official model with ``cfg``'s sizes."""
    d, p, c, f = cfg.dim, cfg.patch_size, cfg.in_channels, cfg.freq_dim
    shapes: dict[str, tuple[int, ...]] = {
        PATCH: (d, c, p, p),
        "x_embedder.proj.bias": (d,),
        LABELS: (cfg.num_classes + 1, d),
    }
    for name in EMBEDDERS:
        for i, fan_in in ((0, f), (2, d)):
            shapes[f"{name}.mlp.{i}._flax_linear.weight"] = (d, fan_in)
            shapes[f"{name}.mlp.{i}._flax_linear.bias"] = (d,)
    for group, name in TOKENS.items():
        shapes[name] = (getattr(cfg, f"{group}_tokens"), d)
    counts = {"shared_blocks": cfg.trunk_depth, "u_heads": cfg.head_depth, "v_heads": cfg.head_depth if v_heads else 0}
    for stack, n in counts.items():
        for i in range(n):
            b = f"{stack}.{i}."
            for name in ("norm1.weight", "norm2.weight", "attn_scale", "mlp_scale"):
                shapes[b + name] = (d,)
            for proj in "qkv":
                shapes[f"{b}attn.{proj}_proj{LIN}"] = (d, d)
            shapes[f"{b}attn.out_proj{LIN}"] = (d, d)
            shapes[b + "attn.q_norm.weight"] = shapes[b + "attn.k_norm.weight"] = (cfg.head_dim,)
            shapes[f"{b}mlp.w1{LIN}"] = shapes[f"{b}mlp.w3{LIN}"] = (cfg.hidden, d)
            shapes[f"{b}mlp.w2{LIN}"] = (d, cfg.hidden)
    for final in FINALS if v_final else ("u_final_layer",):
        shapes[f"{final}.norm.weight"] = (d,)
        shapes[f"{final}.linear{LIN}"] = (p * p * c, d)
        shapes[f"{final}.linear._flax_linear.bias"] = (p * p * c,)
    return shapes


def infer_config(sd: dict, base: ModelConfig | None = None, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of official iMF weights ``sd`` (no ``net.`` prefix), read off the shapes.

    What the weights cannot tell (``input_size``: RoPE tables are not stored; ``rope_theta``, ``norm_eps``) comes
    from ``base`` (default ``ModelConfig()``) or ``overrides``. Eval form (no ``v_heads``) -> ``v_head="boundary"``."""
    need = [PATCH, LABELS, "h_embedder.mlp.0._flax_linear.weight", "shared_blocks.0.attn.q_norm.weight"]
    need += ["u_heads.0.mlp.w1._flax_linear.weight", *TOKENS.values()]
    missing = [k for k in need if k not in sd]
    if "shared_blocks.0.attn.q_norm.weight" in missing and "u_heads.0.attn.q_norm.weight" in sd:
        missing.remove("shared_blocks.0.attn.q_norm.weight")  # a model without trunk blocks
    if missing:
        raise ConvertError(f"missing official iMF keys {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    d, c, p, _ = sd[PATCH].shape
    head_dim = sd["u_heads.0.attn.q_norm.weight"].shape[0]
    if d % head_dim:
        raise ConvertError(f"q_norm has {head_dim} channels, which does not divide the width {d}")
    hidden = sd["u_heads.0.mlp.w1._flax_linear.weight"].shape[0]
    heads_u, heads_v = block_count(sd, "u_heads"), block_count(sd, "v_heads")
    if heads_v not in (0, heads_u):
        raise ConvertError(f"{heads_v} v_heads blocks but {heads_u} u_heads blocks (expected as many, or none)")
    found = dict(
        arch="imf",
        in_channels=c,
        patch_size=p,
        dim=d,
        heads=d // head_dim,
        depth=block_count(sd, "shared_blocks") + heads_u,
        head_depth=heads_u,
        num_classes=sd[LABELS].shape[0] - 1,
        v_head="aux" if heads_v else "boundary",
        freq_dim=sd["h_embedder.mlp.0._flax_linear.weight"].shape[1],
        **{f"{g}_tokens": sd[name].shape[0] for g, name in TOKENS.items()},
    )
    base = base or ModelConfig()
    found["mlp_hidden"] = None if dataclasses.replace(base, **found, mlp_hidden=None).hidden == hidden else hidden
    found.update(overrides)
    try:
        return dataclasses.replace(base, **found).validate()
    except (TypeError, ValueError) as e:
        raise ConvertError(f"the weights give no valid model config ({e})") from None


def check_shapes(sd: dict, cfg: ModelConfig, *, eval_form: bool) -> None:
    """Every official key of ``cfg`` present with its shape, and no other (``v_final_layer`` optional in eval form)."""
    want = official_shapes(cfg, v_heads=not eval_form)
    optional = {k for k in want if k.startswith("v_final_layer")} if eval_form else set()
    missing = sorted(set(want) - set(sd) - optional)
    extra = sorted(set(sd) - set(want))
    if missing:
        raise ConvertError(f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''} (of {len(want)} expected)")
    if extra:
        raise ConvertError(f"unexpected keys {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    for k, shape in want.items():
        if k in sd and tuple(sd[k].shape) != shape:
            raise ConvertError(f"{k} has shape {tuple(sd[k].shape)}, expected {shape} for {_describe(cfg)}")


def _describe(cfg: ModelConfig) -> str:
    return f"dim {cfg.dim}, {cfg.heads} heads, hidden {cfg.hidden}, {cfg.depth} blocks"


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])]) if rows > w.shape[0] else w


def to_ours(sd: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Official iMF weights (no ``net.`` prefix, shapes checked) -> our ``IMFTransformer`` state dict, fp32."""
    g = lambda k: sd[k].detach().to(torch.float32)
    d, perm = cfg.dim, rope_permutation(cfg.head_dim)
    padded = -(-cfg.hidden // SWIGLU_ALIGN) * SWIGLU_ALIGN
    out = {
        "patch_embed.weight": g(PATCH).permute(0, 2, 3, 1).reshape(d, -1),
        "patch_embed.bias": g("x_embedder.proj.bias"),
    }
    out["class_embed.weight"] = g(LABELS)
    for theirs, ours in EMBEDDERS.items():
        for i, fc in ((0, "fc1"), (2, "fc2")):
            out[f"{ours}.{fc}.weight"] = g(f"{theirs}.mlp.{i}._flax_linear.weight")
            out[f"{ours}.{fc}.bias"] = g(f"{theirs}.mlp.{i}._flax_linear.bias")
    for group, name in TOKENS.items():
        out[f"cond_tokens.{group}"] = g(name)
    stacks = {"shared_blocks": cfg.trunk_depth, "u_heads": cfg.head_depth}
    if cfg.v_head == "aux":
        stacks["v_heads"] = cfg.head_depth
    for stack, n in stacks.items():
        for i in range(n):
            b, o = f"{stack}.{i}.", f"{STACKS[stack]}.{i}."
            q, k = (_per_head_rows(g(f"{b}attn.{x}_proj{LIN}"), perm) for x in "qk")
            out[o + "qkv.weight"] = torch.cat([q, k, g(f"{b}attn.v_proj{LIN}")])
            out[o + "q_norm.weight"] = g(b + "attn.q_norm.weight")[perm]
            out[o + "k_norm.weight"] = g(b + "attn.k_norm.weight")[perm]
            out[o + "proj.weight"] = g(f"{b}attn.out_proj{LIN}")
            out[o + "norm1.weight"], out[o + "norm2.weight"] = g(b + "norm1.weight"), g(b + "norm2.weight")
            out[o + "gate_attn"], out[o + "gate_mlp"] = g(b + "attn_scale"), g(b + "mlp_scale")
            w1, w3, w2 = (g(f"{b}mlp.{w}{LIN}") for w in ("w1", "w3", "w2"))
            out[o + "fc12.weight"] = torch.cat([_pad_rows(w1, padded), _pad_rows(w3, padded)])
            out[o + "fc3.weight"] = _pad_rows(w2.t(), padded).t().contiguous()
    for final, ours in FINALS.items():
        if ours == "v_out" and cfg.v_head != "aux":
            continue
        out[f"{ours}.norm.weight"] = g(f"{final}.norm.weight")
        out[f"{ours}.linear.weight"] = g(f"{final}.linear{LIN}")
        out[f"{ours}.linear.bias"] = g(f"{final}.linear._flax_linear.bias")
    return out


def from_ours(sd: dict, cfg: ModelConfig, *, training_form: bool = False) -> dict[str, torch.Tensor]:
    """Our ``IMFTransformer`` state dict -> official iMF keys with the ``net.`` prefix (inverse of :func:`to_ours`).

    Eval form (default; what ``iMeanFlow`` loads): no ``v_heads``, and ``v_final_layer`` from our v-head's output
    layer, zeros without one (the eval-form official model computes but never uses its ``v``). ``training_form``:
    with ``v_heads`` (``imfDiT(eval_mode=False)``), needs ``v_head="aux"``."""
    if training_form and cfg.v_head != "aux":
        raise ConvertError("the official training form needs a model with a v-head (v_head='aux')")
    g = lambda k: sd[k].detach()
    d, p, c = cfg.dim, cfg.patch_size, cfg.in_channels
    inv = torch.argsort(rope_permutation(cfg.head_dim))
    out = {PATCH: g("patch_embed.weight").reshape(d, p, p, c).permute(0, 3, 1, 2).contiguous()}
    out["x_embedder.proj.bias"], out[LABELS] = g("patch_embed.bias"), g("class_embed.weight")
    for theirs, ours in EMBEDDERS.items():
        for i, fc in ((0, "fc1"), (2, "fc2")):
            out[f"{theirs}.mlp.{i}._flax_linear.weight"] = g(f"{ours}.{fc}.weight")
            out[f"{theirs}.mlp.{i}._flax_linear.bias"] = g(f"{ours}.{fc}.bias")
    for group, name in TOKENS.items():
        out[name] = g(f"cond_tokens.{group}")
    stacks = {"shared_blocks": cfg.trunk_depth, "u_heads": cfg.head_depth}
    if training_form:
        stacks["v_heads"] = cfg.head_depth
    h = cfg.hidden
    for stack, n in stacks.items():
        for i in range(n):
            b, o = f"{stack}.{i}.", f"{STACKS[stack]}.{i}."
            q, k, v = g(o + "qkv.weight").chunk(3)
            out[f"{b}attn.q_proj{LIN}"] = _per_head_rows(q, inv)
            out[f"{b}attn.k_proj{LIN}"] = _per_head_rows(k, inv)
            out[f"{b}attn.v_proj{LIN}"] = v.contiguous()
            out[f"{b}attn.out_proj{LIN}"] = g(o + "proj.weight")
            out[b + "attn.q_norm.weight"] = g(o + "q_norm.weight")[inv]
            out[b + "attn.k_norm.weight"] = g(o + "k_norm.weight")[inv]
            out[b + "norm1.weight"], out[b + "norm2.weight"] = g(o + "norm1.weight"), g(o + "norm2.weight")
            out[b + "attn_scale"], out[b + "mlp_scale"] = g(o + "gate_attn"), g(o + "gate_mlp")
            w1, w3 = g(o + "fc12.weight").chunk(2)
            out[f"{b}mlp.w1{LIN}"], out[f"{b}mlp.w3{LIN}"] = w1[:h].contiguous(), w3[:h].contiguous()
            out[f"{b}mlp.w2{LIN}"] = g(o + "fc3.weight")[:, :h].contiguous()
    for final, ours in FINALS.items():
        if f"{ours}.norm.weight" in sd:
            out[f"{final}.norm.weight"] = g(f"{ours}.norm.weight")
            out[f"{final}.linear{LIN}"] = g(f"{ours}.linear.weight")
            out[f"{final}.linear._flax_linear.bias"] = g(f"{ours}.linear.bias")
        else:  # eval form of a model without a v-head: the official module exists, its output is unused
            out[f"{final}.norm.weight"] = torch.ones(d)
            out[f"{final}.linear{LIN}"] = torch.zeros(p * p * c, d)
            out[f"{final}.linear._flax_linear.bias"] = torch.zeros(p * p * c)
    return {f"net.{k}": v for k, v in out.items()}


__all__ = ["check_shapes", "from_ours", "infer_config", "official_shapes", "rope_permutation", "to_ours"]
