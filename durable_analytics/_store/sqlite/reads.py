"""The SQLite queue's reads and dead-letter moves: counts, stats, health, dead letters.

``QueueReads`` is a base of ``SqliteQueue``: what ``flush()``, the flusher, an operator's
``status`` and ``dead-letters`` commands and the tests ask of a queue, apart from the
delivery path. The counts include what waits in the producers' spools (``spool_counts``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, cast

from durable_analytics._store.base import DeadLetter, DeadLetterMark, Lease, QueueSizes, QueueStats

from . import bydest, inspect, leases, spool_counts
from .wal import wal_bytes

if TYPE_CHECKING:
    from .append import Appender
    from .connections import Connections
    from .dead_letters import DeadLetters
    from .queue import SqliteQueue
    from .spool import Spools

__all__ = ["QueueReads"]


class QueueReads(QueueSizes):
    """Reads of the queue and moves of its dead letters (see the module docstring)."""

    if TYPE_CHECKING:
        # Set by ``SqliteQueue.__init__``.
        path: Path
        lease_timeout: float
        _db: Connections
        _dead: DeadLetters
        _appender: Appender
        _spools: Spools | None

        def move_spools(
            self, *, others: bool = True, scan_now: bool = False, budget: int | None = None
        ) -> int: ...

    def _queue(self) -> SqliteQueue:
        # The spools' looks take the whole queue (its connections, waits and names).
        return cast("SqliteQueue", self)

    # ---------------------------------------------------------------- dead letters

    def dead_letter(
        self,
        lease: Lease,
        ids: Iterable[int],
        *,
        status: int | None,
        reason: str,
        excerpt: str = "",
    ) -> int:
        """Move leased messages to the dead-letter table with the status and a response excerpt."""
        return self._dead.move(lease, ids, status=status, reason=reason, excerpt=excerpt)

    def dead_letters(self, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        """The dead letters (all, or those with ``ids``), oldest first."""
        return self._dead.select(ids)

    def dead_letter_mark(self) -> DeadLetterMark:
        """Where the dead letters stand now (the newest's id, this clock)."""
        return DeadLetterMark(self._dead.newest(), time.time())

    def dead_lettered_since(self, mark: DeadLetterMark, destination: int | None = None) -> int:
        """How many dead letters (of ``destination``) are newer than ``mark`` and of messages
        queued by then."""
        return self._dead.count_since(mark.id, mark.at, destination)

    def requeue_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Put dead letters (all, or ``ids``) back in the queue; returns how many."""
        return self._dead.take_out(ids, requeue=True)

    def purge_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Delete dead letters (all, or ``ids``) for good; returns how many."""
        return self._dead.take_out(ids, requeue=False)

    def dead_letters_purged(self) -> int:
        """How many dead letters were purged to keep them within ``max_dead_letter_bytes``."""
        return self._dead.purged()

    # ---------------------------------------------------------------- inspection

    def max_id(self) -> int:
        """The id of the newest message (0 when empty): ``flush`` waits for ids up to it.

        Spooled messages (``spool.py``) are moved into the file first, so they are counted.
        """
        self.move_spools(scan_now=True)
        row = self._db.read(lambda conn: conn.execute("SELECT max(id) FROM messages").fetchone())
        return int(row[0] or 0)

    def pending(self, *, up_to_id: int | None = None, destination: int | None = None) -> int:
        """How many messages are not yet delivered (leased or not).

        Without ``up_to_id``, messages still in the spools of producers (``spool.py``) count
        too.
        """
        top = up_to_id if up_to_id is not None else (1 << 62)
        spools = self._spools
        if up_to_id is not None or spools is None:
            # Counted on the index by destination: entries of a few bytes, not rows with
            # bodies, and only this destination's.
            return self._db.read(lambda conn: bydest.count(conn, destination, top))
        queue = self._queue()
        with spool_counts.list_journals(spools) as listed:

            def run(conn: sqlite3.Connection) -> int:
                # The file and the records the journals are read from, in one snapshot: a
                # message moved in meanwhile counts in the one or the other, once.
                with bydest.snapshot(conn):
                    found = bydest.count(conn, destination, top)
                    return found + spool_counts.count(spools, queue, destination, conn, listed)

            return self._db.read(run)

    def unleased(
        self, destination: int, *, up_to_id: int, after_id: int = 0, limit: int = 100
    ) -> list[tuple[int, bytes]]:
        """Up to ``limit`` messages of ``destination`` in ``(after_id, up_to_id]`` that no
        lease record names, oldest first (not those still in a spool or journal)."""

        def run(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
            leased = leases.leased_ids(conn)
            # Read past as many rows as leases may skip: one statement, however they fall.
            rows = conn.execute(
                "SELECT id, body FROM messages WHERE dest = ? AND id > ? AND id <= ? "
                "ORDER BY id LIMIT ?",
                (destination, after_id, up_to_id, limit + len(leased)),
            ).fetchall()
            return [(int(i), bytes(b)) for i, b in rows if int(i) not in leased][:limit]

        return self._db.read(run)

    def holds_others(self, destinations: Collection[int]) -> bool:
        """Whether a message of a destination not in ``destinations`` is pending.

        The spools of every process first, then the file: a seek in the index by
        destination per destination, and the tail after it (``bydest.holds_others``). In
        that order a message moved from a spool into the file meanwhile is seen in one or
        the other (messages only ever move that way), never in neither.
        """
        ours = tuple(sorted(set(destinations)))
        spools = self._spools
        if spools is not None and spool_counts.holds_others(spools, self._queue(), ours):
            return True
        return bool(self._db.read(lambda conn: bydest.holds_others(conn, ours)))

    def held_back(self, destination: int | None = None) -> dict[str, int]:
        """By spool file, where what is not moved in yet ends: a spool's newest message (of
        ``destination``), a journal file's end (``spool_counts.marks``)."""
        spools = self._spools
        return {} if spools is None else spool_counts.marks(spools, self._queue(), destination)

    def held_back_left(self, marks: dict[str, int], destination: int | None = None) -> int:
        """How many of the spooled messages up to ``marks`` are still not moved in."""
        spools = self._spools
        return 0 if spools is None else spool_counts.held(spools, self._queue(), marks, destination)

    def live_leases(self) -> int:
        """How many leases are held right now (by anyone)."""
        row = self._db.read(lambda conn: conn.execute("SELECT count(*) FROM leases").fetchone())
        return int(row[0])

    def stats(self) -> QueueStats:
        """Counts and health of the queue (see ``QueueStats``)."""
        now = time.time()
        spools = self._spools
        queue = self._queue()
        with (
            contextlib.nullcontext(None)
            if spools is None
            else spool_counts.list_journals(spools) as listed
        ):

            def waiting(conn: sqlite3.Connection) -> Mapping[tuple[str, str], spool_counts.Spooled]:
                # Inside the file's snapshot (see ``pending``).
                if spools is None:
                    return {}
                return spool_counts.by_destination(spools, queue, conn, listed)

            found = self._db.read(
                partial(inspect.stats, lease_timeout=self.lease_timeout, now=now, spooled=waiting)
            )
        return dataclasses.replace(
            found,
            dropped=found.dropped + self._appender.unsaved_drops,
            wal_bytes=wal_bytes(self.path),
        )

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` result (``"ok"`` when healthy)."""
        rows = self._db.read(lambda conn: conn.execute("PRAGMA integrity_check").fetchall())
        return "; ".join(str(r[0]) for r in rows)

    def bodies(self) -> list[bytes]:
        """Every message body in the file, oldest first (for tests and tools); not those
        still in a spool (``max_id()`` moves them in first)."""
        rows = self._db.read(
            lambda conn: conn.execute("SELECT body FROM messages ORDER BY id").fetchall()
        )
        return [bytes(r[0]) for r in rows]
