"""One transformer block and the whole network: dual forward + primal backward, ours vs ``torch.func.jvp``.

Library only (the CLI lives in ``bench/__main__.py``; it adds the per-op rows of
:mod:`bench.block_ops_bench` to the same subcommand). For each iMF preset and scope:

* ``block``: one :class:`imf.model.layers.IMFBlock` on ``(batch, seq_len, dim)`` tokens, parameters and
  activations in ``dtype``; tangent for every sample.
* ``model``: the whole network, ``(u, du/dt, v)`` for every sample (trunk, u-head with tangent,
  v-head primal), bf16 parameters (as FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16)`` presents
  them to the forward; buffers and condition features stay fp32) under autocast.

One *step* is the dual forward then the backward of the primal outputs against fixed random
cotangents (``torch.autograd.grad`` / ``backward``; the tangent is dropped, as the losses stop its
gradient). Implementations:

* ``engine``                   the explicit dual forward (``blk(x, x_t, ...)``,
                               ``model.forward_with_tangent(..., with_velocity=True)``) on the
                               ``"triton"`` backend;
* ``torch_func_jvp``           ``torch.func.jvp`` over the ``"reference"`` backend's plain forward
                               (math attention) + autograd; for the model, ``v`` needs a second
                               ``model.velocity`` call with grad (the JVP'd function returns ``u`` only);
* ``torch_func_jvp_compiled``  the same function under ``torch.compile`` (``torch._dynamo`` reset first).

Numbers per row: ``ms`` (median, min, max, p20, p80 over ``do_bench`` samples, L2 flushed),
``peak_mem_mb`` (``max_memory_allocated`` during one step beyond what was allocated before it),
``flops`` counted with :mod:`imf.flops` (dual forward + 2x the primal forward; every implementation
is charged the same), ``tflops``, and ``engine_speedup`` (this row's time over the engine's). A failing
implementation (out of memory, compile error) is a row with ``error``.

``smoke()`` runs a tiny config on the CPU in fp32 with the ``"reference"`` backend standing in for
``"triton"`` (the interpreter needs tens of seconds per step) and ``torch.compile(backend="eager")``:
it checks the harness, not speed.
"""

from __future__ import annotations

import copy
import gc

import torch
from imf_kernels.reference import rope_tables

from bench.common import bench_callable, is_cuda, one_cpu_thread
from bench.step_bench import build, smoke_overrides
from imf import flops
from imf.config import preset
from imf.model.layers import IMFBlock
from imf.ops import ReferenceOps, make_ops

IMPLS = ("engine", "torch_func_jvp", "torch_func_jvp_compiled")


def _randn(*shape, dtype, device, grad=False, gen=None):
    return torch.randn(*shape, generator=gen, device=device).to(dtype).requires_grad_(grad)


def setup_block(cfg, batch: int, *, dtype, device, engine_backend: str) -> dict:
    """``impl -> (forward returning the primal, leaves, cotangents)`` for one block; same weights for all."""
    gen = torch.Generator(device=device).manual_seed(0)
    blk = IMFBlock(cfg.dim, cfg.heads, cfg.hidden, cfg.norm_eps)
    cpu_gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=cpu_gen))  # the gates start at zero
    blk = blk.to(device=device, dtype=dtype)
    blk.ops = make_ops(engine_backend)
    ref = copy.deepcopy(blk)
    ref.ops = ReferenceOps()
    L = cfg.seq_len
    cos, sin = rope_tables(L, cfg.head_dim, theta=cfg.rope_theta, device=device)
    x = _randn(batch, L, cfg.dim, dtype=dtype, device=device, grad=True, gen=gen)
    x_t = _randn(batch, L, cfg.dim, dtype=dtype, device=device, gen=gen)
    dy = _randn(batch, L, cfg.dim, dtype=dtype, device=device, gen=gen)

    def jvp(a, a_t):
        return torch.func.jvp(lambda v: ref(v, None, cos, sin)[0], (a,), (a_t,))[0]

    fwd = {
        "engine": lambda f: blk(x, x_t, cos, sin)[0],
        "torch_func_jvp": lambda f: f(x, x_t),
        "torch_func_jvp_compiled": lambda f: f(x, x_t),
    }
    leaves = {"engine": [x, *blk.parameters()], "torch_func_jvp": [x, *ref.parameters()]}
    leaves["torch_func_jvp_compiled"] = leaves["torch_func_jvp"]
    bf = flops.block_flops(cfg, batch)
    return {
        "fwd": fwd,
        "jvp": jvp,
        "leaves": leaves,
        "cotangents": [dy],
        "flops": 3 * bf["forward"] + bf["tangent"],
        "autocast": False,
    }


