"""MeanFlow (MF, u-loss) and improved MeanFlow (iMF, v-loss) training objectives.

All randomness comes in as arguments (``e``, ``t``, ``r``, ``omega``, the interval and the
class-drop mask; draw them with :func:`sample_training_inputs`), so a loss is a pure function of
the model and its inputs. Notation (design document in docs/, section 1)::

    z_t = (1 - t) x + t e,   v_t = e - x,   h = t - r,   adp(L) = L / sg(L + eps)^p

**iMF.** ``omega_eff = omega`` if ``t_min <= t <= t_max`` else 1. Without grad:
``v_c = v(z_t | h=0, y, omega_eff, [0, 1])``, ``v_u = v(z_t | h=0, null, 1, [0, 1])``,
``v_g = v_t + (1 - 1/omega_eff)(v_c - v_u)``; dropped samples: ``y -> null``, ``v_g -> v_t`` (after the
guidance, as in the official code: their tangent ``v_c`` keeps the true label).
Dual call: ``(u, du/dt)`` = JVP of ``u(z | h, y, omega, t_min, t_max)`` at tangents
``(v_c, dt=1, dr=0)`` and the v-head ``v`` of the same call; ``V = u + (t - r) sg(du/dt)``;
``loss = mean_b adp(sum (V - v_g)^2) + adp(sum (v - v_g)^2)`` (no v-term for ``v_head="boundary"``).

**MF.** In ``[t_start, t_end]``: ``v_g = omega v_t + (1 - omega - kappa) v_u + kappa v_cond`` with
``v_u = u(z_t | t, h=0, null)``, ``v_cond = u(z_t | t, h=0, y)``, else ``v_g = v_t``; dropped
samples ``v_g -> v_t``. ``(u, du/dt)`` = JVP at ``(v_g, 1, 0)``,
``loss = mean_b adp(sum (u - sg(v_g - (t - r) du/dt))^2)``.

Work the loss would throw away is not computed: samples with ``r = t`` get no tangent (it is
multiplied by ``t - r = 0``; they are moved behind the others and the model's tangent prefix
stops before them; the sampler already puts them last, so usually nothing is copied), and ``v_u`` is
evaluated only where its weight is non-zero.

**One host sync per step.** The input checks (shapes on the host; value ranges via
:mod:`imf.model.checks`) and the counts that shape the step (samples with a tangent, samples that need
``v_u``) are read in one device-to-host transfer; the model is then called with ``check_values=False``
and the subsets are selected by sorted indices, not boolean masks (which would sync on CUDA).
MF's guidance constants ``omega, kappa, t_start, t_end`` come from :class:`~imf.config.LossConfig`.
"""

from __future__ import annotations

import math

import torch

from imf.config import LossConfig
from imf.model.checks import Check, condition_checks, raise_if_invalid
from imf.phases import phase


