"""The plain-PyTorch way to train MeanFlow models: ``torch.func.jvp`` through the model + autograd.

This is what people run today (and what the benchmarks compare against): the losses written out
line by line from docs/design.md section 1, with the JVP taken by forward-mode AD over the plain
forward, every sample getting a tangent, and autograd keeping both the primal and the tangent
graphs. Both backends run it: ``"reference"`` through math attention, ``"triton"`` through the
fused kernels' forward-mode rules (``torch.func.jvp`` sees them; eager only, see
:mod:`imf_kernels.custom_ops` for ``torch.compile``). It is independent
of :mod:`imf.loss` (which uses the explicit dual forward) and the tests check the two agree.
Each returns ``(loss, mean squared error of the main term)``.
"""

import torch

from imf.phases import phase


def imf_loss_func_jvp(model, x, y, e, t, r, omega, t_min, t_max, drop, eps=0.01):
    """iMF loss with ``torch.func.jvp`` for ``du/dt`` (every sample gets a tangent)."""
    null = model.cfg.num_classes
    tb = t.view(-1, 1, 1, 1)
    z = (1 - tb) * x + tb * e
    v_t = e - x
    inside = (t_min <= t) & (t <= t_max)
    w_eff = torch.where(inside, omega, torch.ones_like(omega))
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    with phase("imf.guidance"), torch.no_grad():
        v_c = model.velocity(z, t, t, y, w_eff, zeros, ones)
        v_u = model.velocity(z, t, t, torch.full_like(y, null), ones, zeros, ones)
        v_g = v_t + (1 - 1 / w_eff).view(-1, 1, 1, 1) * (v_c - v_u)
        v_g = torch.where(drop.view(-1, 1, 1, 1), v_t, v_g)
    y = torch.where(drop, torch.full_like(y, null), y)  # after the guidance: v_c keeps the true label
    with phase("imf.dual_forward"):
        u, du = torch.func.jvp(lambda zz, tt: model(zz, tt, r, y, omega, t_min, t_max), (z, t), (v_c, ones))
        v = model.velocity(z, t, r, y, omega, t_min, t_max) if model.has_v_head else None
    V = u + (t - r).view(-1, 1, 1, 1) * du.detach()
    sq_V = (V - v_g).pow(2).flatten(1).sum(1)
    loss = (sq_V / (sq_V.detach() + eps)).mean()
    if v is not None:
        sq_v = (v - v_g).pow(2).flatten(1).sum(1)
        loss = loss + (sq_v / (sq_v.detach() + eps)).mean()
    return loss, sq_V.mean() / x[0].numel()


def mf_loss_func_jvp(model, x, y, e, t, r, omega, kappa, t_start, t_end, drop, eps=0.01):
    """MF u-loss with ``torch.func.jvp`` at tangents ``(v_g, 1, 0)``."""
    null = model.cfg.num_classes
    tb = t.view(-1, 1, 1, 1)
    z = (1 - tb) * x + tb * e
    v_t = e - x
    with phase("imf.guidance"), torch.no_grad():
        v_u = model.velocity(z, t, t, torch.full_like(y, null))
        v_c = model.velocity(z, t, t, y)
        guided = ((t_start <= t) & (t <= t_end) & ~drop).view(-1, 1, 1, 1)
        v_g = torch.where(guided, omega * v_t + (1 - omega - kappa) * v_u + kappa * v_c, v_t)
    y = torch.where(drop, torch.full_like(y, null), y)
    with phase("imf.dual_forward"):
        u, du = torch.func.jvp(lambda zz, tt: model(zz, tt, r, y), (z, t), (v_g, torch.ones_like(t)))
    target = (v_g - (t - r).view(-1, 1, 1, 1) * du).detach()
    sq = (u - target).pow(2).flatten(1).sum(1)
    return (sq / (sq.detach() + eps)).mean(), sq.mean() / x[0].numel()
