"""Delivery slots: how many processes deliver from one queue file at once.

SQLite lets one connection write at a time, and every delivery step (a lease, an ack, a
move of the journals) is a write. A few processes delivering side by side share that lock
well. Forty of them (a big gunicorn or Celery pool shut down at once, each exit or
``close()`` flushing the one shared queue) spent their time waiting for it: threads polled
the lock, and whoever held it was preempted among them. 40 processes closing with 12,000
messages queued delivered 1,400-1,700 of them in ``shutdown_timeout`` (5 s) and sent some
twice (requests dropped at the deadline with their answers unread).

So once more processes than ``SLOTS`` hold journals or spools of the queue, a flush loop
(``flush()``, ``close()``, exit, ``drain``, ``worker``) delivers only while its process
holds one of ``SLOTS`` slots: an exclusive ``flock`` on ``<queue>.slot<k>.lock``. A
process that has none waits (polling every ``POLL`` seconds) while the holders deliver
everything ready, its messages included, and its loop ends as soon as nothing it waits for
is pending. The kernel releases a slot whose holder died. A holder that delivers nothing
(stopped with ``SIGSTOP``, hung) does not hold the others back: a loop that saw no
progress for ``PATIENCE`` seconds delivers without a slot, as every loop did before.
Threads of one process share its slot. A child forked while its parent held one does not
hold it (the ``flock`` stays the parent's).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_WAIT", "PATIENCE", "POLL", "SLOTS", "DeliverySlots"]

#: Processes that deliver from one queue file at once, once more than this many share it.
SLOTS = 4
#: How often a process without a slot tries for one (seconds).
POLL = 0.02
#: How long a flush loop waits for a slot while nothing it waits for gets delivered
#: (seconds); past it, it delivers without one.
PATIENCE = 2.0
#: How long a pass waits for another thread of its process to finish counting holders.
LOCK_WAIT = 0.01


class DeliverySlots:
    """The delivery slots of one queue file, as this process sees them (see the module)."""

    def __init__(self, path: Path, processes: Callable[[], int]) -> None:
        #: How often a loop without a slot tries again, and how long it waits without
        #: progress (read by ``_drain``).
        self.poll = POLL
        self.patience = PATIENCE
        self._files = [path.with_name(f"{path.name}.slot{k}.lock") for k in range(SLOTS)]
        #: How many processes hold journals or spools of the queue (``Spools.spoolers``).
        self._processes = processes
        self._lock = threading.Lock()
        self._fd = -1
        self._holders = 0
        self._pid = os.getpid()

    def needed(self) -> bool:
        """Whether more processes share the queue than there are slots."""
        return fcntl is not None and self._processes() > SLOTS

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """Hold a slot inside the block if one is free (or this process holds one); yields
        whether it does."""
        taken = self._take()
        try:
            yield taken
        finally:
            if taken:
                self._give()

    def _take(self) -> bool:
        if self._pid != os.getpid():
            # A forked child (only the forking thread runs here): the flock is its
            # parent's. Its copy of the descriptor is closed (not unlocked: that would
            # release the parent's slot), and the lock is new (a thread of the parent may
            # have held it at the fork).
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
            self._lock = threading.Lock()
            self._fd, self._holders, self._pid = -1, 0, os.getpid()
        # A moment at most: another thread holds it only to count, and a signal handler's
        # flush inside this thread's own count must not wait for itself (its loop then
        # waits for a slot like any other).
        if not self._lock.acquire(timeout=LOCK_WAIT):
            return False
        try:
            if self._holders:
                self._holders += 1
                return True
            for file in self._files:
                fd = _try_lock(file)
                if fd >= 0:
                    self._fd, self._holders = fd, 1
                    return True
            return False
        finally:
            self._lock.release()

    def _give(self) -> None:
        with self._lock:
            if self._pid != os.getpid():
                return  # taken in the parent, before a fork: not this process's
            self._holders -= 1
            if self._holders == 0 and self._fd >= 0:
                fd, self._fd = self._fd, -1
                with contextlib.suppress(OSError):
                    os.close(fd)  # releases the flock


def _try_lock(file: Path) -> int:
    """A descriptor of ``file`` holding its exclusive flock, or -1 (taken, or no file)."""
    try:
        fd = os.open(
            file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o600
        )
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return -1
    return fd
