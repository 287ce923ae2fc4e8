"""Moves: every spool's messages into the queue, exactly once (see ``spool.py``).

A move reads a chunk of a spool's rows past its record (``RECORD`` + the spool's name, in
the queue's ``counters`` table), and inserts them into the queue in one transaction with
the record of the last row it moved; only then are the moved rows deleted from the spool.
Movers serialize on the queue's write lock and each starts after the other's record. Another
process's spool is adopted: moved whenever a poll looks (``SCAN_EVERY``), and deleted with
its record once its owner is gone (its ``flock`` can be taken) and it is empty.

``SpoolMoves`` is the moving half of ``Spools``: this module owns the record and the rules
of a move, ``spool.py`` the appends of this process to its own spool.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from durable_analytics.exceptions import QueueBusy, QueueDiskFull, QueueError

from .dead_letters import ROW_OVERHEAD, used_bytes
from .files import sync_wal
from .journal import SUFFIX, Journal, first_size, owner_of, parse, read_from
from .waits import owned

if TYPE_CHECKING:
    from .queue import SqliteQueue
    from .spool import SpoolOpener

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BUSY_RETRY",
    "MOVE_BUDGET",
    "MOVE_BYTES",
    "MOVE_ROWS",
    "OTHERS_WAIT",
    "RECORD",
    "SCAN_EVERY",
    "TOMBSTONE_KEEP",
    "SpoolMoves",
    "record_of",
]

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
#: The prefix of a spool's record in the queue's ``counters`` table (a journal file's too).
RECORD = "spool:"
#: The most bytes of a journal file read and moved into the queue per transaction: the
#: records' parsing holds the GIL, which a Client's flusher thread shares with the caller.
MOVE_BYTES = 32 * 1024
#: About how many bytes of journals a Client's flusher thread moves before a lease or a
#: poll (``SqliteQueue._move_spools_due``); ``flush()`` moves everything.
MOVE_BUDGET = 2 * MOVE_BYTES
#: How long the record of a deleted journal file stays, as a tombstone (``_drop_logs``).
TOMBSTONE_KEEP = 60.0

_SELECT = (
    "SELECT m.id, d.host, d.write_key, m.body, m.size, m.enqueued_at "
    "FROM messages m JOIN destinations d ON d.id = m.dest "
    "WHERE m.id > ? ORDER BY m.id LIMIT ?"
)
_RECORD_SET = (
    "INSERT INTO counters (name, value) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)


class _SpoolBusy(QueueBusy):
    """Another process's spool stayed locked past ``OTHERS_WAIT`` (not the queue file)."""


class JournalDamaged(QueueError):
    """A journal file holds a record that fails its check (or is not a regular file)."""


def _insert_moved(
    conn: sqlite3.Connection, rows: list[Any], known: dict[tuple[str, str], int]
) -> None:
    """Insert moved rows ``(_, host, write_key, body, size, enqueued_at)`` into the queue
    (inside the move's transaction); ``known`` gets the destinations met."""
    batch = []
    for _, host, write_key, body, size, when in rows:
        key = (str(host), str(write_key))
        dest = known.get(key)
        if dest is None:
            dest = known[key] = _dest_in(conn, *key)
        batch.append((dest, body, size, when))
    conn.executemany(
        "INSERT INTO messages (dest, body, size, enqueued_at) VALUES (?, ?, ?, ?)", batch
    )


def _dest_in(conn: sqlite3.Connection, host: str, write_key: str) -> int:
    """The queue's id of a destination, created if new (inside the caller's transaction)."""
    row = conn.execute(
        "SELECT id FROM destinations WHERE host = ? AND write_key = ?", (host, write_key)
    ).fetchone()
    if row is not None:
        return int(row[0])
    cur = conn.execute(
        "INSERT INTO destinations (host, write_key) VALUES (?, ?)", (host, write_key)
    )
    return int(cur.lastrowid or 0)


def _commit_chunk(
    queue: SqliteQueue,
    record: str,
    after: int,
    rows: list[Any],
    known: dict[tuple[str, str], int],
    gone: Callable[[], bool],
    conn: sqlite3.Connection,
) -> bool | None:
    """A move's transaction (a spool's rows or a journal's records, shaped alike): insert
    ``rows`` and set ``record`` past them, if the record still says ``after``.

    True: moved. False: read again, another mover went first (the record moved on), or the
    source is ``gone`` with its record (moved whole by another mover; what a handle opened
    before still reads was moved already). None: no room under ``max_queue_bytes``.
    ``known`` gets the destinations met."""
    known.clear()
    row = record_of(conn, record)
    if (int(row[0]) if row is not None else 0) != after:
        return False
    if row is None and gone():
        return False
    if not _room_for(conn, queue, rows):
        return None
    _insert_moved(conn, rows, known)
    conn.execute(_RECORD_SET, (record, rows[-1][0]))
    return True


