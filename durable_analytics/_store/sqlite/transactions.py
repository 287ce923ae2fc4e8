"""Transactions on a queue's per-thread connections: write, read, and the retry while busy.

``Connections`` (``connections.py``) inherits them: ``transaction`` is ``BEGIN IMMEDIATE`` …
``COMMIT`` under this process's write lock and the commit fence (``fence.py``), with the
appends of signal handlers that joined it stored again after a rollback; ``write`` and
``read`` add the one recovery of a damaged file and the checkpoint after a full disk;
``retry`` waits out another connection's lock. Which connection a thread uses, opening it
and ``fork()`` are ``Connections``'s own, reached through the hooks declared here.
"""

from __future__ import annotations

import contextlib
import functools
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from durable_analytics.exceptions import QueueCorrupt, QueueDiskFull, QueueError

from .errors import SQLITE_BUSY, SQLITE_LOCKED, errorcode, translate
from .files import checkpoint_for_space
from .schema import INSERT
from .waits import busy_pause, owned

if TYPE_CHECKING:
    from .fence import CommitFence
    from .waits import Waits

__all__ = ["Transactions"]

T = TypeVar("T")


class Transactions:
    """Mixin of ``Connections``: its transactions, and the waits they run under.

    ``Connections`` sets the attributes below and implements the four hooks.
    """

    path: Path
    on_corrupt: Callable[[QueueCorrupt], bool]
    local: threading.local
    write_lock: threading.RLock
    read_lock: threading.RLock
    fence: CommitFence
    joined: dict[int, list[tuple[int, bytes, int, float]]]
    waits: Waits

    def conn(self) -> sqlite3.Connection:
        raise NotImplementedError

    def check_side_files(self, *, now: bool = False) -> None:
        raise NotImplementedError

    def as_producer(self, conn: sqlite3.Connection, producer: bool) -> None:
        raise NotImplementedError

    def refuse_interrupted(self) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- waits (waits.py)

    def bounded(self, seconds: float | None) -> contextlib.AbstractContextManager[None]:
        """Inside the block, every wait of this queue (any thread) ends ``seconds`` from now
        (see ``Waits.bounded``)."""
        return self.waits.bounded(seconds)

    def _limit(self, started: float) -> float:
        return self.waits.limit(started)

    def locked(self, lock: threading.RLock) -> contextlib.AbstractContextManager[None]:
        """Hold this process's ``lock``, waiting at most as long as any wait may last."""
        return self.waits.locked(lock)

    def writing(self, *, producer: bool) -> contextlib.AbstractContextManager[None]:
        """Hold the write lock, appends (``producer``) first (see ``Waits.writing``)."""
        return self.waits.writing(self.write_lock, producer=producer)

    # ---------------------------------------------------------------- transactions

    def retry(self, fn: Callable[[], T], *, let_go: bool = False, producer: bool = False) -> T:
        """Run ``fn``, retrying while another connection holds the lock (up to busy_timeout,
        or an earlier deadline of ``bounded``).

        ``producer``: an append, which retries more often at first (see ``busy_pause``).

        ``let_go``: the caller holds the write lock once, outside any transaction, and ``fn``
        fetches its connection itself. Between attempts the thread then sleeps without the
        write lock, so that a ``fork()`` meanwhile can close every connection first
        (``close_for_fork``) instead of giving up on a thread that only waits for another
        process.
        """
        started = 0.0
        delay = 0.00002
        while True:
            try:
                return fn()
            except sqlite3.Error as exc:
                code = errorcode(exc)
                if code not in (SQLITE_BUSY, SQLITE_LOCKED):
                    raise translate(exc, self.path) from None
                now = time.monotonic()
                if not started:
                    started = now
                if now >= self._limit(started):
                    raise translate(exc, self.path) from None
                pause, delay = busy_pause(delay, now - started, producer=producer)
                pause *= 0.5 + random.random()
                if let_go:
                    self._sleep_unlocked(pause)
                else:
                    time.sleep(pause)

    def _sleep_unlocked(self, seconds: float) -> None:
        """Sleep without this thread's hold on the write lock, then take it back."""
        state = self.write_lock._release_save()  # type: ignore[attr-defined]
        try:
            time.sleep(seconds)
        finally:
            self.write_lock._acquire_restore(state)  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def transaction(self, *, producer: bool = False) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` under the process write lock, rolled back on error.

        ``producer``: the transaction appends on a caller's thread, whose commit should not
        pay for a checkpoint a flusher will run (see ``wal.py``). Appends made by signal
        handlers that interrupted it join it (``joined``); when it rolls back they are stored
        again on their own, since their calls returned.
        """
        nested = owned(self.write_lock)  # only a signal handler on this thread
        ident = threading.get_ident()
        with self.writing(producer=producer):
            if nested:
                self.refuse_interrupted()
            outer = self.joined.get(ident)
            if outer is None:
                self.joined[ident] = []  # before BEGIN: see Appender.append_interrupted
            try:
                conn = self._begin_fenced(producer, nested)
                try:
                    yield conn
                    self.retry(lambda: conn.execute("COMMIT"))
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    self._store_joined_again(conn)
                    raise
                finally:
                    self.fence.leave()
            finally:
                if outer is None:
                    self.joined.pop(ident, None)

    def _begin(self, producer: bool, check: bool) -> sqlite3.Connection:
        """One attempt: this thread's connection in a ``BEGIN IMMEDIATE`` transaction.

        Fetched anew at each attempt: a ``fork()`` may have closed it while this thread
        waited without the write lock (see ``retry``).
        """
        if check:
            # (Never under a call a signal interrupted: it moves the connections.)
            self.check_side_files()
        conn = self.conn()
        if conn.in_transaction:
            # Only a signal handler can get here: this thread is inside a transaction.
            raise QueueError(
                f"the queue {self.path}: a signal handler interrupted a transaction on "
                "this thread; only the calls (track() and the others) can be made there"
            )
        self.as_producer(conn, producer)
        conn.execute("BEGIN IMMEDIATE")
        return conn

    def _begin_fenced(self, producer: bool, nested: bool) -> sqlite3.Connection:
        """``BEGIN IMMEDIATE``, then the commit fence without waiting (see fence.py): while a
        recovery holds it, let go of SQLite's lock and wait for the fence first. On error
        nothing is held (no transaction, not the fence), and what joined is stored again.

        While another process holds SQLite's lock, the wait lets go of this process's write
        lock between attempts (unless nested in a call a signal handler interrupted).
        """
        current = getattr(self.local, "conn", None)
        # A transaction already open is an interrupted caller's (a signal handler's call
        # never begins inside one, ``_begin`` refuses): not this call's to end.
        ours = current is None or not current.in_transaction
        depth = self.fence.depth
        try:
            return self._begin_fenced_steps(producer, nested)
        except BaseException:
            if ours:
                self._abandon_begin(depth)
            raise

    def _abandon_begin(self, fence_depth: int) -> None:
        """Undo a begin cut short by an exception, wherever it struck.

        A signal handler runs right after a C call returns, so one that raises (SystemExit
        from a SIGTERM handler) can strike after ``BEGIN IMMEDIATE`` or the fence's flock
        succeeded and before this thread knew: the transaction would stay open, and an
        append the handler made first (it joined that transaction, and its call returned)
        would vanish with the process. Rolled back, fence left, the append stored again.
        """
        conn = getattr(self.local, "conn", None)
        if conn is not None and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        self.fence.unwind(fence_depth)
        if conn is not None:
            self._store_joined_again(conn)

    def _begin_fenced_steps(self, producer: bool, nested: bool) -> sqlite3.Connection:
        begin = functools.partial(self._begin, producer, not nested)
        conn = self.retry(begin, let_go=not nested, producer=producer)
        if self.fence.try_enter():
            return conn
        conn.execute("ROLLBACK")
        # Any failure from here on (waiting for the fence, beginning again) is undone by
        # ``_abandon_begin``: rolled back, fence left, the joined appends stored again.
        self.fence.wait_enter()
        self.retry(lambda: conn.execute("BEGIN IMMEDIATE"))
        # A signal handler's appends that joined the transaction just rolled back.
        for row in self.joined.get(threading.get_ident(), ()):
            conn.execute(INSERT, row)
        return conn

    def fenced(self, fn: Callable[[], T]) -> T:
        """Run one autocommit statement under the commit fence (call under the write lock)."""
        self.fence.enter()
        try:
            return fn()
        finally:
            self.fence.leave()

    def _store_joined_again(self, conn: sqlite3.Connection) -> None:
        """After a rollback: store the appends that joined the transaction, in autocommit."""
        joined = self.joined.get(threading.get_ident(), [])
        while joined:
            insert = functools.partial(conn.execute, INSERT, joined[0])
            self.retry(functools.partial(self.fenced, insert))
            joined.pop(0)

    def write(self, fn: Callable[[sqlite3.Connection], T], *, producer: bool = False) -> T:
        """Run ``fn`` in one write transaction, translating SQLite errors.

        When the file turns out damaged and ``on_corrupt`` recovers it, ``fn`` runs once
        more, on the fresh file; after a full disk, once more after a checkpoint gave
        space back.
        """
        try:
            return self._write_once(fn, producer)
        except QueueCorrupt as exc:
            if not self.on_corrupt(exc):
                raise
        except QueueDiskFull:
            with self.locked(self.write_lock):
                freed = checkpoint_for_space(self.conn())
            if not freed:
                raise
        return self._write_once(fn, producer)

    def _write_once(self, fn: Callable[[sqlite3.Connection], T], producer: bool) -> T:
        try:
            with self.transaction(producer=producer) as conn:
                return fn(conn)
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from None

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on this thread's connection under the read lock (recovering once)."""
        try:
            return self._read_once(fn)
        except QueueCorrupt as exc:
            if not self.on_corrupt(exc):
                raise
        return self._read_once(fn)

    def _read_once(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self.locked(self.read_lock):
            conn = self.conn()
            try:
                return self.retry(lambda: fn(conn))
            except sqlite3.Error as exc:
                raise translate(exc, self.path) from None
