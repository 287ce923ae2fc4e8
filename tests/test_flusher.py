"""Tests of durable_analytics._flusher: the batching rules, the status policy, the thread.

Messages are stored through a real ``Client`` (``flusher="none"``) or straight into the
queue, and delivered by a ``Deliverer`` or ``Flusher`` to a real Collector. Time is never
waited for: the ``flush_interval`` rule reads an injected clock or freezegun's, retries
sleep through an injected ``sleep``.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from conftest import WRITE_KEY, child_env
from freezegun import freeze_time

from durable_analytics import Client
from durable_analytics._delivery import RETRY_CAP, Deliverer, retry_delay
from durable_analytics._drain import drain
from durable_analytics._flusher import Flusher
from durable_analytics._store import MAX_BACKOFF_SECONDS
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._transport import HTTPTransport, Outcome, envelope_overhead
from durable_analytics.exceptions import (
    ConfigurationRejected,
    MessageRejected,
    RetryableError,
)
from durable_analytics.testing import Collector, Reply

RETRYABLE = [408, 410, 429, 460, 500, 502, 503, 504]


class FakeClock:
    """Wall-clock time that only moves when told to."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """An ``on_error`` that remembers what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[Exception, list[dict[str, Any]]]] = []

    def __call__(self, exc: Exception, messages: list[dict[str, Any]]) -> None:
        self.calls.append((exc, messages))


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close(timeout=0)


@pytest.fixture
def producer(
    collector: Collector, queue_path: Path, clients: list[Client]
) -> Callable[..., Client]:
    """A Client that only appends (no flusher), to the collector by default."""

    def make(key: str = WRITE_KEY, host: str | None = None, **settings: Any) -> Client:
        settings.setdefault("flusher", "none")
        settings.setdefault("on_exit", "none")
        client = Client(key, host=host or collector.url, queue_path=queue_path, **settings)
        clients.append(client)
        return client

    return make


def track_many(client: Client, n: int, **properties: Any) -> list[str]:
    """Track ``n`` events; return their messageIds in order."""
    ids = []
    for i in range(n):
        ok, msg = client.track("user-1", "Event", {"i": i, **properties})
        assert ok
        ids.append(msg["messageId"])
    return ids


def make_deliverer(queue: Queue, **settings: Any) -> Deliverer:
    settings.setdefault("sleep", lambda _seconds: None)
    timeout = settings.pop("timeout", 5.0)
    return Deliverer(queue, HTTPTransport(timeout=timeout), **settings)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def wait_cycles(flusher: Flusher, n: int) -> None:
    """Let the flusher thread look at the queue ``n`` more times."""
    target = flusher.cycles + n
    assert wait_until(lambda: flusher.cycles >= target), "the flusher thread stopped looping"


@pytest.fixture
def flushers() -> Iterator[list[Flusher]]:
    made: list[Flusher] = []
    yield made
    for flusher in made:
        flusher.stop(2.0)


# ---------------------------------------------------------------- the batching rules


def test_19_messages_are_not_sent_before_flush_interval_and_are_sent_after(
    producer: Callable[..., Client], collector: Collector, flushers: list[Flusher]
) -> None:
    client = producer()
    ids = track_many(client, 19)
    clock = FakeClock()
    flusher = Flusher(
        make_deliverer(client.queue), flush_interval=5.0, poll_interval=0.01, clock=clock
    )
    flushers.append(flusher)
    started = time.monotonic()
    flusher.start()

    wait_cycles(flusher, 5)
    assert collector.requests == 0
    clock.advance(4.9)
    flusher.notify()
    wait_cycles(flusher, 5)
    assert collector.requests == 0  # 4.9 s: still waiting for more

    clock.advance(0.2)  # 5.1 s after the oldest message
    flusher.notify()
    assert collector.wait_for_messages(19, timeout=5)
    assert time.monotonic() - started < 3.0  # the wait was on the fake clock, not real time
    [batch] = collector.batches
    assert [m["messageId"] for m in batch.messages] == ids


def test_19_messages_wait_for_flush_interval_under_freezegun(
    producer: Callable[..., Client], collector: Collector
) -> None:
    """The same rule, with freezegun's clock driving the flusher's look from this thread."""
    with freeze_time("2024-05-01 12:00:00") as frozen:
        client = producer()
        track_many(client, 19)
        flusher = Flusher(make_deliverer(client.queue), flush_interval=5.0)

        wait = flusher._cycle()
        assert 0 < wait <= flusher.poll_interval
        frozen.tick(4.99)
        assert flusher._cycle() > 0
        assert collector.requests == 0

        frozen.tick(0.02)
        assert flusher._cycle() == 0.0
        assert len(collector.messages()) == 19
        assert client.queue.pending() == 0


