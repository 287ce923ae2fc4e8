"""Waits that a signal handler's call makes inside another wait of the main thread.

Python runs signal handlers on the main thread, between two bytecodes of whatever it was
doing, and a ``lock.acquire(timeout=…)`` or a ``time.sleep`` is cut short to run them. A
handler that calls ``track()`` while the main thread waits for the queue's lock (another
thread's or another process's transaction) may have to wait for that same lock; if signals
keep coming, every new one interrupts the wait of the handler before it, and a storm of them
during one long wait (a checkpoint, a stopped process) nested handlers until the stack ran
out (``RecursionError`` out of the application's own call).

``enter()`` marks a wait of the main thread (``leave()`` ends it). A wait that starts while
another is marked (only a signal handler's call can do that) runs with the signals that have
Python handlers blocked on this thread, and must be one blocking call with as little Python
around it as can be: a signal the kernel hands to another thread still has its handler run
on the main thread at its next bytecode, but not inside the call. Python runs the handlers
of what came meanwhile once the wait is over, and no signal is lost: its handler runs late,
by at most the wait (which ``busy_timeout`` and flush deadlines bound). In a storm of 2,000
signals a second beside a lock held in 1 ms bursts, handlers nested 3-4 deep, not hundreds.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

__all__ = ["Mark", "enter", "handled_signals", "leave"]

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


class Mark:
    """What ``enter`` did: whether it counted a wait, and the mask to restore if it held
    signals back (a nested wait)."""

    __slots__ = ("before", "counted")

    def __init__(self, counted: bool, before: set[int] | None) -> None:
        self.counted = counted
        self.before = before

    @property
    def nested(self) -> bool:
        """Whether the wait must be one blocking call (its signals are held back)."""
        return self.before is not None


_UNCOUNTED = Mark(False, None)


def enter() -> Mark:
    """Mark a wait of this thread; a nested one on the main thread holds signals back.

    Plain functions, not a context manager: the caller restores in its own ``finally``
    (``leave``), with as few bytecodes as can be between the wait and the restore, where
    a handler that raises would leave its signals blocked.
    """
    if not hasattr(signal, "pthread_sigmask") or (
        threading.current_thread() is not threading.main_thread()
    ):
        return _UNCOUNTED
    _depth[0] += 1  # a handler that runs in between adds and takes back its own
    if _depth[0] <= 1:
        return Mark(True, None)
    try:
        # Asking for the mask first (blocking nothing): if a handler pending now raises,
        # nothing is blocked yet.
        before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    except BaseException:
        _depth[0] -= 1
        raise
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, handled_signals())
    except BaseException:
        _depth[0] -= 1
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        raise
    return Mark(True, before)


def leave(mark: Mark) -> None:
    """Undo ``enter``: the handlers of the signals held back run here, and may raise."""
    if not mark.counted:
        return
    # At least 0: a child forked inside a wait starts at 0 and then leaves that wait.
    _depth[0] = max(0, _depth[0] - 1)
    if mark.before is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mark.before)


def _forget_in_child() -> None:
    # The child's main thread is the thread that forked, inside none of the parent's waits.
    _depth[0] = 0
    _listed[0] = (-math.inf, [])


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
