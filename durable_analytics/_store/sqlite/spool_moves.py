"""Moves: every spool's and journal's messages into the queue, exactly once (``spool.py``).

A move reads a chunk of a spool's rows past its record (``RECORD`` + the spool's name, in
the queue's ``counters`` table, ``move_records``), and inserts them into the queue in one
transaction with the record of the last row it moved; only then are the moved rows deleted
from the spool. Movers serialize on the queue's write lock and each starts after the other's
record. Another process's spool is adopted: moved whenever a poll looks (``SCAN_EVERY``),
and deleted with its record once its owner is gone (its ``flock`` can be taken) and it is
empty. Journal files are moved by the same movers, by the rules of ``journal_moves.py``.

``SpoolMoves`` is the moving half of ``Spools``: this module holds the rules of a move and
the order of a whole move (own journal, own spool, then every other process's), ``spool.py``
the appends of this process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from durable_analytics.exceptions import QueueBusy, QueueError, QueuePermissionError

from .files import check_spool_directory
from .journal import SUFFIX, Journal, owner_of
from .journal_moves import JournalMoves
from .move_records import RECORD, commit_chunk, owner_gone, record_of
from .waits import owned

if TYPE_CHECKING:
    from .queue import SqliteQueue
    from .spool import SpoolOpener

__all__ = ["BUSY_RETRY", "MOVE_ROWS", "OTHERS_WAIT", "SCAN_EVERY", "SpoolMoves"]

logger = logging.getLogger("durable_analytics.queue")

#: Rows moved into the queue per transaction (appends wait for at most one chunk).
MOVE_ROWS = 256
#: How often a poll looks for other processes' spools (seconds).
SCAN_EVERY = 0.05
#: How long a mover waits for another process's spool that another connection holds so that
#: it cannot even be read (exclusive locking mode: an operator's ``sqlite3`` shell, a
#: backup); its owner's appends never do that. Then it leaves that spool alone for
#: ``BUSY_RETRY`` seconds, and its messages wait there, counted pending.
OTHERS_WAIT = 0.05
BUSY_RETRY = 1.0

_SELECT = (
    "SELECT m.id, d.host, d.write_key, m.body, m.size, m.enqueued_at "
    "FROM messages m JOIN destinations d ON d.id = m.dest "
    "WHERE m.id > ? ORDER BY m.id LIMIT ?"
)


class _SpoolBusy(QueueBusy):
    """Another process's spool stayed locked past ``OTHERS_WAIT`` (not the queue file)."""


def _rows_after(conn: sqlite3.Connection, after: int) -> list[Any]:
    """A chunk of a spool's rows past ``after``, with their destination's names."""
    return conn.execute(_SELECT, (after, MOVE_ROWS)).fetchall()


def _delete_moved(conn: sqlite3.Connection, last: int) -> None:
    # Keep the newest moved row: new ids must stay above the record.
    conn.execute("DELETE FROM messages WHERE id < ?", (last,))


