"""An attacker's tests of the HTTP/1.1 client (``_transport/_wire.py``, ``_answer.py``).

A hostile or broken server on 127.0.0.1 (the tiny socket servers of ``test_transport``)
tries to hold the caller past its timeout, to make it use unbounded memory or CPU, to have
an answer read as another request's, or to get a batch acknowledged that it never answered
cleanly; the request side is checked for header injection and TLS downgrade. Each test says
which rule it holds.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _rawserver import RawServer, make_certificate, read_request
from conftest import WRITE_KEY, run_python
from test_transport import OK, Script, body_of

from durable_analytics._transport import HTTPTransport, _answer
from durable_analytics._transport._wire import WireClient, origin_of
from durable_analytics.testing import Collector


def hold_open(conn: socket.socket) -> None:
    """Keep the connection open, reading whatever comes, until the client closes it."""
    conn.settimeout(10.0)
    while conn.recv(65536):
        pass


# ---------------------------------------------------------------- time


def test_the_timeout_bounds_the_whole_exchange_when_the_send_used_most_of_it(
    raw_server: Callable[..., RawServer],
) -> None:
    """A server that reads the request slowly, then never answers: the wait for the answer
    gets only what the send left of the timeout, not the timeout again."""

    def slow_reader(conn: socket.socket) -> None:
        time.sleep(1.6)  # the client's send blocks on full buffers meanwhile
        hold_open(conn)

    server = raw_server(slow_reader)
    started = time.monotonic()
    outcome = HTTPTransport(timeout=2.0).post(server.url, WRITE_KEY, b"x" * (32 << 20))
    elapsed = time.monotonic() - started
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert outcome.error == f"timed out after 2s on {server.url}"
    assert elapsed < 3.0  # 3.6 s when the answer's wait restarted the timeout


def test_an_endless_flood_of_interim_answers_is_refused_before_the_timeout(
    raw_server: Callable[..., RawServer],
) -> None:
    def flood(conn: socket.socket) -> None:
        read_request(conn)
        while True:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 100)
            time.sleep(0.01)

    server = raw_server(flood)
    outcome = HTTPTransport(timeout=5.0).post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert "more than 32 interim (1xx) answers" in outcome.error


def test_endless_trailers_end_the_answer_at_64_kb_not_at_the_timeout(
    raw_server: Callable[..., RawServer],
) -> None:
    """A chunked 200 whose trailer lines never end: the status stands (the server took the
    batch), the body is unreadable, and the caller is not held to its timeout."""

    def trailers(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n")
        while True:
            conn.sendall(b"X-More: yes\r\n" * 100)
            time.sleep(0.005)

    server = raw_server(trailers)
    outcome = HTTPTransport(timeout=5.0).post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("ok", 200)
    assert outcome.excerpt == "<unreadable response body: ProtocolError>"  # not TimeoutError


class OneByteSocket:
    """Gives ``data`` one byte per ``recv``: what a server sending one tiny packet at a time
    can make a client do, made exact (a real socket coalesces what it can)."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.at = 0

    def settimeout(self, timeout: float | None) -> None:
        pass

    def recv(self, size: int) -> bytes:
        self.at += 1
        return bytes(self.data[self.at - 1 : self.at])


FILLER = b"X-Filler: " + b"f" * 50 + b"\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\n" + FILLER * 1000 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 65536\r\n\r\n" + b"b" * 65536,
        b"HTTP/1.1 200 OK\r\n\r\n" + b"b" * 65536,
    ],
    ids=["head", "content-length", "to-close"],
)
def test_an_answer_sent_a_byte_at_a_time_costs_linear_cpu(answer: bytes) -> None:
    """64 KiB in 64 Ki reads: each read must not copy all that came before (quadratic: 2 GB
    copied, seconds of the caller's CPU)."""
    sock: Any = OneByteSocket(answer)
    started = time.thread_time()
    response, _ = _answer.read_response(sock, time.monotonic() + 60, 65536)
    cpu = time.thread_time() - started
    assert response.status == 200
    assert cpu < 1.0  # 3 to 4 s before


