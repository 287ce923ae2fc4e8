"""The SQLite queue: one file shared by any number of threads and processes.

Every write is one explicit transaction; ``append`` returns only after its COMMIT. A
flusher ``lease``\\ s the oldest ready messages of one destination (host + write key), and
then ``ack``\\ s (deletes) them after a 2xx, ``release``\\ s them with a ``not_before`` for a
retry, or ``dead_letter``\\ s the ones the server rejected. Every one of those is fenced by
the lease token, so a holder whose lease expired and was taken over cannot touch the batch.

A lease names its holder (boot id, pid namespace, pid and process start time). A lease is
over when its holder is provably gone (same boot and pid namespace, and that process no
longer exists) or when ``lease_timeout`` has passed on the system's monotonic clock, so a
wall-clock jump neither steals a live lease nor keeps a dead one forever.

The class composes one object per concern: ``Connections`` (per-thread connections,
transactions, fork), ``Recovery`` (damaged files), ``Appender`` (append and the cap) and
``DeadLetters``; the lease protocol is in ``leases.py``; what ``status``, ``flush()`` and
the tools read (counts, stats, dead letters) is ``reads.py``'s ``QueueReads``, a base.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Literal

from durable_analytics._store.base import (
    Lease,
)
from durable_analytics._store.window import PROCESS_WINDOW, InFlightWindow
from durable_analytics.exceptions import QueueBusy, QueueCorrupt

from . import bydest, leases, ready
from .append import Appender
from .checkpoint import run_checkpoint
from .connections import Connections
from .dead_letters import DeadLetters
from .files import narrow_modes, prepare_path
from .journal_moves import MOVE_BUDGET
from .reads import QueueReads
from .recovery import Recovery, RecoveryReport
from .schema import CLEAR_BACKOFF, destination_in
from .slots import DeliverySlots
from .spool import Spools, open_spool
from .waits import Waits
from .wal import Checkpoints, WalBudget

__all__ = ["SqliteQueue"]


class SqliteQueue(QueueReads):
    """A durable message queue in one SQLite file, shared by threads and processes.

    ``durability="normal"`` (WAL, synchronous=NORMAL) survives the crash or kill of any
    process; ``"full"`` (synchronous=FULL) also survives power loss, at one fsync per append.

    ``recover=True`` (what the Client uses): a damaged queue file (truncated, bytes flipped,
    not an SQLite file, a -wal of another database) is copied aside as
    ``<name>.corrupt-<UTC time>`` (0600, with its -wal and -shm), the readable messages are
    salvaged into a fresh queue at the same path, a warning is logged and the call goes on
    (``last_recovery`` says what happened). Detected at open, and when an operation meets
    SQLite's "malformed" / "not a database" errors. ``recover=False`` (the default, and the
    CLI's): ``QueueCorrupt`` is raised and nothing is written. A file of a newer schema
    version is never treated as damaged (``QueueVersionError``), nor is an intact SQLite
    database of another application (``QueueCorrupt``, untouched either way).

    ``max_queue_size`` (None: no cap) caps the number of queued messages in the file, with
    the same overflow policy; it is exact within a process (and across processes once each
    has appended within ``max_queue_size - 64`` of the cap, when every append counts).

    ``max_queue_bytes`` caps the whole file (pages in use) and its ``-wal`` beyond the log's
    normal size (``wal.py``): a reader that pins the log past the cap (an ``sqlite3`` shell,
    a backup, a stopped process) is named in a warning, and new messages past the cap are
    dropped (under either overflow policy: dropping old ones would only grow the log). Dead
    letters may take at most
    ``max_dead_letter_bytes`` of it (default a tenth): past that, while the file is near the
    cap, the oldest dead letters are purged (counted, and logged).

    ``deadlines_of`` (a spool's queue) makes a deadline set with that queue's ``bounded``
    bound every wait on this file too, from its open on.
    """

    #: Each process keeps its own in-flight window (``_pipeline.Window``).
    window: InFlightWindow = PROCESS_WINDOW

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Literal["normal", "full"] = "normal",
        max_queue_bytes: int = 1 << 30,
        overflow: Literal["drop_newest", "drop_oldest"] = "drop_newest",
        lease_timeout: float = 60.0,
        busy_timeout: float = 30.0,
        recover: bool = False,
        max_dead_letter_bytes: int | None = None,
        max_queue_size: int | None = None,
        spool: bool = False,
        journal: bool = False,
        deadlines_of: SqliteQueue | None = None,
    ) -> None:
        self.path = Path(os.fspath(path)).expanduser().absolute()
        self.max_queue_size = max_queue_size
        self.durability = durability
        self.max_queue_bytes = max_queue_bytes
        self.overflow = overflow
        self.lease_timeout = lease_timeout
        self.busy_timeout = busy_timeout
        self.recover = recover
        self.max_dead_letter_bytes = (
            max_queue_bytes // 10 if max_dead_letter_bytes is None else max_dead_letter_bytes
        )
        self._dest_cache: dict[tuple[str, str], int] = {}
        self._dest_names: dict[int, tuple[str, str]] = {}
        self._last_dest = 0  # the destination leased last: the next lease tries others first
        prepare_path(self.path)
        self.wal_budget = WalBudget.for_cap(max_queue_bytes)
        self._checkpoints = Checkpoints(self.path, self.wal_budget, self._run_checkpoint)
        self._db = Connections(
            self.path,
            durability=durability,
            busy_timeout=busy_timeout,
            on_corrupt=self._recover_from,
            wal=self.wal_budget,
            deadlines_of=None if deadlines_of is None else deadlines_of.waits,
        )
        self._recovery = Recovery(
            self._db,
            enabled=recover,
            known_destinations=self._dest_cache,
            on_recovered=self._forget_estimates,
        )
        self._dead = DeadLetters(
            self._db,
            max_bytes=self.max_dead_letter_bytes,
            max_queue_bytes=max_queue_bytes,
            page_size=self._page_size,
        )
        self._appender = Appender(
            self._db,
            self._dead,
            max_queue_bytes=max_queue_bytes,
            overflow=overflow,
            page_size=self._page_size,
            wal=self.wal_budget,
            max_queue_size=max_queue_size,
        )
        self._recovery.open_file()
        narrow_modes(self.path)  # it proved to be a queue: only now touch its mode
        #: Appends that would wait for the write lock go to this process's spool (spool.py);
        #: every queue object moves spools into the file, whether it spools or not.
        self.spooling = spool
        #: Called before each checkpoint of this file after a delivery (``spool.py``).
        self.before_checkpoint: Callable[[], None] | None = None
        #: Whether ``checkpoint.restart_log`` keeps other processes' writers out (the commit fence
        #: held exclusively). Not for a spool: its fence is the spool directory's, which
        #: every process's spool shares, and spools are never recovered, so no writer there
        #: expects that lock to be taken (``open_spool``).
        self.restart_exclusive = True
        #: With ``journal`` (and ``spool``), appends go first to this process's journal
        #: (``journal.py``): one ``write()`` each; never with ``durability="full"``.
        self._spools: Spools | None = Spools(
            self.path,
            partial(open_spool, self),
            journal=journal and spool and durability != "full",
        )
        #: Which processes deliver at once when many share the file (``slots.py``).
        self.delivery_slots = DeliverySlots(self.path, self._leased_on)

    @property
    def waits(self) -> Waits:
        """This file's waits: deadlines set with ``bounded`` (a spool's open follows them)."""
        return self._db.waits

    def move_spools(
        self, *, others: bool = True, scan_now: bool = False, budget: int | None = None
    ) -> int:
        """Move journaled and spooled messages into the file: this process's, and with
        ``others`` every process's (see ``spool.py``, ``journal.py``); returns how many were
        moved. ``budget``: about how many bytes of journals to read at most."""
        spools = self._spools
        if spools is None:
            return 0
        try:
            return spools.move(self, others=others, scan_now=scan_now, budget=budget)
        except QueueBusy:
            # A lock holder outlived the wait (or a flush's deadline): the spooled messages
            # stay where they are, on disk, for the next move. The caller goes on.
            return 0

    def _leased_on(self, destination: int | None) -> bool:
        """Whether any holder has a lease out on ``destination`` (None: on any)."""

        def run(conn: sqlite3.Connection) -> object:
            if destination is None:
                return conn.execute("SELECT 1 FROM leases LIMIT 1").fetchone()
            return conn.execute(
                "SELECT 1 FROM leases WHERE dest = ? LIMIT 1", (destination,)
            ).fetchone()

        return self._db.read(run) is not None

    def _move_spools_due(self) -> None:
        """Before a lease: this process's spool, and every ``SCAN_EVERY`` the others'.

        A Client's queue (``spooling``) moves at most ``MOVE_BUDGET`` bytes of journals
        here: its flusher thread shares the caller's GIL, and a burst's journal moved at
        once held the caller's calls up (``flush()`` moves everything, in ``max_id``).
        Never waits for another thread's move (``SpoolMoves.move``'s ``wait``)."""
        spools = self._spools
        if spools is not None:
            spools.move(
                self, others=True, budget=MOVE_BUDGET if self.spooling else None, wait=False
            )

    def _note_destinations(self, known: dict[tuple[str, str], int]) -> None:
        """Destinations a committed transaction found or created (``spool.py``)."""
        for key, dest_id in known.items():
            self._dest_cache[key] = dest_id
            self._dest_names[dest_id] = key

    def __repr__(self) -> str:
        return f"SqliteQueue({str(self.path)!r}, durability={self.durability!r})"

    @property
    def last_recovery(self) -> RecoveryReport | None:
        """What the last recovery of a damaged file did (None: there was none)."""
        return self._recovery.last

    def _page_size(self) -> int:
        return self._recovery.page_size

    def _recover_from(self, error: QueueCorrupt) -> bool:
        return self._recovery.recover_from(error)

    def _forget_estimates(self) -> None:
        self._appender.forget_estimates()

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (for tests and tools that inspect the file)."""
        return self._db.conn()

    def close(self) -> None:
        """Close this thread's connection; other threads' close when they end."""
        self._db.close_thread()

    def bounded(self, seconds: float | None) -> AbstractContextManager[None]:
        """Inside the block, no wait of this queue (any thread) lasts past ``seconds`` from now.

        Waits for SQLite's write lock (another process's transaction) and for this process's
        own locks (another thread waiting on SQLite) then raise ``QueueBusy`` at the deadline
        instead of after ``busy_timeout``. ``None`` sets no bound.
        """
        return self._db.bounded(seconds)

    # ---------------------------------------------------------------- destinations, append

    def destination(self, host: str, write_key: str) -> int:
        """The id of the (host, write key) destination, created on first use."""
        key = (host, write_key)
        cached = self._dest_cache.get(key)
        if cached is not None:
            self._dest_names[cached] = key
            return cached

        def find(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "SELECT id FROM destinations WHERE host=? AND write_key=?", key
            ).fetchone()
            return None if row is None else int(row[0])

        # A known one (never deleted) is read without the write lock: building a Client does
        # not wait for a lock holder, even one stopped inside a write transaction.
        dest_id = self._db.read(find)
        if dest_id is None:
            dest_id = self._db.write(lambda conn: destination_in(conn, host, write_key))
        self._dest_cache[key] = dest_id
        self._dest_names[dest_id] = key
        return dest_id

    def append(self, dest_id: int, body: bytes, enqueued_at: float | None = None) -> int:
        """Store one serialized message; return its row id after COMMIT.

        Returns 0 when the ``max_queue_bytes`` cap dropped it (``overflow="drop_newest"``);
        with ``"drop_oldest"`` the oldest unleased messages make room instead. Both are counted.
        Raises ``QueueDiskFull`` when the disk is full (nothing committed before is affected).

        With ``spool=True``, an append that would wait for the write lock (a lease or an ack
        of another thread or process holds it) commits to this process's spool instead and
        returns that row's id negated; it is moved into the file by the next delivery.
        """
        spools = self._spools
        if self.spooling and spools is not None:
            return spools.append(self, dest_id, body, enqueued_at)
        return self._appender.append(dest_id, body, enqueued_at)

    # ---------------------------------------------------------------- leases

    def lease(
        self,
        max_messages: int,
        max_bytes: int,
        *,
        destination: int | None = None,
        up_to_id: int | None = None,
        now: float | None = None,
        per_message_overhead: int = 1,
    ) -> Lease | None:
        """Take the oldest ready messages of one destination, or None when none are ready.

        At most ``max_messages`` messages and ``max_bytes`` bytes (each message counting its
        size plus ``per_message_overhead``, the comma between messages in the request body);
        the first message is always taken so a batch is never empty. ``destination`` limits
        the choice to one destination, ``up_to_id`` to messages stored no later than that id.
        A destination in backoff (``set_backoff``) yields nothing until its time comes.
        """
        now_wall = time.time() if now is None else now
        self._move_spools_due()
        taken = self._db.write(
            lambda conn: self._take(
                conn, max_messages, max_bytes, destination, up_to_id, now_wall, per_message_overhead
            )
        )
        self._checkpoint_if_due()
        return taken

    def _take(
        self,
        conn: sqlite3.Connection,
        max_messages: int,
        max_bytes: int,
        destination: int | None,
        up_to_id: int | None,
        now_wall: float,
        per_message_overhead: int,
    ) -> Lease | None:
        """``lease``'s work inside the caller's transaction."""
        taken = leases.take(
            conn,
            self.lease_timeout,
            max_messages,
            max_bytes,
            destination=destination,
            up_to_id=up_to_id,
            now_wall=now_wall,
            per_message_overhead=per_message_overhead,
            after_dest=self._last_dest,
            room=self._room_for_index,
        )
        if taken is not None:
            # The next lease starts after it. (Rolled back with the transaction? Then this
            # only changes whose turn it is.)
            self._last_dest = taken.destination.id
        return taken

    def _checkpoint_if_due(self) -> None:
        """After a delivering transaction: checkpoint once the log grew by the normal size."""
        self._checkpoints.after_delivery()

    def _run_checkpoint(self, truncate: bool) -> None:
        """A checkpoint on this thread's connection (``checkpoint.run_checkpoint``)."""
        run_checkpoint(
            self._db, truncate, before=self.before_checkpoint, exclusive=self.restart_exclusive
        )

    def extend(self, lease: Lease, *, whole: bool = False) -> bool:
        """Push the lease's expiry ``lease_timeout`` from now; False if it was lost already
        (a lease is one record: held whole or not at all, so ``whole`` changes nothing)."""
        now_wall = time.time()
        mono = time.monotonic() + self.lease_timeout

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE leases SET mono_expires = ?, wall_expires = ? WHERE token = ?",
                (mono, now_wall + self.lease_timeout, lease.token),
            )
            return cur.rowcount > 0

        return self._db.write(run)

    def ack(self, lease: Lease, ids: Iterable[int] | None = None) -> int:
        """Delete delivered messages (all the lease still holds, or ``ids``); returns how many.

        Fenced by the token: once a lease has expired or been taken over, its holder's ack
        deletes nothing (the messages are sent again: at-least-once). The destination's
        backoff and failure count are cleared in the same transaction (the server took the
        batch, whoever holds the lease now).
        """
        wanted = None if ids is None else list(ids)
        deleted = self._db.write(lambda conn: self._ack(conn, lease, wanted))
        self._checkpoint_if_due()
        return deleted

    @staticmethod
    def _ack(conn: sqlite3.Connection, lease: Lease, wanted: list[int] | None) -> int:
        deleted = leases.ack_in(conn, lease, wanted)
        # A delivery went through: the destination is healthy again, for every holder.
        conn.execute(CLEAR_BACKOFF, (lease.destination.id,))
        return deleted

    def ack_and_lease(
        self,
        lease: Lease,
        max_messages: int,
        max_bytes: int,
        *,
        destination: int | None = None,
        up_to_id: int | None = None,
        now: float | None = None,
        per_message_overhead: int = 1,
    ) -> tuple[int, Lease | None]:
        """``ack(lease)`` then ``lease(...)`` in one transaction; both answers.

        A delivery loop's step from one batch to the next: one commit per batch instead of
        two (and the lease record's pages written once). A crash before the commit keeps
        both undone: the batch is sent again, as after a lost ack; after it, the new lease
        is one a dead holder took, leased again at once.
        """
        now_wall = time.time() if now is None else now
        self._move_spools_due()

        def run(conn: sqlite3.Connection) -> tuple[int, Lease | None]:
            deleted = self._ack(conn, lease, None)
            return deleted, self._take(
                conn, max_messages, max_bytes, destination, up_to_id, now_wall, per_message_overhead
            )

        done = self._db.write(run)
        self._checkpoint_if_due()
        return done

    def release(
        self,
        lease: Lease,
        not_before: float | None = None,
        *,
        ids: Iterable[int] | None = None,
        count_attempt: bool = True,
    ) -> int:
        """Return leased messages to the queue, not to be leased again before ``not_before``.

        Fenced by the token: a stale holder cannot release a batch someone else now holds.
        """
        wanted = None if ids is None else list(ids)
        bump = 1 if count_attempt else 0
        released = self._db.write(
            lambda conn: leases.release_in(conn, lease, not_before, wanted, bump)
        )
        self._checkpoint_if_due()
        return released

    def retry_later(self, lease: Lease, delay: Callable[[int], float], error: str) -> float:
        """Back the destination off and hand the batch back, in one transaction.

        Reads the destination's consecutive failures (other holders' included), stores a
        backoff of ``delay(failures + 1)`` seconds from now with ``error`` as its last
        error, and releases what ``lease`` still holds until then, counting an attempt.
        Returns the wall-clock time the backoff ends. Fenced like ``release``: a stale
        holder's batch is not touched, but its failure still counts for the destination.
        """
        dest_id = lease.destination.id

        def run(conn: sqlite3.Connection) -> float:
            row = conn.execute("SELECT failures FROM destinations WHERE id = ?", (dest_id,))
            found = row.fetchone()
            now = time.time()
            until = now + delay((int(found[0]) if found else 0) + 1)
            leases.store_backoff(conn, dest_id, until, error, now)
            leases.release_in(conn, lease, until, None, 1)
            return until

        until = self._db.write(run)
        self._checkpoint_if_due()
        return until

    def reclaim_expired(self) -> int:
        """Free the messages of dead or expired leases now; returns how many leases ended."""
        if not self.live_leases():
            return 0
        now_wall = time.time()

        def run(conn: sqlite3.Connection) -> int:
            _, dead = leases.scan_leases(conn, self.lease_timeout, now_wall)
            for token in dead:
                conn.execute("DELETE FROM leases WHERE token = ?", (token,))
            return len(dead)

        return self._db.write(run)

    def ready_summary(self, limit: int, now: float | None = None) -> tuple[int, float | None]:
        """How many of the oldest ``limit`` messages are ready to lease, and the oldest's time.

        A poll that finds nothing ready also gives back the disk of a ``-wal`` grown past its
        normal size (``Checkpoints.when_idle``).
        """
        now_wall = time.time() if now is None else now
        self.move_spools(budget=MOVE_BUDGET if self.spooling else None)
        self._index_tail()
        summary = self._db.read(lambda conn: ready.ready_summary(conn, limit, now_wall))
        if summary[0] == 0:
            self._checkpoints.when_idle()
        return summary

    def next_ready_at(
        self, *, up_to_id: int | None = None, destination: int | None = None
    ) -> float | None:
        """The earliest wall-clock time some pending message (of ``destination``) may be leased."""
        top = up_to_id if up_to_id is not None else (1 << 62)
        now_wall = time.time()
        self._index_tail()
        return self._db.read(lambda conn: ready.next_ready_at(conn, now_wall, top, destination))

    def _index_tail(self) -> None:
        """Fold a long tail of new messages into the index by destination before a poll.

        Leases do it as they go; this is for a queue nobody leases from (every destination
        backing off, producers still appending), whose polls would otherwise read a tail
        that only grows (see ``bydest``).
        """
        if self._db.read(bydest.tail) > bydest.TAIL_ROWS and self._room_for_index():
            # All of it, a transaction per chunk: appends waiting for the write lock go in
            # between (``bydest.FOLD_ROWS``).
            for _ in range(bydest.CATCH_UP_ROWS // bydest.FOLD_ROWS):
                if not self._db.write(bydest.fold_chunk):
                    break

    def _room_for_index(self) -> bool:
        """Whether the disk has room to extend the index by destination (a statvfs)."""
        try:
            return shutil.disk_usage(self.path.parent).free >= bydest.ROOM_BYTES
        except OSError:
            return True

    # ---------------------------------------------------------------- backoff

    def set_backoff(self, dest_id: int, until: float, error: str | None = None) -> None:
        """Hold every process back from leasing ``dest_id`` until ``until`` (wall clock)."""
        now = time.time()
        self._db.write(lambda conn: leases.store_backoff(conn, dest_id, until, error, now))

    def clear_backoff(self, dest_id: int | None, *, messages: bool = False) -> None:
        """Forget the destination's failures and backoff (a successful delivery does this).

        ``dest_id=None`` does it for every destination. ``messages=True`` also clears the
        retry time of each of their queued messages, so all of it is ready at once
        (``drain --ignore-backoff``).
        """

        def run(conn: sqlite3.Connection) -> None:
            if dest_id is None:
                conn.execute("UPDATE destinations SET not_before = 0, failures = 0")
            else:
                conn.execute(CLEAR_BACKOFF, (dest_id,))
            if messages:
                conn.execute(
                    "UPDATE messages SET not_before = NULL "
                    "WHERE (? IS NULL OR dest = ?) AND not_before IS NOT NULL",
                    (dest_id, dest_id),
                )

        self._db.write(run)

    def backoff(self, dest_id: int) -> tuple[float, int]:
        """``(not_before, consecutive failures)`` of a destination."""
        row = self._db.read(
            lambda conn: conn.execute(
                "SELECT not_before, failures FROM destinations WHERE id = ?", (dest_id,)
            ).fetchone()
        )
        if row is None:
            return 0.0, 0
        return float(row[0]), int(row[1])
