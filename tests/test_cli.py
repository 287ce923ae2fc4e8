"""The `durable-analytics` command, driven in-process with click's CliRunner.

Delivery goes to a real Collector over HTTP; the processes that need signals (worker,
collector, concurrent drains, the demo as a program) are in tests/reliability.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from durable_analytics import Client
from durable_analytics import cli as cli_module
from durable_analytics._queue import Queue
from durable_analytics.cli import cli, main
from durable_analytics.testing import Collector, Reply

WRITE_KEY = "test-write-key-0001"
ERROR = "durable-analytics: error: "
ENV_NAMES = ("DURABLE_ANALYTICS_QUEUE", "DURABLE_ANALYTICS_WRITE_KEY", "DURABLE_ANALYTICS_HOST")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env=dict.fromkeys(ENV_NAMES))


@pytest.fixture
def closed_port() -> str:
    """A URL on 127.0.0.1 where nothing listens (connections are refused at once)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def run(runner: CliRunner, *args: str, **kwargs: Any) -> Result:
    return runner.invoke(cli, list(args), catch_exceptions=False, **kwargs)


def fill(queue_path: Path, host: str, count: int, *, key: str = WRITE_KEY) -> list[str]:
    """Queue ``count`` track messages for ``host`` without delivering any; their ids."""
    client = Client(key, host=host, queue_path=queue_path, flusher="none", on_exit="none")
    ids = []
    for i in range(count):
        stored, message = client.track(user_id=f"user-{i}", event="Ordered", properties={"i": i})
        assert stored
        ids.append(message["messageId"])
    client.queue.close()
    return ids


def pending(queue_path: Path) -> int:
    queue = Queue(queue_path)
    try:
        return queue.pending()
    finally:
        queue.close()


