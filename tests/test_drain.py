"""Tests of durable_analytics._drain: the one deliver-until loop and ``drain_queue``.

A real SQLite queue in tmp_path, delivered through the in-memory RecordingTransport (the
network is the only part replaced). Every test counts messages: sent, received, left.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import WRITE_KEY

from durable_analytics._config import Config
from durable_analytics._delivery import make_deliverer
from durable_analytics._drain import deliver_until, drain_lock, drain_queue
from durable_analytics._store import QueueBackend
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._transport.base import Transport
from durable_analytics.exceptions import QueueDiskFull
from durable_analytics.testing import RecordingTransport, SentBatch

HOST = "https://collector.test"


@pytest.fixture
def queue(queue_path: Path) -> Iterator[Queue]:
    q = Queue(queue_path)
    yield q
    q.close()


def fill(queue: QueueBackend, n: int, start: int = 0) -> list[str]:
    dest = queue.destination(HOST, WRITE_KEY)
    ids = [f"m{i}" for i in range(start, start + n)]
    for mid in ids:
        queue.append(dest, b'{"messageId":"%s"}' % mid.encode())
    return ids


def test_drain_queue_delivers_everything_once_and_reports_progress(queue: Queue) -> None:
    ids = fill(queue, 95)
    transport = RecordingTransport()
    seen: list[int] = []
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            seen.append(n)

    result = drain_queue(
        queue,
        Config.for_delivery(flush_at=10),
        concurrency=3,
        progress=progress,
        transport=lambda: transport,
    )
    assert (result.sent, result.left, result.dead_lettered) == (95, 0, 0)
    assert transport.message_ids() == dict.fromkeys(ids, 1)
    assert sum(seen) == 95
    assert queue.pending() == 0


def test_drain_queue_ends_under_constant_production(queue: Queue) -> None:
    """Each batch sent makes a producer append two more: the drain still ends, having
    delivered exactly what was queued when it started."""
    ids = fill(queue, 40)
    produced: list[str] = []

    def handler(batch: SentBatch) -> int:
        start = 1000 + len(produced)
        produced.extend(fill(queue, 2, start))
        return 200

    transport = RecordingTransport(handler)
    result = drain_queue(
        queue, Config.for_delivery(flush_at=5), concurrency=1, transport=lambda: transport
    )
    assert (result.sent, result.left) == (40, 0)
    assert set(transport.message_ids()) == set(ids)
    assert queue.pending() == len(produced) == 16


def test_drain_queue_can_replace_the_stored_host_and_write_key(queue: Queue) -> None:
    fill(queue, 3)
    transport = RecordingTransport()
    result = drain_queue(
        queue,
        Config.for_delivery(),
        host="https://elsewhere.test",
        write_key="other-key",
        transport=lambda: transport,
    )
    assert result.sent == 3
    assert {(b.host, b.write_key) for b in transport.batches} == {
        ("https://elsewhere.test", "other-key")
    }


def test_drain_queue_leaves_a_failing_destination_in_backoff_and_ends(queue: Queue) -> None:
    fill(queue, 30)
    transport = RecordingTransport(lambda batch: 503)
    result = drain_queue(
        queue,
        Config.for_delivery(max_retries=0, flush_at=10),
        concurrency=1,
        transport=lambda: transport,
    )
    assert (result.sent, result.left) == (0, 30)
    assert transport.requests == 1  # then the destination backs off and the drain ends
    assert result.errors
    assert queue.pending() == 30


def test_the_loop_waits_for_a_live_holder_and_delivers_what_it_gives_back(
    queue: Queue,
) -> None:
    ids = fill(queue, 4)
    held = queue.lease(10, 1_000_000)  # another holder, alive (this process)
    assert held is not None
    assert len(held) == 4
    released = threading.Event()

    def give_back() -> None:
        time.sleep(0.1)  # let the drain find nothing ready and start waiting
        queue.release(held, count_attempt=False)
        released.set()

    helper = threading.Thread(target=give_back)
    helper.start()
    transport = RecordingTransport()
    result = drain_queue(queue, Config.for_delivery(), timeout=30, transport=lambda: transport)
    helper.join()
    assert released.is_set()
    assert (result.sent, result.left) == (4, 0)
    assert transport.message_ids() == dict.fromkeys(ids, 1)


def test_waiting_for_a_backoff_ends_at_the_deadline_with_the_rest_queued(queue: Queue) -> None:
    fill(queue, 5)
    config = Config.for_delivery(max_retries=0)
    transport: Transport = RecordingTransport(lambda batch: 503)
    deliverer = make_deliverer(config, queue, transport)
    result = deliver_until(queue, deliverer, deadline=time.monotonic() + 0.3, wait_for_backoff=True)
    assert (result.sent, result.left) == (0, 5)
    assert queue.pending() == 5


def test_a_stop_event_ends_the_loop(queue: Queue) -> None:
    fill(queue, 50)
    stop = threading.Event()

    def handler(batch: SentBatch) -> int:
        stop.set()  # asked to stop during the first batch: that batch finishes, no more
        return 200

    transport = RecordingTransport(handler)
    result = drain_queue(
        queue,
        Config.for_delivery(flush_at=10),
        concurrency=1,
        stop=stop,
        transport=lambda: transport,
    )
    assert (result.sent, result.left) == (10, 40)
    assert transport.requests == 1
    # The batch its ack leased meanwhile went back untouched: no lease left, no attempt.
    assert queue.live_leases() == 0
    rest = queue.lease(100, 1 << 30)
    assert rest is not None
    assert (len(rest), rest.attempts) == (40, 0)


class Counted:
    """The real queue, counting the calls that lease."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.calls: dict[str, int] = {"lease": 0, "ack": 0, "ack_and_lease": 0}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.queue, name)
        if name in self.calls:

            def call(*args: Any, **kwargs: Any) -> Any:
                self.calls[name] += 1
                return attr(*args, **kwargs)

            return call
        return attr


