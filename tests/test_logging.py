"""Logging by the book: named loggers, a NullHandler, a WARNING for each way delivery suffers.

Every test here also checks that no record carries the write key, in its text or its args.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from durable_analytics import Client, _client_calls, _delivery, _delivery_log
from durable_analytics._store import drops as _drops
from durable_analytics.testing import Collector, Reply
from tests.conftest import WRITE_KEY, run_python


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record at DEBUG; afterwards, none of them may hold the write key."""
    caplog.set_level(logging.DEBUG, logger="durable_analytics")
    yield caplog
    for record in caplog.records:
        assert WRITE_KEY not in record.getMessage()
        assert WRITE_KEY not in repr(record.args)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delivery log's monotonic clock, moved by the test."""
    now = [1000.0]
    monkeypatch.setattr(_delivery_log, "_clock", lambda: now[0])
    return now


@pytest.fixture(autouse=True)
def _long_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each failure backs off 5 minutes (within the cap the queue trusts, unlike an hour), so
    # a flush makes one request; due() ends the backoff. A flush without a timeout returns
    # after its own failure: a short timeout could end before the request on a busy machine.
    monkeypatch.setattr(_delivery, "retry_delay", lambda kind, failures, retry_after=None: 300)


def due(queue_path: Path) -> None:
    """End every backoff now, instead of waiting it out."""
    conn = sqlite3.connect(queue_path, timeout=30)
    try:
        with conn:
            conn.execute("UPDATE destinations SET not_before = 0")
            conn.execute("UPDATE messages SET not_before = NULL")
    finally:
        conn.close()


def _client_for(collector: Collector, queue_path: Path | str, **settings: object) -> Client:
    options: dict[str, object] = {
        "flusher": "none",
        "on_exit": "none",
        "max_retries": 0,
        **settings,
    }
    return Client(WRITE_KEY, host=collector.url, queue_path=queue_path, **options)


def _warnings(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == logger
    ]


def test_the_package_logger_has_a_null_handler_and_modules_log_under_it() -> None:
    """No output unless the application configures logging; every logger is a child."""
    package = logging.getLogger("durable_analytics")
    assert any(isinstance(h, logging.NullHandler) for h in package.handlers)
    for name in ("durable_analytics.client", "durable_analytics.delivery"):
        assert logging.getLogger(name).parent is package


def test_an_unconfigured_application_prints_nothing(collector: Collector, tmp_path: Path) -> None:
    """With no logging set up, a warning does not reach stderr through the last resort."""
    result = run_python(
        """
        import sys
        from durable_analytics import Client
        c = Client("k", host=sys.argv[1], queue_path=sys.argv[2], flusher="none",
                   on_exit="none")  # plain http off this machine: a warning
        """,
        "http://analytics.example.com",
        str(tmp_path / "q.sqlite3"),
    )
    assert result.returncode == 0
    assert result.stderr == ""


def test_a_failing_destination_warns_at_once_then_once_a_minute_then_recovers(
    collector: Collector, queue_path: Path, logs: pytest.LogCaptureFixture, clock: list[float]
) -> None:
    """First failure: WARNING with host, status and what is kept; repeats rate-limited;
    INFO when it delivers again."""
    client = _client_for(collector, queue_path)
    collector.set_default(503)
    for i in range(5):
        client.track(f"u{i}", "E")
    client.flush()
    [first] = _warnings(logs, "durable_analytics.delivery")
    assert collector.url in first
    assert "HTTP 503" in first
    assert "the batch's 5 messages are kept on disk" in first

    for _ in range(3):  # within the minute: no new warning
        clock[0] += 10
        due(queue_path)
        client.flush()
    assert len(_warnings(logs, "durable_analytics.delivery")) == 1
    assert collector.requests == 4

    clock[0] += 31  # 61 s after the first warning
    due(queue_path)
    client.flush()
    second = _warnings(logs, "durable_analytics.delivery")[1]
    assert "still failing after 61s (5 failed requests)" in second
    assert "the batch's 5 messages are kept on disk" in second

    collector.set_default(200)
    clock[0] += 5
    due(queue_path)
    assert client.flush(timeout=5).sent == 5
    [recovered] = [
        r
        for r in logs.records
        if r.levelno == logging.INFO and r.name == "durable_analytics.delivery"
    ]
    assert recovered.getMessage() == (
        f"delivery to {collector.url} recovered after 66s (5 failed requests)"
    )
    # Healthy again: the next failure is a first failure, warned about at once.
    collector.set_default(500)
    client.track("u", "E")
    client.flush()
    assert "is failing: HTTP 500" in _warnings(logs, "durable_analytics.delivery")[-1]
    client.close(timeout=0)


