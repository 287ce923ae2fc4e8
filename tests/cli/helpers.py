"""Helpers for the CLI tests: run a command in-process, fill a queue, check an error line."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from durable_analytics import Client
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics.cli import cli

WRITE_KEY = "test-write-key-0001"
ERROR = "durable-analytics: error: "
ENV_NAMES = ("DURABLE_ANALYTICS_QUEUE", "DURABLE_ANALYTICS_WRITE_KEY", "DURABLE_ANALYTICS_HOST")
#: Every command and subcommand, in the order the group's --help lists them.
COMMANDS = [
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