def test_the_pipeline_leases_each_next_batch_in_the_transaction_of_the_ack(
    queue: Queue,
) -> None:
    """One queue step per batch: after the first lease, each ack also leases the next
    batch; every message is received once and nothing stays leased."""
    ids = fill(queue, 95)
    counted = Counted(queue)
    transport = RecordingTransport()
    deliverer = make_deliverer(Config.for_delivery(flush_at=10), counted, transport)  # type: ignore[arg-type]
    result = deliver_until(counted, deliverer)  # type: ignore[arg-type]
    assert (result.sent, result.left) == (95, 0)
    assert transport.message_ids() == dict.fromkeys(ids, 1)
    assert counted.calls == {"lease": 1, "ack": 0, "ack_and_lease": 10}
    assert queue.live_leases() == 0


def test_a_failed_batch_is_not_followed_and_the_next_pass_delivers_the_rest(
    queue: Queue,
) -> None:
    """A 500 hands the batch back with its backoff (no lease taken with it); once the
    destination is healthy again everything arrives once, no message lost."""
    ids = fill(queue, 30)
    answers = iter([200, 500])
    transport = RecordingTransport(lambda batch: next(answers, 200))
    counted = Counted(queue)
    config = Config.for_delivery(flush_at=10, max_retries=0)
    deliverer = make_deliverer(config, counted, transport)  # type: ignore[arg-type]
    first = deliver_until(counted, deliverer)  # type: ignore[arg-type]
    assert (first.sent, first.left) == (10, 20)
    assert counted.calls["ack_and_lease"] == 1  # the first batch's ack leased the second
    assert queue.live_leases() == 0
    queue.clear_backoff(None, messages=True)
    second = deliver_until(counted, deliverer)  # type: ignore[arg-type]
    assert (second.sent, second.left) == (20, 0)
    assert transport.message_ids() == dict.fromkeys(ids, 1)  # accepted once each
    assert transport.requests == 4  # the 500's batch was sent again, once
    assert queue.pending() == 0


