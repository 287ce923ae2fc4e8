"""A Flask extension: one client per application, built from ``app.config``.

::

    from durable_analytics.contrib.flask import DurableAnalytics

    analytics = DurableAnalytics()

    def create_app():
        app = Flask(__name__)
        app.config["DURABLE_ANALYTICS"] = {"write_key": "WRITE_KEY"}  # any Client setting
        analytics.init_app(app)
        return app

    @bp.post("/signup")
    def signup():
        analytics.client.track(user_id, "Signed Up")

``DURABLE_ANALYTICS`` holds the ``Client`` keyword arguments (``write_key``, ``host``,
``queue_path``...); without it the environment variables apply. Flask has no shutdown
hook: the client delivers at interpreter exit (``on_exit``), and under gunicorn the
``durable_analytics.contrib.gunicorn`` hooks close it when a worker exits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from durable_analytics import Client, ConfigError

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["CONFIG_KEY", "DurableAnalytics"]

#: The ``app.config`` key holding the client's settings.
CONFIG_KEY = "DURABLE_ANALYTICS"
_EXTENSION = "durable_analytics"


class DurableAnalytics:
    """The extension: ``init_app(app)`` builds the app's client; ``client`` finds it."""

    def __init__(self, app: Flask | None = None, *, client: Client | None = None) -> None:
        self._client = client
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, *, client: Client | None = None) -> Client:
        """Build (or take) the client of ``app`` and register it; returns it."""
        chosen = client or self._client
        if chosen is None:
            settings = app.config.get(CONFIG_KEY) or {}
            if not isinstance(settings, Mapping):
                raise ConfigError(
                    f"app.config[{CONFIG_KEY!r}] must be a dict of Client settings, "
                    f"got {type(settings).__name__}"
                )
            chosen = Client(**dict(settings))
        app.extensions[_EXTENSION] = chosen
        return chosen

    @property
    def client(self) -> Client:
        """The current application's client (or the one given, outside an app context)."""
        from flask import current_app

        if current_app:
            found: Any = current_app.extensions.get(_EXTENSION)
            if found is not None:
                return found  # type: ignore[no-any-return]
        if self._client is not None:
            return self._client
        raise ConfigError("no durable-analytics client: call init_app(app) first")
