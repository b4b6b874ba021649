"""The CPU rehearsal of the one device command, ``bash bench/gpu_window.sh``, as the GPU machine would run it.

The machine gets a bare copy of the working tree (the files git would send: tracked and untracked-not-ignored,
no ``.git``) and a ``python3`` that has torch and triton but not this project. Here: the same files copied
into a temp folder, with the commit stamp a session writes before shipping (``bench/.commit``), and a
virtual environment without system site-packages whose only packages are those of the GPU image that the
command relies on (torch, triton, numpy, setuptools, wheel, pip, pytest and what they require), reached
through one ``.pth`` file that points at a folder of links to exactly those packages. The project must not
be importable there before the script runs; the script must install it and leave a gpu-check output folder
of at most 8 files, no subfolders, with a verdict and the stamped commit.
"""

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What the GPU image has (bench/results/README.md) and the command uses; wheel is optional here (setuptools
# >= 70.1 builds wheels itself), its absence makes the rehearsal stricter, not looser.
IMAGE_PACKAGES = ("torch", "triton", "numpy", "setuptools", "pip", "pytest")
OPTIONAL_PACKAGES = ("wheel",)


def _closure(roots) -> dict[str, md.Distribution]:
    """The distributions ``roots`` need (their requirements without extras, with markers evaluated here)."""
    from packaging.requirements import Requirement

    found: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            if name in IMAGE_PACKAGES:
                raise
            continue
        found[key] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def _link_packages(dists, shim: Path) -> None:
    """One link in ``shim`` per top-level module, package and ``.dist-info`` folder of each distribution."""
    for dist in dists.values():
        site = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops - {"__pycache__"}):
            if top.endswith(".pth") or (shim / top).exists() or not (site / top).exists():
                continue
            (shim / top).symlink_to(site / top)


def _bare_python(root: Path) -> Path:
    """A venv without system site-packages holding only the GPU image's packages; returns its python3."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    shim = root / "image-packages"
    shim.mkdir()
    _link_packages(_closure(IMAGE_PACKAGES + OPTIONAL_PACKAGES), shim)
    py = venv / "bin" / "python3"
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "gpu_image.pth").write_text(f"{shim}\n")
    return py


def _bare_tree(dest: Path) -> dict:
    """The files the device tool sends (``git ls-files -co --exclude-standard``), without ``.git``, and the
    commit stamp written from this checkout."""
    from bench.provenance import stamp, tree_files

    files = tree_files(REPO)
    if files is None:
        pytest.skip("the checkout has no git: nothing tells which files would travel")
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    return stamp(REPO, path=dest / "bench" / ".commit")


def _env(py: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "TRITON_"))}
    env["PATH"] = f"{py.parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def _imports(py: Path, env, *modules) -> subprocess.CompletedProcess:
    code = "; ".join(f"import {m}" for m in modules)
    return subprocess.run([py, "-c", code], cwd="/", env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_gpu_window_smoke_on_a_bare_tree(tmp_path):
    tree, out = tmp_path / "tree", tmp_path / "out"
    stamped = _bare_tree(tree)
    py = _bare_python(tmp_path)
    env = _env(py, OUT=str(out))
    have = _imports(py, env, "torch", "triton", "numpy", "pytest", "setuptools")
    assert have.returncode == 0, have.stderr[-2000:]
    for module in ("imf", "imf_kernels", "bench", "yaml", "tqdm"):  # not the project, not its other deps
        assert _imports(py, env, module).returncode != 0, f"{module} is importable before the install"
    assert not (tree / ".git").exists()

    run = subprocess.run(
        ["bash", str(tree / "bench" / "gpu_window.sh"), "--smoke"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "Error" not in log and "Traceback" not in log, log[-4000:]
    assert "using PYTHONPATH" not in log  # pip's offline editable install worked
    where = subprocess.run(
        [py, "-c", "import imf_kernels; print(imf_kernels.__file__)"], cwd="/", env=env, capture_output=True, text=True
    )
    assert where.stdout.strip().startswith(str(tree / "kernels")), where

    entries = list(out.iterdir())
    assert 3 <= len(entries) <= 8 and not [p for p in entries if p.is_dir()], entries
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["verdict"] and {s["status"] for s in summary["stages"].values()} == {"done"}, summary["stages"]
    env_info = summary["stages"]["env"]["result"]["env"]
    assert env_info["git_commit"] == stamped["git_commit"] and env_info["commit_source"].startswith("stamp")
    assert env_info["git_dirty"] is stamped["git_dirty"]
    assert env_info["stamp_matches_tree"] is True
    assert (out / "gpu_check.md").read_text().rstrip().splitlines()[-1].startswith("| scaling to 8 GPUs")


@pytest.mark.slow
def test_gpu_window_falls_back_to_pythonpath_without_pip(tmp_path):
    """No pip in the environment: the tree goes on PYTHONPATH with ``imf_kernels`` linked; the dry run plans."""
    tree = tmp_path / "tree"
    _bare_tree(tree)
    py = _bare_python(tmp_path)
    for link in (tmp_path / "image-packages").iterdir():
        if link.name.startswith("pip"):
            link.unlink()
    env = _env(py)
    assert _imports(py, env, "pip").returncode != 0
    run = subprocess.run(
        ["bash", str(tree / "bench" / "gpu_window.sh"), "--dry-run"], env=env, capture_output=True, text=True
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "using PYTHONPATH" in run.stdout and run.stdout.rstrip().endswith("fits"), log[-3000:]
