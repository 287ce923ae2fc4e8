"""Tests of durable_analytics._client and _default: the Client lifecycle against a real Collector.

flush(), close() and the context manager, sync_mode, send=False, stats(), the module-level
API, and the promise that the write key shows up nowhere but the Authorization header.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import WRITE_KEY, run_python

import durable_analytics
from durable_analytics import (
    APIError,
    Client,
    ConfigurationRejected,
    FlushResult,
    QueueBusy,
    QueueStats,
    RetryableError,
    Track,
    ValidationError,
)
from durable_analytics._config import Config
from durable_analytics._default import get_client
from durable_analytics._pipeline import EXIT_REFUSES_THREADS
from durable_analytics._store import Destination, Lease
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._transport import HTTPTransport
from durable_analytics.testing import Collector, RecordingTransport, Reply, SentBatch


@pytest.fixture
def make_client(collector: Collector, queue_path: Path) -> Iterator[Callable[..., Client]]:
    """Clients on the test queue, sending to the collector; closed at the end."""
    made: list[Client] = []

    def make(key: str = WRITE_KEY, **settings: Any) -> Client:
        settings.setdefault("host", collector.url)
        settings.setdefault("queue_path", queue_path)
        settings.setdefault("on_exit", "none")
        client = Client(key, **settings)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close(timeout=0)


def track_many(client: Client, n: int, **properties: Any) -> list[str]:
    ids = []
    for i in range(n):
        ok, msg = client.track("user-1", "Event", {"i": i, **properties})
        assert ok
        ids.append(msg["messageId"])
    return ids


# ---------------------------------------------------------------- flush


def test_flush_returns_sent_pending_and_dead_lettered(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    client = make_client(flusher="none")
    ids = track_many(client, 20)
    collector.reject_message_ids(ids[5])

    assert client.flush() == FlushResult(sent=19, pending=0, dead_lettered=1)
    assert client.flush() == FlushResult(0, 0, 0)
    assert sorted(collector.message_ids()) == sorted(set(ids) - {ids[5]})
    assert client.stats().dead_letters == 1


def test_flush_counts_its_own_dead_letters_when_the_queue_cannot_be_read_for_the_count(
    make_client: Callable[..., Client], collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count of dead letters is read from the queue at the end of a flush; when that
    read fails (a lock holder stuck past the deadline), the flush counts the dead letters
    its own deliveries moved instead of 0, which counted the rejected message as sent."""
    client = make_client(flusher="none")
    ids = track_many(client, 20)
    collector.reject_message_ids(ids[5])

    def unreadable(*args: Any, **kwargs: Any) -> int:
        raise QueueBusy("the queue stayed locked (a test)")

    monkeypatch.setattr(client.queue, "dead_lettered_since", unreadable)
    assert client.flush() == FlushResult(sent=19, pending=0, dead_lettered=1)


def test_flush_does_not_count_a_message_queued_after_it_that_another_handle_dead_lettered(
    tmp_path: Path,
) -> None:
    """Dead letters are counted from the queue, whoever moved them, but only of messages
    queued by the time flush was called: a message queued during the flush and
    dead-lettered by another handle on the file (another process) is not among the 10 this
    flush reports, which are all sent."""
    path = tmp_path / "q.db"
    other = Queue(path)
    late: list[int] = []

    def answer(batch: SentBatch) -> int:
        if not late:
            late.append(other.append(dest, b'{"type":"track","event":"late"}'))
            lease = other.lease(10, 1 << 20, destination=dest)
            assert lease is not None
            assert late[0] in lease.ids
            other.dead_letter(lease, late, status=400, reason="bad")
        return 200

    client = Client(
        WRITE_KEY,
        queue_path=path,
        flusher="none",
        on_exit="none",
        transport=RecordingTransport(answer),
        max_in_flight=1,
    )
    dest = client._dest
    track_many(client, 10)
    try:
        assert client.flush(timeout=10) == FlushResult(sent=10, pending=0, dead_lettered=0)
        assert len(client.queue.dead_letters()) == 1  # the late one, dead-lettered meanwhile
    finally:
        client.close(timeout=1)
        other.close()


