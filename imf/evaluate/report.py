"""What an evaluation writes: the ADM ``.npz`` of a cell's samples, ``results.json`` and ``results.md``."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np

from imf.markdown import markdown_table


def write_npz(path: Path, parts: list[Path], chunk: int = 1024) -> Path:
    """Concatenate ``.npy`` parts (uint8, same trailing shape) into ``path`` as ``arr_0``, streaming."""
    arrays = [np.load(p, mmap_mode="r") for p in parts]
    shape = (sum(len(a) for a in arrays), *arrays[0].shape[1:])
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for a in arrays:
                for s in range(0, len(a), chunk):
                    f.write(np.ascontiguousarray(a[s : s + chunk]).tobytes())
    del arrays
    os.replace(tmp, path)
    return path


def git_commit() -> dict:
    """Commit and dirty flag of the checkout this module lives in (None outside git)."""
    here = Path(__file__).resolve().parent

    def git(*cmd):
        r = subprocess.run(["git", *cmd], cwd=here, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None}


def fmt(v) -> str:
    """A metric as a table cell or log value: 4 significant digits, ``-`` for none."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def report_markdown(report: dict) -> str:
    """The sweep as a markdown table (one row per cell), with a header naming the run."""
    cells = report["cells"]
    metric_keys = list(cells[0]["metrics"]) if cells else []
    cfg, ckpt, git = report["config"], report["checkpoint"], report["git"]
    head = [
        f"# Evaluation of `{ckpt['source']}`",
        "",
        f"preset {ckpt['preset']}, step {ckpt['step']}, EMA {ckpt['decay']}; {cfg['num']} samples per cell "
        f"(seed {cfg['seed']}), {report['world_size']} x {report['device']}, {report['precision']}, backend "
        f"{report['backend']}; commit {git['commit']}{' (dirty)' if git['dirty'] else ''}; {report['created']}",
        "",
    ]
    columns = ["NFE", "omega", "interval", *metric_keys, "sample img/s", "decode img/s"]
    rows = [
        {
            "NFE": c["steps"],
            "omega": c["omega"],
            "interval": f"[{c['t_min']:g}, {c['t_max']:g}]",
            **c["metrics"],
            "sample img/s": c["sample_img_per_s"],
            "decode img/s": c["decode_img_per_s"],
        }
        for c in cells
    ]
    return "\n".join(head) + "\n" + markdown_table(rows, columns, fmt=fmt)


def write_report(out: Path, report: dict) -> None:
    """``results.json`` (everything) and ``results.md`` (the table) under ``out``."""
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(report_markdown(report))


__all__ = ["fmt", "git_commit", "report_markdown", "write_npz", "write_report"]
