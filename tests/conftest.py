"""Shared pytest setup.

- The one GPU mechanism: tests marked ``gpu`` run only with CUDA and the interpreter off
  (:data:`numerics.ON_GPU`); tests marked ``triton`` launch Triton kernels and run with CUDA or
  under ``TRITON_INTERPRET=1``. Everything else is skipped with the reason.
- The fixtures of :mod:`numerics` (``poisoned``: NaN-filled allocations, ``seeded``: a printed
  fresh seed), for every test module.
- Helpers the test modules share (imported as ``from conftest import ...``): :func:`randomize_`,
  :func:`tiny_vae`, :func:`run_torchrun`.
"""

import os
import subprocess
import sys
from pathlib import Path

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


def tiny_vae(path: Path, **config) -> None:
    """Save a tiny random AutoencoderKL (downsampling 2, 4 latent channels, seed 0) to ``path``.

    ``config`` overrides or adds AutoencoderKL arguments (e.g. ``scaling_factor``)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    args = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    diffusers.AutoencoderKL(**{**args, **config}).save_pretrained(path)


def run_torchrun(module: str, *argv: str) -> subprocess.CompletedProcess:
    """``python -m module *argv`` under torchrun with 2 local processes (one thread each, free port, 300 s)."""
    from imf.dist import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        module,
        *argv,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
