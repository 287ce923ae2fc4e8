"""The index of messages by destination, kept off the append path.

Messages of every destination share one table in id order, so finding one destination's
next messages by reading the table means reading every other destination's backlog stored
before them. An ordinary index on ``messages (dest)`` would answer that, but every append
would write it: one more page per commit, measured here at 11 % of the storage call's rate
(25 % of a bare INSERT). So the index is a table of its own, ``dest_ids (dest, id)``, that
an append does not write (it stays one INSERT into ``messages``); the connections that
lease fill it in bulk.

How far the index goes, ``upto``, is its newest entry: every message with an id up to it
has its entry; the messages after it (the *tail*) are read from the table itself, from
``upto`` on. A lease (and a poll) folds the tail into the index once it is longer than
``TAIL_ROWS`` (a lease ``FOLD_ROWS`` of it, a poll all of it up to ``CATCH_UP_ROWS``, in
transactions of ``FOLD_ROWS``), so reading the tail costs a bounded amount, and a queue
whose flusher keeps up never writes the index at all: its messages are appended and acked
while still in the tail.

A trigger (schema version 3) deletes a message's entry with the message, so ``upto`` is
always a message that exists (or 0): SQLite gives a new row ``max(id) + 1``, so a new
message never takes an id at or below ``upto``, even when the newest messages were deleted
and their ids are handed out again. Only the entries are written per message deleted;
nothing else is kept up to date.

Every function runs on the caller's connection, inside its transaction.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "CATCH_UP_ROWS",
    "FOLD_ROWS",
    "ROOM_BYTES",
    "TAIL_LOOK",
    "TAIL_ROWS",
    "catch_up",
    "count",
    "fold_chunk",
    "fold_in",
    "folded_mark",
    "holds_others",
    "marks",
    "rows",
    "rows_with_bodies",
    "snapshot",
    "tail",
    "upto",
]

#: Rows a poll indexes at most, in transactions of ``FOLD_ROWS``.
CATCH_UP_ROWS = 10_000
#: Rows indexed per transaction by a fold: it holds the write lock, and the caller's
#: appends wait for it. A burst's tail of 1,100-1,900 rows folded in one transaction held it
#: 0.4-1.8 ms, and those folds were among the slowest 20 of 20,000 ``track()`` calls.
FOLD_ROWS = 256
#: The longest tail a lease or a poll reads before folding it into the index.
TAIL_ROWS = 1_000
#: The most rows of the tail ``holds_others`` reads before it answers "maybe" (True):
#: ~25 ms, where counting a backlog of 1,000,000 took 0.3-0.4 s.
TAIL_LOOK = 100 * TAIL_ROWS
#: Below this much free disk space the index is not extended: it only saves reads, and
#: the space is the appender's reserve for recording deliveries (``append.py``).
ROOM_BYTES = 8 * 1024 * 1024

_READY = "(m.not_before IS NULL OR m.not_before <= ? OR m.not_before > ?)"
# CROSS JOIN keeps SQLite from reordering: walk one destination's entries in id order, and
# look each row up by id.
_INDEXED_FROM = (
    "FROM dest_ids x CROSS JOIN messages m ON m.id = x.id "
    f"WHERE x.dest = ? AND x.id > ? AND x.id <= ? AND {_READY} ORDER BY x.id LIMIT ?"
)
_TAIL_FROM = (
    "FROM messages m "
    f"WHERE m.id > ? AND m.id <= ? AND m.dest = ? AND {_READY} ORDER BY m.id LIMIT ?"
)
# The rows with their enqueue time (polls), or with their body (a lease: the batch's bodies
# come with the page that picks it, not from a second statement).
_BY_TIME = "SELECT m.id, m.size, m.attempts, m.enqueued_at"
_BY_BODY = "SELECT m.id, m.size, m.attempts, m.body"
_INDEXED_ROWS = f"{_BY_TIME} {_INDEXED_FROM}"
_TAIL_ROWS = f"{_BY_TIME} {_TAIL_FROM}"
_INDEXED_BODIES = f"{_BY_BODY} {_INDEXED_FROM}"
_TAIL_BODIES = f"{_BY_BODY} {_TAIL_FROM}"
# The newest entry: the newest of each destination's (a few lookups, where max(id) over the
# whole index would read all of it).
_UPTO = (
    "SELECT coalesce(max((SELECT max(x.id) FROM dest_ids x WHERE x.dest = d.id)), 0) AS upto "
    "FROM destinations d"
)
# ``upto`` and the newest id together: what a lease needs to decide on a fold and to read.
_MARKS = f"SELECT u.upto, (SELECT max(id) FROM messages) FROM ({_UPTO}) u"
_COUNT = (
    "SELECT (SELECT count(*) FROM dest_ids WHERE dest = ? AND id <= min(?, u.upto))"
    " + (SELECT count(*) FROM messages WHERE id > u.upto AND id <= ? AND dest = ?) "
    f"FROM ({_UPTO}) u"
)
_COUNT_ALL = (
    "SELECT (SELECT count(*) FROM dest_ids WHERE id <= min(?, u.upto))"
    " + (SELECT count(*) FROM messages WHERE id > u.upto AND id <= ?) "
    f"FROM ({_UPTO}) u"
)
# Every entry (SQLite counts a whole b-tree without decoding its rows: ~10x faster), then
# the tail after ``upto``.
_COUNT_EVERY = (
    "SELECT (SELECT count(*) FROM dest_ids)"
    " + (SELECT count(*) FROM messages WHERE id > u.upto AND id <= ?) "
    f"FROM ({_UPTO}) u"
)

Row = tuple[int, int, int, float]
BodyRow = tuple[int, int, int, bytes]


def upto(conn: sqlite3.Connection) -> int:
    """The id up to which every message has its entry in ``dest_ids`` (its newest entry)."""
    return int(conn.execute(_UPTO).fetchone()[0])


def marks(conn: sqlite3.Connection) -> tuple[int, int]:
    """``upto(conn)`` and the newest message's id (0 when empty), in one statement."""
    mark, top = conn.execute(_MARKS).fetchone()
    return int(mark), int(top or 0)


