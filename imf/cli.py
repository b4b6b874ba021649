"""One error path for every command-line entry point of the engine.

A *user error* is a mistake in what the user asked for: a bad argument, a missing or corrupt file, a
checkpoint that does not fit the model, an optional dependency that is not installed. It is raised
as :class:`UserError` (or a subclass: ``ConfigError``, ``DataError``, ``CheckpointError``, ...)
with a message that names the argument or file, what was wrong and what is expected. Every CLI's
``main`` goes through :func:`run_cli`, which prints such an error as **one line** on stderr
(``imf.train: error: ...``) and returns its exit code; no Python traceback, unless ``--debug`` is on the
command line or ``IMF_DEBUG=1`` is set (then the traceback comes first; the one line and the exit code
stay the same). A Ctrl-C is an interruption, not an error: ``imf.train: interrupted``, exit 130. Their parsers are
:class:`ArgumentParser`, which raises argparse's own errors (unknown option, missing or bad value) as a
:class:`UserError`, so those are one line too.

Anything that is not a user error (a bug, a CUDA fault) is not caught: it keeps its traceback.

**Output can fail; the command goes on.** While ``main`` runs, ``sys.stdout`` and ``sys.stderr`` are
:class:`QuietStream` s: a write that fails (a broken pipe after ``| head`` or a killed ``tee``, a closed
terminal) silences that stream for the rest of the process instead of raising, so a training run keeps
training, still writes its checkpoints and ``metrics.jsonl``, and still exits with the code that says
what happened (130 after SIGINT, ...).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

DEBUG_ENV = "IMF_DEBUG"
DEBUG_HELP = "also print the traceback of a user error (or IMF_DEBUG=1); the exit code stays the same"


class UserError(ValueError):
    """A mistake in the user's input; ``exit_code`` is what the CLI returns for it (2 by default)."""

    exit_code = 2


class MissingDependencyError(UserError):
    """An optional dependency is not installed; the message carries the install command."""

    exit_code = 3


def require(module: str, *, extra: str | None = None, package: str | None = None, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` with the command that installs it.

    ``extra`` names this project's extra that brings it (``pip install -e ".[data]"``), ``package``
    the PyPI name when it differs from the import name; ``purpose`` says what needs it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        how = f'pip install -e ".[{extra}]"' if extra else f"pip install {package or module}"
        name = package or module
        message = f"{purpose} needs {name}, which is not installed ({e}); install it with: {how}"
        raise MissingDependencyError(message) from e


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out_dir(path: str | os.PathLike, arg: str = "--out") -> Path:
    """Raise :class:`UserError` unless directory ``path`` exists or can be created and written: no file in
    the way, no parent that is a file, a folder can be made where it would be (tried with a trial folder,
    removed at once). Leaves nothing behind; returns ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{arg} {str(path)!r} is a file, not a directory; pass a directory")
    base = _first_existing(path)
    if not base.is_dir():
        raise UserError(f"{arg} {str(path)!r} cannot be created: {str(base)!r} is a file, not a directory")
    try:  # a trial folder, removed at once: permissions, read-only mounts, /proc
        os.rmdir(tempfile.mkdtemp(prefix=".imf-write-test-", dir=base))
    except OSError as e:
        what = "is not writable" if base == path else f"cannot be created in {str(base)!r}"
        raise UserError(f"{arg} {str(path)!r} {what} ({e.strerror or e})") from None
    return path


def check_out_file(path: str | os.PathLike, arg: str = "--out") -> Path:
    """Raise :class:`UserError` unless file ``path`` can be written (its folder as :func:`check_out_dir`)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{arg} {str(path)!r} is a directory; pass a file name")
    check_out_dir(path.parent, arg=f"{arg} {str(path)!r}: its folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{arg} {str(path)!r} is not writable")
    return path


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors raise ``error_type`` (a :class:`UserError` subclass, by
    default :class:`UserError` itself) with argparse's message and a pointer to ``--help``, instead of
    printing the usage and exiting."""

    def __init__(self, *args, error_type: type[UserError] = UserError, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_type = error_type

    def error(self, message: str):
        raise self.error_type(f"{message} (see {self.prog} --help)")


class QuietStream:
    """A text stream that turns silent on its first failed write or flush instead of raising.

    On failure the stream's file descriptor is pointed at ``/dev/null`` (when it has one), so that the
    data still buffered and the interpreter's last flush at exit go nowhere instead of failing again.
    Every other attribute is the wrapped stream's.
    """

    def __init__(self, stream):
        self.stream = stream
        self.failed = False

    def _fail(self) -> None:
        self.failed = True
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        except (OSError, ValueError):  # no file descriptor (a captured stream): silence is enough
            pass

    def write(self, text: str) -> int:
        if not self.failed:
            try:
                return self.stream.write(text)
            except (OSError, ValueError):  # EPIPE, EIO, or the stream was closed
                self._fail()
        return len(text)

    def flush(self) -> None:
        if not self.failed:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self._fail()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def debug_requested(argv: Sequence[str]) -> bool:
    """True when ``--debug`` is in ``argv`` or ``IMF_DEBUG`` is set to a non-empty, non-"0" value."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_cli(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` (``argv`` without ``--debug``) and turn user errors into one line and an exit code.

    Returns ``main``'s integer result (``None`` counts as 0), the error's ``exit_code`` for a
    :class:`UserError`, and 130 on Ctrl-C. With ``--debug`` / ``IMF_DEBUG=1`` the traceback is printed
    first; the exit code is the same.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog.removeprefix("python -m ")  # one prefix style: "imf.evaluate: error: ..."
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = QuietStream(sys.stdout), QuietStream(sys.stderr)
    try:
        code = main(argv)
    except UserError as e:
        if debug:
            traceback.print_exc()
        message = " ".join(str(e).split("\n")).strip() or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = saved
    return 0 if code is None else int(code)


__all__ = [
    "DEBUG_ENV",
    "DEBUG_HELP",
    "ArgumentParser",
    "MissingDependencyError",
    "QuietStream",
    "UserError",
    "check_out_dir",
    "check_out_file",
    "debug_requested",
    "require",
    "run_cli",
]
