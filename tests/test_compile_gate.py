"""CI gate: every config the autotuner may choose compiles cleanly for sm_90 (H100), no GPU needed.

Runs ``python -m bench compile`` (the static compile report, :mod:`bench.compile`) for the iMF-B/2
and MF-XL/2 training steps, one long attention sequence and a sample of the head-dim sweep
(:data:`bench.compile.shapes.GATE_HEAD_DIMS`: d72, d88, d120 at the ragged length 1000, the masked head
dim of each head-tile width above 64 columns; every spill the full sweep of head_dim 8-128 ever showed
was at one of these widths), sm_90 only, in a subprocess without
``TRITON_INTERPRET`` (kernels must be compiled, not interpreted), and fails on any row with a
problem: a compile error, shared memory over 232,448 B, any spill, a scalar 16-bit global load
where the inputs are 16-byte aligned, mma.sync (or no tensor core) instead of wgmma, or a grid axis
over 65,535. Each failure names the kernel, the config, the shape class and what failed. The full
sweep (every preset, seq 256-8192, sm_80 too) is ``python -m bench compile --arch 90,80``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.compile.shapes import gate_head_dims

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("preset:iMF-B/2", "preset:MF-XL/2", "attn:bf16:s4096:d64", *gate_head_dims())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile_gate")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "compile",
        "--arch",
        "90",
        "--shapes",
        *SHAPES,
        "--no-jvp-loop",
        "--jobs",
        "2",
        "--out",
        str(out),
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}"
    doc = json.loads((out / "compile.json").read_text())
    doc["elapsed_s"] = time.perf_counter() - t0
    return doc


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_every_config_compiles_cleanly_for_sm90(report, shape):
    rows = [r for r in report["rows"] if r["shape"] == shape]
    assert rows, f"{shape}: no kernel launch was captured"
    assert {r["arch"] for r in rows} == {90}
    failing = [r for r in rows if r["problems"]]
    lines = [f"{r['kernel']} [{r['config']}] at {shape} ({r['variant']}): {'; '.join(r['problems'])}" for r in failing]
    if failing:
        pytest.fail(f"{len(failing)} of {len(rows)} sm_90 compiles fail the static checks:\n" + "\n".join(lines))


@pytest.mark.slow
def test_gate_reports_what_it_checked(report):
    """The report is static and covers the attention kernels and the elementwise kernels of iMF."""
    assert report["static"] is True
    kernels = {r["kernel"] for r in report["rows"]}
    assert sum("attn" in k for k in kernels) >= 3, kernels  # forward, dk/dv, dq
    assert all(any(op in k for k in kernels) for op in ("rms_norm", "rope", "swiglu")), kernels
    print(f"compile gate: {len(report['rows'])} rows in {report['elapsed_s']:.0f} s")


def test_gate_samples_every_head_tile_width_above_64_columns():
    """The gate's head dims (:data:`GATE_HEAD_DIMS`) are masked ones, one per head-tile width of the sweep
    above 64 columns: the widths where the prune rules draw their lines."""
    import torch
    from imf_kernels.attention_common import head_columns, split_meta

    from bench.compile.shapes import GATE_HEAD_DIMS, SWEEP_HEAD_DIMS

    def width(d):
        return head_columns(split_meta(torch.empty(1, 1, 8, d, dtype=torch.bfloat16)))

    assert all(width(d) > d for d in GATE_HEAD_DIMS)  # masked columns
    assert sorted(width(d) for d in GATE_HEAD_DIMS) == sorted({width(d) for d in SWEEP_HEAD_DIMS if width(d) > 64})


# The parsers behind the checks, on hand-written compiler output (no compile needed).

PTX = """
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p1 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
    @!%p2 ld.global.u16 %rs2, [ %rd3 ];
    ld.global.b32 { %r5 }, [ %rd4 + 0 ];
    cp.async.cg.shared.global [ %r6 + 0 ], [ %rd5 + 0 ], 0x10, %r7;
    cp.async.ca.shared.global [ %r8 + 0 ], [ %rd6 + 0 ], 4;
    cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r9], [%rd7, {%r1, %r2}], [%r3];
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
"""

SASS = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;
        /*0110*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0120*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0130*/                   FMUL R2, R3, R4 ;
        /*0140*/                   MUFU.EX2 R5, R2 ;
        /*0150*/              @!P2 BRA 0x180 ;
        /*0160*/                   FMUL R24, R24, R3 ;
        /*0170*/                   FMUL R25, R25, R3 ;
        /*0180*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0190*/              @!P0 BRA 0x110 ;
        /*01a0*/                   FFMA R6, R7, R8, R9 ;
        /*01b0*/                   @P1 BRA 0x1a0 ;
        /*01c0*/                   EXIT ;
        /*01d0*/                   BRA 0x1d0;
"""


