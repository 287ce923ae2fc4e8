"""An in-memory transport that records every batch and answers from a handler, no sockets.

Public as ``durable_analytics.testing.RecordingTransport``; kept in its own module so the
testing module stays the Collector's.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ._transport import Outcome, Target, batch_body, classify, envelope_overhead, one_line
from ._transport import parse_retry_after as _parse_retry_after

if TYPE_CHECKING:
    from .testing import Reply

__all__ = ["RecordingTransport", "SentBatch"]


@dataclass(frozen=True)
class SentBatch:
    """One batch handed to a ``RecordingTransport``.

    ``host`` and ``write_key`` are its destination, ``body`` the request body exactly as
    the HTTP transport would POST it (before gzip), ``messages`` its decoded ``batch`` list.
    ``status`` is the answer the handler gave: 0 while the handler runs (the handler itself
    receives the batch with status 0) and when it raised. Treat it as read-only.
    """

    host: str
    write_key: str = field(repr=False)
    body: bytes = field(repr=False)
    messages: list[dict[str, Any]] = field(repr=False)
    status: int = 0
    sent_at: float = 0.0

    def __repr__(self) -> str:
        return (
            f"SentBatch(host={self.host!r}, status={self.status}, "
            f"messages={len(self.messages)}, bytes={len(self.body)})"
        )


Handler = Callable[[SentBatch], "Reply | int"]


class RecordingTransport:
    """A transport for tests: records each batch and answers what ``handler`` says.

    Pass it as ``Client(..., transport=RecordingTransport())`` (with ``flusher="thread"``
    or ``"none"``) and the client delivers into memory instead of over HTTP, through the
    same batching, retry, split and dead-letter rules::

        from durable_analytics import Client
        from durable_analytics.testing import RecordingTransport, Reply

        def test_signup_is_sent(tmp_path):
            transport = RecordingTransport()  # answers 200 to everything
            client = Client("KEY", queue_path=tmp_path / "q.sqlite3", transport=transport)
            client.track(user_id="user-1", event="Signed Up")
            client.flush()
            assert [m["event"] for m in transport.messages()] == ["Signed Up"]

    ``handler(batch)`` decides each answer: an HTTP status (``int``) or a ``Reply`` (its
    ``body`` and a ``Retry-After`` header are used; ``delay`` and ``hang`` are not: a
    handler can sleep itself). Raising ``OSError`` (``ConnectionError``,
    ``TimeoutError``...) stands for a network failure, which is retried like one. With no
    handler every batch is answered 200. Safe to use from several threads.
    """

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler
        self._lock = threading.Lock()
        self._batches: list[SentBatch] = []
        #: How many times ``close()`` was called.
        self.closed = 0

    def __repr__(self) -> str:
        return f"RecordingTransport(requests={self.requests})"

    # ------------------------------------------------------------------ the Transport

    def envelope_overhead(self) -> int:
        """The Segment envelope's size, as the HTTP transport counts it."""
        return envelope_overhead()

    def send(
        self,
        destination: Target,
        bodies: Sequence[bytes],
        *,
        timeout: float | None = None,
        retry_count: int = 0,
    ) -> Outcome:
        """Record the batch and turn the handler's answer into an ``Outcome``."""
        body = batch_body(bodies)
        batch = SentBatch(
            host=destination.host,
            write_key=destination.write_key,
            body=body,
            messages=json.loads(body)["batch"],
            sent_at=time.time(),
        )
        try:
            answer = 200 if self.handler is None else self.handler(batch)
        except OSError as exc:
            self._record(batch)
            what = "timed out" if isinstance(exc, TimeoutError) else "network error"
            return Outcome("retry", None, error=f"{what} talking to {batch.host}: {exc}")
        status, text, retry_header = _unpack(answer)
        self._record(replace(batch, status=status))
        if destination.write_key:
            text = text.replace(destination.write_key, "<write key>")
        kind = classify(status)
        error = "" if kind == "ok" else f"HTTP {status} from {batch.host}: {one_line(text[:200])}"
        return Outcome(kind, status, _parse_retry_after(retry_header), text[:2000], error.strip())

    def close(self) -> None:
        """Count the call; nothing to release."""
        self.closed += 1

    # ------------------------------------------------------------------ recordings

    def _record(self, batch: SentBatch) -> None:
        with self._lock:
            self._batches.append(batch)

    @property
    def batches(self) -> list[SentBatch]:
        """Every batch sent so far, in order, whatever it was answered (a new list)."""
        with self._lock:
            return list(self._batches)

    @property
    def requests(self) -> int:
        """How many batches were sent."""
        with self._lock:
            return len(self._batches)

    def messages(self, *, accepted_only: bool = True) -> list[dict[str, Any]]:
        """Every message of every batch, in order; by default only of batches answered 2xx."""
        return [
            message
            for batch in self.batches
            if not accepted_only or 200 <= batch.status < 300
            for message in batch.messages
        ]

    def message_ids(self, *, accepted_only: bool = True) -> collections.Counter[str]:
        """How many times each messageId was sent (by default: in batches answered 2xx)."""
        return collections.Counter(
            str(m.get("messageId")) for m in self.messages(accepted_only=accepted_only)
        )

    def reset(self) -> None:
        """Forget what was recorded (the handler stays)."""
        with self._lock:
            self._batches.clear()


def _unpack(answer: Reply | int) -> tuple[int, str, str | None]:
    if isinstance(answer, bool):
        raise ValueError(
            f"a RecordingTransport handler must answer a status or a Reply: {answer!r}"
        )
    if not isinstance(answer, int):
        status = answer.status
        body = answer.body
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        retry = next(
            (v for k, v in answer.headers.items() if k.lower() == "retry-after"),
            None,
        )
        return status, text, retry
    if not 100 <= answer <= 599:
        raise ValueError(f"a RecordingTransport handler must answer a status 100-599: {answer!r}")
    return answer, "", None
