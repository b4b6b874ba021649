"""Capture the Triton launches of the real launchers without a GPU.

The model (or an attention call) runs on ``meta`` tensors that report themselves as CUDA tensors
(:class:`MetaAsCuda`), so every launcher validates, allocates and computes its grid exactly as on a
GPU, but nothing is computed. ``Autotuner.run`` / ``JITFunction.run`` are patched to record each
launch (:class:`Launch`) instead of running it; the tensor arguments are kept as :class:`ArgTensor`
stand-ins with the dtype and a fake address that has the real launch's alignment (a 512-byte
aligned allocation plus the view's byte offset), so Triton's own binder later gives the same
divisibility-by-16 specialisation as a real launch. For each launch the autotuner's own pruning
is evaluated per target architecture (shared-memory limit of that GPU), which gives the configs
the autotuner may consider there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types

import torch
from torch.overrides import TorchFunctionMode
from triton.runtime.autotuner import Autotuner, Config, Heuristics
from triton.runtime.jit import JITFunction

# Opt-in shared memory per block and SM count of the reference GPUs (CUDA programming guide).
DEVICES = {
    90: {"name": "H100 (sm_90)", "shared_memory_per_block_optin": 232448, "multi_processor_count": 132},
    80: {"name": "A100 (sm_80)", "shared_memory_per_block_optin": 166912, "multi_processor_count": 108},
}
_CUDA, _META = torch.device("cuda"), torch.device("meta")
_BASE_ADDRESS = 1 << 30  # any 512-byte aligned address: CUDA allocations are


def _meta_device(dev):
    if dev is None or isinstance(dev, int):
        return _META
    dev = torch.device(dev)
    return _META if dev.type == "cuda" else dev


class MetaAsCuda(TorchFunctionMode):
    """``meta`` tensors say they are on ``cuda``; tensors created on ``cuda`` are made on ``meta``."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == torch.Tensor.device.__get__:
            dev = func(*args)
            return _CUDA if dev.type == "meta" else dev
        if func == torch.Tensor.is_cuda.__get__:
            return torch.Tensor.device.__get__(args[0]).type == "meta"
        if "device" in kwargs:
            kwargs["device"] = _meta_device(kwargs["device"])
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            if func is torch.Tensor.cuda:
                return args[0]
            args = tuple(
                _META if isinstance(a, str | torch.device) and torch.device(a).type == "cuda" else a for a in args
            )
        return func(*args, **kwargs)