def record_of(conn: sqlite3.Connection, name: str) -> tuple[int] | None:
    """The record of the spool ``name``'s moves (the id of the last row moved), if any."""
    row: tuple[int] | None = conn.execute(
        "SELECT value FROM counters WHERE name = ?", (name,)
    ).fetchone()
    return row


def _rows_after(conn: sqlite3.Connection, after: int) -> list[Any]:
    """A chunk of a spool's rows past ``after``, with their destination's names."""
    return conn.execute(_SELECT, (after, MOVE_ROWS)).fetchall()


def _room_for(conn: sqlite3.Connection, queue: SqliteQueue, rows: list[Any]) -> bool:
    """Whether a chunk fits under the queue's ``max_queue_bytes`` (inside the move's
    transaction). A chunk that does not waits in its spool, counted as pending, until
    deliveries make room: every spooling process may hold spooled messages, so the margin
    the appends keep does not bound what all of them move in at once."""
    used = used_bytes(conn, queue._appender._page_size())
    return used + sum(int(r[4]) + ROW_OVERHEAD for r in rows) <= queue._appender.max_queue_bytes


def _delete_moved(conn: sqlite3.Connection, last: int) -> None:
    # Keep the newest moved row: new ids must stay above the record.
    conn.execute("DELETE FROM messages WHERE id < ?", (last,))


def _owner_gone(lock_path: Path) -> int:
    """A descriptor holding the spool's owner lock (its owner is gone), or -1 (alive)."""
    if fcntl is None:  # pragma: no cover - not POSIX
        return -1
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return -2  # no lock file: its owner never took it, or a mover removed it
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return -1
    return fd


