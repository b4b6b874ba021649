"""Dual block ops (RMSNorm, QK-RMSNorm + RoPE, SwiGLU, linear) against their baselines.

Library only (the CLI lives in ``bench/__main__.py``); every function returns a list of row dicts.

One *step* is what a training step does with each op: the dual forward (primal + tangent), then
the backward of the primal only (``torch.autograd.grad`` of ``y`` against a fixed ``dy``; the
tangent is dropped, as the MeanFlow losses stop its gradient). Implementations:

* ``imf_kernels``        the fused ops (``rms_norm_jvp``, ``qk_norm_rope_jvp``, ``swiglu_jvp``,
                         ``linear_dual``);
* ``torch_func_jvp``     ``torch.func.jvp`` of the reference primal + autograd (the plain-PyTorch
                         baseline; it records the tangent computation in the autograd graph too);
* ``reference_explicit`` the reference ``*_jvp`` (explicit tangent formula under ``no_grad``, what
                         the model's ``"reference"`` backend runs) + autograd.

Every implementation reads the same inputs: ``q`` / ``k`` as strided views of one
``(B, L, 3, H, Dh)`` projection and the SwiGLU halves as views of one ``(..., 2 * hidden)``
tensor, as the model produces them. Tangents cover the whole batch (``torch.func.jvp`` has no
prefix mode).

Numbers per row: ``ms`` (median; ``ms_p20``, ``ms_p80``), ``gbps`` = the fused step's minimal HBM
traffic over the time (the same byte count for every implementation, so it compares speed),
``tflops`` for the linear layer (4 GEMMs: ``y``, ``y_t``, ``dx``, ``dW``; ``8 M K N``), ``peak_mem_mb``
(``torch.cuda.max_memory_allocated`` during the step beyond what was allocated before it) and
``fwd_retained_mb`` (what the forward leaves allocated for the backward: outputs + saved tensors),
and ``max_err_y`` / ``max_err_y_t`` (max abs difference from ``torch_func_jvp``'s outputs).
Minimal traffic, in elements of the op's activation (``E`` = ``numel`` of ``x``, ``q`` or ``h``)::

    rms_norm, qk_norm_rope   fwd: read x, x_t; write y, y_t      bwd: read dy, x; write dx     7 E
    swiglu                   fwd: read a, b, a_t, b_t; write h, h_t
                             bwd: read dh, a, b; write da, db                                 11 E
    linear                   x, x_t, y, y_t, dy, dx (M x K or M x N) and W, dW

(weights, ``rstd`` and the autograd scatter of a view's gradient into its base are not counted).
Timing: ``triton.testing.do_bench`` (warm-up excluded, L2 flushed between runs).

``smoke()`` runs tiny shapes on the CPU (Triton interpreter, wall-clock timing, no memory
numbers) to check the harness, not speed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import imf_kernels
import torch
import torch.nn.functional as F
from imf_kernels import reference
from imf_kernels._checks import interpreting

from bench.common import bench_callable

Dual = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Case:
    """One op at one shape: the leaves to differentiate, ``dy``, and ``impl name -> dual forward``."""

    op: str
    shape: dict
    leaves: list[torch.Tensor]
    dy: torch.Tensor
    impls: dict[str, Dual]
    bytes: int
    flops: float | None = None


def _randn(*shape, dtype, device, grad=False, scale=1.0):
    return (scale * torch.randn(*shape, dtype=torch.float32, device=device)).to(dtype).requires_grad_(grad)


def setup_rms_norm(batch=16, seq=276, dim=768, *, dtype=torch.bfloat16, device="cuda") -> Case:
    x = _randn(batch, seq, dim, dtype=dtype, device=device, grad=True)
    w = (1 + _randn(dim, dtype=dtype, device=device, scale=0.1)).requires_grad_()
    x_t, dy = _randn(batch, seq, dim, dtype=dtype, device=device), _randn(batch, seq, dim, dtype=dtype, device=device)
    impls = {
        "imf_kernels": lambda: imf_kernels.rms_norm_jvp(x, x_t, w),
        "torch_func_jvp": lambda: torch.func.jvp(lambda a: reference.rms_norm(a, w), (x,), (x_t,)),
        "reference_explicit": lambda: reference.rms_norm_jvp(x, x_t, w),
    }
    shape = {"batch": batch, "seq": seq, "dim": dim}
    return Case("rms_norm", shape, [x, w], dy, impls, 7 * x.numel() * x.element_size())


def setup_qk_norm_rope(batch=16, seq=276, heads=12, head_dim=64, *, dtype=torch.bfloat16, device="cuda") -> Case:
    qkv = _randn(batch, seq, 3, heads, head_dim, dtype=dtype, device=device, grad=True)
    qkv_t = _randn(batch, seq, 3, heads, head_dim, dtype=dtype, device=device)
    w = (1 + _randn(head_dim, dtype=dtype, device=device, scale=0.1)).requires_grad_()
    cos, sin = reference.rope_tables(seq, head_dim, device=device)
    dy = _randn(batch, heads, seq, head_dim, dtype=dtype, device=device)

    impls = {
        "imf_kernels": lambda: imf_kernels.qk_norm_rope_jvp(qkv[:, :, 0], qkv_t[:, :, 0], w, cos, sin),
        "torch_func_jvp": lambda: torch.func.jvp(
            lambda q: reference.qk_norm_rope(q, w, cos, sin), (qkv[:, :, 0],), (qkv_t[:, :, 0],)
        ),
        "reference_explicit": lambda: reference.qk_norm_rope_jvp(qkv[:, :, 0], qkv_t[:, :, 0], w, cos, sin),
    }
    shape = {"batch": batch, "seq": seq, "heads": heads, "head_dim": head_dim}
    return Case("qk_norm_rope", shape, [qkv, w], dy, impls, 7 * dy.numel() * dy.element_size())


def setup_swiglu(batch=16, seq=276, hidden=2048, *, dtype=torch.bfloat16, device="cuda") -> Case:
    ab = _randn(batch, seq, 2 * hidden, dtype=dtype, device=device, grad=True)
    ab_t = _randn(batch, seq, 2 * hidden, dtype=dtype, device=device)
    dy = _randn(batch, seq, hidden, dtype=dtype, device=device)
    halves = lambda t: t.chunk(2, dim=-1)
    impls = {
        "imf_kernels": lambda: imf_kernels.swiglu_jvp(*halves(ab), *halves(ab_t)),
        "torch_func_jvp": lambda: torch.func.jvp(lambda t: reference.swiglu(*halves(t)), (ab,), (ab_t,)),
        "reference_explicit": lambda: reference.swiglu_jvp(*halves(ab), *halves(ab_t)),
    }
    shape = {"batch": batch, "seq": seq, "hidden": hidden}
    return Case("swiglu", shape, [ab], dy, impls, 11 * dy.numel() * dy.element_size())


def setup_linear(batch=16, seq=276, in_features=768, out_features=2304, *, dtype=torch.bfloat16, device="cuda") -> Case:
    x = _randn(batch, seq, in_features, dtype=dtype, device=device, grad=True)
    x_t = _randn(batch, seq, in_features, dtype=dtype, device=device)
    w = _randn(out_features, in_features, dtype=dtype, device=device, grad=True, scale=in_features**-0.5)
    b = _randn(out_features, dtype=dtype, device=device, grad=True)
    dy = _randn(batch, seq, out_features, dtype=dtype, device=device)
    impls = {
        "imf_kernels": lambda: imf_kernels.linear_dual(x, x_t, w, b),
        "torch_func_jvp": lambda: torch.func.jvp(lambda a: F.linear(a, w, b), (x,), (x_t,)),
        "reference_explicit": lambda: reference.linear_dual(x, x_t, w, b),
    }
    rows = batch * seq
    size = x.element_size()
    traffic = size * (3 * rows * in_features + 3 * rows * out_features + 2 * w.numel())
    shape = {"batch": batch, "seq": seq, "in_features": in_features, "out_features": out_features}
    return Case("linear", shape, [x, w, b], dy, impls, traffic, flops=8.0 * rows * in_features * out_features)


def _step(case: Case, impl: str) -> Callable[[], None]:
    dual = case.impls[impl]

    def step():
        y, _ = dual()
        torch.autograd.grad(y, case.leaves, case.dy)

    return step


def _memory(case: Case, impl: str, device) -> dict:
    """``peak_mem_mb`` of one step and ``fwd_retained_mb`` (allocated after the forward), beyond the inputs."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    y, y_t = case.impls[impl]()
    torch.cuda.synchronize(device)
    retained = torch.cuda.memory_allocated(device) - base
    torch.autograd.grad(y, case.leaves, case.dy)
    del y, y_t
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    return {"peak_mem_mb": peak / 2**20, "fwd_retained_mb": retained / 2**20}


