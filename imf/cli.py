"""One error path for every command-line entry point of the engine.

A *user error* is a mistake in what the user asked for: a bad argument, a missing or corrupt file, a
checkpoint that does not fit the model, an optional dependency that is not installed. It is raised
as :class:`UserError` (or a subclass: ``ConfigError``, ``DataError``, ``CheckpointError``, ...)
with a message that names the argument or file, what was wrong and what is expected. Every CLI's
``main`` goes through :func:`run_cli`, which prints such an error as **one line** on stderr and
returns its exit code; no Python traceback, unless ``--debug`` is on the command line or
``IMF_DEBUG=1`` is set (then the exception propagates with its full traceback). Their parsers are
:class:`ArgumentParser`, which raises argparse's own errors (unknown option, missing or bad value) as a
:class:`UserError`, so those are one line too.

Anything that is not a user error (a bug, a CUDA fault) is not caught: it keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

DEBUG_ENV = "IMF_DEBUG"


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


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors raise ``error_type`` (a :class:`UserError` subclass, by
    default :class:`UserError` itself) with argparse's message and a pointer to ``--help``, instead of
    printing the usage and exiting."""

    def __init__(self, *args, error_type: type[UserError] = UserError, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_type = error_type

    def error(self, message: str):
        raise self.error_type(f"{message} (see {self.prog} --help)")


def debug_requested(argv: Sequence[str]) -> bool:
    """True when ``--debug`` is in ``argv`` or ``IMF_DEBUG`` is set to a non-empty, non-"0" value."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_cli(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` (``argv`` without ``--debug``) and turn user errors into one line and an exit code.

    Returns ``main``'s integer result (``None`` counts as 0), the error's ``exit_code`` for a
    :class:`UserError`, and 130 on Ctrl-C. With ``--debug`` / ``IMF_DEBUG=1`` user errors propagate.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        code = main(argv)
    except UserError as e:
        if debug:
            raise
        message = " ".join(str(e).split("\n")).strip() or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)


__all__ = [
    "DEBUG_ENV",
    "ArgumentParser",
    "MissingDependencyError",
    "UserError",
    "debug_requested",
    "require",
    "run_cli",
]
