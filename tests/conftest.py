"""Shared pytest setup: GPU tests are marked ``gpu`` and skipped when CUDA is absent."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def randomize_(model: torch.nn.Module, std: float = 0.1, generator: torch.Generator | None = None):
    """Perturb every parameter (zero-initialised gates and output heads would make tests trivial)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
    return model
