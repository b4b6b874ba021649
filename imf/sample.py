"""Few-step generation with a trained average-velocity model, and image grids.

``t_k = linspace(1, 0, steps + 1)``, ``z_{k+1} = z_k - (t_k - t_{k+1}) u(z_k | t_k, r = t_{k+1}, y,
omega, t_min, t_max)``, starting from ``z_0 ~ N(0, I)``; one step is ``x = z_1 - u(z_1, 0, 1)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imf.model.checks import condition_checks, raise_if_invalid


def _per_sample(name: str, value, batch: int, device) -> torch.Tensor:
    if not isinstance(value, (int, float, torch.Tensor)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a float or a tensor of shape ({batch},), got {type(value).__name__}")
    v = torch.as_tensor(value, dtype=torch.float32, device=device)
    if v.dim() == 0:
        v = v.expand(batch)
    if v.shape != (batch,):
        raise ValueError(f"{name} must be a float or a tensor of shape ({batch},), got shape {tuple(v.shape)}")
    return v


@torch.no_grad()
def generate(
    model,
    y: torch.Tensor,
    omega=1.0,
    t_min=0.0,
    t_max=1.0,
    steps: int = 1,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sample ``len(y)`` images (latents) for class labels ``y`` in ``steps`` network evaluations.

    ``omega`` (>= 1) and the guidance interval ``[t_min, t_max]`` are floats or per-sample tensors
    (the iMF model is conditioned on them; the MF DiT ignores them). ``noise`` fixes ``z_0``.
    """
    cfg = model.cfg
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        got = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be a 1-D tensor of integer class labels, got {got}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    batch, device = y.shape[0], y.device
    omega, t_min, t_max = (
        _per_sample(n, v, batch, device) for n, v in (("omega", omega), ("t_min", t_min), ("t_max", t_max))
    )
    ones = torch.ones(batch, device=device)
    # t = 1 >= r = 0 always hold; one host sync checks the labels and the guidance
    raise_if_invalid(condition_checks(cfg.num_classes, y, ones, 0 * ones, omega, t_min, t_max))
    shape = (batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    if noise is None:
        z = torch.randn(shape, generator=generator, device=device)
    elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape:
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a tensor of shape {shape}, got {got}")
    else:
        z = noise.to(device=device, dtype=torch.float32)
    times = torch.linspace(1.0, 0.0, steps + 1, device=device)
    enabled = autocast_dtype is not None
    for k in range(steps):
        t = times[k].expand(batch)
        r = times[k + 1].expand(batch)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
            u = model(z, t, r, y, omega, t_min, t_max, check_values=False)
        z = z - (times[k] - times[k + 1]) * u.float()
    return z


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, *, value_range=(-1.0, 1.0), upscale: int = 1) -> Path:
    """Write ``(N, C, H, W)`` images (C = 1 or 3) as one PNG grid, ``nrow`` images per row."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W), got shape {tuple(images.shape)}")
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(c, rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        top, left = (i // nrow) * (h + 1) + 1, (i % nrow) * (w + 1) + 1
        grid[:, top : top + h, left : left + w] = x[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
