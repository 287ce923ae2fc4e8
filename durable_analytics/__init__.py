"""durable-analytics: a Segment-compatible analytics client whose queue lives on disk.

Drop-in for segment-analytics-python's module-level API::

    import durable_analytics as analytics
    analytics.write_key = "WRITE_KEY"
    analytics.track("user-1", "Signed Up", {"plan": "Enterprise"})

or with a client of your own::

    from durable_analytics import Client, Track
    client = Client("WRITE_KEY")
    client.track(user_id="user-1", event="Signed Up", properties={"plan": "Enterprise"})
    client.enqueue(Track(user_id="user-1", event="Signed Up"))
    client.flush(timeout=10)

Every call returns after its message is committed to an SQLite file, so nothing queued is
lost when the process crashes, is killed, or exits right after the call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Literal

from . import _default
from ._client import Client, Staged
from ._config import Durability, FlusherMode, OnError, OnExit, Overflow
from ._default import alias, flush, group, identify, join, page, screen, shutdown, stats, track
from ._delivery import FlushResult
from ._messages import Alias, Group, Identify, Message, Page, Screen, Track
from ._store import DeadLetter, DestinationStats, QueueStats
from ._version import __version__
from .exceptions import (
    APIError,
    CollectorError,
    ConfigError,
    ConfigurationRejected,
    DeliveryError,
    DurableAnalyticsError,
    MessageRejected,
    MessageTooLarge,
    QueueBusy,
    QueueCorrupt,
    QueueDiskFull,
    QueueError,
    QueuePermissionError,
    QueueUnavailable,
    QueueVersionError,
    RetryableError,
    ValidationError,
)

__all__ = [
    "APIError",
    "Alias",
    "Client",
    "CollectorError",
    "ConfigError",
    "ConfigurationRejected",
    "DeadLetter",
    "DeliveryError",
    "DestinationStats",
    "DurableAnalyticsError",
    "FlushResult",
    "Group",
    "Identify",
    "Message",
    "MessageRejected",
    "MessageTooLarge",
    "Page",
    "QueueBusy",
    "QueueCorrupt",
    "QueueDiskFull",
    "QueueError",
    "QueuePermissionError",
    "QueueStats",
    "QueueUnavailable",
    "QueueVersionError",
    "RetryableError",
    "Screen",
    "Staged",
    "Track",
    "ValidationError",
    "__version__",
    "alias",
    "flush",
    "group",
    "identify",
    "join",
    "page",
    "screen",
    "shutdown",
    "stats",
    "track",
]

# Module-level settings: every Client setting, read when the first call builds the default
# client. None means the Client default (or the environment variable). segment's names first.
write_key: str | None = None
host: str | None = None
debug: bool = False
max_queue_size: int | None = None
send: bool = True
on_error: OnError | Literal[False] | None = None
gzip: bool = False
max_retries: int = 3
sync_mode: bool = False
timeout: float = 10.0
proxies: Mapping[str, str] | None = None
thread: int | None = None
upload_size: int | None = None
upload_interval: float | None = None
log_handler: logging.Handler | None = None
oauth_client_id: str | None = None
oauth_client_key: str | None = None
oauth_key_id: str | None = None
oauth_auth_server: str | None = None
oauth_scope: str | None = None
max_total_backoff_duration: float | None = None
max_rate_limit_duration: float | None = None
# durable-analytics' own settings (see the README's settings table).
queue_path: str | os.PathLike[str] | None = None
#: A ``postgresql://`` URL: the queue lives in PostgreSQL (the ``postgres`` extra).
queue_url: str | None = None
flush_at: int | None = None
flush_interval: float | None = None
max_batch_bytes: int | None = None
max_message_bytes: int | None = None
durability: Durability | None = None
flusher: FlusherMode | None = None
on_exit: OnExit | None = None
shutdown_timeout: float | None = None
busy_timeout: float | None = None
lease_timeout: float | None = None
max_queue_bytes: int | None = None
overflow: Overflow | None = None
max_in_flight: int | None = None
max_batch_messages: int | None = None
default_client: Client | None = None
# A library attaches no output of its own: the application's logging configuration decides
# (the CLI and ``debug=True`` add a stderr handler).
logging.getLogger("durable_analytics").addHandler(logging.NullHandler())

#: segment-analytics-python's name for the version.
VERSION = __version__

_default.remember_module_names()
