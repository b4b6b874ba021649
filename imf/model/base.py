"""The public interface both networks share: call signatures, input checks, backend switching.

::

    model(z, t, r, y, omega, t_min, t_max) -> u                 # average velocity, u-head
    model.velocity(z, t, r, y, omega, t_min, t_max) -> v        # instantaneous velocity
    model.forward_with_tangent(z, z_t, t, r, y, omega, t_min, t_max) -> (u, u_t)

``u_t`` is the derivative of ``u`` along ``(dz, dt, dr) = (z_t, 1, 0)``, computed by an explicit
primal + tangent pass through every layer (time embeddings and condition tokens included); it is
detached, the primal stays differentiable. ``z_t`` may cover a leading-batch prefix of ``z``: the
samples after it get no tangent work (the losses put their ``r = t`` samples there).

**Input checks.** Shapes, dtypes and devices are checked on the host (free). Value ranges (labels in
``[0, num_classes]``, ``0 <= r <= t <= 1``, ``omega >= 1``, ``0 <= t_min <= t_max <= 1``) cost one
device-to-host read per call (:mod:`imf.model.checks`); ``check_values=False`` skips it for callers
that checked the same values already (the losses and :func:`imf.sample.generate` do, once per step).
Every failure is a ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from imf.config import ModelConfig
from imf.model.checks import condition_checks, raise_if_invalid
from imf.model.layers import DualModule
from imf.ops import make_ops


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


def _describe(v) -> str:
    return f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"{type(v).__name__}"


class MeanFlowNet(DualModule):
    """Shared input validation, backend switching, the public call signatures and the first layer.

    Subclasses implement ``_run(z, z_t, cond, head)`` and ``init_weights()``.
    """

    cfg: ModelConfig

    def __init__(self, cfg: ModelConfig):
        """Hold ``cfg`` and build the layer both models start with: ``patch_embed`` (patch values -> width)."""
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_size**2 * cfg.in_channels, cfg.dim)

    def set_backend(self, backend: str) -> MeanFlowNet:
        ops = make_ops(backend)
        for m in self.modules():
            if isinstance(m, DualModule):
                m.ops = ops
        self.backend = backend
        return self

    @property
    def has_v_head(self) -> bool:
        return False

    def forward(self, z, t, r, y, omega=None, t_min=None, t_max=None, *, check_values: bool = True):
        cond = self._check(z, None, t, r, y, omega, t_min, t_max, check_values)
        return self._run(z, None, cond, head="u")[0]

    def velocity(self, z, t, r, y, omega=None, t_min=None, t_max=None, *, check_values: bool = True):
        """Instantaneous-velocity prediction (the v-head, or ``u`` at ``h = 0`` without one)."""
        cond = self._check(z, None, t, r, y, omega, t_min, t_max, check_values)
        u, _, v = self._run(z, None, cond, head="v")
        return u if v is None else v

    def forward_with_tangent(
        self,
        z,
        z_t,
        t,
        r,
        y,
        omega=None,
        t_min=None,
        t_max=None,
        *,
        with_velocity: bool = False,
        check_values: bool = True,
    ):
        """``(u, u_t)``, or ``(u, u_t, v)`` with ``with_velocity`` (v-head output of the same call)."""
        if with_velocity and not self.has_v_head:
            raise ValueError("with_velocity=True needs a model with v_head='aux'")
        cond = self._check(z, z_t, t, r, y, omega, t_min, t_max, check_values, tangent=True)
        u, u_t, v = self._run(z, z_t if z_t.shape[0] else None, cond, head="u+v" if with_velocity else "u")
        if u_t is None:
            u_t = z_t.new_zeros(z_t.shape)
        return (u, u_t, v) if with_velocity else (u, u_t)

    def _check(self, z, z_t, t, r, y, omega, t_min, t_max, check_values: bool, tangent: bool = False) -> dict:
        cfg = self.cfg
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        dims = ", ".join(map(str, shape))
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or tuple(z.shape[1:]) != shape:
            raise ValueError(f"z must be a tensor of shape (batch, {dims}), got {_describe(z)}")
        if not z.is_floating_point():
            raise ValueError(f"z must be a floating tensor, got dtype {z.dtype}")
        batch = z.shape[0]
        if tangent:
            if (
                not isinstance(z_t, torch.Tensor)
                or z_t.dim() != 4
                or tuple(z_t.shape[1:]) != shape
                or z_t.shape[0] > batch
            ):
                raise ValueError(f"z_t must be a tensor of shape (n <= {batch}, {dims}), got {_describe(z_t)}")
            if z_t.dtype != z.dtype or z_t.device != z.device:
                raise ValueError(
                    f"z_t must match z in dtype/device ({z.dtype}, {z.device}), got {z_t.dtype}, {z_t.device}"
                )
        cond = {"t": t, "r": r, "y": y}
        if cfg.arch == "imf":
            cond.update(omega=omega, t_min=t_min, t_max=t_max)
        for name, val in cond.items():
            if not isinstance(val, torch.Tensor) or val.shape != (batch,):
                raise ValueError(f"{name} must be a tensor of shape ({batch},), got {_describe(val)}")
            if val.device != z.device:
                raise ValueError(f"{name} must be on {z.device}, got {val.device}")
            floating = name != "y"
            if val.is_floating_point() != floating or val.dtype == torch.bool:
                want = "a floating" if floating else "an integer (class label)"
                raise ValueError(f"{name} must have {want} dtype, got {val.dtype}")
        if check_values:
            raise_if_invalid(condition_checks(cfg.num_classes, **cond))
        return cond


__all__ = ["MeanFlowNet", "patchify", "unpatchify"]