class SpoolMoves(JournalMoves):
    """The moves of ``Spools``: this process's spool and journal, and every other process's
    in the directory."""

    # Set by ``Spools.__init__`` (and those of ``JournalMoves``).
    _opener: SpoolOpener
    _own: SqliteQueue | None
    _own_bad: bool
    _others: dict[str, SqliteQueue]
    _busy_until: dict[str, float]
    _scanned: float
    _dir_warned: bool
    _moving: threading.RLock
    moved_upto: int
    journal: Journal | None

    if TYPE_CHECKING:

        def has_unmoved(self) -> bool: ...

        def _turn_off(self, exc: BaseException) -> None: ...

    @property
    def bad(self) -> frozenset[str]:
        """The spools found damaged: no mover takes them and nobody counts them."""
        return frozenset(self._bad)

    def move(
        self,
        queue: SqliteQueue,
        *,
        others: bool,
        scan_now: bool = False,
        budget: int | None = None,
        wait: bool = True,
    ) -> int:
        """Move spooled messages into ``queue``: this process's, and with ``others`` those of
        every spool in the directory (looked for at most every ``SCAN_EVERY``, or now with
        ``scan_now``). Returns how many were moved.

        ``budget``: read at most about that many bytes of journals (a chunk more at most),
        the rest left for the next move: a Client's flusher thread moves a little before
        each lease, not a whole burst at once while it shares the caller's GIL.

        ``wait=False`` (the move before a lease): when another thread of this process is
        moving, return 0 at once instead of waiting for that move; the lease takes what the
        file holds. With many processes on one queue, every delivering thread of a process
        queued up behind the one move waiting for the file's lock, each lease with it.
        """
        if owned(self._moving):
            return 0  # a signal handler's flush inside this thread's move: the move goes on
        if not self._moving.acquire(blocking=wait):
            return 0
        try:
            return self._move_holding(queue, others=others, scan_now=scan_now, budget=budget)
        finally:
            self._moving.release()

    def _move_holding(
        self, queue: SqliteQueue, *, others: bool, scan_now: bool, budget: int | None
    ) -> int:
        """``move``'s work, under ``_moving``."""
        self._budget = budget
        moved = 0
        own = self._own
        scan = others and (scan_now or time.monotonic() - self._scanned >= SCAN_EVERY)
        journal = self.journal
        if journal is not None and (journal.has_unmoved() or (scan and journal.files)):
            moved += self._move_own_journal(queue, journal)
        # Looked at on every scan too: ``last_spooled`` is a hint that two producer
        # threads may set out of order.
        if own is not None and not self._own_bad and (self.has_unmoved() or scan):
            try:
                moved += self._move_one(queue, self._own_name, own, mine=True)[0]
            except QueueBusy:
                raise
            except (QueueError, OSError, sqlite3.Error) as exc:
                # Damaged: spooling stops here; what it holds stays on disk as it is.
                self._own_bad = True
                self._bad.add(self._own_name)
                self._turn_off(exc)
        if scan:
            moved += self._move_others(queue, retry_busy=scan_now)
        return moved

    def _move_one(
        self, queue: SqliteQueue, name: str, spool: SqliteQueue, *, mine: bool
    ) -> tuple[int, bool]:
        """Move one spool's rows past its record into the queue, a chunk per transaction;
        returns how many moved, and False when it stopped with rows left because the queue
        had no room for them under ``max_queue_bytes`` (``_room_for``).

        The chunk is read before the queue's transaction and the record checked again
        inside it (another mover may have gone first: then it starts over): a thread never
        holds the locks of two files at once, which a ``fork()`` (closing every file's
        connections in turn) could otherwise meet in the other order.
        """
        record = RECORD + name
        db_path = self.dir / f"{name}.db"
        moved = 0
        known: dict[tuple[str, str], int] = {}
        while True:
            found = queue._db.read(partial(record_of, name=record))
            after = int(found[0]) if found is not None else 0
            try:
                rows = spool._db.read(partial(_rows_after, after=after))
            except QueueBusy:
                if mine:
                    raise
                raise _SpoolBusy(f"the spool {db_path} stayed locked") from None
            if not rows:
                if mine:
                    self.moved_upto = max(self.moved_upto, after)
                return moved, True
            last = int(rows[-1][0])

            # Another mover deleted this spool (and then its record) after we opened it:
            # what this handle still reads was moved already.
            gone = (lambda: False) if mine else (lambda: not db_path.exists())
            done = queue._db.write(partial(commit_chunk, queue, record, after, rows, known, gone))
            if not done:
                if done is None:
                    return moved, False  # the rest waits here until deliveries make room
                if not db_path.exists():
                    return moved, True
                continue
            queue._note_destinations(known)
            if mine:
                self.moved_upto = max(self.moved_upto, last)
                spool._db.write(partial(_delete_moved, last=last))
            else:
                # Another process's spool is not on this delivery's path: its owner may hold
                # its lock (stopped inside an INSERT). The record protects what was moved;
                # a later move deletes it.
                with contextlib.suppress(QueueBusy), spool.bounded(0):
                    spool._db.write(partial(_delete_moved, last=last))
            # The owner never checkpoints its spool on its calls (a few milliseconds each):
            # the mover does, once its log grew by the normal size (``Checkpoints``).
            spool._checkpoint_if_due()
            moved += len(rows)
            if len(rows) < MOVE_ROWS:
                return moved, True

    def dir_trusted(self) -> bool:
        """Whether the spool directory may be read: another user's, or one others can write
        (``check_spool_directory``), is not — a file planted there would be delivered as if
        a call had made it. Warned about once per queue object; looked at on every scan."""
        if not os.path.lexists(self.dir):
            return True  # nothing there to read yet
        try:
            check_spool_directory(self.dir)
        except QueuePermissionError as exc:
            if not self._dir_warned:
                self._dir_warned = True
                logger.warning("not moving or counting what is in %s: %s", self.dir, exc)
            return False
        return True

    def _move_others(self, queue: SqliteQueue, *, retry_busy: bool = False) -> int:
        self._scanned = time.monotonic()
        if not self.dir_trusted():
            return 0
        names: list[str] = []
        logs: dict[str, list[tuple[int, str]]] = {}
        try:
            for entry in os.scandir(self.dir):
                if not entry.is_file(follow_symlinks=False):
                    continue
                if entry.name.endswith(".db"):
                    names.append(entry.name[: -len(".db")])
                elif entry.name.endswith(SUFFIX):
                    stem = entry.name[: -len(SUFFIX)]
                    found = owner_of(stem)
                    if found is not None:
                        logs.setdefault(found[0], []).append((found[1], stem))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            logger.warning("could not list the spools in %s: %s", self.dir, exc)
            return 0
        names.sort()
        for gone in (set(self._others) | set(self._busy_until)) - set(names):
            self._forget(gone)
        moved = 0
        now = time.monotonic()
        busy_met = False
        for name in names:
            if name == self._own_name or name in self._bad:
                continue
            # ``retry_busy`` tries the spools left alone again, until one is still busy:
            # each costs up to ``OTHERS_WAIT`` (or ``GRACE`` past a deadline).
            if (busy_met or not retry_busy) and self._busy_until.get(name, -math.inf) > now:
                continue
            try:
                moved += self._adopt(queue, name)
            except _SpoolBusy:
                # Held past the wait (an operator's shell in exclusive mode, a backup): the
                # spool is fine, its messages wait there; the other spools go on.
                busy_met = True
                self._busy_until[name] = time.monotonic() + BUSY_RETRY
            except QueueBusy:
                raise  # the queue file's lock: every other spool would wait for it too
            except (QueueError, sqlite3.Error, OSError) as exc:
                self._forget(name)
                self._bad.add(name)  # warned once per process; a worker restart tries again
                logger.warning(
                    "the spool %s could not be moved into the queue (left as it is): %s",
                    self.dir / f"{name}.db",
                    exc,
                )
        return moved + self._move_journals(queue, logs)

    def _adopt(self, queue: SqliteQueue, name: str) -> int:
        """Move another process's spool; delete it once its owner is gone and it is empty."""
        spool = self._others.get(name)
        if spool is None:
            db = self.dir / f"{name}.db"
            if not db.exists():
                return 0
            try:
                spool = self._others[name] = self._opener(db, wait=OTHERS_WAIT)
            except QueueBusy:
                raise _SpoolBusy(f"the spool {db} stayed locked") from None
        moved, _ = self._move_one(queue, name, spool, mine=False)
        lock_path = self.dir / f"{name}.lock"
        fd = owner_gone(lock_path)
        if fd == -1:
            return moved
        try:
            # The owner is gone: nothing appends any more. Move what it left after our look.
            more, done = self._move_one(queue, name, spool, mine=False)
            moved += more
            if not done:
                return moved  # no room in the queue for the rest: the files stay, and wait
            self._forget(name)
            for suffix in (".db-wal", ".db-shm", ".db", ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / f"{name}{suffix}").unlink()
            queue._db.write(
                lambda conn: conn.execute("DELETE FROM counters WHERE name = ?", (RECORD + name,))
            )
        finally:
            if fd >= 0:
                os.close(fd)
        return moved

    def _forget(self, name: str) -> None:
        self._busy_until.pop(name, None)
        spool = self._others.pop(name, None)
        if spool is not None:
            spool._db.close_all()
