"""Tests of durable_analytics.testing: a real Collector on 127.0.0.1, driven over HTTP."""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from durable_analytics.testing import Collector, ReceivedBatch, Reply

KEY = "WRITE_KEY"


def batch_of(*message_ids: str) -> dict[str, Any]:
    return {
        "batch": [{"type": "track", "event": "E", "messageId": mid} for mid in message_ids],
        "sentAt": "2024-01-01T00:00:00.000Z",
    }


def post(
    collector: Collector,
    *message_ids: str,
    key: str | None = KEY,
    session: requests.Session | None = None,
    timeout: float = 5.0,
) -> requests.Response:
    return (session or requests).post(
        collector.url + "/v1/batch",
        json=batch_of(*message_ids),
        auth=None if key is None else (key, ""),
        timeout=timeout,
    )


def post_raw(
    collector: Collector, body: bytes, headers: dict[str, str], *, authorize: bool = True
) -> requests.Response:
    return requests.post(
        collector.url + "/v1/batch",
        data=body,
        headers={"Content-Type": "application/json", **headers},
        auth=(KEY, "") if authorize else None,
        timeout=5,
    )


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(KEY) as running:
        yield running


def test_records_the_batch_its_headers_and_message_ids(collector: Collector) -> None:
    response = requests.post(
        collector.url + "/v1/batch",
        json=batch_of("m1", "m2", "m1"),
        auth=(KEY, ""),
        headers={"User-Agent": "durable-analytics/9.9"},
        timeout=5,
    )

    assert response.status_code == 200
    assert response.json() == {"success": True}
    [batch] = collector.batches
    assert batch.path == "/v1/batch"
    assert batch.status == 200
    assert batch.authorized is True
    assert batch.body == batch_of("m1", "m2", "m1")
    assert json.loads(batch.raw_body) == batch.body
    assert [m["messageId"] for m in batch.messages] == ["m1", "m2", "m1"]
    # Header lookup is case-insensitive.
    assert batch.headers["USER-AGENT"] == "durable-analytics/9.9"
    assert batch.headers["authorization"] == "Basic " + base64.b64encode(b"WRITE_KEY:").decode()
    assert abs(batch.received_at - time.time()) < 5
    assert collector.requests == 1
    assert collector.message_ids() == {"m1": 2, "m2": 1}


def test_trailing_slash_path_is_the_batch_endpoint_too(collector: Collector) -> None:
    response = requests.post(
        collector.url + "/v1/batch/", json=batch_of("m1"), auth=(KEY, ""), timeout=5
    )

    assert response.status_code == 200
    assert collector.batches[0].path == "/v1/batch/"
    assert collector.message_ids() == {"m1": 1}


def test_gzip_body_is_decoded_and_raw_body_kept_as_sent(collector: Collector) -> None:
    compressed = gzip.compress(json.dumps(batch_of("g1", "g2")).encode())

    response = post_raw(collector, compressed, {"Content-Encoding": "gzip"})

    assert response.status_code == 200
    [batch] = collector.batches
    assert batch.raw_body == compressed
    assert batch.body == batch_of("g1", "g2")
    assert collector.message_ids() == {"g1": 1, "g2": 1}


