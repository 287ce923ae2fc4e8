"""A real Segment-compatible HTTP server on 127.0.0.1 for testing code that sends analytics.

`Collector` speaks the wire format of ``POST {host}/v1/batch``: it checks the Basic
auth header against a write key, gunzips, parses the JSON and records every request.
Replies can be scripted (statuses, ``Retry-After`` headers, delays, requests that never
get an answer) so a test can prove how a client behaves when the server misbehaves::

    from durable_analytics import Client
    from durable_analytics.testing import Collector, Reply

    def test_signup_is_delivered(tmp_path):
        with Collector("WRITE_KEY") as collector:
            collector.script(503, Reply(429, headers={"Retry-After": "1"}))  # then 200s
            client = Client("WRITE_KEY", host=collector.url, queue_path=tmp_path / "q.sqlite3")
            client.track(user_id="user-1", event="Signed Up")
            client.flush(timeout=10)
            client.close()
            assert collector.wait_for_messages(1)
            [message] = collector.messages()
            assert message["event"] == "Signed Up"

The collector only uses the standard library, so it works with any HTTP client.

``RecordingTransport`` is the socket-free counterpart: passed as ``Client(transport=...)``
it records every batch in memory and answers what a handler function says.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import math
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ._collector_http import Headers as _Headers
from ._collector_http import Pending as _Pending
from ._collector_http import (
    Reply,
    as_reply,
    decode_batch,
    error_reply,
    is_authorized,
    shut,
)
from ._collector_http import Server as _Server
from ._recording import RecordingTransport, SentBatch
from ._token_endpoint import TokenEndpoint, TokenRequest, generate_key_pair
from .exceptions import CollectorError

__all__ = [
    "Collector",
    "ReceivedBatch",
    "RecordingTransport",
    "Reply",
    "SentBatch",
    "TokenEndpoint",
    "TokenRequest",
    "generate_key_pair",
]

# How often the accept loop checks for stop(): the upper bound stop() waits for it.
_POLL_INTERVAL = 0.05
# How long stop() waits for handler threads to notice their closed sockets; they are
# daemon threads, so this only keeps tests from leaking threads, it never blocks exit.
_HANDLER_GRACE = 0.5


@dataclass(frozen=True)
class ReceivedBatch:
    """One ``POST /v1/batch`` as the collector saw it.

    ``headers`` looks names up case-insensitively. ``raw_body`` is the body as on the wire
    (gzipped if it was sent so); ``body`` the decoded JSON, or None if it did not decode;
    ``messages`` is ``body["batch"]``, or ``[]`` when the body is not a valid batch.
    ``status`` is the status the collector answered: 0 while a delayed answer is pending
    and for requests that never got one (``hang``, or the collector stopped first).
    ``authorized`` tells whether the Basic auth header matched the write key (or, with no
    write key configured, was well formed). Treat the recorded objects as read-only.
    """

    received_at: float
    path: str
    headers: Mapping[str, str]
    raw_body: bytes
    body: Any
    messages: list[dict[str, Any]]
    status: int
    authorized: bool

    def __repr__(self) -> str:
        # Bodies can be 500 KB and headers hold the write key: show a summary instead.
        return (
            f"ReceivedBatch(path={self.path!r}, status={self.status}, "
            f"authorized={self.authorized}, messages={len(self.messages)}, "
            f"raw_bytes={len(self.raw_body)}, received_at={self.received_at!r})"
        )


def _is_success(status: int) -> bool:
    return 200 <= status < 300


def _message_ids(messages: list[dict[str, Any]]) -> Iterator[str]:
    for message in messages:
        message_id = message.get("messageId")
        if isinstance(message_id, str):
            yield message_id


class Collector:
    """A Segment-compatible collector listening on ``host:port`` (port 0: any free one).

    ``write_key``: requests must carry ``Authorization: Basic base64(write_key + ":")``,
    else they are answered 401 (and still recorded, with ``authorized=False``). Without a
    write key any well-formed Basic header is accepted; a missing one is still a 401.

    Answers, in order of precedence: 401 for bad auth; 400 for a body that is not gzip
    (when so declared), not JSON, or has no ``batch`` list of objects; the status given to
    `reject_message_ids` for a batch holding one of those ids; else the next scripted
    `Reply`, or the default one (200) once the script is used up. Only requests that
    reach the script consume an entry of it.

    ``token_endpoint``: a ``TokenEndpoint`` served at ``{url}/token`` for clients that use
    OAuth (``oauth_auth_server=collector.url``); batches carrying one of its live tokens as
    ``Authorization: Bearer`` are authorized as well.

    ``delay`` holds every answer that many seconds (a server's round trip: 0.05 is a real
    ingest API from a server), on top of a scripted reply's own delay; ``set_delay``
    changes it. ``peak_concurrency`` tells how many requests were being answered at once
    at most, ``rate_limit`` answers a share of the requests 429 with a ``Retry-After``, and
    ``requests_inside_retry_after`` counts the requests that came in while one was running.

    ``start()`` binds and serves from a daemon thread; ``stop()`` closes everything
    within a fraction of a second. A stopped collector can be started again on the same
    port, keeping its recordings. Also a context manager. All methods are thread-safe.
    """

    def __init__(
        self,
        write_key: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token_endpoint: TokenEndpoint | None = None,
        delay: float = 0.0,
    ) -> None:
        #: OAuth: the token endpoint served at ``{url}/token``; its live tokens are accepted
        #: as ``Authorization: Bearer`` beside the write key's Basic auth.
        self.token_endpoint = token_endpoint
        self._write_key = write_key
        self._expected_auth = (
            None
            if write_key is None
            else "Basic " + base64.b64encode(f"{write_key}:".encode()).decode("ascii")
        )
        self._host = host
        self._port = port
        # One lock for all state; the Condition wakes wait_for_*() on every recording.
        self._cond = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._script: collections.deque[Reply] = collections.deque()
        self._default = Reply()
        self._rejected: dict[str, int] = {}
        self._batches: list[ReceivedBatch] = []
        self._all_ids: collections.Counter[str] = collections.Counter()
        self._accepted_ids: collections.Counter[str] = collections.Counter()
        # Bumped by reset(), so an answer that arrives late cannot touch new recordings.
        self._generation = 0
        self._delay = _checked_delay(delay)
        self._active = 0
        self._peak = 0
        self._limit_share = 0.0
        self._limit_retry_after = "1"
        self._limit_credit = 0.0
        # (answered at, Retry-After ends at) of every 429 with a Retry-After, wall clock.
        self._windows: list[tuple[float, float]] = []

    # lifecycle

    def start(self) -> Collector:
        """Bind the socket and serve from a daemon thread; return self."""
        with self._cond:
            if self._server is not None:
                raise CollectorError("the collector is already running")
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            server = _Server((self._host, self._port), self, family)
            # Remember the port, so a restart keeps the URL clients were given.
            self._port = server.server_address[1]
            if self.token_endpoint is not None and self.token_endpoint.audience is None:
                self.token_endpoint.audience = self.url
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": _POLL_INTERVAL},
                name=f"durable-analytics-collector:{self._port}",
                daemon=True,
            )
            self._server, self._thread = server, thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every connection, answering no pending request.

        Idempotent. Delayed and hanging requests are released without an answer and
        kept-alive connections are closed, so this returns in well under a second.
        """
        with self._cond:
            server, thread = self._server, self._thread
            if server is None or thread is None:
                return
            self._server = self._thread = None
            server.stopping.set()
            connections = dict(server.connections)
        server.shutdown()
        for connection in connections:
            shut(connection)
        server.server_close()
        thread.join()
        deadline = time.monotonic() + _HANDLER_GRACE
        for handler in connections.values():
            handler.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            # Connections accepted while stopping close themselves (see _track).
            remaining = max(0.0, deadline - time.monotonic())
            self._cond.wait_for(lambda: not server.connections, timeout=remaining)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        # Never the write key.
        state = "running" if self._server is not None else "stopped"
        return f"<Collector {self._host}:{self._port} {state}, {self.requests} requests>"

    @property
    def port(self) -> int:
        """The TCP port; known once started (or when given explicitly)."""
        if not self._port:
            raise CollectorError("the collector has no port before start()")
        return self._port

    @property
    def url(self) -> str:
        """The base URL to give a client as its ``host``, e.g. ``http://127.0.0.1:8765``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    # scripting

    def script(self, *replies: Reply | int) -> None:
        """Append replies to the script; each request that reaches it consumes one.

        An ``int`` means ``Reply(status=int)``. Once the script is used up, the default
        reply answers.
        """
        converted = [as_reply(reply) for reply in replies]
        with self._cond:
            self._script.extend(converted)

    def set_default(self, reply: Reply | int) -> None:
        """Set the reply used when the script is empty (initially ``Reply(200)``)."""
        converted = as_reply(reply)
        with self._cond:
            self._default = converted

    def set_delay(self, delay: float) -> None:
        """Hold every answer ``delay`` seconds from now on (0: answer at once)."""
        checked = _checked_delay(delay)
        with self._cond:
            self._delay = checked

    def rate_limit(self, share: float, retry_after: str = "1") -> None:
        """Answer ``share`` (0-1) of the requests 429 with ``Retry-After: retry_after``.

        Spread evenly (0.5: every other request), and only over requests the script and the
        default reply would answer: bad auth, bad bodies and rejected ids keep their status.
        ``rate_limit(0)`` turns it off.
        """
        if not (isinstance(share, (int, float)) and 0 <= share <= 1):
            raise ValueError(f"share must be a number from 0 to 1, got {share!r}")
        with self._cond:
            self._limit_share = float(share)
            self._limit_retry_after = str(retry_after)
            self._limit_credit = 0.0

    @property
    def peak_concurrency(self) -> int:
        """The most requests the collector was answering at the same time so far."""
        with self._cond:
            return self._peak

    @property
    def in_flight(self) -> int:
        """How many requests the collector is answering right now."""
        with self._cond:
            return self._active

    @property
    def retry_after_windows(self) -> list[tuple[float, float]]:
        """``(answered at, ends at)`` of every 429 answered with a Retry-After (wall clock)."""
        with self._cond:
            return list(self._windows)

    def requests_inside_retry_after(self, grace: float = 0.05) -> int:
        """Requests that arrived while a Retry-After the collector sent was still running.

        A request that arrives within ``grace`` seconds after the 429 left was already on
        its way before the client could read the answer, and is not counted.
        """
        with self._cond:
            windows = list(self._windows)
            times = [b.received_at for b in self._batches]
        return sum(1 for t in times if any(start + grace < t < end for start, end in windows))

    def reject_message_ids(self, *message_ids: str, status: int = 400) -> None:
        """Answer ``status`` to every batch holding one of these messageIds.

        Takes precedence over the script (without consuming it); the JSON error body
        names the offending ids. Use it to test how a client isolates one bad message.
        """
        as_reply(status)  # validates the status
        with self._cond:
            self._rejected.update(dict.fromkeys(message_ids, status))

    def reset(self) -> None:
        """Forget all recordings, the script, rejected ids, and restore the 200 default."""
        with self._cond:
            self._generation += 1
            self._script.clear()
            self._default = Reply()
            self._rejected.clear()
            self._batches = []
            self._all_ids = collections.Counter()
            self._accepted_ids = collections.Counter()
            self._peak = self._active
            self._limit_share = 0.0
            self._limit_credit = 0.0
            self._windows = []
            self._cond.notify_all()

    # recordings

    @property
    def batches(self) -> list[ReceivedBatch]:
        """Every request to the batch endpoint so far, in arrival order (a new list)."""
        with self._cond:
            return list(self._batches)

    @property
    def requests(self) -> int:
        """How many requests reached the batch endpoint, whatever they were answered."""
        with self._cond:
            return len(self._batches)

    def messages(self, *, accepted_only: bool = True) -> list[dict[str, Any]]:
        """Every message of every batch, in order; by default only of batches answered 2xx."""
        with self._cond:
            return [
                message
                for batch in self._batches
                if not accepted_only or _is_success(batch.status)
                for message in batch.messages
            ]

    def message_ids(self, *, accepted_only: bool = True) -> collections.Counter[str]:
        """How many times each messageId was received (by default: in 2xx-answered batches).

        A count above 1 means the client sent that message again.
        """
        with self._cond:
            return collections.Counter(self._accepted_ids if accepted_only else self._all_ids)

    def wait_for_messages(
        self, count: int, timeout: float = 10.0, *, accepted_only: bool = True
    ) -> bool:
        """Block until at least ``count`` distinct messageIds arrived; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: len(self._accepted_ids if accepted_only else self._all_ids) >= count,
                timeout,
            )

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` requests reached the batch endpoint; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._batches) >= count, timeout)

    # called by the handler threads

    def _begin(self) -> None:
        with self._cond:
            self._active += 1
            self._peak = max(self._peak, self._active)

    def _end(self) -> None:
        with self._cond:
            self._active -= 1

    def _rate_limited(self, reply: Reply, answered_at: float) -> None:
        retry_after = {k.lower(): v for k, v in reply.headers.items()}.get("retry-after")
        try:
            seconds = float(retry_after) if retry_after is not None else None
        except ValueError:
            seconds = None
        if seconds is None:
            return
        with self._cond:
            self._windows.append((answered_at, answered_at + seconds))

    def _track(self, server: _Server, connection: socket.socket) -> None:
        with self._cond:
            server.connections[connection] = threading.current_thread()
            stopping = server.stopping.is_set()
        if stopping:
            # Accepted just as stop() listed the connections: close it here instead.
            shut(connection)

    def _untrack(self, server: _Server, connection: socket.socket) -> None:
        with self._cond:
            server.connections.pop(connection, None)
            self._cond.notify_all()

    def _receive(
        self, path: str, header_items: Iterable[tuple[str, str]], raw: bytes
    ) -> tuple[Reply, _Pending | None]:
        """Decode and record one batch request; return the reply and, if late, its token."""
        received_at = time.time()
        headers = _Headers(header_items)
        authorized = is_authorized(
            headers.get("authorization"),
            self._write_key,
            self._expected_auth,
            self.token_endpoint,
        )
        body, messages, problem = decode_batch(headers, raw)
        if not authorized:
            problem = error_reply(401, "missing or wrong write key")

        with self._cond:
            if problem is None and self._rejected:
                bad = [mid for mid in _message_ids(messages) if mid in self._rejected]
                if bad:
                    problem = error_reply(
                        self._rejected[bad[0]], f"rejected messageId {bad[0]}", messageIds=bad
                    )
            if problem is not None:
                reply = problem
            elif self._script:
                reply = self._script.popleft()
            else:
                reply = self._default
            if problem is None and self._limit_share:
                self._limit_credit += self._limit_share
                if self._limit_credit >= 1.0:
                    self._limit_credit -= 1.0
                    reply = Reply(
                        429,
                        error_reply(429, "rate limited").body,
                        {"Retry-After": self._limit_retry_after},
                        delay=reply.delay,
                    )
            if self._delay:
                reply = dataclasses.replace(reply, delay=reply.delay + self._delay)
            late = reply.hang or bool(reply.delay)
            status = 0 if late else reply.status
            pending = _Pending(self._generation, len(self._batches)) if late else None
            self._batches.append(
                ReceivedBatch(
                    received_at=received_at,
                    path=path,
                    headers=headers,
                    raw_body=raw,
                    body=body,
                    messages=messages,
                    status=status,
                    authorized=authorized,
                )
            )
            ids = list(_message_ids(messages))
            self._all_ids.update(ids)
            if _is_success(status):
                self._accepted_ids.update(ids)
            self._cond.notify_all()
        return reply, pending

    def _answered(self, pending: _Pending, status: int) -> None:
        """Record the status of a delayed reply, just before it is sent."""
        with self._cond:
            if pending.generation != self._generation:
                return
            batch = self._batches[pending.index]
            self._batches[pending.index] = dataclasses.replace(batch, status=status)
            if _is_success(status):
                self._accepted_ids.update(_message_ids(batch.messages))
            self._cond.notify_all()


def _checked_delay(delay: float) -> float:
    if isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise ValueError(f"delay must be a number of seconds, got {delay!r}")
    if not (math.isfinite(delay) and delay >= 0):
        raise ValueError(f"delay must be a finite number >= 0, got {delay!r}")
    return float(delay)