def test_flush_counts_what_the_flusher_thread_delivered_meanwhile(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    # The thread's batches are in flight during flush(): every answer takes 0.3 s (the
    # thread may have two requests out, and either may reach the collector first).
    collector.set_delay(0.3)
    client = make_client()
    ids = track_many(client, 40)
    assert collector.wait_for_requests(1, timeout=5)  # the thread took the first 20

    result = client.flush(timeout=10)

    assert result == FlushResult(sent=40, pending=0, dead_lettered=0)
    assert sorted(collector.message_ids()) == sorted(ids)


def test_flush_only_waits_for_messages_queued_before_it(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    client = make_client(flusher="none")
    track_many(client, 3)
    other = make_client(flusher="none")  # another producer on the same queue
    assert client.flush() == FlushResult(3, 0, 0)
    track_many(other, 2)
    assert client.queue.pending() == 2
    assert client.flush(timeout=5) == FlushResult(2, 0, 0)


def test_flush_neither_counts_nor_delivers_a_call_made_just_after_it_took_its_top(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    """A call another thread makes just after flush() took the newest id it waits for was
    not pending at the call: flush neither delivers it nor counts it, and ``sent + pending
    + dead_lettered`` is the 3 that were queued. (It was taken for a spooled call held back
    by the byte cap: delivered and counted in ``sent``.)"""
    client = make_client(flusher="none")
    other = make_client(flusher="none")  # another producer on the same queue
    track_many(client, 3)
    queue = client.queue
    newest = queue.max_id
    late: list[str] = []

    def max_id() -> int:
        top = newest()
        if not late:
            # The other thread's call lands right after flush() took its top.
            producer = threading.Thread(target=lambda: late.extend(track_many(other, 1)))
            producer.start()
            producer.join()
        return top

    queue.max_id = max_id  # type: ignore[method-assign]
    try:
        result = client.flush(timeout=10)
    finally:
        del queue.max_id  # type: ignore[method-assign]

    assert late  # made during flush()
    assert result == FlushResult(3, 0, 0)
    assert late[0] not in collector.message_ids()
    assert client.queue.pending() == 1  # left for the next flush
    assert client.flush(timeout=10) == FlushResult(1, 0, 0)


def test_flush_counts_and_delivers_the_journaled_calls_made_before_it_not_one_made_after(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    """Calls journaled before flush() (another producer of this process) are pending at
    the call: moved in, delivered and counted. One journaled just after flush() moved the
    journals in and took its top is not: it stays pending for the next flush. (flush()
    took where the calls not in the file end after its move, and counted that late call as
    one held back by the byte cap: delivered, ``sent`` 6 of the 5 queued.)"""
    client = make_client(flusher="none")
    other = make_client(flusher="none")  # another producer on the same queue
    queued = track_many(client, 3) + track_many(other, 2)
    journal = client.queue._spools.journal
    assert journal is not None
    assert journal.has_unmoved()  # some of them journaled
    queue = client.queue
    newest = queue.max_id
    late: list[str] = []

    def max_id() -> int:
        top = newest()
        if not late:
            late.extend(track_many(other, 1))  # journaled right after the move and the top
        return top

    queue.max_id = max_id  # type: ignore[method-assign]
    try:
        result = client.flush(timeout=10)
    finally:
        del queue.max_id  # type: ignore[method-assign]

    assert result == FlushResult(5, 0, 0)
    assert collector.message_ids() == Counter(queued)
    assert client.queue.pending() == 1  # the late call, left for the next flush
    assert client.flush(timeout=10) == FlushResult(1, 0, 0)
    assert collector.message_ids()[late[0]] == 1


def test_flush_with_the_server_down_returns_once_the_next_retry_is_past_its_timeout(
    make_client: Callable[..., Client], refused_url: str
) -> None:
    client = make_client(flusher="none", host=refused_url, max_retries=0)
    track_many(client, 3)
    result = client.flush(timeout=30)

    # The failure stored a backoff of about a second; waiting it out is allowed within the
    # 30 s, but the retry fails again and the next backoff grows: flush returns well before
    # the deadline once a retry would come after it, never waiting it out for nothing.
    assert result == FlushResult(sent=0, pending=3, dead_lettered=0)
    assert client.stats().pending == 3  # nothing lost: still on disk


def test_flush_returns_after_its_failure_while_another_destinations_messages_are_ready(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    """Another destination's messages in the same queue file, ready to send, are not this
    flush's to wait for: after its own failure it returns, without a timeout too (it used
    to poll them forever, or until its timeout)."""
    other = make_client(flusher="none")
    other.track("user-1", "Waiting for its own flush")
    with Collector("another-key") as down:
        down.set_default(Reply(503, headers={"Retry-After": "30"}))
        client = make_client("another-key", flusher="none", host=down.url, max_retries=0)
        track_many(client, 2)
        results: list[FlushResult] = []
        flushing = threading.Thread(target=lambda: results.append(client.flush()), daemon=True)
        flushing.start()
        flushing.join(30)
        assert not flushing.is_alive(), "flush() did not return after its failure"
        assert results == [FlushResult(sent=0, pending=2, dead_lettered=0)]
        assert down.requests == 1
    assert other.stats().pending == 3
    assert collector.requests == 0


def test_flush_with_a_hanging_server_returns_at_the_timeout(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    collector.set_default(Reply(hang=True))
    client = make_client(flusher="none")
    track_many(client, 3)
    started = time.monotonic()
    result = client.flush(timeout=0.5)

    assert time.monotonic() - started < 1.5
    assert result == FlushResult(0, 3, 0)
    assert client.stats().leased == 0


def test_on_error_gets_the_exception_and_the_messages(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    calls: list[tuple[Exception, list[dict[str, Any]]]] = []
    collector.set_default(401)
    client = make_client(flusher="none", on_error=lambda e, m: calls.append((e, m)))
    ids = track_many(client, 2)
    result = client.flush()

    assert result.pending == 2
    [(exc, messages)] = calls
    assert isinstance(exc, ConfigurationRejected)
    assert exc.status == 401
    assert [m["messageId"] for m in messages] == ids


def test_flush_with_a_timeout_does_not_wait_for_an_on_error_that_blocks(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    """An ``on_error`` that blocks (for a minute here, unless the test lets it go) held
    ``flush(timeout=0.5)`` for as long as it blocked. The flush now returns while the
    callback is still blocked, and the callback still gets its one call."""
    release = threading.Event()
    returned = threading.Event()
    called: list[int] = []

    def on_error(exc: Exception, messages: list[dict[str, Any]]) -> None:
        called.append(len(messages))
        release.wait(60)
        returned.set()

    collector.set_default(500)
    client = make_client(flusher="none", on_error=on_error, max_retries=0)
    track_many(client, 2)
    try:
        result = client.flush(timeout=0.5)
        assert not returned.is_set()  # it returned while on_error was still blocked
        assert called == [2]
    finally:
        release.set()
    assert result.pending == 2


def test_on_error_never_runs_twice_at_once_for_the_flusher_thread_and_a_flush(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    """The flusher thread's deliverer and the one ``flush()`` uses each had a lock of their
    own, so a flush's report ran beside the flusher thread's, still blocked (the README:
    "calls never overlap"). One gate per client now: the flush waits for it until its
    deadline, and its call comes once the first has returned."""
    release = threading.Event()
    first_in = threading.Event()
    inside: list[str] = []
    most: list[int] = [0]
    threads: list[str] = []

    def on_error(exc: Exception, messages: list[dict[str, Any]]) -> None:
        inside.append(threading.current_thread().name)
        most[0] = max(most[0], len(inside))
        threads.append(inside[-1])
        first_in.set()
        release.wait(30)
        inside.pop()

    client = make_client(on_error=on_error, max_retries=0)
    track_many(client, 1)
    client.flush(timeout=5.0)  # delivered: starts the flusher thread and flush()'s deliverer
    flusher = client._flusher
    assert flusher is not None
    assert client._sync_deliverer is not None
    background, foreground = flusher.deliverer, client._sync_deliverer
    lease = Lease("t", Destination(1, collector.url, WRITE_KEY), (1,), (b'{"a":1}',), 0, 0.0)
    error = RetryableError("HTTP 500; kept")
    blocked = threading.Thread(target=background._report, args=(error, lease, [0]))
    blocked.start()
    try:
        assert first_in.wait(10)
        # The flush's report waits for the gate, and gives up waiting at its deadline.
        foreground._report(error, lease, [0], time.monotonic() + 0.3)
        assert len(threads) == 1
    finally:
        release.set()
        blocked.join(10)
    deadline = time.monotonic() + 10
    while len(threads) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(threads) == 2  # the flush's call came, after the first had returned
    assert most[0] == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [400, 500])
def test_a_flush_called_inside_on_error_returns_at_once_counting_without_delivering(
    make_client: Callable[..., Client], collector: Collector, status: int
) -> None:
    """``on_error`` that calls ``flush()`` (no timeout): the inner flush waited for the
    report lock its own outer call held, or for a slot of the window the batch being
    reported still held, for ever. It now returns at once with the count, delivering
    nothing; the outer flush goes on, and a later flush sends what is left."""
    collector.set_default(status)
    calls: list[type[Exception]] = []
    inner: list[FlushResult] = []

    def on_error(exc: Exception, messages: list[dict[str, Any]]) -> None:
        calls.append(type(exc))
        if len(calls) == 1:
            client.track(user_id="u", event="Inside")
            inner.append(client.flush())

    client = make_client(flusher="none", on_error=on_error, max_in_flight=4, max_retries=0)
    ids = track_many(client, 1 if status == 400 else 100)
    result = client.flush()

    assert len(inner) == 1
    assert inner[0].sent == 0
    if status == 400:
        assert inner[0].pending == 1  # the message tracked inside; the bad one is gone
        assert result == FlushResult(0, 0, 1)
    else:
        assert inner[0].pending == len(ids) + 1
        assert result == FlushResult(0, len(ids), 0)
    # Nothing lost: each call is queued or a dead letter.
    assert client.queue.pending() + len(client.queue.dead_letters()) == len(ids) + 1


@pytest.mark.skipif(
    EXIT_REFUSES_THREADS,
    reason="CPython 3.12.0-3.12.2 start no thread at interpreter exit: on_error runs in the "
    "exit's own thread there, for as long as it takes (documented in the README)",
)
def test_exit_is_not_held_by_an_on_error_that_never_returns(
    collector: Collector, queue_path: Path
) -> None:
    """A script whose ``on_error`` never returns still exits (``shutdown_timeout=0.5``):
    the exit handler's delivery failed, called ``on_error``, and did not wait for it past
    its time. Its message stays queued."""
    collector.set_default(500)
    result = run_python(
        f"""
        import threading
        from durable_analytics import Client
        def on_error(exc, messages):
            print("on_error", len(messages), flush=True)
            threading.Event().wait()
        client = Client({WRITE_KEY!r}, host={collector.url!r}, queue_path={str(queue_path)!r},
                        flusher="none", shutdown_timeout=0.5, max_retries=0, on_error=on_error)
        client.track("user-1", "Event")
        """,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "on_error 1"
    queue = Queue(queue_path)
    assert queue.pending() == 1
    queue.close()


# ---------------------------------------------------------------- close


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, "5", True])
def test_flush_and_close_refuse_a_timeout_that_is_not_finite_seconds_and_keep_the_queue(
    make_client: Callable[..., Client], timeout: Any
) -> None:
    """A NaN deadline is never reached nor passed: ``flush(timeout=nan)`` against a failing
    server looped without a pause for ever. Such a timeout is refused at the call, a
    ``ValidationError`` (a ``ValueError``) naming it, and nothing queued is touched."""
    client = make_client(flusher="none")
    ids = track_many(client, 3)
    for call in (client.flush, client.close):
        with pytest.raises(ValidationError, match="timeout") as raised:
            call(timeout=timeout)
        assert isinstance(raised.value, ValueError)
        assert call.__name__ in str(raised.value)
    assert client.queue.pending() == len(ids)
    assert client.flush(timeout=5.0) == FlushResult(len(ids), 0, 0)


def test_close_flushes_and_stops_the_flusher_thread(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    client = make_client()
    ids = track_many(client, 5)  # under flush_at: the thread would wait 5 s
    flusher = client._flusher
    assert flusher is not None
    assert flusher.alive

    assert client.close() == FlushResult(5, 0, 0)
    assert not flusher.alive
    assert client._flusher is None
    assert sorted(collector.message_ids()) == sorted(ids)


def test_the_context_manager_flushes_and_stops(collector: Collector, queue_path: Path) -> None:
    with Client(WRITE_KEY, host=collector.url, queue_path=queue_path, on_exit="none") as client:
        ids = track_many(client, 3)
        flusher = client._flusher
    assert flusher is not None
    assert not flusher.alive
    assert sorted(collector.message_ids()) == sorted(ids)


def test_close_before_any_call_reports_what_is_queued(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    make_client(flusher="none").track("user-1", "Left over")
    client = make_client()
    assert client.close() == FlushResult(0, 1, 0)
    assert collector.requests == 0


def test_close_is_bounded_by_its_timeout_when_the_server_hangs(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    collector.set_default(Reply(hang=True))
    client = make_client(flush_at=1)
    track_many(client, 3)
    assert collector.wait_for_requests(1, timeout=5)  # the thread is stuck in a request
    started = time.monotonic()
    result = client.close(timeout=0.5)
    assert time.monotonic() - started < 1.5
    assert result.pending == 3


def test_calls_after_close_are_still_queued_and_delivered(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    client = make_client()
    client.track("user-1", "Before")
    client.close()
    ok, msg = client.track("user-1", "After")

    assert ok
    assert client.stats().pending == 1
    assert client._flusher is not None
    assert client._flusher.alive  # a new flusher started
    assert client.close() == FlushResult(1, 0, 0)
    assert collector.message_ids()[msg["messageId"]] == 1


def test_join_and_shutdown_flush_like_the_peer(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    client = make_client()
    track_many(client, 2)
    client.join()
    assert len(collector.messages()) == 2
    track_many(client, 2)
    client.shutdown()
    assert len(collector.messages()) == 4


# ---------------------------------------------------------------- sync_mode and send


def test_sync_mode_delivers_before_the_call_returns(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    client = make_client(sync_mode=True)
    for i in range(3):
        ok, msg = client.track("user-1", f"Event {i}")
        assert ok
        assert collector.message_ids()[msg["messageId"]] == 1  # no waiting
    assert client.stats().pending == 0


def test_sync_mode_leaves_the_message_queued_when_the_server_is_down(
    make_client: Callable[..., Client], refused_url: str
) -> None:
    client = make_client(sync_mode=True, host=refused_url, max_retries=0)
    started = time.monotonic()
    with pytest.raises(APIError) as first:
        client.track("user-1", "Event")
    with pytest.raises(APIError) as second:  # backing off now: raises at once
        client.track("user-1", "Event")
    assert (first.value.status, first.value.code) == (None, "network")
    assert second.value.code == "backoff"
    assert time.monotonic() - started < 1.0
    assert client.stats().pending == 2


def test_sync_mode_waits_for_a_message_the_flusher_thread_took(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    # flush_at=1 wakes the thread on every message; the call's own lease is held back until
    # the thread has taken the message, so the thread always wins the race. The call must
    # still return only once its message was delivered.
    collector.set_default(Reply(delay=0.03))
    client = make_client(sync_mode=True, flush_at=1)
    queue = client.queue
    real_lease = queue.lease
    caller = threading.get_ident()
    gate = {"armed": False}

    def lease(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == caller and gate["armed"]:
            gate["armed"] = False
            flusher = client._flusher
            deadline = time.monotonic() + 2.0
            while flusher is not None and not flusher.delivering:
                assert time.monotonic() < deadline, "the flusher thread never took it"
                time.sleep(0.001)
        return real_lease(*args, **kwargs)

    queue.lease = lease  # type: ignore[method-assign]
    for i in range(5):
        gate["armed"] = True
        _, msg = client.track("user-1", f"Event {i}")
        assert collector.message_ids()[msg["messageId"]] == 1, f"call {i} returned early"


def test_send_false_queues_nothing(queue_path: Path, collector: Collector) -> None:
    client = Client(WRITE_KEY, host=collector.url, queue_path=queue_path, send=False)
    ok, msg = client.track("user-1", "Event")
    assert ok
    assert msg["event"] == "Event"
    assert not queue_path.exists()
    assert client.flush() == FlushResult(0, 0, 0)
    assert client.stats() == QueueStats(0, 0, 0, 0, None, 0, None, [])
    assert client.close() == FlushResult(0, 0, 0)
    assert collector.requests == 0


def test_enqueue_delivers_a_typed_message(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    client = make_client(flusher="none")
    ok, msg = client.enqueue(Track(user_id="user-1", event="Typed"))
    assert ok
    client.flush()
    [received] = collector.messages()
    assert (received["event"], received["messageId"]) == ("Typed", msg["messageId"])


# ---------------------------------------------------------------- stats and repr


def test_stats_has_the_documented_names(
    make_client: Callable[..., Client], collector: Collector
) -> None:
    names = [f.name for f in dataclasses.fields(QueueStats)]
    assert names == [
        "pending",
        "leased",
        "dead_letters",
        "bytes",
        "oldest_age_seconds",
        "dropped",
        "last_error",
        "destinations",
        "wal_bytes",
        "spooled",
    ]
    collector.set_default(503)
    client = make_client(flusher="none", max_retries=0)
    track_many(client, 4)
    client.flush()
    stats = client.stats()

    assert (stats.pending, stats.leased, stats.dead_letters, stats.dropped) == (4, 0, 0, 0)
    assert stats.bytes > 0
    assert stats.oldest_age_seconds is not None
    assert stats.last_error is not None
    assert set(stats.last_error) == {"message", "at", "host"}
    assert "HTTP 503" in stats.last_error["message"]
    [dest] = stats.destinations
    assert (dest.host, dest.pending, dest.failures) == (collector.url, 4, 1)
    assert dest.write_key == WRITE_KEY[:4] + "…"
    assert set(stats.as_dict()) == set(names)


def test_repr_hides_the_write_key(make_client: Callable[..., Client]) -> None:
    client = make_client()
    text = repr(client)
    assert WRITE_KEY not in text
    assert "test…" in text
    assert WRITE_KEY not in repr(client.config)


# ---------------------------------------------------------------- module-level API


@pytest.fixture
def module_api(
    monkeypatch: pytest.MonkeyPatch, collector: Collector, queue_path: Path
) -> Iterator[Any]:
    monkeypatch.setattr(durable_analytics, "default_client", None)
    monkeypatch.setattr(durable_analytics, "write_key", WRITE_KEY)
    monkeypatch.setattr(durable_analytics, "host", collector.url)
    monkeypatch.setattr(durable_analytics, "queue_path", str(queue_path))
    yield durable_analytics
    client = durable_analytics.default_client
    if client is not None:
        client.close(timeout=0)


def test_the_module_level_api_delivers_through_one_default_client(
    module_api: Any, collector: Collector
) -> None:
    ok, msg = module_api.track("user-1", "Signed Up", {"plan": "Enterprise"})
    assert ok
    module_api.identify("user-1", {"email": "a@example.com"})
    client = module_api.default_client
    assert client is get_client()
    assert client.config.host == collector.url

    result = module_api.flush()
    assert result.pending == 0
    received = {m["type"]: m for m in collector.messages()}
    assert received["track"]["properties"] == {"plan": "Enterprise"}
    assert received["track"]["messageId"] == msg["messageId"]
    assert module_api.stats().pending == 0
    module_api.shutdown()


def test_the_module_level_settings_reach_the_default_client(
    module_api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable_analytics, "upload_size", 7)
    monkeypatch.setattr(durable_analytics, "gzip", True)
    monkeypatch.setattr(durable_analytics, "max_retries", 1)
    config = get_client().config
    assert (config.flush_at, config.gzip, config.max_retries) == (7, True, 1)


def test_debug_from_the_environment_reaches_the_default_client(
    module_api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEBUG", "analytics")
    level = logging.getLogger("durable_analytics").level
    try:
        assert get_client().config.debug is True
    finally:
        logging.getLogger("durable_analytics").setLevel(level)


# ---------------------------------------------------------------- the write key stays secret

CANARY = "canary-SECRET-write-key-7f3a9c"


def test_a_canary_write_key_never_leaks(
    collector: Collector,
    queue_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Logs at DEBUG, exceptions, reprs and request bodies never contain the write key."""
    caplog.set_level(logging.DEBUG, logger="durable_analytics")
    errors: list[Exception] = []
    with Collector(CANARY) as good:
        # 1. Delivered, dead-lettered and retried batches, with debug logging on.
        client = Client(
            CANARY,
            host=good.url,
            queue_path=queue_path,
            debug=True,
            flusher="none",
            on_exit="none",
            max_retries=1,
            on_error=lambda e, m: errors.append(e),
        )
        ids = track_many(client, 6)
        good.reject_message_ids(ids[0])
        good.script(Reply(503, body=f"overloaded, key {CANARY}"))
        client.flush(timeout=5)
        assert good.wait_for_messages(5)
        # The server echoes the key in a 401 body.
        good.set_default(Reply(401, body=f'{{"message":"bad key {CANARY}"}}'))
        client.track("user-1", "Later")
        client.flush()

        queue = client.queue
        lease = Queue(queue_path).lease(20, 500_000, now=time.time() + 3600)
        assert lease is not None
        texts = [
            repr(client),
            str(client.config),
            repr(client.config),
            repr(Config.build(CANARY)),
            repr(lease),
            repr(lease.destination),
            repr(HTTPTransport()),
            repr(queue),
            repr(client.stats()),
            str(client.stats().as_dict()),
            repr(queue.dead_letters()),
            str([d.as_dict() for d in queue.dead_letters()]),
            repr(client.flush(timeout=0)),
        ]
        texts += [str(e) for e in errors] + [repr(e) for e in errors]
        texts += [getattr(e, "excerpt", "") for e in errors]
        texts += [r.getMessage() for r in caplog.records]
        texts += [caplog.text]
        for batch in good.batches:
            texts.append(batch.raw_body.decode())
        client.close(timeout=0)

    assert len(errors) >= 2  # a dead letter and a 401 at least
    assert any("401" in t for t in texts)
    assert caplog.records
    for text in texts:
        assert CANARY not in text, text


def test_a_canary_write_key_never_reaches_a_child_process_stderr(
    collector: Collector, queue_path: Path
) -> None:
    # The collector expects another key: the child gets 401s, logs at DEBUG, and exits.
    result = run_python(
        f"""
        from durable_analytics import Client
        client = Client({CANARY!r}, host={collector.url!r}, queue_path={str(queue_path)!r},
                        debug=True, shutdown_timeout=1, flush_at=1)
        for i in range(3):
            client.track("user-1", "Event")
        try:
            Client("", host={collector.url!r})
        except Exception as exc:
            print("config error:", exc)
        raise RuntimeError("a crash with a traceback")
        """,
        timeout=30,
    )
    assert result.returncode == 1
    assert "401" in result.stderr
    assert "RuntimeError" in result.stderr
    assert "config error" in result.stdout
    assert CANARY not in result.stderr
    assert CANARY not in result.stdout
    assert collector.requests >= 1
    for batch in collector.batches:
        assert CANARY.encode() not in batch.raw_body


def test_a_client_moves_a_damaged_queue_aside_and_keeps_the_readable_messages(
    queue_path: Path,
) -> None:
    """Client(...) on a file with a broken header salvages every message into a fresh queue."""
    client = Client(WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none")
    for i in range(50):
        client.track("u", "E", {"i": i})
    client.queue.max_id()  # moves the calls in from the journal: all 50 in the file
    client.queue.close()
    with open(queue_path, "r+b") as f:
        f.write(b"not a database, not at all")
    revived = Client(WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none")
    assert revived.stats().pending == 50
    report = revived.queue.last_recovery
    assert report is not None
    assert report.messages == 50
    assert report.moved_to.exists()
    assert report.moved_to.stat().st_mode & 0o777 == 0o600
    assert revived.queue.integrity_check() == "ok"


@pytest.mark.parametrize("flusher", ["none", "thread", "process"])
def test_a_client_dropped_before_its_first_call_is_freed_at_once(
    queue_path: Path, flusher: str
) -> None:
    """Nothing ties a Client to itself before its first call (its exit hook holds no handler
    until then): dropping the last reference frees it, queue and all, with the cyclic
    garbage collector off, as a dropped object normally is."""
    client = Client(WRITE_KEY, queue_path=queue_path, flusher=flusher, on_exit="none")
    ref = weakref.ref(client)
    gc.disable()
    try:
        del client
        assert ref() is None
    finally:
        gc.enable()
