"""Before / after of the attention JVP inner loop: the first version of the kernel (commit
``a30b2fa``, read with ``git show`` into a temporary package) against the current one, at d64,
seq 4096, bf16, BLOCK_M 128 x BLOCK_N 64, 8 warps, compiled for sm_90.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from triton import Config

from .build import compile_one, describe_config
from .capture import Launch, Recorder, mock_device

BEFORE_COMMIT = "a30b2fa"
_BEFORE_FILES = ("_checks.py", "_tuning.py", "attention_op.py", "attention_jvp_op.py")
SEQ, HEAD_DIM, HEADS, BATCH = 4096, 64, 16, 4
TILE = {"BLOCK_M": 128, "BLOCK_N": 64}
NUM_WARPS, NUM_STAGES = 8, 3


def _import_before(tmp: Path):
    pkg = tmp / "imf_kernels_before"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f'"""attention_jvp of commit {BEFORE_COMMIT}."""\n')
    for name in _BEFORE_FILES:
        src = subprocess.run(
            ["git", "show", f"{BEFORE_COMMIT}:kernels/{name}"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        ).stdout
        (pkg / name).write_text(src)
    sys.path.insert(0, str(tmp))
    try:
        return importlib.import_module("imf_kernels_before.attention_jvp_op").attention_jvp
    finally:
        sys.path.remove(str(tmp))


def _jvp_launch(attention_jvp) -> Launch:
    """The fused primal+tangent forward launch of ``attention_jvp`` (full tangent, no backward)."""
    recorder = Recorder((90,), f"attn:bf16:s{SEQ}:d{HEAD_DIM}")
    with mock_device(90), recorder.active():
        shape = (BATCH, HEADS, SEQ, HEAD_DIM)
        q, k, v, q_t, k_t, v_t = (torch.empty(shape, device="cuda", dtype=torch.bfloat16) for _ in range(6))
        attention_jvp(q, k, v, q_t, k_t, v_t)
    return max(recorder.launches, key=lambda launch: len(launch.inputs()))


def _tile_config(launch: Launch) -> Config:
    """The considered config with the reference tile and warps (same stages if present)."""
    matches = [
        c for c in launch.configs[90] if c.num_warps == NUM_WARPS and all(c.kwargs.get(k) == v for k, v in TILE.items())
    ]
    matches.sort(key=lambda c: c.num_stages != NUM_STAGES)
    return matches[0] if matches else Config(dict(TILE), num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def compare() -> list[dict]:
    """Rows ``{"version", "config", registers, spills, loop, num_warps, tile_elements}``: before, after."""
    import imf_kernels

    with tempfile.TemporaryDirectory() as tmp:
        before = _import_before(Path(tmp))
        versions = [(f"before ({BEFORE_COMMIT})", before), ("after (HEAD)", imf_kernels.attention_jvp)]
        out = []
        for version, fn in versions:
            launch = _jvp_launch(fn)
            config = _tile_config(launch)
            result = compile_one(launch, config, 90)
            out.append(
                {
                    "version": version,
                    "kernel": launch.kernel,
                    "config": describe_config(config),
                    "num_warps": config.num_warps,
                    "tile_elements": config.kwargs.get("BLOCK_M", 1) * config.kwargs.get("BLOCK_N", 1),
                    **result,
                }
            )
    return out
