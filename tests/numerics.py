"""The numerics every kernel test shares: one error bound, NaN-poisoned outputs, printed seeds.

**Error bound** (flash-attention's rule, STYLE.md). A kernel output ``out`` is compared with the
fp64 reference ``ref`` and with ``same_math``: the reference math run on the same inputs in the
kernel's own dtype. With the norm-relative error ``err(x) = ||x - ref|| / ||ref||``::

    err(out) <= 2 * err(same_math) + FLOOR[dtype]

The bound tracks what the dtype can do (tight for fp32, honest for bf16), and a kernel that is
wrong by more than rounding fails it. ``norm=`` replaces ``||ref||`` where a group of outputs is
judged together (attention's ``dq, dk, dv`` share one norm: at ``seq = 1`` ``dq`` is exactly 0).
A NaN anywhere in ``out`` makes ``err`` NaN, which fails the bound.

**NaN poisoning** (fixture ``poisoned``, exposed by ``conftest.py``). While a test runs,
``torch.empty``, ``torch.empty_like`` and ``torch.empty_strided`` return NaN-filled tensors, and
the fixture's value is the list of the floating buffers they returned. A kernel that leaves an
output element unwritten then fails the bound; ``any(out is b for b in poisoned)`` checks that an
output really came from a poisoned allocation.

**Seeds** (fixture ``seeded``). A fresh seed per test, printed (pytest shows it on failure), so
the inputs are new random draws every run and a failure can be replayed with
``IMF_TEST_SEED=<seed>``.

**GPU tests** are marked ``@pytest.mark.gpu``; ``conftest.py`` skips them unless CUDA is present
and the interpreter is off (:data:`ON_GPU`). Tests that launch Triton kernels on CPU tensors are
marked ``@pytest.mark.triton`` and skipped unless ``TRITON_INTERPRET=1`` or CUDA is present.
"""

from __future__ import annotations

import os

import pytest
import torch
from imf_kernels._checks import interpreting

INTERPRETING = interpreting()
ON_GPU = torch.cuda.is_available() and not INTERPRETING
CAN_RUN_TRITON = torch.cuda.is_available() or INTERPRETING
DEVICE = "cuda" if ON_GPU else "cpu"

# Added to the bound: a few units of the dtype's rounding at which 2x the reference error would
# still be too strict for a different (equally valid) summation order on a near-exact result.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor, norm: float | torch.Tensor | None = None) -> float:
    """``||x - ref|| / ||ref||`` in fp64 (``norm`` replaces ``||ref||``; a zero norm gives the absolute error)."""
    diff = (x.double() - ref.double()).norm()
    denom = ref.double().norm() if norm is None else torch.as_tensor(norm, dtype=torch.float64)
    return (diff / denom if denom > 0 else diff).item()


def assert_bound(
    name: str,
    out: torch.Tensor,
    same_math: torch.Tensor,
    ref: torch.Tensor,
    *,
    norm: float | torch.Tensor | None = None,
) -> None:
    """``err(out) <= 2 * err(same_math) + FLOOR[out.dtype]`` against the fp64 ``ref``.

    ``out`` must have ``ref``'s shape and ``same_math``'s dtype (the kernel's dtype).
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert out.dtype == same_math.dtype, f"{name}: dtype {out.dtype}, expected {same_math.dtype}"
    if ref.numel() == 0:
        return
    err, err_torch = rel_err(out, ref, norm), rel_err(same_math, ref, norm)
    bound = 2 * err_torch + FLOOR[out.dtype]
    assert err <= bound, (
        f"{name}: rel err {err:.3g} > bound {bound:.3g} (2 x torch {out.dtype} err {err_torch:.3g} + floor)"
    )


def _nan_filled(buffers: list[torch.Tensor], fn):
    def alloc(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.is_floating_point():
            buffers.append(t.fill_(float("nan")))
        return t

    return alloc


@pytest.fixture
def poisoned(monkeypatch) -> list[torch.Tensor]:
    """``torch.empty`` / ``empty_like`` / ``empty_strided`` return NaN-filled tensors during the test;
    the value is the list of the floating buffers they returned."""
    buffers: list[torch.Tensor] = []
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _nan_filled(buffers, getattr(torch, name)))
    return buffers


@pytest.fixture
def seeded() -> int:
    """Seeds torch's global RNG with a fresh seed (or ``IMF_TEST_SEED``), prints and returns it."""
    seed = int(os.environ.get("IMF_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"seed {seed} (replay: IMF_TEST_SEED={seed})")
    return seed
