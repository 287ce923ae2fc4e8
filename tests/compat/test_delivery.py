"""Delivery as a user sees it: flush, retries and their headers, failures, sync mode, a full queue.

Waits are bounded event waits (``wait_for_requests``, ``Errors.wait``), never sleeps; a
bound that runs out is a hang, not a slow run.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from durable_analytics.testing import Collector, Reply

from .conftest import WRITE_KEY
from .harness import Lib, differs


class Errors:
    """An ``on_error`` callback that records its calls and can be waited for."""

    def __init__(self) -> None:
        self.calls: list[tuple[Exception, list[dict[str, Any]]]] = []
        self._cond = threading.Condition()

    def __call__(self, exc: Exception, batch: list[dict[str, Any]]) -> None:
        with self._cond:
            self.calls.append((exc, batch))
            self._cond.notify_all()

    def wait(self, timeout: float = 15.0, count: int = 1) -> bool:
        """True once at least ``count`` calls arrived (False after ``timeout`` seconds)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.calls) >= count, timeout)


def events(collector: Collector) -> list[str]:
    return [str(m.get("event")) for m in collector.messages()]


def test_flush_delivers_every_message_once(lib: Lib, collector: Collector) -> None:
    """200 calls then ``flush()``: all 200 at the server, none twice."""
    client = lib.client(WRITE_KEY, host=collector.url)
    for i in range(200):
        client.track("u", f"E{i}")
    client.flush()
    assert sorted(events(collector)) == sorted(f"E{i}" for i in range(200))
    assert set(collector.message_ids().values()) == {1}


def test_retries_carry_x_retry_count(lib: Lib, collector: Collector) -> None:
    """Two 500s then 200: three requests, ``X-Retry-Count`` absent, 1, 2; delivered once."""
    collector.script(500, 500)
    client = lib.client(WRITE_KEY, host=collector.url)
    client.track("u", "E")
    client.flush()
    assert [b.headers.get("X-Retry-Count") for b in collector.batches] == [None, "1", "2"]
    assert events(collector) == ["E"]


@pytest.mark.parametrize("status", [408, 410, 429, 460, 500, 502, 503, 504])
def test_retryable_status_is_retried_and_delivered(
    lib: Lib, collector: Collector, status: int
) -> None:
    """One retryable answer, then 200: the message arrives once."""
    collector.script(status)
    client = lib.client(WRITE_KEY, host=collector.url)
    client.track("u", "E")
    client.flush()
    assert events(collector) == ["E"]
    assert collector.requests == 2


def test_retry_after_is_waited_and_the_message_delivered(lib: Lib, collector: Collector) -> None:
    """429 with ``Retry-After: 1``: the next request comes at least a second later."""
    collector.script(Reply(429, headers={"Retry-After": "1"}))
    client = lib.client(WRITE_KEY, host=collector.url)
    client.track("u", "E")
    client.flush()
    assert events(collector) == ["E"]
    first, second = collector.batches
    assert second.received_at - first.received_at >= 0.9


def test_server_error_after_the_retries(lib: Lib, collector: Collector) -> None:
    """A server answering 500 to everything: ``on_error`` gets the status and the messages."""
    collector.set_default(500)
    errors = Errors()
    client = lib.client(
        WRITE_KEY, host=collector.url, max_retries=2, on_error=errors, upload_interval=0.05
    )
    client.track("u", "Lost Or Kept")
    assert errors.wait()
    exc, batch = errors.calls[0]
    assert getattr(exc, "status", None) == 500
    assert [m["event"] for m in batch] == ["Lost Or Kept"]
    collector.set_default(200)
    if differs(lib, "failed-batch-kept", segment=False, durable=True):
        client.flush()
        assert events(collector) == ["Lost Or Kept"]
    else:
        client.flush()
        assert events(collector) == []


def test_max_total_backoff_duration_reports_before_max_retries(
    lib: Lib, collector: Collector
) -> None:
    """``max_total_backoff_duration=1`` reports a failing batch long before 100 retries."""
    collector.set_default(500)
    errors = Errors()
    lib.client(
        WRITE_KEY,
        host=collector.url,
        max_retries=100,
        max_total_backoff_duration=1,
        on_error=errors,
    ).track("u", "E")
    assert errors.wait(15)
    assert getattr(errors.calls[0][0], "status", None) == 500


