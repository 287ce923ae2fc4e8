"""The six enqueue commands (track, identify, page, screen, group, alias)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics.testing import Collector

from .helpers import WRITE_KEY, assert_error, run, snapshot


def stored_messages(queue_path: Path) -> list[dict[str, Any]]:
    queue = Queue(queue_path)
    try:
        return [json.loads(body) for body in queue.bodies()]
    finally:
        queue.close()


def enqueue(runner: CliRunner, queue_path: Path, *args: str, **kwargs: Any) -> Result:
    return run(
        runner,
        *args,
        "--queue",
        str(queue_path),
        "--write-key",
        WRITE_KEY,
        "--host",
        "https://collector.invalid",
        **kwargs,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["track", "--user-id", "u1", "--event", "Signed Up", "--properties", '{"plan": "pro"}'],
            {"type": "track", "userId": "u1", "event": "Signed Up", "properties": {"plan": "pro"}},
        ),
        (
            ["identify", "--anonymous-id", "a1", "--traits", '{"email": "a@example.com"}'],
            {"type": "identify", "anonymousId": "a1", "traits": {"email": "a@example.com"}},
        ),
        (
            ["page", "--user-id", "u1", "--name", "Home", "--category", "Docs"],
            {"type": "page", "name": "Home", "category": "Docs"},
        ),
        (
            ["screen", "--user-id", "u1", "--name", "Settings", "--properties", '{"a": [1, 2]}'],
            {"type": "screen", "name": "Settings", "properties": {"a": [1, 2]}},
        ),
        (
            ["group", "--user-id", "u1", "--group-id", "g1", "--traits", '{"seats": 5}'],
            {"type": "group", "groupId": "g1", "traits": {"seats": 5}},
        ),
        (
            ["alias", "--previous-id", "anon-1", "--user-id", "u1"],
            {"type": "alias", "previousId": "anon-1", "userId": "u1"},
        ),
    ],
)
def test_enqueue_each_type(
    runner: CliRunner, queue_path: Path, args: list[str], expected: dict[str, Any]
) -> None:
    result = enqueue(runner, queue_path, *args)
    assert result.exit_code == 0, result.output
    [message] = stored_messages(queue_path)
    assert result.stdout.strip() == message["messageId"]
    for key, value in expected.items():
        assert message[key] == value
    assert message["context"]["library"]["name"] == "durable-analytics"


def test_enqueue_all_common_fields(runner: CliRunner, queue_path: Path) -> None:
    result = enqueue(
        runner,
        queue_path,
        "track",
        "--user-id",
        "u1",
        "--event",
        "E",
        "--context",
        '{"ip": "10.0.0.1"}',
        "--integrations",
        '{"All": false}',
        "--timestamp",
        "2024-05-01T12:00:00Z",
        "--message-id",
        "my-id-1",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "my-id-1"
    [message] = stored_messages(queue_path)
    assert message["context"]["ip"] == "10.0.0.1"
    assert message["integrations"] == {"All": False}
    assert message["timestamp"] == "2024-05-01T12:00:00.000+00:00"
    assert message["messageId"] == "my-id-1"


def test_enqueue_reads_write_key_and_host_from_the_environment(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    env = {"DURABLE_ANALYTICS_WRITE_KEY": WRITE_KEY, "DURABLE_ANALYTICS_HOST": collector.url}
    result = run(
        runner, "track", "--queue", str(queue_path), "--user-id", "u", "--event", "E", env=env
    )
    assert result.exit_code == 0, result.output
    assert run(runner, "drain", "--queue", str(queue_path)).exit_code == 0
    assert list(collector.message_ids()) == [result.stdout.strip()]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["track", "--user-id", "u1"], "track: event is required"),
        (["track", "--event", "E"], "track: user_id or anonymous_id is required"),
        (["track", "--user-id", "u", "--event", "E", "--properties", "{oops"], "not valid JSON"),
        (["track", "--user-id", "u", "--event", "E", "--properties", "[1]"], "must be a dict"),
        (["track", "--user-id", "u", "--event", "E", "--properties", '{"x": NaN}'], "NaN"),
        (["track", "--user-id", "u", "--event", "E", "--timestamp", "later"], "ISO-8601"),
        (["identify", "--traits", "{}"], "identify: user_id or anonymous_id is required"),
        (["identify", "--user-id", "u", "--context", "nope"], "context is not valid JSON"),
        (["page", "--user-id", "u", "--integrations", "1"], "integrations must be a dict"),
        (["screen", "--name", "S"], "screen: user_id or anonymous_id is required"),
        (["group", "--user-id", "u"], "group: group_id is required"),
        (["alias", "--user-id", "u"], "alias: previous_id is required"),
        (["alias", "--previous-id", "p"], "alias: user_id is required"),
    ],
)
def test_enqueue_bad_input_exits_2_with_the_library_message_and_stores_nothing(
    runner: CliRunner, queue_path: Path, args: list[str], fragment: str
) -> None:
    result = enqueue(runner, queue_path, *args)
    assert_error(result, 2, fragment)
    assert result.stdout == ""
    assert not queue_path.exists()  # not even an empty queue file is created


def test_enqueue_bad_input_leaves_an_existing_queue_untouched(
    runner: CliRunner, queue_path: Path
) -> None:
    assert enqueue(runner, queue_path, "track", "--user-id", "u", "--event", "E").exit_code == 0
    before = stored_messages(queue_path)
    assert_error(enqueue(runner, queue_path, "track", "--user-id", "u", "--event", ""), 2)
    assert stored_messages(queue_path) == before


def test_enqueue_message_too_large_exits_2(runner: CliRunner, queue_path: Path) -> None:
    big = json.dumps({"blob": "x" * 40_000})
    result = enqueue(
        runner, queue_path, "track", "--user-id", "u", "--event", "E", "--properties", big
    )
    assert_error(result, 2, "over the 32768-byte limit")


def test_enqueue_missing_write_key_exits_2(runner: CliRunner, queue_path: Path) -> None:
    result = run(runner, "track", "--queue", str(queue_path), "--user-id", "u", "--event", "E")
    assert_error(result, 2, "a write key is required", "DURABLE_ANALYTICS_WRITE_KEY")
    assert not queue_path.exists()


@pytest.mark.parametrize(
    ("host", "fragment"),
    [
        ("nope", "host must be an http:// or https:// URL"),
        ("http://127.0.0.1:99999", "port 99999, outside 1-65535"),
        ("http://[::1", "is not a valid URL"),
        ("http://[::1]:0", "port 0, outside 1-65535"),
    ],
)
def test_enqueue_malformed_host_exits_2_before_storing_anything(
    runner: CliRunner, queue_path: Path, host: str, fragment: str
) -> None:
    """A host that is not a URL, or whose port or IPv6 literal is bad, is a usage error (2)
    and nothing is stored (once stored, a bad port failed only at delivery; a bad IPv6
    literal was exit 1)."""
    result = run(
        runner,
        "track",
        "--queue",
        str(queue_path),
        "--write-key",
        "k",
        "--host",
        host,
        "--user-id",
        "u",
        "--event",
        "E",
    )
    assert_error(result, 2, fragment)
    assert "unexpected" not in result.output
    assert not queue_path.exists()


def test_enqueue_into_a_corrupt_queue_exits_3_and_leaves_it_untouched(
    runner: CliRunner, corrupt_queue: Path
) -> None:
    before = snapshot(corrupt_queue.parent)
    result = enqueue(runner, corrupt_queue, "track", "--user-id", "u", "--event", "E")
    assert_error(result, 3, "not a valid")
    assert snapshot(corrupt_queue.parent) == before


def test_enqueue_creates_a_private_queue(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "queue.sqlite3"
    assert enqueue(runner, path, "track", "--user-id", "u", "--event", "E").exit_code == 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
