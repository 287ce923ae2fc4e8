"""What waits in the spools of a queue's producers, looked at read-only (see ``spool.py``).

``stats()`` and ``pending()`` count spooled messages as pending (``by_destination``, ``count``),
``holds_others()`` looks for another destination's (``holds_others``);
every look covers the producers' journals too (``journal.py``), read from each file's record;
``flush()`` marks where each spool's held-back messages end when it is called (``marks``)
and follows how many of those are still not moved in (``held``), whoever moves them.
Each look opens every spool file read-only, once, as the movers would take them: no
symlink, no spool this process found damaged.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from . import forks
from .journal import LOOK_BYTES, SUFFIX, Entry, open_journal, owner_of, parse, read_at
from .move_records import RECORD, record_of
from .spool import Spools, _names_of

if TYPE_CHECKING:
    from .queue import SqliteQueue

__all__ = [
    "Listed",
    "Spooled",
    "by_destination",
    "count",
    "held",
    "holds_others",
    "list_journals",
    "marks",
]


class Spooled(NamedTuple):
    """What waits in the spools for one destination."""

    messages: int
    bytes: int
    #: The oldest one's ``enqueued_at`` (Unix time), None when there is none.
    oldest: float | None


#: The longest a look waits for one spool file that another connection holds exclusively
#: (less when the caller's deadline is nearer: see ``Waits.bounded``).
LOOK_WAIT = 1.0


class Listed:
    """The journal files of the spool directory, opened before a snapshot of the queue file
    began (``list_journals``): one deleted meanwhile (moved in whole by a mover, perhaps
    after the snapshot) is still read whole. Close it after the look."""

    def __init__(self, fds: dict[str, int]) -> None:
        self.fds = fds

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}

    def __enter__(self) -> Listed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def list_journals(spools: Spools) -> Listed:
    """The journal files now, open, to be read after a snapshot begins (see ``count``);
    a file that cannot be opened is left out."""
    fds: dict[str, int] = {}
    try:
        names = (
            []
            if not spools.dir_trusted()
            else [
                e.name
                for e in os.scandir(spools.dir)
                if e.name.endswith(SUFFIX)
                and owner_of(e.name[: -len(SUFFIX)]) is not None
                and e.is_file(follow_symlinks=False)
                and e.name not in spools.bad
            ]
        )
    except OSError:
        names = []
    try:
        for name in names:
            try:
                fd = open_journal(spools.dir / name)
            except OSError:
                continue
            if fd is not None:
                fds[name] = fd
    except BaseException:
        Listed(fds).close()
        raise
    return Listed(fds)


def count(
    spools: Spools,
    queue: SqliteQueue,
    destination: int | None,
    conn: sqlite3.Connection | None = None,
    listed: Listed | None = None,
) -> int:
    """How many messages (of ``destination``) wait in the journals and spools of every
    process, not moved yet.

    Counted beside a count of the queue file, each message once: ``conn`` is in a read
    transaction (its snapshot gives the records each file is read from) and ``listed`` the
    journal files opened before it began (a file a mover deletes meanwhile is still read:
    its last records may have moved after the snapshot)."""
    in_spools = sum(
        int(rows[0][0])
        for rows in _look(spools, queue, destination, "count(*)", conn=conn).values()
    )
    journaled = _look_journals(spools, queue, destination, conn=conn, listed=listed)
    return in_spools + sum(len(e) for e in journaled.values())


def by_destination(
    spools: Spools,
    queue: SqliteQueue,
    conn: sqlite3.Connection | None = None,
    listed: Listed | None = None,
) -> dict[tuple[str, str], Spooled]:
    """What waits in the journals and spools of every process, not moved yet, by (host,
    write key); ``conn`` and ``listed`` as in ``count``."""
    found = _look(
        spools,
        queue,
        None,
        "d.host, d.write_key, count(*), total(m.size), min(m.enqueued_at)",
        group=True,
        conn=conn,
    )
    out: dict[tuple[str, str], Spooled] = {}
    for entries in _look_journals(spools, queue, None, conn=conn, listed=listed).values():
        for e in entries:
            seen = out.get((e.host, e.write_key), Spooled(0, 0, None))
            out[(e.host, e.write_key)] = Spooled(
                seen.messages + 1,
                seen.bytes + len(e.body),
                e.enqueued_at if seen.oldest is None else min(seen.oldest, e.enqueued_at),
            )
    for rows in found.values():
        for host, key, n, size, oldest in rows:
            seen = out.get((str(host), str(key)), Spooled(0, 0, None))
            times = [t for t in (seen.oldest, oldest) if t is not None]
            out[(str(host), str(key))] = Spooled(
                seen.messages + int(n),
                seen.bytes + int(size),
                float(min(times)) if times else None,
            )
    return out


def holds_others(spools: Spools, queue: SqliteQueue, destinations: tuple[int, ...]) -> bool:
    """Whether the spools of every process hold a message, not moved yet, of a destination
    not among ``destinations``; True too when a spool could not be read (it may)."""
    ours = {_names_of(queue, dest) for dest in destinations}
    unread: dict[str, int] = {}
    journaled = _look_journals(spools, queue, None, unread=unread)
    if unread or any(
        (e.host, e.write_key) not in ours for entries in journaled.values() for e in entries
    ):
        return True
    found = _look(spools, queue, None, "d.host, d.write_key", unread=unread, group=True)
    if unread:
        return True
    return any((str(host), str(key)) not in ours for rows in found.values() for host, key in rows)


def marks(spools: Spools, queue: SqliteQueue, destination: int | None) -> dict[str, int]:
    """By spool file, where what is not moved yet ends at this moment, for ``held`` to
    follow: a spool's newest message (of ``destination``) by id, a journal file's end (its
    records of any destination: ``held`` counts those of ``destination``).

    A journal's end is its size, not its last record read and parsed: ``flush()`` takes
    these marks before it moves every journal in, where that parse would be a second read
    of everything journaled. A record still being written past a mark is not counted."""
    found = _look(spools, queue, destination, "max(m.id)")
    out = {file: int(rows[0][0]) for file, rows in found.items() if rows[0][0] is not None}
    if destination is not None and _names_of(queue, destination) is None:
        return out
    with list_journals(spools) as listed:
        for file, fd in listed.fds.items():
            record = _record(queue, None, RECORD + file[: -len(SUFFIX)])
            after = int(record[0]) if record is not None else 0
            try:
                end = os.fstat(fd).st_size
            except OSError:
                continue
            if after >= 0 and end > after:  # a tombstone (< 0): moved in whole
                out[file] = end
    return out


def held(spools: Spools, queue: SqliteQueue, upto: dict[str, int], destination: int | None) -> int:
    """How many of the messages up to ``upto`` (from ``marks``) are still not moved in."""
    if not upto:
        return 0
    unread: dict[str, int] = {}
    found = _look(spools, queue, destination, "count(*)", upto, unread)
    journaled = _look_journals(spools, queue, destination, upto, unread)
    return (
        sum(int(rows[0][0]) for rows in found.values())
        + sum(len(entries) for entries in journaled.values())
        + sum(unread.values())
    )


def _record(queue: SqliteQueue, conn: sqlite3.Connection | None, name: str) -> tuple[int] | None:
    """A spool's or journal's record: in ``conn``'s snapshot, or read now."""
    if conn is not None:
        return record_of(conn, name)
    return queue._db.read(partial(record_of, name=name))


