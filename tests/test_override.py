"""``OverrideQueue``: what a drain to an override meets stays out of the stored destination."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from durable_analytics._override import OverrideQueue
from durable_analytics._store import QueueBackend
from durable_analytics._store.memory import MemoryQueue
from durable_analytics._store.sqlite import SqliteQueue

STORED = "https://stored.example"
OVERRIDE = "https://override.example"


@pytest.fixture(params=["memory", "sqlite"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> QueueBackend:
    if request.param == "memory":
        return MemoryQueue()
    directory = tmp_path / "q"
    directory.mkdir(mode=0o700)
    return SqliteQueue(directory / "queue.sqlite3")


def fill(queue: QueueBackend, n: int) -> int:
    dest = queue.destination(STORED, "old-key")
    for i in range(n):
        queue.append(dest, b'{"type":"track","messageId":"m-%d"}' % i)
    return dest


def test_leases_name_the_override_and_acks_reach_the_stored_destination(
    queue: QueueBackend,
) -> None:
    dest = fill(queue, 3)
    view = OverrideQueue(queue, write_key="new-key")
    lease = view.lease(10, 1 << 20)
    assert lease is not None
    assert (lease.destination.id, lease.destination.host) == (dest, STORED)
    assert lease.destination.write_key == "new-key"
    assert view.ack(lease) == 3
    assert queue.pending() == 0


def test_a_failure_backs_off_the_drain_only_and_leaves_the_messages_ready(
    queue: QueueBackend,
) -> None:
    dest = fill(queue, 4)
    view = OverrideQueue(queue, host=OVERRIDE)
    lease = view.lease(10, 1 << 20)
    assert lease is not None
    assert lease.destination.host == OVERRIDE
    before = time.time()
    until = view.retry_later(lease, lambda failures: 30.0 * failures, "HTTP 503")
    assert until >= before + 30
    assert view.failures == 1
    assert view.lease(10, 1 << 20) is None  # this drain holds back
    assert (view.next_ready_at() or 0) >= until
    # The stored destination: no backoff, no failure, no error; its messages ready now.
    not_before, failures = queue.backoff(dest)
    assert failures == 0
    assert not_before <= time.time()
    assert queue.stats().last_error is None
    again = queue.lease(10, 1 << 20)
    assert again is not None
    assert len(again) == 4
    assert again.attempts == 1  # the request the override made is counted


def test_a_retry_after_of_the_override_holds_the_drain_not_the_messages(
    queue: QueueBackend,
) -> None:
    fill(queue, 2)
    view = OverrideQueue(queue, host=OVERRIDE)
    lease = view.lease(10, 1 << 20)
    assert lease is not None
    view.release(lease, time.time() + 60, count_attempt=False)
    assert view.lease(10, 1 << 20) is None
    ready = queue.lease(10, 1 << 20)
    assert ready is not None
    assert len(ready) == 2
