"""`durable-analytics status`: text and JSON, errors, unsafe queue files."""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from unittest.mock import ANY

from click.testing import CliRunner

from durable_analytics import Client
from durable_analytics._store import DestinationStats, QueueStats
from durable_analytics.cli.status import format_status
from durable_analytics.testing import Collector

from .helpers import WRITE_KEY, assert_error, fill, run, snapshot


def test_status_text_and_json(runner: CliRunner, queue_path: Path, collector: Collector) -> None:
    fill(queue_path, collector.url, 7)
    text = run(runner, "status", "--queue", str(queue_path))
    assert text.exit_code == 0
    assert "7 messages (0 leased)" in text.stdout
    assert "test…" in text.stdout
    assert WRITE_KEY not in text.stdout

    result = run(runner, "status", "--queue", str(queue_path), "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    client = Client(WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="none")
    expected = client.stats().as_dict()
    client.queue.close()
    assert set(data) == set(expected)
    assert set(data) == {
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
    }
    assert data["pending"] == 7
    assert "-wal file" in text.stdout
    assert data["destinations"][0]["write_key"] == "test…"
    assert WRITE_KEY not in result.stdout


def test_status_counts_messages_still_in_a_producers_spool(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    """Calls made while another process held the write lock wait in their process's spool:
    `status` counts them in pending and names them, and moves nothing (a read)."""
    client = Client(
        WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="none", on_exit="none"
    )
    client.track("u", "First")  # a process's first append measures the file
    holder = sqlite3.connect(str(queue_path), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for i in range(5):
            assert client.track("u", "Spooled", {"i": i})[0]
    finally:
        holder.execute("COMMIT")
        holder.close()
    text = run(runner, "status", "--queue", str(queue_path))
    assert text.exit_code == 0
    assert "6 messages (0 leased)" in text.stdout
    assert re.search(r"spooled\s+5 ", text.stdout), text.stdout
    data = json.loads(run(runner, "status", "--queue", str(queue_path), "--json").stdout)
    assert (data["pending"], data["spooled"]) == (6, 5)
    again = json.loads(run(runner, "status", "--queue", str(queue_path), "--json").stdout)
    assert again["spooled"] == 5
    client.close(timeout=0)


def test_status_shows_the_last_error_and_backoff(
    runner: CliRunner, queue_path: Path, closed_port: str
) -> None:
    fill(queue_path, closed_port, 2)
    run(runner, "drain", "--queue", str(queue_path), "--max-retries", "0")
    result = run(runner, "status", "--queue", str(queue_path))
    assert result.exit_code == 0
    assert "last error" in result.stdout
    assert closed_port in result.stdout
    assert "backing off until" in result.stdout


def test_status_unknown_and_corrupt_queue_exit_3(
    runner: CliRunner, tmp_path: Path, corrupt_queue: Path
) -> None:
    missing = tmp_path / "missing.sqlite3"
    assert_error(
        run(runner, "status", "--queue", str(missing)),
        3,
        f"no queue at {missing}: nothing has been tracked there yet",
        "`durable-analytics track`",
        "`status --missing-ok` shows it as empty (exit 0)",
    )
    assert not missing.exists()
    before = snapshot(corrupt_queue.parent)
    assert_error(run(runner, "status", "--queue", str(corrupt_queue), "--json"), 3, "not a valid")
    assert_error(run(runner, "status", "--queue", str(corrupt_queue), "--missing-ok"), 3)
    assert snapshot(corrupt_queue.parent) == before


def test_status_missing_ok_shows_a_queue_not_created_yet_as_empty_and_creates_nothing(
    runner: CliRunner, tmp_path: Path
) -> None:
    """A fresh deploy's health check ran `status` before the first event and got exit 3."""
    missing = tmp_path / "not-yet" / "queue.sqlite3"
    text = run(runner, "status", "--queue", str(missing), "--missing-ok")
    assert text.exit_code == 0, text.output
    assert _row(text.stdout, "queue") == f"{missing} (not created yet: nothing tracked)"
    assert _row(text.stdout, "pending").startswith("0 messages (0 leased)")
    as_json = run(runner, "status", "--queue", str(missing), "--missing-ok", "--json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert (data["pending"], data["dead_letters"], data["last_error"]) == (0, 0, None)
    prom = run(runner, "status", "--queue", str(missing), "--missing-ok", "--format", "prometheus")
    assert prom.exit_code == 0, prom.output
    assert f'durable_analytics_pending_messages{{queue="{missing}"}} 0' in prom.stdout
    assert not missing.parent.exists()


def test_status_missing_ok_on_an_existing_queue_shows_what_it_holds(
    runner: CliRunner, queue_path: Path, closed_port: str
) -> None:
    fill(queue_path, closed_port, 7)
    result = run(runner, "status", "--queue", str(queue_path), "--missing-ok", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pending"] == 7


def test_status_refuses_a_queue_in_a_world_writable_directory(
    runner: CliRunner, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "q.sqlite3").touch()
    assert_error(run(runner, "status", "--queue", str(shared / "q.sqlite3")), 3, "other users")


def test_status_format_prometheus_parses_and_matches_json(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    """`--format prometheus` is valid text format with the figures `--json` prints."""
    from prometheus_client.parser import text_string_to_metric_families

    fill(queue_path, collector.url, 7)
    data = json.loads(run(runner, "status", "--queue", str(queue_path), "--json").stdout)
    result = run(runner, "status", "--queue", str(queue_path), "--format", "prometheus")
    assert result.exit_code == 0
    assert result.stdout.endswith("\n")
    samples = {
        s.name: s
        for f in text_string_to_metric_families(result.stdout)
        for s in f.samples
        if not s.labels.get("host")
    }
    assert samples["durable_analytics_pending_messages"].value == data["pending"] == 7
    assert samples["durable_analytics_pending_bytes"].value == data["bytes"]
    assert samples["durable_analytics_dropped_messages_total"].value == data["dropped"]
    assert samples["durable_analytics_pending_messages"].labels == {"queue": str(queue_path)}
    assert WRITE_KEY not in result.stdout
    as_json = run(runner, "status", "--queue", str(queue_path), "--format", "json")
    assert json.loads(as_json.stdout) == {**data, "oldest_age_seconds": ANY}


def _due(queue_path: Path) -> None:
    """End every backoff now instead of waiting it out (a test's shortcut)."""
    conn = sqlite3.connect(queue_path, timeout=30)
    try:
        with conn:
            conn.execute("UPDATE destinations SET not_before = 0")
            conn.execute("UPDATE messages SET not_before = NULL")
    finally:
        conn.close()


def _row(stdout: str, name: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.startswith(name)]
    return line[len(name) :].strip()


def test_status_last_error_has_its_age_and_is_cleared_once_the_destination_delivers(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    fill(queue_path, collector.url, 4)
    collector.set_default(503)
    failed = run(runner, "drain", "--queue", str(queue_path), "--max-retries", "0")
    assert failed.exit_code == 1
    row = _row(run(runner, "status", "--queue", str(queue_path)).stdout, "last error")
    assert re.match(r"(<1s|\d+s) ago \(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00\) ", row), row
    assert collector.url in row
    assert "503" in row

    collector.set_default(200)
    _due(queue_path)
    delivered = run(runner, "drain", "--queue", str(queue_path))
    assert delivered.exit_code == 0, delivered.output
    assert len(collector.message_ids()) == 4
    after = run(runner, "status", "--queue", str(queue_path)).stdout
    assert _row(after, "last error") == "none"
    assert "backing off" not in after
    # The JSON agrees (it said the old error was the last one, as if still failing); the
    # destination keeps its last error as history, beside failures == 0.
    data = json.loads(run(runner, "status", "--queue", str(queue_path), "--json").stdout)
    assert data["last_error"] is None
    assert data["destinations"][0]["failures"] == 0
    assert "503" in data["destinations"][0]["last_error"]
    prometheus = run(runner, "status", "--queue", str(queue_path), "--format", "prometheus")
    assert "durable_analytics_last_error_timestamp_seconds" not in prometheus.stdout


def _stats(destinations: list[DestinationStats], last_error: dict[str, str] | None) -> QueueStats:
    return QueueStats(
        pending=sum(d.pending for d in destinations),
        leased=0,
        dead_letters=0,
        bytes=0,
        oldest_age_seconds=None,
        dropped=0,
        last_error=last_error,
        destinations=destinations,
    )


def _dest(host: str, failures: int, error: str | None) -> DestinationStats:
    return DestinationStats(
        host=host,
        write_key="test…",
        pending=3,
        leased=0,
        backoff_until=None,
        failures=failures,
        last_error=error,
    )


def test_the_last_errors_age_is_counted_from_its_time() -> None:
    at = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    stats = _stats(
        [_dest("https://a.example", 3, "HTTP 503")],
        {"message": "HTTP 503", "at": at.isoformat(), "host": "https://a.example"},
    )
    text = format_status("q", stats, now=at.timestamp() + 125)
    assert _row(text, "last error") == (
        "2m 5s ago (2026-01-01T12:00:00+00:00) https://a.example: HTTP 503"
    )


def test_a_recovered_destination_hides_its_error_but_another_still_failing_shows_its_own() -> None:
    at = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc).isoformat()
    newest_but_over = {"message": "HTTP 500", "at": at, "host": "https://a.example"}
    stats = _stats(
        [_dest("https://a.example", 0, "HTTP 500"), _dest("https://b.example", 2, "timed out")],
        newest_but_over,
    )
    assert _row(format_status("q", stats), "last error") == (
        "https://b.example: timed out (2 failures in a row)"
    )
    healthy = _stats([_dest("https://a.example", 0, "HTTP 500")], newest_but_over)
    assert _row(format_status("q", healthy), "last error") == "none"