# ---------------------------------------------------------------- size and framing


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK" + b"K" * 200_000,
        b"HTTP/1.1 200 OK\r\n" + FILLER * 4000,
        b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["endless-status-line", "endless-headers", "one-100-kb-header"],
)
def test_a_head_over_64_kb_is_refused_whole(
    raw_server: Callable[..., RawServer], answer: bytes
) -> None:
    """Sent at once: the cap holds at 64 KiB, not at 64 KiB plus one more read."""
    server = raw_server(Script(answer))
    outcome = HTTPTransport(timeout=5.0).post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert outcome.error.endswith("malformed answer: the head is longer than 64 KiB")


@pytest.mark.parametrize(
    "length",
    [b"-1", b"+5", b"0x10", b"1e3", b"5 5", b"5, 6", b"\xb2", b"", b"9" * 19],
    ids=[
        "negative",
        "plus",
        "hex",
        "exponent",
        "two-numbers",
        "list",
        "superscript",
        "empty",
        "huge",
    ],
)
def test_a_2xx_with_an_invalid_content_length_is_discarded_not_acknowledged(
    raw_server: Callable[..., RawServer], length: bytes
) -> None:
    """RFC 9112 §6.3: an answer whose length cannot be known is discarded, its connection
    closed; the batch is retried (the queue's decision), never counted as delivered."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\n" + b"x" * 5
    script = Script(answer, OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    outcome = transport.post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert "malformed answer: invalid Content-Length" in outcome.error
    assert transport.post(server.url, WRITE_KEY, body_of("m2")).ok
    assert server.connections == 2
    transport.close()


@pytest.mark.parametrize(
    "lengths",
    [b"Content-Length: 16, 16\r\n", b"Content-Length: 16\r\ncontent-length: 16\r\n"],
    ids=["list", "repeated"],
)
def test_the_same_content_length_given_twice_is_one_length(
    raw_server: Callable[..., RawServer], lengths: bytes
) -> None:
    answer = b"HTTP/1.1 200 OK\r\n" + lengths + b"\r\n" + b'{"success":true}'
    script = Script(answer, OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    outcome = transport.post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.excerpt) == ("ok", '{"success":true}')
    assert transport.post(server.url, WRITE_KEY, body_of("m2")).ok
    assert server.connections == 1
    transport.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
    ],
    ids=["content-length-and-chunked", "chunked-in-http/1.0"],
)
def test_ambiguous_framing_is_read_by_transfer_encoding_and_the_connection_dropped(
    raw_server: Callable[..., RawServer], answer: bytes
) -> None:
    """RFC 9112 §6.1, §6.3: Transfer-Encoding wins, and a connection whose framing two
    parties could read two ways (request smuggling) carries nothing more."""
    script = Script(answer, OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    outcome = transport.post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.excerpt) == ("ok", "{}")
    assert transport.post(server.url, WRITE_KEY, body_of("m2")).ok
    assert (server.connections, len(script.heads)) == (2, 2)
    transport.close()


@pytest.mark.parametrize(
    "size",
    [b"-1", b"+5", b"0x10", b"1 2", b"fffffffffffffffff", b""],
    ids=["negative", "plus", "0x", "two-numbers", "over-64-bits", "empty"],
)
def test_an_invalid_chunk_size_makes_the_body_unreadable_and_drops_the_connection(
    raw_server: Callable[..., RawServer], size: bytes
) -> None:
    """The head came whole, so its status stands; the body and the connection do not."""
    answer = b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nxxxxx\r\n"
    script = Script(answer, OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    outcome = transport.post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status) == ("retry", 503)
    assert outcome.excerpt == "<unreadable response body: ProtocolError>"
    assert transport.post(server.url, WRITE_KEY, body_of("m2")).ok
    assert server.connections == 2
    transport.close()


def test_a_head_ending_in_bare_line_feeds_is_read_even_if_the_body_holds_crlf_crlf(
    raw_server: Callable[..., RawServer],
) -> None:
    """The first blank line ends the head, whichever way the server ends its lines."""
    answer = b"HTTP/1.1 503 Busy\nContent-Length: 8\n\nX: 1\r\n\r\n"
    server = raw_server(Script(answer))
    outcome = HTTPTransport(timeout=5.0).post(server.url, WRITE_KEY, body_of("m1"))
    assert (outcome.kind, outcome.status, outcome.excerpt) == ("retry", 503, "X: 1\r\n\r\n")


# ---------------------------------------------------------------- answers out of step


@pytest.mark.parametrize("when", ["with-the-answer", "while-idle"])
def test_a_stray_answer_on_a_kept_alive_connection_is_never_read_as_the_next_one(
    raw_server: Callable[..., RawServer], when: str
) -> None:
    """Bytes the server sends beyond its answer (at once, or later while the connection
    waits in the pool) would be read as the next batch's answer: a 400 would dead-letter
    a batch the server never saw. The connection is dropped instead."""
    stray = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
    sent = threading.Event()

    def first(conn: socket.socket) -> None:
        if when == "with-the-answer":
            conn.sendall(OK + stray)
        else:
            conn.sendall(OK)
            time.sleep(0.1)
            conn.sendall(stray)
        sent.set()

    script = Script(first, OK)
    server = raw_server(script)
    transport = HTTPTransport(timeout=5.0)
    assert transport.post(server.url, WRITE_KEY, body_of("m1")).ok
    assert sent.wait(2.0)
    time.sleep(0.05)  # the stray bytes are in the client's socket
    outcome = transport.post(server.url, WRITE_KEY, body_of("m2"))
    assert (outcome.kind, outcome.status) == ("ok", 200)
    assert (server.connections, len(script.heads)) == (2, 2)
    transport.close()


@pytest.mark.parametrize("part", [b"", OK[:40], OK[:-3]], ids=["nothing", "half-head", "half-body"])
def test_an_answer_arriving_after_its_timeout_is_never_read_as_the_next_batchs(
    raw_server: Callable[..., RawServer], part: bytes
) -> None:
    """The first batch times out (after part of its answer, or none); its answer then
    arrives. The second batch goes on a new connection and gets its own answer (503), never
    the late 200 that would acknowledge it without delivery."""
    late = threading.Event()

    def slow(conn: socket.socket) -> None:
        conn.sendall(part)
        time.sleep(0.6)
        conn.sendall(OK[len(part) :])
        late.set()

    busy = b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"
    script = Script(slow, busy)
    server = raw_server(script)
    transport = HTTPTransport(timeout=0.3)
    first = transport.post(server.url, WRITE_KEY, body_of("m1"))
    # Half a body after a whole head: the 200 stands (the server took the batch).
    assert (first.kind, first.status) == (("ok", 200) if part == OK[:-3] else ("retry", None))
    assert late.wait(2.0)
    second = transport.post(server.url, WRITE_KEY, body_of("m2"))
    assert (second.kind, second.status) == ("retry", 503)
    assert (server.connections, len(script.heads)) == (2, 2)
    transport.close()


def test_an_early_answer_to_a_request_not_read_whole_is_the_outcome_and_not_resent(
    raw_server: Callable[..., RawServer],
) -> None:
    """A server answers 413 after the head and closes: the write fails, the 413 is read,
    and the batch is not sent again on a new connection."""

    def early(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 413 Too Large\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbig")

    server = raw_server(early)
    outcome = HTTPTransport(timeout=5.0).post(server.url, WRITE_KEY, b"x" * (32 << 20))
    assert (outcome.kind, outcome.status, outcome.excerpt) == ("reject", 413, "big")
    time.sleep(0.1)  # a resend would have connected by now
    assert server.connections == 1


# ---------------------------------------------------------------- what we send


def test_a_write_key_with_line_breaks_cannot_add_a_header(
    raw_server: Callable[..., RawServer],
) -> None:
    script = Script(OK)
    server = raw_server(script)
    key = "key\r\nX-Injected: 1\r\n"
    assert HTTPTransport(timeout=5.0).post(server.url, key, body_of("m1")).ok
    [head] = script.heads
    names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]]
    assert names == [
        b"host",
        b"user-agent",
        b"accept-encoding",
        b"content-type",
        b"authorization",
        b"content-length",
    ]


@pytest.mark.parametrize(
    "suffix",
    ["\r\nX-Injected: 1", "/p\r\nX-Injected: 1", "/p?q=\nX-Injected: 1", "\x85X-Injected: 1"],
    ids=["port", "path", "query", "next-line"],
)
def test_a_host_with_line_breaks_cannot_add_a_header(
    raw_server: Callable[..., RawServer], suffix: str
) -> None:
    """Our client refuses such a URL (the config refuses such a host first); the urllib3
    route it then falls to escapes the line break into the path."""
    script = Script(OK, OK)
    server = raw_server(script)
    HTTPTransport(timeout=2.0).post(server.url + suffix, WRITE_KEY, body_of("m1"))
    time.sleep(0.05)
    for head in script.heads:
        assert b"\r\nX-Injected" not in head, head
    with pytest.raises(ValueError, match="control characters"):
        origin_of(server.url + suffix + "/v1/batch")


@pytest.mark.parametrize("host", ["https://a..b:9", "http://[::1%0d%0aX:1]:9", "https://.x:9"])
def test_a_host_no_resolver_takes_is_a_configuration_outcome_never_an_exception(
    host: str,
) -> None:
    """``send`` never raises: a host the config would refuse, given to the transport
    directly, is a configuration outcome (messages kept, destination backed off)."""
    outcome = HTTPTransport(timeout=1.0).post(host, WRITE_KEY, body_of("m1"))
    if "[" in host and sys.version_info < (3, 11):
        # Python 3.10's URL parser takes any bracketed text: no address, a connect error.
        assert (outcome.kind, outcome.status) == ("retry", None)
        assert outcome.error.startswith(f"cannot connect to {host}")
    else:
        assert (outcome.kind, outcome.status) == ("config", None)
        assert outcome.error.startswith(f"cannot send to {host!r}")


def test_an_https_url_never_falls_back_to_plaintext(raw_server: Callable[..., RawServer]) -> None:
    """A plaintext server on an https URL gets a TLS hello, never the request or the key."""
    received: list[bytes] = []

    def plaintext(conn: socket.socket) -> None:
        conn.settimeout(2.0)
        received.append(conn.recv(65536))
        conn.sendall(OK)

    server = raw_server(plaintext)
    url = f"https://127.0.0.1:{server.port}"
    for verify in (True, False):
        outcome = HTTPTransport(timeout=2.0, verify=verify).post(url, WRITE_KEY, body_of("m1"))
        assert (outcome.kind, outcome.status) == ("retry", None)
        assert outcome.error.startswith(f"TLS error talking to {url}")
    assert len(received) == 2
    for hello in received:
        assert hello[:1] == b"\x16"  # a TLS handshake record
        assert b"POST" not in hello
        assert b"Authorization" not in hello


def test_tls_sends_the_host_name_and_checks_it(
    tmp_path: Path, raw_server: Callable[..., RawServer]
) -> None:
    cert, key = make_certificate(tmp_path, "localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []

    def record(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext) -> None:
        names.append(name)

    context.sni_callback = record
    script = Script(OK)
    server = raw_server(script, tls=context)
    outcome = HTTPTransport(timeout=5.0, verify=str(cert)).post(
        f"https://localhost:{server.port}", WRITE_KEY, body_of("m1")
    )
    assert outcome.ok, outcome.error
    assert names == ["localhost"]


# ---------------------------------------------------------------- concurrency


def test_close_while_a_connection_is_being_made_leaves_no_connection_in_the_pool(
    tmp_path: Path, raw_server: Callable[..., RawServer]
) -> None:
    """``close()`` during a slow TLS handshake: that connection carries its request, then
    is closed, not kept after the close."""
    cert, key = make_certificate(tmp_path, "localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    closed = threading.Event()

    def handshake_after_close(conn: socket.socket) -> None:
        assert closed.wait(5.0)
        conn.settimeout(5.0)
        with context.wrap_socket(conn, server_side=True) as tls:
            Script(OK)(tls)

    server = raw_server(handshake_after_close)
    client = WireClient(tls=lambda: ssl.create_default_context(cafile=str(cert)))
    origin = origin_of(f"https://localhost:{server.port}/v1/batch")
    answers: list[int] = []

    def post() -> None:
        answers.append(client.post(origin, b"", b"{}", timeout=5.0, max_body=1024).status)

    thread = threading.Thread(target=post)
    thread.start()
    deadline = time.monotonic() + 5.0
    while server.connections == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    client.close()
    closed.set()
    thread.join(10.0)
    assert answers == [200]
    assert client.idle_count() == 0


def test_a_fork_while_a_request_is_in_flight_shares_no_connection(
    raw_server: Callable[..., RawServer],
) -> None:
    """The parent's thread holds a connection mid-request when the process forks: the child
    sends on a connection of its own, and the parent's answer reaches only the parent."""

    def slow(conn: socket.socket) -> None:
        time.sleep(0.5)
        conn.sendall(OK)

    busy = b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"
    script = Script(slow, busy)
    server = raw_server(script)
    code = f"""
        import os, threading, time
        from durable_analytics._transport import HTTPTransport
        t = HTTPTransport(timeout=5.0)
        body = b'{{"batch":[],"sentAt":"x"}}'
        got = []
        thread = threading.Thread(target=lambda: got.append(t.post({server.url!r}, "k", body)))
        thread.start()
        time.sleep(0.2)  # the request is out, its answer not yet
        pid = os.fork()
        if pid == 0:
            os._exit(0 if t.post({server.url!r}, "k", body).status == 503 else 3)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        thread.join()
        print(code, got[0].status, t._wire.idle_count())
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "200", "1"]
    assert (server.connections, len(script.heads)) == (2, 2)


@pytest.mark.parametrize(
    "line",
    [b"A: x" + b" " * 30_000 + b"y", b"A:" + b" " * 30_000 + b"\rx", b"A:" + b"\t " * 15_000],
    ids=["spaces-inside", "spaces-then-a-bare-cr", "blanks-only"],
)
def test_a_long_header_line_of_blanks_costs_linear_cpu(line: bytes) -> None:
    """The header pattern must not backtrack over blanks: its CPU is spent in C with the GIL
    held, where no timeout can stop it (4 s for 30,000 spaces before; 17 s for 60,000)."""
    head = b"HTTP/1.1 200 OK\r\n" + line
    started = time.thread_time()
    try:
        status, _, headers = _answer._parse_head(head)
    except _answer.ProtocolError:
        pass  # the bare CR
    else:
        assert (status, headers["a"][:1]) == (200, line[2:].strip()[:1].decode())
    assert time.thread_time() - started < 0.5


def test_close_racing_many_threads_loses_and_duplicates_no_batch(collector: Collector) -> None:
    """Eight threads send 25 batches each while ``close()`` runs over and over: every
    batch is answered once and none fails."""
    transport = HTTPTransport(timeout=10.0, maxsize=4)
    outcomes: list[bool] = []
    lock = threading.Lock()
    stop = threading.Event()

    def send(t: int) -> None:
        for i in range(25):
            ok = transport.post(collector.url, WRITE_KEY, body_of(f"t{t}-{i}")).ok
            with lock:
                outcomes.append(ok)

    def closer() -> None:
        while not stop.is_set():
            transport.close()
            time.sleep(0.001)

    closing = threading.Thread(target=closer)
    closing.start()
    threads = [threading.Thread(target=send, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    closing.join()
    assert outcomes == [True] * 200
    assert collector.requests == 200
    assert sorted(collector.message_ids()) == sorted(
        f"t{t}-{i}" for t in range(8) for i in range(25)
    )
    transport.close()
    assert transport._wire is not None
    assert transport._wire.idle_count() == 0


def test_port_0_is_refused_not_read_as_the_default_port() -> None:
    with pytest.raises(ValueError, match="port 0"):
        origin_of("http://127.0.0.1:0/v1/batch")
    assert origin_of("http://127.0.0.1/v1/batch").port == 80


# ---------------------------------------------------------------- sending ahead


def test_two_requests_started_before_either_answer_is_read_are_both_answered(
    raw_server: Callable[..., RawServer],
) -> None:
    """``start`` returns once the request is written, not when it is answered: the server
    answers neither request before it holds both, and both answers are read after."""
    both = threading.Barrier(2, timeout=5.0)

    def answer_when_both_arrived(conn: socket.socket) -> None:
        read_request(conn)
        both.wait()
        conn.sendall(OK)
        hold_open(conn)

    server = raw_server(answer_when_both_arrived)
    client = WireClient()
    origin = origin_of(f"{server.url}/v1/batch")
    first = client.start(origin, b"", body_of("m1"), timeout=5.0, max_body=1024)
    second = client.start(origin, b"", body_of("m2"), timeout=5.0, max_body=1024)
    assert client.finish(first).status == 200
    assert client.finish(second).status == 200
    assert server.connections == 2  # one connection per request in flight
    assert client.idle_count() == 2  # both kept alive for the next requests
    client.close()


def test_an_answer_read_after_its_deadline_is_still_read_within_the_late_grace(
    raw_server: Callable[..., RawServer],
) -> None:
    """A sent-ahead answer read late (its thread was busy with the batch before) is the
    server's answer if it came: taking it for a timeout would send the batch again."""
    server = raw_server(Script(OK, OK))
    client = WireClient()
    origin = origin_of(f"{server.url}/v1/batch")
    late = client.start(origin, b"", body_of("m1"), timeout=0.2, max_body=1024)
    strict = client.start(origin, b"", body_of("m2"), timeout=0.2, max_body=1024)
    time.sleep(0.3)  # both answers arrived; both deadlines passed
    assert client.finish(late, late=0.25).status == 200
    with pytest.raises(TimeoutError):
        client.finish(strict)
    client.close()