def test_on_error_for_a_batch_that_keeps_failing(lib: Lib, collector: Collector) -> None:
    """A server answering 500 for good: how many ``on_error`` calls one message gets."""
    collector.set_default(500)
    errors = Errors()
    client = lib.client(
        WRITE_KEY, host=collector.url, max_retries=1, on_error=errors, upload_interval=0.05
    )
    client.track("u", "Failing")
    if differs(lib, "on-error-each-attempt", segment=False, durable=True):
        assert errors.wait(count=2)  # the next backoff round failed and reported again
    else:
        assert errors.wait()
        client.flush()  # the batch was dropped: nothing is left to fail again
        assert len(errors.calls) == 1
    assert {m["event"] for _, batch in errors.calls for m in batch} == {"Failing"}


class SegmentStyleHandler(Errors):
    """The ``on_error`` of segment's documentation: reads ``status``, ``code``, ``message``.

    Under segment it gets an ``APIError`` for an HTTP answer; an attribute it reads that
    the exception lacks raises AttributeError in the handler, as it would in a user's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.views: list[tuple[Any, Any, Any]] = []
        self.failures: list[BaseException] = []

    def __call__(self, exc: Exception, batch: list[dict[str, Any]]) -> None:
        try:
            self.views.append((exc.status, exc.code, exc.message))  # type: ignore[attr-defined]
        except Exception as failure:
            self.failures.append(failure)
        super().__call__(exc, batch)


@pytest.mark.parametrize(
    ("reply", "view"),
    [
        (
            Reply(500, body='{"code": "internal", "message": "try again later"}'),
            (500, "internal", "try again later"),
        ),
        (
            Reply(500, body="upstream exploded", headers={"Content-Type": "text/plain"}),
            (500, "unknown", "upstream exploded"),
        ),
    ],
    ids=["json-answer", "text-answer"],
)
def test_a_segment_on_error_handler_sees_status_code_and_message(
    lib: Lib, collector: Collector, reply: Reply, view: tuple[Any, Any, Any], caplog: Any
) -> None:
    """A 500 with a JSON body, and with a plain-text one: the handler's ``(status, code,
    message)`` is the same on both libraries (the JSON's code and message, else
    ``"unknown"`` and the text), and reading them never raises in the handler."""
    collector.set_default(reply)
    handler = SegmentStyleHandler()
    client = lib.client(
        WRITE_KEY, host=collector.url, max_retries=1, on_error=handler, upload_interval=0.05
    )
    client.track("u", "Failing")
    assert handler.wait()
    assert handler.failures == []
    assert handler.views[0] == view
    assert isinstance(handler.calls[0][0], lib.api_error())
    assert "on_error raised" not in caplog.text


def test_a_segment_on_error_handler_when_no_answer_comes(lib: Lib, collector: Collector) -> None:
    """Nothing listening: segment passes requests' exception (no ``code``/``message``); we
    pass a ``RetryableError`` (an ``APIError``, ``status`` None, ``code`` ``"network"``)."""
    collector.stop()
    handler = SegmentStyleHandler()
    client = lib.client(
        WRITE_KEY, host=collector.url, max_retries=0, on_error=handler, upload_interval=0.05
    )
    client.track("u", "Unreachable")
    assert handler.wait()
    exc = handler.calls[0][0]
    if differs(lib, "on-error-no-answer", segment=True, durable=False):
        assert type(exc).__module__.startswith("requests")
        assert [type(f) for f in handler.failures] == [AttributeError]
    else:
        assert isinstance(exc, lib.api_error())
        assert handler.failures == []
        status, code, message = handler.views[0]
        assert (status, code) == (None, "network")
        assert "cannot connect" in message


@pytest.mark.parametrize("status", [401, 403, 404, 501, 505])
def test_configuration_status(lib: Lib, collector: Collector, status: int) -> None:
    """401/403/404/501/505: reported to ``on_error`` at once, without quick retries."""
    collector.set_default(status)
    errors = Errors()
    client = lib.client(WRITE_KEY, host=collector.url, on_error=errors, upload_interval=0.05)
    client.track("u", "E")
    assert errors.wait()
    assert getattr(errors.calls[0][0], "status", None) == status
    assert collector.requests == 1
    if differs(lib, "config-status-kept", segment=False, durable=True):
        assert client.stats().pending == 1
    else:
        client.flush()
        assert client.queue.qsize() == 0
    collector.set_default(200)
    assert events(collector) == []


def test_bad_message_in_a_batch(lib: Lib, collector: Collector) -> None:
    """400 for a batch holding one bad message: the bad one never arrives; and the others?"""
    errors = Errors()
    client = lib.client(WRITE_KEY, host=collector.url, on_error=errors)
    collector.reject_message_ids("bad-one", status=400)
    client.track("u", "Good 1")
    client.track("u", "Bad", message_id="bad-one")
    client.track("u", "Good 2")
    client.flush()
    assert errors.wait()
    assert "Bad" not in events(collector)
    # segment drops the batch the bad message was in; normally all three went together.
    with_bad = [b for b in collector.batches if any(m["event"] == "Bad" for m in b.messages)]
    good_beside_bad = {m["event"] for m in with_bad[0].messages} - {"Bad"}
    expected = differs(
        lib,
        "bad-message-isolated",
        segment={"Good 1", "Good 2"} - good_beside_bad,
        durable={"Good 1", "Good 2"},
    )
    assert set(events(collector)) == expected
    assert [m["event"] for m in errors.calls[-1][1]] == differs(
        lib,
        "bad-message-isolated",
        segment=[m["event"] for m in with_bad[0].messages],
        durable=["Bad"],
    )


def test_sync_mode_delivers_before_the_call_returns(lib: Lib, collector: Collector) -> None:
    """``sync_mode=True``: the message is at the server when the call returns."""
    client = lib.client(WRITE_KEY, host=collector.url, sync_mode=True)
    ok, msg = client.track("u", "Now")
    assert ok is True
    assert events(collector) == ["Now"]
    assert collector.messages()[0]["messageId"] == msg["messageId"]


def test_sync_mode_raises_api_error_when_the_server_fails(lib: Lib, collector: Collector) -> None:
    """``sync_mode=True`` against a 500: the call raises ``APIError`` with the status."""
    collector.set_default(500)
    client = lib.client(WRITE_KEY, host=collector.url, sync_mode=True, max_retries=1)
    with pytest.raises(lib.api_error()) as raised:
        client.track("u", "Failed Now")
    assert raised.value.status == 500  # type: ignore[attr-defined]
    collector.set_default(200)
    if differs(lib, "sync-mode-keeps", segment=False, durable=True):
        client.flush()
        assert events(collector) == ["Failed Now"]
    else:
        assert events(collector) == []


def test_sync_mode_api_error_carries_the_servers_code_and_message(
    lib: Lib, collector: Collector
) -> None:
    """``sync_mode=True`` against a 500 with a JSON error: ``code`` and ``message`` are the
    server's on both libraries."""
    collector.set_default(Reply(500, body='{"code": "overloaded", "message": "slow down"}'))
    client = lib.client(WRITE_KEY, host=collector.url, sync_mode=True, max_retries=0)
    with pytest.raises(lib.api_error()) as raised:
        client.track("u", "Failed Now")
    error: Any = raised.value
    assert (error.status, error.code, error.message) == (500, "overloaded", "slow down")


