"""The learning-rate schedule: linear warm-up, then constant (published iMF) or a cosine decay."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int, decay: str, min_ratio: float) -> float:
    """LR multiplier after ``step`` completed steps (``LambdaLR`` convention): linear warm-up
    ``(step + 1) / warmup``, then 1 (constant) or a cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler(optimizer, *, total: int, warmup: int, decay: str, min_ratio: float):
    """A ``LambdaLR`` over ``optimizer`` following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, total, warmup, decay, min_ratio))


__all__ = ["lr_factor", "scheduler"]