def test_a_500_kb_batch_is_read_completely_and_the_connection_stays_usable(
    collector: Collector,
) -> None:
    ids = [f"big-{i:04d}" for i in range(1000)]
    payload = batch_of(*ids)
    for message in payload["batch"]:
        message["properties"] = {"padding": "x" * 450}
    body = json.dumps(payload).encode()
    assert len(body) > 500_000

    with requests.Session() as session:
        first = session.post(
            collector.url + "/v1/batch", data=body, auth=(KEY, ""), timeout=5
        ).status_code
        second = post(collector, "after-big", session=session).status_code

    assert (first, second) == (200, 200)
    assert collector.batches[0].raw_body == body
    assert collector.message_ids() == dict.fromkeys([*ids, "after-big"], 1)


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"\x1f\x8b not really gzip", {"Content-Encoding": "gzip"}),
        (b'{"batch": [', {}),
        (b'{"sentAt": "2024-01-01T00:00:00.000Z"}', {}),
        (b'{"batch": "not a list"}', {}),
        (b'{"batch": [1, 2]}', {}),
        (b"[]", {}),
    ],
    ids=["bad-gzip", "bad-json", "no-batch", "batch-not-list", "batch-of-non-objects", "array"],
)
def test_undecodable_or_malformed_body_is_answered_400_and_recorded(
    collector: Collector, body: bytes, headers: dict[str, str]
) -> None:
    response = post_raw(collector, body, headers)

    assert response.status_code == 400
    assert response.json()["success"] is False
    [batch] = collector.batches
    assert batch.status == 400
    assert batch.raw_body == body
    assert batch.messages == []
    assert collector.messages(accepted_only=False) == []


def test_unsupported_content_encoding_is_answered_415(collector: Collector) -> None:
    response = post_raw(collector, b"{}", {"Content-Encoding": "br"})

    assert response.status_code == 415
    assert collector.batches[0].status == 415


def test_wrong_or_missing_write_key_gets_401_and_is_recorded_unauthorized(
    collector: Collector,
) -> None:
    wrong = post(collector, "w1", key="OTHER_KEY")
    missing = post(collector, "w2", key=None)
    right = post(collector, "w3")

    assert (wrong.status_code, missing.status_code, right.status_code) == (401, 401, 200)
    assert wrong.json()["success"] is False
    assert [(b.status, b.authorized) for b in collector.batches] == [
        (401, False),
        (401, False),
        (200, True),
    ]
    # The rejected batches are still decoded and recorded, but not accepted.
    assert collector.batches[0].messages[0]["messageId"] == "w1"
    assert collector.message_ids() == {"w3": 1}
    assert collector.message_ids(accepted_only=False) == {"w1": 1, "w2": 1, "w3": 1}


def test_without_write_key_any_well_formed_basic_header_is_accepted() -> None:
    with Collector() as collector:
        any_key = post(collector, "a1", key="ANY_KEY")
        headers = {"Authorization": "Basic %%%not-base64"}
        malformed = post_raw(collector, b"{}", headers, authorize=False)
        headers = {"Authorization": "Bearer token"}
        bearer = post_raw(collector, b"{}", headers, authorize=False)
        missing = post(collector, "a2", key=None)

    assert any_key.status_code == 200
    assert (malformed.status_code, bearer.status_code, missing.status_code) == (401, 401, 401)
    assert [b.authorized for b in collector.batches] == [True, False, False, False]


def test_script_answers_500_500_200_in_order_then_the_default(collector: Collector) -> None:
    collector.script(500, Reply(500), 200)

    statuses = [post(collector, f"s{i}").status_code for i in range(4)]
    collector.set_default(503)
    after_new_default = post(collector, "s4").status_code

    assert statuses == [500, 500, 200, 200]
    assert after_new_default == 503
    assert [b.status for b in collector.batches] == [500, 500, 200, 200, 503]
    assert collector.message_ids() == {"s2": 1, "s3": 1}


def test_scripted_retry_after_header_and_body_reach_the_client(collector: Collector) -> None:
    collector.script(Reply(429, body='{"error":"slow down"}', headers={"Retry-After": "3"}))

    response = post(collector, "r1")

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3"
    assert response.json() == {"error": "slow down"}
    assert collector.batches[0].status == 429


def test_delayed_reply_answers_after_the_delay_and_records_status_then(
    collector: Collector,
) -> None:
    collector.script(Reply(200, delay=0.2))
    result: dict[str, Any] = {}

    def send() -> None:
        started = time.monotonic()
        result["status"] = post(collector, "d1").status_code
        result["elapsed"] = time.monotonic() - started

    sender = threading.Thread(target=send)
    sender.start()
    assert collector.wait_for_requests(1, timeout=5)
    # Received, but not answered yet: not accepted.
    assert collector.batches[0].status == 0
    assert collector.message_ids() == {}
    sender.join(timeout=5)

    assert result["status"] == 200
    assert result["elapsed"] >= 0.2
    assert collector.batches[0].status == 200
    assert collector.message_ids() == {"d1": 1}


