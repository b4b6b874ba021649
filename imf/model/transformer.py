"""The iMF in-context transformer (design document in docs/, section 2).

Sequence = condition tokens (B/2: 8 class, 4 omega, 2 t_min, 2 t_max, 4 time) + image tokens; each
group is a learned token set plus the embedding of its condition (omega embedded as ``1 - 1/omega``,
time as ``h = t - r``). 1-D RoPE over the whole sequence. ``trunk_depth`` shared blocks, then a
u-head and (``v_head="aux"``) a v-head of ``head_depth`` blocks each. Only the time group and the
image tokens carry a tangent (the other conditions are constant along ``(dz, dt, dr) = (z_t, 1, 0)``).
"""

from __future__ import annotations

import math

import torch
from imf_kernels.reference import rope_tables
from torch import nn

from imf.config import ModelConfig
from imf.model.base import MeanFlowNet, patchify, unpatchify
from imf.model.layers import ConditionEmbedder, IMFBlock, OutputHead, RMSNorm

# The official iMF initialisation (imfDiT in Lyy-iiis/imeanflow, branch main, models/imfDiT.py): block linears
# N(0, (weight_init_constant / sqrt(fan_in))^2) with weight_init_constant 0.32; embedders (condition MLPs, class
# table) and learned tokens with init constant 1.0 (embedding_init_constant, token_init_constant).
BLOCK_INIT_GAIN = 0.32
EMBED_INIT_GAIN = 1.0
TOKEN_INIT_GAIN = 1.0


