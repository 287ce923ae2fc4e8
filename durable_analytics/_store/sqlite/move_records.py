"""The record of a move, shared by the moves of spools and of journals.

A move of a spool's rows or of a journal file's records into the queue commits, in one
transaction of the queue file, the messages and the record of how far it went (``RECORD``
+ the source's name, in the ``counters`` table: the id of the last row moved, or the offset
after the last record). This module holds that transaction and what it reads.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .dead_letters import ROW_OVERHEAD, used_bytes
from .schema import INSERT, destination_in

if TYPE_CHECKING:
    from .queue import SqliteQueue

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "RECORD",
    "RECORD_SET",
    "commit_chunk",
    "insert_moved",
    "owner_gone",
    "record_of",
    "room_for",
]

#: The prefix of a spool's record in the queue's ``counters`` table (a journal file's too).
RECORD = "spool:"
#: Sets a record (inside the move's transaction).
RECORD_SET = (
    "INSERT INTO counters (name, value) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)


def insert_moved(
    conn: sqlite3.Connection, rows: list[Any], known: dict[tuple[str, str], int]
) -> None:
    """Insert moved rows ``(_, host, write_key, body, size, enqueued_at)`` into the queue
    (inside the move's transaction); ``known`` gets the destinations met."""
    batch = []
    for _, host, write_key, body, size, when in rows:
        key = (str(host), str(write_key))
        dest = known.get(key)
        if dest is None:
            dest = known[key] = destination_in(conn, *key)
        batch.append((dest, body, size, when))
    conn.executemany(INSERT, batch)


def commit_chunk(
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
    if not room_for(conn, queue, rows):
        return None
    insert_moved(conn, rows, known)
    conn.execute(RECORD_SET, (record, rows[-1][0]))
    return True


def record_of(conn: sqlite3.Connection, name: str) -> tuple[int] | None:
    """The record of the spool ``name``'s moves (the id of the last row moved), if any."""
    row: tuple[int] | None = conn.execute(
        "SELECT value FROM counters WHERE name = ?", (name,)
    ).fetchone()
    return row


def room_for(conn: sqlite3.Connection, queue: SqliteQueue, rows: list[Any]) -> bool:
    """Whether a chunk fits under the queue's ``max_queue_bytes`` (inside the move's
    transaction). A chunk that does not waits in its spool, counted as pending, until
    deliveries make room: every spooling process may hold spooled messages, so the margin
    the appends keep does not bound what all of them move in at once."""
    used = used_bytes(conn, queue._appender._page_size())
    return used + sum(int(r[4]) + ROW_OVERHEAD for r in rows) <= queue._appender.max_queue_bytes


def owner_gone(lock_path: Path) -> int:
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
