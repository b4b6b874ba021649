"""MeanFlow trained the plain way -- ``torch.func.jvp`` over a small DiT -- with the fused SDPA drop-in.

The model is a stock DiT (adaLN-zero blocks, timm-style attention). The only change for the fused
kernels is one line in ``Attention.forward``: ``scaled_dot_product_attention`` from ``imf_kernels``
instead of ``torch.nn.functional``. ``F.scaled_dot_product_attention``'s flash / efficient
backends have no forward-mode AD, so codebases of this family fall back to math attention
(O(seq^2) memory) for ``torch.func.jvp``; the drop-in runs the fused JVP kernel there and the flash
backward for ``loss.backward()``.

The loss is MeanFlow's u-loss (Geng et al., 2025) as py-meanflow writes it: ``(u, du/dt)`` from
``torch.func.jvp`` of ``(z, t, r) -> u(z | t, h = t - r, y)`` at tangents ``(v, 1, 0)``, target
``sg(v - (t - r) du/dt)``, adaptive weighting (so the loss itself stays near 1; the script prints the
mean squared error per element). No guidance (omega = 1), to keep it short.

Run (CPU, Triton interpreter, which the script turns on itself; a few seconds per step)::

    python examples/meanflow_func_jvp.py --steps 5

On a GPU: ``python examples/meanflow_func_jvp.py --device cuda --dim 384 --depth 6 --steps 200``.
The data are synthetic: ``--classes`` fixed random 8x8 images plus noise, so the loss has something
to fit. Needs only ``torch`` and ``imf_kernels`` (``pip install -e .``), not the ``imf`` engine.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from imf_kernels import scaled_dot_product_attention
from torch import nn

# The attention function the model calls: the fused drop-in. (``tests/test_examples.py`` swaps in
# math attention to check that the training run is the same.)
attention = scaled_dot_product_attention


class Attention(nn.Module):
    """timm / DiT multi-head self-attention; ``(batch, seq, dim) -> (batch, seq, dim)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, seq, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        o = attention(q, k, v)  # was: F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, seq, dim))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """adaLN-zero DiT block conditioned on ``c``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TimeEmbedder(nn.Module):
    """Sinusoidal features of a scalar, then an MLP (DiT's ``TimestepEmbedder``)."""

    def __init__(self, dim: int, freq_dim: int = 64):
        super().__init__()
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, s):
        args = s[:, None] * self.freqs  # time scale 1 (not 1000): d/dt of the features stays O(1)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class TinyDiT(nn.Module):
    """DiT over ``(batch, channels, size, size)`` images, conditioned on ``t``, ``h = t - r`` and a class."""

    def __init__(self, size=8, channels=1, patch=2, dim=64, depth=2, heads=2, classes=10):
        super().__init__()
        self.patch, self.channels = patch, channels
        tokens = (size // patch) ** 2
        self.embed = nn.Linear(patch * patch * channels, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.t_embed, self.h_embed = TimeEmbedder(dim), TimeEmbedder(dim)
        self.y_embed = nn.Embedding(classes, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, patch * patch * channels)
        for m in (self.ada[1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, z, t, h, y):
        b, ch, size, _ = z.shape
        p, g = self.patch, size // self.patch
        x = z.reshape(b, ch, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * ch)
        x = self.embed(x) + self.pos
        c = self.t_embed(t) + self.h_embed(h) + self.y_embed(y)
        for blk in self.blocks:
            x = blk(x, c)
        shift, scale = self.ada(c).chunk(2, dim=-1)
        x = self.out(modulate(self.norm(x), shift, scale))
        return x.reshape(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(b, ch, size, size)


def sample_t_r(batch: int, gen: torch.Generator, device, ratio: float = 0.25):
    """Logit-normal(-0.4, 1) times, ``t >= r``; ``r = t`` for all but a fraction ``ratio`` (MF defaults)."""
    a, b = (torch.sigmoid(torch.randn(batch, generator=gen) - 0.4) for _ in range(2))
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    r = torch.where(torch.rand(batch, generator=gen) < ratio, r, t)
    return t.to(device), r.to(device)


def meanflow_loss(model, x, y, gen):
    """MeanFlow u-loss with ``torch.func.jvp`` (the plain way); returns ``(loss, mse)``."""
    t, r = sample_t_r(x.shape[0], gen, x.device)
    e = torch.randn(x.shape, generator=gen).to(x.device)
    tb, rb = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    z = (1 - tb) * x + tb * e
    v = e - x
    u, dudt = torch.func.jvp(
        lambda zz, tt, rr: model(zz, tt, tt - rr, y), (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r))
    )
    target = (v - (tb - rb) * dudt).detach()
    sq = (u - target).pow(2).flatten(1).sum(1)
    return (sq / (sq.detach() + 1e-3)).mean(), sq.mean() / x[0].numel()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def on_cpu_without_interpreter(device: str) -> bool:
    """CPU tensors run the kernels in the Triton interpreter, which is chosen when ``imf_kernels`` is imported."""
    return torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"


def main(argv=None) -> list[float]:
    """Train ``--steps`` steps; returns the per-step mean squared errors."""
    p = parser()
    args = p.parse_args(argv)
    if on_cpu_without_interpreter(args.device):
        p.error("--device cpu runs the kernels in the Triton interpreter: set TRITON_INTERPRET=1 before importing")

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = TinyDiT(dim=args.dim, depth=args.depth, heads=args.heads, classes=args.classes).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    prototypes = torch.randn(args.classes, 1, 8, 8, generator=gen)
    mses = []
    for step in range(args.steps):
        y = torch.randint(0, args.classes, (args.batch,), generator=gen)
        x = (prototypes[y] + 0.1 * torch.randn(args.batch, 1, 8, 8, generator=gen)).to(args.device)
        loss, mse = meanflow_loss(model, x, y.to(args.device), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mses.append(mse.item())
        print(f"step {step + 1}/{args.steps}  mse {mse.item():.4f}", flush=True)
    return mses


if __name__ == "__main__":
    if on_cpu_without_interpreter(parser().parse_args().device):  # too late for this process: run again with it
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
    main()
