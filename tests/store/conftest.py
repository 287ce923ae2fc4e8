"""The ``backend`` fixture: every storage backend, so one suite proves the same contract.

A new backend joins the contract suite with one line in ``BACKENDS``: a function that opens
a fresh, empty queue of that kind in ``tmp_path`` with the given settings (``pytest.skip``
it where its server is not available).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from durable_analytics._store import MemoryQueue, QueueBackend, SqliteQueue
from durable_analytics.exceptions import QueueError

from .sqlite_helpers import HOST, KEY


def _memory(tmp_path: Path, **settings: Any) -> QueueBackend:
    return MemoryQueue(**settings)


def _sqlite(tmp_path: Path, **settings: Any) -> QueueBackend:
    directory = tmp_path / "queue"
    directory.mkdir(mode=0o700, exist_ok=True)
    return SqliteQueue(directory / "queue.sqlite3", **settings)


#: name → opener(tmp_path, **settings). Settings every backend takes: max_queue_bytes,
#: overflow, lease_timeout, max_dead_letter_bytes.
BACKENDS: dict[str, Callable[..., QueueBackend]] = {
    "memory": _memory,
    "sqlite": _sqlite,
}

OpenBackend = Callable[..., QueueBackend]


@pytest.fixture(params=list(BACKENDS))
def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenBackend]:
    """Opens a fresh queue of one backend with the given settings (closed after the test)."""
    opened: list[QueueBackend] = []

    def open_(**settings: Any) -> QueueBackend:
        queue = BACKENDS[request.param](tmp_path, **settings)
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
