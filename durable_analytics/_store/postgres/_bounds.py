"""How long a call on the PostgreSQL queue may wait, and what ends it when the server does not.

Two limits apply to every call (``PostgresQueue._tx``):

- **Deadlines** (``Deadlines.bounded``): while a flush, an exit or a drain with a deadline
  runs, no call of this queue, in any thread, waits past it; a call then gets what is left
  (at least ``GRACE``) instead of the queue's ``timeout``, as its ``statement_timeout``, its
  wait for a pooled connection and its connect timeout.
- **The watchdog** (``Watchdog.watching``): ``statement_timeout`` is the server's to apply.
  A server process that is stopped (SIGSTOP, a paused VM) or hung applies nothing, and
  libpq waits for its answer forever: the watchdog shuts down the socket of a call still
  running ``CUT_AFTER`` past its bound, which fails it at once (the connection is dropped).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from durable_analytics._store.settle import settle_grace

__all__ = ["CUT_AFTER", "GRACE", "WATCHDOG", "Deadlines", "Watch", "Watchdog"]

#: The least a call may wait under a deadline that has (nearly) passed: a healthy server
#: answers within it, so a flush that ran out of time still settles what it holds.
GRACE = 0.05
#: How long past its bound a call's connection is cut: the server's ``statement_timeout``
#: ends a slow statement first whenever the server is running at all.
CUT_AFTER = 0.25


class Deadlines:
    """The deadlines (``time.monotonic()``) of the flush/exit/drain calls running now."""

    def __init__(self) -> None:
        self._reset()
        self._keys = itertools.count()

    def _reset(self) -> None:
        # A forked child has none of its parent's calls running: their deadlines, copied
        # with the memory, would never be removed there and would bound every call.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._active: dict[int, float] = {}

    @contextlib.contextmanager
    def bounded(self, seconds: float | None) -> Iterator[None]:
        """Inside the block, no call waits past ``seconds`` from now (None: no bound)."""
        if seconds is None:
            yield
            return
        if self._pid != os.getpid():
            self._reset()
        key = next(self._keys)
        with self._lock:
            self._active[key] = time.monotonic() + max(0.0, seconds)
        try:
            yield
        finally:
            with self._lock:
                self._active.pop(key, None)

    def limit(self, timeout: float) -> float:
        """How long a call starting now may wait: ``timeout``, or less under a deadline."""
        if not self._active:
            return timeout
        if self._pid != os.getpid():
            self._reset()
            return timeout
        with self._lock:
            earliest = min(self._active.values(), default=None)
        if earliest is None:
            return timeout
        return min(timeout, max(GRACE, earliest + settle_grace() - time.monotonic()))


class Watch:
    """One watched call: ``cut`` is True once the watchdog dropped its connection."""

    __slots__ = ("conn", "cut", "due")

    def __init__(self, conn: Any, due: float) -> None:
        self.conn = conn
        self.due = due
        self.cut = False


class Watchdog:
    """The thread that cuts the connection of a call past its bound (``WATCHDOG``: one per
    process, started on first use)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._watches: dict[int, Watch] = {}
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, conn: Any, seconds: float) -> Iterator[Watch]:
        """Cut ``conn`` if the block still runs ``seconds`` + ``CUT_AFTER`` from now."""
        watch = Watch(conn, time.monotonic() + seconds + CUT_AFTER)
        key = next(self._keys)
        with self._cond:
            self._watches[key] = watch
            if self._thread is None:
                thread = threading.Thread(
                    target=self._run, name="durable-analytics-pg-watchdog", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:
                    pass  # interpreter exit refuses threads: the server's timeout only
                else:
                    self._thread = thread
            else:
                self._cond.notify()
        try:
            yield watch
        finally:
            # Under the lock: the watchdog never cuts a connection once its call has ended
            # (it may be serving the next call by then).
            with self._cond:
                self._watches.pop(key, None)

    def _run(self) -> None:
        cond = self._cond
        with cond:
            while True:
                now = time.monotonic()
                for key, watch in list(self._watches.items()):
                    if watch.due <= now:
                        del self._watches[key]
                        watch.cut = True
                        _shut_down(watch.conn)
                due = min((w.due for w in self._watches.values()), default=None)
                cond.wait(None if due is None else max(0.0, due - time.monotonic()))


def _shut_down(conn: Any) -> None:
    """Shut the connection's socket down: a thread blocked reading it gets EOF at once."""
    with contextlib.suppress(Exception):
        fd = conn.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


#: This process's watchdog, shared by every PostgreSQL queue in it.
WATCHDOG = Watchdog()

if hasattr(os, "register_at_fork"):
    # The parent's thread does not run in a forked child, and its lock may have been held.
    os.register_at_fork(after_in_child=WATCHDOG._reset)
