"""The index of messages by destination, kept off the append path.

Messages of every destination share one table in id order, so finding one destination's
next messages by reading the table means reading every other destination's backlog stored
before them. An ordinary index on ``messages (dest)`` would answer that, but every append
would write it: one more page per commit, measured here at about a quarter of the append
rate. So the index is a table of its own, ``dest_ids (dest, id)``, filled in bulk by the
connections that lease (``catch_up``, a few thousand rows per transaction), and an append
stays one INSERT into ``messages``.

``dest_ids_upto.upto`` is how far the index goes: every message with an id up to it has its
entry; the messages after it (the *tail*: what was appended since the last catch-up, a
batch or so while a flusher runs) are read from the table itself, from ``upto`` on. A
trigger (schema version 3) deletes a message's entry with the message, and, when the
message deleted is the one at ``upto``, lowers ``upto`` to the newest message before it:
SQLite gives a new row ``max(id) + 1``, so while the message at ``upto`` exists no new
message can take an id at or below it.

Every function runs on the caller's connection, inside its transaction.
"""

from __future__ import annotations

import sqlite3

__all__ = ["CATCH_UP_ROWS", "TAIL_ROWS", "catch_up", "count", "rows", "tail", "upto"]

#: Rows indexed per catch-up: bounds the time one catch-up holds the write lock.
CATCH_UP_ROWS = 10_000
#: A poll (a read) catches the index up first when the tail is longer than this.
TAIL_ROWS = 2_000

_READY = "(m.not_before IS NULL OR m.not_before <= ? OR m.not_before > ?)"
# CROSS JOIN keeps SQLite from reordering: walk one destination's entries in id order, and
# look each row up by id.
_INDEXED_ROWS = (
    "SELECT m.id, m.size, m.attempts, m.enqueued_at FROM dest_ids x "
    "CROSS JOIN messages m ON m.id = x.id "
    f"WHERE x.dest = ? AND x.id <= ? AND {_READY} ORDER BY x.id LIMIT ?"
)
_TAIL_ROWS = (
    "SELECT m.id, m.size, m.attempts, m.enqueued_at FROM messages m "
    f"WHERE m.id > ? AND m.id <= ? AND m.dest = ? AND {_READY} ORDER BY m.id LIMIT ?"
)
_COUNT = (
    "SELECT (SELECT count(*) FROM dest_ids WHERE dest = ? AND id <= min(?, u.upto))"
    " + (SELECT count(*) FROM messages WHERE id > u.upto AND id <= ? AND dest = ?) "
    "FROM (SELECT coalesce((SELECT upto FROM dest_ids_upto WHERE id = 1), 0) AS upto) u"
)
_COUNT_ALL = (
    "SELECT (SELECT count(*) FROM dest_ids WHERE id <= min(?, u.upto))"
    " + (SELECT count(*) FROM messages WHERE id > u.upto AND id <= ?) "
    "FROM (SELECT coalesce((SELECT upto FROM dest_ids_upto WHERE id = 1), 0) AS upto) u"
)

Row = tuple[int, int, int, float]


def upto(conn: sqlite3.Connection) -> int:
    """The id up to which every message has its entry in ``dest_ids``."""
    row = conn.execute("SELECT upto FROM dest_ids_upto WHERE id = 1").fetchone()
    return 0 if row is None else int(row[0])


def tail(conn: sqlite3.Connection) -> int:
    """About how many messages were appended after ``upto`` (ids are nearly dense)."""
    top = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
    return max(0, int(top or 0) - upto(conn))


def catch_up(conn: sqlite3.Connection, limit: int = CATCH_UP_ROWS) -> int:
    """Index up to ``limit`` messages of the tail, oldest first; returns how many.

    Runs inside a write transaction: the entries and the new ``upto`` commit together.
    """
    start = upto(conn)
    last = conn.execute(
        "SELECT max(id), count(*) FROM (SELECT id FROM messages WHERE id > ? ORDER BY id LIMIT ?)",
        (start, limit),
    ).fetchone()
    if not last[1]:
        return 0
    conn.execute(
        "INSERT OR IGNORE INTO dest_ids (dest, id) "
        "SELECT dest, id FROM messages WHERE id > ? AND id <= ?",
        (start, int(last[0])),
    )
    conn.execute(
        "INSERT INTO dest_ids_upto (id, upto) VALUES (1, ?) "
        "ON CONFLICT (id) DO UPDATE SET upto = excluded.upto",
        (int(last[0]),),
    )
    return int(last[1])


def rows(
    conn: sqlite3.Connection, dest: int, top: int, now: float, horizon: float, limit: int
) -> list[Row]:
    """``dest``'s first ``limit`` messages up to id ``top`` that are ready at ``now``.

    Ready: no ``not_before`` of its own, or one that has come (or lies beyond ``horizon``:
    a clock that jumped back). ``(id, size, attempts, enqueued_at)``, oldest first; the
    cost is what is read of ``dest`` (and the tail), whatever other destinations hold.
    """
    mark = upto(conn)
    found: list[Row] = [
        (int(i), int(s), int(a), float(t))
        for i, s, a, t in conn.execute(
            _INDEXED_ROWS, (dest, min(top, mark), now, horizon, limit)
        ).fetchall()
    ]
    if len(found) < limit and top > mark:
        found.extend(
            (int(i), int(s), int(a), float(t))
            for i, s, a, t in conn.execute(
                _TAIL_ROWS, (mark, top, dest, now, horizon, limit - len(found))
            ).fetchall()
        )
    return found


def count(conn: sqlite3.Connection, dest: int | None, top: int) -> int:
    """How many messages (of ``dest``, or of all) there are up to id ``top``, in one read.

    Counted on the index (entries of a few bytes, not rows with their bodies) plus the tail.
    """
    if dest is None:
        return int(conn.execute(_COUNT_ALL, (top, top)).fetchone()[0])
    return int(conn.execute(_COUNT, (dest, top, top, dest)).fetchone()[0])
