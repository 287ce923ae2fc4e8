"""Dead letters in the SQLite queue: moving rejected messages aside, keeping them within
their share of the cap, listing, requeueing and purging them."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from durable_analytics._store.base import DeadLetter, Lease

from .connections import Connections
from .errors import log
from .leases import chosen, chunks, held_ids, settle
from .schema import PURGED_COUNTER

__all__ = ["ROW_OVERHEAD", "DeadLetters", "used_bytes"]

#: Rough per-row overhead of a message in its B-tree page, for size estimates.
ROW_OVERHEAD = 48


def used_bytes(conn: sqlite3.Connection, page_size: int) -> int:
    """The bytes of the file's pages in use (not on the free list)."""
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    return (pages - free) * page_size


class DeadLetters:
    """The dead letters of one queue, and the bound that keeps them from crowding it.

    Dead letters count in the file's cap like everything else; the bound keeps them within
    ``max_bytes`` while the file is near ``max_queue_bytes``.
    """

    def __init__(
        self,
        db: Connections,
        *,
        max_bytes: int,
        max_queue_bytes: int,
        page_size: Callable[[], int],
    ) -> None:
        self.db = db
        self.max_bytes = max_bytes
        self.max_queue_bytes = max_queue_bytes
        self._page_size = page_size
        self._since_check = 1  # dead-letter bytes added since their last measure
        self._trimmed_at = -1e9  # when dead letters were last measured against their bound

    @property
    def path(self) -> Path:
        return self.db.path

    def move(
        self,
        lease: Lease,
        ids: Iterable[int],
        *,
        status: int | None,
        reason: str,
        excerpt: str = "",
    ) -> int:
        """Move leased messages to the dead letters with the status and a response excerpt."""
        wanted = list(ids)
        if not wanted:
            return 0
        now = time.time()

        def run(conn: sqlite3.Connection) -> int:
            held = held_ids(conn, lease)
            if held is None:
                return 0
            picked = chosen(held, wanted)
            moved = 0
            for chunk in chunks(picked, 500):
                marks = ",".join("?" * len(chunk))
                moved += conn.execute(
                    "INSERT INTO dead_letters (dest, body, size, enqueued_at, dead_at, attempts, "
                    "status, reason, excerpt) SELECT dest, body, size, enqueued_at, ?, "
                    f"attempts + 1, ?, ?, ? FROM messages WHERE id IN ({marks})",
                    (now, status, reason[:500], excerpt[:2000], *chunk),
                ).rowcount
                conn.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
            settle(conn, lease, held, set(picked))
            if moved:
                done = set(picked)
                pairs = zip(lease.ids, lease.bodies, strict=True)
                added = sum(len(b) for i, b in pairs if i in done)
                self._bound(conn, added)
            return moved

        return self.db.write(run)

    def _bound(self, conn: sqlite3.Connection, added: int) -> None:
        """Keep dead letters within ``max_bytes`` while the file is near its cap.

        They are measured only when the file is within that bound of the cap (and not more
        often than every eighth of the bound), so a queue far from its cap never pays for
        it. The oldest go first, down to 90 % of the bound; how many is counted
        (``purged``) and logged.
        """
        self._since_check += added
        if self._since_check < max(1, self.max_bytes // 8):
            return
        if used_bytes(conn, self._page_size()) + self.max_bytes < self.max_queue_bytes:
            return
        self.trim(conn)

    def trim(self, conn: sqlite3.Connection, *, throttle: bool = False) -> int:
        """Purge the oldest dead letters beyond ``max_bytes``; returns how many.

        Called when the file is at (or near) its cap: before a message is dropped, and after
        dead letters were added. ``throttle``: unless this process added dead letters since
        the last measure, at most once a second (a full queue refusing every append must not
        measure its dead letters every time).
        """
        now = time.monotonic()
        if throttle and not self._since_check and now - self._trimmed_at < 1.0:
            return 0
        self._trimmed_at = now
        self._since_check = 0
        limit = self.max_bytes
        total = int(
            conn.execute(
                "SELECT total(size) + count(*) * ? FROM dead_letters", (ROW_OVERHEAD,)
            ).fetchone()[0]
        )
        if total <= limit:
            return 0
        target = total - int(limit * 0.9)
        purged = freed = 0
        while freed < target:
            rows = conn.execute(
                "SELECT id, size FROM dead_letters ORDER BY id LIMIT 256"
            ).fetchall()
            if not rows:
                break
            take = []
            for row_id, row_size in rows:
                take.append(int(row_id))
                freed += int(row_size) + ROW_OVERHEAD
                if freed >= target:
                    break
            conn.execute(
                f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * len(take))})", take
            )
            purged += len(take)
        conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (PURGED_COUNTER, purged),
        )
        log.warning(
            "the dead letters of %s passed max_dead_letter_bytes (%d bytes) with the queue near "
            "its cap: purged the %d oldest",
            self.path,
            limit,
            purged,
        )
        return purged

    def purged(self) -> int:
        """How many dead letters were purged to keep them within ``max_bytes``."""
        row = self.db.read(
            lambda conn: conn.execute(
                "SELECT value FROM counters WHERE name = ?", (PURGED_COUNTER,)
            ).fetchone()
        )
        return 0 if row is None else int(row[0])

    def newest(self) -> int:
        """The newest dead letter's id, 0 when there is none."""
        row = self.db.read(
            lambda conn: conn.execute("SELECT coalesce(max(id), 0) FROM dead_letters").fetchone()
        )
        return int(row[0])

    def count_since(self, newest: int, queued_by: float, destination: int | None) -> int:
        """How many dead letters (of ``destination``, None: of any) have ids past ``newest``
        and were queued by ``queued_by``.

        An id is the highest plus one (``INTEGER PRIMARY KEY``): a purge or requeue of the
        newest dead letters meanwhile gives later ones ids at or below ``newest`` again, and
        those are not counted (an operator's action during a flush).
        """
        row = self.db.read(
            lambda conn: conn.execute(
                "SELECT count(*) FROM dead_letters "
                "WHERE id > ? AND enqueued_at <= ? AND (? IS NULL OR dest = ?)",
                (newest, queued_by, destination, destination),
            ).fetchone()
        )
        return int(row[0])

    def select(self, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        """The dead letters (all, or those with ``ids``), oldest first."""

        def run(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            sql = (
                "SELECT l.id, d.host, d.write_key, l.status, l.reason, l.excerpt, l.attempts, "
                "l.enqueued_at, l.dead_at, l.body FROM dead_letters l "
                "JOIN destinations d ON d.id = l.dest"
            )
            if ids is None:
                return conn.execute(sql + " ORDER BY l.id").fetchall()
            marks = ",".join("?" * len(ids))
            return conn.execute(sql + f" WHERE l.id IN ({marks}) ORDER BY l.id", ids).fetchall()

        return [DeadLetter.from_row(row) for row in self.db.read(run)]

    def take_out(self, ids: Sequence[int] | None, *, requeue: bool) -> int:
        """Requeue (as new messages) or purge dead letters (all, or ``ids``); how many."""

        def run(conn: sqlite3.Connection) -> int:
            where: str = ""
            params: tuple[int, ...] = ()
            if ids is not None:
                if not ids:
                    return 0
                where = f" WHERE id IN ({','.join('?' * len(ids))})"
                params = tuple(ids)
            if requeue:
                conn.execute(
                    "INSERT INTO messages (dest, body, size, enqueued_at) "
                    f"SELECT dest, body, size, enqueued_at FROM dead_letters{where} ORDER BY id",
                    params,
                )
            return int(conn.execute(f"DELETE FROM dead_letters{where}", params).rowcount)

        return self.db.write(run)
