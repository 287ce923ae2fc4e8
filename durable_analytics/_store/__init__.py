"""Where queued messages live: the ``QueueBackend`` seam and the factory that picks a backend.

Everything above this package (delivery, the client, the CLI) talks to a queue only through
``QueueBackend`` (``base.py``), whose docstring states the contract every backend keeps:
at-least-once, fenced by lease token, the oldest ready messages first and never an empty
batch, one backoff shared by every holder, a size cap with counted drops.

``open_queue`` is the one place that chooses a backend from the configured ``queue_path``:
``":memory:"`` is the in-memory reference backend (``memory.py``), any other path the
SQLite queue. A new backend adds a branch there, implements the
Protocol, and joins the contract suite (``tests/store/test_contract.py``) by one fixture
parameter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from durable_analytics.exceptions import ConfigError

from .base import (
    MAX_BACKOFF_SECONDS,
    DeadLetter,
    DeadLetterMark,
    Destination,
    DestinationStats,
    Lease,
    QueueBackend,
    QueueStats,
)
from .memory import MEMORY_PATH, MemoryQueue
from .settle import settling
from .sqlite import SqliteQueue

if TYPE_CHECKING:
    from durable_analytics._config import Config

__all__ = [
    "MAX_BACKOFF_SECONDS",
    "DeadLetter",
    "DeadLetterMark",
    "Destination",
    "DestinationStats",
    "Lease",
    "MemoryQueue",
    "QueueBackend",
    "QueueStats",
    "SqliteQueue",
    "open_queue",
    "settling",
]


def open_queue(config: Config, *, recover: bool = False, spool: bool = False) -> QueueBackend:
    """Open the queue ``config.queue_url`` or ``config.queue_path`` names.

    With the config's size cap, overflow, durability and lease timeout. A ``postgresql://``
    ``queue_url`` is the PostgreSQL backend (every call bounded by ``config.timeout``).
    ``":memory:"`` is the in-memory backend (this process only, gone when it ends); any
    other path is an SQLite file. ``recover=True`` (the Client's choice) moves a damaged
    SQLite file aside and salvages it; ``False`` (the CLI's) raises ``QueueCorrupt``.
    ``spool=True`` (the Client's, unless ``sync_mode``): an SQLite append goes first to this
    process's journal (``sqlite/journal.py``), and one that would wait for the file's write
    lock to its spool (``sqlite/spool.py``).
    """
    if config.queue_url is not None:
        # Imported here: psycopg is optional (ConfigError naming the extra when missing).
        from .postgres._queue import PostgresQueue

        return PostgresQueue(
            config.queue_url,
            durability=config.durability,
            max_queue_bytes=config.max_queue_bytes,
            max_queue_size=config.max_queue_size,
            overflow=config.overflow,
            lease_timeout=config.lease_timeout,
            timeout=config.timeout,
        )
    path = config.queue_path
    # A relative ":memory:" may have been made absolute: the name decides.
    if path.name == MEMORY_PATH:
        if config.flusher == "process" or config.on_exit == "spawn":
            raise ConfigError(
                'queue_path=":memory:" lives in this process only: use flusher="thread" or '
                '"none", and an on_exit other than "spawn"'
            )
        return MemoryQueue(
            max_queue_bytes=config.max_queue_bytes,
            max_queue_size=config.max_queue_size,
            overflow=config.overflow,
            lease_timeout=config.lease_timeout,
        )
    return SqliteQueue(
        path,
        durability=config.durability,
        max_queue_bytes=config.max_queue_bytes,
        max_queue_size=config.max_queue_size,
        overflow=config.overflow,
        lease_timeout=config.lease_timeout,
        busy_timeout=config.busy_timeout,
        recover=recover,
        spool=spool,
        journal=spool,
    )
