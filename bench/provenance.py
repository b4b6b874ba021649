"""Which commit a benchmark ran, and whether the tree was dirty, also on a copy of the tree without ``.git``.

A GPU machine gets a bare copy of the working tree (no history), so the commit is taken, in this order:

1. ``git`` in the tree (``git rev-parse HEAD``, ``git status --porcelain --untracked-files=no``);
2. the environment: ``IMF_GIT_COMMIT`` (and ``IMF_GIT_DIRTY`` = ``0`` / ``1``, else the dirty state is unknown);
3. the stamp file :data:`STAMP` (``bench/.commit``, ignored by git), written here before the tree is shipped
   by ``python -m bench.provenance stamp`` (``bash bench/gpu_window.sh --stamp``): the commit, the dirty
   flag, and the sha256 of every file that travels (tracked and untracked-not-ignored). On the GPU the files
   are hashed again: a tree that no longer matches its stamp is recorded dirty, with the files that differ;
4. otherwise ``"unknown"`` for both, never a commit or a clean flag by default.

Standard library only: the shell script runs it before the project is installed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAMP = REPO / "bench" / ".commit"
UNKNOWN = "unknown"


def _git(*args: str, root: Path = REPO) -> str | None:
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20, cwd=root)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def tree_files(root: Path = REPO) -> list[str] | None:
    """The files that travel with the tree (tracked + untracked-not-ignored), from git; None without git."""
    out = _git("ls-files", "-co", "--exclude-standard", "-z", root=root)
    if out is None:
        return None
    return sorted(p for p in out.split("\0") if p and (root / p).is_file())


def file_digests(files: list[str], root: Path = REPO) -> dict[str, str | None]:
    """sha256 of each file's bytes (None for a file that is missing)."""
    out = {}
    for name in files:
        path = root / name
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return out


def stamp(root: Path = REPO, path: Path | None = None) -> dict:
    """Write the stamp (see the module docstring) from git; ``ValueError`` where the tree has no git."""
    commit = _git("rev-parse", "HEAD", root=root)
    files = tree_files(root)
    if commit is None or files is None:
        raise ValueError(f"{root} is not a git work tree (or git is missing): nothing to stamp")
    status = _git("status", "--porcelain", "--untracked-files=no", root=root) or ""
    data = {
        "git_commit": commit.strip(),
        "git_dirty": bool(status.strip()),
        "dirty_files": [ln[3:] for ln in status.splitlines()][:50],
        "stamped_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": file_digests(files, root),
    }
    path = path or root / "bench" / ".commit"
    path.write_text(json.dumps(data, indent=0) + "\n")
    return data


def _from_stamp(path: Path, root: Path) -> dict:
    data = json.loads(path.read_text())
    now = file_digests(list(data["files"]), root)
    changed = sorted(name for name, digest in data["files"].items() if now[name] != digest)
    info = {
        "git_commit": data["git_commit"],
        "commit_source": f"stamp {path.name} ({data['stamped_utc']})",
        "stamp_matches_tree": not changed,
    }
    if changed:
        info.update(git_dirty=True, changed_since_stamp=changed[:20])
    else:
        info.update(git_dirty=data["git_dirty"])
    return info


def provenance(root: Path = REPO, stamp_path: Path | None = None, environ=os.environ) -> dict:
    """``{"git_commit", "git_dirty", "commit_source", ...}``: the commit (or ``"unknown"``) and the dirty
    state (True / False / ``"unknown"``), from the first source of the module docstring that has them."""
    commit = _git("rev-parse", "HEAD", root=root)
    if commit is not None:
        status = _git("status", "--porcelain", "--untracked-files=no", root=root)
        dirty = UNKNOWN if status is None else bool(status.strip())
        return {"git_commit": commit.strip(), "git_dirty": dirty, "commit_source": "git"}
    if environ.get("IMF_GIT_COMMIT"):
        flag = environ.get("IMF_GIT_DIRTY")
        dirty = {"0": False, "1": True}.get(flag, UNKNOWN)
        return {"git_commit": environ["IMF_GIT_COMMIT"], "git_dirty": dirty, "commit_source": "env IMF_GIT_COMMIT"}
    path = stamp_path or root / "bench" / ".commit"
    if path.is_file():
        try:
            return _from_stamp(path, root)
        except (OSError, ValueError, KeyError, TypeError) as err:
            return {"git_commit": UNKNOWN, "git_dirty": UNKNOWN, "commit_source": f"unreadable stamp: {err}"[:200]}
    return {"git_commit": UNKNOWN, "git_dirty": UNKNOWN, "commit_source": "none (no git, IMF_GIT_COMMIT or stamp)"}


def describe(env: dict) -> str:
    """``commit <sha> (clean | dirty | dirty state unknown)`` for the markdown reports."""
    dirty = env.get("git_dirty")
    state = "dirty" if dirty is True else "clean" if dirty is False else "dirty state unknown"
    return f"commit {env.get('git_commit') or UNKNOWN} ({state})"


def main(argv: list[str]) -> int:
    if argv != ["stamp"]:
        print("usage: python -m bench.provenance stamp   (writes bench/.commit from git)", file=sys.stderr)
        return 2
    try:
        data = stamp()
    except ValueError as err:
        print(f"bench.provenance: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {STAMP.relative_to(REPO)}: commit {data['git_commit'][:12]}, "
        f"{'dirty' if data['git_dirty'] else 'clean'}, {len(data['files'])} files"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
