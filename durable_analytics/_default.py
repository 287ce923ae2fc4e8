"""The module-level API: a drop-in for ``import segment.analytics as analytics``.

Settings are plain module attributes of ``durable_analytics`` that the user sets before the
first call (``durable_analytics.write_key = "..."``); the first call builds one default
``Client`` from them.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from ._client import Client, Result
from ._delivery import FlushResult
from ._store import QueueStats

__all__ = [
    "SETTINGS",
    "alias",
    "flush",
    "get_client",
    "group",
    "identify",
    "join",
    "page",
    "screen",
    "shutdown",
    "stats",
    "track",
]

#: Module attributes read when the default client is built, and the Client setting each sets.
SETTINGS = (
    "host",
    "on_error",
    "debug",
    "send",
    "sync_mode",
    "gzip",
    "timeout",
    "max_retries",
    "queue_path",
    "queue_url",
    # segment-analytics-python's other module settings, accepted for drop-in use
    "log_handler",
    "max_queue_size",
    "upload_size",
    "upload_interval",
    "proxies",
    # OAuth is not supported: setting any of these makes the first call raise ConfigError
    # rather than silently sending with Basic auth.
    "oauth_client_id",
    "oauth_client_key",
    "oauth_key_id",
)

_lock = threading.Lock()


def _package() -> Any:
    return sys.modules[__name__.rpartition(".")[0]]


def get_client() -> Client:
    """The default client, built from the module settings on first use."""
    pkg = _package()
    client = getattr(pkg, "default_client", None)
    if client is not None:
        return client  # type: ignore[no-any-return]
    with _lock:
        client = getattr(pkg, "default_client", None)
        if client is None:
            settings = {name: getattr(pkg, name, None) for name in SETTINGS}
            if settings.get("debug") is False:
                # The module default, not a choice: DEBUG=analytics may still turn it on.
                settings["debug"] = None
            client = Client(getattr(pkg, "write_key", None), **settings)
            pkg.default_client = client
    return client


def identify(*args: Any, **kwargs: Any) -> Result:
    """Queue an identify call on the default client."""
    return get_client().identify(*args, **kwargs)


def track(*args: Any, **kwargs: Any) -> Result:
    """Queue a track call on the default client."""
    return get_client().track(*args, **kwargs)


def page(*args: Any, **kwargs: Any) -> Result:
    """Queue a page call on the default client."""
    return get_client().page(*args, **kwargs)


def screen(*args: Any, **kwargs: Any) -> Result:
    """Queue a screen call on the default client."""
    return get_client().screen(*args, **kwargs)


def group(*args: Any, **kwargs: Any) -> Result:
    """Queue a group call on the default client."""
    return get_client().group(*args, **kwargs)


def alias(*args: Any, **kwargs: Any) -> Result:
    """Queue an alias call on the default client."""
    return get_client().alias(*args, **kwargs)


def flush(timeout: float | None = None) -> FlushResult:
    """Deliver what the default client has queued (see ``Client.flush``)."""
    return get_client().flush(timeout)


def join() -> None:
    """Deliver what is queued and stop the default client's flusher."""
    get_client().join()


def shutdown() -> None:
    """Flush and stop the default client (segment-analytics-python's ``shutdown``)."""
    get_client().shutdown()


def stats() -> QueueStats:
    """The default client's queue statistics."""
    return get_client().stats()
