"""Damaged queue files: detection, a raw page reader, salvage, and moving a bad file aside.

Used by ``_queue.Queue(recover=True)``: when a queue file is damaged, truncated or not a
database, what can still be read is salvaged into a fresh queue at the same path and the bad
file is kept beside it as ``<name>.corrupt-<UTC time>``. Nothing here opens the live queue
for writing; the queue module does that.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .exceptions import (
    QueueBusy,
    QueueDiskFull,
    QueueError,
)

__all__ = ["RecoveryReport"]

_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26


def _errorcode(exc: sqlite3.Error) -> int:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return _SQLITE_BUSY
    if "disk is full" in text or "database or disk is full" in text:
        return _SQLITE_FULL
    if "not a database" in text:
        return _SQLITE_NOTADB
    if "malformed" in text or "corrupt" in text:
        return _SQLITE_CORRUPT
    if "readonly" in text or "read-only" in text:
        return _SQLITE_READONLY
    return 0


# --------------------------------------------------------------------------- damaged files
#
# A queue file can be damaged by a disk error, a truncating copy, a stray edit, or a -wal
# file that belongs to another database. ``Queue(path, recover=True)`` (what the Client
# uses) then moves the bad file and its -wal and -shm aside as ``<name>.corrupt-<UTC time>``
# (0600), salvages every message row it can still read into a fresh queue, and goes on;
# ``recover=False`` (the CLI's default) raises QueueCorrupt and leaves the files untouched.
#
# Detection is cheap at open: the 100-byte header is read raw and checked, and a read-only
# connection compares the database as SQLite sees it through its -wal with the main file's
# own header (a -wal carrying another file's application_id is foreign). PRAGMA quick_check
# (which reads the whole file) runs only when the header looks wrong or an operation
# raised SQLITE_CORRUPT / SQLITE_NOTADB.

_SQLITE_MAGIC = b"SQLite format 3\x00"
_WAL_MAGICS = (0x377F0682, 0x377F0683)
#: How long one salvage may take before it stops with what it has (no hang on a huge file).
_SALVAGE_SECONDS = 120.0
#: How long recovery waits for another process's recovery of the same directory.
_RECOVER_LOCK_SECONDS = _SALVAGE_SECONDS + 60.0
#: Root pages of the version-1 tables in a file this module created (no autovacuum, so
#: they never move): the raw reader's fallback when sqlite_master itself is unreadable.
_DEFAULT_ROOTS = {"destinations": 2, "messages": 4, "leases": 5, "dead_letters": 7, "counters": 8}
_PURGED_COUNTER = "dead_letters_purged"

log = logging.getLogger("durable_analytics")


class _SinkFailed(Exception):
    """Internal: writing the fresh file failed during a salvage (not a damaged source row)."""


class _Damaged(Exception):
    """Internal: the file is damaged (and ours); ``main_only`` when its -wal is foreign."""

    def __init__(self, reason: str, *, main_only: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.main_only = main_only


@dataclass(frozen=True)
class RecoveryReport:
    """What ``Queue(recover=True)`` did with a damaged queue file (``Queue.last_recovery``)."""

    #: Where the damaged file went (its -wal and -shm, if any, got the same name + suffix).
    moved_to: Path
    #: Why the file was judged damaged.
    reason: str
    #: Pending messages copied into the fresh queue.
    messages: int
    #: Dead letters copied, including messages whose stored body was no longer valid JSON.
    dead_letters: int
    #: Rows or regions that could not be read (left in the moved file).
    unreadable: int
    #: Messages whose destination (host + write key) could not be read: left in the file.
    unroutable: int
    seconds: float


@dataclass(frozen=True)
class _Probe:
    """What the raw bytes of a queue file say, before SQLite reads it."""

    size: int
    wal_size: int
    notadb: str  # why it cannot be an SQLite file ("" when it can)
    suspicious: str  # why a full check is needed ("" when the header is consistent)
    page_size: int
    user_version: int
    app_id: int


def _u16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 2], "big")


def _u32(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "big")


def _header_page_size(header: bytes) -> int:
    raw = _u16(header, 16)
    size = 65536 if raw == 1 else raw
    return size if 512 <= size <= 65536 and size & (size - 1) == 0 else 0


#: Held while this process reads a database file other than through SQLite, and while it
#: opens a connection. Closing any descriptor of a file drops every POSIX lock this process
#: holds on it, SQLite's included (SQLite guards only its own descriptors against that): a
#: raw read is made only while no connection of this process is open on the file (see
#: Queue._raw_allowed), and none may open meanwhile. Other processes' locks are not affected.
_RAW_LOCK = threading.RLock()


def _read_header(path: Path | str) -> tuple[int, bytes]:
    """``(size, first 100 bytes)`` of a file no connection of this process uses."""
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size, f.read(100)


def _probe(path: Path, *, raw: bool) -> _Probe:
    """The sizes of the file and its -wal and, with ``raw`` (the caller holds _RAW_LOCK and
    no connection of this process is open on the file), what its raw header says; else
    only what SQLite itself will find is known."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return _Probe(0, 0, "", "", 0, 0, 0)
    try:
        wal_size = os.stat(f"{path}-wal").st_size
    except OSError:
        wal_size = 0
    if not raw:
        return _Probe(size, wal_size, "", "", 0, 0, 0)
    try:
        size, header = _read_header(path)
    except FileNotFoundError:
        return _Probe(0, 0, "", "", 0, 0, 0)
    return _probe_header(size, wal_size, header)


