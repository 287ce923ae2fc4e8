"""The command group: help, usage errors, exit codes, the entry point."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from durable_analytics.cli import main

from .helpers import ERROR, assert_error, run


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
