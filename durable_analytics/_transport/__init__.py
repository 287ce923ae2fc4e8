"""Transports: the ``Transport`` seam (``base``), the HTTP one (``http``) and the factory.

Delivery reaches a transport only through ``open_transport`` and the ``base.Transport``
Protocol. A new transport is a module here plus one branch in ``open_transport``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    MAX_RETRY_AFTER,
    DestinationOverride,
    Kind,
    Outcome,
    SendsAhead,
    Started,
    Target,
    Transport,
    classify,
    one_line,
    parse_rate_limit_reset,
    parse_retry_after,
)
from .http import MAX_RESPONSE_BYTES, HTTPTransport, batch_body, envelope_overhead

if TYPE_CHECKING:
    from durable_analytics._config import Config

__all__ = [
    "MAX_RESPONSE_BYTES",
    "MAX_RETRY_AFTER",
    "DestinationOverride",
    "HTTPTransport",
    "Kind",
    "Outcome",
    "SendsAhead",
    "Started",
    "Target",
    "Transport",
    "batch_body",
    "classify",
    "envelope_overhead",
    "one_line",
    "open_transport",
    "parse_rate_limit_reset",
    "parse_retry_after",
]


def open_transport(config: Config) -> Transport:
    """The transport ``config`` asks for: today always HTTP, with its timeout, gzip, proxies.

    It keeps one keep-alive connection per request in flight (``max_in_flight``).
    """
    return HTTPTransport(
        timeout=config.timeout,
        gzip=config.gzip,
        proxies=config.proxies,
        oauth=config.oauth,
        maxsize=config.max_in_flight,
    )