def tail(conn: sqlite3.Connection) -> int:
    """About how many messages were appended after ``upto`` (ids are nearly dense)."""
    mark, top = marks(conn)
    return max(0, top - mark)


def catch_up(conn: sqlite3.Connection, limit: int = CATCH_UP_ROWS) -> int:
    """Index up to ``limit`` messages of the tail, oldest first; returns how many.

    Runs inside a write transaction. (A message whose destination is not in
    ``destinations``, which only a damaged file could hold, is indexed again each time:
    harmless, the index's key makes it one entry.)
    """
    return int(
        conn.execute(
            "INSERT OR IGNORE INTO dest_ids (dest, id) "
            "SELECT dest, id FROM messages WHERE id > ? ORDER BY id LIMIT ?",
            (upto(conn), limit),
        ).rowcount
    )


def fold_in(conn: sqlite3.Connection) -> int:
    """Index ``FOLD_ROWS`` of the tail if it is longer than ``TAIL_ROWS``; returns how many.

    Runs inside a write transaction.
    """
    return fold_chunk(conn) if tail(conn) > TAIL_ROWS else 0


def fold_chunk(conn: sqlite3.Connection) -> int:
    """Index the oldest ``FOLD_ROWS`` of the tail, however long it is; returns how many.

    Runs inside a write transaction.
    """
    return catch_up(conn, FOLD_ROWS)


def folded_mark(conn: sqlite3.Connection, room: Callable[[], bool]) -> int:
    """``upto`` once a long tail was folded in (when ``room()`` says the disk has room).

    What a lease does first: one statement when the tail is short (the usual case), and
    ``room`` (a statvfs) asked only when a fold is due. It folds ``FOLD_ROWS``: the next
    leases and polls fold the rest.
    """
    mark, top = marks(conn)
    if top - mark > TAIL_ROWS and room() and catch_up(conn, FOLD_ROWS):
        return upto(conn)
    return mark


