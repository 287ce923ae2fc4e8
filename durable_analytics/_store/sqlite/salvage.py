"""Salvage: copy what can still be read from a damaged queue file into a fresh one.

Rows are read through SQLite where it can, and straight from the B-tree pages (with the
committed frames of the -wal laid over them) where it cannot. The one entry point is
``salvage_into``; recovery (``recovery.py``) decides when and where.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SQLITE_CORRUPT, SQLITE_NOTADB, errorcode
from .probe import deadline_handler, ro_uri
from .rawpages import RawPages, decode_record

__all__ = ["SalvageCounts", "SinkFailed", "salvage_into"]

#: Root pages of the version-1 tables in a file this module created (no autovacuum, so
#: they never move): the raw reader's fallback when sqlite_master itself is unreadable.
_DEFAULT_ROOTS = {"destinations": 2, "messages": 4, "leases": 5, "dead_letters": 7, "counters": 8}


class SinkFailed(Exception):
    """Internal: writing the fresh file failed during a salvage (not a damaged source row)."""


@dataclass(frozen=True)
class SalvageCounts:
    """What a salvage copied and what it had to leave behind."""

    messages: int
    dead_letters: int
    unreadable: int
    unroutable: int


def salvage_into(
    source: Path,
    dst: sqlite3.Connection,
    deadline: float,
    *,
    known_destinations: dict[tuple[str, str], int],
    main_only: bool,
) -> SalvageCounts:
    """Copy what ``source`` still holds into ``dst`` (a fresh queue, in its transaction).

    Destinations in ``known_destinations`` keep their ids (this process holds them).
    ``main_only``: ignore the -wal (it belongs to another database). Raises ``SinkFailed``
    when writing to ``dst`` failed; stops with what it has at ``deadline``.
    """
    salvage = _Salvage(source, dst, deadline)
    salvage.add_known_destinations(known_destinations)
    salvage.run(main_only=main_only)
    return SalvageCounts(
        salvage.messages, salvage.dead_letters, salvage.unreadable, salvage.unroutable
    )


_MESSAGE_COLS = "id, dest, body, size, enqueued_at, attempts, not_before"
_DEAD_COLS = "id, dest, body, size, enqueued_at, dead_at, attempts, status, reason, excerpt"
_DEST_COLS = "id, host, write_key, last_error, last_error_at"
_LEASE_COLS = (
    "token, dest, ids, count, boot, pidns, pid, pstart, mono_expires, wall_expires, created_at"
)


def _as_float(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else default


def _as_int(value: Any, default: int) -> int:
    return value if isinstance(value, int) else default


class _Salvage:
    """Copies what can be read from a damaged queue file into a fresh one.

    Rows are read through SQLite (read-only, by rowid ranges, stepping over what cannot be
    read) and, when SQLite cannot read the file's schema at all, straight from the pages.
    Every message must still be a JSON object to be queued again; one that is not becomes a
    dead letter (it would only be rejected by the server). Ids are kept, so leases held by
    this process still fence their messages.
    """

    def __init__(self, src: Path, dst: sqlite3.Connection, deadline: float) -> None:
        self.src = src
        self.dst = dst
        self.deadline = deadline
        self.dest_map: dict[int, int] = {}
        self.messages = 0
        self.dead_letters = 0
        self.unreadable = 0
        self.unroutable = 0
        self.invalid_ids: set[int] = set()

    # ---------------------------------------------------------------- destinations

    def add_known_destinations(self, known: dict[tuple[str, str], int]) -> None:
        """Destinations this process already uses keep their ids (callers hold them)."""
        for (host, key), dest_id in sorted(known.items(), key=lambda kv: kv[1]):
            self.dst.execute(
                "INSERT OR IGNORE INTO destinations (id, host, write_key) VALUES (?, ?, ?)",
                (dest_id, host, key),
            )

    def _destination(self, row: Sequence[Any]) -> None:
        old, host, key = row[0], row[1], row[2]
        if not isinstance(old, int) or not isinstance(host, str) or not isinstance(key, str):
            self.unreadable += 1
            return
        found = self.dst.execute(
            "SELECT id FROM destinations WHERE host = ? AND write_key = ?", (host, key)
        ).fetchone()
        if found is not None:
            self.dest_map[old] = int(found[0])
            return
        last_error = row[3] if isinstance(row[3], str) else None
        last_at = row[4] if isinstance(row[4], (int, float)) else None
        taken = self.dst.execute("SELECT 1 FROM destinations WHERE id = ?", (old,)).fetchone()
        cur = self.dst.execute(
            "INSERT INTO destinations (id, host, write_key, last_error, last_error_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (None if taken else old, host, key, last_error, last_at),
        )
        self.dest_map[old] = int(cur.lastrowid or 0)

    def _dest_of(self, value: Any) -> int | None:
        if not isinstance(value, int):
            return None
        mapped = self.dest_map.get(value)
        if mapped is None:
            known = self.dst.execute("SELECT 1 FROM destinations WHERE id = ?", (value,))
            if known.fetchone() is not None:
                self.dest_map[value] = mapped = value
        return mapped

    # ---------------------------------------------------------------- rows

    def _body(self, value: Any) -> tuple[bytes | None, bool]:
        """``(body, valid)``: the stored bytes, and whether they are still a JSON object."""
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogatepass")
        if not isinstance(value, bytes):
            return None, False
        try:
            return value, isinstance(json.loads(value), dict)
        except ValueError:
            return value, False

    def _message(self, row: Sequence[Any], *, keep_id: bool = True) -> None:
        row_id = row[0]
        dest = self._dest_of(row[1])
        body, valid = self._body(row[2])
        if not isinstance(row_id, int) or body is None:
            self.unreadable += 1
            return
        if dest is None:
            self.unroutable += 1
            return
        enqueued = _as_float(row[4], time.time())
        attempts = max(0, _as_int(row[5], 0))
        if not valid:
            if row_id in self.invalid_ids:
                return
            self.invalid_ids.add(row_id)
            self.dst.execute(
                "INSERT INTO dead_letters (dest, body, size, enqueued_at, dead_at, attempts, "
                "status, reason, excerpt) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, '')",
                (
                    dest,
                    body,
                    len(body),
                    enqueued,
                    time.time(),
                    attempts,
                    "salvaged from a damaged queue file: the stored message is not valid JSON",
                ),
            )
            self.dead_letters += 1
            return
        not_before = row[6] if isinstance(row[6], (int, float)) else None
        cur = self.dst.execute(
            "INSERT OR IGNORE INTO messages (id, dest, body, size, enqueued_at, attempts, "
            "not_before) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (row_id if keep_id else None, dest, body, len(body), enqueued, attempts, not_before),
        )
        self.messages += cur.rowcount

    def _dead_letter(self, row: Sequence[Any]) -> None:
        dest = self._dest_of(row[1])
        body, _ = self._body(row[2])
        if body is None:
            self.unreadable += 1
            return
        if dest is None:
            self.unroutable += 1
            return
        now = time.time()
        cur = self.dst.execute(
            "INSERT OR IGNORE INTO dead_letters (id, dest, body, size, enqueued_at, dead_at, "
            "attempts, status, reason, excerpt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row[0] if isinstance(row[0], int) else None,
                dest,
                body,
                len(body),
                _as_float(row[4], now),
                _as_float(row[5], now),
                max(0, _as_int(row[6], 0)),
                row[7] if isinstance(row[7], int) else None,
                row[8] if isinstance(row[8], str) else "",
                row[9] if isinstance(row[9], str) else "",
            ),
        )
        self.dead_letters += cur.rowcount

    def _lease(self, row: Sequence[Any]) -> None:
        token, dest, ids = row[0], self._dest_of(row[1]), row[2]
        if not isinstance(token, str) or not isinstance(ids, str) or dest is None:
            return
        numbers = (row[3], row[5], row[6], row[7])
        times = (row[8], row[9], row[10])
        if not all(isinstance(v, int) for v in numbers) or not isinstance(row[4], str):
            return
        if not all(isinstance(v, (int, float)) for v in times):
            return
        self.dst.execute(
            f"INSERT OR IGNORE INTO leases ({_LEASE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (token, dest, ids, *row[3:]),
        )

    def _counter(self, name: Any, value: Any) -> None:
        if isinstance(name, str) and isinstance(value, int) and name != "":
            self.dst.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (name, value),
            )

    # ---------------------------------------------------------------- reading

    def run(self, *, main_only: bool) -> None:
        """Salvage everything: through SQLite if it can read the schema, else raw pages."""
        try:
            src = sqlite3.connect(ro_uri(self.src, main_only=main_only), uri=True)
        except sqlite3.Error:
            self._run_raw(use_wal=not main_only)
            return
        try:
            src.set_progress_handler(deadline_handler(self.deadline), 10_000)
            try:
                tables = {
                    str(name)
                    for (name,) in src.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table'"
                    ).fetchall()
                }
            except sqlite3.DatabaseError:
                tables = set()
            if "messages" not in tables or "destinations" not in tables:
                self._run_raw(use_wal=not main_only)
                return
            self._scan(src, "destinations", _DEST_COLS, self._destination)
            before = self.unreadable
            self._scan(src, "messages", _MESSAGE_COLS, self._message)
            if "dead_letters" in tables:
                self._scan(src, "dead_letters", _DEAD_COLS, self._dead_letter)
            if self.unreadable > before:
                roots: dict[str, int] = {}
                with contextlib.suppress(sqlite3.DatabaseError):
                    for name, root in src.execute("SELECT name, rootpage FROM sqlite_master"):
                        if isinstance(name, str) and isinstance(root, int) and root > 0:
                            roots[name] = root
                self.lost_and_found(use_wal=not main_only, roots=roots)
            if "leases" in tables:
                self._scan(src, "leases", _LEASE_COLS, self._lease, rowid="rowid")
            if "counters" in tables:
                with contextlib.suppress(sqlite3.DatabaseError):
                    for name, value in src.execute("SELECT name, value FROM counters"):
                        self._counter(name, value)
        finally:
            src.close()

    def _scan(
        self,
        src: sqlite3.Connection,
        table: str,
        cols: str,
        sink: Callable[[Sequence[Any]], None],
        *,
        rowid: str = "id",
    ) -> None:
        """Read ``table`` in rowid order, stepping over rows and pages that cannot be read."""
        sql = f"SELECT {rowid}, {cols} FROM {table} WHERE {rowid} > ? ORDER BY {rowid}"
        last = -(1 << 63)
        while time.monotonic() < self.deadline:
            try:
                cursor = src.execute(sql, (last,))
                while True:
                    row = cursor.fetchone()
                    if row is None:
                        return
                    last = int(row[0])
                    try:
                        sink(row[1:])
                    except sqlite3.Error as exc:
                        raise SinkFailed(exc) from exc  # the fresh file's error, not the source's
            except sqlite3.DatabaseError as exc:
                if errorcode(exc) not in (SQLITE_CORRUPT, SQLITE_NOTADB, 0):
                    return  # interrupted (deadline) or an I/O error: stop here
                self.unreadable += 1
                after = self._next_readable(src, sql, last)
                if after is None:
                    return
                last = after

    def _next_readable(self, src: sqlite3.Connection, sql: str, last: int) -> int | None:
        """The smallest ``x > last`` from which ``sql`` can read again (None: nothing left)."""

        def readable(x: int) -> bool:
            try:
                src.execute(sql + " LIMIT 1", (x,)).fetchall()
            except sqlite3.DatabaseError:
                return False
            return True

        bad, step = last, 1
        good = None
        while bad + step < (1 << 62) and time.monotonic() < self.deadline:
            if readable(bad + step):
                good = bad + step
                break
            bad += step
            step *= 2
        if good is None:
            return None
        while good - bad > 1 and time.monotonic() < self.deadline:
            mid = (bad + good) // 2
            if readable(mid):
                good = mid
            else:
                bad = mid
        return good

    def _run_raw(self, *, use_wal: bool) -> None:
        pages = RawPages(self.src, use_wal=use_wal)
        try:
            roots = self._raw_roots(pages)
            readers: list[tuple[str, int, Callable[[Sequence[Any]], None]]] = [
                ("destinations", 7, lambda r: self._destination((r[0], r[1], r[2], r[5], r[6]))),
                ("messages", 7, self._message),
                ("dead_letters", 10, self._dead_letter),
                ("leases", 11, self._lease),
            ]
            for table, width, sink in readers:
                for rowid, payload in pages.walk(roots.get(table, 0), self.deadline):
                    record = None if payload is None else decode_record(payload)
                    if record is None or len(record) != width:
                        self.unreadable += 1
                        continue
                    if table != "leases":
                        record[0] = rowid  # INTEGER PRIMARY KEY: the rowid is the id
                    sink(record)
            for _, payload in pages.walk(roots.get("counters", 0), self.deadline):
                record = None if payload is None else decode_record(payload)
                if record is not None and len(record) == 2:
                    self._counter(record[0], record[1])
            self._lost_and_found(pages, roots)
        finally:
            pages.close()

    def _raw_roots(self, pages: RawPages) -> dict[str, int]:
        """Root page of every table and index, from sqlite_master read raw, else the defaults."""
        roots = dict(_DEFAULT_ROOTS)
        for _, payload in pages.walk(1, self.deadline):
            record = None if payload is None else decode_record(payload)
            if (
                record
                and len(record) >= 4
                and record[0] in ("table", "index")
                and isinstance(record[1], str)
                and isinstance(record[3], int)
                and record[3] > 0
            ):
                roots[record[1]] = record[3]
        return roots

    def lost_and_found(self, *, use_wal: bool, roots: dict[str, int]) -> None:
        """After SQLite met damaged pages: look for the rows their b-trees no longer reach."""
        try:
            pages = RawPages(self.src, use_wal=use_wal)
        except OSError:
            return
        try:
            self._lost_and_found(pages, roots or self._raw_roots(pages))
        finally:
            pages.close()

    def _lost_and_found(self, pages: RawPages, roots: dict[str, int]) -> None:
        """Read message and dead-letter rows from table leaf pages no b-tree reaches.

        A damaged interior page cuts its whole subtree off; its leaves are still on disk.
        Every page that is free (on the free list: it may hold rows acked long ago) or that
        belongs to another table or index is skipped; rows already salvaged are not copied
        twice (ids are kept).
        """
        exclude = pages.freelist() | {1}
        for name, root in roots.items():
            if name not in ("messages", "dead_letters"):
                for _ in pages.walk(root, self.deadline, exclude):
                    pass
        for number in range(2, pages.page_count + 1):
            if number in exclude or time.monotonic() > self.deadline:
                continue
            page = pages.page(number)
            if page is None or page[0] != 13:  # a table leaf
                continue
            for rowid, payload in pages.cells(number)[1]:
                record = None if payload is None else decode_record(payload)
                if record is None or rowid is None or rowid in self.invalid_ids:
                    continue
                record[0] = rowid
                if len(record) == 7 and isinstance(record[2], bytes):
                    self._message(record)
                elif len(record) == 10 and isinstance(record[2], bytes):
                    self._dead_letter(record)


# ------------------------------------------------------------------ recovery helpers
