"""Names for the phases of a training step, visible in every profiler: ``with phase("imf.backward"): ...``.

A :class:`phase` is a ``torch.profiler.record_function`` range when a torch profiler is recording, and an
NVTX range whenever CUDA is available (Nsight Systems shows them; without a tool attached a range push is
a no-op in the NVTX library). With no profiler attached, entering a phase costs one C call
(``torch.autograd._profiler_enabled``) and a boolean test; no ``record_function`` object is made.
Inside ``torch.compile`` tracing a phase does nothing (no graph break); the ops of a compiled region
show up under the phase around the compiled call.

The names (:data:`PHASES`, in step order) and what they hold:

    imf.data          the next micro-batch from the loader and this rank's noise / (t, r, omega, ...) draws
    imf.loss          the loss function minus the two phases nested in it: input checks and the one host
                      sync, sorting the tangent samples first, interpolation, the target, adaptive weighting
    imf.guidance      (inside imf.loss) the no-grad guidance forwards (iMF v_c and v_u; MF v_u and v_cond)
    imf.dual_forward  (inside imf.loss) the forward with tangents: u and du/dt (and the v-head's v)
    imf.backward      autograd through the primal path (FSDP2's gradient reduce-scatter runs in here)
    imf.grad_sync     the global grad norm and clipping, the one all-reduce that agrees on the loss terms
                      and the skip/stop flags, and the host reads of both
    imf.optimizer     the AdamW step
    imf.ema           the fp32 EMA updates
    imf.checkpoint    a DCP checkpoint save (only in steps that save one)

A *memory probe* (:func:`set_memory_probe`, used by :mod:`imf.train.profile` on CUDA during a profiled
window) is told when each phase starts and ends; it is None otherwise.
"""

from __future__ import annotations

import torch

PHASES: dict[str, str] = {
    "imf.data": "next batch from the loader; noise and (t, r, omega, interval) draws",
    "imf.loss": "the loss minus guidance and dual forward: checks and host sync, ordering, targets, weighting",
    "imf.guidance": "no-grad guidance forwards (iMF v_c, v_u; MF v_u, v_cond)",
    "imf.dual_forward": "forward with tangents: u, du/dt (and the v-head's v)",
    "imf.backward": "autograd through the primal path (FSDP2 reduce-scatter included)",
    "imf.grad_sync": "grad norm + clipping, the all-reduce of loss terms and skip/stop flags, host reads",
    "imf.optimizer": "the AdamW step",
    "imf.ema": "fp32 EMA updates",
    "imf.checkpoint": "DCP checkpoint save (steps that save)",
}

_profiler_enabled = torch.autograd._profiler_enabled
_is_compiling = torch.compiler.is_compiling
_nvtx: bool | None = None  # decided at the first phase: CUDA available (a CPU-only build has no NVTX library)
_probe = None


def set_memory_probe(probe) -> None:
    """Install ``probe`` (an object with ``enter(name)`` and ``exit(name)``), or None to remove it."""
    global _probe
    _probe = probe


class phase:
    """Context manager labelling the enclosed work as step phase ``name`` (see the module docstring)."""

    __slots__ = ("name", "_range", "_nvtx_on")

    def __init__(self, name: str):
        self.name = name
        self._range = None
        self._nvtx_on = False

    def __enter__(self):
        global _nvtx
        if _is_compiling():
            return self
        if _nvtx is None:
            _nvtx = torch.cuda.is_available()
        if _profiler_enabled():
            self._range = torch.autograd.profiler.record_function(self.name)
            self._range.__enter__()
        if _nvtx:
            torch.cuda.nvtx.range_push(self.name)
            self._nvtx_on = True
        if _probe is not None:
            _probe.enter(self.name)
        return self

    def __exit__(self, *exc):
        if _probe is not None and not _is_compiling():
            _probe.exit(self.name)
        if self._nvtx_on:
            torch.cuda.nvtx.range_pop()
            self._nvtx_on = False
        if self._range is not None:
            self._range.__exit__(*exc)
            self._range = None
        return False


__all__ = ["PHASES", "phase", "set_memory_probe"]
