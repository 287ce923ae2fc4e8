"""SQLite's error codes and their translation into the documented ``QueueError`` tree."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

from durable_analytics.exceptions import (
    QueueBusy,
    QueueCorrupt,
    QueueDiskFull,
    QueueError,
    QueuePermissionError,
)

log = logging.getLogger("durable_analytics.queue")

SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_READONLY = 8
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_CANTOPEN = 14
SQLITE_NOTADB = 26


def errorcode(exc: sqlite3.Error) -> int:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return SQLITE_BUSY
    if "disk is full" in text or "database or disk is full" in text:
        return SQLITE_FULL
    if "disk i/o error" in text:  # Python 3.10 has no sqlite_errorcode: a full disk says so
        return SQLITE_IOERR
    if "not a database" in text:
        return SQLITE_NOTADB
    if "malformed" in text or "corrupt" in text:
        return SQLITE_CORRUPT
    if "readonly" in text or "read-only" in text:
        return SQLITE_READONLY
    return 0


def disk_nearly_full(path: Path, below: int = 1 << 20) -> bool:
    """Whether the file system of ``path`` has less than ``below`` bytes free (SQLite reports
    a full disk as an I/O error when it cannot create or grow its -shm file)."""
    try:
        return shutil.disk_usage(path.parent).free < below
    except OSError:
        return False


def translate(exc: sqlite3.Error, path: Path) -> QueueError:
    """Turn an sqlite3 error into the documented QueueError subclass."""
    code = errorcode(exc)
    if code == SQLITE_FULL or (code == SQLITE_IOERR and disk_nearly_full(path)):
        return QueueDiskFull(
            f"the disk holding the queue {path} is full; the message was not stored"
        )
    if code in (SQLITE_NOTADB, SQLITE_CORRUPT):
        return QueueCorrupt(f"the queue file {path} is not a valid durable-analytics queue ({exc})")
    if code in (SQLITE_READONLY, SQLITE_CANTOPEN):
        return QueuePermissionError(f"the queue file {path} cannot be written ({exc})")
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return QueueBusy(f"the queue {path} stayed locked by another connection ({exc})")
    return QueueError(f"queue {path}: {exc}")
