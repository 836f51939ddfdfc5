"""SIGTERM ends a run as Ctrl-C does.

SIGTERM is how a run is usually stopped from outside: a scheduler's time limit, ``kill``, torchrun
stopping its workers, ``timeout``. Its default action ends the process on the spot, silently, with the
output folder's lock file left behind. Within :func:`sigterm_as_interrupt` it raises :class:`Terminated`
instead, a KeyboardInterrupt, so that a run ends on it as on Ctrl-C: a write in progress undone
(``checkpoint.atomic_write``), the lock file deleted, what a benchmark measured kept, one line with the
resume hint.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Tuple

__all__ = ["Terminated", "sigterm_as_interrupt", "how_it_ended"]


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, within :func:`sigterm_as_interrupt`."""


def _terminated(signum, frame):
    # a second SIGTERM, while the run cleans up after the first, ends the process as SIGTERM does
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated`. Only where SIGTERM has its default action: a
    launcher may have set it to be ignored, or a program embedding this one may handle it itself (a handler
    set outside Python, which could not be put back); and only in the main thread, the only one that can
    set a handler (so the block can run in any thread)."""
    take = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if take:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        if take:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def how_it_ended(interrupt: KeyboardInterrupt) -> Tuple[str, int]:
    """(what to print, exit status) for a run ended by ``interrupt``: the status a shell gives a process that
    the signal ended, 128 + its number."""
    if isinstance(interrupt, Terminated):
        return "terminated (SIGTERM)", 128 + signal.SIGTERM
    return "interrupted", 128 + signal.SIGINT
