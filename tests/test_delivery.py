"""Tests of durable_analytics._delivery: how a Deliverer settles a batch in the queue.

The queue is a real SQLite file; a thin wrapper records which queue calls the Deliverer
makes, to prove each outcome is settled in one queue call (one transaction).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import WRITE_KEY

from durable_analytics._config import Config
from durable_analytics._delivery import make_deliverer
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics.testing import RecordingTransport


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
