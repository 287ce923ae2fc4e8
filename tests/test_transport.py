"""Tests of durable_analytics._transport: the HTTP request, its classification, Retry-After.

Every request goes to a real server on 127.0.0.1: the Collector, or a tiny socket server
where a test needs a misbehaving one (redirects, endless bodies).
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from _rawserver import RawServer, make_certificate, read_request
from conftest import WRITE_KEY, run_python

from durable_analytics import __version__
from durable_analytics._oauth import OAuthSettings
from durable_analytics._transport import (
    MAX_RESPONSE_BYTES,
    MAX_RETRY_AFTER,
    DestinationOverride,
    HTTPTransport,
    _wire,
    batch_body,
    classify,
    envelope_overhead,
    parse_retry_after,
)
from durable_analytics._transport._wire import Response, WireClient
from durable_analytics.exceptions import RetryableError
from durable_analytics.testing import Collector, Reply, generate_key_pair

#: As segment-analytics-python writes it: microseconds and "+00:00".
SENT_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")


def body_of(*message_ids: str) -> bytes:
    return batch_body(
        [
            json.dumps({"type": "track", "event": "E", "userId": "u", "messageId": m}).encode()
            for m in message_ids
        ]
    )


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
    parsed = datetime.fromisoformat(sent_at)
    assert before <= parsed <= after


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


# ---------------------------------------------------------------- the HTTP/1.1 client

OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n"
    b'{"success":true}'
)


class Script:
    """A keep-alive handler: the n-th request (over all connections) gets ``answers[n]``.

    An answer is bytes to send, or a callable given the connection (it may close it). The
    connection is kept open for more requests until the client closes it or ``answers``
    runs out. ``heads`` records every request head.
    """

    def __init__(self, *answers: bytes | Callable[[socket.socket], None]) -> None:
        self.answers = list(answers)
        self.heads: list[bytes] = []
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, conn: socket.socket) -> None:
        try:
            while True:
                head = read_request(conn)
                if not head:
                    return
                with self._lock:
                    self.heads.append(head)
                    n = len(self.heads) - 1
                if n >= len(self.answers):
                    return
                answer = self.answers[n]
                if callable(answer):
                    answer(conn)
                    if conn.fileno() < 0:
                        return
                else:
                    conn.sendall(answer)
        finally:
            self.done.set()


def close_after(answer: bytes, closed: threading.Event) -> Callable[[socket.socket], None]:
    """Answer, then close the connection (the server's idle keep-alive timeout)."""

    def run(conn: socket.socket) -> None:
        conn.sendall(answer)
        conn.close()
        closed.set()

    return run


def reset_after(answer: bytes, closed: threading.Event) -> Callable[[socket.socket], None]:
    """Answer, then close with a TCP reset (SO_LINGER 0)."""

    def run(conn: socket.socket) -> None:
        conn.sendall(answer)
        time.sleep(0.05)  # let the answer reach the client before the reset
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        closed.set()

    return run


def slam(conn: socket.socket) -> None:
    """Close without answering (the request was read whole)."""
    conn.close()


def test_a_kept_alive_connection_the_server_closed_while_idle_is_not_reused(
    raw_server: Callable[..., RawServer],
) -> None:
    closed = threading.Event()
    script = Script(close_after(OK, closed), OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    assert transport.post(server.url, WRITE_KEY, body_of("m1")).ok
    assert closed.wait(2.0)
    time.sleep(0.05)  # the FIN is in the client's socket
    assert transport.post(server.url, WRITE_KEY, body_of("m2")).ok
    assert (server.connections, len(script.heads)) == (2, 2)
    transport.close()


def test_a_reused_connection_that_breaks_after_the_request_went_out_is_retried_later_not_resent(
    raw_server: Callable[..., RawServer],
) -> None:
    """The server may have taken the batch: the outcome is a retry (the queue's decision,
    with its backoff), never a second copy sent at once on another connection."""
    script = Script(OK, slam, OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    assert transport.post(server.url, WRITE_KEY, body_of("m1")).ok
    outcome = transport.post(server.url, WRITE_KEY, body_of("m2"))
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert outcome.error.startswith(f"network error talking to {server.url}")
    time.sleep(0.1)  # a resend would have arrived by now
    assert (server.connections, len(script.heads)) == (1, 2)
    transport.close()


def test_a_reused_connection_whose_request_cannot_be_written_is_sent_once_on_a_new_one(
    raw_server: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server reset the connection between the idle check and the send (the check is
    made to miss it here, as a race would): the write fails, so the server never had the
    request whole, and sending it on a new connection cannot duplicate it."""
    closed = threading.Event()
    script = Script(reset_after(OK, closed), OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    assert transport.post(server.url, WRITE_KEY, body_of("m1")).ok
    assert closed.wait(2.0)
    time.sleep(0.05)  # the reset is in the client's socket
    monkeypatch.setattr(_wire, "_idle_and_open", lambda sock: True)
    outcome = transport.post(server.url, WRITE_KEY, body_of("m2"))
    assert outcome.ok, outcome.error
    assert server.connections == 2
    assert [b'"m2"' in h for h in script.heads] == [False, False]  # heads only
    assert len(script.heads) == 2  # m1 on the first connection, m2 once on the second
    transport.close()


@pytest.mark.parametrize(
    ("answer", "connections"),
    [
        (OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1), 2),
        (OK.replace(b"\r\n\r\n", b"\r\nCONNECTION: Close\r\n\r\n", 1), 2),
        (OK.replace(b"HTTP/1.1", b"HTTP/1.0"), 2),
        (
            OK.replace(b"HTTP/1.1", b"HTTP/1.0").replace(
                b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n", 1
            ),
            1,
        ),
        (OK, 1),
    ],
    ids=["close", "close-any-case", "http/1.0", "http/1.0-keep-alive", "http/1.1"],
)
def test_a_connection_is_reused_only_when_the_answer_lets_it(
    raw_server: Callable[..., RawServer], answer: bytes, connections: int
) -> None:
    """``Connection: close`` and a plain HTTP/1.0 answer end the connection (the server
    here keeps it open anyway: the client must not send on it)."""
    script = Script(answer, answer)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    for i in range(2):
        assert transport.post(server.url, WRITE_KEY, body_of(f"m{i}")).ok
    assert (server.connections, len(script.heads)) == (connections, 2)
    transport.close()


def test_a_chunked_answer_is_read_whole_and_the_connection_reused(
    raw_server: Callable[..., RawServer],
) -> None:
    chunked = (
        b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n"
        b'7\r\n{"messa\r\n'
        b"a;name=value\r\n" + b'ge":"down' + b'"\r\n'
        b"2\r\n}\n\r\n"
        b"0\r\nX-Trailer: yes\r\n\r\n"
    )
    script = Script(chunked, OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    outcome = transport.post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("retry", 500)
    assert outcome.excerpt == '{"message":"down"}\n'
    assert transport.post(server.url, WRITE_KEY, body_of("m2")).ok
    assert server.connections == 1
    transport.close()


def test_a_chunked_answer_longer_than_the_cap_is_cut_and_the_connection_dropped(
    raw_server: Callable[..., RawServer],
) -> None:
    chunk = b"%x\r\n%s\r\n" % (40_000, b"y" * 40_000)
    answer = b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n"
    script = Script(answer, OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    outcome = transport.post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.excerpt) == ("reject", "y" * 2000)
    assert transport.post(server.url, WRITE_KEY, body_of("m2")).ok
    assert server.connections == 2
    transport.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n",
        b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxxxx\r\n0\r\n\r\n",
    ],
    ids=["bad-chunk-size", "chunk-longer-than-its-size"],
)
def test_an_unreadable_body_keeps_the_status_and_drops_the_connection(
    raw_server: Callable[..., RawServer], answer: bytes
) -> None:
    script = Script(answer, OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    outcome = transport.post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("reject", 400)
    assert outcome.excerpt == "<unreadable response body: ProtocolError>"
    assert transport.post(server.url, WRITE_KEY, body_of("m2")).ok
    assert server.connections == 2
    transport.close()


@pytest.mark.parametrize("status", [204, 304])
def test_an_answer_without_a_body_is_complete_at_its_head(
    raw_server: Callable[..., RawServer], status: int
) -> None:
    """204 and 304 have no body whatever their headers say; the connection carries on."""
    answer = b"HTTP/1.1 %d Nothing\r\nContent-Length: 10\r\n\r\n" % status
    script = Script(answer, OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    outcome = transport.post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.status, outcome.excerpt) == (status, "")
    assert transport.post(server.url, WRITE_KEY, body_of("m2")).ok
    assert server.connections == 1
    transport.close()


def test_a_body_framed_by_the_end_of_the_connection_is_read_to_it(
    raw_server: Callable[..., RawServer],
) -> None:
    def until_close(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 503 Busy\r\nContent-Type: text/plain\r\n\r\ncome back ")
        time.sleep(0.05)
        conn.sendall(b"later")
        conn.close()

    script = Script(until_close, OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    outcome = transport.post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status, outcome.excerpt) == ("retry", 503, "come back later")
    assert transport.post(server.url, WRITE_KEY, body_of("m2")).ok
    assert server.connections == 2
    transport.close()


def test_no_expect_header_is_sent_and_an_interim_100_answer_is_skipped(
    raw_server: Callable[..., RawServer],
) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
    script = Script(interim + OK)
    server = raw_server(script)
    outcome = HTTPTransport(timeout=5.0).post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("ok", 200)
    [head] = script.heads
    assert b"expect:" not in head.lower()
    assert head.startswith(b"POST /v1/batch HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{server.port}\r\n".encode() in head


def test_answer_headers_are_read_whatever_their_case(
    raw_server: Callable[..., RawServer],
) -> None:
    answer = b"HTTP/1.1 429 Slow Down\r\nrEtRy-AfTeR: 7\r\ncontent-LENGTH: 2\r\n\r\n{}"
    script = Script(answer)
    server = raw_server(script)
    outcome = HTTPTransport(timeout=5.0).post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status, outcome.retry_after) == ("retry", 429, 7.0)
    assert outcome.excerpt == "{}"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2xx OK\r\nContent-Length: 0\r\n\r\n",
        b"SPDY/3 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"<html>not http</html>\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nthis line has no colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
        b"HTTP/1.1 400 Bad\r\nContent-Length: many\r\n\r\n",
    ],
    ids=["status", "protocol", "html", "header", "two-lengths", "bad-content-length"],
)
def test_a_malformed_answer_is_a_retryable_network_error(
    raw_server: Callable[..., RawServer], answer: bytes
) -> None:
    script = Script(answer)
    server = raw_server(script)
    outcome = HTTPTransport(timeout=5.0).post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert outcome.error.startswith(f"network error talking to {server.url}: malformed")
    assert WRITE_KEY not in outcome.error


def test_a_malformed_answer_quoting_the_write_key_is_scrubbed_from_the_error(
    raw_server: Callable[..., RawServer],
) -> None:
    token = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    answer = f"HTTP/1.1 200 OK\r\nyour key {WRITE_KEY} Basic {token}\r\n\r\n".encode()
    server = raw_server(Script(answer))
    outcome = HTTPTransport(timeout=5.0).post(server.url, WRITE_KEY, body_of("m1"))
    assert outcome.error.startswith(f"network error talking to {server.url}: malformed")
    assert WRITE_KEY not in outcome.error
    assert token not in outcome.error
    assert "<write key>" in outcome.error


def test_an_answer_sent_slowly_cannot_hold_the_caller_past_the_timeout(
    raw_server: Callable[..., RawServer],
) -> None:
    """A byte every 50 ms would keep a per-read timeout waiting forever: the timeout bounds
    the whole exchange."""

    def trickle(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in range(200):
            conn.sendall(b"X")
            time.sleep(0.05)

    script = Script(trickle)
    server = raw_server(script)
    started = time.monotonic()
    outcome = HTTPTransport(timeout=0.5).post(server.url, WRITE_KEY, body_of("m1"))
    elapsed = time.monotonic() - started
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert outcome.error == f"timed out after 0.5s on {server.url}"
    assert elapsed < 3.0  # not the 10 s the trickle lasts


def test_a_proxy_that_answers_slowly_cannot_hold_the_caller_past_the_timeout(
    raw_server: Callable[..., RawServer],
) -> None:
    """Through a proxy (urllib3, whose timeout bounds each read) a byte every 50 ms for a
    minute kept the request alive for that minute: the timeout now bounds the whole
    request, which returns while the proxy is still trickling."""
    trickled = threading.Event()
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(1200):
            if stop.wait(0.05):
                return
            conn.sendall(b"a")
        trickled.set()

    proxy = raw_server(trickle)
    try:
        transport = HTTPTransport(timeout=0.5, proxies={"http": proxy.url})
        outcome = transport.post("http://analytics.example.test", WRITE_KEY, body_of("m1"))
        assert not trickled.is_set()  # it returned while the proxy was still trickling
    finally:
        stop.set()
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert outcome.error == "timed out after 0.5s on http://analytics.example.test"
    assert proxy.connections == 1


def test_an_ipv6_literal_host_is_reached_with_its_bracketed_host_header(
    raw_server: Callable[..., RawServer],
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    script = Script(OK, OK)
    try:
        server = raw_server(script, host="::1")
    except OSError:
        pytest.skip("::1 cannot be bound here")
    transport = HTTPTransport(timeout=5.0)
    assert transport.post(server.url, WRITE_KEY, body_of("m1")).ok
    assert transport.post(server.url, WRITE_KEY, body_of("m2")).ok
    assert server.connections == 1
    assert f"\r\nHost: [::1]:{server.port}\r\n".encode() in script.heads[0]
    transport.close()


@pytest.mark.parametrize(
    ("url", "key", "request_line"),
    [
        (
            "http://example.com/v1/batch",
            ("http", "example.com", 80),
            b"POST /v1/batch HTTP/1.1\r\nHost: example.com\r\n",
        ),
        (
            "https://example.com/v1/batch",
            ("https", "example.com", 443),
            b"POST /v1/batch HTTP/1.1\r\nHost: example.com\r\n",
        ),
        (
            "http://example.com:443/v1/batch",
            ("http", "example.com", 443),
            b"POST /v1/batch HTTP/1.1\r\nHost: example.com:443\r\n",
        ),
        (
            "https://Example.COM:8443/seg/v1/batch",
            ("https", "example.com", 8443),
            b"POST /seg/v1/batch HTTP/1.1\r\nHost: example.com:8443\r\n",
        ),
        (
            "http://[::1]:80/v1/batch",
            ("http", "::1", 80),
            b"POST /v1/batch HTTP/1.1\r\nHost: [::1]\r\n",
        ),
        (
            "https://b\u00fccher.example/v1/batch",
            ("https", "xn--bcher-kva.example", 443),
            b"POST /v1/batch HTTP/1.1\r\nHost: xn--bcher-kva.example\r\n",
        ),
    ],
)
def test_the_origin_of_a_url_has_default_ports_and_the_host_header_names_other_ones(
    url: str, key: tuple[str, str, int], request_line: bytes
) -> None:
    origin = _wire.origin_of(url)
    assert origin.key == key
    assert origin.prefix == request_line


def test_a_path_before_the_endpoint_is_kept_and_escaped() -> None:
    origin = _wire.origin_of("http://example.com/caf\u00e9/v1/batch")
    assert origin.prefix.startswith(b"POST /caf%C3%A9/v1/batch HTTP/1.1\r\n")


def test_connections_have_nagle_off(collector: Collector) -> None:
    """TCP_NODELAY: the answer to a small request is never held back by Nagle."""
    client = WireClient(maxsize=2)
    origin = _wire.origin_of(f"{collector.url}/v1/batch")
    head = b"Authorization: Basic %s\r\n" % base64.b64encode(f"{WRITE_KEY}:".encode())
    answer = client.post(origin, head, body_of("m1"), timeout=5.0, max_body=1024)
    assert answer.status == 200
    [[conn]] = client._idle.values()
    assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    client.close()
    assert client.idle_count() == 0


def test_many_threads_share_one_transport_and_keep_at_most_maxsize_idle_connections(
    collector: Collector,
) -> None:
    transport = HTTPTransport(timeout=10.0, maxsize=3)
    outcomes: list[bool] = []
    lock = threading.Lock()

    def run(t: int) -> None:
        for i in range(25):
            ok = transport.post(collector.url, WRITE_KEY, body_of(f"t{t}-{i}")).ok
            with lock:
                outcomes.append(ok)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == [True] * 200
    assert collector.requests == 200
    assert len(collector.message_ids()) == 200
    assert transport._wire is not None
    assert 1 <= transport._wire.idle_count() <= 3
    transport.close()


def test_close_ends_the_idle_connections_and_the_transport_still_works(
    raw_server: Callable[..., RawServer],
) -> None:
    script = Script(OK, OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    assert transport.post(server.url, WRITE_KEY, body_of("m1")).ok
    transport.close()
    assert script.done.wait(2.0)  # the server read EOF: the connection was closed
    assert transport.post(server.url, WRITE_KEY, body_of("m2")).ok
    assert server.connections == 2
    transport.close()


def test_a_connection_made_before_fork_is_never_used_by_the_child(
    raw_server: Callable[..., RawServer],
) -> None:
    """The child opens its own connection; the parent's goes on carrying its batches."""
    script = Script(OK, OK, OK)
    server = raw_server(script)
    code = f"""
        import os, sys
        from durable_analytics._transport import HTTPTransport
        t = HTTPTransport(timeout=5.0)
        body = b'{{"batch":[],"sentAt":"x"}}'
        assert t.post({server.url!r}, "k", body).ok
        pid = os.fork()
        if pid == 0:
            os._exit(0 if t.post({server.url!r}, "k", body).ok else 3)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        print(code, t.post({server.url!r}, "k", body).ok)
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "True"]
    assert (server.connections, len(script.heads)) == (2, 3)


# ---------------------------------------------------------------- TLS


@pytest.fixture
def tls_server(
    tmp_path: Path, raw_server: Callable[..., RawServer]
) -> tuple[RawServer, Script, Path]:
    """A keep-alive HTTPS server on 127.0.0.1 with a self-signed certificate for localhost."""
    cert, key = make_certificate(tmp_path, "localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    script = Script(OK, OK, OK)
    return raw_server(script, tls=context), script, cert


def test_tls_verifies_the_certificate_by_default(
    tls_server: tuple[RawServer, Script, Path],
) -> None:
    server, script, _ = tls_server
    url = f"https://localhost:{server.port}"
    outcome = HTTPTransport(timeout=5.0).post(url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert outcome.error.startswith(f"TLS error talking to {url}")
    assert script.heads == []  # nothing was sent to the untrusted server


def test_tls_trusts_a_ca_bundle_path_and_reuses_the_connection(
    tls_server: tuple[RawServer, Script, Path],
) -> None:
    server, script, cert = tls_server
    url = f"https://localhost:{server.port}"
    transport = HTTPTransport(timeout=5.0, verify=str(cert))
    assert transport.post(url, WRITE_KEY, body_of("m1")).ok
    assert transport.post(url, WRITE_KEY, body_of("m2")).ok
    assert (server.connections, len(script.heads)) == (1, 2)
    transport.close()


def test_tls_trusts_the_ca_bundle_named_in_the_environment(
    tls_server: tuple[RawServer, Script, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _, cert = tls_server
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    outcome = HTTPTransport(timeout=5.0).post(
        f"https://localhost:{server.port}", WRITE_KEY, body_of("m1")
    )
    assert outcome.ok, outcome.error


def test_tls_checks_the_host_name_against_the_certificate(
    tls_server: tuple[RawServer, Script, Path],
) -> None:
    """Trusted for ``localhost``, the certificate does not name 127.0.0.1."""
    server, script, cert = tls_server
    url = f"https://127.0.0.1:{server.port}"
    outcome = HTTPTransport(timeout=5.0, verify=str(cert)).post(url, WRITE_KEY, body_of("m1"))
    assert outcome.error.startswith(f"TLS error talking to {url}")
    assert script.heads == []


def test_a_ca_bundle_that_cannot_be_read_is_a_tls_error(
    tls_server: tuple[RawServer, Script, Path], tmp_path: Path
) -> None:
    server, script, _ = tls_server
    url = f"https://localhost:{server.port}"
    missing = tmp_path / "no-such-bundle.pem"
    outcome = HTTPTransport(timeout=5.0, verify=str(missing)).post(url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert outcome.error.startswith(f"TLS error talking to {url}: cannot load the CA bundle")
    assert script.heads == []


def test_tls_without_verification_accepts_any_certificate(
    tls_server: tuple[RawServer, Script, Path],
) -> None:
    server, _, _ = tls_server
    url = f"https://127.0.0.1:{server.port}"
    outcome = HTTPTransport(timeout=5.0, verify=False).post(url, WRITE_KEY, body_of("m1"))
    assert outcome.ok, outcome.error


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


# ---------------------------------------------------------------- sending ahead


@dataclass(frozen=True)
class _Dest:
    host: str
    write_key: str = WRITE_KEY


@pytest.mark.parametrize(
    "reply",
    [
        Reply(200),
        Reply(400),
        Reply(401),
        Reply(429, headers={"Retry-After": "3"}),
        Reply(500),
    ],
)
def test_an_answer_read_after_start_is_the_outcome_send_gives(
    collector: Collector, reply: Reply
) -> None:
    transport = HTTPTransport()
    bodies = [b'{"type":"track","messageId":"m1"}']
    collector.script(reply, reply)
    sent = transport.send(_Dest(collector.url), bodies)
    started = transport.start(_Dest(collector.url), bodies)
    assert started is not None
    assert started.finish() == sent
    assert collector.requests == 2


def test_a_request_that_cannot_be_written_finishes_as_its_retryable_failure(
    refused_url: str,
) -> None:
    transport = HTTPTransport(timeout=2.0)
    started = transport.start(_Dest(refused_url), [b"{}"])
    assert started is not None
    outcome = started.finish()
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert outcome == transport.send(_Dest(refused_url), [b"{}"])
    started.cancel()  # nothing on the wire: a no-op


def test_a_retry_sent_ahead_carries_its_retry_count(collector: Collector) -> None:
    started = HTTPTransport().start(_Dest(collector.url), [b"{}"], retry_count=2)
    assert started is not None
    assert started.finish().ok
    assert collector.batches[0].headers.get("X-Retry-Count") == "2"


class _LoggingTransport(HTTPTransport):
    """A user's subclass that wraps ``send`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def send(self, destination: Any, bodies: Any, **kw: Any) -> Any:
        self.seen += 1
        return super().send(destination, bodies, **kw)


def test_start_is_declined_where_it_would_bypass_a_route_or_a_subclass(
    collector: Collector,
) -> None:
    """Through a proxy (urllib3 carries it), with OAuth (a token per request), and for a
    subclass that overrides ``send`` alone (its ``send`` must see every batch), ``start``
    says None and the batch goes through ``send``."""
    dest = _Dest(collector.url)
    proxied = HTTPTransport(proxies={"http": "http://127.0.0.1:9"})
    assert proxied.start(dest, [b"{}"]) is None
    oauth = OAuthSettings.build("id", generate_key_pair()[0], "kid", "http://127.0.0.1:9")
    assert HTTPTransport(oauth=oauth).start(dest, [b"{}"]) is None
    assert _LoggingTransport().start(dest, [b"{}"]) is None
    assert collector.requests == 0


def test_an_override_sends_ahead_to_its_own_host(collector: Collector) -> None:
    override = DestinationOverride(HTTPTransport(), host=collector.url)
    started = override.start(_Dest("http://127.0.0.1:9"), [b'{"messageId":"m1"}'])
    assert started is not None
    assert started.finish().ok
    assert collector.message_ids(accepted_only=False) == {"m1": 1}
    assert DestinationOverride(_LoggingTransport()).start(_Dest(collector.url), [b"{}"]) is None