def assert_error(result: Result, code: int, *fragments: str) -> str:
    """One `durable-analytics: error:` line (the last on stderr), no traceback; returns it."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines, result.output
    assert lines[-1].startswith(ERROR), lines
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def snapshot(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.fixture
def corrupt_queue(queue_path: Path) -> Path:
    queue_path.write_bytes(os.urandom(8192))
    queue_path.chmod(0o600)
    return queue_path


# --------------------------------------------------------------------------- the group


def test_help_lists_every_subcommand_and_the_exit_codes(runner: CliRunner) -> None:
    result = run(runner, "--help")
    assert result.exit_code == 0
    for name in (
        "demo",
        "drain",
        "status",
        "worker",
        "dead-letters",
        "track",
        "identify",
        "page",
        "screen",
        "group",
        "alias",
        "collector",
    ):
        assert f"  {name} " in result.stdout
    assert "Exit codes" in result.stdout
    assert result.stdout.index("  demo ") < result.stdout.index("  drain ")


@pytest.mark.parametrize(
    "command",
    [
        ["drain"],
        ["status"],
        ["worker"],
        ["dead-letters"],
        ["dead-letters", "list"],
        ["dead-letters", "requeue"],
        ["dead-letters", "purge"],
        ["track"],
        ["identify"],
        ["page"],
        ["screen"],
        ["group"],
        ["alias"],
        ["collector"],
        ["demo"],
    ],
)
def test_every_subcommand_has_help(runner: CliRunner, command: list[str]) -> None:
    result = run(runner, *command, "--help")
    assert result.exit_code == 0
    assert "Usage: durable-analytics " + " ".join(command) in result.stdout
    assert "--verbose" in result.stdout or command == ["dead-letters"]
    if command not in (["collector"], ["demo"], ["dead-letters"]):
        assert "--queue PATH" in result.stdout


def test_no_arguments_prints_the_help(runner: CliRunner) -> None:
    result = run(runner)
    assert result.exit_code == 0
    assert "Usage: durable-analytics" in result.stdout


def test_unknown_command_and_option_are_one_line_usage_errors(runner: CliRunner) -> None:
    assert_error(run(runner, "drian"), 2, "No such command 'drian'", "--help")
    assert_error(run(runner, "drain", "--frobnicate"), 2, "--frobnicate", "drain --help")
    assert_error(run(runner, "drain", "--concurrency", "0"), 2, "--concurrency")


def test_main_returns_the_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert main(["--version"]) == 0
    assert "durable-analytics " in capsys.readouterr().out
    assert main(["status", "--queue", "/nonexistent/dir/queue.sqlite3"]) == 3
    assert capsys.readouterr().err.startswith(ERROR + "no queue at")


# --------------------------------------------------------------------------- drain


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
    assert_error(result, 1, "--timeout of 0.3s passed")
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
    monkeypatch.setattr(cli_module, "_stderr_is_tty", lambda: True)
    collector.set_default(Reply(delay=0.03))
    fill(queue_path, collector.url, 100)
    result = run(runner, "drain", "--queue", str(queue_path), "--concurrency", "1")
    assert result.exit_code == 0
    assert "msg/s" in result.stderr
    assert "/100" in result.stderr
    assert result.stderr.endswith("\r\x1b[K")  # the bar is cleared before the summary


def test_progress_line_shows_counts_rate_and_eta() -> None:
    import io

    stream = io.StringIO()
    progress = cli_module._ProgressLine(1000, stream)
    progress(250)
    line = progress.line()
    assert "250/1,000" in line
    assert "msg/s" in line
    assert "ETA" in line
    progress.render()
    assert stream.getvalue().startswith("\r")


def test_drain_verbose_logs_the_deliveries(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    fill(queue_path, collector.url, 3)
    result = run(runner, "drain", "--queue", str(queue_path), "-vv")
    assert result.exit_code == 0
    assert "durable-analytics: debug: delivered 3 messages" in result.stderr


# --------------------------------------------------------------------------- status


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
    }
    assert data["pending"] == 7
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


# --------------------------------------------------------------------------- dead letters


@pytest.fixture
def with_dead_letters(queue_path: Path, collector: Collector) -> list[str]:
    ids = fill(queue_path, collector.url, 6)
    collector.reject_message_ids(ids[1], ids[4], status=422)
    queue = Queue(queue_path)
    from durable_analytics._flusher import Deliverer, drain
    from durable_analytics._transport import Transport

    drain(queue, lambda: Deliverer(queue, Transport()), concurrency=1)
    assert len(queue.dead_letters()) == 2
    queue.close()
    collector.reset()
    return [ids[1], ids[4]]


def test_dead_letters_list(
    runner: CliRunner, queue_path: Path, with_dead_letters: list[str]
) -> None:
    result = run(runner, "dead-letters", "list", "--queue", str(queue_path))
    assert result.exit_code == 0
    header, *rows = result.stdout.strip().splitlines()
    assert header.split() == ["ID", "TYPE", "EVENT", "STATUS", "REASON", "AGE"]
    assert len(rows) == 2
    assert rows[0].split()[1:5] == ["track", "Ordered", "422", "HTTP"]

    as_json = run(runner, "dead-letters", "list", "--queue", str(queue_path), "--json")
    letters = json.loads(as_json.stdout)
    assert [d["message_id"] for d in letters] == with_dead_letters
    assert letters[0]["body"]["messageId"] == with_dead_letters[0]
    assert WRITE_KEY not in as_json.stdout


def test_dead_letters_requeue_one_then_purge_the_rest(
    runner: CliRunner, queue_path: Path, with_dead_letters: list[str], collector: Collector
) -> None:
    letters = json.loads(
        run(runner, "dead-letters", "list", "--queue", str(queue_path), "--json").stdout
    )
    first = str(letters[0]["id"])
    result = run(runner, "dead-letters", "requeue", "--queue", str(queue_path), "--id", first)
    assert result.exit_code == 0
    assert result.stdout.strip() == "requeued 1 dead letter"
    assert pending(queue_path) == 1

    purged = run(runner, "dead-letters", "purge", "--queue", str(queue_path), "--json")
    assert json.loads(purged.stdout) == {"purged": 1}
    empty = run(runner, "dead-letters", "list", "--queue", str(queue_path))
    assert empty.stdout.strip() == "no dead letters"

    collector.reset()  # the requeued message is accepted now
    assert run(runner, "drain", "--queue", str(queue_path)).exit_code == 0
    assert list(collector.message_ids()) == [with_dead_letters[0]]


def test_dead_letters_requeue_all(
    runner: CliRunner, queue_path: Path, with_dead_letters: list[str]
) -> None:
    result = run(runner, "dead-letters", "requeue", "--queue", str(queue_path), "--json")
    assert json.loads(result.stdout) == {"requeued": 2}
    assert pending(queue_path) == 2


def test_dead_letters_unknown_id_exits_2_and_changes_nothing(
    runner: CliRunner, queue_path: Path, with_dead_letters: list[str]
) -> None:
    letters = json.loads(
        run(runner, "dead-letters", "list", "--queue", str(queue_path), "--json").stdout
    )
    known = str(letters[0]["id"])
    for action in ("purge", "requeue", "list"):
        result = run(
            runner, "dead-letters", action, "--queue", str(queue_path), "--id", known, "--id", "999"
        )
        assert_error(result, 2, "no dead letter with id 999")
    assert pending(queue_path) == 0
    assert (
        len(
            json.loads(
                run(runner, "dead-letters", "list", "--queue", str(queue_path), "--json").stdout
            )
        )
        == 2
    )
    assert_error(run(runner, "dead-letters", "purge", "--queue", str(queue_path), "--id", "x"), 2)


@pytest.mark.parametrize("action", ["list", "requeue", "purge"])
def test_dead_letters_unknown_and_corrupt_queue_exit_3(
    runner: CliRunner, tmp_path: Path, corrupt_queue: Path, action: str
) -> None:
    missing = tmp_path / "missing.sqlite3"
    assert_error(run(runner, "dead-letters", action, "--queue", str(missing)), 3, "no queue at")
    assert not missing.exists()
    before = snapshot(corrupt_queue.parent)
    assert_error(run(runner, "dead-letters", action, "--queue", str(corrupt_queue)), 3)
    assert snapshot(corrupt_queue.parent) == before


# --------------------------------------------------------------------------- enqueue


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


def test_enqueue_bad_host_exits_2(runner: CliRunner, queue_path: Path) -> None:
    result = run(
        runner,
        "track",
        "--queue",
        str(queue_path),
        "--write-key",
        "k",
        "--host",
        "nope",
        "--user-id",
        "u",
        "--event",
        "E",
    )
    assert_error(result, 2, "host must be an http:// or https:// URL")
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


# --------------------------------------------------------------------------- worker, collector


def test_worker_corrupt_queue_exits_3(runner: CliRunner, corrupt_queue: Path) -> None:
    before = snapshot(corrupt_queue.parent)
    assert_error(run(runner, "worker", "--queue", str(corrupt_queue)), 3, "not a valid")
    assert snapshot(corrupt_queue.parent) == before


@pytest.mark.parametrize(
    "args", [["--poll", "0"], ["--concurrency", "0"], ["--shutdown-timeout", "-1"]]
)
def test_worker_bad_options_exit_2(runner: CliRunner, queue_path: Path, args: list[str]) -> None:
    assert_error(run(runner, "worker", "--queue", str(queue_path), *args), 2)
    assert not queue_path.exists()


def test_collector_bad_port_exits_2(runner: CliRunner) -> None:
    assert_error(run(runner, "collector", "--port", "70000"), 2, "--port")


def test_collector_port_in_use_exits_1(runner: CliRunner, collector: Collector) -> None:
    result = run(runner, "collector", "--port", str(collector.port))
    assert_error(result, 1, f"cannot listen on 127.0.0.1:{collector.port}")


# --------------------------------------------------------------------------- demo


def test_demo_in_process(runner: CliRunner) -> None:
    result = run(runner, "demo", "--events", "150")
    assert result.exit_code == 0, result.output
    assert "received 150, lost 0, duplicates 0" in result.stdout
    assert "SIGKILL" in result.stdout


def test_demo_bad_events_exits_2(runner: CliRunner) -> None:
    assert_error(run(runner, "demo", "--events", "0"), 2, "--events")


# --------------------------------------------------------------------------- docs/CLI.md

CLI_DOC = Path(__file__).resolve().parent.parent / "docs" / "CLI.md"
DOC_COMMANDS = [
    [],
    ["demo"],
    ["drain"],
    ["status"],
    ["worker"],
    ["dead-letters"],
    ["dead-letters", "list"],
    ["dead-letters", "requeue"],
    ["dead-letters", "purge"],
    ["track"],
    ["identify"],
    ["page"],
    ["screen"],
    ["group"],
    ["alias"],
    ["collector"],
]
DOC_HEAD = """\
# The `durable-analytics` command

