"""What a queue file's raw bytes say before SQLite reads it, and the verdict types of a check.

A queue file can be damaged by a disk error, a truncating copy, a stray edit, or a -wal
file that belongs to another database. Detection is cheap at open: the 100-byte header is
read raw and checked, and a read-only connection compares the database as SQLite sees it
through its -wal with the main file's own header (a -wal carrying another file's
application_id is foreign). PRAGMA quick_check (which reads the whole file) runs only when
the header looks wrong or an operation raised SQLITE_CORRUPT / SQLITE_NOTADB.

Raw reads must happen only under ``forks.raw_lock()`` while no connection of this
process is open on the file (closing a descriptor drops this process's POSIX locks).
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SQLITE_MAGIC = b"SQLite format 3\x00"
WAL_MAGICS = (0x377F0682, 0x377F0683)
#: How long one salvage may take before it stops with what it has (no hang on a huge file).
SALVAGE_SECONDS = 120.0
#: How long recovery waits for another process's recovery of the same directory.
RECOVER_LOCK_SECONDS = SALVAGE_SECONDS + 60.0


class Damaged(Exception):
    """Internal: the file is damaged (and ours); ``main_only`` when its -wal is foreign."""

    def __init__(self, reason: str, *, main_only: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.main_only = main_only


class NotOurs(Exception):
    """Internal: the file is not an SQLite database at all (never moved nor recovered)."""


@dataclass(frozen=True)
class Probe:
    """What the raw bytes of a queue file say, before SQLite reads it."""

    size: int
    wal_size: int
    notadb: str  # why it cannot be an SQLite file ("" when it can)
    suspicious: str  # why a full check is needed ("" when the header is consistent)
    page_size: int
    user_version: int
    app_id: int


def u16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 2], "big")


def u32(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "big")


def header_page_size(header: bytes) -> int:
    raw = u16(header, 16)
    size = 65536 if raw == 1 else raw
    return size if 512 <= size <= 65536 and size & (size - 1) == 0 else 0


def read_header(path: Path | str) -> tuple[int, bytes]:
    """``(size, first 100 bytes)`` of a file no connection of this process uses."""
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size, f.read(100)


def probe_file(path: Path, *, raw: bool) -> Probe:
    """The sizes of the file and its -wal and, with ``raw`` (the caller holds raw_lock() and
    no connection of this process is open on the file), what its raw header says; else
    only what SQLite itself will find is known."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return Probe(0, 0, "", "", 0, 0, 0)
    try:
        wal_size = os.stat(f"{path}-wal").st_size
    except OSError:
        wal_size = 0
    if not raw:
        return Probe(size, wal_size, "", "", 0, 0, 0)
    try:
        size, header = read_header(path)
    except FileNotFoundError:
        return Probe(0, 0, "", "", 0, 0, 0)
    return probe_header(size, wal_size, header)


def probe_header(size: int, wal_size: int, header: bytes) -> Probe:
    if size == 0:
        return Probe(0, wal_size, "", "", 0, 0, 0)
    if size < 100:
        return Probe(size, wal_size, f"it is only {size} bytes long", "", 0, 0, 0)
    if header[:16] != SQLITE_MAGIC:
        return Probe(size, wal_size, "its header is not an SQLite header", "", 0, 0, 0)
    page_size = header_page_size(header)
    if not page_size:
        return Probe(size, wal_size, "its header names no valid page size", "", 0, 0, 0)
    user_version, app_id = u32(header, 60), u32(header, 68)
    reasons = []
    if size % page_size:
        reasons.append(f"its size {size} is not a multiple of its page size {page_size}")
    pages = max(1, size // page_size)
    if u32(header, 92) == u32(header, 24) and u32(header, 28) > pages:
        reasons.append("its header counts more pages than the file holds")
    if header[18] not in (1, 2) or header[19] not in (1, 2):
        reasons.append("its header names an unknown file format version")
    if header[20] != 0 or header[21:24] != b"\x40\x20\x20":
        reasons.append("its header has unexpected page layout fields")
    if u32(header, 32) > pages or u32(header, 36) > pages:
        reasons.append("its header's free-page list points outside the file")
    if not 1 <= u32(header, 44) <= 4 or u32(header, 56) not in (0, 1, 2, 3):
        reasons.append("its header has an unknown schema format or text encoding")
    return Probe(size, wal_size, "", "; ".join(reasons), page_size, user_version, app_id)


#: Text of the queue's own schema, which SQLite keeps in page 1 (after the 100-byte header).
SCHEMA_MARKS = (b"CREATE TABLE messages (", b"CREATE TABLE leases (")
#: How much of a file's start is searched for them.
HEAD_BYTES = 64 * 1024


def not_a_database(path: Path, size: int) -> str:
    """Why the file cannot be an SQLite database, even a damaged one ("" when it may be).

    Call it under ``forks.raw_lock()`` while no connection of this process is open on the
    file. A queue whose header a crash or a disk error broke must still reach recovery, so
    a file counts as SQLite's when any of this is true (else it is refused untouched):

    - it starts with SQLite's 16-byte header, or is shorter and a prefix of it (truncated);
    - its first 16 bytes are all zero: after a power loss, XFS and ext4 (``data=writeback``,
      delayed allocation) show blocks whose data never reached the disk as zeros;
    - the rest of the header is SQLite's (a valid page size, file format versions 1 or 2,
      the fixed payload fractions 64/32/32): only the magic was damaged (bit flips);
    - page 1 still holds the queue's schema text: the first sector was torn or overwritten;
    - its ``-wal`` starts with a WAL header: SQLite has used the file as a database (a
      recovery's fresh content can sit there before a checkpoint rewrites the header).

    A text file, a configuration file or random bytes match none of these: a mistyped
    ``queue_path`` must never be taken over as a "damaged queue".
    """
    if size == 0:
        return ""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError:
        return ""  # SQLite reports what it cannot read
    if not head:
        return ""
    start = head[:16]
    if SQLITE_MAGIC.startswith(start) or not start.strip(b"\x00"):
        return ""
    if (
        len(head) >= 24
        and header_page_size(head)
        and head[18] in (1, 2)
        and head[19] in (1, 2)
        and head[21:24] == b"\x40\x20\x20"
    ):
        return ""
    if all(mark in head for mark in SCHEMA_MARKS):
        return ""
    try:
        with open(f"{path}-wal", "rb") as f:
            if u32(f.read(4), 0) in WAL_MAGICS:
                return ""
    except OSError:
        pass
    return "it does not start with SQLite's header"


FOREIGN_WAL = (
    "its -wal file belongs to another database (the database it describes is not this file's)"
)


def ro_uri(path: Path, *, main_only: bool = False) -> str:
    quoted = urllib.parse.quote(str(path))
    return f"file:{quoted}?mode=ro" + ("&immutable=1" if main_only else "")


def deadline_handler(deadline: float) -> Callable[[], int]:
    return lambda: 1 if time.monotonic() > deadline else 0


def summary(rows: list[Any], limit: int = 3) -> str:
    lines = [str(r[0]).replace("\n", "; ") for r in rows[:limit]]
    text = "; ".join(lines).removeprefix("*** in database main ***; ")
    return text if len(text) <= 200 else text[:199] + "…"


# ------------------------------------------------------------------ the raw page reader