class ArgTensor:
    """A tensor argument as Triton's binder sees it: dtype and an address with the real alignment."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self.shape = tuple(t.shape)
        self.strides = tuple(t.stride())
        self.offset_bytes = t.storage_offset() * t.element_size()
        self.itemsize = t.element_size()

    def data_ptr(self) -> int:
        return _BASE_ADDRESS + self.offset_bytes

    def element_size(self) -> int:
        return self.itemsize

    def stride(self, dim: int | None = None):
        return self.strides if dim is None else self.strides[dim]

    def aligned(self) -> bool:
        """16-byte aligned start and rows (every non-unit stride a multiple of 16 bytes)."""
        return self.offset_bytes % 16 == 0 and all(s * self.itemsize % 16 == 0 for s in self.strides if s != 1)

    def describe(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)} strides {list(self.strides)}" + (
            f" +{self.offset_bytes}B" if self.offset_bytes else ""
        )


@dataclasses.dataclass
class Launch:
    """One captured launch: the kernel, its bound arguments, and per architecture the configs the
    autotuner may consider there (and the pinned one)."""

    kernel: str
    shape: str
    fn: JITFunction
    args: tuple
    kwargs: dict
    configs: dict[int, list[Config]]
    pinned: dict[int, Config | None]
    grid: dict[int, list[tuple[int, ...]]]
    candidates: int

    def inputs(self) -> dict[str, ArgTensor]:
        names = self.fn.arg_names
        return {n: a for n, a in zip(names, self.args, strict=False) if isinstance(a, ArgTensor)}


def _fake_props(arch: int):
    return lambda *_a, **_k: types.SimpleNamespace(major=arch // 10, minor=arch % 10, **DEVICES[arch])


def _unwrap(fn, args, kwargs):
    """The innermost ``JITFunction`` and the keyword arguments ``Heuristics`` wrappers add."""
    kwargs = dict(kwargs)
    while not isinstance(fn, JITFunction):
        if isinstance(fn, Heuristics):
            for name, rule in fn.values.items():
                kwargs[name] = rule({**dict(zip(fn.arg_names, args, strict=False)), **kwargs})
        fn = fn.fn
    return fn, kwargs


class Recorder:
    """Patches the launch entry points while active; ``launches`` collects what was launched."""

    def __init__(self, archs: tuple[int, ...], shape: str = ""):
        self.archs, self.shape, self.launches = archs, shape, []

    def _record(self, tuner, fn, args, kwargs):
        grid = kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        configs, pinned, grids = {}, {}, {}
        if tuner is None:  # a plain @triton.jit launch: its one config comes with the call
            plain = Config({}, num_warps=kwargs.pop("num_warps", 4), num_stages=kwargs.pop("num_stages", 3))
        for arch in self.archs:
            with mock_device(arch):
                if tuner is None:
                    cands, pin = [plain], plain
                else:
                    tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
                    cands = list(tuner.prune_configs(kwargs)) if len(tuner.configs) > 1 else list(tuner.configs)
                    pin = tuner.pinned_config(args, kwargs) if hasattr(tuner, "pinned_config") else None
                    tuner.nargs = None
            configs[arch], pinned[arch] = cands, pin
            named = dict(zip(fn.arg_names, args, strict=False))
            grids[arch] = [
                tuple(grid({**named, **kwargs, **c.all_kwargs()})) if callable(grid) else tuple(grid) for c in cands
            ]
        inner, kw = _unwrap(fn, args, kwargs)
        stand_in = tuple(ArgTensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        kw = {k: ArgTensor(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        self.launches.append(
            Launch(
                inner.__name__,
                self.shape,
                inner,
                stand_in,
                kw,
                configs,
                pinned,
                grids,
                len(tuner.configs) if tuner is not None else 1,
            )
        )

    @contextlib.contextmanager
    def active(self):
        recorder = self

        def tuner_run(self, *args, **kwargs):
            recorder._record(self, self.fn, args, kwargs)

        def jit_run(self, *args, **kwargs):
            recorder._record(None, self, args, kwargs)

        import imf_kernels  # noqa: F401 - defines the Autotuner subclasses to patch (imf_kernels._tuning.Tuner)

        patched = [c for c in (Autotuner, *_subclasses(Autotuner)) if "run" in c.__dict__] + [JITFunction]
        saved = {c: c.__dict__["run"] for c in patched}
        autocast = torch.is_autocast_enabled
        try:
            for c in patched:
                c.run = jit_run if c is JITFunction else tuner_run
            # no autocast on the fake device (the CPU build of torch has no CUDA autocast state)
            torch.is_autocast_enabled = lambda *a: False if a and a[0] == "cuda" else autocast(*a)
            with MetaAsCuda():
                yield self
        finally:
            for c, run in saved.items():
                c.run = run
            torch.is_autocast_enabled = autocast


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


@contextlib.contextmanager
def mock_device(arch: int):
    """``torch.cuda`` device queries answer for the reference GPU of ``arch``."""
    saved = torch.cuda.get_device_properties, torch.cuda.current_device, torch.cuda.get_device_capability
    torch.cuda.get_device_properties = _fake_props(arch)
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_capability = lambda *_a: (arch // 10, arch % 10)
    try:
        yield
    finally:
        torch.cuda.get_device_properties, torch.cuda.current_device, torch.cuda.get_device_capability = saved
