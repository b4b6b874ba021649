"""Argument values of ``imf.evaluate``: parsing, checks and the sweep cells; :class:`EvalError`.

Every check raises :class:`EvalError` (a :class:`imf.cli.UserError`) naming the option, what it got
and what is expected, before any model is loaded or any process group is joined.
"""

from __future__ import annotations

import math

from imf.cli import UserError
from imf.config import EVAL_GUIDANCE


class EvalError(UserError):
    """A bad argument or a missing/mismatched input, raised before any sampling."""


def parse_floats(text: str, name: str) -> list[float]:
    """``"1.0,2.0"`` -> ``[1.0, 2.0]``."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise EvalError(f"{name} must be comma-separated numbers (e.g. 1.0,2.0), got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise EvalError(f"{name} must be finite numbers, got {text!r}")
    return values


def parse_omegas(text: str) -> list[float]:
    values = parse_floats(text, "--omega")
    bad = [v for v in values if v < 1.0]
    if bad:
        raise EvalError(f"--omega values must be >= 1 (1 = no guidance), got {bad}")
    return values


def parse_intervals(text: str) -> list[tuple[float, float]]:
    """``"0.0:1.0,0.4:0.65"`` -> ``[(0.0, 1.0), (0.4, 0.65)]``; each needs ``0 <= t_min <= t_max <= 1``."""
    out = []
    for part in text.split(","):
        pieces = part.split(":")
        if len(pieces) != 2:
            raise EvalError(f"--interval entries are t_min:t_max (e.g. 0.4:0.65), got {part!r} in {text!r}")
        lo, hi = parse_floats(",".join(pieces), "--interval")
        if not 0.0 <= lo <= hi <= 1.0:
            raise EvalError(f"--interval {part!r}: need 0 <= t_min <= t_max <= 1")
        out.append((lo, hi))
    return out


def parse_steps(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise EvalError(f"--steps must be comma-separated integers (e.g. 1 or 1,2), got {text!r}") from None
    if any(v < 1 for v in values):
        raise EvalError(f"--steps values must be >= 1, got {values}")
    return values


def check_positive(**values: int) -> None:
    """Each ``--option value`` pair (underscores for dashes) must be a positive integer."""
    for name, v in values.items():
        if v <= 0:
            raise EvalError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")


def check_num(num: int, num_classes: int, world: int) -> None:
    """``num`` must be a multiple of ``num_classes`` (balanced labels) and of the world size (equal shares)."""
    need = math.lcm(num_classes, world)
    if num > 0 and num % need == 0:
        return
    suggestions = sorted({n for n in (num // need * need, (num // need + 1) * need) if n > 0}) if num > 0 else [need]
    raise EvalError(
        f"--num {num} must be a positive multiple of {need} = lcm(num_classes {num_classes}, world size {world}): "
        f"every class gets num / num_classes samples and every rank num / world; e.g. "
        + " or ".join(f"--num {n}" for n in suggestions)
    )


def sweep_cells(
    steps: list[int], omegas: list[float] | None, intervals: list[tuple[float, float]] | None, preset: str | None
) -> list[tuple[int, float, float, float]]:
    """``(steps, omega, t_min, t_max)`` per cell; a missing omega or interval list is the published evaluation
    setting of ``preset`` at that NFE (:data:`imf.config.EVAL_GUIDANCE`), else no guidance on ``[0, 1]``."""
    cells = []
    for n in steps:
        published = EVAL_GUIDANCE.get(f"{preset}@{n}" if n > 1 else preset)
        ws = omegas or [published.omega if published else 1.0]
        ts = intervals or [(published.t_min, published.t_max) if published else (0.0, 1.0)]
        cells += [(n, w, lo, hi) for lo, hi in ts for w in ws]
    return cells


__all__ = [
    "EvalError",
    "check_num",
    "check_positive",
    "parse_floats",
    "parse_intervals",
    "parse_omegas",
    "parse_steps",
    "sweep_cells",
]
