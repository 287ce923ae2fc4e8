"""The settings as read-only attributes of ``Client``, as segment-analytics-python has them.

``Client("KEY").host``, ``.write_key``, ``.debug``, ``.gzip``, ``.sync_mode``, ``.timeout``,
``.send``, ``.on_error``, ``.proxies``, ``.max_total_backoff_duration``,
``.max_rate_limit_duration`` and ``.log`` read what the client uses (``client.config`` holds
every setting). They are read-only: a client's settings are fixed at construction (segment
lets you assign them, but its sender thread never sees the new value).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._config import Config, OnError

__all__ = ["SettingsAttributes"]


class SettingsAttributes:
    """Mixin: segment's settings attributes, read from ``self.config``."""

    config: Config

    @property
    def write_key(self) -> str:
        """The write key (never shown in ``repr``)."""
        return self.config.write_key

    @property
    def host(self) -> str:
        """The base URL messages go to (``https://api.segment.io`` by default)."""
        return self.config.host

    @property
    def debug(self) -> bool:
        """Whether debug logging was turned on (``debug=True`` or ``DEBUG=analytics``)."""
        return self.config.debug

    @property
    def send(self) -> bool:
        """False when calls only validate (``send=False``)."""
        return self.config.send

    @property
    def sync_mode(self) -> bool:
        """Whether each call delivers its message before returning."""
        return self.config.sync_mode

    @property
    def gzip(self) -> bool:
        """Whether request bodies are gzipped."""
        return self.config.gzip

    @property
    def timeout(self) -> float:
        """Seconds one HTTP request may take."""
        return self.config.timeout

    @property
    def max_retries(self) -> int:
        """Quick retries of a failing batch before it goes back to the queue with a backoff."""
        return self.config.max_retries

    @property
    def max_queue_size(self) -> int | None:
        """Cap on the number of queued messages (None: only ``max_queue_bytes`` caps)."""
        return self.config.max_queue_size

    @property
    def on_error(self) -> OnError | None:
        """The ``on_error(exception, messages)`` callback, or None."""
        return self.config.on_error

    @property
    def proxies(self) -> Mapping[str, str] | None:
        """The proxies given, or None (then ``HTTPS_PROXY`` and friends apply)."""
        return self.config.proxies

    @property
    def max_total_backoff_duration(self) -> float:
        """Seconds a failing batch is retried before it is reported (it stays queued)."""
        return self.config.max_total_backoff_duration

    @property
    def max_rate_limit_duration(self) -> float:
        """Longest rate-limit wait accepted before the batch is reported (it stays queued)."""
        return self.config.max_rate_limit_duration

    @property
    def log(self) -> logging.Logger:
        """The library's logger, ``durable_analytics``."""
        return logging.getLogger("durable_analytics")
