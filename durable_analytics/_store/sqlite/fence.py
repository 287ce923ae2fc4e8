"""The commit fence: no write commits while a recovery rewrites the queue file.

A recovery (``recovery.py``) locks the file with ``BEGIN IMMEDIATE``, salvages it, then
must let go of that lock (``ROLLBACK``) before SQLite's backup writes the fresh content
over it: a commit of another process landing in between would be overwritten, and its
call had returned. So every write commits under a *shared* ``flock`` on the queue's
directory, and the recovery holds it *exclusively* (``directory_lock``) from before its
``BEGIN IMMEDIATE`` until the fresh content is written.

A writer takes the shared lock only without blocking and only around one attempt (one
statement in autocommit, or a transaction once ``BEGIN IMMEDIATE`` succeeded): it never
holds it while it waits for SQLite's write lock, so a recovery is not starved by writers
queueing behind each other, and never waits for it while holding SQLite's lock, so the two
locks cannot deadlock. Cost: two ``flock`` calls per commit (see
``docs/reliability/files_and_resources.md``).

A delivering thread also holds it exclusively, for the few milliseconds of its RESTART
checkpoint and the small commit of its own that starts the log over right after it (see
``checkpoint.restart_log``): that commit writes the log's header and syncs it, and left
to the next writer it fell on a caller's ``track()``, which now finds the fence taken and
spools. It is taken only without waiting for a writer (between their commits), and only
around a checkpoint, which holds SQLite's write lock for those milliseconds anyway; only
for a queue file, never for a spool (whose fence is the spool directory's, shared by every
process's spool).

The fence is reentrant on its thread: a signal handler that calls ``track()`` runs on the
thread it interrupted, maybe while that thread holds the fence. Taking a shared ``flock``
again on the same descriptor changes nothing, but releasing it would release the
interrupted holder's lock too, so ``leave`` releases only when the outermost holder leaves
(``_depth``). The count is raised before the ``flock`` and lowered before the release, so a
handler that runs between the two sees a holder and never releases under it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from durable_analytics.exceptions import QueueBusy

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["EXCLUSIVE_RETRY", "CommitFence"]

#: Seconds between the tries of ``CommitFence.try_exclusive``.
EXCLUSIVE_RETRY = 0.0005


class CommitFence:
    """A shared ``flock`` on the queue's directory, held by each commit of this queue object.

    One per ``Connections``: callers hold its write lock, so only one thread uses it at a
    time; the same thread may enter it again from a signal handler (see the module
    docstring).
    """

    def __init__(
        self, directory: Path, wait: float, limit: Callable[[float], float] | None = None
    ) -> None:
        self.directory = directory
        self.wait = wait
        # When a wait begun at a time must end (``Waits.limit``: busy_timeout, or the
        # deadline of a flush, an exit or a drain), if earlier than ``wait``.
        self.limit = limit
        self._fd = -1
        self._unsupported = fcntl is None
        self._depth = 0  # holders on this thread: the outermost releases the lock

    def descriptor(self) -> int:
        """The directory's descriptor (opened on first use; also used for cheap stats)."""
        if self._fd < 0:
            fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
            if self._fd >= 0:  # a signal handler opened it meanwhile: keep that one
                os.close(fd)
            else:
                self._fd = fd
        return self._fd

    def try_enter(self) -> bool:
        """Take the shared lock without waiting; False while a recovery holds the directory."""
        if self._unsupported:
            return True
        self._depth += 1
        fd = self._fd
        try:
            fcntl.flock(fd if fd >= 0 else self.descriptor(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            self._depth -= 1
            return False
        except OSError:
            # A file system without flock: recoveries go unserialized there too.
            self._unsupported = True
        return True

    def try_exclusive(self, wait: float) -> bool:
        """Take the lock exclusively, trying for up to ``wait`` seconds; False if it stayed
        taken (nothing is held then). Released by ``leave``.

        For a delivering thread's RESTART checkpoint and the commit that starts the log
        over (``checkpoint.restart_log``): meanwhile every other writer, of any process,
        finds the fence taken as during a recovery, and spools or waits.
        """
        if self._unsupported or self._depth:
            return False
        fd = self.descriptor()
        deadline = time.monotonic() + wait
        self._depth += 1  # before the flock: see the module docstring
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                # Writers hold it shared for one commit at a time, so a later try finds a
                # gap. Few tries: each wake-up of this thread could take the CPU from one
                # of those writers (a caller) on a busy machine.
                if time.monotonic() >= deadline:
                    break
                time.sleep(EXCLUSIVE_RETRY)
            except OSError:
                break
        self._depth -= 1
        return False

    def wait_enter(self) -> None:
        """Wait (polling, bounded) until no recovery holds the directory, then take the lock.

        At most ``wait``, and no longer than ``limit`` allows: a recovery stopped while it
        holds the directory (SIGSTOP) must not hold a flush, an exit or a call past its own
        bound. The limit is read again at each poll: a deadline may be set meanwhile.
        """
        started = time.monotonic()
        delay = 0.0005
        while not self.try_enter():
            now = time.monotonic()
            deadline = started + self.wait
            if self.limit is not None:
                deadline = min(deadline, self.limit(started))
            if now > deadline:
                raise QueueBusy(
                    f"another process kept recovering a queue in {self.directory} for over "
                    f"{now - started:.1f} s"
                )
            time.sleep(min(delay, max(0.0, deadline - now)))
            delay = min(delay * 2, 0.02)

    def enter(self) -> None:
        if not self.try_enter():
            self.wait_enter()

    def leave(self) -> None:
        """Leave the fence: the lock is released when the outermost holder leaves."""
        if self._depth > 0:
            self._depth -= 1
        if self._depth or self._unsupported or self._fd < 0:
            return
        # A plain try, not contextlib.suppress: this runs on every commit.
        try:  # noqa: SIM105
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass

    @property
    def depth(self) -> int:
        """How many holds this thread has (0: the lock is not held by this object)."""
        return self._depth

    def unwind(self, depth: int) -> None:
        """Leave until only ``depth`` holds remain (after an exception cut a caller short)."""
        while self._depth > depth:
            self.leave()

    def forget_after_fork(self) -> None:
        """In a forked child: the descriptor is shared with the parent; open our own.

        Closing the inherited copy releases nothing the parent holds (the parent's
        descriptor still refers to the same open file), and unlocking it would.
        """
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1
        self._depth = 0

    def close(self) -> None:
        """Close the descriptor (reopened if a write comes after all)."""
        self.forget_after_fork()

    def __del__(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
