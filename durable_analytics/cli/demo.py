"""``durable-analytics demo``: a producer killed with SIGKILL loses nothing, in one command."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from durable_analytics._drain import drain_queue

from ._app import (
    EXIT_OK,
    EXIT_UNDELIVERED,
    CLIError,
    cli,
    open_queue,
    queue_config,
    setup_logging,
    verbose_option,
)
from ._output import PROG, ProgressLine, count, duration, error_line, human_bytes, stderr_is_tty

if TYPE_CHECKING:
    from durable_analytics.testing import Collector

_DEMO_WRITE_KEY = "demo-write-key"

# The producer: an app that tracks N events with no flusher at all, then would go on working.
_DEMO_PRODUCER = """
import sys
from durable_analytics import Client

path, host, key, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = Client(key, host=host, queue_path=path, flusher="none", on_exit="none")
out = sys.stdout
for i in range(count):
    stored, message = client.track(
        user_id=f"demo-user-{i % 50}", event="Demo Event", properties={"n": i}
    )
    if stored:
        out.write(message["messageId"] + "\\n")
out.write("done\\n")
out.flush()
sys.stdin.read()  # keep running until killed
"""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The directory that holds the durable_analytics package, so the child imports this copy.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for name in ("DEBUG", "DURABLE_ANALYTICS_QUEUE", "DURABLE_ANALYTICS_HOST"):
        env.pop(name, None)
    return env


@cli.command("demo", short_help="The one-command tour: start here.")
@click.option(
    "--events",
    type=click.IntRange(1, 1_000_000),
    default=2000,
    show_default=True,
    metavar="N",
    help="How many events the producer tracks before it is killed.",
)
@verbose_option
def demo_command(events: int, verbose: int) -> int:
    """The one-command tour: no event is lost when the process that tracked it is killed.

    Starts a local collector on 127.0.0.1, runs a producer process that tracks --events
    events into a private temporary queue with no flusher, kills it with SIGKILL before
    anything is sent, shows the events on disk, drains them, and counts what arrived.
    Needs no account and no network; exits 0 only if none was lost.
    """
    from durable_analytics.testing import Collector

    setup_logging(verbose)
    workdir = Path(tempfile.mkdtemp(prefix=f"{PROG}-demo-"))  # 0700
    try:
        with Collector(_DEMO_WRITE_KEY) as collector:
            return _demo(events, collector, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _step(name: str, text: str) -> None:
    click.echo(f"  {name:<10} {text}")


def _demo(events: int, collector: Collector, workdir: Path) -> int:
    path = workdir / "queue.sqlite3"
    click.echo(f"{PROG} demo: a producer is killed before it sends anything. Is anything lost?")
    _step("collector", f"a local Segment-compatible server at {collector.url}")
    stderr_path = workdir / "producer.stderr"
    with open(stderr_path, "wb") as child_stderr:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _DEMO_PRODUCER,
                str(path),
                collector.url,
                _DEMO_WRITE_KEY,
                str(events),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=child_stderr,
            text=True,
            env=_child_env(),
        )
    tracked: list[str] = []
    done = False
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line == "done\n":
                done = True
                break
            tracked.append(line.strip())
    finally:
        child.kill()  # SIGKILL: no exit handler, no flush, nothing but what is on disk
        child.wait()
        if child.stdin is not None:
            with contextlib.suppress(OSError):
                child.stdin.close()
        if child.stdout is not None:
            child.stdout.close()
    if not done:
        detail = stderr_path.read_text(errors="replace").strip().splitlines()
        raise CLIError(
            "the demo producer failed" + (f": {detail[-1]}" if detail else ""), EXIT_UNDELIVERED
        )
    _step("producer", f"pid {child.pid} tracked {len(tracked):,} events (no flusher)")
    _step(
        "SIGKILL",
        f"producer killed before any flush; the collector has {len(collector.message_ids()):,}",
    )
    config = queue_config(path)
    queue = open_queue(config)
    try:
        stats = queue.stats()
        _step(
            "on disk",
            f"{stats.pending:,} pending, {stats.leased:,} leased, "
            f"{human_bytes(stats.bytes)} in a private temporary queue",
        )
        progress: ProgressLine | None = None
        if stats.pending and stderr_is_tty():
            progress = ProgressLine(stats.pending, sys.stderr).start()
        try:
            result = drain_queue(queue, config, progress=progress)
        finally:
            if progress is not None:
                progress.close()
    finally:
        queue.close()
    rate = result.sent / result.elapsed if result.elapsed > 0 else 0.0
    _step(
        "drain",
        f"sent {result.sent:,} in {duration(result.elapsed)} ({rate:,.0f} msg/s), "
        f"left {result.left:,}",
    )
    received = collector.message_ids()
    arrived = sum(1 for mid in tracked if mid in received)
    lost = events - arrived
    duplicates = sum(n - 1 for n in received.values() if n > 1)
    _step(
        "result",
        f"sent {result.sent:,}, received {arrived:,}, lost {lost:,}, duplicates {duplicates:,}",
    )
    if lost:
        error_line(f"{count(lost, 'event')} did not arrive")
        return EXIT_UNDELIVERED
    click.echo("Nothing was lost: every event the killed process tracked was delivered.")
    return EXIT_OK
