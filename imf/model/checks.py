"""Value checks of the conditions, with one host sync for all of them.

The range of a tensor's values is only known on the device, so checking it costs a device-to-host
read (a sync on CUDA). Every public entry point checks, and each does it in **one** read:
:func:`condition_checks` builds per-sample "bad" masks on the device, :func:`raise_if_invalid`
reduces them and any extra integer statistics the caller needs (the losses' tangent schedule) into
one tensor and reads it once. Only when a check fails is more read back, to name the first bad sample.

The model's ``forward``, ``velocity`` and ``forward_with_tangent`` check unless called with
``check_values=False``; the losses (:mod:`imf.loss`) and :func:`imf.sample.generate` check their own
inputs once and then call the model with ``check_values=False``, so a training step stays at one sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Check:
    """``message`` holds for every sample where ``bad`` is False; ``got(i)`` describes sample ``i``'s values."""

    message: str
    bad: torch.Tensor
    got: Callable[[int], str]


def _show(name: str, v: torch.Tensor) -> Callable[[int], str]:
    return lambda i: f"{name}={v[i].item():.6g}"


def condition_checks(num_classes: int, y, t, r, omega=None, t_min=None, t_max=None) -> list[Check]:
    """Checks of the class labels, times and (when given) guidance conditions; ``(batch,)`` tensors.

    ``y`` in ``[0, num_classes]`` (``num_classes`` is the null label), ``0 <= r <= t <= 1``, ``omega >= 1``,
    ``0 <= t_min <= t_max <= 1``. NaN fails every range.
    """
    checks = [
        Check(
            f"y (class labels) must be in [0, {num_classes}] ({num_classes} is the null class)",
            (y < 0) | (y > num_classes),
            lambda i: f"y={int(y[i].item())}",
        ),
        Check("t must be in [0, 1]", ~((t >= 0) & (t <= 1)), _show("t", t)),
        Check(
            "r must satisfy 0 <= r <= t", ~((r >= 0) & (r <= t)), lambda i: f"r={r[i].item():.6g}, t={t[i].item():.6g}"
        ),
    ]
    if omega is not None:
        checks.append(Check("omega must be >= 1 (1 = no guidance)", ~(omega >= 1), _show("omega", omega)))
    if t_min is not None and t_max is not None:
        checks.append(
            Check(
                "t_min, t_max must satisfy 0 <= t_min <= t_max <= 1",
                ~((t_min >= 0) & (t_min <= t_max) & (t_max <= 1)),
                lambda i: f"t_min={t_min[i].item():.6g}, t_max={t_max[i].item():.6g}",
            )
        )
    return checks


def raise_if_invalid(checks: list[Check], *stats: torch.Tensor) -> list[int]:
    """Read every check's verdict and the integer ``stats`` in one host sync; return the stats as ints.

    Raises ``ValueError`` listing each failed check with its first bad sample.
    """
    values = torch.stack([c.bad.any().long() for c in checks] + [s.long() for s in stats]).tolist()
    flags, out = values[: len(checks)], values[len(checks) :]
    failed = [c for c, flag in zip(checks, flags, strict=True) if flag]
    if failed:  # the error path may read more
        parts = []
        for c in failed:
            i = int(c.bad.flatten().nonzero()[0].item())
            parts.append(f"{c.message}, got {c.got(i)} at sample {i}")
        raise ValueError("; ".join(parts))
    return out


__all__ = ["Check", "condition_checks", "raise_if_invalid"]
