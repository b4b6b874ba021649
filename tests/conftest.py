"""Shared pytest setup.

- The one GPU mechanism: tests marked ``gpu`` run only with CUDA and the interpreter off
  (:data:`numerics.ON_GPU`); tests marked ``triton`` launch Triton kernels and run with CUDA or
  under ``TRITON_INTERPRET=1``. Everything else is skipped with the reason.
- The fixtures of :mod:`numerics` (``poisoned``: NaN-filled allocations, ``seeded``: a printed
  fresh seed), for every test module.
"""

import pytest
import torch
from numerics import CAN_RUN_TRITON, ON_GPU, poisoned, seeded  # noqa: F401  (fixtures for every module)


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: launches Triton kernels (needs CUDA or TRITON_INTERPRET=1)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device with TRITON_INTERPRET unset")
    skip_triton = pytest.mark.skip(reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip_gpu)
        elif "triton" in item.keywords and not CAN_RUN_TRITON:
            item.add_marker(skip_triton)


def randomize_(model: torch.nn.Module, std: float = 0.1, generator: torch.Generator | None = None):
    """Perturb every parameter (zero-initialised gates and output heads would make tests trivial)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
    return model
