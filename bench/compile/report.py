"""Write the static compile report: ``compile.json`` (every row) and ``compile.md`` (summaries)."""

from __future__ import annotations

import datetime
import json
import platform
from collections import defaultdict
from pathlib import Path

import torch
import triton

from ..provenance import provenance
from .capture import DEVICES

STATIC_NOTE = (
    "**Static report: no GPU ran.** Every number below comes from compiling the kernels for the target "
    "architecture on a CPU-only machine (`triton.compile` with `GPUTarget`, `ptxas -v`, `cuobjdump -sass` "
    "from the triton wheel). It says what the compiler produced (registers, spills, shared memory, load "
    "widths, tensor-core instructions, loop length), not how fast it runs."
)


def environment() -> dict:
    source = provenance()  # git, else IMF_GIT_COMMIT, else the bench/.commit stamp; "unknown" without any
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": source["git_commit"],
        "git_dirty": source["git_dirty"],
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "devices": {f"sm_{a}": d for a, d in DEVICES.items()},
    }


def summary(rows: list[dict]) -> list[dict]:
    """Per kernel and arch: configs compiled (distinct), ok, errors, spilling, scalar-load, over-smem,
    mma.sync, register range, max spill bytes."""
    groups = defaultdict(dict)
    for r in rows:
        groups[r["kernel"], r["arch"]][r["shape"], r["variant"], r["config"]] = r
    out = []
    for (kernel, arch), members in sorted(groups.items()):
        rs = list(members.values())
        ok = [r for r in rs if r["status"] == "ok"]
        regs = [r["registers"] for r in ok if r["registers"] is not None]
        out.append(
            {
                "kernel": kernel,
                "arch": arch,
                "rows": len(rs),
                "clean": sum(1 for r in rs if not r["problems"]),
                "errors": len(rs) - len(ok),
                "spilling": sum(1 for r in ok if r["spill_stores"] or r["spill_loads"]),
                "scalar_loads": sum(1 for r in ok if r["loads"]["scalar16bit"] and not r["unaligned"]),
                "unaligned_inputs": sum(1 for r in ok if r["unaligned"]),
                "over_smem": sum(1 for r in rs if any(p.startswith("shared memory") for p in r["problems"])),
                "no_wgmma": sum(1 for r in rs if any("instead of wgmma" in p for p in r["problems"])),
                "registers": f"{min(regs)}-{max(regs)}" if regs else "-",
                "max_spill_B": max((r["spill_stores"] for r in ok), default=0),
            }
        )
    return out


