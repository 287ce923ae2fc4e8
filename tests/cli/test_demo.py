"""`durable-analytics demo` in-process."""

from __future__ import annotations

from click.testing import CliRunner

from .helpers import assert_error, run


def test_demo_in_process(runner: CliRunner) -> None:
    result = run(runner, "demo", "--events", "150")
    assert result.exit_code == 0, result.output
    assert "received 150, lost 0, duplicates 0" in result.stdout
    assert "SIGKILL" in result.stdout


def test_demo_bad_events_exits_2(runner: CliRunner) -> None:
    assert_error(run(runner, "demo", "--events", "0"), 2, "--events")
