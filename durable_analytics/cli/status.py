"""``durable-analytics status``: what is queued, by destination."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from durable_analytics._metrics import queue_samples, render_prometheus
from durable_analytics._store import QueueStats

from ._app import (
    EXIT_OK,
    cli,
    common_options,
    json_option,
    open_queue,
    queue_config,
    queue_exists,
    resolve_queue,
    setup_logging,
)
from ._output import count, human_age, human_bytes, one_line


@cli.command("status", short_help="Show what is queued, by destination.")
@common_options
@json_option
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json", "prometheus"]),
    default="text",
    show_default=True,
    help="json: as --json; prometheus: the text format for node-exporter's textfile collector.",
)
@click.option(
    "--missing-ok",
    is_flag=True,
    help="A queue file not created yet (nothing tracked there) shows as empty and exits 0, "
    "and is not created: for a fresh deploy's health check. Without it: exit 3.",
)
def status_command(
    queue_path: Path | None, verbose: int, as_json: bool, output_format: str, missing_ok: bool
) -> int:
    """Show what is queued: pending, leased, dead letters, bytes, oldest age, drops, errors.

    One line per destination, its write key cut to the first 4 characters. The last error
    is shown with its age while its destination still fails, and "none" (null in --json)
    once it delivers again. `--json` prints
    the same names as `Client.stats()`: pending, leased, dead_letters, bytes,
    oldest_age_seconds, dropped, last_error, destinations, wal_bytes (the size of the
    queue's -wal file), spooled (messages in producers' journals and spools not yet moved
    into the file, counted in pending too). `--format prometheus` prints them as
    durable_analytics_* metrics labelled with the queue; write it to a temporary file and
    rename it into the textfile collector's directory.

    A queue file that does not exist yet (a fresh deploy: nothing tracked) is exit 3,
    as a wrong --queue is; with --missing-ok it shows as empty and exits 0.
    """
    setup_logging(verbose)
    config = queue_config(resolve_queue(queue_path))
    missing = missing_ok and not queue_exists(config)
    health: dict[str, Any] | None = None
    if missing:
        # Nothing tracked yet: an empty queue, described without creating the file.
        stats = QueueStats(0, 0, 0, 0, None, 0, None, [])
    else:
        queue = open_queue(config, hint="; `status --missing-ok` shows it as empty (exit 0)")
        try:
            stats = queue.stats()
            # A PostgreSQL queue also reports its table's dead rows (see docs/POSTGRESQL.md).
            health_of = getattr(queue, "table_health", None)
            health = health_of() if health_of is not None else None
        finally:
            queue.close()
    if output_format == "prometheus":
        samples = queue_samples(stats, now=time.time())
        click.echo(render_prometheus(samples, {"queue": config.queue_name}), nl=False)
    elif as_json or output_format == "json":
        out = stats.as_dict()
        if health is not None:
            out["table"] = health
        click.echo(json.dumps(out, indent=2))
    else:
        name = f"{config.queue_name} (not created yet: nothing tracked)" if missing else None
        click.echo(format_status(name or config.queue_name, stats, health))
    return EXIT_OK


def format_status(
    queue_name: str | Path,
    stats: QueueStats,
    health: dict[str, Any] | None = None,
    *,
    now: float | None = None,
) -> str:
    """The text form of ``status``: one labelled row per figure, then one per destination."""
    rows = [
        ("queue", str(queue_name)),
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
        ("-wal file", human_bytes(stats.wal_bytes)),
    ]
    if stats.spooled:
        rows.append(
            (
                "spooled",
                f"{stats.spooled:,} (in producers' journals and spools, moved at the next poll)",
            )
        )
    rows.append(("last error", last_error_text(stats, time.time() if now is None else now)))
    if health is not None:
        oldest = health.get("oldest_transaction_seconds")
        rows.append(
            (
                "table",
                f"{health.get('dead_rows', 0):,} dead rows, {health.get('live_rows', 0):,} live, "
                f"{human_bytes(int(health.get('table_bytes', 0)))}; oldest open transaction: "
                + ("none" if oldest is None else human_age(float(oldest))),
            )
        )
    lines = [f"{name:<13} {one_line(value)}" for name, value in rows]
    if not stats.destinations:
        lines.append(f"{'destinations':<13} none")
    else:
        lines.append("destinations")
        for d in stats.destinations:
            text = f"  {d.host}  key {d.write_key}  {d.pending:,} pending, {d.leased:,} leased"
            if d.window is not None:
                text += f", window {d.window} ({d.live_leases or 0} in flight)"
            if d.backoff_until:
                text += (
                    f", backing off until {d.backoff_until} after {count(d.failures, 'failure')}"
                )
            lines.append(text)
    return "\n".join(lines)


def last_error_text(stats: QueueStats, now: float) -> str:
    """The error of a destination that is still failing, with its age; else ``none``.

    A destination's failure count is cleared by its next successful delivery (in the same
    transaction as the ack), so an error whose destination counts no failure is over. The
    queue records the time of the most recent error only: an older one of another
    destination that still fails is shown without an age.
    """
    failing = [d for d in stats.destinations if d.failures]
    if not failing:
        return "none"
    err = stats.last_error
    if err and any(d.host == err.get("host") for d in failing):
        at = err.get("at", "")
        when = _parse_iso(at)
        age = "" if when is None else f"{human_age(max(0.0, now - when))} ago "
        return f"{age}({at}) {err.get('host', '')}: {err.get('message', '')}"
    d = next((d for d in failing if d.last_error), failing[0])
    return f"{d.host}: {d.last_error or 'failing'} ({count(d.failures, 'failure')} in a row)"


def _parse_iso(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