def test_failure_lines_say_message_and_request_in_the_singular_for_one(
    logs: pytest.LogCaptureFixture, clock: list[float]
) -> None:
    """One message, one failed request: no "1 messages" or "1 failed requests"."""
    key = ("/q/singular.sqlite3", 1)
    _delivery_log.failed(key, "h", kind="retry", status=500, error="HTTP 500", delay=5, kept=1)
    clock[0] += 61
    _delivery_log.failed(key, "h", kind="retry", status=500, error="HTTP 500", delay=5, kept=2)
    _delivery_log.succeeded(key, "h")
    _delivery_log.failed(key, "h", kind="retry", status=500, error="HTTP 500", delay=5, kept=3)
    _delivery_log.succeeded(key, "h")
    lines = [r.getMessage() for r in logs.records if r.name == "durable_analytics.delivery"]
    assert lines == [
        "delivery to h is failing: HTTP 500; the batch's message is kept on disk; next try in 5s",
        "delivery to h still failing after 61s (2 failed requests): HTTP 500; the batch's 2 "
        "messages are kept on disk; next try in 5s",
        "delivery to h recovered after 61s (2 failed requests)",
        "delivery to h is failing: HTTP 500; the batch's 3 messages are kept on disk; next try "
        "in 5s",
        "delivery to h recovered after 0s (1 failed request)",
    ]


def test_an_unreachable_host_warns(
    queue_path: Path, logs: pytest.LogCaptureFixture, refused_url: str
) -> None:
    """No server at all (the case that used to be silent): a WARNING naming the host."""
    url = refused_url
    client = Client(
        WRITE_KEY, host=url, queue_path=queue_path, flusher="none", on_exit="none", max_retries=0
    )
    client.track("u", "E")
    client.flush()
    [warning] = _warnings(logs, "durable_analytics.delivery")
    assert f"delivery to {url} is failing" in warning
    assert "the batch's message is kept on disk" in warning
    client.close(timeout=0)