def test_the_20th_message_wakes_the_flusher_at_once(
    collector: Collector, queue_path: Path, clients: list[Client]
) -> None:
    client = Client(WRITE_KEY, host=collector.url, queue_path=queue_path, on_exit="none")
    clients.append(client)
    client.track("user-1", "Event 0")  # starts the flusher thread
    flusher = client._flusher
    assert flusher is not None
    flusher.poll_interval = 60.0  # only an append can wake it early now
    flusher.notify()
    wait_cycles(flusher, 1)
    looked = flusher.cycles

    for i in range(1, 19):
        client.track("user-1", f"Event {i}")
    time.sleep(0.05)
    assert collector.requests == 0
    assert flusher.cycles == looked  # 19 messages: nobody woke it, it waits for 5 s

    started = time.monotonic()
    client.track("user-1", "Event 19")
    assert collector.wait_for_messages(20, timeout=3)
    assert time.monotonic() - started < 3.0  # well before the 5 s flush_interval
    assert len(collector.batches) == 1


def test_messages_overflowing_max_batch_bytes_split_into_batches_under_the_limit(
    producer: Callable[..., Client], collector: Collector
) -> None:
    client = producer()
    ids = track_many(client, 40, blob="x" * 30_000)  # 40 x ~30 KB = 1.2 MB
    result = client.flush(timeout=10)

    assert result.sent == 40
    sizes = [len(b.raw_body) for b in collector.batches]
    assert len(sizes) >= 3  # by count alone it would be 2 batches of 20
    assert all(size <= 500_000 for size in sizes), sizes
    assert max(sizes) > 400_000  # batches are filled, not just cut small
    assert sorted(collector.message_ids()) == sorted(ids)


def raw_message(message_id: str, size: int) -> bytes:
    """A valid message body of exactly ``size`` bytes."""
    head = json.dumps({"type": "track", "event": "E", "userId": "u", "messageId": message_id})
    pad = size - len(head) - len(',"p":""')
    assert pad >= 0
    return (head[:-1] + ',"p":"' + "x" * pad + '"}').encode()