def sample_training_inputs(
    batch_size: int, cfg: LossConfig, generator: torch.Generator | None = None, device: torch.device | str | None = None
):
    """Draw ``(t, r, omega, t_min, t_max, drop)`` for one rank's (micro-)batch as the official code does.

    ``t, r``: two logit-normal(``p_mean``, ``p_std``) draws, ``t`` the larger; the *first*
    ``cfg.fm_count(batch) = floor(fm_fraction * batch)`` samples of the official order get ``r = t``
    (flow-matching samples; iMF 50%, MF 75%). iMF: ``omega ~ omega^-beta`` on ``[1, 1 + s_max]`` (inverse CDF),
    ``t_min ~ U(t_min_range)``, ``t_max ~ U(t_max_range)``, FM samples ``[0, 1]``. MF: the fixed ``omega`` and
    ``[t_start, t_end]``.
    ``drop``: the *first* ``K ~ Binomial(batch, class_drop)`` samples of the official order (``K`` counts ``batch``
    uniforms below ``class_drop``), so the dropped labels are FM samples first: the official iMF and MF
    ``cond_drop``. The samples are i.i.d. but for these two masks, so the returned batch is the official order
    rotated by ``n_fm`` (the FM block last): the tangent samples lead and the loss reorders nothing.
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
    n_fm = cfg.fm_count(batch_size)
    # the official batch order, rotated so that its leading FM samples come last: position i is the official
    # sample (i + n_fm) mod B. Same FM/dropped pairing; the tangent samples already lead, as the loss needs them.
    official = (torch.arange(batch_size, device=device) + n_fm) % batch_size
    fm = official < n_fm
    r = torch.where(fm, t, r)
    drop = official < (rand() < cfg.class_drop).sum()
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
    cfg = (LossConfig() if cfg is None else cfg).validate()
    null = model.cfg.num_classes
    batch = _check_shapes(model, x, y, e, t, r, drop, omega=omega, t_min=t_min, t_max=t_max)
    drop = torch.zeros_like(y, dtype=torch.bool) if drop is None else drop
    omega_eff = torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))
    weight = torch.where(drop, 0.0, 1.0 - 1.0 / omega_eff)
    checks = _value_checks(model, x, e, y, t, r, omega=omega, t_min=t_min, t_max=t_max)
    n_dual, ordered, n_u = raise_if_invalid(checks, *_schedule(t, r), (weight > 0).sum())
    x, y, e, t, r, omega, t_min, t_max, drop, omega_eff, weight = _permute(
        _tangent_order(t, r, ordered), x, y, e, t, r, omega, t_min, t_max, drop, omega_eff, weight
    )
    z, v_t = _interpolate(x, e, t)
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    with phase("imf.guidance"), torch.no_grad():
        idx_u = _first_where(weight > 0, n_u)  # the samples whose v_u has a non-zero weight, in batch order
        nulls = torch.full((n_u,), null, dtype=y.dtype, device=y.device)
        v_both = model.velocity(
            torch.cat([z, z[idx_u]]),
            torch.cat([t, t[idx_u]]),
            torch.cat([t, t[idx_u]]),
            torch.cat([y, nulls]),
            torch.cat([omega_eff, ones[:n_u]]),
            torch.cat([zeros, zeros[:n_u]]),
            torch.cat([ones, ones[:n_u]]),
            check_values=False,
        )
        v_c, v_u = v_both[:batch], v_both[batch:]
        v_g = v_t.clone()
        v_g[idx_u] += _bcast(weight[idx_u]) * (v_c[idx_u] - v_u)
    y = torch.where(drop, null, y)
    aux = model.has_v_head
    # under autocast v_c comes out in the compute dtype; the tangent must match z
    with phase("imf.dual_forward"):
        out = model.forward_with_tangent(
            z, v_c[:n_dual].to(z.dtype), t, r, y, omega, t_min, t_max, with_velocity=aux, check_values=False
        )
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


def mf_loss(model, x, y, e, t, r, drop=None, cfg: LossConfig | None = None):
    """Original MeanFlow u-loss with fixed-scale guidance (``cfg.omega``, ``cfg.kappa`` on
    ``[cfg.t_start, cfg.t_end]``); returns ``(loss, metrics)``."""
    cfg = (LossConfig.for_method("mf") if cfg is None else cfg).validate()
    null = model.cfg.num_classes
    _check_shapes(model, x, y, e, t, r, drop)
    drop = torch.zeros_like(y, dtype=torch.bool) if drop is None else drop
    guided = (t >= cfg.t_start) & (t <= cfg.t_end) & ~drop
    n_dual, ordered, n_g = raise_if_invalid(_value_checks(model, x, e, y, t, r), *_schedule(t, r), guided.sum())
    x, y, e, t, r, drop, guided = _permute(_tangent_order(t, r, ordered), x, y, e, t, r, drop, guided)
    z, v_t = _interpolate(x, e, t)
    v_g = v_t
    if cfg.omega != 1.0 or cfg.kappa != 0.0:
        with phase("imf.guidance"), torch.no_grad():
            idx = _first_where(guided, n_g)
            zg, tg, yg = z[idx], t[idx], y[idx]
            u_both = model.velocity(
                torch.cat([zg, zg]),
                torch.cat([tg, tg]),
                torch.cat([tg, tg]),
                torch.cat([torch.full_like(yg, null), yg]),
                check_values=False,
            )
            v_g = v_t.clone()
            v_g[idx] = cfg.omega * v_t[idx] + (1 - cfg.omega - cfg.kappa) * u_both[:n_g] + cfg.kappa * u_both[n_g:]
    y = torch.where(drop, null, y)
    with phase("imf.dual_forward"):
        u, u_t = model.forward_with_tangent(z, v_g[:n_dual], t, r, y, check_values=False)
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


def _schedule(t, r) -> tuple[torch.Tensor, torch.Tensor]:
    """Device scalars: the number of samples with ``r < t`` (they get a tangent), and whether they come first."""
    needs = r < t
    return needs.sum(), (needs[1:] <= needs[:-1]).all()


def _tangent_order(t, r, ordered: bool) -> torch.Tensor | None:
    """Stable permutation moving the samples with ``r < t`` to the front; None when they already are."""
    return None if ordered else torch.argsort((r >= t).to(torch.int8), stable=True)


def _permute(perm: torch.Tensor | None, *tensors):
    return tensors if perm is None else tuple(v[perm] for v in tensors)


def _first_where(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` True entries of ``mask``, ascending (no sync: ``count`` is known)."""
    return torch.argsort((~mask).to(torch.int8), stable=True)[:count]


def _check_shapes(model, x, y, e, t, r, drop, **cond) -> int:
    """Shapes, dtypes and devices of a loss's inputs (host only); returns the batch size."""
    cfg = model.cfg
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != shape or not x.is_floating_point():
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
    return batch


def _value_checks(model, x, e, y, t, r, **cond) -> list[Check]:
    finite = torch.isfinite(x).flatten(1).all(1) & torch.isfinite(e).flatten(1).all(1)
    return [
        *condition_checks(model.cfg.num_classes, y, t, r, **cond),
        Check("x and e must be finite", ~finite, lambda i: "NaN or inf"),
    ]
