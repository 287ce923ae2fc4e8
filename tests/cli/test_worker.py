"""`durable-analytics worker` in-process: its errors (the signal tests run it as a process)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from .helpers import assert_error, run, snapshot


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
