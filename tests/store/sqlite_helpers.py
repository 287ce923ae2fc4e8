"""Shared helpers of the SQLite backend's own tests (tests/store/test_sqlite_*.py)."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from durable_analytics._store.sqlite import SqliteQueue as Queue

HOST = "https://api.example.test"
KEY = "wk_SECRET_write_key_0123456789"
OTHER_HOST = "https://eu.example.test"
OTHER_KEY = "wk_OTHER_write_key_9876543210"


def _permission_bits_enforced() -> bool:
    """False as root (or with CAP_DAC_OVERRIDE): then chmod cannot deny us anything."""
    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe"
        probe.write_text("x")
        probe.chmod(0o400)
        try:
            with probe.open("a"):
                return False
        except PermissionError:
            return True


NO_PERMISSIONS = not _permission_bits_enforced()
ROOT_REASON = "running as root: root bypasses file permission bits, so chmod cannot deny it"


def body(i: int, pad: int = 0, **extra: Any) -> bytes:
    """A serialized message that names its index (and anything in ``extra``)."""
    msg = {"type": "track", "event": "E", "messageId": f"m-{i}", "properties": {"i": i, **extra}}
    if pad:
        msg["properties"]["pad"] = "x" * pad
    return json.dumps(msg, separators=(",", ":")).encode()


def body_of_size(i: int, size: int) -> bytes:
    """A message body of exactly ``size`` bytes."""
    base = body(i, pad=1)
    out = body(i, pad=1 + size - len(base))
    assert len(out) == size
    return out


def index(b: bytes) -> int:
    return int(json.loads(b)["properties"]["i"])


def fresh_rows(path: Path, sql: str = "SELECT id, body FROM messages ORDER BY id") -> list[Any]:
    """Read through a brand-new connection, as another process would."""
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def fill(queue: Queue, dest_id: int, n: int, start: int = 0, pad: int = 0) -> list[int]:
    return [queue.append(dest_id, body(i, pad)) for i in range(start, start + n)]
