"""Per-thread SQLite connections to one queue file, and ``fork()``.

Their transactions (``write``, ``read``, ``transaction``, ``retry``) are in
``transactions.py``, a mixin ``Connections`` inherits. Every ``Connections`` registers with
``forks`` (this process's queues as a whole), so that a ``fork()`` closes them all first
(see ``Connections.close_for_fork``) and a raw read of a file happens only while none of
them is open on it (see ``forks.raw_lock``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from durable_analytics.exceptions import QueueCorrupt, QueueError

from . import forks
from .errors import SQLITE_BUSY, SQLITE_LOCKED, errorcode, translate
from .fence import CommitFence
from .probe import RECOVER_LOCK_SECONDS
from .schema import check_version, migrate
from .sidefiles import SideFiles, restore
from .transactions import Transactions
from .waits import Waits, owned
from .wal import WalBudget

__all__ = ["Connection", "Connections", "owned"]

#: Each connection's page cache, in KiB (SQLite's default is 2 MiB).
_CACHE_KIB = 256


class Connection(sqlite3.Connection):
    """An ``sqlite3.Connection`` a queue can reference weakly, to close it before ``fork()``."""

    #: Whether it checkpoints at the producers' size (see ``wal.py``), not the normal one.
    producer = False

    def __del__(self) -> None:
        # A thread's connection lives in its thread-local and goes when the thread ends (a
        # flusher thread, a drain worker): close it then, as Python 3.13 warns
        # (ResourceWarning) about a connection collected open. Connections inherited over
        # fork are kept referenced (``forks.abandon``) and never get here.
        with contextlib.suppress(Exception):
            self.close()


class Connections(Transactions):
    """The connections of one queue object: one per thread, opened on first use.

    ``on_corrupt`` is called when an operation meets a damaged file; it returns True when
    the file was recovered and the operation should run once more.
    """

    def __init__(
        self,
        path: Path,
        *,
        durability: Literal["normal", "full"],
        busy_timeout: float,
        on_corrupt: Callable[[QueueCorrupt], bool],
        wal: WalBudget | None = None,
        deadlines_of: Waits | None = None,
    ) -> None:
        self.path = path
        self.wal = wal or WalBudget.for_cap(1 << 30)
        self.durability = durability
        self.busy_timeout = busy_timeout
        self.on_corrupt = on_corrupt
        self.real = os.path.realpath(path)
        self.closed = False
        self.recovering = False  # connections of a recovery are open on the file
        self.local = threading.local()
        # One writer at a time inside this process: SQLite allows one anyway, and waiting on
        # a Python lock is far cheaper than SQLite's sleep-and-retry between our own threads.
        # Readers take the read lock. A thread takes its connection only under one of them,
        # so that fork() can close every connection while it holds both. Both are reentrant:
        # a signal handler that calls track() runs on the thread it interrupted, maybe while
        # that thread holds them (see Appender.append_interrupted); a plain lock deadlocks.
        self.write_lock = threading.RLock()
        self.read_lock = threading.RLock()
        self.conns: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._conns_lock = threading.Lock()
        self._fork_held = False
        # What a thread is doing that a signal handler on it must not interrupt with a call
        # (by thread id; see refuse_interrupted).
        self._unsafe_now: dict[int, str] = {}
        # Per thread inside transaction(): the appends of signal handlers that joined it.
        self.joined: dict[int, list[tuple[int, bytes, int, float]]] = {}
        # fork() found an operation in flight and forked with connections open.
        self.open_at_fork = False
        # Deadlines, the order of writers, busy pauses (see waits.py).
        self.waits = Waits(path, busy_timeout, parent=deadlines_of)
        # Every commit holds it (shared): a recovery of another process holds it exclusively.
        self.fence = CommitFence(path.parent, RECOVER_LOCK_SECONDS, self.waits.limit)
        self.side = SideFiles(path, self.fence.descriptor)  # the -wal and -shm in use
        forks.register(self)

    # ---------------------------------------------------------------- fork

    def close_all(self) -> None:
        """Close every connection of this process to the file (callers hold both locks, or
        are the only user: the constructor)."""
        with self._conns_lock:
            conns = list(self.conns)
            self.conns = weakref.WeakSet()
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self.local = threading.local()
        self.side.forget()

    def close_for_fork(self) -> None:
        """Close every connection of this process to the queue, just before ``fork()``.

        SQLite keeps its POSIX-lock bookkeeping per file and per process, shared by all the
        process's connections. A child forked while the parent has the file open inherits
        that bookkeeping but not the locks it describes, so even the child's own new
        connection runs without a real lock on the file: once the parent exits, another
        process closing its connection believes it is the last one, checkpoints and deletes
        the WAL under the child, and every commit the child makes afterwards is lost. With
        no connection open at fork, the child starts clean. The parent's threads reopen on
        their next operation.
        """
        self.open_at_fork = True  # until every connection is closed
        if owned(self.write_lock) or owned(self.read_lock):
            return  # fork() from a signal handler inside an operation: it is in flight
        if not self.write_lock.acquire(timeout=forks.FORK_WAIT):
            return  # an operation is stuck in flight: leave it (the child refuses the file)
        if not self.read_lock.acquire(timeout=forks.FORK_WAIT):
            self.write_lock.release()
            return
        self._fork_held = True
        self.close_all()
        self.open_at_fork = False

    def resume_after_fork(self) -> None:
        self.open_at_fork = False
        if self._fork_held:
            self._fork_held = False
            self.read_lock.release()
            self.write_lock.release()

    def forget_connections(self) -> None:
        # After fork the parent's connections (if any are still open: see close_for_fork)
        # and lock state are not ours to use or close.
        forks.abandon(self.local, *self.conns)
        self.local = threading.local()
        self.conns = weakref.WeakSet()
        self._conns_lock = threading.Lock()
        self.write_lock = threading.RLock()
        self.read_lock = threading.RLock()
        self._fork_held = False
        self._unsafe_now = {}
        self.joined = {}
        self.open_at_fork = False
        self.waits.reset_after_fork()  # the parent's flush/exit calls do not run here
        self.fence.forget_after_fork()
        self.side.forget()

    # ---------------------------------------------------------------- opening

    def conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (call under one of the locks)."""
        try:
            conn: sqlite3.Connection = self.local.conn
            return conn
        except AttributeError:
            pass
        if self.closed:
            raise QueueError(f"the queue {self.path} is closed")
        with self._unsafe("opening the queue"):
            conn = self._open()
        self.local.conn = conn
        with self._conns_lock:
            first = not self.conns
            self.conns.add(conn)
        if first:
            self.side.record()
        return conn

    def check_side_files(self, *, now: bool = False) -> None:
        """Before a write (under the write lock): if the -wal or -shm on disk is no longer
        the one our connections use, move to it without losing a message (sidefiles.py)."""
        what = self.side.changed(both=now)
        if not what:
            return
        with self.read_lock, self._unsafe("moving to the queue's new -wal and -shm"):
            try:
                restore(self.path, what, self.conn(), self.close_all, self.conn)
            except sqlite3.Error as exc:
                raise translate(exc, self.path) from None

    def open_extra(self) -> Connection:
        """A connection of its own, not this thread's, set up like the others; close it."""
        self.refuse_interrupted()
        return self._open()

    def _open(self) -> Connection:
        if forks.inherited_open(self.real):
            raise QueueError(
                f"the queue {self.path} cannot be used in this process: it was forked while a "
                f"thread of its parent was inside an operation on the queue (for over "
                f"{forks.FORK_WAIT:g} s), so SQLite's state of the file here is unknown and a "
                "write could be lost; nothing was stored. Fork while no call is in flight, "
                "or start the process with spawn (multiprocessing) or exec"
            )
        try:
            # timeout=0: busy waits are ours (retry), with sub-millisecond first retries
            # instead of SQLite's 1 ms minimum sleep.
            conn = sqlite3.connect(
                str(self.path),
                timeout=0,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=64,
                factory=Connection,
            )
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from None
        try:
            with forks.raw_lock():
                self.retry(lambda: self._setup(conn))
        except BaseException:
            conn.close()
            raise
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        try:
            # Refuse a newer or foreign file before switching it to WAL, which would write to
            # it: one statement, so one consistent snapshot of the version and the tables.
            version, tables = conn.execute(
                "SELECT (SELECT user_version FROM pragma_user_version), "
                "(SELECT count(*) FROM sqlite_master WHERE type = 'table')"
            ).fetchone()
            check_version(self.path, int(version), int(tables))
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            if errorcode(exc) in (SQLITE_BUSY, SQLITE_LOCKED):
                raise
            raise translate(exc, self.path) from None
        if str(mode).lower() != "wal":
            raise QueueError(f"the queue {self.path} could not be switched to WAL mode ({mode})")
        sync = "FULL" if self.durability == "full" else "NORMAL"
        conn.execute(f"PRAGMA synchronous={sync}")
        conn.execute("PRAGMA temp_store=MEMORY")
        # Every thread has its own connection and page cache: drain --concurrency 64 had 64
        # caches of SQLite's default 2 MB filled with message bodies. Queue work reads a
        # batch at a time, and the OS caches the file anyway.
        conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        conn.execute(f"PRAGMA journal_size_limit={int(self.wal.keep_limit)}")
        conn.execute(f"PRAGMA wal_autocheckpoint={int(self.wal.commit_pages)}")
        migrate(conn, self.path)

    def as_producer(self, conn: sqlite3.Connection, producer: bool) -> None:
        """Make ``conn`` checkpoint at the producers' size or the normal one (see ``wal.py``)."""
        if getattr(conn, "producer", False) != producer:
            pages = self.wal.producer_pages if producer else self.wal.commit_pages
            conn.execute(f"PRAGMA wal_autocheckpoint={int(pages)}")
            conn.producer = producer  # type: ignore[attr-defined]

    def close_thread(self) -> None:
        """Close this thread's connection and open no new one; other threads' close when
        they end."""
        if not self.closed and self.conns:
            with self.locked(self.write_lock):
                self.check_side_files(now=True)  # what only this process still sees is kept
        self.closed = True
        with self.locked(self.write_lock):
            conn = getattr(self.local, "conn", None)
            if conn is not None:
                del self.local.conn
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self.fence.close()

    # ---------------------------------------------------------------- signal handlers

    @contextlib.contextmanager
    def _unsafe(self, doing: str) -> Iterator[None]:
        """Mark this thread as ``doing`` something a signal handler's call must not join."""
        ident = threading.get_ident()
        outer = self._unsafe_now.get(ident)
        self._unsafe_now[ident] = doing
        try:
            yield
        finally:
            if outer is None:
                self._unsafe_now.pop(ident, None)
            else:
                self._unsafe_now[ident] = outer

    def refuse_interrupted(self) -> None:
        """Raise when a signal handler interrupted this thread while it forks, recovers, opens
        the file or moves to new side files.

        Then the file must have no connection of this process (fork), is being replaced
        (recovery, side files), or this thread's connection is half set up: nothing can be
        stored at that moment, and waiting would never end (or last ``busy_timeout``).
        """
        doing = self._unsafe_now.get(threading.get_ident()) if self._unsafe_now else None
        if doing is None and (self._fork_held or self.recovering) and owned(self.write_lock):
            doing = "forking" if self._fork_held else "recovering the queue"
        if doing is not None:
            raise QueueError(
                f"the queue {self.path} cannot be used from a signal handler that interrupted "
                f"this thread while it was {doing}; the call was not stored"
            )
