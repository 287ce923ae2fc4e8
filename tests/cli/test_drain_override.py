"""`drain --host` / `--write-key`: an override is a new endpoint, and a stored backoff says so.

Counted at a real Collector: sent, left, received, and no message received twice.
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from durable_analytics._store.base import DestinationStats
from durable_analytics._store.sqlite import SqliteQueue
from durable_analytics.testing import Collector

from .helpers import WRITE_KEY, assert_error, fill, pending, run


def destination(queue_path: Path, host: str) -> DestinationStats:
    queue = SqliteQueue(queue_path)
    try:
        (found,) = [d for d in queue.stats().destinations if d.host == host]
        return found
    finally:
        queue.close()


def drain(runner: CliRunner, queue_path: Path, *args: str) -> Result:
    return run(runner, "drain", "--queue", str(queue_path), "--max-retries", "0", *args)


def test_the_right_write_key_is_tried_at_once_after_a_401_backoff(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    """The documented fix for a 401 sent nothing: the old key's stored backoff held it back."""
    ids = fill(queue_path, collector.url, 100, key="wrong-key")
    refused = drain(runner, queue_path)
    assert_error(refused, 1, "HTTP 401", "100 messages could not be sent")
    assert destination(queue_path, collector.url).backoff_until is not None
    assert collector.message_ids() == {}

    fixed = drain(runner, queue_path, "--write-key", WRITE_KEY)

    assert fixed.exit_code == 0, fixed.output
    assert fixed.stdout.startswith("sent 100, left 0,")
    received = collector.message_ids()
    assert set(received) == set(ids)
    assert max(received.values()) == 1  # no duplicates
    assert pending(queue_path) == 0


def test_a_working_host_override_is_not_held_back_by_the_stored_hosts_backoff(
    runner: CliRunner, queue_path: Path, collector: Collector, closed_port: str
) -> None:
    ids = fill(queue_path, closed_port, 30)
    assert_error(drain(runner, queue_path), 1, "30 messages could not be sent")
    assert destination(queue_path, closed_port).backoff_until is not None

    moved = drain(runner, queue_path, "--host", collector.url)

    assert moved.exit_code == 0, moved.output
    assert moved.stdout.startswith("sent 30, left 0,")
    received = collector.message_ids()
    assert set(received) == set(ids)
    assert max(received.values()) == 1
    assert pending(queue_path) == 0


def test_a_failing_override_is_reported_under_its_own_name_and_stores_no_backoff(
    runner: CliRunner, queue_path: Path, collector: Collector, closed_port: str
) -> None:
    """It named the stored host as failing and backed the stored destination off, so a
    plain drain to the (working) stored host then sent nothing."""
    ids = fill(queue_path, collector.url, 20)

    failed = drain(runner, queue_path, "--host", closed_port)

    line = assert_error(failed, 1, "20 messages could not be sent", closed_port)
    assert failed.stdout.startswith("sent 0, left 20,")
    warnings = [w for w in failed.stderr.splitlines() if ": warning: " in w]
    assert warnings, failed.stderr
    assert all(collector.url not in w for w in warnings), warnings
    assert any(f"delivery to {closed_port} is failing" in w for w in warnings), warnings
    assert "--ignore-backoff" not in line  # the override failed: no stored backoff to skip
    stored = destination(queue_path, collector.url)
    assert (stored.backoff_until, stored.failures, stored.last_error) == (None, 0, None)
    assert collector.requests == 0

    plain = drain(runner, queue_path)

    assert plain.exit_code == 0, plain.output
    assert plain.stdout.startswith("sent 20, left 0,")
    received = collector.message_ids()
    assert set(received) == set(ids)
    assert max(received.values()) == 1


def test_messages_left_to_a_stored_backoff_say_so_and_name_ignore_backoff(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    fill(queue_path, collector.url, 10, key="wrong-key")
    first = drain(runner, queue_path)
    first_line = assert_error(first, 1, "HTTP 401", "10 messages could not be sent")
    assert "--ignore-backoff" not in first_line  # this drain met the failure itself
    requests = collector.requests

    again = drain(runner, queue_path)

    assert again.stdout.startswith("sent 0, left 10,")
    assert_error(
        again,
        1,
        "10 messages could not be sent (not tried: their destination backs off after an "
        "earlier failure, at ",
        "HTTP 401",
        "next retry after",
        "--ignore-backoff sends them now",
    )
    assert collector.requests == requests  # not tried
    assert pending(queue_path) == 10