def test_max_queue_size_drops_calls_beyond_it(lib: Lib, collector: Collector) -> None:
    """With a batch in flight and ``max_queue_size=3``, further calls return False when full."""
    collector.set_default(Reply(delay=2.0))
    client = lib.client(WRITE_KEY, host=collector.url, max_queue_size=3, upload_interval=0.05)
    client.track("u", "In Flight")
    assert collector.wait_for_requests(1)
    results = [client.track("u", f"E{i}")[0] for i in range(5)]
    collector.set_default(200)
    assert results == differs(
        lib,
        "queue-size-counts-in-flight",
        segment=[True, True, True, False, False],
        durable=[True, True, False, False, False],
    )
    client.flush()
    kept = [f"E{i}" for i, ok in enumerate(results) if ok]
    assert sorted(events(collector)) == sorted(["In Flight", *kept])


def test_queue_qsize_and_empty_count_what_waits(lib: Lib, collector: Collector) -> None:
    """``client.queue.qsize()`` / ``empty()`` with a batch in flight and four calls after
    it: segment counts the four waiting in memory, ours every message not yet acknowledged
    (the one in flight too); both say empty before the first call and after ``flush()``."""
    collector.set_default(Reply(delay=1.0))
    client = lib.client(WRITE_KEY, host=collector.url, upload_interval=0.05)
    assert (client.queue.qsize(), client.queue.empty()) == (0, True)
    client.track("u", "In Flight")
    assert collector.wait_for_requests(1)
    for i in range(4):
        client.track("u", f"E{i}")
    assert client.queue.qsize() == differs(lib, "queue-size-counts-in-flight", segment=4, durable=5)
    assert not client.queue.empty()
    collector.set_default(200)
    client.flush()
    assert (client.queue.qsize(), client.queue.empty()) == (0, True)
    assert sorted(events(collector)) == sorted(["In Flight", "E0", "E1", "E2", "E3"])