def test_load_widths_and_dot_path():
    from bench.compile import asm

    assert asm.global_loads(PTX) == {"vec16": 2, "scalar16bit": 2, "other": 2, "tma": 1}
    assert asm.dot_path(PTX, "") == "wgmma"
    assert asm.dot_path("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};", "") == "mma.sync"
    assert asm.dot_path("fma.rn.f32 %f1, %f2, %f3, %f4;", "%5 = tt.dot %a, %b") == "fma"
    assert asm.dot_path("", "") == "none"


def test_ptxas_resources():
    from bench.compile import asm

    log = (
        "ptxas info    : Function properties for _attn_fwd\n"
        "    424 bytes stack frame, 420 bytes spill stores, 408 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    assert asm.ptxas_resources(log) == {"registers": 255, "spill_stores": 420, "spill_loads": 408, "stack": 424}


def test_main_loop_is_the_loop_with_the_most_mma():
    from bench.compile import asm

    loop = asm.main_loop(SASS)
    assert loop == {
        "instructions": 9,
        "mma": 2,
        "full_waits": 1,
        "fp32": 4,
        "hot": {"instructions": 7, "mma": 2, "full_waits": 1, "fp32": 2},
    }  # rare FMULs skipped
    assert asm.main_loop("        /*0000*/                   EXIT ;\n") is None


def test_problems_name_what_failed():
    from bench.compile.run import problems

    ok = {
        "status": "ok",
        "arch": 90,
        "shared": 1024,
        "spill_stores": 0,
        "spill_loads": 0,
        "unaligned": [],
        "loads": {"scalar16bit": 0},
        "dot": "wgmma",
        "dtype16": True,
        "grids": [(10, 1, 1)],
    }
    assert problems(ok) == []
    bad = {
        **ok,
        "shared": 233472,
        "spill_stores": 824,
        "loads": {"scalar16bit": 24},
        "dot": "mma.sync",
        "grids": [(3, 70000)],
    }
    assert problems(bad) == [
        "shared memory 233,472 B > 232,448 B",
        "spills 824 B stores / 0 B loads",
        "24 scalar 16-bit global loads on 16-byte aligned inputs",
        "mma.sync instead of wgmma",
        "grid (3, 70000) exceeds 65535 on axis 1 or 2",
    ]
    assert problems({**ok, "loads": {"scalar16bit": 24}, "unaligned": ["B: +5460B"]}) == []  # layout, not kernel
    assert problems({**ok, "arch": 80, "dot": "mma.sync"}) == []
    assert problems({"status": "error", "error": "CompilationError: boom"}) == ["compile error: CompilationError: boom"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arch", "70"], "--arch: got '70', expected a comma-separated subset of 90,80"),
        (["--jobs", "0"], "--jobs: got 0, expected >= 1"),
        (["--shapes", "attn:bf16:s40"], "--shapes: 'attn:bf16:s40' is not preset:"),
    ],
)
def test_cli_errors_name_the_argument(argv, message):
    from bench.compile.cli import _run
    from imf.cli import UserError

    with pytest.raises(UserError, match=message):
        _run(argv)
