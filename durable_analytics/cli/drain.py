"""``durable-analytics drain``: deliver everything pending now, then exit."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path

import click

from durable_analytics._drain import DrainResult, drain_lock, drain_queue, lock_path
from durable_analytics._store import QueueBackend
from durable_analytics.exceptions import QueueBusy

from ._app import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_QUEUE,
    EXIT_UNDELIVERED,
    CLIError,
    Seconds,
    cli,
    common_options,
    json_option,
    lease_timeout_option,
    log,
    max_in_flight_option,
    open_queue,
    queue_config,
    resolve_queue,
    setup_logging,
    stop_on_signals,
)
from ._output import ProgressLine, count, duration, error_line, one_line, stderr_is_tty


@cli.command("drain", short_help="Deliver everything pending now.")
@common_options
@click.option(
    "--host",
    metavar="URL",
    default=None,
    help="Send every message to this base URL instead of its stored host. Like --write-key, "
    "a new endpoint: stored backoffs do not hold it back, and its failures are not stored "
    "against the stored destination.",
)
@click.option(
    "--write-key",
    metavar="KEY",
    default=None,
    help="Send every message with this write key instead of its stored one (the fix for a "
    "401: tried at once, whatever backoff the old key earned).",
)
@click.option(
    "--timeout",
    type=Seconds(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Give up after this long; what is left stays queued (exit 1). Default: no limit.",
)
@max_in_flight_option
@click.option(
    "--batch-messages",
    type=click.IntRange(1, 100_000),
    default=None,
    metavar="N",
    help="Messages per request (default: 20), still at most 500 KB: for servers that "
    "prefer fewer, larger requests.",
)
@lease_timeout_option(request_timeout="the request timeout (10 s)")
@click.option(
    "--ignore-backoff",
    is_flag=True,
    help="Send now even where a stored backoff says wait (after fixing the server or the "
    "write key).",
)
@click.option(
    "--max-retries",
    type=click.IntRange(0, 20),
    default=3,
    show_default=True,
    metavar="N",
    help="Quick retries of a failing batch before its destination backs off.",
)
@click.option(
    "--once-lock",
    is_flag=True,
    help="Exit 0 at once, quietly, if another `drain --once-lock` is running on this queue "
    "(a flock on <queue>.drain.lock).",
)
@json_option
def drain_command(
    queue_path: Path | None,
    verbose: int,
    host: str | None,
    write_key: str | None,
    timeout: float | None,
    max_in_flight: int,
    batch_messages: int | None,
    lease_timeout: float,
    ignore_backoff: bool,
    max_retries: int,
    once_lock: bool,
    as_json: bool,
) -> int:
    """Deliver everything pending now, each message to its stored destination.

    Shows a progress bar when stderr is a terminal and prints a one-line summary (sent,
    left, dead-lettered, elapsed). Messages another process holds under a live lease are
    waited for; messages waiting out a retry backoff are left for later (unless
    --ignore-backoff, --host or --write-key). Several drains,
    workers and flushers may share one queue without sending a message twice under a lease.

    Exits 0 when nothing deliverable is left (dead letters do not count), 1 when some
    messages could not be sent, 2 on a usage error, 3 when the queue is missing or corrupt.
    """
    setup_logging(verbose)
    # Bad overrides exit 2 here, before the queue is opened.
    config = queue_config(
        resolve_queue(queue_path),
        write_key=write_key,
        host=host,
        max_retries=max_retries,
        max_in_flight=max_in_flight,
        max_batch_messages=batch_messages,
        lease_timeout=lease_timeout,
    )
    queue = open_queue(config)
    with contextlib.ExitStack() as stack:
        stack.callback(queue.close)
        if once_lock:
            try:
                taken = stack.enter_context(drain_lock(lock_path(config)))
            except OSError as exc:
                raise CLIError(
                    f"cannot open the drain lock {lock_path(config)}.drain.lock: {exc.strerror}",
                    EXIT_QUEUE,
                ) from None
            if not taken:
                log.debug("another drain holds the drain lock of %s; leaving it", config.queue_path)
                return EXIT_OK
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # Only for the progress bar: never worth waiting past --timeout for.
            with queue.bounded(timeout):
                stats = queue.stats()
            total = stats.pending - stats.leased
        except QueueBusy:
            total = 0
        progress: ProgressLine | None = None
        if total and stderr_is_tty():
            progress = ProgressLine(total, sys.stderr).start()
        stop = threading.Event()
        try:
            with stop_on_signals(stop) as signals:
                result = drain_queue(
                    queue,
                    config,
                    host=None if host is None else config.host,
                    write_key=write_key,
                    # What the progress bar's count left of --timeout: one deadline in all.
                    timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
                    progress=progress,
                    stop=stop,
                    ignore_backoff=ignore_backoff,
                )
        finally:
            if progress is not None:
                progress.close()
        # By this command's own deadline, set before the drain's: the drain measures its
        # elapsed time from a later start, so a request cut off at its deadline ends the
        # drain a few milliseconds short of ``timeout`` by that count.
        timed_out = deadline is not None and time.monotonic() >= deadline
        _print_summary(result, as_json)
        if result.dead_lettered:
            log.warning(
                "the server rejected %s; see `durable-analytics dead-letters list`",
                count(result.dead_lettered, "message") + " (moved to the dead letters)",
            )
        if signals:
            error_line(f"interrupted; {count(result.left, 'message')} left in the queue")
            return EXIT_INTERRUPTED
        if result.left:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            error_line(_undelivered_message(queue, result, timeout, timed_out, left))
            return EXIT_UNDELIVERED
    return EXIT_OK


def _print_summary(result: DrainResult, as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "sent": result.sent,
                    "left": result.left,
                    "dead_lettered": result.dead_lettered,
                    "elapsed": round(result.elapsed, 3),
                    "errors": list(result.errors),
                }
            )
        )
        return
    rate = result.sent / result.elapsed if result.elapsed > 0 else 0.0
    click.echo(
        f"sent {result.sent:,}, left {result.left:,}, dead-lettered {result.dead_lettered:,} "
        f"in {duration(result.elapsed)} ({rate:,.0f} msg/s)"
    )


def _undelivered_message(
    queue: QueueBackend,
    result: DrainResult,
    timeout: float | None,
    timed_out: bool,
    left: float | None,
) -> str:
    """Why ``result.left`` messages stay queued, from the queue's stats read within what is
    ``left`` of ``--timeout`` (None: no timeout)."""
    try:
        with queue.bounded(left):
            stats = queue.stats()
    except QueueBusy as exc:
        reason = f"the --timeout of {timeout:g}s passed" if timed_out and timeout else str(exc)
        return (
            f"{count(result.left, 'message')} could not be sent ({one_line(reason)[:400]}); "
            "they stay queued"
        )
    waits = [d.backoff_until for d in stats.destinations if d.pending and d.backoff_until]
    # Left untried, not refused: a backoff stored after an earlier failure (another drain,
    # a worker, a flusher) holds them back, and only --ignore-backoff sends them now.
    held_back = bool(waits) and not result.errors and not timed_out
    if timed_out and timeout is not None:
        reason = f"the --timeout of {timeout:g}s passed"
    elif result.errors:
        reason = result.errors[-1]
    elif held_back:
        reason = "not tried: their destination backs off after an earlier failure"
        if stats.last_error:
            reason += f", at {stats.last_error['at']}: {stats.last_error['message']}"
    elif stats.last_error:
        reason = f"last error at {stats.last_error['at']}: {stats.last_error['message']}"
    elif stats.leased:
        reason = "another process holds them under a lease"
    else:
        reason = "the server did not accept them"
    text = f"{count(result.left, 'message')} could not be sent ({one_line(reason)[:400]})"
    if waits:
        text += f"; next retry after {min(waits)}"
    if held_back:
        text += " (--ignore-backoff sends them now, once the cause is fixed)"
    return text + "; they stay queued"
