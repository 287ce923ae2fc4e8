"""Waits that a signal handler's call makes inside another wait of the main thread.

Python runs signal handlers on the main thread, between two bytecodes of whatever it was
doing, and a ``lock.acquire(timeout=…)`` or a ``time.sleep`` is cut short to run them. A
handler that calls ``track()`` while the main thread waits for the queue's lock (another
thread's or another process's transaction) may have to wait for that same lock; if signals
keep coming, every new one interrupts the wait of the handler before it, and a storm of them
during one long wait (a checkpoint, a stopped process) nested handlers until the stack ran
out (``RecursionError`` out of the application's own call).

``waiting()`` marks a wait of the main thread. A wait that starts while another is already
marked (only a signal handler's call can do that) runs with the signals that have Python
handlers blocked on this thread, and must be one blocking call with as little Python around
it as can be: a signal the kernel hands to another thread still has its handler run on the
main thread at its next bytecode, but not inside the call. Python runs the handlers of what
came meanwhile once the wait is over. The nesting then stops at two waits,
whatever the rate of signals, and no signal is lost: its handler runs late, by at most the
wait (which ``busy_timeout`` and flush deadlines bound).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterator

__all__ = ["handled_signals", "waiting"]

#: How many marked waits the main thread is inside (a signal handler's wait counts twice).
_depth = [0]
#: Signals a wait must never hold back: the kernel raises them on the faulting thread
#: itself, and blocked they would kill the process instead.
_SYNCHRONOUS = frozenset(
    int(getattr(signal, name))
    for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP", "SIGSYS")
    if hasattr(signal, name)
)
#: The signals a wait may hold back, as numbers (real-time ones have no name), listed once:
#: ``valid_signals()`` costs a third of a millisecond, long enough for more signals to nest.
_CANDIDATES = (
    tuple(sorted(int(s) for s in signal.valid_signals() if int(s) not in _SYNCHRONOUS))
    if hasattr(signal, "valid_signals")
    else ()
)


#: How long the list of handled signals is reused: listing them costs ~70 us (a getsignal
#: per signal), as long as a wait's whole setup, and handlers are rarely changed. A handler
#: installed meanwhile is held back from the next listing on (until then its signal may
#: interrupt a nested wait: one more level, as before this module).
_LISTED_FOR = 1.0
_listed: list[tuple[float, list[int]]] = [(-math.inf, [])]


def handled_signals() -> list[int]:
    """The signals whose handler is Python code (a function, or Python's SIGINT handler):
    the only ones a nested wait holds back (blocking every signal made the nesting deeper,
    not shallower, in a storm measured beside a lock held in bursts)."""
    now = time.monotonic()
    at, found = _listed[0]
    if now - at < _LISTED_FOR:
        return found
    getsignal = signal.getsignal
    found = [s for s in _CANDIDATES if callable(getsignal(s))]
    _listed[0] = (now, found)
    return found


@contextlib.contextmanager
def waiting(release: threading.RLock | None = None) -> Iterator[bool]:
    """Mark a wait of this thread: True when it is a nested one on the main thread, whose
    signals are held back until it ends (it must then wait in one blocking call).

    ``release``: the lock the wait acquires; if a handler delayed by the wait raises as the
    signals are let through, the lock is released before the exception goes on (the caller
    never saw it acquired).
    """
    if not hasattr(signal, "pthread_sigmask") or (
        threading.current_thread() is not threading.main_thread()
    ):
        yield False
        return
    depth = _depth
    depth[0] += 1  # a handler that runs in between adds and takes back its own
    try:
        if depth[0] <= 1:
            yield False
            return
        # Asking for the mask first (blocking nothing): if a handler pending now raises,
        # nothing is blocked yet and nothing is held.
        before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, handled_signals())
            yield True
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
            raise
        try:
            # The handlers of the signals that came meanwhile run here.
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
        except BaseException:
            if release is not None and release._is_owned():  # type: ignore[attr-defined]
                release.release()
            raise
    finally:
        depth[0] -= 1


def _forget_in_child() -> None:
    # The child's main thread is the thread that forked, inside none of the parent's waits.
    _depth[0] = 0
    _listed[0] = (-math.inf, [])


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