def _look_journals(
    spools: Spools,
    queue: SqliteQueue,
    destination: int | None,
    upto: dict[str, int] | None = None,
    unread: dict[str, int] | None = None,
    *,
    conn: sqlite3.Connection | None = None,
    listed: Listed | None = None,
) -> dict[str, list[Entry]]:
    """Each journal file's records (of ``destination``) not moved yet, by file name; with
    ``upto``, only in the files it names and up to their offset there; with ``listed``, the
    files it holds open (else those there now); ``conn`` as in ``count``.

    A file that could not be read (or is damaged past its record) is left out; ``unread``
    gets 1 for each such file with something past its record (at least one message)."""
    names = None if destination is None else _names_of(queue, destination)
    if destination is not None and names is None:
        return {}
    if listed is None:
        with list_journals(spools) as listing:
            return _look_journals(
                spools, queue, destination, upto, unread, conn=conn, listed=listing
            )
    files = [f for f in listed.fds if f not in spools.bad and (upto is None or f in upto)]
    found: dict[str, list[Entry]] = {}
    for file in files:
        record = _record(queue, conn, RECORD + file[: -len(SUFFIX)])
        after = int(record[0]) if record is not None else 0
        if after < 0:
            continue  # a tombstone: moved in whole (and deleted after this file was opened)
        top = None if upto is None else upto[file]
        if top is not None and top <= after:
            continue
        try:
            most = LOOK_BYTES if top is None else min(LOOK_BYTES, top - after)
            data = read_at(listed.fds[file], after, most)
        except OSError:
            if unread is not None:
                unread[file] = 1
            continue
        entries, _, damaged = parse(data, after)
        if damaged and unread is not None:
            unread[file] = 1
        found[file] = [e for e in entries if names is None or (e.host, e.write_key) == names]
    return found


