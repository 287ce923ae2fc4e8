"""`durable-analytics drain`, delivering to a real Collector over HTTP."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from durable_analytics.cli import drain as drain_module
from durable_analytics.testing import Collector, Reply

from .helpers import WRITE_KEY, assert_error, fill, pending, run, snapshot


def test_drain_delivers_everything_and_empties_the_queue(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    ids = fill(queue_path, collector.url, 250)
    result = run(runner, "drain", "--queue", str(queue_path))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("sent 250, left 0, dead-lettered 0 in ")
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    assert set(collector.message_ids()) == set(ids)
    assert max(collector.message_ids().values()) == 1
    assert all(len(b.messages) <= 20 for b in collector.batches)
    assert pending(queue_path) == 0


def test_drain_json_summary(runner: CliRunner, queue_path: Path, collector: Collector) -> None:
    fill(queue_path, collector.url, 5)
    result = run(runner, "drain", "--queue", str(queue_path), "--json", "--concurrency", "1")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["sent"] == 5
    assert summary["left"] == 0
    assert summary["dead_lettered"] == 0
    assert summary["errors"] == []


def test_drain_uses_the_queue_from_the_environment(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    fill(queue_path, collector.url, 3)
    result = run(runner, "drain", env={"DURABLE_ANALYTICS_QUEUE": str(queue_path)})
    assert result.exit_code == 0
    assert len(collector.message_ids()) == 3


def test_drain_unknown_queue_path_exits_3_and_creates_nothing(
    runner: CliRunner, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere" / "queue.sqlite3"
    assert_error(run(runner, "drain", "--queue", str(missing)), 3, f"no queue at {missing}")
    assert not missing.parent.exists()


def test_drain_corrupt_queue_exits_3_and_leaves_it_untouched(
    runner: CliRunner, corrupt_queue: Path
) -> None:
    before = snapshot(corrupt_queue.parent)
    assert_error(run(runner, "drain", "--queue", str(corrupt_queue)), 3, "not a valid")
    assert snapshot(corrupt_queue.parent) == before


def test_drain_unreachable_host_exits_1_and_keeps_the_messages(
    runner: CliRunner, queue_path: Path, closed_port: str
) -> None:
    fill(queue_path, closed_port, 30)
    result = run(runner, "drain", "--queue", str(queue_path), "--max-retries", "0")
    line = assert_error(result, 1, "30 messages could not be sent", "stay queued")
    assert closed_port in line
    assert result.stdout.startswith("sent 0, left 30,")
    assert pending(queue_path) == 30
    # Run again: the destination is in backoff now; still exit 1, still nothing lost.
    again = run(runner, "drain", "--queue", str(queue_path), "--max-retries", "0")
    assert_error(again, 1, "next retry after")
    assert pending(queue_path) == 30


def test_drain_host_and_write_key_override_the_stored_destination(
    runner: CliRunner, queue_path: Path, collector: Collector, closed_port: str
) -> None:
    ids = fill(queue_path, closed_port, 40, key="wrong-key")
    result = run(
        runner,
        "drain",
        "--queue",
        str(queue_path),
        "--host",
        collector.url + "/",
        "--write-key",
        WRITE_KEY,
    )
    assert result.exit_code == 0, result.output
    assert set(collector.message_ids()) == set(ids)
    assert all(b.authorized for b in collector.batches)


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--host", "ftp://example.com", "host must be an http:// or https:// URL"),
        ("--host", "http://user:pw@example.com", "credentials"),
        ("--host", "https://api.example.com/v1/batch", "use 'https://api.example.com'"),
        ("--host", "http://127.0.0.1:99999", "port 99999, outside 1-65535"),
        ("--host", "http://[::1", "is not a valid URL"),
        ("--write-key", "", "write_key must be a non-empty string"),
        ("--write-key", "a\nb", "line breaks"),
        ("--timeout", "0", "--timeout"),
        ("--timeout", "soon", "--timeout"),
    ],
)
def test_drain_bad_options_exit_2_and_touch_nothing(
    runner: CliRunner,
    queue_path: Path,
    collector: Collector,
    option: str,
    value: str,
    fragment: str,
) -> None:
    fill(queue_path, collector.url, 3)
    before = snapshot(queue_path.parent)
    result = run(runner, "drain", "--queue", str(queue_path), option, value)
    assert_error(result, 2, fragment)
    assert collector.requests == 0
    assert snapshot(queue_path.parent) == before


def test_drain_wrong_write_key_exits_1_with_a_hint(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    fill(queue_path, collector.url, 4, key="not-the-key")
    result = run(runner, "drain", "--queue", str(queue_path))
    assert_error(result, 1, "HTTP 401", "4 messages could not be sent")
    assert "check write_key" in result.stderr  # the library's warning, as a log line
    assert pending(queue_path) == 4


def test_drain_dead_letters_a_rejected_message_and_exits_0(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    ids = fill(queue_path, collector.url, 10)
    collector.reject_message_ids(ids[3])
    result = run(runner, "drain", "--queue", str(queue_path))
    assert result.exit_code == 0, result.output
    assert "dead-lettered 1" in result.stdout
    assert "dead-letters list" in result.stderr
    assert set(collector.message_ids()) == set(ids) - {ids[3]}


def test_drain_timeout_against_a_hanging_server_exits_1(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    fill(queue_path, collector.url, 5)
    collector.set_default(Reply(hang=True))
    result = run(runner, "drain", "--queue", str(queue_path), "--timeout", "0.3")
    line = assert_error(result, 1, "5 messages could not be sent")
    # The request's own timeout is what is left of --timeout, so the drain ends either on
    # its deadline or, microseconds before it, on that request timing out: both say why.
    assert "--timeout of 0.3s passed" in line or "timed out after 0.2" in line, line
    assert pending(queue_path) == 5


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_drain_refuses_a_timeout_that_is_not_a_finite_number_of_seconds(
    runner: CliRunner, queue_path: Path, collector: Collector, value: str
) -> None:
    """click's float ranges take "nan": ``drain --timeout nan`` against a failing server
    never ended, looping without a pause. Refused as a usage error; nothing is sent."""
    fill(queue_path, collector.url, 5)
    result = run(runner, "drain", "--queue", str(queue_path), "--timeout", value)
    assert result.exit_code == 2
    assert "not a finite number of seconds" in result.output
    assert collector.requests == 0
    assert pending(queue_path) == 5


def test_drain_once_lock_exits_0_quietly_when_another_drain_holds_it(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    fill(queue_path, collector.url, 5)
    lock_path = queue_path.with_name(queue_path.name + ".drain.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = run(runner, "drain", "--queue", str(queue_path), "--once-lock")
        assert held.exit_code == 0
        assert held.output == ""
        assert collector.requests == 0
    finally:
        os.close(fd)
    free = run(runner, "drain", "--queue", str(queue_path), "--once-lock")
    assert free.exit_code == 0
    assert len(collector.message_ids()) == 5
    assert lock_path.stat().st_mode & 0o777 == 0o600


def test_drain_progress_bar_when_stderr_is_a_terminal(
    runner: CliRunner,
    queue_path: Path,
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(drain_module, "stderr_is_tty", lambda: True)
    collector.set_default(Reply(delay=0.03))
    fill(queue_path, collector.url, 100)
    result = run(runner, "drain", "--queue", str(queue_path), "--concurrency", "1")
    assert result.exit_code == 0
    assert "msg/s" in result.stderr
    assert "/100" in result.stderr
    assert result.stderr.endswith("\r\x1b[K")  # the bar is cleared before the summary


def test_drain_verbose_logs_the_deliveries(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    fill(queue_path, collector.url, 3)
    result = run(runner, "drain", "--queue", str(queue_path), "-vv")
    assert result.exit_code == 0
    assert f"durable-analytics: debug: POST {collector.url}/v1/batch: 3 messages" in result.stderr
    assert "-> HTTP 200 in " in result.stderr


def test_drain_once_lock_refuses_a_symlinked_lock_file_with_exit_3(
    runner: CliRunner, queue_path: Path, collector: Collector, tmp_path: Path
) -> None:
    """A link planted at <queue>.drain.lock is not followed: exit 3, nothing sent or written."""
    fill(queue_path, collector.url, 3)
    target = tmp_path / "elsewhere"
    queue_path.with_name(queue_path.name + ".drain.lock").symlink_to(target)
    result = run(runner, "drain", "--queue", str(queue_path), "--once-lock")
    assert_error(result, 3, "cannot open the drain lock")
    assert not target.exists()
    assert collector.requests == 0
    assert pending(queue_path) == 3
