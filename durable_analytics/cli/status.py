"""``durable-analytics status``: what is queued, by destination."""

from __future__ import annotations

import json
from pathlib import Path

import click

from durable_analytics._store import QueueStats

from ._app import (
    EXIT_OK,
    cli,
    common_options,
    json_option,
    open_queue,
    queue_config,
    resolve_queue,
    setup_logging,
)
from ._output import count, human_age, human_bytes, one_line


@cli.command("status", short_help="Show what is queued, by destination.")
@common_options
@json_option
def status_command(queue_path: Path | None, verbose: int, as_json: bool) -> int:
    """Show what is queued: pending, leased, dead letters, bytes, oldest age, drops, errors.

    One line per destination, its write key cut to the first 4 characters. `--json` prints
    the same names as `Client.stats()`: pending, leased, dead_letters, bytes,
    oldest_age_seconds, dropped, last_error, destinations.
    """
    setup_logging(verbose)
    path = resolve_queue(queue_path)
    queue = open_queue(queue_config(path))
    try:
        stats = queue.stats()
    finally:
        queue.close()
    if as_json:
        click.echo(json.dumps(stats.as_dict(), indent=2))
    else:
        click.echo(format_status(path, stats))
    return EXIT_OK


def format_status(path: Path, stats: QueueStats) -> str:
    """The text form of ``status``: one labelled row per figure, then one per destination."""
    rows = [
        ("queue", str(path)),
        (
            "pending",
            f"{count(stats.pending, 'message')} ({stats.leased:,} leased), "
            f"{human_bytes(stats.bytes)}",
        ),
        (
            "oldest",
            "-" if stats.oldest_age_seconds is None else human_age(stats.oldest_age_seconds),
        ),
        ("dead letters", f"{stats.dead_letters:,}"),
        ("dropped", f"{stats.dropped:,} (by the max_queue_bytes cap)"),
    ]
    if stats.last_error:
        err = stats.last_error
        rows.append(
            ("last error", f"{err.get('at', '')} {err.get('host', '')}: {err.get('message', '')}")
        )
    else:
        rows.append(("last error", "none"))
    lines = [f"{name:<13} {one_line(value)}" for name, value in rows]
    if not stats.destinations:
        lines.append(f"{'destinations':<13} none")
    else:
        lines.append("destinations")
        for d in stats.destinations:
            text = f"  {d.host}  key {d.write_key}  {d.pending:,} pending, {d.leased:,} leased"
            if d.backoff_until:
                text += (
                    f", backing off until {d.backoff_until} after {count(d.failures, 'failure')}"
                )
            lines.append(text)
    return "\n".join(lines)