def _probe_header(size: int, wal_size: int, header: bytes) -> _Probe:
    if size == 0:
        return _Probe(0, wal_size, "", "", 0, 0, 0)
    if size < 100:
        return _Probe(size, wal_size, f"it is only {size} bytes long", "", 0, 0, 0)
    if header[:16] != _SQLITE_MAGIC:
        return _Probe(size, wal_size, "its header is not an SQLite header", "", 0, 0, 0)
    page_size = _header_page_size(header)
    if not page_size:
        return _Probe(size, wal_size, "its header names no valid page size", "", 0, 0, 0)
    user_version, app_id = _u32(header, 60), _u32(header, 68)
    reasons = []
    if size % page_size:
        reasons.append(f"its size {size} is not a multiple of its page size {page_size}")
    pages = max(1, size // page_size)
    if _u32(header, 92) == _u32(header, 24) and _u32(header, 28) > pages:
        reasons.append("its header counts more pages than the file holds")
    if header[18] not in (1, 2) or header[19] not in (1, 2):
        reasons.append("its header names an unknown file format version")
    if header[20] != 0 or header[21:24] != b"\x40\x20\x20":
        reasons.append("its header has unexpected page layout fields")
    if _u32(header, 32) > pages or _u32(header, 36) > pages:
        reasons.append("its header's free-page list points outside the file")
    if not 1 <= _u32(header, 44) <= 4 or _u32(header, 56) not in (0, 1, 2, 3):
        reasons.append("its header has an unknown schema format or text encoding")
    return _Probe(size, wal_size, "", "; ".join(reasons), page_size, user_version, app_id)


_FOREIGN_WAL = (
    "its -wal file belongs to another database (the database it describes is not this file's)"
)


def _ro_uri(path: Path, *, main_only: bool = False) -> str:
    quoted = urllib.parse.quote(str(path))
    return f"file:{quoted}?mode=ro" + ("&immutable=1" if main_only else "")


def _deadline_handler(deadline: float) -> Callable[[], int]:
    return lambda: 1 if time.monotonic() > deadline else 0


def _summary(rows: list[Any], limit: int = 3) -> str:
    lines = [str(r[0]).replace("\n", "; ") for r in rows[:limit]]
    text = "; ".join(lines).removeprefix("*** in database main ***; ")
    return text if len(text) <= 200 else text[:199] + "…"


# ------------------------------------------------------------------ the raw page reader


def _varint(b: bytes, i: int) -> tuple[int, int]:
    value = 0
    for k in range(8):
        byte = b[i + k]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, i + k + 1
    return (value << 8) | b[i + 8], i + 9


def _wal_checksum(data: bytes, s0: int, s1: int, big: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big else '<'}{len(data) // 4}I", data)
    for k in range(0, len(words), 2):
        s0 = (s0 + words[k] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[k + 1] + s0) & 0xFFFFFFFF
    return s0, s1


class _RawPages:
    """Pages of a damaged database read straight from its bytes, with the committed frames
    of its -wal laid over them (checksums verified), for when SQLite cannot read the file."""

    def __init__(self, path: Path, *, use_wal: bool) -> None:
        self._main = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._size = os.fstat(self._main.fileno()).st_size
        self._wal: Any = None
        self.frames: dict[int, int] = {}
        header = self._main.read(100)
        self.page_size = _header_page_size(header) if header[:16] == _SQLITE_MAGIC else 0
        if use_wal:
            self._read_wal(Path(f"{path}-wal"))
        if not self.page_size:
            self.page_size = self._guess_page_size()
        self.usable = self.page_size  # files of this module reserve no bytes per page

    def close(self) -> None:
        self._main.close()
        if self._wal is not None:
            self._wal.close()

    def _guess_page_size(self) -> int:
        for size in (4096, 1024, 2048, 8192, 16384, 32768, 65536, 512):
            self.page_size = size
            first, second = self.page(1), self.page(2)
            if first and second and first[100] in (5, 13) and second[0] in (2, 5, 10, 13):
                return size
        return 4096

    def _read_wal(self, wal_path: Path) -> None:
        try:
            wal = open(wal_path, "rb")  # noqa: SIM115 - kept open while pages are read
        except OSError:
            return
        header = wal.read(32)
        if len(header) < 32 or _u32(header, 0) not in _WAL_MAGICS:
            wal.close()
            return
        big = bool(_u32(header, 0) & 1)
        page_size = _u32(header, 8)
        if self.page_size and page_size != self.page_size:
            wal.close()
            return
        if not (512 <= page_size <= 65536 and page_size & (page_size - 1) == 0):
            wal.close()
            return
        s0, s1 = _wal_checksum(header[:24], 0, 0, big)
        if (s0, s1) != (_u32(header, 24), _u32(header, 28)):
            wal.close()
            return
        salts = header[16:24]
        pending: dict[int, int] = {}
        offset = 32
        while True:
            frame = wal.read(24 + page_size)
            if len(frame) < 24 + page_size or frame[8:16] != salts:
                break
            s0, s1 = _wal_checksum(frame[:8], s0, s1, big)
            s0, s1 = _wal_checksum(frame[24:], s0, s1, big)
            if (s0, s1) != (_u32(frame, 16), _u32(frame, 20)):
                break
            pending[_u32(frame, 0)] = offset + 24
            if _u32(frame, 4):  # a commit frame: everything up to here is committed
                self.frames.update(pending)
                pending = {}
            offset += 24 + page_size
        if self.frames:
            self._wal = wal
            self.page_size = page_size
        else:
            wal.close()

    def page(self, number: int) -> bytes | None:
        size = self.page_size
        if number < 1:
            return None
        offset = self.frames.get(number)
        if offset is not None:
            self._wal.seek(offset)
            data: bytes = self._wal.read(size)
        else:
            start = (number - 1) * size
            if start + size > self._size:
                return None
            self._main.seek(start)
            data = self._main.read(size)
        return data if len(data) == size else None

    def _payload(self, page: bytes, i: int, total: int, index: bool) -> bytes | None:
        usable = self.usable
        most = usable - 35 if not index else (usable - 12) * 64 // 255 - 23
        if total <= most:
            end = i + total
            return page[i:end] if end <= usable else None
        least = (usable - 12) * 32 // 255 - 23
        local = least + (total - least) % (usable - 4)
        if local > most:
            local = least
        if i + local + 4 > usable:
            return None
        out = bytearray(page[i : i + local])
        nxt = _u32(page, i + local)
        seen: set[int] = set()
        while len(out) < total:
            if nxt in seen:
                return None
            seen.add(nxt)
            overflow = self.page(nxt)
            if overflow is None:
                return None
            nxt = _u32(overflow, 0)
            out += overflow[4:usable]
        return bytes(out[:total])

    @property
    def page_count(self) -> int:
        in_main = self._size // self.page_size if self.page_size else 0
        return max([in_main, *self.frames])

    def freelist(self) -> set[int]:
        """The free pages (trunks and leaves) named by page 1's header, as far as readable."""
        first = self.page(1)
        free: set[int] = set()
        if first is None or first[:16] != _SQLITE_MAGIC:
            return free
        trunk = _u32(first, 32)
        while trunk and trunk not in free and len(free) <= self.page_count:
            free.add(trunk)
            page = self.page(trunk)
            if page is None:
                break
            count = _u32(page, 4)
            if 8 + 4 * count > self.usable:
                break
            free.update(_u32(page, 8 + 4 * k) for k in range(count))
            trunk = _u32(page, 0)
        return free

    def cells(self, number: int) -> tuple[list[int], list[tuple[int | None, bytes | None]]]:
        """The child pages and the ``(rowid, payload)`` cells of one b-tree page.

        ``rowid`` is None in index (and WITHOUT ROWID) trees; a cell that cannot be read is
        ``(None, None)``. A page that is not a b-tree page gives ``([], [(None, None)])``.
        """
        page = self.page(number)
        base = 100 if number == 1 else 0
        if page is None or page[base] not in (2, 5, 10, 13):
            return [], [(None, None)]
        kind = page[base]
        interior, index = kind in (2, 5), kind in (2, 10)
        ncells = _u16(page, base + 3)
        pointers = base + (12 if interior else 8)
        if pointers + 2 * ncells > self.usable:
            return [], [(None, None)]
        children: list[int] = []
        out: list[tuple[int | None, bytes | None]] = []
        for k in range(ncells):
            at = _u16(page, pointers + 2 * k)
            rowid: int | None = None
            try:
                if at < pointers or at >= self.usable:
                    raise IndexError(at)
                if interior:
                    children.append(_u32(page, at))
                    if kind == 5:
                        continue  # table interior cells hold only keys
                    at += 4
                total, at = _varint(page, at)
                if not index:
                    rowid, at = _varint(page, at)
                payload = self._payload(page, at, total, index)
            except IndexError:
                payload = None
            out.append((rowid, payload) if payload is not None else (None, None))
        if interior:
            children.append(_u32(page, base + 8))
        return children, out

    def walk(
        self, root: int, deadline: float, visited: set[int] | None = None
    ) -> Iterator[tuple[int | None, bytes | None]]:
        """``(rowid, payload)`` of every cell reachable from ``root``; ``(None, None)`` for
        each page or cell that could not be read (the walk goes on past it). The b-tree
        pages reached are added to ``visited``."""
        stack = [root]
        seen: set[int] = set() if visited is None else visited
        while stack:
            if time.monotonic() > deadline:
                yield None, None
                return
            number = stack.pop()
            if number in seen or number < 1:
                continue
            seen.add(number)
            children, cells = self.cells(number)
            yield from cells
            stack.extend(reversed(children))


def _decode_record(payload: bytes) -> list[Any] | None:
    """The column values of one SQLite record, or None when it does not parse."""
    try:
        header_len, i = _varint(payload, 0)
        types = []
        while i < header_len:
            serial, i = _varint(payload, i)
            types.append(serial)
        pos = header_len
        values: list[Any] = []
        for serial in types:
            if serial == 0:
                values.append(None)
            elif serial <= 6:
                width = (0, 1, 2, 3, 4, 6, 8)[serial]
                if pos + width > len(payload):
                    return None
                values.append(int.from_bytes(payload[pos : pos + width], "big", signed=True))
                pos += width
            elif serial == 7:
                if pos + 8 > len(payload):
                    return None
                values.append(struct.unpack(">d", payload[pos : pos + 8])[0])
                pos += 8
            elif serial in (8, 9):
                values.append(serial - 8)
            elif serial >= 12:
                width = (serial - 12) // 2
                if pos + width > len(payload):
                    return None
                chunk = payload[pos : pos + width]
                values.append(bytes(chunk) if serial % 2 == 0 else chunk.decode("utf-8"))
                pos += width
            else:
                return None
        return values
    except (IndexError, UnicodeDecodeError, struct.error):
        return None


# ------------------------------------------------------------------ salvage

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
            src = sqlite3.connect(_ro_uri(self.src, main_only=main_only), uri=True)
        except sqlite3.Error:
            self._run_raw(use_wal=not main_only)
            return
        try:
            src.set_progress_handler(_deadline_handler(self.deadline), 10_000)
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
                        raise _SinkFailed(exc) from exc  # the fresh file's error, not the source's
            except sqlite3.DatabaseError as exc:
                if _errorcode(exc) not in (_SQLITE_CORRUPT, _SQLITE_NOTADB, 0):
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
        pages = _RawPages(self.src, use_wal=use_wal)
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
                    record = None if payload is None else _decode_record(payload)
                    if record is None or len(record) != width:
                        self.unreadable += 1
                        continue
                    if table != "leases":
                        record[0] = rowid  # INTEGER PRIMARY KEY: the rowid is the id
                    sink(record)
            for _, payload in pages.walk(roots.get("counters", 0), self.deadline):
                record = None if payload is None else _decode_record(payload)
                if record is not None and len(record) == 2:
                    self._counter(record[0], record[1])
            self._lost_and_found(pages, roots)
        finally:
            pages.close()

    def _raw_roots(self, pages: _RawPages) -> dict[str, int]:
        """Root page of every table and index, from sqlite_master read raw, else the defaults."""
        roots = dict(_DEFAULT_ROOTS)
        for _, payload in pages.walk(1, self.deadline):
            record = None if payload is None else _decode_record(payload)
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
            pages = _RawPages(self.src, use_wal=use_wal)
        except OSError:
            return
        try:
            self._lost_and_found(pages, roots or self._raw_roots(pages))
        finally:
            pages.close()

    def _lost_and_found(self, pages: _RawPages, roots: dict[str, int]) -> None:
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
                record = None if payload is None else _decode_record(payload)
                if record is None or rowid is None or rowid in self.invalid_ids:
                    continue
                record[0] = rowid
                if len(record) == 7 and isinstance(record[2], bytes):
                    self._message(record)
                elif len(record) == 10 and isinstance(record[2], bytes):
                    self._dead_letter(record)


# ------------------------------------------------------------------ recovery helpers


def _quarantine_name(path: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    candidate = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while any(os.path.lexists(f"{candidate}{s}") for s in ("", "-wal", "-shm")):
        n += 1
        candidate = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    return candidate


_COPY_SCRIPT = """
import os, shutil, sys
for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        fin = open(src, "rb")
    except FileNotFoundError:
        continue
    with fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fout:
            os.fchmod(fd, 0o600)
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fd)
    print(dst, flush=True)
"""


def _copy_aside(path: Path, moved: Path) -> list[str]:
    """Copy the queue file and its -wal and -shm to ``moved`` (0600); returns the suffixes
    of the -wal / -shm copied.

    The copy runs in a child process: reading the live files here would drop this
    process's locks on them when the descriptors close (see _RAW_LOCK).
    """
    args: list[str] = []
    for suffix in ("", "-wal", "-shm"):
        args += [f"{path}{suffix}", f"{moved}{suffix}"]
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _COPY_SCRIPT, *args],
            capture_output=True,
            text=True,
            timeout=_SALVAGE_SECONDS,
            check=False,
            close_fds=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise QueueError(f"could not copy the damaged queue {path} aside: {exc}") from None
    if proc.returncode != 0 or not os.path.exists(moved):
        detail = (proc.stderr.strip().splitlines() or ["no copy made"])[-1]
        if "No space left" in detail:
            raise QueueDiskFull(
                f"the disk holding the queue {path} is full: its damaged file could not be "
                "copied aside"
            )
        raise QueueError(f"could not copy the damaged queue {path} aside: {detail}")
    copied = set(proc.stdout.split())
    return [s for s in ("-wal", "-shm") if f"{moved}{s}" in copied]


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _directory_lock(directory: Path, timeout: float) -> Iterator[None]:
    """An exclusive flock on the queue's directory: one recovery at a time, across processes."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise QueueBusy(
                        f"another process kept recovering the queue in {directory} for over "
                        f"{timeout:.0f} s"
                    ) from None
                time.sleep(0.02)
            except OSError:
                break  # a file system without flock: go on unserialized
        yield
    finally:
        os.close(fd)
