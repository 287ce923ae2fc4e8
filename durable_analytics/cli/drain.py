"""``durable-analytics drain``: deliver everything pending now, then exit."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from durable_analytics._config import DEFAULT_HOST, Config
from durable_analytics._flusher import Deliverer, DrainResult, drain
from durable_analytics._queue import Queue
from durable_analytics._transport import Outcome, Transport

from ._app import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_QUEUE,
    EXIT_UNDELIVERED,
    CLIError,
    cli,
    common_options,
    json_option,
    log,
    open_queue,
    resolve_queue,
    setup_logging,
    stop_on_signals,
)
from ._output import ProgressLine, count, duration, error_line, one_line, stderr_is_tty


class _RedirectingTransport(Transport):
    """A Transport that replaces the stored host and/or write key of every batch."""

    def __init__(self, host: str | None, write_key: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._host = host
        self._write_key = write_key

    def post(
        self, host: str, write_key: str, body: bytes, *, timeout: float | None = None
    ) -> Outcome:
        return super().post(self._host or host, self._write_key or write_key, body, timeout=timeout)


def drain_queue(
    queue: Queue,
    *,
    host: str | None = None,
    write_key: str | None = None,
    timeout: float | None = None,
    concurrency: int = 4,
    max_retries: int = 3,
    request_timeout: float = 10.0,
    progress: Callable[[int], object] | None = None,
    stop: threading.Event | None = None,
) -> DrainResult:
    """``_flusher.drain`` until nothing deliverable is left, waiting for other holders' leases.

    ``host`` / ``write_key`` replace every message's stored destination. Messages another
    live process holds under a lease are waited for (up to ``timeout``), then drained again
    in case that holder gave them back; messages in a retry backoff are left as they are.
    """

    def make_deliverer() -> Deliverer:
        if host is not None or write_key is not None:
            transport: Transport = _RedirectingTransport(host, write_key, timeout=request_timeout)
        else:
            transport = Transport(timeout=request_timeout)
        return Deliverer(queue, transport, max_retries=max_retries)

    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    # Only what is queued now: under constant production a drain still ends.
    top = queue.max_id()
    sent = dead = 0
    errors: list[str] = []
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        result = drain(
            queue,
            make_deliverer,
            concurrency=concurrency,
            timeout=remaining,
            progress=progress,
            stop=stop,
            up_to_id=top,
        )
        sent += result.sent
        dead += result.dead_lettered
        errors.extend(result.errors)
        if result.left == 0 or (stop is not None and stop.is_set()):
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        queue.reclaim_expired()
        progressed = bool(result.sent or result.dead_lettered)
        if queue.pending(up_to_id=top) and queue.live_leases():
            # Another drain, worker or flusher holds some: wait for it, then look again.
            if stop is not None:
                stop.wait(0.05)
            else:
                time.sleep(0.05)
            continue
        if not (progressed and queue.ready_summary(1)[0]):
            break  # what is left waits out a retry backoff
    return DrainResult(
        sent=sent,
        dead_lettered=dead,
        left=queue.pending(up_to_id=top),
        elapsed=time.monotonic() - started,
        errors=tuple(dict.fromkeys(errors)),
    )


@cli.command("drain", short_help="Deliver everything pending now.")
@common_options
@click.option(
    "--host",
    metavar="URL",
    default=None,
    help="Send every message to this base URL instead of its stored host.",
)
@click.option(
    "--write-key",
    metavar="KEY",
    default=None,
    help="Send every message with this write key instead of its stored one.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Give up after this long; what is left stays queued (exit 1). Default: no limit.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    metavar="N",
    help="Parallel requests (leases make this safe).",
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
    concurrency: int,
    max_retries: int,
    once_lock: bool,
    as_json: bool,
) -> int:
    """Deliver everything pending now, each message to its stored destination.

    Shows a progress bar when stderr is a terminal and prints a one-line summary (sent,
    left, dead-lettered, elapsed). Messages another process holds under a live lease are
    waited for; messages waiting out a retry backoff are left for later. Several drains,
    workers and flushers may share one queue without sending a message twice under a lease.

    Exits 0 when nothing deliverable is left (dead letters do not count), 1 when some
    messages could not be sent, 2 on a usage error, 3 when the queue is missing or corrupt.
    """
    setup_logging(verbose)
    path = resolve_queue(queue_path)
    override_host = _check_overrides(host, write_key)
    queue = open_queue(path)
    with contextlib.ExitStack() as stack:
        stack.callback(queue.close)
        if once_lock and not stack.enter_context(_drain_lock(path)):
            log.debug("another drain holds %s.drain.lock; leaving the queue to it", path)
            return EXIT_OK
        stats = queue.stats()
        total = stats.pending - stats.leased
        progress: ProgressLine | None = None
        if total and stderr_is_tty():
            progress = ProgressLine(total, sys.stderr).start()
        stop = threading.Event()
        try:
            with stop_on_signals(stop) as signals:
                result = drain_queue(
                    queue,
                    host=override_host,
                    write_key=write_key,
                    timeout=timeout,
                    concurrency=concurrency,
                    max_retries=max_retries,
                    progress=progress,
                    stop=stop,
                )
        finally:
            if progress is not None:
                progress.close()
        timed_out = timeout is not None and result.elapsed >= timeout
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
            error_line(_undelivered_message(queue, result, timeout, timed_out))
            return EXIT_UNDELIVERED
    return EXIT_OK


def _check_overrides(host: str | None, write_key: str | None) -> str | None:
    """Validate --host / --write-key as a Client would; return the normalized host."""
    if host is None and write_key is None:
        return None
    # The placeholders keep Config from reading DURABLE_ANALYTICS_WRITE_KEY / _HOST here.
    config = Config.build(
        "-" if write_key is None else write_key,
        host=DEFAULT_HOST if host is None else host,
    )
    return config.host if host is not None else None


@contextlib.contextmanager
def _drain_lock(path: Path) -> Iterator[bool]:
    """An exclusive, non-blocking flock on ``<queue>.drain.lock``; yields False if taken."""
    import fcntl

    lock_path = path.with_name(path.name + ".drain.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CLIError(
            f"cannot open the drain lock {lock_path}: {exc.strerror}", EXIT_QUEUE
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


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
    queue: Queue, result: DrainResult, timeout: float | None, timed_out: bool
) -> str:
    stats = queue.stats()
    if timed_out and timeout is not None:
        reason = f"the --timeout of {timeout:g}s passed"
    elif result.errors:
        reason = result.errors[-1]
    elif stats.last_error:
        reason = f"last error at {stats.last_error['at']}: {stats.last_error['message']}"
    elif stats.leased:
        reason = "another process holds them under a lease"
    else:
        reason = "the server did not accept them"
    text = f"{count(result.left, 'message')} could not be sent ({one_line(reason)[:400]})"
    waits = [d.backoff_until for d in stats.destinations if d.pending and d.backoff_until]
    if waits:
        text += f"; next retry after {min(waits)}"
    return text + "; they stay queued"
