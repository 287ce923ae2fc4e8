"""``durable-analytics collector``: a local Segment-compatible server that prints what arrives."""

from __future__ import annotations

import threading
from typing import Any

import click

from ._app import (
    EXIT_OK,
    EXIT_UNDELIVERED,
    CLIError,
    Seconds,
    cli,
    setup_logging,
    stop_on_signals,
    verbose_option,
)
from ._output import count, one_line


def describe(message: dict[str, Any]) -> str:
    """One line for a received message: type, event or name, user, messageId."""
    kind = str(message.get("type", "?"))
    label = message.get("event") or message.get("name") or message.get("groupId")
    if kind == "alias":
        label = f"{message.get('previousId')} -> {message.get('userId')}"
    who = message.get("userId") or f"anonymous {message.get('anonymousId')}"
    shown = one_line(str(label)) if label is not None else "-"
    return f"{kind:<8} {shown}  user={one_line(str(who))}  messageId={message.get('messageId')}"


@cli.command("collector", short_help="Run a local test server; print what arrives.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    metavar="N",
    help="TCP port on 127.0.0.1 (0: any free port, printed at start).",
)
@click.option(
    "--write-key",
    metavar="KEY",
    default=None,
    help="Answer 401 to requests with another write key. Default: accept any.",
)
@click.option(
    "--delay",
    type=Seconds(0, 600),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="Hold every answer this long, like a distant server (0.05 is a real ingest API's "
    "round trip): to watch batching, in-flight requests and timeouts.",
)
@verbose_option
def collector_command(port: int, write_key: str | None, delay: float, verbose: int) -> int:
    """Run a local Segment-compatible server and print each message it receives.

    One line per message on stdout (type, event or name, user, messageId); the address on
    stderr. Point a client at it with DURABLE_ANALYTICS_HOST=<address> to see your events
    without a Segment account. Stops on Ctrl-C or SIGTERM.
    """
    from durable_analytics.testing import Collector

    setup_logging(verbose)
    collector = Collector(write_key, port=port, delay=delay)
    try:
        collector.start()
    except OSError as exc:
        raise CLIError(
            f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", EXIT_UNDELIVERED
        ) from None
    held = f"; every answer held {delay:g}s" if delay else ""
    click.echo(f"collector listening on {collector.url} (Ctrl-C to stop{held})", err=True)
    click.echo(f"  export DURABLE_ANALYTICS_HOST={collector.url}", err=True)
    stop = threading.Event()
    seen = received = 0
    try:
        with stop_on_signals(stop):
            while not stop.is_set():
                collector.wait_for_requests(seen + 1, timeout=0.2)
                batches = collector.batches
                for batch in batches[seen:]:
                    if 200 <= batch.status < 300:
                        received += len(batch.messages)
                        for message in batch.messages:
                            click.echo(describe(message))
                    else:
                        click.echo(
                            f"rejected a request with HTTP {batch.status} "
                            f"({count(len(batch.messages), 'message')})"
                        )
                seen = len(batches)
    finally:
        collector.stop()
    click.echo(
        f"collector stopped: received {count(received, 'message')} in {count(seen, 'request')}",
        err=True,
    )
    return EXIT_OK