class LeaseHalfFails(Counted):
    """The real queue, whose first combined ack-and-lease step fails and is undone whole,
    as a full disk in its lease half rolls back its ack too."""

    def ack_and_lease(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["ack_and_lease"] += 1
        if self.calls["ack_and_lease"] == 1:
            raise QueueDiskFull("disk full while leasing the next batch (test)")
        return self.queue.ack_and_lease(*args, **kwargs)


def test_a_failed_lease_half_of_the_step_still_acks_the_delivered_batch(
    queue: Queue,
) -> None:
    """The server took the batch: when the step that acks it and leases the next fails,
    the batch is acked alone, so it is never sent twice; everything arrives once."""
    ids = fill(queue, 30)
    failing = LeaseHalfFails(queue)
    transport = RecordingTransport()
    deliverer = make_deliverer(Config.for_delivery(flush_at=10), failing, transport)  # type: ignore[arg-type]
    result = deliver_until(failing, deliverer)  # type: ignore[arg-type]
    assert (result.sent, result.left) == (30, 0)
    assert transport.message_ids() == dict.fromkeys(ids, 1)  # received once each
    assert transport.requests == 3
    assert failing.calls["ack"] == 1  # the first batch, acked on its own
    assert queue.pending() == 0
    assert queue.live_leases() == 0


def test_only_one_holder_gets_the_drain_lock(queue_path: Path) -> None:
    with drain_lock(queue_path) as first:
        assert first
        with drain_lock(queue_path) as second:
            assert not second
    with drain_lock(queue_path) as again:
        assert again


def test_a_delivery_config_has_no_write_key_and_the_given_settings() -> None:
    config = Config.for_delivery(timeout=2.5, max_retries=1)
    assert config.write_key == ""
    assert (config.timeout, config.max_retries) == (2.5, 1)


def test_without_a_deadline_a_short_backoff_met_elsewhere_is_waited_and_delivered(
    queue: Queue,
) -> None:
    """flush()'s loop: a backoff ending within SHORT_BACKOFF_WAIT is waited out, then sent."""
    fill(queue, 5)
    dest = queue.destination(HOST, WRITE_KEY)
    queue.set_backoff(dest, time.time() + 0.3, "a failure another process met")
    transport = RecordingTransport()
    deliverer = make_deliverer(Config.for_delivery(), queue, transport)
    result = deliver_until(queue, deliverer, wait_for_backoff=True)
    assert (result.sent, result.left) == (5, 0)
    assert transport.requests == 1


def test_without_a_deadline_a_long_backoff_is_left_pending_at_once(queue: Queue) -> None:
    """A backoff past SHORT_BACKOFF_WAIT: nothing is sent, everything stays queued."""
    fill(queue, 5)
    dest = queue.destination(HOST, WRITE_KEY)
    queue.set_backoff(dest, time.time() + 600, "a long outage")
    transport = RecordingTransport()
    deliverer = make_deliverer(Config.for_delivery(), queue, transport)
    result = deliver_until(queue, deliverer, wait_for_backoff=True)
    assert (result.sent, result.left) == (0, 5)
    assert transport.requests == 0


def test_without_a_deadline_its_own_failure_ends_the_wait(queue: Queue) -> None:
    """A server failing for good: one round of quick retries, then the loop returns.

    The failure stores a short backoff (about a second); the loop does not wait it out and
    try again, so a 500-forever server cannot keep a flush() without a timeout alive.
    """
    fill(queue, 5)
    transport = RecordingTransport(lambda batch: 500)
    deliverer = make_deliverer(Config.for_delivery(max_retries=1), queue, transport)
    result = deliver_until(queue, deliverer, wait_for_backoff=True)
    assert (result.sent, result.left) == (0, 5)
    assert transport.requests == 2  # the first try and one quick retry
