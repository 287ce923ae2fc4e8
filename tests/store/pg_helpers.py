"""Shared helpers of the PostgreSQL backend's own tests (tests/store/test_postgres_*.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from durable_analytics._store.postgres._queue import PostgresQueue

#: ``open_pg(url=pg_dsn, **settings)``: one more session on the test's fresh queue.
OpenPg = Callable[..., "PostgresQueue"]


def body(i: int) -> bytes:
    """A compact track message whose ``messageId`` is ``m-<i>``."""
    return json.dumps(
        {
            "type": "track",
            "event": "e",
            "userId": "u",
            "messageId": f"m-{i}",
            "timestamp": "2026-01-01T00:00:00.000Z",
        },
        separators=(",", ":"),
    ).encode()