def test_a_server_that_has_not_begun_to_answer_by_the_deadline_gets_no_late_grace(
    raw_server: Callable[..., RawServer],
) -> None:
    """The grace reads an answer that came in time; it never stretches a caller's deadline
    (a ``flush(timeout)``) for a server that is merely slow."""

    def never_answer(conn: socket.socket) -> None:
        read_request(conn)
        hold_open(conn)

    server = raw_server(never_answer)
    client = WireClient()
    sent = client.start(
        origin_of(f"{server.url}/v1/batch"), b"", body_of("m1"), timeout=0.1, max_body=1024
    )
    time.sleep(0.2)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.finish(sent, late=5.0)
    assert time.monotonic() - started < 2.5  # not the 5 s grace
    client.close()


def test_an_answer_is_read_once_and_a_cancelled_request_drops_its_connection(
    raw_server: Callable[..., RawServer],
) -> None:
    ended = threading.Semaphore(0)  # one release per connection the server saw end

    def answer_then_wait_for_close(conn: socket.socket) -> None:
        try:
            read_request(conn)
            conn.sendall(OK)
            hold_open(conn)
        except OSError:
            # A reset: the client closed with the answer unread in its buffer (a cancel
            # after the answer arrived), which ends the connection too.
            pass
        finally:
            ended.release()

    server = raw_server(answer_then_wait_for_close)
    client = WireClient()
    origin = origin_of(f"{server.url}/v1/batch")
    read = client.start(origin, b"", body_of("m1"), timeout=5.0, max_body=1024)
    assert client.finish(read).status == 200
    with pytest.raises(_answer.ProtocolError):
        client.finish(read)  # an answer is never handed out twice
    client.cancel(read)  # nothing to give up: the connection stays in the pool
    assert client.idle_count() == 1

    client.close()
    assert ended.acquire(timeout=5.0)  # the pooled connection, closed
    given_up = client.start(origin, b"", body_of("m2"), timeout=5.0, max_body=1024)
    client.cancel(given_up)
    assert ended.acquire(timeout=5.0)  # the server saw the cancelled one end
    assert client.idle_count() == 0  # and it is not pooled for a later request
    with pytest.raises(_answer.ProtocolError):
        client.finish(given_up)
