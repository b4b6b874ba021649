"""MeanFlow (MF, u-loss) and improved MeanFlow (iMF, v-loss) training objectives.

All randomness comes in as arguments (``e``, ``t``, ``r``, ``omega``, the interval and the
class-drop mask; draw them with :func:`sample_training_inputs`), so a loss is a pure function of
the model and its inputs. Notation (ARCHITECTURE.md section 1)::

    z_t = (1 - t) x + t e,   v_t = e - x,   h = t - r,   adp(L) = L / sg(L + eps)^p

**iMF.** ``omega_eff = omega`` if ``t_min <= t <= t_max`` else 1. Without grad:
``v_c = v(z_t | h=0, y, omega_eff, [0, 1])``, ``v_u = v(z_t | h=0, null, 1, [0, 1])``,
``v_g = v_t + (1 - 1/omega_eff)(v_c - v_u)``; dropped samples: ``y -> null``, ``v_g -> v_t``.
Dual call: ``(u, du/dt)`` = JVP of ``u(z | h, y, omega, t_min, t_max)`` at tangents
``(v_c, dt=1, dr=0)`` and the v-head ``v`` of the same call; ``V = u + (t - r) sg(du/dt)``;
``loss = mean_b adp(sum (V - v_g)^2) + adp(sum (v - v_g)^2)`` (no v-term for ``v_head="boundary"``).

**MF.** In ``[t_start, t_end]``: ``v_g = omega v_t + (1 - omega - kappa) v_u + kappa v_cond`` with
``v_u = u(z_t | t, h=0, null)``, ``v_cond = u(z_t | t, h=0, y)``, else ``v_g = v_t``; dropped
samples ``v_g -> v_t``. ``(u, du/dt)`` = JVP at ``(v_g, 1, 0)``,
``loss = mean_b adp(sum (u - sg(v_g - (t - r) du/dt))^2)``.

Work the loss would throw away is not computed: samples with ``r = t`` get no tangent (it is
multiplied by ``t - r = 0``; they are moved behind the others and the model's tangent prefix
stops before them), and ``v_u`` is evaluated only where its weight is non-zero.
"""

from __future__ import annotations

import math

import torch

from imf.config import LossConfig


