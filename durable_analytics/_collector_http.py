"""The Collector's HTTP side: its server, the handler of one connection, and the wire rules.

Private: ``durable_analytics.testing`` is the public facade (``Collector``, ``Reply``). The
handler threads read and frame each request here, and hand the batches to the collector
through ``CollectorSide``, which keeps the recordings and decides the answers.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import math
import socket
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from ._token_endpoint import TOKEN_PATH, TokenEndpoint

__all__ = [
    "BATCH_PATHS",
    "CollectorSide",
    "Headers",
    "Pending",
    "Reply",
    "Server",
    "as_reply",
    "decode_batch",
    "error_reply",
    "is_authorized",
    "shut",
]

BATCH_PATHS = frozenset({"/v1/batch", "/v1/batch/"})
# What a request's head may hold, as the standard library's server allows.
_MAX_LINE = 65536
_MAX_HEADERS = 100
# Statuses whose responses must not carry a body (RFC 9110), or the client would read
# the body as the start of the next response on a kept-alive connection.
_BODYLESS_STATUSES = frozenset({204, 304})


@dataclass(frozen=True)
class Reply:
    """One scripted answer of the collector.

    ``status`` must be 200-599. ``body`` is sent as is (``str`` as UTF-8); ``headers`` are
    added to the response, e.g. ``{"Retry-After": "3"}``. ``delay`` waits that many
    seconds before answering. ``hang=True`` reads the request and never answers, until
    the collector stops (then the connection is closed without a response).
    """

    status: int = 200
    body: bytes | str = b'{"success":true}'
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hang: bool = False

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"Reply status must be 200-599, got {self.status!r}")
        if not (math.isfinite(self.delay) and self.delay >= 0):
            raise ValueError(f"Reply delay must be a finite number >= 0, got {self.delay!r}")


class Headers(Mapping[str, str]):
    """Request headers with case-insensitive lookup; keys are stored lower-cased."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._items = {name.lower(): value for name, value in items}

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        # The Authorization header carries the write key: keep it out of test output.
        shown = {
            name: "<redacted>" if name == "authorization" else value
            for name, value in self._items.items()
        }
        return f"Headers({shown!r})"


def error_reply(status: int, message: str, **extra: Any) -> Reply:
    """A JSON error answer, as the Segment API words one."""
    body = json.dumps({"success": False, "code": status, "message": message, **extra})
    return Reply(status=status, body=body)


def as_reply(reply: Reply | int) -> Reply:
    """A Reply; an ``int`` is ``Reply(status=int)``."""
    if isinstance(reply, Reply):
        return reply
    return Reply(status=reply)


@dataclass
class Pending:
    """A recorded request whose status is only known once it is answered."""

    generation: int
    index: int


class CollectorSide(Protocol):
    """What the handler threads call on the collector that owns the server."""

    token_endpoint: TokenEndpoint | None

    def _track(self, server: Server, connection: socket.socket) -> None: ...

    def _untrack(self, server: Server, connection: socket.socket) -> None: ...

    def _begin(self) -> None: ...

    def _end(self) -> None: ...

    def _receive(
        self, path: str, header_items: Iterable[tuple[str, str]], raw: bytes
    ) -> tuple[Reply, Pending | None]: ...

    def _answered(self, pending: Pending, status: int) -> None: ...

    def _rate_limited(self, reply: Reply, answered_at: float) -> None: ...


def decode_batch(headers: Headers, raw: bytes) -> tuple[Any, list[dict[str, Any]], Reply | None]:
    """The JSON body and its batch of messages; with the error reply when they are not valid.

    The body is gunzipped when ``Content-Encoding: gzip`` says so; a batch is an object
    with a ``batch`` list of objects.
    """
    body: Any = None
    encoding = headers.get("content-encoding", "").strip().lower()
    decoded = raw
    if encoding == "gzip":
        try:
            decoded = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            return body, [], error_reply(400, "body is not valid gzip")
    elif encoding not in ("", "identity"):
        return body, [], error_reply(415, f"unsupported Content-Encoding: {encoding}")
    try:
        body = json.loads(decoded)
    except (ValueError, RecursionError):
        return body, [], error_reply(400, "body is not valid JSON")
    batch = body.get("batch") if isinstance(body, dict) else None
    if isinstance(batch, list) and all(isinstance(item, dict) for item in batch):
        return body, batch, None
    return body, [], error_reply(400, 'body must be an object with a "batch" list of objects')


