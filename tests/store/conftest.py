"""The ``backend`` fixture: every storage backend, so one suite proves the same contract.

A new backend joins the contract suite with one line in ``BACKENDS``: a function that opens
a fresh, empty queue of that kind in ``tmp_path`` with the given settings (``pytest.skip``
it where its server is not available).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _postgres import unique_schema

from durable_analytics._store import MemoryQueue, QueueBackend, SqliteQueue
from durable_analytics.exceptions import QueueError

from .pg_helpers import OpenPg
from .sqlite_helpers import HOST, KEY


def _memory(tmp_path: Path, **settings: Any) -> QueueBackend:
    return MemoryQueue(**settings)


def _sqlite(tmp_path: Path, **settings: Any) -> QueueBackend:
    directory = tmp_path / "queue"
    directory.mkdir(mode=0o700, exist_ok=True)
    return SqliteQueue(directory / "queue.sqlite3", **settings)


def _now() -> float:
    return time.time()  # looked up at each call: freezegun's clock while one is frozen


def _postgres(tmp_path: Path, *, pg_dsn: str, **settings: Any) -> QueueBackend:
    from durable_analytics._store.postgres._queue import PostgresQueue

    # Its own schema: an empty queue. The contract's time rules run under freezegun, so a
    # test clock stands in for the server's now() (test_postgres*.py use the server's).
    return PostgresQueue(pg_dsn, schema=unique_schema(), clock=_now, **settings)


#: name → opener(tmp_path, **settings). Settings every backend takes: max_queue_bytes,
#: max_queue_size, overflow, lease_timeout, max_dead_letter_bytes.
BACKENDS: dict[str, Callable[..., QueueBackend]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "postgres": _postgres,
}
#: Fixtures an opener needs, passed by name (the private server skips or fails the test
#: when it cannot start: see tests/conftest.py).
NEEDS: dict[str, tuple[str, ...]] = {"postgres": ("pg_dsn",)}

OpenBackend = Callable[..., QueueBackend]


@pytest.fixture(params=list(BACKENDS))
def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenBackend]:
    """Opens a fresh queue of one backend with the given settings (closed after the test)."""
    opened: list[QueueBackend] = []
    needs = {name: request.getfixturevalue(name) for name in NEEDS.get(request.param, ())}

    def open_(**settings: Any) -> QueueBackend:
        queue = BACKENDS[request.param](tmp_path, **needs, **settings)
        opened.append(queue)
        return queue

    yield open_
    for queue in opened:
        with contextlib.suppress(QueueError):
            queue.close()


@pytest.fixture
def backend(open_backend: OpenBackend) -> QueueBackend:
    """A fresh queue of one backend with the default settings."""
    return open_backend()


# The SQLite backend's own tests (test_sqlite_*.py): one queue file in a private directory.


@pytest.fixture
def queue(queue_path: Path) -> Iterator[SqliteQueue]:
    """An SQLite queue at ``queue_path`` (closed after the test)."""
    q = SqliteQueue(queue_path)
    yield q
    q.close()


@pytest.fixture
def dest(queue: SqliteQueue) -> int:
    """The id of the usual test destination in ``queue``."""
    return queue.destination(HOST, KEY)


@pytest.fixture
def open_pg(pg_dsn: str, pg_schema: str) -> Iterator[OpenPg]:
    """Opens sessions on one fresh PostgreSQL queue (its own schema), closed after the test.

    ``open_pg(url=pg_dsn, **settings)``: each call is one more ``PostgresQueue``, as another
    process of the fleet would open it.
    """
    from durable_analytics._store.postgres._queue import PostgresQueue

    opened: list[PostgresQueue] = []

    def open_(url: str = pg_dsn, **settings: Any) -> PostgresQueue:
        queue = PostgresQueue(url, schema=pg_schema, **settings)
        opened.append(queue)
        return queue

    yield open_
    for queue in opened:
        queue.close()