def test_join_after_a_batch_went_out(lib: Lib, collector: Collector) -> None:
    """``join()`` while a batch is in flight and another message waits: what arrives?"""
    collector.set_default(Reply(delay=0.5))
    client = lib.client(WRITE_KEY, host=collector.url, upload_interval=0.05)
    client.track("u", "First")
    assert collector.wait_for_requests(1)
    client.track("u", "Second")
    client.join()
    assert events(collector) == differs(
        lib, "join-delivers", segment=["First"], durable=["First", "Second"]
    )


def test_no_on_error_call_when_everything_is_delivered(lib: Lib, collector: Collector) -> None:
    """A healthy server: ``on_error`` is never called."""
    errors = Errors()
    client = lib.client(WRITE_KEY, host=collector.url, on_error=errors)
    for i in range(30):
        client.track("u", f"E{i}")
    client.flush()
    assert len(collector.messages()) == 30
    assert errors.calls == []


def test_request_timeout_is_honoured(lib: Lib, collector: Collector) -> None:
    """``timeout=1`` and a server that answers after 3 s: the request is abandoned and retried."""
    collector.script(Reply(delay=3.0))
    client = lib.client(WRITE_KEY, host=collector.url, timeout=1)
    client.track("u", "E")
    client.flush()
    assert collector.requests == 2
    assert "E" in events(collector)


def test_rate_limit_longer_than_max_rate_limit_duration(lib: Lib, collector: Collector) -> None:
    """``Retry-After: 2`` beyond ``max_rate_limit_duration=1``: reported to ``on_error``."""
    collector.script(Reply(429, headers={"Retry-After": "2"}))
    errors = Errors()
    client = lib.client(
        WRITE_KEY,
        host=collector.url,
        max_rate_limit_duration=1,
        on_error=errors,
        upload_interval=0.05,
    )
    client.track("u", "Rate Limited")
    assert errors.wait()
    client.flush()
    assert events(collector) == differs(
        lib, "failed-batch-kept", segment=[], durable=["Rate Limited"]
    )


def test_sync_mode_with_the_server_unreachable(lib: Lib, collector: Collector) -> None:
    """``sync_mode=True`` with nothing listening: the call raises."""
    collector.stop()
    client = lib.client(WRITE_KEY, host=collector.url, sync_mode=True, max_retries=0)
    expected = differs(lib, "sync-mode-network-error", segment=OSError, durable=lib_api_error(lib))
    with pytest.raises(expected):
        client.track("u", "Unreachable")


def lib_api_error(lib: Lib) -> type[Exception]:
    try:
        return lib.api_error()
    except AttributeError:
        return Exception
