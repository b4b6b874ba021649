"""The MF baseline: MeanFlow's adaLN-zero DiT conditioned on ``c = emb(t) + emb(h = t - r) + emb(y)``.

With tangents ``(dt, dr) = (1, 0)`` the condition moves along ``(dt, dh) = (1, 1)``, so both time
MLPs and every adaLN projection carry a tangent. ``velocity`` is ``u`` at ``h = 0``; ``omega``,
``t_min`` and ``t_max`` are accepted and ignored (MF's guidance is fixed at training time).
"""

from __future__ import annotations

import torch
from torch import nn

from imf.config import ModelConfig
from imf.model.base import MeanFlowNet, patchify, unpatchify
from imf.model.layers import ConditionEmbedder, DualModule, add_tangent
from imf.ops import ReferenceOps


class DiTBlock(DualModule):
    """adaLN-zero DiT block: ``x += g_a * Attn(mod(LN(x)))``, ``x += g_m * MLP(mod(LN(x)))``."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, x_t, c, c_t):
        ops = self.ops
        mod, mod_t = ops.linear(c, c_t, self.ada.weight, self.ada.bias)
        chunks = mod[:, None].chunk(6, dim=-1)
        chunks_t = mod_t[:, None].chunk(6, dim=-1) if mod_t is not None else (None,) * 6
        h, h_t = _modulate(ops, x, x_t, chunks[0], chunks_t[0], chunks[1], chunks_t[1])
        a, a_t = self._attention(h, h_t)
        x, x_t = _gated_add(x, x_t, a, a_t, chunks[2], chunks_t[2])
        h, h_t = _modulate(ops, x, x_t, chunks[3], chunks_t[3], chunks[4], chunks_t[4])
        h, h_t = ops.linear(h, h_t, self.fc1.weight, self.fc1.bias)
        h, h_t = ops.gelu_tanh(h, h_t)
        h, h_t = ops.linear(h, h_t, self.fc2.weight, self.fc2.bias)
        return _gated_add(x, x_t, h, h_t, chunks[5], chunks_t[5])

    def _attention(self, h, h_t):
        ops = self.ops
        batch, seq, dim = h.shape
        qkv, qkv_t = ops.linear(h, h_t, self.qkv.weight, self.qkv.bias)
        split = lambda t: t.view(t.shape[0], seq, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q_t = k_t = v_t = None
        if qkv_t is not None:
            q_t, k_t, v_t = split(qkv_t)
        o, o_t = ops.attention(*split(qkv), q_t, k_t, v_t)
        merge = lambda t: t.transpose(1, 2).reshape(t.shape[0], seq, dim)
        return ops.linear(merge(o), None if o_t is None else merge(o_t), self.proj.weight, self.proj.bias)


def _modulate(ops: ReferenceOps, x, x_t, shift, shift_t, scale, scale_t):
    """``LN(x) (1 + scale) + shift`` and its tangent ``LN_t (1 + scale) + LN scale_t + shift_t``."""
    h, h_t = ops.layer_norm(x, x_t, 1e-6)
    y = h * (1 + scale) + shift
    if h_t is None:
        return y, None
    n = h_t.shape[0]
    with torch.no_grad():
        return y, h_t * (1 + scale[:n]) + h[:n] * scale_t + shift_t


def _gated_add(x, x_t, f, f_t, gate, gate_t):
    """``x + gate * f`` and its tangent ``x_t + gate_t f + gate f_t``."""
    y = x + gate * f
    if f_t is None:
        return y, x_t
    n = f_t.shape[0]
    with torch.no_grad():
        return y, add_tangent(x_t, gate_t * f[:n] + gate[:n] * f_t)


class MFDiT(MeanFlowNet):
    """MeanFlow's DiT baseline (adaLN-zero); see the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)  # cfg, patch_embed
        d, p = cfg.dim, cfg.patch_size
        self.register_buffer("pos_embed", torch.empty(cfg.num_patches, d), persistent=False)
        self.t_embed = ConditionEmbedder(cfg.freq_dim, d, cfg.time_scale)
        self.h_embed = ConditionEmbedder(cfg.freq_dim, d, cfg.time_scale)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d)
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.hidden) for _ in range(cfg.depth))
        self.final_ada = nn.Linear(d, 2 * d)
        self.final = nn.Linear(d, p * p * cfg.in_channels)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place (after ``to_empty`` when built on the meta device).

        Each layer's default draw in construction order (keeps a seed's weights those of the original eager
        constructor), then Xavier-uniform linears (the fused ``qkv`` as one ``(3 dim, dim)`` matrix, as the
        official code's single ``qkv`` Dense) with zero biases, ``N(0, 0.02^2)`` class table, zero adaLN and
        final projections (adaLN-zero). ``cfg.init == "official"`` (the official MeanFlow code, docs/recipe.md)
        draws the two time-embedding MLPs (``t_embed``, ``h_embed``) ``N(0, 0.02^2)``; ``"xavier"`` keeps them
        Xavier-uniform (the engine's earlier init). The 2-D sin-cos positions and sinusoid frequencies are
        recomputed.
        """
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, ConditionEmbedder):
                m.init_buffers()
        if self.cfg.init == "official":
            for lin in (self.t_embed.fc1, self.t_embed.fc2, self.h_embed.fc1, self.h_embed.fc2):
                nn.init.normal_(lin.weight, std=0.02)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        for m in [b.ada for b in self.blocks] + [self.final_ada, self.final]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        grid = self.cfg.input_size // self.cfg.patch_size
        self.pos_embed.copy_(_sincos_2d(self.cfg.dim, grid).to(self.pos_embed.device))

    def _run(self, z, z_t, cond, head):
        ops = self.ops
        t, r = cond["t"], cond["r"]
        if head == "v":
            r = t
        n = None if z_t is None else z_t.shape[0]
        ones = None if n is None else torch.ones(n, device=z.device)
        e_t, e_t_t = self.t_embed(t, ones)
        e_h, e_h_t = self.h_embed(t - r, ones)
        c = e_t + e_h + self.class_embed(cond["y"])
        c_t = None if n is None else e_t_t + e_h_t
        c, c_t = ops.silu(c, c_t)
        p = self.cfg.patch_size
        x, x_t = ops.linear(
            patchify(z, p), None if z_t is None else patchify(z_t, p), self.patch_embed.weight, self.patch_embed.bias
        )
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x, x_t = blk(x, x_t, c, c_t)
        mod, mod_t = ops.linear(c, c_t, self.final_ada.weight, self.final_ada.bias)
        shift, scale = mod[:, None].chunk(2, dim=-1)
        shift_t, scale_t = mod_t[:, None].chunk(2, dim=-1) if mod_t is not None else (None, None)
        x, x_t = _modulate(ops, x, x_t, shift, shift_t, scale, scale_t)
        x, x_t = ops.linear(x, x_t, self.final.weight, self.final.bias)
        ch = self.cfg.in_channels
        u = unpatchify(x, p, ch)
        return u, None if x_t is None else unpatchify(x_t, p, ch), None


def _sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``(grid*grid, dim)`` as in DiT/MAE (computed on the CPU)."""
    quarter = dim // 4
    f64 = dict(dtype=torch.float64, device="cpu")
    omega = 1.0 / 10000 ** (torch.arange(quarter, **f64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, **f64), torch.arange(grid, **f64), indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        out = coord[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    emb = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(emb, (0, dim - emb.shape[1])).float()


__all__ = ["MFDiT", "DiTBlock"]
