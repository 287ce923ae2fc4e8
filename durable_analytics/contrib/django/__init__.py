"""Django: a client built from ``settings.DURABLE_ANALYTICS``, and ``manage.py analytics``.

In ``settings.py``::

    INSTALLED_APPS = [..., "durable_analytics.contrib.django"]
    DURABLE_ANALYTICS = {"write_key": "WRITE_KEY"}     # any Client setting

then anywhere::

    from durable_analytics.contrib.django import get_client
    get_client().track(user_id, "Signed Up")

The settings are checked when Django starts (a bad one raises ``ConfigError`` there); the
client is built on first use, once per process. At exit it delivers what it queued (under
gunicorn add the ``durable_analytics.contrib.gunicorn`` hook; under an ASGI server wrap the
application: ``application = AnalyticsLifespan(get_asgi_application(), get_client())``).
``manage.py analytics status`` / ``drain`` / ``dead-letters`` ... run the
``durable-analytics`` command on the settings' queue file.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from durable_analytics import Client, ConfigError

__all__ = ["SETTING", "get_client", "settings_dict"]

#: The Django setting holding the ``Client`` keyword arguments.
SETTING = "DURABLE_ANALYTICS"

_lock = threading.Lock()
_clients: dict[str, Client] = {}


def settings_dict() -> dict[str, Any]:
    """The ``DURABLE_ANALYTICS`` setting as a dict (empty when unset)."""
    from django.conf import settings

    value = getattr(settings, SETTING, None) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"settings.{SETTING} must be a dict of Client settings, got {type(value).__name__}"
        )
    return dict(value)


def get_client() -> Client:
    """This process's client, built from the settings on first use."""
    client = _clients.get(SETTING)
    if client is None:
        with _lock:
            client = _clients.get(SETTING)
            if client is None:
                client = _clients[SETTING] = Client(**settings_dict())
    return client