def test_a_configuration_error_warns_with_a_hint_and_the_kept_count(
    collector: Collector, queue_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    """A 401 says what to fix, and how many messages wait for the fix."""
    client = _client_for(collector, queue_path)
    collector.set_default(401)
    client.track("u", "E")
    client.track("u", "E")
    client.flush()
    [warning] = _warnings(logs, "durable_analytics.delivery")
    assert "answered HTTP 401" in warning
    assert "check write_key" in warning
    assert "(2 in this batch)" in warning
    client.close(timeout=0)


def test_a_dead_lettered_message_warns_with_its_message_id(
    collector: Collector, queue_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    """The rejected message is named by its (quoted) messageId, never by its body."""
    client = _client_for(collector, queue_path)
    _, message = client.track("u", "Secret Event Name", {"card": "4111"})
    collector.reject_message_ids(message["messageId"])
    assert client.flush(timeout=5).dead_lettered == 1
    [warning] = _warnings(logs, "durable_analytics.delivery")
    assert f'dead-lettered message "{message["messageId"]}"' in warning
    assert "HTTP 400" in warning
    assert "4111" not in warning
    assert "Secret Event Name" not in warning
    client.close(timeout=0)


def test_the_size_cap_warns_with_counts_once_a_minute(
    collector: Collector, queue_path: Path, logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Drops by max_queue_bytes: one WARNING at the first, then one with the count since."""
    client = _client_for(collector, queue_path, max_queue_bytes=1 << 20)
    pad = "x" * 2000
    results = [client.track("u", "E", {"pad": pad})[0] for _ in range(1000)]
    dropped = results.count(False)
    assert dropped > 2
    warnings = _warnings(logs, "durable_analytics.client")
    drops = [w for w in warnings if "is full" in w]
    assert len(drops) == 1
    assert "dropped 1 new message " in drops[0]
    assert "max_queue_bytes=1048576" in drops[0]
    monkeypatch.setattr(_client_calls, "DROP_WARN_EVERY", 0.0)
    client.track("u", "E", {"pad": pad})
    last = [w for w in _warnings(logs, "durable_analytics.client") if "is full" in w][-1]
    assert f"dropped {dropped} new messages since the last warning" in last
    client.close(timeout=0)


def test_the_count_cap_warns_naming_it(
    collector: Collector, queue_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    """Drops by segment's max_queue_size: the warning names that cap, with the count."""
    client = _client_for(collector, queue_path, max_queue_size=5)
    results = [client.track("u", "E")[0] for _ in range(8)]
    assert results.count(False) == 3
    [drop] = [w for w in _warnings(logs, "durable_analytics.client") if "is full" in w]
    assert "max_queue_size=5" in drop
    assert "dropped 1 new message " in drop
    client.close(timeout=0)


def test_exit_with_messages_left_warns(
    collector: Collector, queue_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    """The exit handler says at WARNING how many messages stay queued, and where."""
    collector.set_default(Reply(503, headers={"Retry-After": "60"}))
    client = _client_for(collector, queue_path, on_exit="flush", shutdown_timeout=0.5)
    client.track("u", "E")
    client._at_exit()
    [warning] = _warnings(logs, "durable_analytics.client")[-1:]
    assert "1 message stays queued in" in warning
    assert str(queue_path) in warning


def test_debug_shows_each_batch_without_key_or_bodies(
    collector: Collector, queue_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    """DEBUG: messages, bytes, status and latency per request; retry and backoff decisions."""
    client = _client_for(collector, queue_path, max_retries=1)
    collector.script(503)
    client.track("u", "Private Event", {"secret": "s3cr3t"})
    client.track("u", "Private Event", {"secret": "s3cr3t"})
    client.flush(timeout=5)
    debug = [r.getMessage() for r in logs.records if r.levelno == logging.DEBUG]
    posts = [m for m in debug if m.startswith("POST ")]
    assert len(posts) == 2
    assert f"POST {collector.url}/v1/batch: 2 messages, " in posts[0]
    assert "-> HTTP 503 in " in posts[0]
    assert " ms" in posts[0]
    assert "-> HTTP 200 in " in posts[1]
    assert any(m.startswith("quick retry of a batch of 2 in ") for m in debug)
    for message in debug:
        assert "s3cr3t" not in message
        assert "Private Event" not in message
    client.close(timeout=0)


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_drop_oldest_warns_with_counts_once_a_minute(
    collector: Collector,
    queue_path: Path,
    logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    """overflow="drop_oldest": the queue says how many old messages made room, rate-limited."""
    path = queue_path if backend == "sqlite" else ":memory:"
    client = _client_for(collector, path, max_queue_bytes=1 << 20, overflow="drop_oldest")  # type: ignore[arg-type]
    pad = "x" * 2000
    for _ in range(1000):
        client.track("u", "E", {"pad": pad})
    dropped = client.stats().dropped
    assert dropped > 2
    drops = _warnings(logs, "durable_analytics.queue")
    assert len(drops) == 1
    found = re.search(r"dropped the (\d+) oldest undelivered messages? to make room", drops[0])
    assert found is not None, drops[0]
    first = int(found.group(1))
    assert 1 <= first < dropped  # the first drop, told at once; the rest waited a minute
    assert "max_queue_bytes=1048576" in drops[0]
    monkeypatch.setattr(_drops, "WARN_EVERY", 0.0)
    client.track("u", "E", {"pad": pad})
    last = _warnings(logs, "durable_analytics.queue")[-1]
    since = client.stats().dropped - first
    assert f"dropped the {since} oldest undelivered messages since the last warning" in last
    client.close(timeout=0)


# Modules that may name the package logger itself: where handlers and levels are set (the
# facade's NullHandler, log_handler/debug on the Client, the CLI's stderr handler) and
# segment's ``client.log`` attribute, which is the package logger.
_PACKAGE_LOGGER_USERS = {
    "__init__.py",
    "_client.py",
    "_client_settings.py",
    "cli/_app.py",
}


def test_modules_log_to_named_children_not_to_the_package_logger() -> None:
    """A record's logger name says which part spoke (client, delivery, queue, contrib)."""
    package = Path(__file__).resolve().parent.parent / "durable_analytics"
    offenders = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if re.search(r"getLogger\(\s*[\"']durable_analytics[\"']\s*\)", path.read_text())
        and str(path.relative_to(package)) not in _PACKAGE_LOGGER_USERS
    ]
    assert offenders == []
