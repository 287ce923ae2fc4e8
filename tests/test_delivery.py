"""Tests of durable_analytics._delivery: how a Deliverer settles a batch in the queue.

The queue is a real SQLite file; a thin wrapper records which queue calls the Deliverer
makes, to prove each outcome is settled in one queue call (one transaction).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from conftest import WRITE_KEY

from durable_analytics._config import Config
from durable_analytics._delivery import make_deliverer
from durable_analytics._store.settle import SETTLE_GRACE, settle_grace
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics.testing import RecordingTransport, Reply


class Calls:
    """The real queue, with a log of the methods called on it."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.log: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.queue, name)
        if callable(attr):

            def call(*args: Any, **kwargs: Any) -> Any:
                self.log.append(name)
                return attr(*args, **kwargs)

            return call
        return attr


def setup(queue_path: Path, status: int) -> tuple[Queue, Calls, RecordingTransport, int]:
    queue = Queue(queue_path)
    dest = queue.destination("https://h.test", WRITE_KEY)
    for i in range(3):
        queue.append(dest, b'{"messageId":"m%d"}' % i)
    return queue, Calls(queue), RecordingTransport(lambda batch: status), dest


def test_a_retryable_failure_is_settled_by_one_retry_later_call(queue_path: Path) -> None:
    queue, calls, transport, dest = setup(queue_path, 503)
    config = Config.for_delivery(max_retries=0)
    deliverer = make_deliverer(config, calls, transport)  # type: ignore[arg-type]
    stats = deliverer.deliver_next()
    assert stats is not None
    assert stats.kept == 3
    assert calls.log == ["lease", "retry_later"]  # no backoff read, set and release apart
    not_before, failures = queue.backoff(dest)
    assert failures == 1
    assert not_before > 0
    assert queue.pending() == 3
    queue.close()


def test_a_success_after_failures_is_one_ack_that_clears_the_backoff(queue_path: Path) -> None:
    queue, calls, transport, dest = setup(queue_path, 200)
    queue.set_backoff(dest, 0.0, "earlier failure")  # one failure on record, not waiting
    assert queue.backoff(dest)[1] == 1
    deliverer = make_deliverer(Config.for_delivery(), calls, transport)  # type: ignore[arg-type]
    stats = deliverer.deliver_next()
    assert stats is not None
    assert stats.sent == 3
    assert calls.log == ["lease", "ack"]
    assert queue.backoff(dest) == (0.0, 0)
    assert queue.pending() == 0
    queue.close()


def test_the_ack_of_a_batch_the_server_took_runs_with_the_settle_grace(queue_path: Path) -> None:
    """An ack given up at a caller's deadline sends the batch again: it runs inside
    ``settling`` (its waits may last the grace past the deadline); a release does not."""
    queue, calls, transport, _dest = setup(queue_path, 200)
    graces: dict[str, float] = {}
    for name in ("ack", "release"):
        method = getattr(queue, name)

        def seen(*args: Any, _name: str = name, _method: Any = method, **kwargs: Any) -> Any:
            graces[_name] = settle_grace()
            return _method(*args, **kwargs)

        setattr(calls, name, seen)
    deliverer = make_deliverer(Config.for_delivery(), calls, transport)  # type: ignore[arg-type]
    assert deliverer.deliver_next() is not None
    assert graces == {"ack": SETTLE_GRACE}
    assert settle_grace() == 0.0  # only inside the ack
    queue.close()


def test_a_retry_after_within_max_rate_limit_duration_is_waited_by_the_quick_retry(
    queue_path: Path,
) -> None:
    """429 with Retry-After: 1, then 200: the quick retry sleeps the full second, then sends."""
    answers = [Reply(429, headers={"Retry-After": "1"}), Reply(200)]
    queue, calls, _, dest = setup(queue_path, 200)
    transport = RecordingTransport(lambda batch: answers.pop(0))
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)  # the window's gate runs on the real clock

    config = Config.for_delivery(max_rate_limit_duration=5)
    deliverer = make_deliverer(config, calls, transport, sleep=sleep)  # type: ignore[arg-type]
    stats = deliverer.deliver_next()
    assert stats is not None
    assert (stats.sent, stats.kept, transport.requests) == (3, 0, 2)
    assert slept
    assert slept[0] >= 1.0
    assert queue.backoff(dest) == (0.0, 0)
    queue.close()


def test_a_retry_after_beyond_max_rate_limit_duration_is_reported_without_a_retry(
    queue_path: Path,
) -> None:
    """Retry-After: 30 with max_rate_limit_duration=1: one request, on_error once, kept."""
    errors: list[Exception] = []
    queue, calls, _, dest = setup(queue_path, 200)
    transport = RecordingTransport(lambda batch: Reply(429, headers={"Retry-After": "30"}))
    config = Config.for_delivery(
        max_rate_limit_duration=1, on_error=lambda exc, batch: errors.append(exc)
    )
    deliverer = make_deliverer(config, calls, transport)  # type: ignore[arg-type]
    stats = deliverer.deliver_next()
    assert stats is not None
    assert (stats.sent, stats.kept, transport.requests) == (0, 3, 1)
    assert len(errors) == 1
    not_before, failures = queue.backoff(dest)
    assert failures == 1
    assert not_before >= time.time() + 25  # the server's 30 s, not our own 1-2 s
    assert queue.pending() == 3
    queue.close()
