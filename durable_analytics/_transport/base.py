"""The transport seam: what delivery needs from whatever carries a batch to a server.

Factored out of the HTTP implementation so that delivery, the client and test doubles
depend on this small interface and never on urllib3. A transport sends one batch of stored
message bodies to one destination and says what happened as an ``Outcome``; the status
policy (ack, retry with backoff, split and dead-letter) lives in delivery, not here
(docs/ARCHITECTURE.md, "The transport seam" and "One delivery path").
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Literal, Protocol

__all__ = [
    "MAX_RETRY_AFTER",
    "DestinationOverride",
    "Kind",
    "Outcome",
    "SendsAhead",
    "Started",
    "Target",
    "Transport",
    "classify",
    "one_line",
    "parse_rate_limit_reset",
    "parse_retry_after",
]

#: A Retry-After above this is capped: a guard against an absurd header.
MAX_RETRY_AFTER = 300.0

Kind = Literal["ok", "retry", "reject", "config"]

_RETRYABLE = frozenset({408, 410, 429, 460})
_REJECTED = frozenset({400, 413, 422})


def classify(status: int) -> Kind:
    """What a status means for the batch: deliver, retry, split-and-reject, or config error.

    2xx ok; 408, 410, 429, 460 and 5xx (but 501, 505) retry; 400, 413, 422 reject (split the
    batch until the bad message is alone); everything else (401, 403, 404, 3xx, ...) is a
    configuration error: the messages are kept and the destination backs off.
    """
    if 200 <= status < 300:
        return "ok"
    if status in _RETRYABLE or (500 <= status < 600 and status not in (501, 505)):
        return "retry"
    if status in _REJECTED:
        return "reject"
    return "config"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or HTTP date), capped at 300.

    Returns None for a missing, unparseable or negative header, which is then ignored; an
    HTTP date in the past gives 0.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        current = time.time() if now is None else now
        seconds = when.timestamp() - current
    else:
        # delay-seconds is a non-negative number (RFC 9110 §10.2.3): a negative one is
        # garbage, ignored like any other unparseable value. A date in the past means now.
        if math.isnan(seconds) or seconds < 0:
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def parse_rate_limit_reset(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from an ``X-RateLimit-Reset`` header, capped like Retry-After.

    Servers spell it three ways, told apart by size: a Unix time in milliseconds
    (above 10^12), a Unix time in seconds (above 10^9), or seconds from now; an HTTP date
    is read as Retry-After's. None when missing or unreadable; a time in the past gives 0.
    """
    if not value:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return parse_retry_after(value, now)
    if math.isnan(number) or number < 0:
        return None
    current = time.time() if now is None else now
    if number > 1e12:
        number = number / 1000.0 - current
    elif number > 1e9:
        number -= current
    return min(max(number, 0.0), MAX_RETRY_AFTER)


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped: one log line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class Outcome:
    """The result of sending one batch, classified (see ``classify``).

    ``status`` is None when no answer came (network error, timeout). ``retry_after`` is the
    server's Retry-After in seconds, ``excerpt`` the start of its answer with the write key
    scrubbed, ``error`` one line saying what went wrong (empty when ``kind == "ok"``).
    """

    kind: Kind
    status: int | None
    retry_after: float | None = None
    excerpt: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        """True for a 2xx."""
        return self.kind == "ok"


class Target(Protocol):
    """Where a batch goes: a base URL and a write key (a queue's ``Destination`` is one)."""

    @property
    def host(self) -> str: ...

    @property
    def write_key(self) -> str: ...


class Transport(Protocol):
    """Carries one batch of serialized messages to a destination.

    An implementation must:

    - ``send`` the message bodies (stored bytes, already serialized) as one batch to
      ``destination`` and return an ``Outcome``; it never raises for a server or network
      failure (those are ``retry`` outcomes) and never takes longer than ``timeout`` seconds
      when one is given;
    - say in ``envelope_overhead`` how many bytes its batch envelope adds around the
      messages (with one separator byte per message beyond the first counted apart), so a
      batch is leased to fit ``max_batch_bytes``;
    - release its connections in ``close`` (called in the process that used it);
    - send ``retry_count`` (how many times this batch was tried before; 0 the first time)
      as it can: the HTTP transport sends it as ``X-Retry-Count`` when it is not 0.

    ``durable_analytics.testing.RecordingTransport`` is an in-memory one for tests.
    """

    def envelope_overhead(self) -> int: ...

    def send(
        self,
        destination: Target,
        bodies: Sequence[bytes],
        *,
        timeout: float | None = None,
        retry_count: int = 0,
    ) -> Outcome: ...

    def close(self) -> None: ...


class Started(Protocol):
    """A batch a transport has sent whose answer is still to be read (``SendsAhead``)."""

    def finish(self) -> Outcome:
        """Read the answer (once) and return it as ``Transport.send`` would have."""
        ...

    def cancel(self) -> None:
        """Give up the answer unread (the server may still have taken the batch)."""
        ...


class SendsAhead(Protocol):
    """A transport that can also send a batch now and read its answer later.

    Optional beside ``Transport``: with it, one delivering thread keeps a second batch on
    the wire while it settles the first (``_pass.deliver_pass``). ``start`` writes the
    request whole and returns a ``Started`` whose ``finish`` gives what ``send`` would have
    (a request that could not be written included, as its retryable outcome), within
    ``timeout`` for both steps together; or None when it cannot for this destination, and
    the caller then uses ``send``. The HTTP transport implements it for direct routes.
    """

    def start(
        self,
        destination: Target,
        bodies: Sequence[bytes],
        *,
        timeout: float | None = None,
        retry_count: int = 0,
    ) -> Started | None: ...


@dataclass(frozen=True)
class _Override:
    host: str
    write_key: str


class DestinationOverride:
    """Wraps any transport to send every batch to ``host`` and/or with ``write_key``.

    What ``durable-analytics drain --host/--write-key`` uses: the stored destination of each
    message is replaced by the given one; a None part keeps the stored value.
    """

    def __init__(
        self, inner: Transport, *, host: str | None = None, write_key: str | None = None
    ) -> None:
        self.inner = inner
        self.host = host
        self.write_key = write_key

    def __repr__(self) -> str:
        return f"DestinationOverride({self.inner!r}, host={self.host!r})"

    def envelope_overhead(self) -> int:
        """The wrapped transport's envelope size."""
        return self.inner.envelope_overhead()

    def send(
        self,
        destination: Target,
        bodies: Sequence[bytes],
        *,
        timeout: float | None = None,
        retry_count: int = 0,
    ) -> Outcome:
        """Send through the wrapped transport with the overridden host and write key."""
        return self.inner.send(
            self._target(destination), bodies, timeout=timeout, retry_count=retry_count
        )

    def start(
        self,
        destination: Target,
        bodies: Sequence[bytes],
        *,
        timeout: float | None = None,
        retry_count: int = 0,
    ) -> Started | None:
        """Send ahead through the wrapped transport (``SendsAhead``), when it can."""
        start = getattr(self.inner, "start", None)
        if start is None:
            return None
        started: Started | None = start(
            self._target(destination), bodies, timeout=timeout, retry_count=retry_count
        )
        return started

    def close(self) -> None:
        """Close the wrapped transport."""
        self.inner.close()

    def _target(self, destination: Target) -> _Override:
        """``destination`` with the overridden host and write key (a None keeps its own)."""
        return _Override(self.host or destination.host, self.write_key or destination.write_key)