def is_authorized(
    header: str | None,
    write_key: str | None,
    expected: str | None,
    token_endpoint: TokenEndpoint | None,
) -> bool:
    """Whether an Authorization header is the write key's Basic auth or a live token.

    ``expected`` is the write key's header as clients send it (the quick match); without
    a write key any well-formed Basic header is accepted.
    """
    if header is None:
        return False
    if token_endpoint is not None and token_endpoint.authorized(header):
        return True
    if header == expected:
        return True
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        credentials = base64.b64decode(token.strip(), validate=True).decode()
    except ValueError:
        # (binascii.Error, UnicodeDecodeError, and the ValueError of a str past ASCII: a
        # header byte past 0x7F arrives as one.)
        return False
    if write_key is None:
        return ":" in credentials
    return credentials == f"{write_key}:"


class Server(ThreadingHTTPServer):
    """One run of a Collector: the listening socket and its connections."""

    daemon_threads = True
    # stop() must not wait for handler threads: some of them hang on purpose.
    block_on_close = False
    allow_reuse_address = True
    # socketserver's default backlog is 5: a client opening many connections at once (a
    # pipelining one) had SYNs dropped and retried by the kernel a second later, which
    # showed up as one-second stalls and as requests arriving a second late.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], collector: CollectorSide, family: int) -> None:
        self.address_family = family
        self.collector = collector
        # Set by stop(): wakes delayed and hanging handlers.
        self.stopping = threading.Event()
        # Open connections and their handler threads, so stop() can close idle
        # keep-alive ones and wait for the threads to end.
        self.connections: dict[socket.socket, threading.Thread] = {}
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out or disconnect are routine in tests of retry logic;
        # only real bugs of the handler deserve a traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Answers one connection; HTTP/1.1 so clients keep it alive between batches."""

    protocol_version = "HTTP/1.1"
    # Answer at once: Nagle must not hold a response back waiting for the client's ACK.
    disable_nagle_algorithm = True
    server: Server
    raw_requestline: bytes  # (set by the standard library before ``parse_request``)

    def setup(self) -> None:
        super().setup()
        self.server.collector._track(self.server, self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.collector._untrack(self.server, self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        # A line on stderr per request would dominate the cost of a benchmark run.
        return

    def parse_request(self) -> bool:
        """Read the request line and headers into ``command``, ``path`` and ``headers``.

        The standard library parses headers with the ``email`` package: 60 % of the
        collector's CPU per batch, which on a shared machine is CPU the client under test
        does not get. Only what clients of an HTTP/1.x API send is accepted; the answers to
        what is refused are the standard library's (400, 431, 505), with a status line.
        """
        self.command = None  # type: ignore[assignment]  # (set in case of an error answer)
        # (Never HTTP/0.9, the standard library's default: its error answers then lack a
        # status line.)
        self.request_version = "HTTP/1.1"
        self.close_connection = True
        line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = line
        words = line.split()
        if not words:
            return False
        if len(words) != 3:
            self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({line!r})")
            return False
        command, path, version = words
        major, dot, minor = version[5:].partition(".")
        if not (version.startswith("HTTP/") and dot and _is_number(major) and _is_number(minor)):
            self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request version ({version!r})")
            return False
        if int(major) != 1:
            self.send_error(
                HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"Invalid HTTP version ({version})"
            )
            return False
        self.command, self.path, self.request_version = command, path, version
        fields: list[tuple[str, str]] = []
        lines = 0
        while True:
            raw = self.rfile.readline(_MAX_LINE + 1)
            if len(raw) > _MAX_LINE:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long")
                return False
            if raw in (b"\r\n", b"\n", b""):
                break
            # Folded lines count too: else a head of endless ones grows a value without bound.
            lines += 1
            if lines > _MAX_HEADERS:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers")
                return False
            text = str(raw, "iso-8859-1")
            if text[0] in " \t" and fields:  # an obsolete folded continuation line
                name, value = fields[-1]
                fields[-1] = (name, f"{value} {text.strip()}")
                continue
            name, colon, value = text.partition(":")
            if not colon or not name or name != name.strip():
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad header line ({text.rstrip()!r})")
                return False
            fields.append((name, value.strip()))
        lengths = {value for name, value in fields if name.lower() == "content-length"}
        if len(lengths) > 1:
            # Whichever one is believed, the rest of the stream would be framed as another
            # request on this connection (RFC 9112 6.3): refuse it and close.
            self.send_error(HTTPStatus.BAD_REQUEST, "Conflicting Content-Length headers")
            return False
        headers = Headers(fields)
        self.headers = headers  # type: ignore[assignment]
        connection = headers.get("connection", "").lower()
        self.close_connection = connection == "close" or (
            minor == "0" and connection != "keep-alive"
        )
        if headers.get("expect", "").lower() == "100-continue" and minor != "0":
            return self.handle_expect_100()
        return True

    def do_POST(self) -> None:
        raw = self._read_body()
        if raw is None:
            return
        path = self.path
        endpoint = self.server.collector.token_endpoint
        if endpoint is not None and path.split("?", 1)[0] == TOKEN_PATH:
            status, headers, body = endpoint.handle("POST", dict(self.headers.items()), raw)
            self._send(Reply(status, body, headers))
            return
        if path.split("?", 1)[0] not in BATCH_PATHS:
            self._send(error_reply(404, f"no such path: {path}"))
            return
        collector = self.server.collector
        collector._begin()
        ended = False
        try:
            reply, pending = collector._receive(path, self.headers.items(), raw)
            if reply.hang or reply.delay:
                stopped = self.server.stopping.wait(None if reply.hang else reply.delay)
                if stopped or reply.hang:
                    # Never answered: the client sees the connection close when stop() runs.
                    self.close_connection = True
                    return
                if pending is not None:
                    collector._answered(pending, reply.status)
            # Counted out before the answer leaves: a client that reuses its slot at once
            # must not be seen with one request too many.
            ended = True
            collector._end()
            # A Retry-After runs from when the answer leaves, stamped before it is written:
            # stamped after, a handler thread the GIL held back would date the window late,
            # and a client that waited it out exactly would seem to have come back early.
            answered_at = time.time()
            self._send(reply)
            if reply.status == 429:
                collector._rate_limited(reply, answered_at)
        finally:
            if not ended:
                collector._end()

    def _not_the_api(self) -> None:
        if self._read_body() is None:
            return
        if self.path.split("?", 1)[0] in BATCH_PATHS:
            reply = error_reply(405, "use POST")
            self._send(Reply(reply.status, reply.body, {"Allow": "POST"}))
        else:
            self._send(error_reply(404, f"no such path: {self.path}"))

    do_GET = do_PUT = do_PATCH = do_DELETE = do_HEAD = _not_the_api

    def _read_body(self) -> bytes | None:
        """Read exactly the request body; None after answering a request we cannot frame."""
        if "transfer-encoding" in self.headers:
            # Without chunked decoding the rest of the stream cannot be framed: close it.
            self.close_connection = True
            self._send(error_reply(411, "Content-Length required"))
            return None
        length_header = self.headers.get("Content-Length", "0")
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send(error_reply(400, f"bad Content-Length: {length_header!r}"))
            return None
        raw = self.rfile.read(length) if length else b""
        if len(raw) != length:
            # The client went away mid-body: nobody is left to answer.
            self.close_connection = True
            return None
        return raw

    def _send(self, reply: Reply) -> None:
        body = reply.body.encode() if isinstance(reply.body, str) else reply.body
        status = reply.status
        phrase = self.responses.get(status, ("",))[0]
        lines = [f"HTTP/1.1 {status} {phrase}"]
        names = set()
        for name, value in reply.headers.items():
            lines.append(f"{name}: {value}")
            lowered = name.lower()
            names.add(lowered)
            if lowered == "connection" and value.strip().lower() == "close":
                self.close_connection = True
        if status in _BODYLESS_STATUSES or self.command == "HEAD":
            body = b""
        if "content-type" not in names:
            lines.append("Content-Type: application/json")
        if "content-length" not in names and status not in _BODYLESS_STATUSES:
            lines.append(f"Content-Length: {len(body)}")
        if self.close_connection and "connection" not in names:
            lines.append("Connection: close")
        # One write per response: fewer syscalls and no Nagle/delayed-ACK stall.
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + body)


def _is_number(text: str) -> bool:
    """Whether ``text`` is a version number as the standard library's server takes one:
    ASCII digits (``str.isdigit`` also takes ``²``, which ``int`` refuses), at most 10."""
    return text.isascii() and text.isdigit() and len(text) <= 10


def shut(connection: socket.socket) -> None:
    """Wake a handler blocked on this socket; its own thread then closes it."""
    # OSError: its handler already closed it.
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