class IMFTransformer(MeanFlowNet):
    """iMF in-context transformer with a u-head and an optional auxiliary v-head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)  # cfg, patch_embed
        d, p = cfg.dim, cfg.patch_size
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d)
        self.omega_embed = ConditionEmbedder(cfg.freq_dim, d, cfg.time_scale)
        self.t_min_embed = ConditionEmbedder(cfg.freq_dim, d, cfg.time_scale)
        self.t_max_embed = ConditionEmbedder(cfg.freq_dim, d, cfg.time_scale)
        self.time_embed = ConditionEmbedder(cfg.freq_dim, d, cfg.time_scale)
        groups = {
            "class": cfg.class_tokens,
            "omega": cfg.omega_tokens,
            "t_min": cfg.t_min_tokens,
            "t_max": cfg.t_max_tokens,
            "time": cfg.time_tokens,
        }
        # the learned token sets (state_dict ``cond_tokens.<group>``; cfg.num_cond_tokens counts them), in
        # sequence order; ParameterDict keeps its keys sorted
        self.cond_groups = tuple(groups)
        self.cond_tokens = nn.ParameterDict({k: nn.Parameter(torch.empty(n, d)) for k, n in groups.items()})
        block = lambda: IMFBlock(d, cfg.heads, cfg.hidden, cfg.norm_eps)
        self.trunk = nn.ModuleList(block() for _ in range(cfg.trunk_depth))
        self.u_blocks = nn.ModuleList(block() for _ in range(cfg.head_depth))
        self.u_out = OutputHead(d, p * p * cfg.in_channels, cfg.norm_eps)
        if cfg.v_head == "aux":
            self.v_blocks = nn.ModuleList(block() for _ in range(cfg.head_depth))
            self.v_out = OutputHead(d, p * p * cfg.in_channels, cfg.norm_eps)
        self.register_buffer("rope_cos", torch.empty(cfg.seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.seq_len, cfg.head_dim), persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place (after ``to_empty`` when built on the meta device).

        ``cfg.init == "official"`` (the official iMF training code, docs/recipe.md): the block linears
        ``W ~ N(0, (0.32 / sqrt(fan_in))^2)`` (q, k, v, out: ``fan_in = dim``; SwiGLU ``W1, W2``: ``dim``, ``W3``:
        the unpadded ``hidden``), the condition MLPs ``N(0, 1 / fan_in)`` with zero biases, the class table and
        the learned condition tokens ``N(0, 1 / dim)``, a Xavier-uniform patch embedding with zero bias, and
        zero output linears (weight and bias) and gates. ``"xavier"`` (the engine's earlier init, kept for the
        CPU demo): each layer's default draw in construction order, then Xavier-uniform linears with zero
        biases, tokens and class table ``N(0, 0.02^2)``, zero output linears and gates. Both: unit norm
        weights, zero SwiGLU padding units, and the buffers (RoPE tables, sinusoid frequencies) recomputed.
        The draws happen in a fixed order, so the weights depend only on the generator's state.
        """
        if self.cfg.init == "official":
            self._init_official()
        else:
            self._init_xavier()
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, ConditionEmbedder):
                m.init_buffers()
            elif isinstance(m, IMFBlock):
                nn.init.zeros_(m.gate_attn)
                nn.init.zeros_(m.gate_mlp)
                m.zero_padding_()
        for head in (self.u_out, getattr(self, "v_out", None)):
            if head is not None:
                nn.init.zeros_(head.linear.weight)
                nn.init.zeros_(head.linear.bias)
        cos, sin = rope_tables(
            self.cfg.seq_len, self.cfg.head_dim, theta=self.cfg.rope_theta, device=self.rope_cos.device
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def _init_official(self) -> None:
        d = self.cfg.dim
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)
        for emb in (self.omega_embed, self.t_min_embed, self.t_max_embed, self.time_embed):
            for lin in (emb.fc1, emb.fc2):
                nn.init.normal_(lin.weight, std=EMBED_INIT_GAIN / math.sqrt(lin.in_features))
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.class_embed.weight, std=EMBED_INIT_GAIN / math.sqrt(d))
        for k in self.cond_groups:
            nn.init.normal_(self.cond_tokens[k], std=TOKEN_INIT_GAIN / math.sqrt(d))
        for blk in self.modules():
            if isinstance(blk, IMFBlock):
                for lin, fan_in in ((blk.qkv, d), (blk.proj, d), (blk.fc12, d), (blk.fc3, blk.hidden)):
                    nn.init.normal_(lin.weight, std=BLOCK_INIT_GAIN / math.sqrt(fan_in))

    def _init_xavier(self) -> None:
        # each layer's default draw first, in construction order: keeps a seed's weights those of the engine's
        # original eager constructor (the demo's golden curve)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.reset_parameters()
            elif m is self.cond_tokens:
                for k in self.cond_groups:
                    m[k].copy_(torch.randn(m[k].shape, device=m[k].device) * 0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)

    @property
    def has_v_head(self) -> bool:
        return self.cfg.v_head == "aux"

    def _tokens(self, z, z_t, cond):
        """Condition + image tokens and their tangent (only the time group and the image move)."""
        n = None if z_t is None else z_t.shape[0]
        h = cond["t"] - cond["r"]
        ones = None if n is None else torch.ones(n, device=z.device, dtype=torch.float32)
        emb = {
            "class": (self.class_embed(cond["y"]), None),
            "omega": self.omega_embed(1.0 - 1.0 / cond["omega"]),
            "t_min": self.t_min_embed(cond["t_min"]),
            "t_max": self.t_max_embed(cond["t_max"]),
            "time": self.time_embed(h, ones),
        }
        img, img_t = self.ops.linear(
            patchify(z, self.cfg.patch_size),
            None if z_t is None else patchify(z_t, self.cfg.patch_size),
            self.patch_embed.weight,
            self.patch_embed.bias,
        )
        tokens = [self.cond_tokens[k][None] + e[:, None] for k, (e, _) in emb.items()] + [img]
        x = torch.cat([t.to(img.dtype) for t in tokens], dim=1)
        x_t = None
        if n is not None:
            with torch.no_grad():
                parts = []
                for k, (_, e_t) in emb.items():
                    size = self.cond_tokens[k].shape[0]
                    parts.append(
                        img_t.new_zeros(n, size, img_t.shape[-1])
                        if e_t is None
                        else e_t[:, None].to(img_t.dtype).expand(n, size, -1)
                    )
                x_t = torch.cat(parts + [img_t], dim=1)
        return x, x_t

    def _run(self, z, z_t, cond, head):
        if head == "v" and not self.has_v_head:
            cond = dict(cond, r=cond["t"])  # boundary variant: v(z | ...) := u(z | h = 0, ...)
            head = "u"
        x, x_t = self._tokens(z, z_t, cond)
        cos, sin = self.rope_cos, self.rope_sin
        for blk in self.trunk:
            x, x_t = blk(x, x_t, cos, sin)
        u = u_t = v = None
        if "u" in head:
            u, u_t = self._head(self.u_blocks, self.u_out, x, x_t, cos, sin)
        if "v" in head:
            v, _ = self._head(self.v_blocks, self.v_out, x, None, cos, sin)
        return u, u_t, v

    def _head(self, blocks, out, x, x_t, cos, sin):
        for blk in blocks:
            x, x_t = blk(x, x_t, cos, sin)
        y, y_t = out(x, x_t, first=self.cfg.num_cond_tokens)
        p, ch = self.cfg.patch_size, self.cfg.in_channels
        return unpatchify(y, p, ch), None if y_t is None else unpatchify(y_t, p, ch)


__all__ = ["IMFTransformer"]
