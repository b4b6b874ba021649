"""``examples/meanflow_func_jvp.py`` runs as the README says, and its MeanFlow loss (``torch.func.jvp`` over a
DiT) with the SDPA drop-in equals the same loss with ``imf_kernels.reference.attention`` (math attention,
plain PyTorch ops) in value and gradients."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_
from imf_kernels import reference
from numerics import assert_bound

pytestmark = pytest.mark.triton

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "meanflow_func_jvp.py"
SMALL = ["--steps", "2", "--batch", "4", "--dim", "32"]


def load_example():
    spec = importlib.util.spec_from_file_location("meanflow_func_jvp", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_from_the_command_line():
    """As the README writes it, without TRITON_INTERPRET: on a CPU the script turns the interpreter on itself."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(EXAMPLE), *SMALL], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line.split("  ")[0] for line in out.stdout.splitlines()] == ["step 1/2", "step 2/2"]


def test_example_loss_matches_math_attention(monkeypatch):
    """The example's loss (``torch.func.jvp`` over its DiT) and its gradients with the drop-in against the
    same with math attention, fp64 as the anchor (:func:`numerics.assert_bound`); random weights (the
    zero-initialised gates would hide attention), fixed seeds."""
    example = load_example()
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(5)
    model = randomize_(example.TinyDiT(dim=32, depth=2, heads=2, classes=4), std=0.3, generator=gen)
    x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    results = []
    for attention, dtype in (
        (example.attention, torch.float32),
        (reference.attention, torch.float32),
        (reference.attention, torch.float64),
    ):
        monkeypatch.setattr(example, "attention", attention)
        m = copy.deepcopy(model).to(dtype)
        _, mse = example.meanflow_loss(m, x.to(dtype), y, torch.Generator().manual_seed(6))
        mse.backward()
        results.append((mse.detach(), torch.cat([p.grad.flatten() for p in m.parameters()])))
    for i, name in enumerate(("mse", "grads")):
        assert_bound(name, results[0][i], results[1][i], results[2][i])
