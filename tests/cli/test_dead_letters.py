"""`durable-analytics dead-letters list|requeue|purge`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics.testing import Collector

from .helpers import WRITE_KEY, assert_error, fill, pending, run, snapshot


@pytest.fixture
def with_dead_letters(queue_path: Path, collector: Collector) -> list[str]:
    ids = fill(queue_path, collector.url, 6)
    collector.reject_message_ids(ids[1], ids[4], status=422)
    queue = Queue(queue_path)
    from durable_analytics._delivery import Deliverer
    from durable_analytics._drain import drain
    from durable_analytics._transport import HTTPTransport

    drain(queue, lambda: Deliverer(queue, HTTPTransport()), concurrency=1)
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


@pytest.mark.parametrize("action", ["list", "requeue", "purge"])
def test_dead_letters_missing_ok_on_a_queue_not_created_yet_has_none_and_creates_nothing(
    runner: CliRunner, tmp_path: Path, corrupt_queue: Path, action: str
) -> None:
    """A fresh deploy's check of its dead letters before the first event: without the flag
    exit 3 (with a hint naming it), with it none (exit 0) and no file created; a damaged
    queue is still exit 3, and an id asked for is still unknown (exit 2)."""
    missing = tmp_path / "not-yet" / "queue.sqlite3"
    assert_error(run(runner, "dead-letters", action, "--queue", str(missing)), 3, "--missing-ok")
    text = run(runner, "dead-letters", action, "--queue", str(missing), "--missing-ok")
    assert text.exit_code == 0, text.output
    expected = {"list": "no dead letters", "requeue": "requeued 0", "purge": "purged 0"}
    assert text.stdout.startswith(expected[action])
    as_json = run(runner, "dead-letters", action, "--queue", str(missing), "--missing-ok", "--json")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == ([] if action == "list" else {f"{action}d": 0})
    unknown = run(
        runner, "dead-letters", action, "--queue", str(missing), "--missing-ok", "--id", "3"
    )
    assert_error(unknown, 2, "no dead letter with id 3")
    assert not missing.parent.exists()
    before = snapshot(corrupt_queue.parent)
    assert_error(
        run(runner, "dead-letters", action, "--queue", str(corrupt_queue), "--missing-ok"), 3
    )
    assert snapshot(corrupt_queue.parent) == before


def test_dead_letters_missing_ok_on_an_existing_queue_acts_as_without_it(
    runner: CliRunner, queue_path: Path, with_dead_letters: list[str]
) -> None:
    listed = run(
        runner, "dead-letters", "list", "--queue", str(queue_path), "--missing-ok", "--json"
    )
    assert [d["message_id"] for d in json.loads(listed.stdout)] == with_dead_letters
    purged = run(runner, "dead-letters", "purge", "--queue", str(queue_path), "--missing-ok")
    assert purged.exit_code == 0, purged.output
    assert purged.stdout.startswith("purged 2")
