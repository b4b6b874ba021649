"""The one error type of :mod:`imf.convert`."""

from __future__ import annotations

from imf.cli import UserError


class ConvertError(UserError):
    """A file or state dict that is not the checkpoint it was given as: one line naming it and the problem."""

    exit_code = 2


__all__ = ["ConvertError"]
