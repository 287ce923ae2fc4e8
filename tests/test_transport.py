"""Tests of durable_analytics._transport: the HTTP request, its classification, Retry-After.

Every request goes to a real server on 127.0.0.1: the Collector, or a tiny socket server
where a test needs a misbehaving one (redirects, endless bodies).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

import pytest
from conftest import WRITE_KEY

from durable_analytics import __version__
from durable_analytics._transport import (
    MAX_RESPONSE_BYTES,
    MAX_RETRY_AFTER,
    HTTPTransport,
    batch_body,
    classify,
    envelope_overhead,
    parse_retry_after,
)
from durable_analytics._transport._wire import Response, WireClient
from durable_analytics.exceptions import RetryableError
from durable_analytics.testing import Collector, Reply

SENT_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def body_of(*message_ids: str) -> bytes:
    return batch_body(
        [
            json.dumps({"type": "track", "event": "E", "userId": "u", "messageId": m}).encode()
            for m in message_ids
        ]
    )


class RawServer:
    """A one-purpose TCP server on 127.0.0.1: ``handler(conn)`` answers each connection."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.closed_by_client = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handler(conn)

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self._accept.join()
        for t in self._threads:
            t.join(1.0)


def read_request(conn: socket.socket) -> bytes:
    """Read one HTTP request (head and Content-Length body) from ``conn``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[socket.socket], None]], RawServer]]:
    servers: list[RawServer] = []

    def make(handler: Callable[[socket.socket], None]) -> RawServer:
        server = RawServer(handler)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


# ---------------------------------------------------------------- the request


def test_post_sends_basic_auth_user_agent_content_type_and_the_batch_envelope(
    collector: Collector,
) -> None:
    before = datetime.now(timezone.utc)
    outcome = HTTPTransport().post(collector.url, WRITE_KEY, body_of("m1", "m2"))
    after = datetime.now(timezone.utc)

    assert outcome.ok
    assert (outcome.kind, outcome.status, outcome.error) == ("ok", 200, "")
    [batch] = collector.batches
    assert batch.path == "/v1/batch"
    assert batch.authorized
    token = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    assert batch.headers["Authorization"] == f"Basic {token}"
    assert batch.headers["User-Agent"] == f"durable-analytics/{__version__}"
    assert batch.headers["Content-Type"] == "application/json"
    assert "Content-Encoding" not in batch.headers
    assert set(batch.body) == {"batch", "sentAt"}
    assert [m["messageId"] for m in batch.body["batch"]] == ["m1", "m2"]
    sent_at = batch.body["sentAt"]
    assert SENT_AT.match(sent_at), sent_at
    parsed = datetime.fromisoformat(sent_at.replace("Z", "+00:00"))
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= parsed <= after


def test_the_stored_messages_go_out_byte_for_byte_with_a_fresh_sent_at() -> None:
    bodies = [b'{"type":"track","messageId":"a"}', b'{"type":"track","messageId":"b"}']
    body = batch_body(bodies)
    assert body.startswith(b'{"batch":[' + bodies[0] + b"," + bodies[1] + b'],"sentAt":"')
    assert len(body) == envelope_overhead() + len(bodies[0]) + 1 + len(bodies[1])
    assert json.loads(body)["batch"] == [json.loads(b) for b in bodies]


def test_gzip_sends_content_encoding_and_the_collector_decodes_it(collector: Collector) -> None:
    body = body_of(*(f"m{i}" for i in range(50)))
    outcome = HTTPTransport(gzip=True).post(collector.url, WRITE_KEY, body)

    assert outcome.ok
    [batch] = collector.batches
    assert batch.headers["Content-Encoding"] == "gzip"
    assert batch.raw_body[:2] == b"\x1f\x8b"
    assert len(batch.raw_body) < len(body)
    assert gzip.decompress(batch.raw_body) == body
    assert len(collector.messages()) == 50


def test_one_transport_reuses_its_connection_between_batches(collector: Collector) -> None:
    transport = HTTPTransport()
    for i in range(5):
        assert transport.post(collector.url, WRITE_KEY, body_of(f"m{i}")).ok
    assert collector.requests == 5
    transport.close()


# ---------------------------------------------------------------- redirects


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_is_a_configuration_error(
    collector: Collector, raw_server: Callable[..., RawServer], status: int
) -> None:
    def redirect(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(
            f"HTTP/1.1 {status} Moved\r\nLocation: {collector.url}/v1/batch\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )

    server = raw_server(redirect)
    outcome = HTTPTransport().post(server.url, WRITE_KEY, body_of("m1"))

    assert (outcome.kind, outcome.status) == ("config", status)
    assert server.connections == 1
    time.sleep(0.05)  # a followed redirect would have reached the collector by now
    assert collector.requests == 0  # the write key never went to the second host


# ---------------------------------------------------------------- response bodies


def test_a_response_body_is_read_to_at_most_64_kb_and_the_connection_dropped(
    raw_server: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server promises 100 MB, sends 200 KB and then nothing: reading stops at 64 KB."""
    answers: list[Response] = []
    real_post = WireClient.post

    def spy(self: WireClient, *args: Any, **kwargs: Any) -> Response:
        answer = real_post(self, *args, **kwargs)
        answers.append(answer)
        return answer

    monkeypatch.setattr(WireClient, "post", spy)
    released = threading.Event()

    def endless(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 100000000\r\n\r\n")
        conn.sendall(b"x" * 200_000)
        conn.settimeout(5.0)
        try:
            if conn.recv(1) == b"":  # the client closed its side instead of reading on
                released.set()
        except OSError:
            released.set()

    server = raw_server(endless)
    started = time.monotonic()
    outcome = HTTPTransport(timeout=5.0).post(server.url, WRITE_KEY, body_of("m1"))
    elapsed = time.monotonic() - started

    assert elapsed < 2.0  # it did not wait for the 100 MB (or the 5 s read timeout)
    assert (outcome.kind, outcome.status) == ("reject", 400)
    assert outcome.excerpt == "x" * 2000  # the excerpt kept for dead letters is short
    [answer] = answers
    assert len(answer.body) == MAX_RESPONSE_BYTES
    assert not answer.complete
    assert released.wait(2.0)  # the half-read connection is closed, never reused


def test_a_short_error_body_becomes_the_excerpt(collector: Collector) -> None:
    collector.script(Reply(422, body='{"success":false,"message":"bad timestamp"}'))
    outcome = HTTPTransport().post(collector.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("reject", 422)
    assert outcome.excerpt == '{"success":false,"message":"bad timestamp"}'
    assert "HTTP 422" in outcome.error
    assert "bad timestamp" in outcome.error


def test_a_write_key_echoed_by_the_server_is_scrubbed_from_the_excerpt(
    collector: Collector,
) -> None:
    collector.script(Reply(401, body=f'{{"message":"unknown key {WRITE_KEY}"}}'))
    outcome = HTTPTransport().post(collector.url, WRITE_KEY, body_of("m1"))
    assert outcome.status == 401
    assert WRITE_KEY not in outcome.excerpt
    assert WRITE_KEY not in outcome.error
    assert "<write key>" in outcome.excerpt


def test_a_write_key_spelled_with_json_escapes_is_scrubbed_before_it_is_decoded(
    collector: Collector,
) -> None:
    """A server writing the echoed key as ``\\u0063…`` (or ``/`` as ``\\/``): the decoded
    ``message`` an ``APIError`` shows must not hold it either."""
    escaped = "".join(f"\\u{ord(c):04x}" for c in WRITE_KEY)
    token = base64.b64encode(f"{WRITE_KEY}:".encode()).decode().replace("/", "\\/")
    collector.script(Reply(500, body=f'{{"code":"x","message":"{escaped} Basic {token}"}}'))
    outcome = HTTPTransport().post(collector.url, WRITE_KEY, body_of("m1"))
    error = RetryableError("failed", status=outcome.status, excerpt=outcome.excerpt)
    assert error.code == "x"
    assert error.message == "<write key> Basic <write key>"
    assert WRITE_KEY not in outcome.excerpt


def test_an_answer_with_harmless_escapes_is_kept_byte_for_byte(collector: Collector) -> None:
    body = '{"message": "caf\\u00e9 \\/ \\"quoted\\""}'
    collector.script(Reply(500, body=body))
    outcome = HTTPTransport().post(collector.url, WRITE_KEY, body_of("m1"))
    assert outcome.excerpt == body


# ---------------------------------------------------------------- network failures


def test_a_read_timeout_is_retryable(collector: Collector) -> None:
    collector.script(Reply(hang=True))
    started = time.monotonic()
    outcome = HTTPTransport(timeout=0.3).post(collector.url, WRITE_KEY, body_of("m1"))
    elapsed = time.monotonic() - started

    assert (outcome.kind, outcome.status) == ("retry", None)
    assert "timed out" in outcome.error
    assert 0.25 <= elapsed < 1.5


def test_the_per_call_timeout_shortens_the_configured_one(collector: Collector) -> None:
    collector.script(Reply(delay=3.0))
    started = time.monotonic()
    outcome = HTTPTransport(timeout=10.0).post(collector.url, WRITE_KEY, body_of("m1"), timeout=0.2)
    assert outcome.kind == "retry"
    assert time.monotonic() - started < 1.5


def test_a_refused_connection_is_retryable_and_says_so(refused_url: str) -> None:
    host = refused_url
    outcome = HTTPTransport(timeout=2.0).post(host, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert outcome.error.startswith(f"cannot connect to {host}")
    assert WRITE_KEY not in outcome.error


def test_a_connection_closed_without_an_answer_is_retryable(
    raw_server: Callable[..., RawServer],
) -> None:
    def slam(conn: socket.socket) -> None:
        read_request(conn)

    server = raw_server(slam)
    outcome = HTTPTransport(timeout=2.0).post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert outcome.error


# ---------------------------------------------------------------- status classes


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (100, "config"),
        (200, "ok"),
        (201, "ok"),
        (202, "ok"),
        (204, "ok"),
        (299, "ok"),
        (301, "config"),
        (302, "config"),
        (304, "config"),
        (307, "config"),
        (308, "config"),
        (400, "reject"),
        (413, "reject"),
        (422, "reject"),
        (401, "config"),
        (403, "config"),
        (404, "config"),
        (405, "config"),
        (409, "config"),
        (415, "config"),
        (408, "retry"),
        (410, "retry"),
        (429, "retry"),
        (460, "retry"),
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
        (504, "retry"),
        (507, "retry"),
        (599, "retry"),
        (501, "config"),
        (505, "config"),
    ],
)
def test_classify_maps_every_status_class(status: int, kind: str) -> None:
    assert classify(status) == kind


@pytest.mark.parametrize("status", [200, 400, 401, 404, 408, 429, 500, 501, 503])
def test_post_classifies_the_real_answer(collector: Collector, status: int) -> None:
    collector.script(status)
    outcome = HTTPTransport().post(collector.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == (classify(status), status)
    assert outcome.ok is (status == 200)


def test_post_reads_retry_after_from_the_answer(collector: Collector) -> None:
    collector.script(Reply(429, headers={"Retry-After": "3"}))
    outcome = HTTPTransport().post(collector.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.retry_after) == ("retry", 3.0)


# ---------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5", 5.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("120", 120.0),
        ("300", 300.0),
        ("301", MAX_RETRY_AFTER),
        ("100000", MAX_RETRY_AFTER),
        ("1e999", MAX_RETRY_AFTER),
        ("-5", None),
        ("-0.5", None),
        ("nan", None),
        ("soon", None),
        ("Wed, 99 Foo 2024", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after_seconds_garbage_negative_and_cap(
    value: str | None, seconds: float | None
) -> None:
    assert parse_retry_after(value) == seconds


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 90, usegmt=True), now=now) == 90.0
    assert parse_retry_after(formatdate(now + 3600, usegmt=True), now=now) == MAX_RETRY_AFTER
    # A date in the past means "now", not garbage.
    assert parse_retry_after(formatdate(now - 60, usegmt=True), now=now) == 0.0
    # Without a zone the date is taken as UTC.
    naive = datetime.fromtimestamp(now + 30, timezone.utc).strftime("%a, %d %b %Y %H:%M:%S")
    assert parse_retry_after(naive, now=now) == 30.0
    # The real clock is used when none is given.
    real = parse_retry_after(formatdate(time.time() + 60, usegmt=True))
    assert real is not None
    assert 58.0 <= real <= 60.0


# ---------------------------------------------------------------- hygiene


def test_transport_repr_shows_no_secrets() -> None:
    transport = HTTPTransport(timeout=3.0, gzip=True)
    assert repr(transport) == "HTTPTransport(timeout=3.0, gzip=True)"
