"""Compact re-implementations of the official models' forward passes, written from the official code's facts
(``Lyy-iiis/imeanflow`` branch ``torch``: ``models/imfDiT.py``, ``models/embedder.py``, ``models/torch_models.py``,
``imf.py``; ``Gsunshine/meanflow``: ``models/models_dit.py``, ``models/timm_models.py``), independent of
:mod:`imf.model` and :mod:`imf.convert`: official parameter names and layouts (separate q/k/v, Conv2d patch
embedding, unpadded SwiGLU, interleaved RoPE; flax kernels ``(in, out)`` and NHWC images for MF).
Also random official-layout weights built from the documented key names and shapes."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- iMF (official PyTorch port)


def imf_official_weights(
    gen,
    *,
    dim,
    heads,
    depth,
    head_depth,
    hidden,
    patch,
    channels,
    classes,
    tokens,
    freq=256,
    v_heads=True,
    dtype=torch.float64,
):
    """Random weights under the official ``iMeanFlow`` keys (``net.`` prefix). ``tokens``: counts of
    (class, omega (cfg), interval, time) tokens; t_min and t_max share the interval count."""
    n_class, n_cfg, n_int, n_time = tokens
    hd = dim // heads
    r = lambda *s, scale=0.3: torch.randn(*s, generator=gen, dtype=dtype) * scale
    w = {"x_embedder.proj.weight": r(dim, channels, patch, patch), "x_embedder.proj.bias": r(dim)}
    for e in ("h_embedder", "omega_embedder", "cfg_t_start_embedder", "cfg_t_end_embedder"):
        w[f"{e}.mlp.0._flax_linear.weight"], w[f"{e}.mlp.0._flax_linear.bias"] = r(dim, freq, scale=0.1), r(dim)
        w[f"{e}.mlp.2._flax_linear.weight"], w[f"{e}.mlp.2._flax_linear.bias"] = r(dim, dim, scale=0.2), r(dim)
    w["y_embedder.embedding_table._flax_embedding.weight"] = r(classes + 1, dim)
    w["time_tokens"], w["class_tokens"], w["omega_tokens"] = r(n_time, dim), r(n_class, dim), r(n_cfg, dim)
    w["t_min_tokens"], w["t_max_tokens"] = r(n_int, dim), r(n_int, dim)
    stacks = {"shared_blocks": depth - head_depth, "u_heads": head_depth, "v_heads": head_depth if v_heads else 0}
    for stack, n in stacks.items():
        for i in range(n):
            b = f"{stack}.{i}."
            w[b + "norm1.weight"], w[b + "norm2.weight"] = 1 + r(dim), 1 + r(dim)
            for p in ("q", "k", "v", "out"):
                w[f"{b}attn.{p}_proj._flax_linear.weight"] = r(dim, dim, scale=1 / math.sqrt(dim))
            w[b + "attn.q_norm.weight"], w[b + "attn.k_norm.weight"] = 1 + r(hd), 1 + r(hd)
            w[b + "mlp.w1._flax_linear.weight"] = r(hidden, dim, scale=1 / math.sqrt(dim))
            w[b + "mlp.w3._flax_linear.weight"] = r(hidden, dim, scale=1 / math.sqrt(dim))
            w[b + "mlp.w2._flax_linear.weight"] = r(dim, hidden, scale=1 / math.sqrt(hidden))
            w[b + "attn_scale"], w[b + "mlp_scale"] = r(dim), r(dim)
    for f in ("u_final_layer", "v_final_layer"):
        w[f + ".norm.weight"] = 1 + r(dim)
        w[f + ".linear._flax_linear.weight"] = r(patch * patch * channels, dim)
        w[f + ".linear._flax_linear.bias"] = r(patch * patch * channels)
    return {f"net.{k}": v for k, v in w.items()}


def _timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half).to(t.dtype)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _interleaved_rope(x, positions_freqs):
    """Rotate channel pairs (2i, 2i+1) of ``x`` (B, L, H, D) by angle ``pos * freq_i`` (complex multiply)."""
    b, seq, h, d = x.shape
    pairs = x.reshape(b, seq, h, d // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = positions_freqs.cos()[None, :, None], positions_freqs.sin()[None, :, None]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).reshape(x.shape)


def imf_official_forward(w, x, t, h, omega, t_min, t_max, y, *, heads, patch, theta=10000.0):
    """``(u, v)`` of the official ``imfDiT.forward(x, t, h, w, t_min, t_max, y)`` with weights ``w`` (``net.``)."""
    w = {k.removeprefix("net."): v for k, v in w.items()}
    lin = lambda name, a: F.linear(a, w[f"{name}._flax_linear.weight"], w.get(f"{name}._flax_linear.bias"))
    emb = lambda name, s: lin(
        f"{name}.mlp.2",
        F.silu(lin(f"{name}.mlp.0", _timestep_embedding(s, w[f"{name}.mlp.0._flax_linear.weight"].shape[1]))),
    )
    bsz = x.shape[0]
    img = F.conv2d(x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=patch)
    img = img.permute(0, 2, 3, 1).reshape(bsz, -1, img.shape[1])
    groups = [
        w["class_tokens"] + w["y_embedder.embedding_table._flax_embedding.weight"][y][:, None],
        w["omega_tokens"] + emb("omega_embedder", 1 - 1 / omega)[:, None],
        w["t_min_tokens"] + emb("cfg_t_start_embedder", t_min)[:, None],
        w["t_max_tokens"] + emb("cfg_t_end_embedder", t_max)[:, None],
        w["time_tokens"] + emb("h_embedder", h)[:, None],
    ]
    prefix = sum(g.shape[1] for g in groups)
    seq = torch.cat(groups + [img], dim=1)
    dim = seq.shape[-1]
    hd = dim // heads
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = (torch.arange(seq.shape[1], dtype=torch.float64)[:, None] * freqs[None]).to(x.dtype)

    def block(b, s):
        a = _rms(s, w[b + "norm1.weight"])
        split = lambda p: lin(f"{b}attn.{p}_proj", a).reshape(bsz, -1, heads, hd)
        q = _interleaved_rope(_rms(split("q"), w[b + "attn.q_norm.weight"]), angles)
        k = _interleaved_rope(_rms(split("k"), w[b + "attn.k_norm.weight"]), angles)
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q / math.sqrt(hd), k), dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, split("v")).reshape(bsz, -1, dim)
        s = s + lin(f"{b}attn.out_proj", o) * w[b + "attn_scale"]
        m = _rms(s, w[b + "norm2.weight"])
        mlp = lin(f"{b}mlp.w2", F.silu(lin(f"{b}mlp.w1", m)) * lin(f"{b}mlp.w3", m))
        return s + mlp * w[b + "mlp_scale"]

    count = lambda stack: len({k.split(".")[1] for k in w if k.startswith(stack + ".")})
    for i in range(count("shared_blocks")):
        seq = block(f"shared_blocks.{i}.", seq)
    u_seq = v_seq = seq
    for i in range(count("u_heads")):
        u_seq = block(f"u_heads.{i}.", u_seq)
    for i in range(count("v_heads")):
        v_seq = block(f"v_heads.{i}.", v_seq)
    c = x.shape[1]

    def final(name, s):
        out = lin(f"{name}.linear", _rms(s[:, prefix:], w[f"{name}.norm.weight"]))
        g = math.isqrt(out.shape[1])
        out = out.reshape(bsz, g, g, patch, patch, c)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(bsz, c, g * patch, g * patch)

    return final("u_final_layer", u_seq), final("v_final_layer", v_seq)


def imf_official_generate(w, noise, y, omega, t_min, t_max, steps, **kw):
    """``iMeanFlow.generate``: ``t_k = linspace(1, 0, steps + 1)``, ``z -= (t - r) u(z, t, h = t - r, ...)``."""
    z = noise
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=noise.dtype)
    full = lambda v: torch.full((z.shape[0],), v, dtype=z.dtype)
    for i in range(steps):
        t, r = full(float(times[i])), full(float(times[i + 1]))
        u = imf_official_forward(w, z, t, t - r, full(omega), full(t_min), full(t_max), y, **kw)[0]
        z = z - (t - r)[:, None, None, None] * u
    return z


def torch_to_flax_imf(w):
    """The official torch keys as the flax parameter tree of ``Lyy-iiis/imeanflow@main`` (``params/net/...``)."""
    tree: dict = {}
    for key, v in w.items():
        parts = key.split(".")
        path, leaf = parts[:-1], parts[-1]
        out = []
        for i, p in enumerate(path):
            if p.isdigit():
                if path[i - 1] == "mlp":  # the TimestepEmbedder's nn.Sequential
                    out.append(f"layers_{p}")
                else:
                    out[-1] = f"{out[-1]}_{p}"
            else:
                out.append(p)
        if leaf == "weight" and v.dim() == 4:
            leaf, v = "kernel", v.permute(2, 3, 1, 0)
        elif leaf == "weight" and v.dim() == 2 and out[-1] == "_flax_embedding":
            leaf = "embedding"
        elif leaf == "weight":
            leaf, v = "kernel", v.t() if v.dim() == 2 else v
        node = tree.setdefault("params", {})
        for p in out:
            node = node.setdefault(p, {})
        node[leaf] = v.numpy().copy()
    return tree


# ---------------------------------------------------------------- MF (official flax model, NHWC)


def mf_official_params(gen, *, dim, depth, hidden, patch, channels, classes, freq=256):
    """Random flax parameters of ``models_dit.DiT`` under ``params/net`` (numpy, kernels ``(in, out)``)."""
    r = lambda *s, scale=0.3: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).numpy()
    dense = lambda i, o, scale=0.3: {"_flax_linear": {"kernel": r(i, o, scale=scale / math.sqrt(i) * 3), "bias": r(o)}}
    emb = lambda: {"mlp": {"layers_0": dense(freq, dim), "layers_2": dense(dim, dim)}}
    net = {
        "x_embedder": {"proj": {"kernel": r(patch, patch, channels, dim), "bias": r(dim)}},
        "t_embedder": emb(),
        "h_embedder": emb(),
        "y_embedder": {"embedding_table": {"_flax_embedding": {"embedding": r(classes + 1, dim)}}},
        "blocks": {
            f"layers_{i}": {
                "attn": {"qkv": dense(dim, 3 * dim), "proj": dense(dim, dim)},
                "mlp": {"fc1": dense(dim, hidden), "fc2": dense(hidden, dim)},
                "adaLN_modulation": {"layers_1": dense(dim, 6 * dim, scale=0.1)},
            }
            for i in range(depth)
        },
        "final_layer": {
            "linear": dense(dim, patch * patch * channels),
            "adaLN_modulation": {"layers_1": dense(dim, 2 * dim, scale=0.1)},
        },
    }
    return {"params": {"net": net}}


def _sincos_2d(dim, grid):
    """MAE's ``get_2d_sincos_pos_embed`` (numpy, as the official code)."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)


