"""Read the compiler's output: ``ptxas -v`` resource lines, global-load widths and tensor-core
instructions in the PTX, and the SASS of the main loop.

Definitions used by the report:

* **16-byte loads**: ``ld.global.v4.b32`` / ``.v2.b64`` and ``cp.async ... 16`` (Ampere/Hopper async
  copies into shared memory); **scalar 16-bit loads**: ``ld.global`` of one 2-byte element
  (``.b16`` / ``.u16`` / ``.f16`` / ``.bf16`` without a vector prefix). TMA (``cp.async.bulk.tensor``)
  is counted apart.
* **dot path**: ``wgmma`` (sm_90 warpgroup MMA, SASS ``HGMMA``), ``mma.sync`` (SASS ``HMMA``) or ``fma``
  (no tensor core).
* **main loop**: the SASS loop (a backward branch) holding the most ``HGMMA``/``HMMA``; per iteration
  its instruction count, tensor-core instructions, full warpgroup waits
  (``WARPGROUP.DEPBAR.LE gsb0, 0x0``: wait until no MMA is in flight) and FP32 instructions
  (``FADD FMUL FFMA FMNMX FSEL FSETP FSWZADD MUFU``); and the same for its **hot path**: the
  instructions run when every forward branch inside the loop is taken, i.e. its rarely executed
  blocks (lazy rescaling) are skipped.
"""

from __future__ import annotations

import re

_LD = re.compile(r"\bld\.global(?:\.[a-z0-9_]+)*")
_CP_ASYNC = re.compile(
    r"\bcp\.async\.c[ag]\.shared\.global(?:\.[a-z0-9_]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)"
)
_TYPE_BYTES = {"8": 1, "16": 2, "32": 4, "64": 8, "128": 16}
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")
FP32_OPS = ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FSWZADD", "MUFU")


def ptxas_resources(log: str) -> dict:
    """``registers``, ``spill_stores``, ``spill_loads``, ``stack`` (bytes) from ``ptxas -v`` output."""
    out = {"registers": None, "spill_stores": 0, "spill_loads": 0, "stack": 0}
    if m := re.search(r"Used (\d+) registers", log):
        out["registers"] = int(m[1])
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out["stack"], out["spill_stores"], out["spill_loads"] = int(m[1]), int(m[2]), int(m[3])
    return out


def _load_bytes(instr: str) -> int:
    parts = instr.split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    width = next((_TYPE_BYTES[m[1]] for p in reversed(parts) if (m := re.fullmatch(r"[bufs]f?(\d+)", p))), 0)
    return vec * width


def global_loads(ptx: str) -> dict:
    """Counts of global loads by width: ``vec16`` (16-byte ld.global and cp.async), ``scalar16bit``
    (one 2-byte element), ``other`` (the rest: 4/8-byte loads, narrower cp.async), and ``tma``."""
    out = {"vec16": 0, "scalar16bit": 0, "other": 0, "tma": ptx.count("cp.async.bulk.tensor")}
    for m in _LD.finditer(ptx):
        width = _load_bytes(m[0])
        out["vec16" if width == 16 else "scalar16bit" if width == 2 else "other"] += 1
    for m in _CP_ASYNC.finditer(ptx):
        out["vec16" if int(m[1], 0) == 16 else "other"] += 1
    return out


def dot_path(ptx: str, ttgir: str) -> str:
    """``wgmma``, ``mma.sync``, ``fma`` (a ``tt.dot`` lowered without tensor cores) or ``none`` (no dot)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "fma" if "tt.dot " in ttgir else "none"


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """``(address, instruction text)`` of every SASS instruction."""
    return [(int(m[1], 16), m[2]) for m in map(_SASS_LINE.search, sass.splitlines()) if m]


def _branch_target(text: str) -> int | None:
    m = _BRANCH.search(text)
    return int(m[1], 16) if m and m[1] else None


def _stats(body: list[str]) -> dict:
    opcodes = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body]
    return {
        "instructions": len(body),
        "mma": sum(1 for op in opcodes if op in ("HGMMA", "HMMA")),
        "full_waits": sum(1 for t in body if re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", t)),
        "fp32": sum(1 for op in opcodes if op in FP32_OPS),
    }


def _hot_path(body: list[tuple[int, str]]) -> list[str]:
    """The instructions of one iteration when every forward branch inside the loop is taken (it skips
    a rarely executed block, e.g. the lazy-rescale branch) - the path most iterations run."""
    index = {a: i for i, (a, _) in enumerate(body)}
    out, i = [], 0
    while i < len(body):
        addr, text = body[i]
        out.append(text)
        target = _branch_target(text)
        i = index[target] if target is not None and target > addr and target in index else i + 1
    return out


def main_loop(sass: str) -> dict | None:
    """Per-iteration statistics of the SASS loop with the most MMA instructions (None: no loop): the whole
    loop body, and under ``hot`` its hot path (:func:`_hot_path`)."""
    instrs = sass_instructions(sass)
    best = None
    for i, (addr, text) in enumerate(instrs):
        start = _branch_target(text)
        if start is None or start >= addr:
            continue
        body = [(a, t) for a, t in instrs[: i + 1] if a >= start]
        stats = _stats([t for _, t in body])
        if best is None or stats["mma"] > best[0]["mma"]:
            best = stats, body
    if best is None:
        return None
    stats, body = best
    return {**stats, "hot": _stats(_hot_path(body))}