def test_hanging_reply_times_the_client_out_and_stop_still_returns_within_a_second() -> None:
    threads_before = set(threading.enumerate())
    collector = Collector(KEY).start()
    try:
        collector.script(Reply(hang=True))
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ReadTimeout):
            post(collector, "h1", timeout=0.5)
        assert time.monotonic() - started >= 0.5

        # Also in flight while stopping: an idle kept-alive connection, a hanging
        # request on a socket the client keeps open, and a reply delayed for minutes.
        idle = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=5)
        idle.request("POST", "/v1/batch", json.dumps(batch_of("k1")), auth_headers())
        assert idle.getresponse().read() == b'{"success":true}'
        collector.script(Reply(hang=True), Reply(200, delay=300))
        hanging = raw_request(collector, batch_of("h2"))
        delayed = raw_request(collector, batch_of("h3"))
        assert collector.wait_for_requests(4, timeout=5)

        started = time.monotonic()
        collector.stop()
        stopped_in = time.monotonic() - started

        assert stopped_in < 1.0
        # The handler threads were released too, not left blocked forever.
        assert [t for t in set(threading.enumerate()) - threads_before if t.is_alive()] == []
        # Neither open request got an answer: the server closed the connections.
        assert hanging.recv(1024) == b""
        assert delayed.recv(1024) == b""
        assert idle.sock is not None
        assert idle.sock.recv(1024) == b""
        assert [b.status for b in collector.batches] == [0, 200, 0, 0]
        assert collector.message_ids() == {"k1": 1}
    finally:
        collector.stop()
    hanging.close()
    delayed.close()
    idle.close()


def auth_headers() -> dict[str, str]:
    token = base64.b64encode(f"{KEY}:".encode()).decode()
    return {"Authorization": f"Basic {token}", "Content-Type": "application/json"}


