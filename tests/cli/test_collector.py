"""`durable-analytics collector` in-process: its errors."""

from __future__ import annotations

from click.testing import CliRunner

from durable_analytics.testing import Collector

from .helpers import assert_error, run


def test_collector_bad_port_exits_2(runner: CliRunner) -> None:
    assert_error(run(runner, "collector", "--port", "70000"), 2, "--port")


def test_collector_port_in_use_exits_1(runner: CliRunner, collector: Collector) -> None:
    result = run(runner, "collector", "--port", str(collector.port))
    assert_error(result, 1, f"cannot listen on 127.0.0.1:{collector.port}")


def test_collector_negative_or_huge_delay_exits_2(runner: CliRunner) -> None:
    assert_error(run(runner, "collector", "--delay", "-1"), 2, "--delay")
    assert_error(run(runner, "collector", "--delay", "inf"), 2, "--delay")