Every subcommand's `--help`, as printed at 80 columns. Generated by `tests/test_cli.py`
(`UPDATE_CLI_DOCS=1 pytest tests/test_cli.py -k cli_doc` rewrites it; the test fails when
this file and the command disagree).

Start with `durable-analytics demo`: a local collector, a producer killed with SIGKILL
before it sends anything, its events on disk, drained, and every one received.
"""


def render_cli_doc() -> str:
    runner = CliRunner(env=dict.fromkeys(ENV_NAMES))
    parts = [DOC_HEAD]
    for command in DOC_COMMANDS:
        result = runner.invoke(cli, [*command, "--help"], terminal_width=80)
        assert result.exit_code == 0
        title = " ".join(["durable-analytics", *command])
        parts.append(f"\n## `{title}`\n\n```text\n{result.stdout.rstrip()}\n```\n")
    return "".join(parts)


def test_cli_doc_shows_the_help_of_every_subcommand() -> None:
    text = render_cli_doc()
    if os.environ.get("UPDATE_CLI_DOCS"):
        CLI_DOC.write_text(text)
    assert CLI_DOC.read_text() == text, "docs/CLI.md is stale: rerun with UPDATE_CLI_DOCS=1"


README = CLI_DOC.parent.parent / "README.md"
README_START = "<!-- cli-help:start -->\n"
README_END = "<!-- cli-help:end -->"


def render_readme_help() -> str:
    runner = CliRunner(env=dict.fromkeys(ENV_NAMES))
    parts = []
    for command in DOC_COMMANDS:
        result = runner.invoke(cli, [*command, "--help"], terminal_width=80)
        assert result.exit_code == 0
        title = " ".join(["durable-analytics", *command])
        parts.append(
            f"<details><summary><code>{title} --help</code></summary>\n\n"
            f"```text\n{result.stdout.rstrip()}\n```\n\n</details>\n"
        )
    return "".join(parts)


def test_readme_shows_the_help_of_every_subcommand() -> None:
    readme = README.read_text()
    start = readme.index(README_START) + len(README_START)
    end = readme.index(README_END)
    text = render_readme_help()
    if os.environ.get("UPDATE_CLI_DOCS"):
        README.write_text(readme[:start] + text + readme[end:])
        readme = README.read_text()
        end = readme.index(README_END)
    assert readme[start:end] == text, "README's command reference is stale: UPDATE_CLI_DOCS=1"
