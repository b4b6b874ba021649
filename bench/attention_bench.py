"""Attention kernels against their baselines: time, TFLOP/s and peak memory.

Library only (the CLI lives in ``bench/__main__.py``); every function returns a list of row dicts.

* ``attention`` (``imf_kernels.attention``) vs torch SDPA with the flash backend and, where it
  runs, the cuDNN backend; modes ``fwd`` and ``fwd+bwd``. In ``fwd+bwd`` also
  ``imf_kernels_atomic_bwd``: the same op with the opt-in 5-matmul backward
  (``IMF_KERNELS_ATTN_BWD=atomic``, :mod:`imf_kernels.attention_bwd_atomic_op`); its ``imf_speedup``
  is its time over the default deterministic backward's (< 1: atomic is faster).
* ``attention_jvp`` (``imf_kernels.attention_jvp``: primal + tangent forward, then the backward of
  the primal only) vs ``torch.func.jvp`` over math attention + autograd
  (:func:`imf_kernels.reference.attention_jvp_autodiff`) and vs the PyPI package
  ``jvp-flash-attention`` (``JVPAttn.fwd_dual`` on forward-AD dual tensors) when importable;
  modes ``fwd`` (the dual forward) and ``fwd+bwd``. Also the SDPA drop-in under ``torch.func.jvp``
  (``sdpa_dropin_func_jvp``: ``imf_kernels.scaled_dot_product_attention`` through functorch and its jvp
  rule, then the flash backward): its ratio to ``imf_kernels`` is the overhead of the functorch route
  (it runs the primal kernel, then the fused kernel: 8 matmuls' worth of forward against 6), and it is
  charged the same FLOPs.

FLOPs (real multiply-adds counted as 2), per (batch, head), ``L = seq``, ``D = head_dim``; one
``L x L x D`` matmul is ``2 L^2 D``::

    attention fwd        2 matmuls (S = q k^T, o = P v)                          4 L^2 D
    attention bwd        5 matmuls (S recomputed, dv = P^T do, dP = do v^T,
                                    dq = dS k, dk = dS^T q)                     10 L^2 D
    attention_jvp fwd    6 matmuls (S, S_t = q_t k^T + q k_t^T (2), P v,
                                    P_t v, P v_t) = 3x the primal forward       12 L^2 D
    attention_jvp bwd    the primal backward                                    10 L^2 D

The same counts are used for every implementation (a baseline that does more work, e.g. math
attention materialising ``L x L`` tensors, is charged the same FLOPs, so TFLOP/s compares
speed). Timing: ``triton.testing.do_bench`` (warm-up excluded, L2 flushed between runs, median
with 20th/80th percentiles); peak memory: ``torch.cuda.max_memory_allocated`` during one call
beyond what was allocated before it (inputs are not counted). The same :func:`setup` tensors feed
the speed and the memory run. An implementation that fails on a shape (out of memory, unsupported
head_dim or sequence length) gets a row with ``error`` instead of numbers.

``smoke()`` runs tiny shapes on the CPU (Triton interpreter for our kernels, wall-clock timing, no
memory numbers) to check the harness, not speed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import imf_kernels
import torch
import torch.nn.functional as F
from imf_kernels import reference
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import bench_callable, is_cuda


def flops(op: str, mode: str, batch: int, heads: int, seq: int, head_dim: int) -> float:
    """FLOPs of one call (see the module docstring for the matmul counts)."""
    matmul = 2.0 * batch * heads * seq * seq * head_dim
    forward = {"attention": 2, "attention_jvp": 6}[op]
    return matmul * (forward + (5 if mode == "fwd+bwd" else 0))


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_t: torch.Tensor
    k_t: torch.Tensor
    v_t: torch.Tensor
    do: torch.Tensor

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [self.q, self.k, self.v]


def setup(batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype, device) -> Inputs:
    """Contiguous ``(batch, heads, seq, head_dim)`` inputs (``q, k, v`` require grad), tangents, ``do``."""

    def rand(grad=False):
        return torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype).requires_grad_(grad)

    return Inputs(rand(True), rand(True), rand(True), rand(), rand(), rand(), rand())


def _sdpa(backend: SDPBackend):
    def run(x: Inputs):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(x.q, x.k, x.v)

    return run


def _jvp_flash_attention(x: Inputs):
    """``jvp-flash-attention``'s dual forward; returns the primal (differentiable) output."""
    import torch.autograd.forward_ad as fwAD
    from jvp_flash_attention.jvp_attention import JVPAttn

    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in ((x.q, x.q_t), (x.k, x.k_t), (x.v, x.v_t))]
        return fwAD.unpack_dual(JVPAttn.fwd_dual(*duals)).primal


# Implementations that are ours with another backward: timed in fwd+bwd only, with IMF_KERNELS_ATTN_BWD set.
BACKWARD_PATHS = {"imf_kernels_atomic_bwd": "atomic"}


def attention_impls(device) -> dict[str, Callable[[Inputs], torch.Tensor]]:
    """``name -> fn(inputs) -> o`` for the primal op: ours (with each backward path) and the SDPA backends
    available on ``device``."""
    impls = {"imf_kernels": lambda x: imf_kernels.attention(x.q, x.k, x.v)}
    impls.update(dict.fromkeys(BACKWARD_PATHS, impls["imf_kernels"]))
    impls["sdpa_flash"] = _sdpa(SDPBackend.FLASH_ATTENTION)
    if torch.device(device).type == "cuda" and torch.backends.cudnn.is_available():
        impls["sdpa_cudnn"] = _sdpa(SDPBackend.CUDNN_ATTENTION)
    return impls


