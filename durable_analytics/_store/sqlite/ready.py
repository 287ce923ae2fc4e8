"""What is ready to lease, and when the next message will be: per destination, from indexes.

Both questions are asked by every idle flusher on every poll, so they must not cost the
size of a backlog: each destination's next messages come through the index by destination
(``bydest``), a destination that backs off is not read at all but for its first unleased
message and the earliest retry time of its waiting messages (the small partial index
``messages_waiting``). Every function runs on the caller's connection, in one read
transaction (one snapshot for the index, its tail and the leases).
"""

from __future__ import annotations

import sqlite3

from durable_analytics._store.base import CLOCK_JUMP_MARGIN, MAX_BACKOFF_SECONDS

from . import bydest
from .leases import leased_ids

__all__ = ["next_ready_at", "ready_summary"]

#: The earliest retry time among a destination's messages that wait out a backoff.
_NEXT_WAITING = (
    "SELECT min(not_before) FROM messages WHERE dest = ? AND not_before > ? "
    "AND not_before <= ? AND id <= ?"
)


def _horizon(now: float) -> float:
    # Times beyond it can only come from a wall clock that jumped back: they count as now.
    return now + MAX_BACKOFF_SECONDS + CLOCK_JUMP_MARGIN


def ready_summary(conn: sqlite3.Connection, limit: int, now: float) -> tuple[int, float | None]:
    """How many of the oldest ``limit`` ready messages there are, and the oldest's time."""
    horizon = _horizon(now)
    with bydest.snapshot(conn):
        leased = leased_ids(conn)
        mark = bydest.upto(conn)
        found: list[tuple[int, float]] = []
        for d, not_before in conn.execute("SELECT id, not_before FROM destinations").fetchall():
            if horizon >= not_before > now:
                continue  # backing off: nothing of it is ready
            rows = bydest.rows(conn, int(d), (1 << 62, now, horizon), limit + len(leased), mark)
            mine = [(i, t) for i, _, _, t in rows if i not in leased]
            found.extend(mine[:limit])
    found.sort()
    ready = found[:limit]
    return len(ready), (min(t for _, t in ready) if ready else None)


def next_ready_at(
    conn: sqlite3.Connection, now: float, top: int, destination: int | None = None
) -> float | None:
    """The earliest wall-clock time some unleased message up to id ``top`` may be leased.

    Only ``destination``'s messages count when it is given. None when every pending message
    is leased (or there is none).
    """
    horizon = _horizon(now)
    best: float | None = None
    with bydest.snapshot(conn):
        leased = leased_ids(conn)
        mark = bydest.upto(conn)
        for d, not_before in conn.execute("SELECT id, not_before FROM destinations").fetchall():
            if destination is not None and d != destination:
                continue
            dest_at = 0.0 if not_before > horizon else float(not_before)
            rows = bydest.rows(conn, int(d), (top, now, horizon), 1 + len(leased), mark)
            if any(i not in leased for i, _, _, _ in rows):
                at = dest_at  # a message of it is ready as soon as the destination is
            else:
                # Only messages waiting out a retry (never leased), if any: the first of them.
                waiting = conn.execute(_NEXT_WAITING, (d, now, horizon, top)).fetchone()[0]
                if waiting is None:
                    continue
                at = max(dest_at, float(waiting))
            best = at if best is None else min(best, at)
    return best