@pytest.mark.parametrize(("extra", "per_batch"), [(0, 2), (1, 1)])
def test_max_batch_bytes_counts_the_whole_body_envelope_included(
    queue_path: Path, collector: Collector, extra: int, per_batch: int
) -> None:
    # Two messages of 50,000 bytes make a body of exactly `limit` bytes (envelope and the
    # comma between them included); one byte more each, and only one fits.
    limit = 2 * 50_000 + 1 + envelope_overhead()
    size = 50_000 + extra
    queue = Queue(queue_path)
    dest = queue.destination(collector.url, WRITE_KEY)
    for i in range(4):
        queue.append(dest, raw_message(f"m{i}", size))
    deliverer = make_deliverer(queue, max_batch_bytes=limit)
    while deliverer.deliver_next() is not None:
        pass

    sizes = [len(b.raw_body) for b in collector.batches]
    assert [len(b.messages) for b in collector.batches] == [per_batch] * (4 // per_batch)
    assert all(s <= limit for s in sizes)
    if per_batch == 2:
        assert sizes[0] == limit  # exactly at the limit is allowed


def test_flush_at_1_sends_every_message_alone_and_at_once(
    collector: Collector, queue_path: Path, clients: list[Client]
) -> None:
    client = Client(
        WRITE_KEY, host=collector.url, queue_path=queue_path, flush_at=1, on_exit="none"
    )
    clients.append(client)
    started = time.monotonic()
    ids = [client.track("user-1", f"Event {i}")[1]["messageId"] for i in range(5)]

    assert collector.wait_for_messages(5, timeout=3)
    assert time.monotonic() - started < 3.0  # no flush_interval wait
    assert [len(b.messages) for b in collector.batches] == [1] * 5
    assert sorted(collector.message_ids()) == sorted(ids)


def test_batches_never_mix_destinations(queue_path: Path, clients: list[Client]) -> None:
    with Collector() as any_key:  # accepts any well-formed key, so both keys get through
        a = Client("key-A", host=any_key.url, queue_path=queue_path, flusher="none")
        b = Client("key-B", host=any_key.url, queue_path=queue_path, flusher="none")
        clients.extend([a, b])
        for i in range(30):  # interleaved on one queue
            a.track("user-a", "A", {"i": i})
            b.track("user-b", "B", {"i": i})
        result = drain(a.queue, lambda: make_deliverer(a.queue), concurrency=2)

        assert (result.sent, result.left) == (60, 0)
        seen = {"A": 0, "B": 0}
        for batch in any_key.batches:
            key = batch.headers["Authorization"]
            events = {m["event"] for m in batch.messages}
            assert len(events) == 1, "a batch mixed destinations"
            [event] = events
            token = base64.b64encode(f"key-{event}:".encode()).decode()
            assert key == f"Basic {token}"
            seen[event] += len(batch.messages)
        assert seen == {"A": 30, "B": 30}


# ---------------------------------------------------------------- the status policy


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_a_2xx_acks_the_batch(
    producer: Callable[..., Client], collector: Collector, status: int
) -> None:
    collector.set_default(status)
    client = producer()
    track_many(client, 5)
    stats = make_deliverer(client.queue).deliver_next()

    assert stats is not None
    assert (stats.sent, stats.kept, stats.requests) == (5, 0, 1)
    assert client.queue.pending() == 0
    assert client.queue.stats().leased == 0


@pytest.mark.parametrize("status", RETRYABLE)
def test_a_retryable_status_is_retried_quickly_then_released_with_a_backoff(
    producer: Callable[..., Client], collector: Collector, status: int
) -> None:
    collector.set_default(status)
    client = producer()
    track_many(client, 5)
    queue = client.queue
    sleeps: list[float] = []
    errors = Recorder()
    deliverer = make_deliverer(queue, max_retries=3, sleep=sleeps.append, on_error=errors)
    before = time.time()
    stats = deliverer.deliver_next()

    assert stats is not None
    assert (stats.sent, stats.kept) == (0, 5)
    assert collector.requests == 4  # the first try and max_retries=3 quick retries
    assert len(sleeps) == 3
    assert all(0 < s <= 4.5 for s in sleeps)
    not_before, failures = queue.backoff(client._dest)
    assert failures == 1
    assert before + 1.0 <= not_before <= time.time() + 1.25
    assert queue.lease(20, 500_000) is None  # nobody re-leases it before the backoff
    assert queue.lease(20, 500_000, now=not_before + 0.01) is not None
    info = queue.stats()
    assert (info.pending, info.dead_letters) == (5, 0)
    [dest] = info.destinations
    assert dest.backoff_until is not None
    assert dest.failures == 1
    assert f"HTTP {status}" in (dest.last_error or "")
    [(exc, messages)] = errors.calls
    assert isinstance(exc, RetryableError)
    assert exc.status == status
    assert len(messages) == 5


@pytest.mark.parametrize("status", [501, 505])
def test_501_and_505_are_not_retried(
    producer: Callable[..., Client], collector: Collector, status: int
) -> None:
    collector.set_default(status)
    client = producer()
    track_many(client, 3)
    errors = Recorder()
    stats = make_deliverer(client.queue, on_error=errors).deliver_next()

    assert stats is not None
    assert stats.kept == 3
    assert collector.requests == 1
    not_before, _ = client.queue.backoff(client._dest)
    assert not_before >= time.time() + 29  # the configuration-error backoff
    assert isinstance(errors.calls[0][0], ConfigurationRejected)


def test_a_refused_connection_is_retried_then_released(
    producer: Callable[..., Client], refused_url: str
) -> None:
    client = producer(host=refused_url)
    track_many(client, 2)
    sleeps: list[float] = []
    stats = make_deliverer(client.queue, max_retries=2, sleep=sleeps.append).deliver_next()

    assert stats is not None
    assert stats.kept == 2
    assert len(sleeps) == 2
    assert "cannot connect" in stats.errors[-1]
    assert client.queue.backoff(client._dest)[1] == 1
    assert client.queue.pending() == 2


def test_max_retries_0_releases_after_one_try(
    producer: Callable[..., Client], collector: Collector
) -> None:
    collector.set_default(503)
    client = producer()
    track_many(client, 2)
    sleeps: list[float] = []
    make_deliverer(client.queue, max_retries=0, sleep=sleeps.append).deliver_next()
    assert collector.requests == 1
    assert sleeps == []


def test_a_quick_retry_that_succeeds_acks_and_clears_nothing(
    producer: Callable[..., Client], collector: Collector
) -> None:
    collector.script(503, 502)
    client = producer()
    ids = track_many(client, 4)
    stats = make_deliverer(client.queue).deliver_next()

    assert stats is not None
    assert (stats.sent, stats.kept) == (4, 0)
    assert collector.requests == 3
    assert client.queue.backoff(client._dest) == (0.0, 0)
    assert sorted(collector.message_ids()) == sorted(ids)


def test_a_destination_backing_off_recovers_after_a_success(
    producer: Callable[..., Client], collector: Collector
) -> None:
    collector.script(503)
    client = producer()
    track_many(client, 3)
    queue = client.queue
    make_deliverer(queue, max_retries=0).deliver_next()
    not_before, failures = queue.backoff(client._dest)
    assert failures == 1

    lease = queue.lease(20, 500_000, now=not_before + 0.01)
    assert lease is not None
    assert lease.failures == 1
    stats = make_deliverer(queue).deliver(lease)

    assert stats.sent == 3
    assert queue.backoff(client._dest) == (0.0, 0)  # healthy again: no backoff left
    assert collector.requests == 2  # a backing-off destination gets no quick retries


def test_retry_after_in_seconds_is_honoured_by_every_process_on_the_queue(
    producer: Callable[..., Client], collector: Collector, queue_path: Path
) -> None:
    collector.script(Reply(429, headers={"Retry-After": "7"}))
    client = producer()
    track_many(client, 3)
    queue = client.queue
    sleeps: list[float] = []
    now = time.time()
    make_deliverer(queue, sleep=sleeps.append).deliver_next()

    assert collector.requests == 1  # the server said when: no quick retries
    assert sleeps == []
    not_before, _ = queue.backoff(client._dest)
    assert now + 7 <= not_before <= time.time() + 7.01
    assert queue.lease(20, 500_000, now=not_before - 0.5) is None
    # Another process on the queue file sees the same wait.
    code = f"""
import time
from durable_analytics._store.sqlite import SqliteQueue as Queue
q = Queue({str(queue_path)!r})
print(q.lease(20, 500_000) is None, q.lease(20, 500_000, now={not_before - 0.5!r}) is None,
      round(q.next_ready_at() - time.time()))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=30,
        check=True,
    ).stdout.split()
    assert out[:2] == ["True", "True"]
    assert 5 <= int(out[2]) <= 7
    lease = queue.lease(20, 500_000, now=not_before + 0.01)
    assert lease is not None
    assert len(lease) == 3


def test_retry_after_as_an_http_date_is_honoured(
    producer: Callable[..., Client], collector: Collector
) -> None:
    when = time.time() + 120
    collector.script(Reply(503, headers={"Retry-After": formatdate(when, usegmt=True)}))
    client = producer()
    track_many(client, 2)
    make_deliverer(client.queue).deliver_next()

    assert collector.requests == 1
    not_before, _ = client.queue.backoff(client._dest)
    assert when - 2 <= not_before <= when + 1
    assert client.queue.lease(20, 500_000, now=when - 3) is None


def test_a_short_retry_after_never_cuts_the_backoff(
    producer: Callable[..., Client], collector: Collector
) -> None:
    """A server answering ``Retry-After: 0`` to every request must not be hammered."""
    collector.set_default(Reply(503, headers={"Retry-After": "0"}))
    client = producer()
    track_many(client, 2)
    queue = client.queue
    for _ in range(5):  # five failures already
        queue.set_backoff(client._dest, time.time() - 1)
    make_deliverer(queue).deliver_next()

    not_before, failures = queue.backoff(client._dest)
    assert failures == 6
    assert not_before >= time.time() + 31  # 2 ** 5 s, not 0
    assert retry_delay("retry", 1, 0.0) >= 1.0
    assert retry_delay("retry", 1, 30.0) == 30.0  # a longer Retry-After wins


@pytest.mark.parametrize("status", [400, 413, 422])
@pytest.mark.parametrize("position", [0, 7, 19])
def test_a_rejected_batch_is_split_until_the_bad_message_is_alone(
    producer: Callable[..., Client], collector: Collector, status: int, position: int
) -> None:
    client = producer()
    ids = track_many(client, 20)
    bad = ids[position]
    collector.reject_message_ids(bad, status=status)
    errors = Recorder()
    stats = make_deliverer(client.queue, on_error=errors).deliver_next()

    assert stats is not None
    assert (stats.sent, stats.dead_lettered, stats.kept) == (19, 1, 0)
    assert collector.requests <= 1 + 10  # at most 10 extra requests
    delivered = collector.message_ids()
    assert sorted(delivered) == sorted(set(ids) - {bad})
    assert max(delivered.values()) == 1  # no good message was sent twice after a 2xx
    assert client.queue.pending() == 0
    [dead] = client.queue.dead_letters()
    assert (dead.message_id, dead.status, dead.reason) == (bad, status, f"HTTP {status}")
    assert bad in dead.excerpt  # the collector's error body names the offending id
    assert json.loads(dead.body)["messageId"] == bad
    [(exc, messages)] = errors.calls
    assert isinstance(exc, MessageRejected)
    assert exc.status == status
    assert [m["messageId"] for m in messages] == [bad]
    assert client.queue.backoff(client._dest) == (0.0, 0)  # bad data is no server failure


def test_a_split_that_meets_a_server_failure_keeps_the_rest(
    producer: Callable[..., Client], collector: Collector
) -> None:
    client = producer()
    ids = track_many(client, 8)
    collector.reject_message_ids(ids[7])  # 400 for every part holding it
    collector.script(200, 503)  # the clean half is delivered, the next part meets a 503
    stats = make_deliverer(client.queue, max_retries=0).deliver_next()

    assert stats is not None
    assert stats.sent == 4
    assert stats.kept == 4
    assert client.queue.pending() == 4
    assert client.queue.stats().leased == 0
    assert client.queue.dead_letters() == []


@pytest.mark.parametrize(
    ("status", "hint"),
    [(401, "write_key"), (403, "write_key"), (404, "check host")],
)
def test_a_configuration_error_keeps_the_messages_backs_off_and_warns_once(
    producer: Callable[..., Client],
    collector: Collector,
    caplog: pytest.LogCaptureFixture,
    status: int,
    hint: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="durable_analytics")
    collector.set_default(status)
    client = producer()
    ids = track_many(client, 5)
    queue = client.queue
    errors = Recorder()
    deliverer = make_deliverer(queue, on_error=errors)
    deliverer.deliver_next()

    assert collector.requests == 1  # no quick retries for a configuration error
    assert queue.pending() == 5
    assert queue.dead_letters() == []
    not_before, failures = queue.backoff(client._dest)
    assert failures == 1
    assert time.time() + 29 <= not_before <= time.time() + 34

    # Later tries: backoff doubles up to 10 minutes; the warning is not repeated.
    for _ in range(8):
        not_before, _ = queue.backoff(client._dest)
        lease = queue.lease(20, 500_000, now=not_before + 1)
        assert lease is not None
        make_deliverer(queue, on_error=errors).deliver(lease)
    not_before, failures = queue.backoff(client._dest)
    assert failures == 9
    assert time.time() + 590 <= not_before <= time.time() + MAX_BACKOFF_SECONDS + 1
    assert queue.pending() == 5

    warnings = [r for r in caplog.records if "answered HTTP" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    text = warnings[0].getMessage()
    assert f"HTTP {status}" in text
    assert hint in text
    assert "kept" in text
    assert len(errors.calls) == 9
    for exc, messages in errors.calls:
        assert isinstance(exc, ConfigurationRejected)
        assert exc.status == status
        assert sorted(m["messageId"] for m in messages) == sorted(ids)


def test_retry_delay_schedule() -> None:
    for failures in range(1, 40):
        delay = retry_delay("retry", failures)
        base = min(RETRY_CAP, 2.0 ** (failures - 1))
        assert base <= delay <= base * 1.25
        config = retry_delay("config", failures)
        assert min(30.0 * 2 ** (failures - 1), MAX_BACKOFF_SECONDS) <= config
        assert config <= MAX_BACKOFF_SECONDS
    assert retry_delay("retry", 30) >= 60.0  # a dead server: at most one request a minute
    assert retry_delay("retry", 0) >= 1.0
    assert retry_delay("config", 1, retry_after=300.0) == 300.0


@pytest.mark.parametrize(
    "reply",
    [
        Reply(503),
        Reply(503, headers={"Retry-After": "0"}),
        Reply(429, headers={"Retry-After": "1"}),
    ],
    ids=["503", "503-retry-after-0", "429-retry-after-1"],
)
def test_a_dead_server_gets_at_most_one_request_a_minute(
    producer: Callable[..., Client], collector: Collector, reply: Reply
) -> None:
    collector.set_default(reply)
    client = producer()
    track_many(client, 3)
    sent_at: list[float] = []

    class Counting(HTTPTransport):
        def post(self, *args: Any, **kwargs: Any) -> Outcome:
            sent_at.append(time.time())
            return super().post(*args, **kwargs)

    with freeze_time("2024-05-01 12:00:00") as frozen:
        # A quick retry's sleep moves the frozen clock (a Retry-After is waited out on it).
        deliverer = Deliverer(client.queue, Counting(timeout=5.0), sleep=frozen.tick)
        start = time.time()
        for _ in range(60 * 60 // 2):  # an hour of a flusher looking every 2 s
            deliverer.deliver_next()
            frozen.tick(2)

    assert len(sent_at) == collector.requests
    steady = [t - start for t in sent_at if t - start >= 300]
    gaps = [b - a for a, b in itertools.pairwise(steady)]
    assert gaps
    assert min(gaps) >= 60.0, gaps
    assert len(sent_at) <= 4 + 8 + 60  # the first quick retries, the ramp, then 1 a minute
    assert client.queue.pending() == 3


def test_a_dead_server_and_a_flusher_thread_send_one_request_per_backoff(
    producer: Callable[..., Client], flushers: list[Flusher], refused_url: str
) -> None:
    client = producer(host=refused_url)
    track_many(client, 25)
    attempts: list[float] = []

    class Counting(HTTPTransport):
        def post(self, *args: Any, **kwargs: Any) -> Outcome:
            attempts.append(time.monotonic())
            return super().post(*args, **kwargs)

    deliverer = Deliverer(client.queue, Counting(timeout=1.0), max_retries=0)
    flusher = Flusher(deliverer, poll_interval=0.01)
    flushers.append(flusher)
    flusher.start()
    assert wait_until(lambda: len(attempts) >= 1)
    wait_cycles(flusher, 5)
    for _ in range(20):
        flusher.notify()  # wake-ups must not bypass the backoff either
        time.sleep(0.001)
    wait_cycles(flusher, 3)
    # Every next try waited for the 1-1.25 s backoff stored in the queue.
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(attempts)), attempts
    assert len(attempts) <= 1 + int(attempts[-1] - attempts[0])
    assert client.queue.pending() == 25


# ---------------------------------------------------------------- errors never escape


def test_on_error_is_called_for_a_failing_batch(
    producer: Callable[..., Client], collector: Collector
) -> None:
    collector.set_default(500)
    client = producer()
    ids = track_many(client, 3)
    errors = Recorder()
    make_deliverer(client.queue, on_error=errors, max_retries=0).deliver_next()

    [(exc, messages)] = errors.calls
    assert isinstance(exc, RetryableError)
    assert exc.status == 500
    assert "kept" in str(exc)
    assert [m["messageId"] for m in messages] == ids
    assert messages[0]["event"] == "Event"


def test_an_on_error_that_raises_is_logged_not_raised(
    producer: Callable[..., Client], collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    collector.set_default(500)
    client = producer()
    track_many(client, 2)

    def broken(exc: Exception, messages: list[dict[str, Any]]) -> None:
        raise ValueError("on_error bug")

    stats = make_deliverer(client.queue, on_error=broken, max_retries=0).deliver_next()
    assert stats is not None
    assert stats.kept == 2
    assert any("on_error raised" in r.getMessage() and r.exc_info for r in caplog.records)


def test_the_flusher_thread_logs_an_unexpected_error_and_goes_on(
    producer: Callable[..., Client],
    collector: Collector,
    caplog: pytest.LogCaptureFixture,
    flushers: list[Flusher],
) -> None:
    client = producer()
    ids = track_many(client, 20)
    queue = client.queue
    real = queue.ready_summary
    failures = []

    def flaky(*args: Any, **kwargs: Any) -> tuple[int, float | None]:
        if not failures:
            failures.append(1)
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    queue.ready_summary = flaky  # type: ignore[method-assign]
    flusher = Flusher(make_deliverer(queue), poll_interval=0.01)
    flushers.append(flusher)
    flusher.start()
    assert wait_until(lambda: bool(failures))
    flusher.notify()  # skip the 1 s pause after an error

    assert collector.wait_for_messages(20, timeout=5)
    assert flusher.alive
    [record] = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert "injected failure" in str(record.exc_info[1])
    assert sorted(collector.message_ids()) == sorted(ids)


def test_a_crash_inside_delivery_releases_the_lease_without_a_backoff(
    producer: Callable[..., Client],
) -> None:
    client = producer()
    track_many(client, 4)

    class Broken(HTTPTransport):
        def post(self, *args: Any, **kwargs: Any) -> Outcome:
            raise RuntimeError("transport bug")

    deliverer = Deliverer(client.queue, Broken())
    with pytest.raises(RuntimeError, match="transport bug"):
        deliverer.deliver_next()
    assert client.queue.stats().leased == 0
    assert client.queue.pending() == 4
    assert client.queue.backoff(client._dest) == (0.0, 0)
    lease = client.queue.lease(20, 500_000)
    assert lease is not None
    assert lease.attempts == 0  # a bug of ours is not counted as a delivery attempt


def test_a_passed_deadline_is_not_a_server_failure(
    producer: Callable[..., Client], collector: Collector
) -> None:
    client = producer()
    track_many(client, 3)
    errors = Recorder()
    stats = make_deliverer(client.queue, on_error=errors).deliver_next(
        deadline=time.monotonic() - 1
    )

    assert stats is not None
    assert (stats.sent, stats.kept, stats.requests) == (0, 3, 0)
    assert collector.requests == 0
    assert errors.calls == []
    assert client.queue.backoff(client._dest) == (0.0, 0)
    assert client.queue.lease(20, 500_000) is not None  # ready again at once


def test_quick_retries_stop_at_the_deadline(
    producer: Callable[..., Client], collector: Collector
) -> None:
    collector.set_default(503)
    client = producer()
    track_many(client, 2)
    deliverer = make_deliverer(client.queue, max_retries=50, sleep=time.sleep)
    started = time.monotonic()
    stats = deliverer.deliver_next(deadline=started + 0.5)

    assert stats is not None
    assert stats.kept == 2
    assert time.monotonic() - started < 1.0
    assert "HTTP 503" in stats.errors[-1]  # the server's answer, not "deadline passed"


# ---------------------------------------------------------------- drain


def test_drain_delivers_everything_with_parallel_workers(
    producer: Callable[..., Client], collector: Collector
) -> None:
    client = producer()
    ids = track_many(client, 250)
    sent: list[int] = []
    result = drain(
        client.queue, lambda: make_deliverer(client.queue), concurrency=4, progress=sent.append
    )

    assert (result.sent, result.dead_lettered, result.left) == (250, 0, 0)
    assert sum(sent) == 250
    assert sorted(collector.message_ids()) == sorted(ids)
    assert max(collector.message_ids().values()) == 1


def test_drain_stops_when_only_a_failing_destination_is_left(
    producer: Callable[..., Client], collector: Collector
) -> None:
    collector.set_default(503)
    client = producer()
    track_many(client, 45)
    started = time.monotonic()
    result = drain(client.queue, lambda: make_deliverer(client.queue, max_retries=0))

    assert time.monotonic() - started < 2.0
    assert (result.sent, result.left) == (0, 45)
    assert result.errors
    assert "HTTP 503" in result.errors[0]


def test_drain_honours_its_timeout(producer: Callable[..., Client], collector: Collector) -> None:
    collector.set_default(Reply(hang=True))
    client = producer()
    track_many(client, 5)
    started = time.monotonic()
    result = drain(
        client.queue,
        lambda: make_deliverer(client.queue, timeout=30.0),
        concurrency=1,
        timeout=0.5,
    )
    assert time.monotonic() - started < 1.5
    assert result.left == 5


def test_the_flusher_stops_promptly(
    producer: Callable[..., Client], flushers: list[Flusher]
) -> None:
    client = producer()
    flusher = Flusher(make_deliverer(client.queue), poll_interval=30.0)
    flusher.start()
    assert wait_until(lambda: flusher.cycles >= 1)
    started = time.monotonic()
    flusher.stop(5.0)
    assert not flusher.alive
    assert time.monotonic() - started < 1.0
    flusher.start()  # a stopped flusher is not started again
    assert not flusher.alive
    # A thread that is not ours: stop() from several threads at once is harmless.
    threads = [threading.Thread(target=flusher.stop, args=(1.0,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
