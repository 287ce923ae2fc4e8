"""Every exception durable-analytics raises or hands to ``on_error``.

The tree::

    DurableAnalyticsError                 base of everything below
    ├── ValidationError (ValueError)      a call's message is invalid; nothing was queued
    │   └── MessageTooLarge               the serialized message is over max_message_bytes
    ├── ConfigError (ValueError)          a Client setting (or environment variable) is invalid
    ├── QueueError                        the queue file cannot be used
    │   ├── QueueCorrupt                  not an SQLite file, or damaged
    │   ├── QueueVersionError             written by a newer durable-analytics
    │   ├── QueuePermissionError          unreadable, unwritable, a symlink, or an unsafe directory
    │   ├── QueueDiskFull                 the disk (or the file's size limit) is full; the call's
    │   │                                 message was not stored, everything before it is intact
    │   ├── QueueBusy                     another process held the write lock longer than the
    │   │                                 call may wait (busy_timeout, or a flush/exit deadline);
    │   │                                 the call's message was not stored
    │   └── QueueUnavailable              the queue's PostgreSQL server cannot be reached (the
    │                                     call's message was not stored)
    ├── CollectorError (RuntimeError)     ``testing.Collector`` used out of order (started twice)
    └── DeliveryError                     a batch could not be delivered
        └── APIError                      segment's ``APIError``: ``status``, ``code``, ``message``;
            │                             what ``on_error`` gets, what a ``sync_mode`` call raises
            ├── RetryableError            408, 410, 429, 460, 5xx, network errors: kept and retried
            ├── MessageRejected           400, 413, 422: the message is dead-lettered
            └── ConfigurationRejected     401, 403, 404, 3xx: the write key or host is wrong;
                                          messages are kept until it is fixed

``ValidationError`` and ``ConfigError`` are ``ValueError`` subclasses, so code written for
``segment-analytics-python`` (which raises ``AssertionError`` or ``ValueError``) can catch
``ValueError``. Every exception handed to ``on_error`` is an ``APIError`` whose ``status``,
``code`` and ``message`` mean what segment's do, so a segment ``on_error`` handler works
unchanged. No exception message or ``repr`` ever contains a write key.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import ClassVar

__all__ = [
    "APIError",
    "CollectorError",
    "ConfigError",
    "ConfigurationRejected",
    "DeliveryError",
    "DurableAnalyticsError",
    "MessageRejected",
    "MessageTooLarge",
    "QueueBusy",
    "QueueCorrupt",
    "QueueDiskFull",
    "QueueError",
    "QueuePermissionError",
    "QueueUnavailable",
    "QueueVersionError",
    "RetryableError",
    "ValidationError",
]


class DurableAnalyticsError(Exception):
    """Base class of every durable-analytics exception."""


class ValidationError(DurableAnalyticsError, ValueError):
    """A call's message is invalid: the message names the call and the field.

    Raised by ``track()`` and the other calls before anything is written, so an invalid
    message never reaches the queue.
    """


class MessageTooLarge(ValidationError):
    """The serialized message is larger than ``max_message_bytes`` (32 KB by default)."""

    def __init__(self, call: str, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"{call}: the message is {size} bytes serialized, over the {limit}-byte limit "
            "(max_message_bytes); trim its properties, traits or context"
        )


class ConfigError(DurableAnalyticsError, ValueError):
    """A setting passed to ``Client`` (or read from the environment) is invalid."""


class QueueError(DurableAnalyticsError):
    """The queue file cannot be opened or used."""


class QueueCorrupt(QueueError):
    """The queue file is not an SQLite database, or SQLite reports it damaged."""


class QueueVersionError(QueueError):
    """The queue file was written by a newer durable-analytics than this one."""


class QueuePermissionError(QueueError, PermissionError):
    """The queue file or its directory is unreadable, unwritable or unsafe."""


class QueueDiskFull(QueueError, OSError):
    """The disk holding the queue is full; the message of this call was not stored.

    Everything committed before stays intact, and appends work again once space returns.
    """


class QueueBusy(QueueError):
    """Another connection held the queue's write lock for longer than the busy timeout."""


class QueueUnavailable(QueueError):
    """The PostgreSQL server holding the queue cannot be reached (within the call's timeout).

    Raised instead of waiting longer: nothing of the failed call was stored.
    """


class CollectorError(DurableAnalyticsError, RuntimeError):
    """``durable_analytics.testing.Collector`` was used out of order (started twice, ...)."""


class DeliveryError(DurableAnalyticsError):
    """A batch could not be delivered; the base of ``APIError``, which ``on_error`` gets."""

    def __init__(self, message: str, *, status: int | None = None, excerpt: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.excerpt = excerpt


class APIError(DeliveryError):
    """A batch was not delivered: segment's ``APIError``, with ``status``, ``code``, ``message``.

    What ``on_error(exception, messages)`` gets (as ``RetryableError``, ``MessageRejected``
    or ``ConfigurationRejected``, which say what becomes of the messages) and what a
    ``sync_mode=True`` call raises. The attributes mean what segment-analytics-python's do:

    - ``status``: the HTTP status, or None when no answer came (connection refused,
      timeout, TLS error);
    - ``code`` and ``message``: the ``code`` and ``message`` of the server's JSON answer;
      ``"unknown"`` and the answer's text when it has no such JSON; ``"redirect"`` and the
      status's reason phrase for a 3xx; with no answer ``"network"`` and what went wrong
      (``"backoff"`` when a ``sync_mode`` call sent nothing: an earlier failure's backoff
      is still running; ``"configuration"`` when the OAuth token endpoint refused).

    ``str(exception)`` says what happened and what becomes of the messages; ``excerpt`` is
    the start of the answer (at most 2000 characters, the write key removed). Unlike
    segment's there is no ``response`` attribute: ``excerpt`` holds its text.
    """

    code: str | int
    message: str
    #: ``code`` when no HTTP answer came.
    no_answer_code: ClassVar[str] = "network"

    def __init__(
        self,
        text: str,
        *,
        status: int | None = None,
        code: str | int | None = None,
        message: str | None = None,
        excerpt: str = "",
    ) -> None:
        super().__init__(text, status=status, excerpt=excerpt)
        if status is None:
            found: tuple[str | int, str] = (self.no_answer_code, text)
        else:
            found = _answer_fields(status, excerpt)
        self.code = found[0] if code is None else code
        self.message = found[1] if message is None else message


def _answer_fields(status: int, answer: str) -> tuple[str | int, str]:
    """``code`` and ``message`` of an HTTP answer, as segment-analytics-python reads them."""
    if 300 <= status < 400:
        try:
            return "redirect", HTTPStatus(status).phrase
        except ValueError:
            return "redirect", ""
    try:
        payload = json.loads(answer)
        code, message = payload["code"], payload["message"]
    except (ValueError, KeyError, TypeError, IndexError):
        return "unknown", answer
    if isinstance(code, bool) or not isinstance(code, (str, int)):
        code = json.dumps(code)
    return code, message if isinstance(message, str) else json.dumps(message)


class RetryableError(APIError):
    """A transient failure (408, 410, 429, 460, 5xx, network): the batch is kept and retried."""


class MessageRejected(APIError):
    """The server rejected a message as bad data (400, 413, 422): it was dead-lettered."""


class ConfigurationRejected(APIError):
    """The server refused the write key or URL (401, 403, 404, 3xx): messages are kept.

    ``status`` None: the OAuth token endpoint refused the client (``code``
    ``"configuration"``; ``message`` says what it answered).
    """

    no_answer_code: ClassVar[str] = "configuration"