def _time(step: Callable[[], None], device, reps: int) -> dict:
    """``ms`` (median), ``ms_p20`` and ``ms_p80`` of ``step`` (:func:`bench.common.bench_callable`)."""
    stats = bench_callable(step, device, reps=reps)
    return {k: stats[k] for k in ("ms", "ms_p20", "ms_p80")}


def measure(case: Case, device, reps: int = 3) -> list[dict]:
    """One row per implementation of ``case`` (``reps`` is used on CPU only)."""
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    with torch.no_grad():
        y_ref, yt_ref = (t.detach().float() for t in case.impls["torch_func_jvp"]())
    rows = []
    for impl, dual in case.impls.items():
        row = {"op": case.op, "impl": impl, "device": name, "dtype": str(case.dy.dtype)[6:], **case.shape}
        with torch.no_grad():
            y, y_t = dual()
        row["max_err_y"] = (y.float() - y_ref).abs().max().item()
        row["max_err_y_t"] = (y_t.float() - yt_ref).abs().max().item()
        row.update(_time(_step(case, impl), device, reps))
        row["gbps"] = case.bytes / (row["ms"] * 1e-3) / 1e9
        row["tflops"] = case.flops / (row["ms"] * 1e-3) / 1e12 if case.flops else None
        if torch.device(device).type == "cuda":
            row.update(_memory(case, impl, device))
        else:
            row.update(peak_mem_mb=None, fwd_retained_mb=None)
        rows.append(row)
    ours = rows[0]["ms"]
    for row in rows:
        row["imf_speedup"] = row["ms"] / ours
    return rows


