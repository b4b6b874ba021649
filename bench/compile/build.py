"""Compile one captured launch with one config for one GPU target and measure the result.

The arguments are bound with Triton's own binder (``create_function_from_signature`` +
``JITFunction._pack_args``, what ``JITFunction.run`` does), so signature, constexprs and the
divisibility-by-16 attributes are those of a real launch; then
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, ``ptxas -v`` on the PTX
(registers, spills) and ``cuobjdump -sass`` on the cubin (main loop), all from the tools shipped in
the triton wheel. No GPU is touched.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Config
from triton.runtime.jit import create_function_from_signature

from . import asm
from .capture import Launch

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def describe_config(config: Config) -> str:
    """``BLOCK_M=128 BLOCK_N=64 w8 s3``."""
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} w{config.num_warps} s{config.num_stages}".strip()


def bind(launch: Launch, config: Config, arch: int, binders: dict | None = None):
    """``(source, options, key)`` of the launch with ``config`` on ``arch``; ``key`` identifies the compile.

    ``binders`` memoises Triton's per-kernel binder (building one costs an ``exec``)."""
    fn = launch.fn
    binders = {} if binders is None else binders
    if (id(fn), arch) not in binders:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binders[id(fn), arch] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = binders[id(fn), arch]
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = (fn.cache_key, arch, repr(specialization), repr(sorted(options.__dict__.items())))
    return ASTSource(fn, signature, constexprs, attrs), options, key


def _tool(name: str, *args: str) -> str:
    done = subprocess.run([os.path.join(BIN, name), *args], capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def compile_one(launch: Launch, config: Config, arch: int) -> dict:
    """Compile and measure: ``ok``/``error``, shared bytes, registers, spills, loads, dot path, main loop."""
    t0 = time.perf_counter()
    try:
        src, options, _ = bind(launch, config, arch)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    except Exception as err:  # noqa: BLE001 - a compile error is a result of the report
        return {"status": "error", "error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"}
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        resources = asm.ptxas_resources(_tool("ptxas", "-v", f"--gpu-name={gpu}", ptx_path, "-o", os.devnull))
        sass = _tool("cuobjdump", "-sass", cubin_path)
    return {
        "status": "ok",
        "shared": kernel.metadata.shared,
        **resources,
        "loads": asm.global_loads(ptx),
        "dot": asm.dot_path(ptx, kernel.asm.get("ttgir", "")),
        "loop": asm.main_loop(sass),
        "compile_s": round(time.perf_counter() - t0, 2),
    }
