"""Stopping on a signal: Ctrl-C (SIGINT) and SIGTERM (what Kubernetes and schedulers send)
end a run with one line and exit 128 + the signal's number (130, 143), never a traceback.

The handler raises `Stopped` in the main thread, where Python runs signal handlers. It is a
BaseException, so no `except Exception` in a stage turns it into an error row; it unwinds
the pipeline like any error: shards being committed finish in the gatherer's threads (a
signal never interrupts them), nothing after them starts, the embedded Ray is shut down by
`ray_session`, and the CLI reports it (docs/guarantees-process.md).

`ray.init` installs handlers of its own in the driver (a Python SIGTERM handler, then its
C++ core's failure handler, which prints a native `*** SIGTERM received ... PC:` dump and
aborts with 134): `catch_stop_signals` is called again after it.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_caught = False  # inside stop_signals_caught: what ray.init replaced is put back


class Stopped(BaseException):
    """The run was asked to stop by `signum`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _stop(signum: int, frame) -> None:
    raise Stopped(signum)


def catch_stop_signals() -> None:
    """SIGINT and SIGTERM raise Stopped from now on (main thread only: elsewhere Python
    cannot install handlers and the main thread's stay)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _stop)


def restore_stop_signals() -> None:
    """After something installed its own handlers (ray.init): ours again, if a command
    runs under stop_signals_caught (a program that embeds the pipeline keeps what it has)."""
    if _caught:
        catch_stop_signals()


def ignore_stop_signals() -> None:
    """While the last line is written: a second Ctrl-C must not turn it into a traceback."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


@contextmanager
def stop_signals_caught() -> Iterator[None]:
    """Stopped on SIGINT / SIGTERM inside the block; the handlers before it are put back
    (a caller's process, e.g. a test runner, keeps its own Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _caught
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    catch_stop_signals()
    _caught = True
    try:
        yield
    finally:
        _caught = False
        for signum, handler in before.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
