"""Appending to the SQLite queue: the one-statement fast path, and the cap when near it.

Most appends are one INSERT in autocommit on this thread's connection. Near the cap (or
every ``refresh_every`` bytes appended, to re-read the real size) an append runs in a write
transaction that measures the file and applies ``max_queue_bytes`` with the overflow policy;
on a nearly full disk it keeps a reserve so deliveries can still be recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Literal, overload

from durable_analytics._store.drops import DropWarnings
from durable_analytics.exceptions import QueueCorrupt, QueueDiskFull

from .connections import Connections, owned
from .dead_letters import ROW_OVERHEAD, DeadLetters, used_bytes
from .errors import SQLITE_BUSY, SQLITE_FULL, SQLITE_LOCKED, errorcode, translate
from .files import checkpoint_for_space
from .leases import leased_ids
from .schema import INSERT
from .wal import WalBudget, open_readers, wal_bytes

__all__ = ["Appender"]

logger = logging.getLogger("durable_analytics.queue")

# How many bytes a process may append on its estimate before re-reading the real size (at
# least _REFRESH_BYTES, at most _REFRESH_MOST, else 1/_REFRESH_SHARE of the room left under
# the cap: other processes' appends meanwhile are seen at the next read, so up to
# _REFRESH_SHARE processes together never overshoot the room they measured), and how close
# to the cap it switches to reading the real size before every append. Each read is a call
# of ~0.1 ms: every 256 KiB it was one call in ~400, enough to set a producer's p99.9.
_REFRESH_BYTES = 256 * 1024
_REFRESH_MOST = 4 * 1024 * 1024
_REFRESH_SHARE = 64
_EXACT_ZONE = 2 * 1024 * 1024
# The room under the cap past the files' sizes at which the periodic measure takes those
# sizes for the real one (``Appender.measured_from_sizes``): what the exact read would
# decide there is the same (the longest refresh, ``_REFRESH_MOST``).
_SIZES_ROOM = _REFRESH_MOST * _REFRESH_SHARE
# Below this much free disk space the -wal is kept small and appends stop _DISK_RESERVE short
# of full (Appender._low_disk).
_LOW_DISK_BYTES = 8 * 1024 * 1024
_LOW_DISK_CHECKPOINT = 32
_DISK_RESERVE = 512 * 1024
# How often the warning naming the reader that pins the -wal is repeated (seconds).
_PINNED_WARN_EVERY = 60.0
# The count cap (max_queue_size) the same way: the real count is read every _REFRESH_COUNT
# appends, and before every append once the estimate is within _COUNT_ZONE of the cap.
_REFRESH_COUNT = 256
_COUNT_ZONE = 64


class Appender:
    """Stores messages under the cap; keeps this process's estimate of the file's size."""

    def __init__(
        self,
        db: Connections,
        dead: DeadLetters,
        *,
        max_queue_bytes: int,
        overflow: Literal["drop_newest", "drop_oldest"],
        page_size: Callable[[], int],
        wal: WalBudget,
        max_queue_size: int | None = None,
        capped: bool = True,
    ) -> None:
        self.db = db
        #: False for a spool (``spool.py``): its appends never measure the file; the queue's
        #: own appender counts what is spooled (``count_stored``).
        self.capped = capped
        self.wal = wal
        self.max_queue_size = max_queue_size
        self.est_count = 0
        self.since_count = _REFRESH_COUNT  # count on the first append
        self.dead = dead
        self.max_queue_bytes = max_queue_bytes
        self.overflow = overflow
        self._page_size = page_size
        self.est_used = 0
        #: Bytes appended on the estimate between two reads of the real size (see above).
        self.refresh_every = _REFRESH_BYTES
        self.since_refresh = _REFRESH_BYTES  # read the real size on the first append
        # Whether the file was measured exactly since it was opened (or replaced): the first
        # measure of a process is never the files' sizes (``measured_from_sizes``).
        self.exact_once = False
        self._low_appends = 0  # appends made while the disk was nearly full
        self._disk_free = 0  # bytes free on the disk at the last look (``_low_disk``)
        # Refused while the -wal was pinned, not yet added to the shared counter (writing it
        # then would only grow the -wal further).
        self.unsaved_drops = 0
        self._pinned_excess = 0
        self._backfilled = -1  # frames the last checkpoint had copied back, or -1
        self._pinned_warned = -_PINNED_WARN_EVERY
        self.drops = DropWarnings(str(db.path), max_queue_bytes)
        self._dropped_now = 0  # oldest messages the last append deleted (logged after COMMIT)
        self._dropped_by_count = False  # ... to stay under max_queue_size (not the bytes cap)

    def forget_estimates(self) -> None:
        """The file was replaced: measure it again on the next append."""
        self.refresh_every = self.since_refresh = _REFRESH_BYTES
        self.est_used = 0
        self.exact_once = False
        self.since_count = _REFRESH_COUNT

    def append(self, dest_id: int, body: bytes, enqueued_at: float | None = None) -> int:
        """Store one serialized message; return its row id after COMMIT.

        Returns 0 when the ``max_queue_bytes`` cap dropped it (``overflow="drop_newest"``);
        with ``"drop_oldest"`` the oldest unleased messages make room instead. Both are counted.
        Raises ``QueueDiskFull`` when the disk is full (nothing committed before is affected).
        """
        size = len(body)
        when = time.time() if enqueued_at is None else enqueued_at
        cap = self.max_queue_size
        if (
            self.since_refresh >= self.refresh_every
            or self.est_used + size + _EXACT_ZONE > self.max_queue_bytes
            or (
                cap is not None
                and (self.since_count >= _REFRESH_COUNT or self.est_count + _COUNT_ZONE >= cap)
            )
        ):
            return self._append_capped(dest_id, body, when)
        row = (dest_id, body, size, when)
        write_lock = self.db.write_lock
        # Only a signal handler finds this thread already holding a lock of the queue.
        nested = owned(write_lock) or owned(self.db.read_lock)
        try:
            if not nested and write_lock.acquire(blocking=False):
                # The usual case, the lock free: what ``writing`` does first for an append,
                # without the cost of its context manager.
                try:
                    row_id = self._insert(row, nested)
                finally:
                    write_lock.release()
            else:
                # Appends take the write lock before delivering transactions (waits.py).
                with self.db.writing(producer=True):
                    row_id = self._insert(row, nested)
        except QueueCorrupt as exc:
            if not self.db.on_corrupt(exc):
                raise
            return self._append_capped(dest_id, body, when)  # stored in the fresh file
        grown = size + ROW_OVERHEAD
        self.est_used += grown
        self.since_refresh += grown
        self.est_count += 1
        self.since_count += 1
        return row_id or 0

    def try_append(
        self, dest_id: int, body: bytes, enqueued_at: float, *, local_wait: float = 0.0
    ) -> int | None:
        """Store one message only if that needs no wait; None if it would have to wait.

        None (nothing stored) while another thread of this process or another process holds
        the write lock, and whenever the append would have to measure the file for the cap:
        the caller then stores it elsewhere (``spool.py``) or waits in ``append``.
        ``local_wait``: how long to wait for another thread of this process (a spool's
        other users hold its lock for one short statement each).
        """
        size = len(body)
        write_lock = self.db.write_lock
        if (
            (self.capped and not self.fast(size) and not self._remeasured(size))
            or owned(write_lock)
            or owned(self.db.read_lock)
            or not (
                write_lock.acquire(timeout=local_wait)
                if local_wait > 0
                else write_lock.acquire(blocking=False)
            )
        ):
            return None
        try:
            row_id = self._insert((dest_id, body, size, enqueued_at), False, wait=False)
        except QueueCorrupt:
            return None  # ``append`` meets it again and recovers
        finally:
            write_lock.release()
        if row_id is None:
            return None
        self.count_stored(size)
        return row_id

    def _remeasured(self, size: int) -> bool:
        """Re-read the file's real size without the write lock; whether the fast path may go on.

        The periodic re-measure (every ``refresh_every`` bytes) far from the cap: a read and a
        look at the disk and the ``-wal``, so that it never waits for another connection's
        write lock. Near the caps, with a count cap, a low disk, a pinned ``-wal`` or drops
        to record, False: ``append`` measures inside its write transaction, as before.
        """
        if (
            self.max_queue_size is not None
            or self.unsaved_drops
            or self.est_used + size + _EXACT_ZONE > self.max_queue_bytes
            or owned(self.db.write_lock)
            or owned(self.db.read_lock)
            or self._low_disk() is not None
            or self._wal_excess()
        ):
            return False
        used = self.db.read(lambda conn: used_bytes(conn, self._page_size()))
        self.measured(used)
        if used + size + _EXACT_ZONE > self.max_queue_bytes:
            return False
        self.since_refresh = 0
        return True

    def measured_from_sizes(self, size: int, reserve: int = 0) -> bool:
        """The periodic measure from the files' sizes alone, when they leave room to spare:
        whether the fast path may go on (False: measure as usual, ``try_append``).

        The queue file's size plus its ``-wal``'s is never less than the bytes of its pages
        in use (a page past the end of the file is in the log), so taking that sum for the
        real size only errs on the safe side. It is taken only far from the cap (at least
        ``_SIZES_ROOM`` and ``reserve`` to spare, the room the caller's decisions need:
        ``Spools.hold_share``), where an exact read would lead to the same decisions; it
        needs no SQLite read and no lock: two ``stat()`` and a look at the disk instead of
        a read transaction (~0.1-0.2 ms, one call in ~7,000 with 600-byte messages).

        Never the first measure after the file was opened: that call pays for opening its
        connection anyway, and a process that makes one call and exits (``durable-analytics
        enqueue``, a cron script) stores it in the file instead of leaving a journal for the
        next process to move in.
        """
        if (
            not self.exact_once
            or self.max_queue_size is not None
            or self.unsaved_drops
            or self.since_refresh < self.refresh_every
            or self.est_used + size + _EXACT_ZONE > self.max_queue_bytes
        ):
            return False
        try:
            free = shutil.disk_usage(self.db.path.parent).free
            # The log first: a checkpoint between the two looks moves pages from it into
            # the file, so the sum can only come out larger than the truth, never smaller.
            log = wal_bytes(self.db.path)
            upper = os.stat(self.db.path).st_size + log
        except OSError:
            return False
        self._disk_free = free
        if free < _LOW_DISK_BYTES + _SIZES_ROOM or self.wal.excess(log):
            return False  # the exact measure and its rules (``_remeasured``)
        if self.max_queue_bytes - upper - size < max(_SIZES_ROOM, reserve + _REFRESH_MOST):
            return False
        self._estimated(upper)
        self.since_refresh = 0
        return True

    def measured(self, used: int) -> None:
        """The file's real size was read: the estimate, and when to read it again."""
        self.exact_once = True
        self._estimated(used)

    def _estimated(self, used: int) -> None:
        self.est_used = used
        # The disk's free space bounds it too: the low-disk rules start on time.
        room = min(self.max_queue_bytes - used, self._disk_free - _LOW_DISK_BYTES) // _REFRESH_SHARE
        self.refresh_every = max(_REFRESH_BYTES, min(_REFRESH_MOST, room))

    def fast(self, size: int, *, stale_ok: bool = False) -> bool:
        """Whether an append of ``size`` bytes may skip measuring the file for the caps.

        ``stale_ok``: even when the estimates are due to be measured again (not near a
        cap): a signal handler's call inside a call of its own thread that waits to measure
        them (``Spools.append``)."""
        cap = self.max_queue_size
        return not (
            (self.since_refresh >= self.refresh_every and not stale_ok)
            or self.est_used + size + _EXACT_ZONE > self.max_queue_bytes
            or (
                cap is not None
                and (
                    (self.since_count >= _REFRESH_COUNT and not stale_ok)
                    or self.est_count + _COUNT_ZONE >= cap
                )
            )
        )

    def count_stored(self, size: int) -> None:
        """Count a message of ``size`` bytes stored (here, or in this process's spool) in
        the estimates of the file's size and count."""
        grown = size + ROW_OVERHEAD
        self.est_used += grown
        self.since_refresh += grown
        self.est_count += 1
        self.since_count += 1

    @overload
    def _insert(self, row: tuple[int, bytes, int, float], nested: bool) -> int: ...

    @overload
    def _insert(
        self, row: tuple[int, bytes, int, float], nested: bool, *, wait: bool
    ) -> int | None: ...

    def _insert(
        self, row: tuple[int, bytes, int, float], nested: bool, *, wait: bool = True
    ) -> int | None:
        """The INSERT of ``append``, under the write lock, in autocommit under the fence.

        ``wait=False``: None instead of waiting for another connection's lock.
        """
        if nested:
            self.db.refuse_interrupted()
        else:
            # (Never under a call a signal interrupted: it moves the connections.)
            self.db.check_side_files()
        try:
            conn = self.db.local.conn
        except AttributeError:
            conn = self.db.conn()
        if conn.in_transaction or owned(self.db.read_lock):
            return self.append_interrupted(conn, row)
        if not conn.producer:
            self.db.as_producer(conn, True)
        fence = self.db.fence
        if wait:
            fence.enter()
        elif not fence.try_enter():
            return None  # a recovery holds the directory
        try:
            # (What ``fenced`` does, without a closure per call.)
            return conn.execute(INSERT, row).lastrowid or 0
        except sqlite3.Error as exc:
            # Decided here, where ``exc`` is dropped on the way out: held in a local, it and
            # its traceback (which holds this frame) made a cycle for the garbage collector
            # on every call that found the file busy, and the collections those cycles set
            # off were the slowest of a producer's calls beside a worker.
            if not wait and errorcode(exc) in (SQLITE_BUSY, SQLITE_LOCKED):
                return None
            failed = exc
        finally:
            fence.leave()
        try:
            return self._insert_failed(conn, failed, row, nested)
        finally:
            del failed

    def _insert_failed(
        self,
        conn: sqlite3.Connection,
        exc: sqlite3.Error,
        row: tuple[int, bytes, int, float],
        nested: bool,
    ) -> int:
        # Called with the write lock held. Nothing was written by the failed statement.
        code = errorcode(exc)
        if code not in (SQLITE_BUSY, SQLITE_LOCKED):
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if code == SQLITE_FULL and checkpoint_for_space(conn):
                try:
                    return self.db.fenced(lambda: conn.execute(INSERT, row)).lastrowid or 0
                except sqlite3.Error as again:
                    exc = again
            raise translate(exc, self.db.path) from None
        if nested:
            insert = lambda: conn.execute(INSERT, row)  # noqa: E731
            return self.db.retry(lambda: self.db.fenced(insert), producer=True).lastrowid or 0

        def attempt() -> sqlite3.Cursor:
            # Waits for another process's lock without this process's write lock (so that a
            # fork meanwhile can close every connection): fetch the connection each time.
            self.db.check_side_files()
            again = self.db.conn()
            self.db.as_producer(again, True)
            return self.db.fenced(lambda: again.execute(INSERT, row))

        return self.db.retry(attempt, let_go=True, producer=True).lastrowid or 0

    def append_interrupted(
        self, conn: sqlite3.Connection, row: tuple[int, bytes, int, float]
    ) -> int:
        """Store a message from a signal handler that interrupted this thread's transaction.

        Called with the write lock held while this thread's connection is in a transaction
        or this thread holds the read lock, which only a signal handler running on the thread
        can see. Inside a write transaction the row joins it (its commit holds the commit
        fence), and is stored again on its own if that transaction rolls back
        (``Connections.transaction``). Inside a read (whose snapshot may be too old to write
        from) it goes through a connection of its own, under the fence like any commit (the
        fence is reentrant: the interrupted code may hold it).
        """
        self.db.refuse_interrupted()
        joined = self.db.joined.get(threading.get_ident())
        if conn.in_transaction and joined is not None:
            row_id = conn.execute(INSERT, row).lastrowid or 0
            joined.append(row)
            return row_id
        extra = self.db.open_extra()
        try:
            insert = lambda: extra.execute(INSERT, row)  # noqa: E731
            return self.db.retry(lambda: self.db.fenced(insert)).lastrowid or 0
        finally:
            extra.close()

    def _append_capped(self, dest_id: int, body: bytes, when: float) -> int:
        size = len(body)
        if owned(self.db.write_lock) or owned(self.db.read_lock):
            # A signal handler on this thread: its transaction or read in flight decides.
            with self.db.locked(self.db.write_lock):
                self.db.refuse_interrupted()
                conn = getattr(self.db.local, "conn", None)
                if conn is not None and (conn.in_transaction or owned(self.db.read_lock)):
                    return self.append_interrupted(conn, (dest_id, body, size, when))

        low = self._low_disk()
        excess = self._wal_excess()
        if excess:
            # The -wal is pinned past its budget: it counts against the cap, and a refusal
            # is counted without a write (a write would only grow the -wal further).
            used = self.db.read(lambda conn: used_bytes(conn, self._page_size()))
            if used + excess + size > self.max_queue_bytes:
                self.unsaved_drops += 1
                self.est_used = used + excess
                self.since_refresh = self.refresh_every
                return 0

        def run(conn: sqlite3.Connection) -> int:
            # What this transaction drops, logged once it commits (a retry starts over).
            self._dropped_now = 0
            self._dropped_by_count = False
            if self.unsaved_drops:
                conn.execute(
                    "UPDATE counters SET value = value + ? WHERE name = 'dropped_newest'",
                    (self.unsaved_drops,),
                )
                self.unsaved_drops = 0
            if self.max_queue_size is not None and not self._room_for_one(conn):
                conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'dropped_newest'")
                return 0
            pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
            free_pages = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            used = (pages - free_pages) * self._page_size() + excess
            if low is not None and low + free_pages * self._page_size() < _DISK_RESERVE + size:
                raise QueueDiskFull(
                    f"the disk holding the queue {self.db.path} is full (less than "
                    f"{_DISK_RESERVE // 1024} KB left, kept so that deliveries can still be "
                    "recorded); the message was not stored"
                )
            over = used + size - self.max_queue_bytes
            if over > 0 and self.dead.trim(conn, throttle=True):
                used = used_bytes(conn, self._page_size())
                over = used + size - self.max_queue_bytes
            # drop_oldest makes room from the oldest unleased messages; when even that is not
            # enough (the rest is leased, or dead letters), the new message is refused too:
            # the file never grows past the cap.
            if over > 0 and (
                self.overflow == "drop_newest" or self._drop_oldest(conn, over) < over
            ):
                conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'dropped_newest'")
                self.est_used = used
                return 0
            row_id = conn.execute(INSERT, (dest_id, body, size, when)).lastrowid
            self.measured(used + size + ROW_OVERHEAD)
            self.est_count += 1
            return row_id or 0

        try:
            stored = self.db.write(run, producer=True)
            self.drops.dropped_oldest(
                self._dropped_now,
                max_queue_size=self.max_queue_size if self._dropped_by_count else None,
            )
        finally:
            # On a nearly full disk every append comes this way (see Appender._low_disk); else the
            # next ``refresh_every`` bytes go the fast way.
            self.since_refresh = self.refresh_every if low is not None else 0
        return stored

    def _wal_excess(self) -> int:
        """Bytes of ``-wal`` past its budget that no checkpoint could give back (0: healthy).

        Only a reader holding an old snapshot keeps a checkpoint from resetting the log (an
        ``sqlite3`` shell left open, a backup, a stopped process): it is named in a warning.
        """
        size = wal_bytes(self.db.path)
        if not self.wal.excess(size):
            self._pinned_excess = 0
            return 0
        now = time.monotonic()
        with self.db.locked(self.db.write_lock):
            conn = self.db.conn()
            if conn.in_transaction:
                return 0
            try:
                _, log, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error:
                return 0
            if done >= log:
                checkpoint_for_space(conn, "TRUNCATE")  # all copied: give the space back
        # Pinned: frames are left that no checkpoint could copy back, and the copying has
        # not moved since the last look (other writers only delay a checkpoint, a reader's
        # old snapshot stops it at the same frame).
        stuck = 0 <= done < log and done == self._backfilled
        self._backfilled = int(done) if done < log else -1
        size = wal_bytes(self.db.path)
        self._pinned_excess = self.wal.excess(size) if stuck else 0
        if self._pinned_excess and now - self._pinned_warned >= _PINNED_WARN_EVERY:
            self._pinned_warned = now
            readers = open_readers(self.db.path)
            logger.warning(
                "the queue's write-ahead log %s-wal is %d bytes and cannot be checkpointed: "
                "a reader holds an old snapshot of the queue open (%s); the log counts "
                "against max_queue_bytes (%d) until that reader ends its transaction, and "
                "new messages past the cap are dropped",
                self.db.path,
                size,
                "processes with the file open: " + ", ".join(readers)
                if readers
                else "an sqlite3 shell, a backup or a stopped process",
                self.max_queue_bytes,
            )
        return self._pinned_excess

    def _room_for_one(self, conn: sqlite3.Connection) -> bool:
        """Under ``max_queue_size`` after the overflow policy (in the write transaction).

        Counting is a scan of the messages table: it runs only near the cap or every
        _REFRESH_COUNT appends, so the usual append stays one INSERT.
        """
        cap = self.max_queue_size
        count = int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        self.since_count = 0
        self.est_count = count
        if cap is None or count < cap:
            return True
        if self.overflow == "drop_oldest":
            extra = count + 1 - cap
            dropped = self._drop_oldest_rows(conn, extra)
            self.est_count = count - dropped
            return dropped >= extra
        return False

    def _drop_oldest_rows(self, conn: sqlite3.Connection, count: int) -> int:
        """Delete the ``count`` oldest unleased messages; returns how many went."""
        leased = leased_ids(conn)
        rows = conn.execute(
            "SELECT id FROM messages ORDER BY id LIMIT ?", (count + len(leased),)
        ).fetchall()
        take = [int(r[0]) for r in rows if int(r[0]) not in leased][:count]
        if take:
            conn.execute(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(take))})", take)
            conn.execute(
                "UPDATE counters SET value = value + ? WHERE name = 'dropped_oldest'", (len(take),)
            )
        self._dropped_now += len(take)
        self._dropped_by_count = True
        return len(take)

    def _low_disk(self) -> int | None:
        """None when the disk has room; else the bytes still free on it.

        SQLite lets the -wal grow to about 4 MB before it checkpoints; on a nearly full disk
        that space is better spent on messages. Below _LOW_DISK_BYTES free, every append
        comes through the capped path (a statvfs and a transaction instead of the bare
        INSERT), the -wal is checkpointed every _LOW_DISK_CHECKPOINT appends (RESTART: its
        file keeps the space it has, for the next frames), and appends stop _DISK_RESERVE
        short of full, so that acks, releases and dead letters can still be written.
        """
        try:
            free = shutil.disk_usage(self.db.path.parent).free
        except OSError:
            return None
        self._disk_free = free
        if free >= _LOW_DISK_BYTES:
            return None
        self._low_appends += 1
        if self._low_appends % _LOW_DISK_CHECKPOINT == 0:
            with self.db.locked(self.db.write_lock):
                checkpoint_for_space(self.db.conn(), "RESTART")
        return free

    def _drop_oldest(self, conn: sqlite3.Connection, need: int) -> int:
        """Delete the oldest unleased messages worth ``need`` bytes; returns the bytes freed."""
        need = max(need, 1)
        freed = 0
        dropped = 0
        leased = leased_ids(conn)
        while freed < need:
            rows = conn.execute(
                "SELECT id, size FROM messages ORDER BY id LIMIT ?", (64 + len(leased),)
            ).fetchall()
            take = []
            for row_id, row_size in rows:
                if row_id in leased:
                    continue  # a message under a lease is never dropped
                take.append(int(row_id))
                freed += int(row_size) + ROW_OVERHEAD
                if freed >= need:
                    break
            if not take:
                break
            conn.execute(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(take))})", take)
            dropped += len(take)
        if dropped:
            conn.execute(
                "UPDATE counters SET value = value + ? WHERE name = 'dropped_oldest'", (dropped,)
            )
        self._dropped_now += dropped
        return freed