def rows(
    conn: sqlite3.Connection,
    dest: int,
    window: tuple[int, float, float],
    limit: int,
    mark: int,
    after: int = 0,
) -> list[Row]:
    """``dest``'s first ``limit`` messages that are ready; ``mark`` is ``upto(conn)``.

    ``window`` is ``(top, now, horizon)``: ids up to ``top``, and ready means no
    ``not_before`` of its own, or one that has come by ``now`` (or lies beyond ``horizon``:
    a clock that jumped back). ``(id, size, attempts, enqueued_at)``, oldest first; the
    cost is what is read of ``dest`` (and the tail), whatever other destinations hold.
    Only ids after ``after`` are read.
    """
    return [
        (int(i), int(s), int(a), float(t))
        for i, s, a, t in _read(conn, False, dest, window, limit, mark, after)
    ]


def rows_with_bodies(
    conn: sqlite3.Connection,
    dest: int,
    window: tuple[int, float, float],
    limit: int,
    mark: int,
    after: int = 0,
) -> list[BodyRow]:
    """What ``rows`` reads, with each message's body instead of its enqueue time.

    The rows as SQLite gives them (a lease converts only those it takes, see
    ``leases._pick``): the id is an integer (the rowid), the rest is as stored.
    """
    found: list[BodyRow] = _read(conn, True, dest, window, limit, mark, after)
    return found


def _read(
    conn: sqlite3.Connection,
    bodies: bool,
    dest: int,
    window: tuple[int, float, float],
    limit: int,
    mark: int,
    after: int,
) -> list[Any]:
    top, now, horizon = window
    indexed_up_to = min(top, mark)
    # Nothing indexed lies after ``after``: one statement instead of two (a queue whose
    # flusher keeps up reads its whole backlog from the tail).
    found: list[Any] = (
        conn.execute(
            _INDEXED_BODIES if bodies else _INDEXED_ROWS,
            (dest, after, indexed_up_to, now, horizon, limit),
        ).fetchall()
        if after < indexed_up_to
        else []
    )
    if len(found) < limit and top > mark:
        found.extend(
            conn.execute(
                _TAIL_BODIES if bodies else _TAIL_ROWS,
                (max(mark, after), top, dest, now, horizon, limit - len(found)),
            ).fetchall()
        )
    return found


def count(conn: sqlite3.Connection, dest: int | None, top: int) -> int:
    """How many messages (of ``dest``, or of all) there are up to id ``top``, in one read.

    Counted on the index (entries of a few bytes, not rows with their bodies) plus the tail.
    """
    if dest is not None:
        return int(conn.execute(_COUNT, (dest, top, top, dest)).fetchone()[0])
    with snapshot(conn):
        # Up to the newest message (what drain and flush ask): the whole index counts.
        newest = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
        if newest is not None and top >= newest:
            return int(conn.execute(_COUNT_EVERY, (top,)).fetchone()[0])
        return int(conn.execute(_COUNT_ALL, (top, top)).fetchone()[0])


def holds_others(conn: sqlite3.Connection, dests: tuple[int, ...]) -> bool:
    """Whether a message of a destination not in ``dests`` exists, in one read.

    The index's destinations one seek each, in order (never a walk of the backlog of
    ``dests``, nor a trust in the destinations table), then at most ``TAIL_LOOK`` rows of
    the tail after ``upto``. A longer tail (a burst no lease or poll has folded yet) is not
    read through: the answer is then True, which makes the caller treat other
    destinations as present (the safe side for the flusher, which then keeps delivering
    beside a flush).
    """
    among = ",".join("?" * len(dests))
    ours = set(dests)
    with snapshot(conn):
        mark = upto(conn)
        found = conn.execute("SELECT min(dest) FROM dest_ids").fetchone()[0]
        while found is not None:
            if found not in ours:
                return True
            found = conn.execute(
                "SELECT min(dest) FROM dest_ids WHERE dest > ?", (found,)
            ).fetchone()[0]
        many, others = conn.execute(
            f"SELECT count(*) > ?, total(t.dest NOT IN ({among})) FROM "
            "(SELECT dest FROM messages WHERE id > ? ORDER BY id LIMIT ?) t",
            (TAIL_LOOK, *dests, mark, TAIL_LOOK + 1),
        ).fetchone()
    return bool(many) or others > 0


@contextlib.contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction around the block (unless the caller is in one already), so that
    the index, its tail and ``upto`` are read from one state of the file."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")