def sample_training_inputs(batch_size: int, cfg: LossConfig, generator: torch.Generator | None = None,
                           device: torch.device | str | None = None):
    """Draw ``(t, r, omega, t_min, t_max, drop)`` per the published distributions.

    ``t, r``: two logit-normal(``p_mean``, ``p_std``) draws, ``t`` the larger; the last
    ``round(fm_fraction * batch)`` samples get ``r = t`` (flow-matching samples; iMF 50%, MF 75%).
    iMF: ``omega ~ omega^-beta`` on ``[1, 1 + s_max]`` (inverse CDF), ``t_min ~ U(t_min_range)``,
    ``t_max ~ U(t_max_range)``, FM samples ``[0, 1]``. MF: the fixed ``omega`` and ``[t_start, t_end]``.
    ``drop``: Bernoulli(``class_drop``) class-dropout mask.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, but device is {device}")
    rand = lambda: torch.rand(batch_size, generator=generator, device=device)
    normal = lambda: torch.randn(batch_size, generator=generator, device=device)
    a = torch.sigmoid(cfg.p_mean + cfg.p_std * normal())
    b = torch.sigmoid(cfg.p_mean + cfg.p_std * normal())
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    fm = torch.arange(batch_size, device=device) >= batch_size - round(cfg.fm_fraction * batch_size)
    r = torch.where(fm, t, r)
    drop = rand() < cfg.class_drop
    if cfg.method == "mf":
        full = lambda v: torch.full((batch_size,), float(v), device=device)
        return t, r, full(cfg.omega), full(cfg.t_start), full(cfg.t_end), drop
    omega = _power_law(rand(), cfg.omega_beta, 1.0 + cfg.omega_s_max)
    (lo0, hi0), (lo1, hi1) = cfg.t_min_range, cfg.t_max_range
    t_min = torch.where(fm, 0.0, lo0 + (hi0 - lo0) * rand())
    t_max = torch.where(fm, 1.0, lo1 + (hi1 - lo1) * rand())
    return t, r, omega, t_min, t_max, drop


def _power_law(u: torch.Tensor, beta: float, upper: float) -> torch.Tensor:
    """Inverse CDF of ``p(w) ~ w^-beta`` on ``[1, upper]`` at uniforms ``u``."""
    if abs(beta - 1.0) < 1e-12:
        return torch.exp(u * math.log(upper))
    k = 1.0 - beta
    return (1.0 + u * (upper**k - 1.0)) ** (1.0 / k)


def adaptive_weight(per_sample: torch.Tensor, eps: float, power: float) -> torch.Tensor:
    """``adp(L) = L / sg(L + eps)^power``."""
    return per_sample / (per_sample.detach() + eps).pow(power)


def imf_loss(model, x, y, e, t, r, omega, t_min, t_max, drop=None, cfg: LossConfig | None = None):
    """iMF v-loss; returns ``(loss, metrics)``. See the module docstring for the math."""
    cfg = LossConfig() if cfg is None else cfg
    null = model.cfg.num_classes
    batch, n_dual, ordered = _check_inputs(model, x, y, e, t, r, drop, omega=omega, t_min=t_min, t_max=t_max)
    drop = torch.zeros_like(y, dtype=torch.bool) if drop is None else drop
    x, y, e, t, r, omega, t_min, t_max, drop = _tangent_first(ordered, x, y, e, t, r, omega, t_min, t_max, drop)
    z, v_t = _interpolate(x, e, t)
    y = torch.where(drop, null, y)
    omega_eff = torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))
    weight = torch.where(drop, 0.0, 1.0 - 1.0 / omega_eff)
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    with torch.no_grad():
        need_u = weight > 0
        z_u = z[need_u]
        n_u = z_u.shape[0]
        nulls = torch.full((n_u,), null, dtype=y.dtype, device=y.device)
        v_both = model.velocity(torch.cat([z, z_u]), torch.cat([t, t[need_u]]), torch.cat([t, t[need_u]]),
                                torch.cat([y, nulls]), torch.cat([omega_eff, ones[:n_u]]),
                                torch.cat([zeros, zeros[:n_u]]), torch.cat([ones, ones[:n_u]]))
        v_c, v_u = v_both[:batch], v_both[batch:]
        v_g = v_t.clone()
        v_g[need_u] += _bcast(weight[need_u]) * (v_c[need_u] - v_u)
    aux = model.has_v_head
    # under autocast v_c comes out in the compute dtype; the tangent must match z
    out = model.forward_with_tangent(z, v_c[:n_dual].to(z.dtype), t, r, y, omega, t_min, t_max, with_velocity=aux)
    u, u_t = out[0], out[1]
    V = u.clone()
    V[:n_dual] = u[:n_dual] + _bcast(t - r)[:n_dual] * u_t
    sq_V = (V - v_g).pow(2).flatten(1).sum(1)
    loss_V = adaptive_weight(sq_V, cfg.adp_eps, cfg.adp_power).mean()
    numel = v_g[0].numel()
    metrics = {"loss_V": loss_V.detach(), "mse_V": sq_V.detach().mean() / numel, "n_tangent": n_dual}
    loss = loss_V
    if aux:
        sq_v = (out[2] - v_g).pow(2).flatten(1).sum(1)
        loss_v = adaptive_weight(sq_v, cfg.adp_eps, cfg.adp_power).mean()
        loss = loss + loss_v
        metrics.update(loss_v=loss_v.detach(), mse_v=sq_v.detach().mean() / numel)
    metrics["loss"] = loss.detach()
    return loss, metrics


def mf_loss(model, x, y, e, t, r, omega=1.0, kappa=0.0, t_start=0.0, t_end=1.0, drop=None,
            cfg: LossConfig | None = None):
    """Original MeanFlow u-loss with fixed-scale guidance; returns ``(loss, metrics)``."""
    cfg = LossConfig.for_method("mf") if cfg is None else cfg
    if omega < 1.0:
        raise ValueError(f"omega must be >= 1, got {omega}")
    if not 0.0 <= t_start <= t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start <= t_end <= 1, got t_start={t_start}, t_end={t_end}")
    null = model.cfg.num_classes
    _, n_dual, ordered = _check_inputs(model, x, y, e, t, r, drop)
    drop = torch.zeros_like(y, dtype=torch.bool) if drop is None else drop
    x, y, e, t, r, drop = _tangent_first(ordered, x, y, e, t, r, drop)
    z, v_t = _interpolate(x, e, t)
    v_g = v_t
    if omega != 1.0 or kappa != 0.0:
        with torch.no_grad():
            guided = (t >= t_start) & (t <= t_end) & ~drop
            zg, tg, yg = z[guided], t[guided], y[guided]
            n_g = zg.shape[0]
            u_both = model.velocity(torch.cat([zg, zg]), torch.cat([tg, tg]), torch.cat([tg, tg]),
                                    torch.cat([torch.full_like(yg, null), yg]))
            v_g = v_t.clone()
            v_g[guided] = omega * v_t[guided] + (1 - omega - kappa) * u_both[:n_g] + kappa * u_both[n_g:]
    y = torch.where(drop, null, y)
    u, u_t = model.forward_with_tangent(z, v_g[:n_dual], t, r, y)
    with torch.no_grad():
        target = v_g.clone()
        target[:n_dual] -= _bcast(t - r)[:n_dual] * u_t
    sq = (u - target).pow(2).flatten(1).sum(1)
    loss = adaptive_weight(sq, cfg.adp_eps, cfg.adp_power).mean()
    metrics = {"loss": loss.detach(), "mse_u": sq.detach().mean() / v_g[0].numel(), "n_tangent": n_dual}
    return loss, metrics


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _interpolate(x, e, t):
    tb = _bcast(t).to(x.dtype)
    return (1 - tb) * x + tb * e, e - x


def _tangent_first(ordered: bool, *tensors):
    """Move samples with ``r < t`` (``tensors[3] > tensors[4]``) to the front, stably, unless ``ordered``.

    The sampler puts its ``r = t`` samples last, so usually nothing is copied.
    """
    if ordered:
        return tensors
    perm = torch.argsort((tensors[4] >= tensors[3]).to(torch.int8), stable=True)
    return tuple(v[perm] for v in tensors)


def _check_inputs(model, x, y, e, t, r, drop, **cond):
    """Shapes, dtypes and value ranges of a loss's inputs, and the tangent schedule, in one host sync.

    Returns ``(batch, n_dual, ordered)``: the number of samples with ``r < t`` (they get a tangent) and
    whether they already come first.
    """
    cfg = model.cfg
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != shape \
            or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating tensor of shape (batch, {', '.join(map(str, shape))}), got {got}")
    batch = x.shape[0]
    if not isinstance(e, torch.Tensor) or e.shape != x.shape or e.dtype != x.dtype or e.device != x.device:
        got = f"{tuple(e.shape)} {e.dtype} {e.device}" if isinstance(e, torch.Tensor) else type(e).__name__
        raise ValueError(f"e must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got {got}")
    named = {"y": y, "t": t, "r": r, **cond}
    if drop is not None:
        named["drop"] = drop
    for name, v in named.items():
        if not isinstance(v, torch.Tensor) or v.shape != (batch,) or v.device != x.device:
            got = f"{tuple(v.shape)} on {v.device}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{name} must be a tensor of shape ({batch},) on {x.device}, got {got}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    if drop is not None and drop.dtype != torch.bool:
        raise ValueError(f"drop must be a boolean mask, got dtype {drop.dtype}")
    checks = {
        f"y must be in [0, {cfg.num_classes}] (label {cfg.num_classes} is the null class)":
            ((y < 0) | (y > cfg.num_classes)).any(),
        "t must be in [0, 1]": ((t < 0) | (t > 1)).any(),
        "r must satisfy 0 <= r <= t (got t < r)": ((r < 0) | (r > t)).any(),
        "x and e must be finite (found NaN or inf)": ~(torch.isfinite(x).all() & torch.isfinite(e).all()),
    }
    if cond:
        checks["omega must be >= 1"] = (cond["omega"] < 1).any()
        checks["t_min, t_max must satisfy 0 <= t_min <= t_max <= 1"] = (
            (cond["t_min"] < 0) | (cond["t_min"] > cond["t_max"]) | (cond["t_max"] > 1)).any()
    needs = r < t
    stats = [*checks.values(), needs.sum(), (needs[1:] <= needs[:-1]).all()]
    *flags, n_dual, ordered = torch.stack([v.long() for v in stats]).tolist()
    bad = [msg for msg, flag in zip(checks, flags, strict=True) if flag]
    if bad:
        raise ValueError("; ".join(bad))
    return batch, int(n_dual), bool(ordered)