def raw_request(collector: Collector, body: dict[str, Any]) -> socket.socket:
    """Send one request on a raw socket and leave the socket open, unanswered or not."""
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {auth_headers()['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", collector.port), timeout=5)
    sock.sendall(head + data)
    return sock


def test_reject_message_ids_fails_only_batches_containing_them(collector: Collector) -> None:
    collector.reject_message_ids("bad")
    collector.reject_message_ids("worse", status=422)
    collector.script(503)

    rejected = post(collector, "ok1", "bad")
    rejected_422 = post(collector, "worse")
    # The script entry was not consumed by the rejected batches.
    scripted = post(collector, "ok2")
    clean = post(collector, "ok3")

    assert rejected.status_code == 400
    assert rejected.json()["messageIds"] == ["bad"]
    assert "bad" in rejected.json()["message"]
    assert rejected_422.status_code == 422
    assert (scripted.status_code, clean.status_code) == (503, 200)
    assert collector.message_ids() == {"ok3": 1}


def test_messages_accepted_only_excludes_batches_answered_non_2xx(
    collector: Collector,
) -> None:
    collector.script(500)
    post(collector, "first-try")
    post(collector, "first-try")

    accepted = collector.messages()
    everything = collector.messages(accepted_only=False)

    assert [m["messageId"] for m in accepted] == ["first-try"]
    assert [m["messageId"] for m in everything] == ["first-try", "first-try"]
    assert collector.message_ids(accepted_only=False) == {"first-try": 2}


def test_wait_for_messages_wakes_on_enough_distinct_ids_and_times_out_otherwise(
    collector: Collector,
) -> None:
    # Three messages but only two distinct ids arrive, 0.1 s from now.
    sender = threading.Timer(0.1, lambda: post(collector, "x", "y", "x"))
    started = time.monotonic()
    sender.start()

    assert collector.wait_for_messages(2, timeout=5) is True
    woke_after = time.monotonic() - started
    sender.join()

    assert 0.1 <= woke_after < 2
    assert collector.wait_for_messages(3, timeout=0.2) is False
    collector.script(500)
    post(collector, "z")
    assert collector.wait_for_messages(3, timeout=0.2) is False
    assert collector.wait_for_messages(3, timeout=0.2, accepted_only=False) is True


def test_wait_for_requests_counts_every_request_and_times_out_otherwise(
    collector: Collector,
) -> None:
    post(collector, "q1", key="WRONG")
    post_raw(collector, b"not json", {})

    assert collector.requests == 2
    assert collector.wait_for_requests(2, timeout=0.2) is True
    assert collector.wait_for_requests(3, timeout=0.2) is False


def test_requests_session_reuses_one_kept_alive_connection(collector: Collector) -> None:
    with requests.Session() as session:
        statuses = [post(collector, f"k{i}", session=session).status_code for i in range(5)]
        adapter = session.get_adapter(collector.url)
        assert isinstance(adapter, requests.adapters.HTTPAdapter)
        pools = adapter.poolmanager.pools
        [pool] = [pools[key] for key in pools.keys()]  # noqa: SIM118 (it cannot be iterated)

    assert statuses == [200] * 5
    assert pool.num_requests == 5
    # A server that closed connections would have made urllib3 open one per request.
    assert pool.num_connections == 1


def test_http_client_connection_stays_open_across_errors_and_successes(
    collector: Collector,
) -> None:
    collector.script(500, Reply(429, headers={"Retry-After": "1"}))
    connection = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=5)
    try:
        statuses = []
        sockets = set()
        for i in range(4):
            path = "/nowhere" if i == 3 else "/v1/batch"
            connection.request("POST", path, json.dumps(batch_of(f"c{i}")), auth_headers())
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
            assert response.version == 11
            assert not response.will_close
            sockets.add(id(connection.sock))
    finally:
        connection.close()

    assert statuses == [500, 429, 200, 404]
    assert len(sockets) == 1


def test_unknown_path_is_answered_404_and_not_recorded(collector: Collector) -> None:
    posted = requests.post(collector.url + "/v1/track", json={}, auth=(KEY, ""), timeout=5)
    fetched = requests.get(collector.url + "/", timeout=5)
    wrong_method = requests.get(collector.url + "/v1/batch", timeout=5)

    assert posted.status_code == 404
    assert posted.json()["success"] is False
    assert fetched.status_code == 404
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "POST"
    assert collector.requests == 0
    assert collector.batches == []


def test_reset_clears_recordings_script_default_and_rejections(collector: Collector) -> None:
    collector.script(500, 500)
    collector.set_default(503)
    collector.reject_message_ids("bad")
    post(collector, "before")

    collector.reset()
    after = [post(collector, "bad").status_code, post(collector, "after").status_code]

    assert after == [200, 200]
    assert collector.requests == 2
    assert collector.message_ids() == {"bad": 1, "after": 1}


def test_concurrent_clients_are_all_recorded(collector: Collector) -> None:
    def send(worker: int) -> None:
        with requests.Session() as session:
            for i in range(20):
                post(collector, f"{worker}-{i}", session=session)

    threads = [threading.Thread(target=send, args=(worker,)) for worker in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert collector.requests == 100
    assert len(collector.message_ids()) == 100
    assert set(collector.message_ids().values()) == {1}


def test_stop_is_idempotent_refuses_connections_and_restart_keeps_the_url() -> None:
    collector = Collector(KEY)
    collector.stop()  # before start: nothing to do
    with collector:
        url = collector.url
        post(collector, "one")
    collector.stop()

    with pytest.raises(requests.exceptions.ConnectionError):
        post(collector, "refused", timeout=1)

    with collector:
        assert collector.url == url
        assert post(collector, "two").status_code == 200
        with pytest.raises(RuntimeError):
            collector.start()
    assert collector.message_ids() == {"one": 1, "two": 1}


def test_reply_rejects_impossible_statuses_and_delays() -> None:
    with pytest.raises(ValueError, match="status"):
        Reply(status=99)
    with pytest.raises(ValueError, match="status"):
        Reply(status=600)
    with pytest.raises(ValueError, match="delay"):
        Reply(delay=-1)
    collector = Collector(KEY)
    with pytest.raises(ValueError, match="status"):
        collector.script(700)
    with pytest.raises(RuntimeError):
        _ = collector.url  # no port before start


def test_reprs_never_show_the_write_key(collector: Collector) -> None:
    post(collector, "m1")
    [batch] = collector.batches
    encoded = base64.b64encode(f"{KEY}:".encode()).decode()

    for text in (repr(collector), repr(batch), repr(batch.headers)):
        assert KEY not in text
        assert encoded not in text
    assert isinstance(batch, ReceivedBatch)
    assert "status=200" in repr(batch)


def exchange(collector: Collector, head: bytes, body: bytes = b"") -> tuple[bytes, bytes]:
    """Send ``head`` (the request line and headers, without the blank line) and ``body`` on
    a fresh socket; return the status line and what the server sent until it closed or went
    quiet."""
    with socket.create_connection(("127.0.0.1", collector.port), timeout=5) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        sock.settimeout(0.5)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            pass  # kept alive: nothing more comes
        closed = _peer_closed(sock)
    status, _, rest = data.partition(b"\r\n")
    return status, rest + (b"<closed>" if closed else b"")


def _peer_closed(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def batch_head(data: bytes, *extra: str, version: str = "HTTP/1.1") -> bytes:
    lines = [
        f"POST /v1/batch {version}",
        "Host: 127.0.0.1",
        f"Authorization: {auth_headers()['Authorization']}",
        f"Content-Length: {len(data)}",
        *extra,
    ]
    return "\r\n".join(lines).encode()


def test_request_heads_are_parsed_case_insensitively_with_folded_lines(
    collector: Collector,
) -> None:
    """The collector reads heads itself: names in any case, a folded (obsolete) continuation
    line joined to its header, and the values recorded as sent."""
    data = json.dumps(batch_of("f1")).encode()
    head = batch_head(data, "x-TRACE: one", "  two", "CONTENT-TYPE: application/json")
    status, _ = exchange(collector, head, data)
    assert status == b"HTTP/1.1 200 OK"
    recorded = collector.batches[-1]
    assert recorded.headers["X-Trace"] == "one two"
    assert recorded.headers["content-type"] == "application/json"
    assert collector.message_ids()["f1"] == 1


@pytest.mark.parametrize(
    ("head", "answer"),
    [
        (b"POST /v1/batch HTTP/2.0\r\nContent-Length: 0", b"HTTP/1.1 505"),
        (b"POST /v1/batch HTXP/1.1\r\nContent-Length: 0", b"HTTP/1.1 400"),
        (b"POST /v1/batch\r\nContent-Length: 0", b"HTTP/1.1 400"),
        (b"POST /v1/batch HTTP/1.1\r\nNo colon here", b"HTTP/1.1 400"),
        (b"POST /v1/batch HTTP/1.1\r\nSpaced : name", b"HTTP/1.1 400"),
        (b"POST /v1/batch HTTP/1.1\r\n" + b"\r\n".join([b"X: y"] * 101), b"HTTP/1.1 431"),
        (b"POST /v1/batch HTTP/1.1\r\nX: " + b"y" * 70_000, b"HTTP/1.1 431"),
        # Folded lines are lines of the head too: 101 of them are too many.
        (b"POST /v1/batch HTTP/1.1\r\nX: y\r\n" + b"\r\n".join([b" z"] * 101), b"HTTP/1.1 431"),
        # A digit to str.isdigit() but not to int(): superscript two (latin-1 0xB2).
        (b"POST /v1/batch HTTP/\xb2.1\r\nContent-Length: 0", b"HTTP/1.1 400"),
        (b"POST /v1/batch HTTP/" + b"1" * 5000 + b".1\r\nContent-Length: 0", b"HTTP/1.1 400"),
    ],
    ids=[
        "http-2",
        "bad-version",
        "no-version",
        "no-colon",
        "space-before-colon",
        "101-headers",
        "long-line",
        "101-folded-lines",
        "superscript-version",
        "5000-digit-version",
    ],
)
def test_a_malformed_head_is_answered_and_the_connection_closed(
    collector: Collector, head: bytes, answer: bytes
) -> None:
    """What the standard library's server refuses, the collector refuses the same way,
    records nothing, and closes the connection (the rest of the stream cannot be framed)."""
    status, rest = exchange(collector, head)
    assert status.startswith(answer)
    assert rest.endswith(b"<closed>")
    assert collector.requests == 0


def test_http_1_0_closes_after_the_answer_unless_asked_to_keep_alive(
    collector: Collector,
) -> None:
    data = json.dumps(batch_of("v1")).encode()
    status, rest = exchange(collector, batch_head(data, version="HTTP/1.0"), data)
    assert status == b"HTTP/1.1 200 OK"
    assert rest.endswith(b"<closed>")
    data = json.dumps(batch_of("v2")).encode()
    head = batch_head(data, "Connection: keep-alive", version="HTTP/1.0")
    status, rest = exchange(collector, head, data)
    assert status == b"HTTP/1.1 200 OK"
    assert not rest.endswith(b"<closed>")
    head = batch_head(data, "Connection: close")
    status, rest = exchange(collector, head, data)
    assert status == b"HTTP/1.1 200 OK"
    assert rest.endswith(b"<closed>")


def test_expect_100_continue_gets_its_interim_answer_before_the_body(
    collector: Collector,
) -> None:
    data = json.dumps(batch_of("e1")).encode()
    with socket.create_connection(("127.0.0.1", collector.port), timeout=5) as sock:
        sock.sendall(batch_head(data, "Expect: 100-continue") + b"\r\n\r\n")
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100")
        sock.sendall(data)
        final = sock.recv(65536)
    assert final.startswith(b"HTTP/1.1 200")
    assert collector.message_ids()["e1"] == 1


def test_conflicting_content_lengths_are_answered_400_and_nothing_is_smuggled(
    collector: Collector,
) -> None:
    """Two Content-Length headers that disagree leave the request's end unknown: whichever
    one the collector believed, the rest of the stream would be framed as another request
    on the kept-alive connection (a batch smuggled in the first one's body). It answers 400,
    records nothing and closes; the same length twice is one length."""
    smuggled = json.dumps(batch_of("smuggled")).encode()
    inner = batch_head(smuggled) + b"\r\n\r\n" + smuggled
    for lengths in ((0, len(inner)), (len(inner), 0)):
        head = batch_head(b"", *(f"Content-Length: {n}" for n in lengths))
        head = head.replace(b"Content-Length: 0\r\n", b"", 1)  # batch_head's own
        status, rest = exchange(collector, head, inner)
        assert status.startswith(b"HTTP/1.1 400")
        assert rest.endswith(b"<closed>")
    assert collector.requests == 0
    assert "smuggled" not in collector.message_ids()
    data = json.dumps(batch_of("same")).encode()
    status, _ = exchange(collector, batch_head(data, f"Content-Length: {len(data)}"), data)
    assert status == b"HTTP/1.1 200 OK"
    assert collector.message_ids()["same"] == 1


def test_basic_credentials_with_non_ascii_bytes_are_answered_401_and_recorded(
    collector: Collector,
) -> None:
    """A header byte past ASCII in the Basic credentials is a wrong key, not a crash of the
    handler thread: the request is answered 401 and recorded unauthorized."""
    data = json.dumps(batch_of("n1")).encode()
    head = batch_head(data).replace(b"Authorization: Basic ", b"Authorization: Basic \xe9", 1)
    status, _ = exchange(collector, head, data)
    assert status.startswith(b"HTTP/1.1 401")
    [recorded] = collector.batches
    assert not recorded.authorized
