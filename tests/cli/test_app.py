"""The command group: help, usage errors, exit codes, the entry point."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

from durable_analytics.cli import main
from durable_analytics.cli._app import setup_logging

from .helpers import COMMANDS, ERROR, assert_error, run


def test_help_lists_every_subcommand_and_the_exit_codes(runner: CliRunner) -> None:
    result = run(runner, "--help")
    assert result.exit_code == 0
    names = [command[0] for command in COMMANDS if len(command) == 1]
    positions = [result.stdout.index(f"  {name} ") for name in names]  # each one is listed
    assert positions == sorted(positions)
    assert "Exit codes" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
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


def test_each_command_logs_through_exactly_one_handler_even_after_a_restore() -> None:
    """A handler list saved and put back (as logging fixtures do) cannot double the lines."""
    logger = logging.getLogger("durable_analytics")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        setup_logging(0, worker=True)
        with_worker_handler = list(logger.handlers)
        setup_logging(0)
        logger.handlers[:] = with_worker_handler  # the worker's handler is back
        setup_logging(2)
        ours = [h for h in logger.handlers if h not in saved[0]]
        assert len(ours) == 1
        assert ours[0].formatter is not None
        assert ours[0].formatter._fmt == "durable-analytics: %(levelname)s: %(message)s"
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
