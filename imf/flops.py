"""Counted FLOPs of the networks and of one training step, from the shapes alone.

**Convention.** Real FLOPs: 2 per multiply-accumulate, matmuls only (every linear layer and
attention's two ``L x L x Dh`` products per head). Norms, RoPE, softmax, activations, gates and the
loss are elementwise and not counted (the usual MFU convention; they are O(L d + heads L^2) per
sample against O(L d^2 + L^2 d) for the matmuls). The papers' "GFLOPs" follow the DiT / fvcore convention and count
multiply-accumulates: iMF-B/2's "24.9 GFLOPs" is about 49.7 GFLOP here.

**One forward, per sample** (``L = seq_len`` tokens, ``d = dim``, ``H`` = MLP hidden, ``P`` image
tokens, ``c = p*p*C`` pixels per patch, ``f = freq_dim``). One iMF block::

    qkv          2 L d (3d)        bias-free fused q/k/v projection
    attn_scores  2 L L d           S = q k^T (heads x L x L x Dh)
    attn_values  2 L L d           o = P v
    proj         2 L d d
    mlp_in       2 L d (2H)        SwiGLU W1 and W2, fused
    mlp_out      2 L H d

``embed``: the patch linear ``2 P c d`` and four condition MLPs (omega, t_min, t_max, time), each
``2 (f d + d d)``; the class tokens are a lookup. Each head ends in ``out``: ``2 P d c`` (image
tokens only). The MF DiT block has the same attention and linears with a GELU MLP ``H = 4 d``
(``mlp_in`` = ``2 L d H``) plus the adaLN projection ``ada`` = ``2 d (6d)`` per sample; its
``embed`` has the patch linear and two condition MLPs (``t``, ``h``), its ``final`` part the final
adaLN ``2 d (2d)`` and linear ``2 P d c``.

**Tangent, per sample that carries one** (on top of its primal): every linear costs its matmul
again (``y_t = x_t W^T``), and attention's JVP adds four ``L x L x Dh`` products,
``S_t = q_t k^T + q k_t^T`` and ``o_t = P_t v + P v_t``, so the attention JVP forward is six matmuls,
3x the primal attention. Only inputs that move carry a tangent: in iMF the image tokens and the
time (``h``) embedding (the class, omega and interval embeddings are constant along the
direction); in the MF DiT the condition moves along ``(dt, dh) = (1, 1)``, so both time MLPs and
every adaLN projection have a tangent too.

**One training step** (:func:`train_step_breakdown`), as :mod:`imf.loss` executes it with batch
``B``, ``n_fm = floor(fm_fraction B)`` samples with ``r = t`` and ``n = B - n_fm`` with ``r < t``:

* iMF (:func:`imf.loss.imf_loss`). ``guidance``: one no-grad call of ``model.velocity`` on
  ``B + n_u`` rows (``v_c`` for all, ``v_u`` for the ``n_u`` samples whose guidance weight is
  non-zero), trunk + v-head (trunk + u-head for ``v_head="boundary"``).
  ``E[n_u] = (n_fm - E[min(K, n_fm)] + (n - E[max(K - n_fm, 0)]) p_in) [omega_s_max > 0]``: class
  dropout takes the first ``K ~ Binomial(B, class_drop)`` samples, FM samples first (:func:`dropped_split`),
  and ``p_in = P(t_min <= t <= t_max)`` for the ``r < t`` samples (FM samples use ``[0, 1]``), computed
  by quadrature over the sampler's distributions (:func:`guidance_fraction`).
  ``dual_forward``: primal of all ``B`` samples through trunk + u-head (+ v-head) and the tangent of
  the ``n`` samples through trunk + u-head. ``backward``: 2x the primal forward of the dual pass
  (``dX`` and ``dW`` per matmul), by convention: the input-side layers (patch and condition MLPs)
  need no ``dX``, so autograd executes slightly less (tests/test_flops.py: within 5%), and the
  flash-attention backward's recompute of ``S`` is not counted.
* MF (:func:`imf.loss.mf_loss`). ``guidance``: with ``omega != 1`` or ``kappa != 0``, one no-grad
  forward of the whole net on ``2 n_g`` rows (``v_u`` and ``v_cond`` of the ``n_g`` samples with ``t``
  in ``[t_start, t_end]`` and no class dropout; expected count in closed form); none with the
  ``omega = 1, kappa = 0`` (the published MF training uses ``omega = 1, kappa = 0.5``: guided).
  ``dual_forward``: primal of ``B`` plus tangent of ``n``. ``backward``: 2x the primal forward.

A plain flow-matching step of the same network (:func:`fm_step_flops`) is one forward and its
backward through the inference path: ``3 forward_flops(cfg, B, "u")``.

**Paper check** (tests/test_flops.py), inference forward at 256x256 (``L = 276``), ours vs the
papers' MACs x 2: B/2 49.71 vs 49.8, L/2 232.24 vs 232.8, XL/2 348.35 vs 349.2 GFLOP, i.e. 0.18%,
0.24%, 0.24% below. B/2 is inside the rounding of "24.9"; for L/2 and XL/2 the gap (~9 M MACs per
block) is of the size of the elementwise work left out here (softmax over 16 x 276^2 scores, the
SwiGLU product over 276 x 2730, the norms), which some counters include; the papers do not say how
they counted. The MF DiTs match DiT's published counts (DiT-B/2 23.0, DiT-XL/2 118.6 GMACs) plus
the extra ``h`` embedding MLP.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from imf.config import LossConfig, ModelConfig

_HEAD_PARTS = {
    "u": ("embed", "trunk", "u_head"),
    "v": ("embed", "trunk", "v_head"),
    "u+v": ("embed", "trunk", "u_head", "v_head"),
}

# Datasheet dense (no sparsity) bf16 tensor-core peaks, FLOP/s.
_DATASHEET_BF16 = (
    ("H200", 989e12),
    ("H100 PCIE", 756e12),
    ("H100 SXM", 989e12),
    ("H100 80GB HBM3", 989e12),  # the SXM part's CUDA device name
    ("A100", 312e12),
)


def _block_ops(cfg: ModelConfig, mf: bool) -> list[tuple[str, float, float]]:
    """``(op, forward, tangent)`` per sample for one transformer block (see the module docstring)."""
    L, d, H = cfg.seq_len, cfg.dim, cfg.hidden
    mlp_in = 2 * L * d * (H if mf else 2 * H)
    ops = [
        ("qkv", 2 * L * d * 3 * d, 2 * L * d * 3 * d),
        ("attn_scores", 2 * L * L * d, 2 * 2 * L * L * d),
        ("attn_values", 2 * L * L * d, 2 * 2 * L * L * d),
        ("proj", 2 * L * d * d, 2 * L * d * d),
        ("mlp_in", mlp_in, mlp_in),
        ("mlp_out", 2 * L * H * d, 2 * L * H * d),
    ]
    if mf:
        ops.append(("ada", 2 * d * 6 * d, 2 * d * 6 * d))
    return ops


def breakdown(model_cfg: ModelConfig, batch_size: int = 1) -> list[dict]:
    """Per-layer FLOPs: one row ``{part, op, count, forward, tangent}`` per op kind of each part.

    ``part``: iMF ``embed``, ``trunk``, ``u_head``, ``v_head`` (``v_head="aux"`` only); MF ``embed``,
    ``blocks``, ``final``. ``count``: how many such layers the part has; ``forward``: FLOPs of the
    primal forward of all of them for ``batch_size`` samples; ``tangent``: the extra FLOPs when all
    ``batch_size`` samples also carry a tangent.
    """
    cfg = model_cfg
    d, f = cfg.dim, cfg.freq_dim
    patch = 2 * cfg.num_patches * cfg.patch_size**2 * cfg.in_channels * d
    cond_mlp = 2 * (f * d + d * d)
    rows = []

    def add(part, op, count, fwd, tan):
        rows.append(
            {
                "part": part,
                "op": op,
                "count": count,
                "forward": float(count * fwd * batch_size),
                "tangent": float(count * tan * batch_size),
            }
        )

    if cfg.arch == "imf":
        add("embed", "patch_embed", 1, patch, patch)
        add("embed", "cond_mlp", 4, cond_mlp, cond_mlp / 4)  # only the time (h) MLP carries a tangent
        parts = [("trunk", cfg.trunk_depth), ("u_head", cfg.head_depth)]
        if cfg.v_head == "aux":
            parts.append(("v_head", cfg.head_depth))
        for part, depth in parts:
            for op, fwd, tan in _block_ops(cfg, mf=False):
                add(part, op, depth, fwd, tan)
            if part != "trunk":
                add(part, "out", 1, patch, patch if part == "u_head" else 0)
    else:
        add("embed", "patch_embed", 1, patch, patch)
        add("embed", "cond_mlp", 2, cond_mlp, cond_mlp)
        for op, fwd, tan in _block_ops(cfg, mf=True):
            add("blocks", op, cfg.depth, fwd, tan)
        add("final", "ada", 1, 2 * d * 2 * d, 2 * d * 2 * d)
        add("final", "out", 1, patch, patch)
    return rows


def _parts(cfg: ModelConfig, head: str) -> tuple[str, ...]:
    if head not in _HEAD_PARTS:
        raise ValueError(f"head must be one of {sorted(_HEAD_PARTS)}, got {head!r}")
    if cfg.arch == "mf":
        if head == "u+v":
            raise ValueError("the MF DiT has no v-head: head='u+v' needs an iMF model with v_head='aux'")
        return ("embed", "blocks", "final")
    if cfg.v_head == "boundary":
        if head == "u+v":
            raise ValueError("head='u+v' needs v_head='aux'; the boundary variant's v is u at h = 0 (head='v')")
        return _HEAD_PARTS["u"]
    return _HEAD_PARTS[head]


def forward_flops(model_cfg: ModelConfig, batch_size: int, head: str = "u") -> float:
    """FLOPs of one primal forward of ``batch_size`` samples.

    ``head``: ``"u"`` the inference path (``model(...)``: trunk + u-head), ``"v"`` what
    ``model.velocity`` runs (trunk + v-head; trunk + u-head without an auxiliary v-head), ``"u+v"``
    the dual call's primal (trunk + both heads). The MF DiT runs its whole net for ``"u"`` and ``"v"``.
    """
    parts = _parts(model_cfg, head)
    return sum(r["forward"] for r in breakdown(model_cfg, batch_size) if r["part"] in parts)


def tangent_flops(model_cfg: ModelConfig, batch_size: int) -> float:
    """Extra FLOPs of carrying a tangent for ``batch_size`` samples through the u path."""
    parts = _parts(model_cfg, "u")
    return sum(r["tangent"] for r in breakdown(model_cfg, batch_size) if r["part"] in parts)


def block_flops(model_cfg: ModelConfig, batch_size: int) -> dict[str, float]:
    """One transformer block for ``batch_size`` samples: ``{forward, tangent}`` (the tangent's extra FLOPs)."""
    ops = _block_ops(model_cfg, mf=model_cfg.arch == "mf")
    return {
        "forward": float(batch_size * sum(op[1] for op in ops)),
        "tangent": float(batch_size * sum(op[2] for op in ops)),
    }


def fm_step_flops(model_cfg: ModelConfig, batch_size: int) -> float:
    """A plain flow-matching step of the same network: forward + backward (2x) of the u path."""
    return 3.0 * forward_flops(model_cfg, batch_size, "u")


def _max_logit_normal_cdf(t: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """CDF of ``max(sigmoid(p_mean + p_std n1), sigmoid(p_mean + p_std n2))``: ``Phi(z)^2``."""
    z = (torch.logit(t.clamp(1e-300, 1 - 1e-16)) - p_mean) / p_std
    cdf = torch.special.ndtr(z) ** 2
    return torch.where(t <= 0, 0.0, torch.where(t >= 1, 1.0, cdf))


def _uniform_cdf(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``P(U[lo, hi] <= t)`` (a step at ``lo`` when the range is a point)."""
    if hi <= lo:
        return (t >= lo).to(t.dtype)
    return ((t - lo) / (hi - lo)).clamp(0.0, 1.0)


@lru_cache(maxsize=64)
def guidance_fraction(loss_cfg: LossConfig) -> float:
    """Expected fraction of the samples whose guidance needs ``v_u`` / ``v_cond`` forwards.

    iMF: ``P(t_min <= t <= t_max)`` over the ``r < t`` samples (``t`` the larger of two logit-normal
    draws, ``t_min ~ U[t_min_range]``, ``t_max ~ U[t_max_range]`` independent), by trapezoidal
    quadrature in the normal variable (20,001 points on [-12, 12]; error < 1e-6). MF:
    ``P(t_start <= t <= t_end)`` in closed form. Class dropout and ``omega`` are applied by the caller.
    """
    if loss_cfg.method == "mf":
        edges = torch.tensor([loss_cfg.t_start, loss_cfg.t_end], dtype=torch.float64)
        lo, hi = _max_logit_normal_cdf(edges, loss_cfg.p_mean, loss_cfg.p_std).tolist()
        return hi - lo
    x = torch.linspace(-12.0, 12.0, 20001, dtype=torch.float64)
    density = 2.0 * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) * torch.special.ndtr(x)
    t = torch.sigmoid(loss_cfg.p_mean + loss_cfg.p_std * x)
    (lo0, hi0), (lo1, hi1) = loss_cfg.t_min_range, loss_cfg.t_max_range
    inside = _uniform_cdf(t, lo0, hi0) * (1.0 - _uniform_cdf(t, lo1, hi1))
    # P(t_max >= t) = 1 - P(t_max < t); for a continuous U the two CDFs agree at t.
    return float(torch.trapezoid(inside * density, x))


def dropped_split(batch_size: int, p: float, n_first: int) -> tuple[float, float]:
    """``(E[min(K, n_first)], E[max(K - n_first, 0)])`` for ``K ~ Binomial(batch_size, p)``: the expected
    dropped samples among the first ``n_first`` of the batch and after them (the sampler drops the first K)."""
    if p <= 0.0:
        return 0.0, 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lg = math.lgamma(batch_size + 1)
    first = 0.0
    for k in range(batch_size + 1):
        pmf = math.exp(lg - math.lgamma(k + 1) - math.lgamma(batch_size - k + 1) + k * log_p + (batch_size - k) * log_q)
        first += pmf * min(k, n_first)
    return first, batch_size * p - first


def train_step_breakdown(model_cfg: ModelConfig, loss_cfg: LossConfig, batch_size: int) -> dict[str, float]:
    """Expected FLOPs per phase of one training step: ``{guidance, dual_forward, backward}``.

    What each phase runs is written out in the module docstring; the optimizer is elementwise.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    B = batch_size
    n_fm = loss_cfg.fm_count(B)
    n_tan = B - n_fm
    aux = model_cfg.arch == "imf" and model_cfg.v_head == "aux"
    dual_primal = forward_flops(model_cfg, B, "u+v" if aux else "u")
    if loss_cfg.method == "imf":
        drop_fm, drop_tan = dropped_split(B, loss_cfg.class_drop, n_fm)
        p_in = guidance_fraction(loss_cfg)
        n_u = n_fm - drop_fm + (n_tan - drop_tan) * p_in if loss_cfg.omega_s_max > 0 else 0.0
        guidance = forward_flops(model_cfg, 1, "v") * (B + n_u)
    else:
        guided = loss_cfg.omega != 1.0 or loss_cfg.kappa != 0.0
        n_g = (1.0 - loss_cfg.class_drop) * B * guidance_fraction(loss_cfg) if guided else 0.0
        guidance = 2.0 * forward_flops(model_cfg, 1, "v") * n_g
    return {
        "guidance": guidance,
        "dual_forward": dual_primal + tangent_flops(model_cfg, n_tan),
        "backward": 2.0 * dual_primal,
    }


def train_step_flops(model_cfg: ModelConfig, loss_cfg: LossConfig, batch_size: int) -> float:
    """Expected executed FLOPs of one training step (sum of :func:`train_step_breakdown`)."""
    return sum(train_step_breakdown(model_cfg, loss_cfg, batch_size).values())


def peak_flops_by_name(name: str) -> float | None:
    """Datasheet dense bf16 peak (FLOP/s) for a GPU name, e.g. ``"NVIDIA H100 80GB HBM3"``; None if unknown."""
    upper = name.upper()
    for key, peak in _DATASHEET_BF16:
        if all(word in upper for word in key.split()):
            return peak
    return None


def peak_flops(device: torch.device | str | int | None = None) -> float | None:
    """Datasheet dense bf16 peak of a CUDA device (H100 SXM / H200 989e12, H100 PCIe 756e12,
    A100 312e12); None for a CPU, no CUDA, or a GPU not in the table."""
    if isinstance(device, str | torch.device) and torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device))


__all__ = [
    "block_flops",
    "breakdown",
    "fm_step_flops",
    "forward_flops",
    "guidance_fraction",
    "peak_flops",
    "peak_flops_by_name",
    "tangent_flops",
    "train_step_breakdown",
    "train_step_flops",
]