def _table(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _loads(r: dict) -> str:
    loads = r["loads"]
    return f"{loads['vec16']}/{loads['scalar16bit']}" + (f" tma {loads['tma']}" if loads["tma"] else "")


def markdown(rows: list[dict], env: dict, shapes: list[str], jvp_loop: list[dict] | None) -> str:
    lines = [
        f"# Static compile report ({' / '.join(f'sm_{a}' for a in sorted({r['arch'] for r in rows}, reverse=True))})",
        "",
        STATIC_NOTE,
        "",
        f"triton {env['triton']}, torch {env['torch']}, commit {env['commit']}, {env['date']}. "
        f"Command: `{env.get('command', 'python -m bench compile')}`.",
        "",
        "Checks per row (kernel x config the autotuner may consider x shape class x arch): compiles; "
        "shared memory within the opt-in limit (sm_90: 232,448 B, sm_80: 166,912 B); 0 spill bytes "
        "(`ptxas -v`); no scalar 16-bit global loads where the inputs are 16-byte aligned; wgmma (not "
        "mma.sync) on sm_90; grid axes 1-2 within 65,535.",
        "",
        f"Shape classes: {', '.join(f'`{s}`' for s in shapes)}.",
        "",
        "## Per kernel",
        "",
    ]
    cols = [
        "kernel",
        "arch",
        "rows",
        "clean",
        "errors",
        "spilling",
        "scalar loads",
        "unaligned inputs",
        "over smem",
        "no wgmma",
        "registers",
        "max spill B",
    ]
    lines += _table(
        cols,
        [
            [
                s["kernel"],
                f"sm_{s['arch']}",
                s["rows"],
                s["clean"],
                s["errors"],
                s["spilling"],
                s["scalar_loads"],
                s["unaligned_inputs"],
                s["over_smem"],
                s["no_wgmma"],
                s["registers"],
                s["max_spill_B"],
            ]
            for s in summary(rows)
        ],
    )
    if jvp_loop:
        lines += jvp_section(jvp_loop)
    lines += [
        "",
        "## Per shape, kernel and launch variant (sm_90)",
        "",
        "loads: 16-byte / scalar 16-bit global loads (PTX). pinned: the config `IMF_KERNELS_PINNED=1` uses.",
        "",
    ]
    cols = [
        "shape",
        "kernel",
        "variant",
        "configs",
        "clean",
        "registers",
        "max spill B",
        "max smem B",
        "loads",
        "dot",
        "pinned",
        "problems (first)",
    ]
    table = []
    groups = defaultdict(list)
    for r in rows:
        if r["arch"] == 90:
            groups[r["shape"], r["kernel"], r["variant"]].append(r)
    for (shape, kernel, variant), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        regs = sorted(r["registers"] for r in ok if r["registers"] is not None)
        pinned = next((r["config"] for r in rs if r["pinned"]), "-")
        first = next((f"{r['config']}: {r['problems'][0]}" for r in rs if r["problems"]), "")
        table.append(
            [
                shape,
                kernel,
                variant,
                len(rs),
                sum(1 for r in rs if not r["problems"]),
                f"{regs[0]}-{regs[-1]}" if regs else "-",
                max((r["spill_stores"] for r in ok), default=0),
                max((r["shared"] for r in ok), default=0),
                _loads(ok[0]) if ok else "-",
                ok[0]["dot"] if ok else "-",
                pinned,
                first,
            ]
        )
    lines += _table(cols, table)
    failing = defaultdict(list)
    for r in rows:
        if r["problems"]:
            failing[r["arch"], r["kernel"], r["config"]].append(r)
    lines += [
        "",
        f"## Problems ({sum(map(len, failing.values()))} rows, {len(failing)} kernel x config x arch)",
        "",
        "Grouped by kernel, config and arch; the problems are those of the first shape listed.",
        "",
    ]
    lines += _table(
        ["arch", "kernel", "config", "shapes", "problems"],
        [
            [f"sm_{arch}", kernel, config, ", ".join(sorted({r["shape"] for r in rs})), "; ".join(rs[0]["problems"])]
            for (arch, kernel, config), rs in sorted(failing.items())
        ],
    )
    return "\n".join(lines) + "\n"


def jvp_section(jvp_loop: list[dict]) -> list[str]:
    """The before/after table of the attention JVP main loop."""
    lines = [
        "",
        "## attention_jvp inner loop, before / after (d64, seq 4096, bf16, sm_90)",
        "",
        "SASS of the main loop (the backward branch with the most HGMMA). *Hot path*: the loop's "
        "instructions with every forward branch inside it taken (its rarely executed blocks, e.g. lazy "
        "rescaling, skipped; the first version has none). MMA, full waits (`WARPGROUP.DEPBAR.LE gsb0, 0x0`: "
        "no MMA left in flight) and FP32 instructions are per hot-path iteration; per score element = "
        "thread-instructions per iteration / (BLOCK_M x BLOCK_N).",
        "",
    ]
    cols = [
        "version",
        "config",
        "registers",
        "spill B",
        "smem B",
        "SASS / iter (whole loop)",
        "hot path SASS / iter",
        "MMA",
        "full waits",
        "FP32",
        "SASS / score elem",
        "FP32 / score elem",
    ]
    rows = []
    for j in jvp_loop:
        loop = j.get("loop")
        cells = ["-"] * 7
        if loop:
            hot, threads, tile = loop["hot"], j["num_warps"] * 32, j["tile_elements"]
            cells = [
                loop["instructions"],
                hot["instructions"],
                hot["mma"],
                hot["full_waits"],
                hot["fp32"],
                f"{hot['instructions'] * threads / tile:.1f}",
                f"{hot['fp32'] * threads / tile:.1f}",
            ]
        rows.append([j["version"], j["config"], j.get("registers"), j.get("spill_stores"), j.get("shared"), *cells])
    lines += _table(cols, rows)
    if len(jvp_loop) == 2 and all(j.get("loop") for j in jvp_loop):
        before, after = (j["loop"]["hot"]["instructions"] for j in jvp_loop)
        lines += ["", f"Hot-path instructions per iteration: {before} -> {after} ({(after - before) / before:+.1%})."]
    return lines


def write(out: Path, rows: list[dict], shapes: list[str], jvp_loop: list[dict] | None, command: str) -> dict:
    """Write ``compile.json`` and ``compile.md`` to ``out``; ``command`` is the command line that made them."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**environment(), "command": command}
    doc = {
        "static": True,
        "note": STATIC_NOTE,
        "env": env,
        "shapes": shapes,
        "summary": summary(rows),
        "attention_jvp_loop": jvp_loop,
        "rows": rows,
    }
    paths = {"json": out / "compile.json", "md": out / "compile.md"}
    paths["json"].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(rows, env, shapes, jvp_loop))
    return paths