def mf_official_forward(params, x_nchw, t, h, y, *, heads, patch):
    """The official ``DiT.__call__(x, t, h, y)`` (flax layout, NHWC inside); returns NCHW."""
    p = {k: v for k, v in params["params"]["net"].items()}
    T = lambda a: torch.as_tensor(a)
    dense = lambda d, a: a @ T(d["_flax_linear"]["kernel"]) + T(d["_flax_linear"]["bias"])
    emb = lambda e, s: dense(
        e["mlp"]["layers_2"],
        F.silu(
            dense(
                e["mlp"]["layers_0"], _timestep_embedding(s, T(e["mlp"]["layers_0"]["_flax_linear"]["kernel"]).shape[0])
            )
        ),
    )
    ln = lambda a: F.layer_norm(a, a.shape[-1:], eps=1e-6)
    x = x_nchw.permute(0, 2, 3, 1)
    b, hh, ww, c = x.shape
    g = hh // patch
    k = T(p["x_embedder"]["proj"]["kernel"])
    patches = x.reshape(b, g, patch, g, patch, c).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
    s = patches @ k.reshape(-1, k.shape[-1]) + T(p["x_embedder"]["proj"]["bias"])
    dim = s.shape[-1]
    s = s + T(_sincos_2d(dim, g)).to(s.dtype)
    cond = (
        emb(p["t_embedder"], t)
        + emb(p["h_embedder"], h)
        + T(p["y_embedder"]["embedding_table"]["_flax_embedding"]["embedding"])[y]
    )
    hd = dim // heads
    for i in range(len(p["blocks"])):
        blk = p["blocks"][f"layers_{i}"]
        mods = dense(blk["adaLN_modulation"]["layers_1"], F.silu(cond)).chunk(6, dim=1)
        mod = lambda a, sh, sc: a * (1 + sc[:, None]) + sh[:, None]
        a = mod(ln(s), mods[0], mods[1])
        qkv = dense(blk["attn"]["qkv"], a).reshape(b, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax((qkv[0] * hd**-0.5) @ qkv[1].transpose(-1, -2), dim=-1)
        o = (att @ qkv[2]).transpose(1, 2).reshape(b, -1, dim)
        s = s + mods[2][:, None] * dense(blk["attn"]["proj"], o)
        m = mod(ln(s), mods[3], mods[4])
        m = dense(blk["mlp"]["fc2"], F.gelu(dense(blk["mlp"]["fc1"], m), approximate="tanh"))
        s = s + mods[5][:, None] * m
    shift, scale = dense(p["final_layer"]["adaLN_modulation"]["layers_1"], F.silu(cond)).chunk(2, dim=1)
    out = dense(p["final_layer"]["linear"], ln(s) * (1 + scale[:, None]) + shift[:, None])
    out = out.reshape(b, g, g, patch, patch, c)
    out = torch.einsum("nhwpqc->nhpwqc", out).reshape(b, g * patch, g * patch, c)
    return out.permute(0, 3, 1, 2)


# ---------------------------------------------------------------- flax msgpack files (flax.serialization format)


def flax_msgpack_bytes(tree) -> bytes:
    """``flax.serialization.msgpack_serialize`` of a nested dict of numpy arrays / scalars, written from the
    msgpack spec (maps, str, int64, float64, bin, ext type 1 = ``[shape, dtype name, bytes]`` for arrays)."""
    import struct

    def enc(v) -> bytes:
        if isinstance(v, dict):
            return b"\xdf" + struct.pack(">I", len(v)) + b"".join(enc(str(k)) + enc(x) for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return b"\xdd" + struct.pack(">I", len(v)) + b"".join(enc(x) for x in v)
        if isinstance(v, str):
            b = v.encode()
            return b"\xdb" + struct.pack(">I", len(b)) + b
        if isinstance(v, bytes):
            return b"\xc6" + struct.pack(">I", len(v)) + v
        if isinstance(v, bool):
            return b"\xc3" if v else b"\xc2"
        if isinstance(v, int):
            return b"\xd3" + struct.pack(">q", v)
        if isinstance(v, float):
            return b"\xcb" + struct.pack(">d", v)
        a = np.ascontiguousarray(v)
        payload = enc([list(a.shape), a.dtype.name, a.tobytes()])
        return b"\xc9" + struct.pack(">I", len(payload)) + b"\x01" + payload

    return enc(tree)
