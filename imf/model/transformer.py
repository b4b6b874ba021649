"""The networks: the iMF in-context transformer and the MF adaLN-zero DiT baseline.

Both expose the same interface (ARCHITECTURE.md section 3)::

    model(z, t, r, y, omega, t_min, t_max) -> u                 # average velocity, u-head
    model.velocity(z, t, r, y, omega, t_min, t_max) -> v        # instantaneous velocity
    model.forward_with_tangent(z, z_t, t, r, y, omega, t_min, t_max) -> (u, u_t)

``u_t`` is the derivative of ``u`` along ``(dz, dt, dr) = (z_t, 1, 0)``, computed by an explicit
primal + tangent pass through every layer (time embeddings and condition tokens included); it is
detached, the primal stays differentiable. ``z_t`` may cover a leading-batch prefix of ``z``: the
samples after it get no tangent work (the losses put their ``r = t`` samples there).

The ``"reference"`` backend is plain PyTorch with math attention, so ``torch.func.jvp`` runs
through the plain forward; ``"triton"`` uses the fused kernels of ``imf_kernels``. Both have the
same parameters and state_dict.
"""

from __future__ import annotations

import math

import torch
from imf_kernels.reference import rope_tables
from torch import nn

from imf.config import ModelConfig, preset
from imf.layers import ConditionEmbedder, DualModule, IMFBlock, OutputHead, add_tangent
from imf.ops import ReferenceOps, make_ops


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, (H/p)(W/p), p*p*C)``, row-major patches."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // p, p, w // p, p)
    return z.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square grid."""
    b, n, _ = x.shape
    g = math.isqrt(n)
    x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, g * p, g * p)


class MeanFlowNet(DualModule):
    """Shared input validation, backend switching and the public call signatures."""

    cfg: ModelConfig

    def set_backend(self, backend: str) -> MeanFlowNet:
        ops = make_ops(backend)
        for m in self.modules():
            if isinstance(m, DualModule):
                m.ops = ops
        self.backend = backend
        return self

    def forward(self, z, t, r, y, omega=None, t_min=None, t_max=None):
        cond = self._check(z, None, t, r, y, omega, t_min, t_max)
        return self._run(z, None, cond, head="u")[0]

    def velocity(self, z, t, r, y, omega=None, t_min=None, t_max=None):
        """Instantaneous-velocity prediction (the v-head, or ``u`` at ``h = 0`` without one)."""
        cond = self._check(z, None, t, r, y, omega, t_min, t_max)
        u, _, v = self._run(z, None, cond, head="v")
        return u if v is None else v

    def forward_with_tangent(self, z, z_t, t, r, y, omega=None, t_min=None, t_max=None, *,
                             with_velocity: bool = False):
        """``(u, u_t)``, or ``(u, u_t, v)`` with ``with_velocity`` (v-head output of the same call)."""
        cond = self._check(z, z_t, t, r, y, omega, t_min, t_max)
        if with_velocity and not self.has_v_head:
            raise ValueError("with_velocity=True needs a model with v_head='aux'")
        u, u_t, v = self._run(z, z_t if z_t.shape[0] else None, cond, head="u+v" if with_velocity else "u")
        if u_t is None:
            u_t = z_t.new_zeros(z_t.shape)
        return (u, u_t, v) if with_velocity else (u, u_t)

    @property
    def has_v_head(self) -> bool:
        return False

    def _check(self, z, z_t, t, r, y, omega, t_min, t_max):
        cfg = self.cfg
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or tuple(z.shape[1:]) != shape:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (batch, {shape[0]}, {shape[1]}, {shape[2]}), got {got}")
        if not z.is_floating_point():
            raise ValueError(f"z must be a floating tensor, got dtype {z.dtype}")
        batch = z.shape[0]
        if z_t is not None:
            if not isinstance(z_t, torch.Tensor) or z_t.dim() != 4 or tuple(z_t.shape[1:]) != shape \
                    or z_t.shape[0] > batch:
                raise ValueError(f"z_t must have shape (n <= {batch}, {shape[0]}, {shape[1]}, {shape[2]}), "
                                 f"got {tuple(z_t.shape)}")
            if z_t.dtype != z.dtype or z_t.device != z.device:
                raise ValueError(f"z_t must match z in dtype/device ({z.dtype}, {z.device}), "
                                 f"got {z_t.dtype}, {z_t.device}")
        cond = {"t": t, "r": r, "y": y}
        if cfg.arch == "imf":
            cond.update(omega=omega, t_min=t_min, t_max=t_max)
        for name, val in cond.items():
            if not isinstance(val, torch.Tensor) or val.shape != (batch,):
                got = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
                raise ValueError(f"{name} must be a tensor of shape ({batch},), got {got}")
            if val.device != z.device:
                raise ValueError(f"{name} must be on {z.device}, got {val.device}")
            floating = name != "y"
            if val.is_floating_point() != floating:
                want = "a floating" if floating else "an integer (class label)"
                raise ValueError(f"{name} must have {want} dtype, got {val.dtype}")
        return cond


class IMFTransformer(MeanFlowNet):
    """iMF in-context transformer (ARCHITECTURE.md section 2).

    Sequence = 20 condition tokens (8 class, 4 omega, 2 t_min, 2 t_max, 4 time) + image tokens;
    each group is a learned token set plus the embedding of its condition (omega embedded as
    ``1 - 1/omega``, time as ``h = t - r``). 1-D RoPE over the whole sequence. ``trunk_depth``
    shared blocks, then a u-head and (``v_head="aux"``) a v-head of ``head_depth`` blocks each.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.dim, cfg.patch_size
        self.patch_embed = nn.Linear(p * p * cfg.in_channels, d)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d)
        self.omega_embed = ConditionEmbedder(cfg.freq_dim, d, cfg.time_scale)
        self.t_min_embed = ConditionEmbedder(cfg.freq_dim, d, cfg.time_scale)
        self.t_max_embed = ConditionEmbedder(cfg.freq_dim, d, cfg.time_scale)
        self.time_embed = ConditionEmbedder(cfg.freq_dim, d, cfg.time_scale)
        groups = {"class": cfg.class_tokens, "omega": cfg.omega_tokens, "t_min": cfg.t_min_tokens,
                  "t_max": cfg.t_max_tokens, "time": cfg.time_tokens}
        self.cond_tokens = nn.ParameterDict({k: nn.Parameter(torch.randn(n, d) * 0.02) for k, n in groups.items()})
        block = lambda: IMFBlock(d, cfg.heads, cfg.hidden, cfg.norm_eps)
        self.trunk = nn.ModuleList(block() for _ in range(cfg.trunk_depth))
        self.u_blocks = nn.ModuleList(block() for _ in range(cfg.head_depth))
        self.u_out = OutputHead(d, p * p * cfg.in_channels, cfg.norm_eps)
        if cfg.v_head == "aux":
            self.v_blocks = nn.ModuleList(block() for _ in range(cfg.head_depth))
            self.v_out = OutputHead(d, p * p * cfg.in_channels, cfg.norm_eps)
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, theta=cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear) and not isinstance(m, OutputHead):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for head in (self.u_out, getattr(self, "v_out", None)):
            if head is not None:
                nn.init.zeros_(head.linear.weight)
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
        img, img_t = self.ops.linear(patchify(z, self.cfg.patch_size),
                                     None if z_t is None else patchify(z_t, self.cfg.patch_size),
                                     self.patch_embed.weight, self.patch_embed.bias)
        tokens = [self.cond_tokens[k][None] + e[:, None] for k, (e, _) in emb.items()] + [img]
        x = torch.cat([t.to(img.dtype) for t in tokens], dim=1)
        x_t = None
        if n is not None:
            with torch.no_grad():
                parts = []
                for k, (_, e_t) in emb.items():
                    size = self.cond_tokens[k].shape[0]
                    parts.append(img_t.new_zeros(n, size, img_t.shape[-1]) if e_t is None
                                 else e_t[:, None].to(img_t.dtype).expand(n, size, -1))
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
        y, y_t = out(x, x_t, first=self.cfg.cond_tokens)
        p, ch = self.cfg.patch_size, self.cfg.in_channels
        return unpatchify(y, p, ch), None if y_t is None else unpatchify(y_t, p, ch)


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
    """MeanFlow's DiT baseline: adaLN-zero, conditioned on ``c = emb(t) + emb(h = t - r) + emb(y)``.

    With tangents ``(dt, dr) = (1, 0)`` the condition moves along ``(dt, dh) = (1, 1)``.
    ``velocity`` is ``u`` at ``h = 0``. ``omega``, ``t_min``, ``t_max`` are accepted and ignored.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.dim, cfg.patch_size
        self.patch_embed = nn.Linear(p * p * cfg.in_channels, d)
        self.register_buffer("pos_embed", _sincos_2d(d, cfg.input_size // p), persistent=False)
        self.t_embed = ConditionEmbedder(cfg.freq_dim, d, cfg.time_scale)
        self.h_embed = ConditionEmbedder(cfg.freq_dim, d, cfg.time_scale)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d)
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.hidden) for _ in range(cfg.depth))
        self.final_ada = nn.Linear(d, 2 * d)
        self.final = nn.Linear(d, p * p * cfg.in_channels)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        for m in [b.ada for b in self.blocks] + [self.final_ada, self.final]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

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
        x, x_t = ops.linear(patchify(z, p), None if z_t is None else patchify(z_t, p),
                            self.patch_embed.weight, self.patch_embed.bias)
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
    """Fixed 2-D sin-cos position embedding ``(grid*grid, dim)`` as in DiT/MAE."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        out = coord[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    emb = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(emb, (0, dim - emb.shape[1])).float()


def build_model(name_or_cfg: str | ModelConfig = "iMF-B/2", backend: str = "reference",
                v_head: str | None = None, **overrides) -> MeanFlowNet:
    """Build a preset (or a ``ModelConfig``) on the chosen backend.

    ``v_head`` ("aux" | "boundary") and keyword ``overrides`` replace preset fields. Both backends
    build identical parameters; switch later with ``model.set_backend(...)``.
    """
    if v_head is not None:
        overrides["v_head"] = v_head
    if isinstance(name_or_cfg, ModelConfig):
        import dataclasses

        cfg = dataclasses.replace(name_or_cfg, **overrides).validate()
    else:
        cfg = preset(name_or_cfg, **overrides)
    model = IMFTransformer(cfg) if cfg.arch == "imf" else MFDiT(cfg)
    return model.set_backend(backend)
