"""`durable-analytics status`: text and JSON, errors, unsafe queue files."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import ANY

from click.testing import CliRunner

from durable_analytics import Client
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
    }
    assert data["pending"] == 7
    assert "-wal file" in text.stdout
    assert data["destinations"][0]["write_key"] == "test…"
    assert WRITE_KEY not in result.stdout


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
    assert_error(run(runner, "status", "--queue", str(missing)), 3, "no queue at")
    assert not missing.exists()
    before = snapshot(corrupt_queue.parent)
    assert_error(run(runner, "status", "--queue", str(corrupt_queue), "--json"), 3, "not a valid")
    assert snapshot(corrupt_queue.parent) == before


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