class SpoolMoves:
    """The moves of ``Spools``: this process's spool, and every other in the directory."""

    # Set by ``Spools.__init__``.
    dir: Path
    _opener: SpoolOpener
    _own: SqliteQueue | None
    _own_name: str
    _own_bad: bool
    _bad: set[str]
    _others: dict[str, SqliteQueue]
    _busy_until: dict[str, float]
    _scanned: float
    _moving: threading.RLock
    moved_upto: int
    journal: Journal | None
    path: Path
    #: What is left of the current move's ``budget`` (bytes of journals), None: no bound.
    _budget: int | None = None

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
    ) -> int:
        """Move spooled messages into ``queue``: this process's, and with ``others`` those of
        every spool in the directory (looked for at most every ``SCAN_EVERY``, or now with
        ``scan_now``). Returns how many were moved.

        ``budget``: read at most about that many bytes of journals (a chunk more at most),
        the rest left for the next move: a Client's flusher thread moves a little before
        each lease, not a whole burst at once while it shares the caller's GIL.
        """
        if owned(self._moving):
            return 0  # a signal handler's flush inside this thread's move: the move goes on
        with self._moving:
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
            done = queue._db.write(partial(_commit_chunk, queue, record, after, rows, known, gone))
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

    def _move_own_journal(self, queue: SqliteQueue, journal: Journal) -> int:
        """Move this process's journal files; delete the sealed ones once all is moved."""
        moved = 0
        done: list[str] = []  # sealed and moved in whole: deleted together, after one sync
        for stem in list(journal.files):
            try:
                more, room, end = self._move_log(queue, stem, journal=journal)
            except QueueDiskFull:
                break  # the queue file's disk: the records wait in the journal, whole
            except (JournalDamaged, OSError) as exc:
                # Damaged: journaling stops here; the file stays on disk as it is.
                self._bad.add(stem + SUFFIX)
                journal.forget(stem)
                if not journal.off:
                    journal.off = True
                    logger.warning(
                        "calls to %s go to the queue file from now on in this process: its "
                        "journal %s could not be moved (%s)",
                        self.path,
                        self.dir / f"{stem}{SUFFIX}",
                        exc,
                    )
                continue
            moved += more
            if end is None:
                journal.forget(stem)  # another mover deleted it: all of it was moved
            elif room and stem != journal.stem and end >= journal.files.get(stem, 0):
                # Sealed: read now, not before the loop, since a call may have started a
                # newer file meanwhile (and the file it writes must never be deleted). A file
                # once sealed is never written again (calls write under the journal's lock,
                # which the switch to a newer file holds), and its size is final.
                done.append(stem)
        if done:
            self._drop_logs(queue, done)
            for stem in done:
                journal.forget(stem)
        return moved

    def _move_log(
        self, queue: SqliteQueue, stem: str, *, journal: Journal | None = None
    ) -> tuple[int, bool, int | None]:
        """Move one journal file's complete records past its record into the queue, a chunk
        per transaction (``journal`` when the file is this process's own).

        Returns how many moved, False when it stopped with records left because the queue
        had no room for them (``_room_for``) or the move's budget was spent, and the offset
        up to which the file is moved
        (None: the file is gone, all of it moved by another mover). Raises
        ``JournalDamaged`` at a record that fails its check, after moving those before it.
        """
        record = RECORD + stem
        path = self.dir / f"{stem}{SUFFIX}"
        moved = 0
        known: dict[tuple[str, str], int] = {}

        def gone() -> bool:
            return not path.exists()  # deleted by a mover that moved all of it

        while True:
            found = queue._db.read(partial(record_of, name=record))
            after = int(found[0]) if found is not None else 0
            if after < 0:
                return moved, True, None  # a tombstone: moved in whole and deleted
            if self._budget is not None and self._budget <= 0:
                return moved, False, after  # the move's budget is spent: the rest next time
            data = read_from(path, after, MOVE_BYTES)
            if data is None:
                return moved, True, None
            entries, end, damaged = parse(data, after)
            if not entries and not damaged and first_size(data) > MOVE_BYTES:
                # One record longer than a chunk (a message near 32 KiB with its names).
                data = read_from(path, after, first_size(data))
                if data is None:
                    return moved, True, None
                entries, end, damaged = parse(data, after)
            if entries:
                done = queue._db.write(
                    partial(_commit_chunk, queue, record, after, entries, known, gone)
                )
                if not done:
                    if done is None:
                        return moved, False, after
                    if not path.exists():
                        return moved, True, None
                    continue
                queue._note_destinations(known)
                moved += len(entries)
                if self._budget is not None:
                    self._budget -= end - after
            if journal is not None:
                journal.moved[stem] = max(journal.moved.get(stem, 0), end)
            if damaged:
                raise JournalDamaged(f"the journal {path} is damaged at offset {end}")
            if not entries or len(data) < MOVE_BYTES or end == after:
                return moved, True, end

    def _drop_logs(self, queue: SqliteQueue, stems: list[str]) -> None:
        """Delete journal files moved in whole, then mark their records deleted (in that
        order: a mover that read a record before finds no file, and takes nothing again).

        A record becomes a tombstone, the deletion's time negated, kept ``TOMBSTONE_KEEP``
        seconds: a look that opened the file before it was deleted (``spool_counts``) reads
        the record in its snapshot of the queue file, and a record simply gone would there
        mean "nothing moved yet" and count the moved messages again."""
        if queue.durability != "full":
            # What was moved must be durable in the queue before the file that held it goes.
            sync_wal(queue.path)
        for stem in stems:
            with contextlib.suppress(FileNotFoundError):
                (self.dir / f"{stem}{SUFFIX}").unlink()
        now = time.time()
        tombstone = -max(1, int(now))

        def mark(conn: sqlite3.Connection) -> None:
            conn.executemany(_RECORD_SET, [(RECORD + stem, tombstone) for stem in stems])
            conn.execute(
                "DELETE FROM counters WHERE name LIKE 'spool:%' AND value < 0 AND value > ?",
                (-(now - TOMBSTONE_KEEP),),
            )

        queue._db.write(mark)

    def _move_journals(self, queue: SqliteQueue, logs: dict[str, list[tuple[int, str]]]) -> int:
        """Move other processes' journal files (``logs``: by owner, their generations and
        stems). A file is sealed once a newer generation exists or its owner is gone: moved
        in whole, it is deleted; a gone owner's cut-off last record is dropped with it."""
        moved = 0
        for owner, files in sorted(logs.items()):
            if owner == self._own_name:
                continue
            lock_path = self.dir / f"{owner}.lock"
            fd = _owner_gone(lock_path)
            try:
                newest = max(gen for gen, _ in files)
                for gen, stem in sorted(files):
                    if stem + SUFFIX in self._bad:
                        continue
                    try:
                        more, room, end = self._move_log(queue, stem)
                    except QueueDiskFull:
                        return moved  # the queue file's disk: the records wait, whole
                    except (JournalDamaged, OSError) as exc:
                        self._bad.add(stem + SUFFIX)
                        logger.warning(
                            "the journal %s could not be moved into the queue (left as it is): %s",
                            self.dir / f"{stem}{SUFFIX}",
                            exc,
                        )
                        continue
                    moved += more
                    if end is None or not room or (fd == -1 and gen == newest):
                        continue
                    path = self.dir / f"{stem}{SUFFIX}"
                    try:
                        size = path.stat().st_size
                    except FileNotFoundError:
                        continue
                    if end < size:
                        if fd == -1:
                            continue  # sealed while we read: the rest is moved next time
                        logger.warning(
                            "dropped the last %d bytes of %s: a record its process was "
                            "killed while writing (that call never returned)",
                            size - end,
                            path,
                        )
                    self._drop_logs(queue, [stem])
                if fd != -1 and not self._owns_files(owner):
                    with contextlib.suppress(FileNotFoundError):
                        lock_path.unlink()
            finally:
                if fd >= 0:
                    os.close(fd)
        return moved

    def _owns_files(self, owner: str) -> bool:
        """Whether a spool or journal file of ``owner`` is still in the directory."""
        with os.scandir(self.dir) as entries:
            return any(
                e.name.startswith(owner + ".") and not e.name.endswith(".lock") for e in entries
            )

    def _move_others(self, queue: SqliteQueue, *, retry_busy: bool = False) -> int:
        self._scanned = time.monotonic()
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
        fd = _owner_gone(lock_path)
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