def run(dtype: torch.dtype = torch.bfloat16, device="cuda") -> list[dict]:
    """Model sizes: iMF-B/2 (d 768, 12 heads, hidden 2048) and iMF-L/XL (d 1024, 16 heads, hidden
    2730), batch 16 x 276 tokens; head_dim 72 (MF-XL/2) for QK-norm + RoPE."""
    kw = {"dtype": dtype, "device": device}
    cases = [
        setup_rms_norm(16, 276, 768, **kw),
        setup_rms_norm(16, 276, 1024, **kw),
        setup_qk_norm_rope(16, 276, 12, 64, **kw),
        setup_qk_norm_rope(16, 276, 16, 72, **kw),
        setup_swiglu(16, 276, 2048, **kw),
        setup_swiglu(16, 276, 2730, **kw),
        setup_linear(16, 276, 768, 2304, **kw),
        setup_linear(16, 276, 1024, 2 * 2730, **kw),
    ]
    return [row for case in cases for row in measure(case, device)]


def smoke() -> list[dict]:
    """Tiny fp32 shapes on the CPU under ``TRITON_INTERPRET=1``: checks the harness, not speed."""
    if not interpreting():
        raise RuntimeError("smoke() runs the Triton kernels on the CPU: set TRITON_INTERPRET=1 before importing")
    kw = {"dtype": torch.float32, "device": "cpu"}
    cases = [
        setup_rms_norm(2, 9, 72, **kw),
        setup_qk_norm_rope(2, 9, 2, 16, **kw),
        setup_swiglu(2, 9, 48, **kw),
        setup_linear(2, 9, 24, 40, **kw),
    ]
    return [row for case in cases for row in measure(case, "cpu", reps=1)]