def attention_jvp_impls(device) -> dict[str, Callable[[Inputs], torch.Tensor]]:
    """``name -> fn(inputs) -> o`` for the dual forward (the tangent is computed and dropped)."""
    impls = {
        "imf_kernels": lambda x: imf_kernels.attention_jvp(x.q, x.k, x.v, x.q_t, x.k_t, x.v_t)[0],
        "sdpa_dropin_func_jvp": lambda x: torch.func.jvp(
            imf_kernels.scaled_dot_product_attention, (x.q, x.k, x.v), (x.q_t, x.k_t, x.v_t)
        )[0],
        "torch_func_jvp_math": lambda x: reference.attention_jvp_autodiff(x.q, x.k, x.v, x.q_t, x.k_t, x.v_t)[0],
    }
    if torch.device(device).type == "cuda" and importlib.util.find_spec("jvp_flash_attention") is not None:
        impls["jvp_flash_attention"] = _jvp_flash_attention
    return impls


def _step(fn: Callable[[Inputs], torch.Tensor], x: Inputs, mode: str) -> Callable[[], None]:
    if mode == "fwd":
        return lambda: fn(x)
    return lambda: fn(x).backward(x.do)


def _measure(step: Callable[[], None], x: Inputs, device, reps: int) -> dict:
    """``ms`` (median), ``ms_p20``, ``ms_p80`` (:func:`bench.common.bench_callable`) and ``peak_mem_mb`` of ``step``."""
    stats = bench_callable(step, device, reps=reps, grad_to_none=x.leaves)
    row = {k: stats[k] for k in ("ms", "ms_p20", "ms_p80")}
    if not is_cuda(device):
        return {**row, "peak_mem_mb": None}
    for t in x.leaves:
        t.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    for t in x.leaves:
        t.grad = None
    return {**row, "peak_mem_mb": peak}


def bench_op(
    op: str,
    *,
    seqs=(256, 512, 1024, 2048, 4096),
    head_dims=(64, 72),
    heads: int = 12,
    tokens: int = 32768,
    dtype: torch.dtype = torch.bfloat16,
    modes=("fwd", "fwd+bwd"),
    device="cuda",
    reps: int = 3,
) -> list[dict]:
    """Rows for ``op`` ("attention" or "attention_jvp") over ``seqs x head_dims x modes``.

    ``batch = max(1, tokens // seq)`` keeps the token count per call fixed. Each row:
    ``{op, mode, impl, device, dtype, batch, heads, seq, head_dim, ms, ms_p20, ms_p80, tflops,
    peak_mem_mb, imf_speedup}`` where ``imf_speedup`` is this row's time over ours (> 1: ours is
    faster), or ``{..., error}`` if the implementation failed. ``reps`` is used on CPU only.
    """
    impls = {"attention": attention_impls, "attention_jvp": attention_jvp_impls}[op](device)
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    rows = []
    for head_dim in head_dims:
        for seq in seqs:
            batch = max(1, tokens // seq)
            x = setup(batch, heads, seq, head_dim, dtype, device)
            for mode in modes:
                ours = None
                for impl, fn in impls.items():
                    if impl in BACKWARD_PATHS and mode == "fwd":
                        continue  # the same forward as imf_kernels
                    row = {"op": op, "mode": mode, "impl": impl, "device": name, "dtype": str(dtype)[6:]}
                    row.update(batch=batch, heads=heads, seq=seq, head_dim=head_dim)
                    env = {"IMF_KERNELS_ATTN_BWD": BACKWARD_PATHS.get(impl, "deterministic")}
                    try:
                        with mock.patch.dict(os.environ, env):
                            row.update(_measure(_step(fn, x, mode), x, device, reps))
                    except Exception as err:  # a baseline that cannot run this shape (OOM, unsupported)
                        row["error"] = f"{type(err).__name__}: {err}"[:300]
                        if torch.device(device).type == "cuda":
                            torch.cuda.empty_cache()
                    else:
                        row["tflops"] = flops(op, mode, batch, heads, seq, head_dim) / (row["ms"] * 1e-3) / 1e12
                        ours = row["ms"] if impl == "imf_kernels" else ours
                        row["imf_speedup"] = row["ms"] / ours if ours else None
                    rows.append(row)
    return rows


def run(**kwargs) -> list[dict]:
    """Both ops on the GPU with :func:`bench_op`'s defaults (bf16, seq 256..4096, head_dim 64/72)."""
    return bench_op("attention", **kwargs) + bench_op("attention_jvp", **kwargs)


def smoke() -> list[dict]:
    """Tiny CPU run (needs ``TRITON_INTERPRET=1``): checks that every row is produced, not speed."""
    kwargs = {"seqs": (33,), "head_dims": (64,), "heads": 2, "tokens": 33, "dtype": torch.float32, "reps": 1}
    return bench_op("attention", device="cpu", **kwargs) + bench_op("attention_jvp", device="cpu", **kwargs)