def setup_model(name: str, cfg_overrides: dict, batch: int, *, dtype, device, engine_backend: str) -> dict:
    """The same for the whole network (bf16 parameters under autocast, see the module docstring)."""
    cfg = preset(name, **cfg_overrides)
    if cfg.arch != "imf" or cfg.v_head != "aux":
        raise ValueError(f"the model scope needs an iMF preset with v_head='aux', got {name!r}")
    eng, ref = build(name, engine_backend, device, cfg_overrides), build(name, "reference", device, cfg_overrides)
    for p in [*eng.parameters(), *ref.parameters()]:
        p.data = p.data.to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    z, z_t = (
        _randn(*shape, dtype=torch.float32, device=device, gen=gen),
        _randn(*shape, dtype=torch.float32, device=device, gen=gen),
    )
    t = torch.rand(batch, generator=gen, device=device) * 0.9 + 0.1
    r = t * torch.rand(batch, generator=gen, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen, device=device)
    cond = (
        y,
        1 + 7 * torch.rand(batch, generator=gen, device=device),
        torch.full_like(t, 0.2),
        torch.full_like(t, 0.8),
    )
    du, dv = (_randn(*shape, dtype=dtype, device=device, gen=gen) for _ in range(2))
    ones = torch.ones_like(t)

    def jvp(zz, zz_t):
        u = torch.func.jvp(lambda a, b: ref(a, b, r, *cond), (zz, t), (zz_t, ones))[0]
        return u, ref.velocity(zz, t, r, *cond)

    fwd = {
        "engine": lambda f: eng.forward_with_tangent(z, z_t, t, r, *cond, with_velocity=True)[::2],
        "torch_func_jvp": lambda f: f(z, z_t),
        "torch_func_jvp_compiled": lambda f: f(z, z_t),
    }
    leaves = {"engine": list(eng.parameters()), "torch_func_jvp": list(ref.parameters())}
    leaves["torch_func_jvp_compiled"] = leaves["torch_func_jvp"]
    fwd_uv = flops.forward_flops(cfg, batch, "u+v")
    return {
        "fwd": fwd,
        "jvp": jvp,
        "leaves": leaves,
        "cotangents": [du, dv],
        "flops": 3 * fwd_uv + flops.tangent_flops(cfg, batch),
        "autocast": dtype != torch.float32,
    }


def _peak_mb(step, device) -> float | None:
    if not is_cuda(device):
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure(case: dict, impl: str, *, dtype, device, compile_backend: str, reps: int) -> dict:
    """Time and peak memory of one step of ``impl`` in ``case`` (from :func:`setup_block` / :func:`setup_model`)."""
    jvp = case["jvp"]
    if impl == "torch_func_jvp_compiled":
        torch._dynamo.reset()
        jvp = torch.compile(jvp, backend=compile_backend)
    forward = case["fwd"][impl]
    leaves = case["leaves"][impl]
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=case["autocast"])

    def step():
        with autocast:
            out = forward(jvp)
        outs = list(out) if isinstance(out, tuple | list) else [out]
        torch.autograd.grad(outs, leaves, [c.to(o.dtype) for c, o in zip(case["cotangents"], outs, strict=True)])

    stats = bench_callable(step, device, reps=reps, rep_ms=1000)
    return {**stats, "peak_mem_mb": _peak_mb(step, device)}


def run(
    presets=("iMF-B/2", "iMF-XL/2"),
    *,
    batch: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    device="cuda",
    scopes=("block", "model"),
    impls=IMPLS,
    engine_backend: str = "triton",
    compile_backend: str = "inductor",
    reps: int = 3,
    smoke: bool = False,
) -> list[dict]:
    """Rows for every preset x scope x implementation (``reps`` is used on a CPU only)."""
    rows = []
    for name in presets:
        ov = smoke_overrides(name) if smoke else {}
        cfg = preset(name, **ov)
        for scope in scopes:
            base = {
                "preset": name,
                "scope": scope,
                "batch": batch,
                "seq_len": cfg.seq_len,
                "dtype": str(dtype).removeprefix("torch."),
                "engine_backend": engine_backend,
            }
            try:
                if scope == "block":
                    case = setup_block(cfg, batch, dtype=dtype, device=device, engine_backend=engine_backend)
                else:
                    case = setup_model(name, ov, batch, dtype=dtype, device=device, engine_backend=engine_backend)
            except Exception as err:  # e.g. out of memory while building XL/2 twice
                rows.append({**base, "impl": "setup", "error": f"{type(err).__name__}: {err}"[:400]})
                continue
            scope_rows = []
            for impl in impls:
                row = {
                    **base,
                    "impl": impl,
                    "compiled": compile_backend if impl.endswith("_compiled") else None,
                    "flops": case["flops"],
                }
                try:
                    row.update(
                        measure(case, impl, dtype=dtype, device=device, compile_backend=compile_backend, reps=reps)
                    )
                    row["tflops"] = case["flops"] / (row["ms"] * 1e-3) / 1e12
                except Exception as err:  # a baseline that cannot run this shape (OOM, compile failure)
                    row["error"] = f"{type(err).__name__}: {err}"[:400]
                if is_cuda(device):
                    torch.cuda.empty_cache()
                scope_rows.append(row)
            ours = next((r["ms"] for r in scope_rows if r["impl"] == "engine" and "ms" in r), None)
            for row in scope_rows:
                row["engine_speedup"] = row["ms"] / ours if ours and "ms" in row else None
            rows += scope_rows
            del case
            gc.collect()
    return rows


def smoke() -> list[dict]:
    """Tiny CPU run of both scopes and every implementation (harness check)."""
    with one_cpu_thread():
        return run(
            ("iMF-B/2",),
            batch=2,
            dtype=torch.float32,
            device="cpu",
            engine_backend="reference",
            compile_backend="eager",
            reps=2,
            smoke=True,
        )