def _look(
    spools: Spools,
    queue: SqliteQueue,
    destination: int | None,
    columns: str,
    upto: dict[str, int] | None = None,
    unread: dict[str, int] | None = None,
    *,
    group: bool = False,
    conn: sqlite3.Connection | None = None,
) -> dict[str, list[tuple[Any, ...]]]:
    """``SELECT columns`` over each spool file's messages (of ``destination``) not moved
    yet, its rows by file; with ``upto``, only in the files it names and up to their id
    there; with ``group``, one row per destination (``d`` is the destinations table).

    A file that could not be read is left out; ``unread`` gets, for each, how many ids lie
    between its record and its ``upto`` (at least how many of those messages it holds)."""
    names = None if destination is None else _names_of(queue, destination)
    if destination is not None and names is None:
        return {}
    try:
        files = (
            []
            if not spools.dir_trusted()
            else [
                e.name
                for e in os.scandir(spools.dir)
                if e.name.endswith(".db")
                and e.is_file(follow_symlinks=False)
                and e.name[: -len(".db")] not in spools.bad
                and (upto is None or e.name in upto)
            ]
        )
    except OSError:
        return {}
    sql = f"SELECT {columns} FROM messages m"
    if names is not None:
        sql += " JOIN destinations d ON d.id = m.dest AND d.host = ? AND d.write_key = ?"
    elif group:
        sql += " JOIN destinations d ON d.id = m.dest"
    sql += " WHERE m.id > ? AND m.id <= ?"
    if group:
        sql += " GROUP BY d.host, d.write_key"
    found: dict[str, list[tuple[Any, ...]]] = {}
    # One wait for the whole look, not one per file: past it, a file held exclusively by
    # another connection is left out of the count at once.
    end = time.monotonic() + min(LOOK_WAIT, queue.waits.remaining())
    for file in files:
        record = _record(queue, conn, RECORD + file[: -len(".db")])
        after = int(record[0]) if record is not None else 0
        top = (1 << 62) if upto is None else upto[file]
        uri = (spools.dir / file).as_uri() + "?mode=ro"
        try:
            # Under the lock fork() takes: a child never inherits this connection open.
            with (
                forks.raw_lock(),
                contextlib.closing(
                    sqlite3.connect(uri, uri=True, timeout=max(0.0, end - time.monotonic()))
                ) as spool,
            ):
                found[file] = spool.execute(sql, (*(names or ()), after, top)).fetchall()
        except sqlite3.Error:
            if unread is not None:
                unread[file] = max(0, top - after)
            continue
    return found
