"""The module-level API: a drop-in for ``import segment.analytics as analytics``.

Settings are plain module attributes of ``durable_analytics`` that the user sets before the
first call (``durable_analytics.write_key = "..."``): every ``Client`` setting can be set so,
segment's names and ours (``analytics.flusher = "none"``). The first call builds one default
``Client`` from them; a module attribute that is not a setting (a typo such as
``analytics.flush_intervall``) makes that first call raise ``ConfigError`` naming the closest
setting, instead of being silently ignored.
"""

from __future__ import annotations

import sys
import threading
from datetime import datetime
from types import ModuleType
from typing import Any

from ._client import Client, Id, JSONObject, MessageId, Result
from ._config import SEGMENT_PARAMETERS, Settings, unknown_settings_message
from ._delivery import FlushResult
from ._store import QueueStats
from .exceptions import ConfigError

__all__ = [
    "SETTINGS",
    "alias",
    "flush",
    "get_client",
    "group",
    "identify",
    "join",
    "page",
    "remember_module_names",
    "screen",
    "shutdown",
    "stats",
    "track",
]

#: Module attributes read when the default client is built: every Client setting.
SETTINGS: tuple[str, ...] = SEGMENT_PARAMETERS[1:] + tuple(Settings.__annotations__)

_lock = threading.Lock()
# The package's own names (functions, classes, imports), recorded once it is imported: any
# other public attribute found at the first call was set by the user and is not a setting.
_module_names: set[str] = set()


def _package() -> Any:
    return sys.modules[__name__.rpartition(".")[0]]


def remember_module_names() -> None:
    """Record the package's names; called once at the end of its ``__init__``."""
    _module_names.update(vars(_package()))


def _unknown_settings(pkg: Any) -> list[str]:
    known = _module_names | set(SETTINGS) | {"write_key", "default_client"}
    return sorted(
        name
        for name, value in vars(pkg).items()
        if not name.startswith("_") and name not in known and not isinstance(value, ModuleType)
    )


def get_client() -> Client:
    """The default client, built from the module settings on first use."""
    pkg = _package()
    client = getattr(pkg, "default_client", None)
    if client is not None:
        return client  # type: ignore[no-any-return]
    with _lock:
        client = getattr(pkg, "default_client", None)
        if client is None:
            unknown = _unknown_settings(pkg)
            if unknown:
                raise ConfigError(
                    "module-level "
                    + unknown_settings_message(unknown, frozenset(SETTINGS) | {"write_key"})
                )
            settings: dict[str, Any] = {name: getattr(pkg, name, None) for name in SETTINGS}
            if settings.get("debug") is False:
                # The module default, not a choice: DEBUG=analytics may still turn it on.
                settings["debug"] = None
            client = Client(getattr(pkg, "write_key", None), **settings)
            pkg.default_client = client
    return client


def identify(
    user_id: Id | None = None,
    traits: JSONObject | None = None,
    context: JSONObject | None = None,
    timestamp: datetime | None = None,
    anonymous_id: Id | None = None,
    integrations: JSONObject | None = None,
    message_id: MessageId | None = None,
    *,
    connection: Any = None,
) -> Result:
    """Queue an identify call on the default client (see ``Client.identify``)."""
    return get_client().identify(
        user_id,
        traits,
        context,
        timestamp,
        anonymous_id,
        integrations,
        message_id,
        connection=connection,
    )


def track(
    user_id: Id | None = None,
    event: str | None = None,
    properties: JSONObject | None = None,
    context: JSONObject | None = None,
    timestamp: datetime | None = None,
    anonymous_id: Id | None = None,
    integrations: JSONObject | None = None,
    message_id: MessageId | None = None,
    *,
    connection: Any = None,
) -> Result:
    """Queue a track call on the default client (see ``Client.track``)."""
    return get_client().track(
        user_id,
        event,
        properties,
        context,
        timestamp,
        anonymous_id,
        integrations,
        message_id,
        connection=connection,
    )


def page(
    user_id: Id | None = None,
    category: str | None = None,
    name: str | None = None,
    properties: JSONObject | None = None,
    context: JSONObject | None = None,
    timestamp: datetime | None = None,
    anonymous_id: Id | None = None,
    integrations: JSONObject | None = None,
    message_id: MessageId | None = None,
    *,
    connection: Any = None,
) -> Result:
    """Queue a page call on the default client (see ``Client.page``)."""
    return get_client().page(
        user_id,
        category,
        name,
        properties,
        context,
        timestamp,
        anonymous_id,
        integrations,
        message_id,
        connection=connection,
    )


def screen(
    user_id: Id | None = None,
    category: str | None = None,
    name: str | None = None,
    properties: JSONObject | None = None,
    context: JSONObject | None = None,
    timestamp: datetime | None = None,
    anonymous_id: Id | None = None,
    integrations: JSONObject | None = None,
    message_id: MessageId | None = None,
    *,
    connection: Any = None,
) -> Result:
    """Queue a screen call on the default client (see ``Client.screen``)."""
    return get_client().screen(
        user_id,
        category,
        name,
        properties,
        context,
        timestamp,
        anonymous_id,
        integrations,
        message_id,
        connection=connection,
    )


def group(
    user_id: Id | None = None,
    group_id: Id | None = None,
    traits: JSONObject | None = None,
    context: JSONObject | None = None,
    timestamp: datetime | None = None,
    anonymous_id: Id | None = None,
    integrations: JSONObject | None = None,
    message_id: MessageId | None = None,
    *,
    connection: Any = None,
) -> Result:
    """Queue a group call on the default client (see ``Client.group``)."""
    return get_client().group(
        user_id,
        group_id,
        traits,
        context,
        timestamp,
        anonymous_id,
        integrations,
        message_id,
        connection=connection,
    )


def alias(
    previous_id: Id | None = None,
    user_id: Id | None = None,
    context: JSONObject | None = None,
    timestamp: datetime | None = None,
    integrations: JSONObject | None = None,
    message_id: MessageId | None = None,
    *,
    connection: Any = None,
) -> Result:
    """Queue an alias call on the default client (see ``Client.alias``)."""
    return get_client().alias(
        previous_id, user_id, context, timestamp, integrations, message_id, connection=connection
    )


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
