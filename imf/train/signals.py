"""Graceful stop: SIGTERM/SIGINT ask the loop to finish the step, write a checkpoint and return."""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """While entered, SIGTERM/SIGINT set ``requested`` (the signal number); a second SIGINT aborts at once."""

    def __init__(self):
        self.requested: int | None = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def exit_code(stopped: str | None) -> int:
    """The process exit code of a run that ``stopped`` early for that reason (128 + signal, else 0)."""
    codes = {f"signal {s.name}": 128 + s for s in (signal.SIGTERM, signal.SIGINT)}
    return int(codes.get(stopped, 0))


__all__ = ["StopSignals", "exit_code"]
