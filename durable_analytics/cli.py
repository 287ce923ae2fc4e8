"""The ``durable-analytics`` command: drain, status, worker, dead letters, enqueue, collector, demo.

A thin layer of click over the library: delivery is ``_flusher.drain`` / ``Flusher`` with a
``Deliverer``, inspection is ``Queue.stats()`` and the dead-letter calls, enqueueing is a
``Client(flusher="none")``. Nothing in the package imports this module.

Every error is one line on stderr, ``durable-analytics: error: ...``, and one of the exit
codes below (a traceback only with ``-v``):

    0    done (drain: nothing deliverable is left)
    1    some messages could not be sent (server down, refused, timeout), or another failure
    2    usage or configuration error: a bad option, bad JSON, a missing field or write key
    3    the queue file is missing (drain, status, dead-letters), unreadable or corrupt
    130  interrupted
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import click

from . import _messages
from ._client import Client
from ._config import DEFAULT_HOST, Config, default_queue_path
from ._flusher import Deliverer, DrainResult, Flusher, drain
from ._queue import DeadLetter, Queue, QueueStats
from ._transport import Outcome, Transport
from ._version import __version__
from .exceptions import ConfigError, QueueError, ValidationError

if TYPE_CHECKING:
    from .testing import Collector

__all__ = ["EXIT_INTERRUPTED", "EXIT_OK", "EXIT_QUEUE", "EXIT_UNDELIVERED", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_UNDELIVERED = 1
EXIT_USAGE = 2
EXIT_QUEUE = 3
EXIT_INTERRUPTED = 130

PROG = "durable-analytics"

log = logging.getLogger("durable_analytics")

F = TypeVar("F", bound=Callable[..., Any])

# -v count of the running command: decides the log level and whether errors show a traceback.
_verbosity = 0


class CLIError(Exception):
    """A one-line error with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_UNDELIVERED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error_line(message: str) -> None:
    _clear_progress_line()
    click.echo(f"{PROG}: error: {_one_line(message)}", err=True)


# --------------------------------------------------------------------------- logging


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.replace(record.levelname, record.levelname.lower(), 1)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (click's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            _clear_progress_line()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


_handler: _StderrHandler | None = None


def _setup_logging(verbosity: int, *, worker: bool = False) -> None:
    """Library logs to stderr: warnings by default (info for the worker), -v info, -vv debug."""
    global _handler  # noqa: PLW0603 - one handler per process, replaced per command
    if _handler is not None:
        log.removeHandler(_handler)
    handler = _StderrHandler()
    if worker:
        fmt = f"%(asctime)s {PROG}[%(process)d] %(levelname)s: %(message)s"
    else:
        fmt = f"{PROG}: %(levelname)s: %(message)s"
    handler.setFormatter(_LowerLevelFormatter(fmt))
    log.addHandler(handler)
    log.propagate = False
    if worker:
        level = logging.INFO if verbosity == 0 else logging.DEBUG
    else:
        level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbosity, 2)]
    log.setLevel(level)
    _handler = handler


# --------------------------------------------------------------------------- formatting


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover


def _human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if seconds < 1:
        return "<1s"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _duration(seconds: float) -> str:
    return f"{seconds:.2f}s" if seconds < 10 else _human_age(seconds)


class _ProgressLine:
    """Messages sent / total, rate and ETA on one terminal line, redrawn by its own thread.

    The drain workers only add to a counter (``__call__``), so the cost to delivery does not
    grow with the rate; the line is redrawn ``1 / interval`` times a second.
    """

    def __init__(self, total: int, stream: TextIO, *, interval: float = 0.1) -> None:
        self.total = max(total, 0)
        self.done = 0
        self.updates = 0
        #: CPU seconds the redrawing thread used (known once closed), for the benchmark.
        self.render_cpu = 0.0
        self._stream = stream
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"{PROG}-progress", daemon=True)

    def __call__(self, sent: int) -> None:
        with self._lock:
            self.done += sent
            self.updates += 1

    def start(self) -> _ProgressLine:
        global _active_progress  # noqa: PLW0603
        _active_progress = self
        self._started = time.monotonic()
        self._thread.start()
        return self

    def close(self) -> None:
        global _active_progress  # noqa: PLW0603
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        _active_progress = None
        self.clear()

    def clear(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.write("\r\x1b[K")
            self._stream.flush()

    def line(self) -> str:
        with self._lock:
            done = self.done
        total = max(self.total, done)
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = done / elapsed
        eta = "-" if rate <= 0 else _human_age((total - done) / rate)
        width = 24
        filled = width if total == 0 else int(width * done / total)
        bar = "#" * filled + "-" * (width - filled)
        return f"drain [{bar}] {done:,}/{total:,}  {rate:,.0f} msg/s  ETA {eta}"

    def render(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.write("\r" + self.line() + "\x1b[K")
            self._stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.render()
        self.render_cpu = time.thread_time()


_active_progress: _ProgressLine | None = None


def _clear_progress_line() -> None:
    progress = _active_progress
    if progress is not None:
        progress.clear()


# --------------------------------------------------------------------------- shared pieces


def _remember_verbosity(ctx: click.Context, param: click.Parameter, value: int) -> int:
    global _verbosity  # noqa: PLW0603
    _verbosity = max(_verbosity, value or 0)
    return value


def _verbose_option(f: F) -> F:
    return click.option(
        "-v",
        "--verbose",
        count=True,
        callback=_remember_verbosity,
        help="Log to stderr: -v for info, -vv for debug (and tracebacks on errors).",
    )(f)


def _queue_option(f: F) -> F:
    return click.option(
        "--queue",
        "queue_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        metavar="PATH",
        help="The queue file. Default: $DURABLE_ANALYTICS_QUEUE, else "
        "<user data dir>/durable-analytics/queue.sqlite3.",
    )(f)


def _common(f: F) -> F:
    return _queue_option(_verbose_option(f))


def _json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def _resolve(queue_path: Path | None) -> Path:
    return (queue_path if queue_path is not None else default_queue_path()).expanduser()


def _open_queue(path: Path, *, must_exist: bool = True) -> Queue:
    """Open the queue; without ``must_exist`` it is created (0600 in a 0700 directory)."""
    if must_exist and not os.path.lexists(path):
        # Queue() would create the file: say so instead of making an empty queue.
        raise CLIError(f"no queue at {path}", EXIT_QUEUE)
    return Queue(path)  # a QueueError becomes exit 3 in main


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """SIGINT and SIGTERM set ``stop``; a second one stops at once (KeyboardInterrupt)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- drain


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
    text = f"{_count(result.left, 'message')} could not be sent ({_one_line(reason)[:400]})"
    waits = [d.backoff_until for d in stats.destinations if d.pending and d.backoff_until]
    if waits:
        text += f"; next retry after {min(waits)}"
    return text + "; they stay queued"


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


# --------------------------------------------------------------------------- the group


_ORDER = (
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
)


class _Group(click.Group):
    """Runs a command and turns every failure into one line on stderr and its exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = list(self.commands)
        return sorted(names, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER))

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        global _verbosity  # noqa: PLW0603
        _verbosity = 0
        code = _run_reporting_errors(
            lambda: super(_Group, self).main(
                args, prog_name or PROG, complete_var, standalone_mode=False, **extra
            )
        )
        if standalone_mode:
            sys.exit(code)
        return code


def _run_reporting_errors(run: Callable[[], Any]) -> int:
    try:
        rv = run()
    except click.exceptions.NoArgsIsHelpError as exc:
        if exc.ctx is not None:
            click.echo(exc.ctx.get_help())
        return EXIT_OK
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _error_line(exc.format_message() + hint)
        return EXIT_USAGE
    except click.ClickException as exc:
        _error_line(exc.format_message())
        return exc.exit_code
    except CLIError as exc:
        _error_line(str(exc))
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        _error_line("interrupted")
        return EXIT_INTERRUPTED
    except QueueError as exc:
        _error_line(str(exc))
        return EXIT_QUEUE
    except (ConfigError, ValidationError) as exc:
        _error_line(str(exc))
        return EXIT_USAGE
    except BrokenPipeError:
        # `status | head`: the reader left. Point stdout at /dev/null so the final flush is quiet.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_UNDELIVERED
    except Exception as exc:
        if _verbosity >= 2:
            traceback.print_exc()
        _error_line(
            f"unexpected {type(exc).__name__}: {exc}"
            + ("" if _verbosity >= 2 else " (run with -vv for the traceback)")
        )
        return EXIT_UNDELIVERED
    if isinstance(rv, int) and not isinstance(rv, bool):
        return rv
    return EXIT_OK


_EPILOG = """\b
Exit codes:
  0    done (drain: nothing deliverable is left)
  1    some messages could not be sent (server down, refused, timeout)
  2    usage or configuration error (bad option or JSON, missing field or key)
  3    the queue file is missing, unreadable or corrupt
  130  interrupted

\b
Environment:
  DURABLE_ANALYTICS_QUEUE      the default --queue
  DURABLE_ANALYTICS_WRITE_KEY  --write-key of track, identify, page, screen, group, alias
  DURABLE_ANALYTICS_HOST       --host of the same commands

Start with `durable-analytics demo`."""


@click.group(
    PROG,
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=_EPILOG,
)
@click.version_option(__version__, "--version", prog_name=PROG, message="%(prog)s %(version)s")
def cli() -> None:
    """durable-analytics: a Segment-compatible analytics client whose queue lives on disk.

    Deliver what is queued (drain, worker), look at it (status, dead-letters), queue a
    message from a shell (track, identify, page, screen, group, alias), or watch your events
    arrive on a local test server (collector). `demo` shows it all in one command.
    """


# --------------------------------------------------------------------------- drain command


@cli.command("drain", short_help="Deliver everything pending now.")
@_common
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
@_json_option
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
    _setup_logging(verbose)
    path = _resolve(queue_path)
    override_host = _check_overrides(host, write_key)
    queue = _open_queue(path)
    with contextlib.ExitStack() as stack:
        stack.callback(queue.close)
        if once_lock and not stack.enter_context(_drain_lock(path)):
            log.debug("another drain holds %s.drain.lock; leaving the queue to it", path)
            return EXIT_OK
        stats = queue.stats()
        total = stats.pending - stats.leased
        progress: _ProgressLine | None = None
        if total and _stderr_is_tty():
            progress = _ProgressLine(total, sys.stderr).start()
        stop = threading.Event()
        try:
            with _stop_on_signals(stop) as signals:
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
        _print_drain_summary(result, as_json)
        if result.dead_lettered:
            log.warning(
                "the server rejected %s; see `durable-analytics dead-letters list`",
                _count(result.dead_lettered, "message") + " (moved to the dead letters)",
            )
        if signals:
            _error_line(f"interrupted; {_count(result.left, 'message')} left in the queue")
            return EXIT_INTERRUPTED
        if result.left:
            _error_line(_undelivered_message(queue, result, timeout, timed_out))
            return EXIT_UNDELIVERED
    return EXIT_OK


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _print_drain_summary(result: DrainResult, as_json: bool) -> None:
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
        f"in {_duration(result.elapsed)} ({rate:,.0f} msg/s)"
    )


# --------------------------------------------------------------------------- status


@cli.command("status", short_help="Show what is queued, by destination.")
@_common
@_json_option
def status_command(queue_path: Path | None, verbose: int, as_json: bool) -> int:
    """Show what is queued: pending, leased, dead letters, bytes, oldest age, drops, errors.

    One line per destination, its write key cut to the first 4 characters. `--json` prints
    the same names as `Client.stats()`: pending, leased, dead_letters, bytes,
    oldest_age_seconds, dropped, last_error, destinations.
    """
    _setup_logging(verbose)
    path = _resolve(queue_path)
    queue = _open_queue(path)
    try:
        stats = queue.stats()
    finally:
        queue.close()
    if as_json:
        click.echo(json.dumps(stats.as_dict(), indent=2))
    else:
        click.echo(_format_status(path, stats))
    return EXIT_OK


def _format_status(path: Path, stats: QueueStats) -> str:
    rows = [
        ("queue", str(path)),
        (
            "pending",
            f"{_count(stats.pending, 'message')} ({stats.leased:,} leased), "
            f"{_human_bytes(stats.bytes)}",
        ),
        (
            "oldest",
            "-" if stats.oldest_age_seconds is None else _human_age(stats.oldest_age_seconds),
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
    lines = [f"{name:<13} {_one_line(value)}" for name, value in rows]
    if not stats.destinations:
        lines.append(f"{'destinations':<13} none")
    else:
        lines.append("destinations")
        for d in stats.destinations:
            text = f"  {d.host}  key {d.write_key}  {d.pending:,} pending, {d.leased:,} leased"
            if d.backoff_until:
                text += (
                    f", backing off until {d.backoff_until} after {_count(d.failures, 'failure')}"
                )
            lines.append(text)
    return "\n".join(lines)


# --------------------------------------------------------------------------- worker


@cli.command("worker", short_help="Run the long-running flusher.")
@_common
@click.option(
    "--poll",
    type=click.FloatRange(min=0.01),
    default=0.5,
    show_default=True,
    metavar="SECONDS",
    help="How often to look for messages other processes appended.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    metavar="N",
    help="Flusher threads, each with its own connection.",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="On SIGTERM/SIGINT, how long the batches in flight may take before exiting.",
)
@click.option(
    "--flush-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="Send a batch smaller than 20 messages once its oldest is this old.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Timeout of one HTTP request.",
)
def worker_command(
    queue_path: Path | None,
    verbose: int,
    poll: float,
    concurrency: int,
    shutdown_timeout: float,
    flush_interval: float,
    request_timeout: float,
) -> int:
    """Run the long-running flusher for producers that use flusher="none".

    For cron jobs, serverless functions and servers without threads: they only append, and
    this process delivers, with the same batching, retry and backoff rules as a Client's
    flusher thread. Logs to stderr. SIGTERM or SIGINT finishes the batches in flight and
    exits 0 within --shutdown-timeout (a second signal exits at once); a batch still in
    flight then goes back to the queue as this process ends. Creates the queue if missing.
    """
    _setup_logging(verbose, worker=True)
    path = _resolve(queue_path)
    queue = _open_queue(path, must_exist=False)

    def make_deliverer() -> Deliverer:
        return Deliverer(queue, Transport(timeout=request_timeout))

    flushers = [
        Flusher(
            make_deliverer(),
            flush_interval=flush_interval,
            poll_interval=poll,
            name=f"{PROG}-worker-{i}",
        )
        for i in range(concurrency)
    ]
    stop = threading.Event()
    with _stop_on_signals(stop):
        for flusher in flushers:
            flusher.start()
        log.info(
            "worker started on %s (%s pending, concurrency %d)",
            path,
            f"{queue.pending():,}",
            concurrency,
        )
        reported = 0
        last_report = time.monotonic()
        while not stop.wait(1.0):
            if time.monotonic() - last_report >= 60:
                sent = sum(f.delivered.sent for f in flushers)
                if sent != reported:
                    log.info("sent %s in the last minute", f"{sent - reported:,}")
                reported, last_report = sent, time.monotonic()
        log.info("stopping: finishing the batches in flight (up to %gs)", shutdown_timeout)
        deadline = time.monotonic() + shutdown_timeout
        for flusher in flushers:
            flusher.stop(max(0.0, deadline - time.monotonic()))
    in_flight = [f for f in flushers if f.alive]
    for flusher in flushers:
        if not flusher.alive:
            flusher.deliverer.transport.close()
    if in_flight:
        log.warning(
            "%d batch(es) still in flight after %gs; they go back to the queue as this "
            "process exits",
            len(in_flight),
            shutdown_timeout,
        )
    sent = sum(f.delivered.sent for f in flushers)
    dead = sum(f.delivered.dead_lettered for f in flushers)
    log.info(
        "stopped: sent %s, dead-lettered %s, %s pending",
        f"{sent:,}",
        f"{dead:,}",
        f"{queue.pending():,}",
    )
    return EXIT_OK


# --------------------------------------------------------------------------- dead letters


@cli.group("dead-letters", short_help="List, requeue or purge rejected messages.")
def dead_letters_group() -> None:
    """List, requeue or purge the messages the server rejected (400, 413, 422).

    A rejected message is moved out of the queue with the status and an excerpt of the
    response. Fix the cause, then `requeue` it (a drain or flusher sends it again), or
    `purge` it. Each subcommand acts on all dead letters, or on those given with --id.
    """


_ID_OPTION = click.option(
    "--id",
    "ids",
    type=click.IntRange(min=1),
    multiple=True,
    metavar="N",
    help="Only this dead letter (repeatable). Default: all of them.",
)


def _selected(queue: Queue, ids: tuple[int, ...]) -> list[DeadLetter]:
    """The dead letters named by ``ids`` (all without ids); an unknown id is a usage error."""
    if not ids:
        return queue.dead_letters()
    wanted = sorted(set(ids))
    found = queue.dead_letters(wanted)
    missing = sorted(set(wanted) - {d.id for d in found})
    if missing:
        raise CLIError(
            f"no dead letter with id {', '.join(map(str, missing))}; nothing was changed",
            EXIT_USAGE,
        )
    return found


@dead_letters_group.command("list", short_help="Show id, type, event, status, reason, age.")
@_common
@_ID_OPTION
@_json_option
def dead_letters_list(
    queue_path: Path | None, verbose: int, ids: tuple[int, ...], as_json: bool
) -> int:
    """Show the dead letters: id, type, event, status, reason, age (--json: everything)."""
    _setup_logging(verbose)
    queue = _open_queue(_resolve(queue_path))
    letters = _selected(queue, ids)
    if as_json:
        click.echo(json.dumps([d.as_dict() for d in letters], indent=2))
        return EXIT_OK
    if not letters:
        click.echo("no dead letters")
        return EXIT_OK
    now = time.time()
    header = ("ID", "TYPE", "EVENT", "STATUS", "REASON", "AGE")
    rows = [
        (
            str(d.id),
            d.type or "?",
            _one_line(d.event or "-")[:40],
            "-" if d.status is None else str(d.status),
            _one_line(d.reason)[:60],
            _human_age(max(0.0, now - d.dead_at)),
        )
        for d in letters
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


@dead_letters_group.command("requeue", short_help="Put dead letters back in the queue.")
@_common
@_ID_OPTION
@_json_option
def dead_letters_requeue(
    queue_path: Path | None, verbose: int, ids: tuple[int, ...], as_json: bool
) -> int:
    """Put dead letters back in the queue, to be sent again by the next drain or flusher."""
    return _act_on_dead_letters(queue_path, verbose, ids, as_json, "requeued")


@dead_letters_group.command("purge", short_help="Delete dead letters for good.")
@_common
@_ID_OPTION
@_json_option
def dead_letters_purge(
    queue_path: Path | None, verbose: int, ids: tuple[int, ...], as_json: bool
) -> int:
    """Delete dead letters for good."""
    return _act_on_dead_letters(queue_path, verbose, ids, as_json, "purged")


def _act_on_dead_letters(
    queue_path: Path | None, verbose: int, ids: tuple[int, ...], as_json: bool, done: str
) -> int:
    """Requeue or purge the selected dead letters and report how many, as ``done``."""
    _setup_logging(verbose)
    queue = _open_queue(_resolve(queue_path))
    chosen = _selected(queue, ids)
    act = queue.requeue_dead_letters if done == "requeued" else queue.purge_dead_letters
    count = act([d.id for d in chosen]) if chosen else 0
    if as_json:
        click.echo(json.dumps({done: count}))
    else:
        click.echo(f"{done} {_count(count, 'dead letter')}")
    return EXIT_OK


# --------------------------------------------------------------------------- enqueue


def _parse_json(call: str, field: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValidationError(f"{call}: {field} is not valid JSON ({exc})") from None
    except RecursionError:
        # json.loads gives up around 1,000 levels; the library allows 64 anyway.
        raise ValidationError(
            f"{call}: {field}: nested deeper than {_messages.MAX_DEPTH} levels"
        ) from None


def _parse_timestamp(call: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(
            f"{call}: timestamp must be ISO-8601 like 2024-05-01T12:00:00Z, got {text!r:.60}"
        ) from None


def _enqueue(
    call: str,
    args: dict[str, Any],
    json_fields: dict[str, str | None],
    *,
    queue_path: Path | None,
    verbose: int,
    write_key: str | None,
    host: str | None,
    timestamp: str | None,
) -> int:
    _setup_logging(verbose)
    if not write_key:
        raise CLIError(
            "a write key is required: pass --write-key or set DURABLE_ANALYTICS_WRITE_KEY",
            EXIT_USAGE,
        )
    for field, text in json_fields.items():
        args[field] = _parse_json(call, field, text)
    args["timestamp"] = _parse_timestamp(call, timestamp)
    # Validate the message with the library before the queue file is even opened, so bad
    # input leaves no trace; the Client then builds it again (same checks) and stores it.
    getattr(_messages, call)(**args)
    client = Client(
        write_key,
        host=host,
        queue_path=_resolve(queue_path),
        flusher="none",
        on_exit="none",
        _recover=False,  # report a damaged queue (exit 3), never repair it from a shell
    )
    try:
        stored, message = getattr(client, call)(**args)
    finally:
        client.queue.close()
    if not stored:
        raise CLIError(
            "the queue is full (max_queue_bytes): the message was dropped", EXIT_UNDELIVERED
        )
    click.echo(message["messageId"])
    return EXIT_OK


def _enqueue_options(f: F) -> F:
    options = [
        click.option(
            "--context", metavar="JSON", default=None, help="The context object, as JSON."
        ),
        click.option(
            "--integrations",
            metavar="JSON",
            default=None,
            help="Integrations to enable or disable, as JSON: '{\"All\": false}'.",
        ),
        click.option(
            "--timestamp",
            metavar="ISO-8601",
            default=None,
            help="When it happened, e.g. 2024-05-01T12:00:00Z. Default: now.",
        ),
        click.option(
            "--message-id",
            metavar="ID",
            default=None,
            help="The messageId (for deduplication). Default: a new UUID.",
        ),
        click.option(
            "--write-key",
            metavar="KEY",
            envvar="DURABLE_ANALYTICS_WRITE_KEY",
            show_envvar=True,
            default=None,
            help="The source's write key (required).",
        ),
        click.option(
            "--host",
            metavar="URL",
            envvar="DURABLE_ANALYTICS_HOST",
            show_envvar=True,
            default=None,
            help="Base URL of the API. Default: https://api.segment.io.",
        ),
    ]
    f = _common(f)
    for option in reversed(options):
        f = option(f)
    return f


def _user_options(f: F) -> F:
    f = click.option(
        "--anonymous-id",
        metavar="ID",
        default=None,
        help="An anonymous id (one of --user-id or --anonymous-id is required).",
    )(f)
    return click.option("--user-id", metavar="ID", default=None, help="The user's id.")(f)


def _properties_option(f: F) -> F:
    return click.option(
        "--properties", metavar="JSON", default=None, help="Properties, as a JSON object."
    )(f)


def _traits_option(f: F) -> F:
    return click.option("--traits", metavar="JSON", default=None, help="Traits, as a JSON object.")(
        f
    )


_ENQUEUE_EPILOG = (
    "Prints the messageId once the message is on disk. Invalid JSON or a missing field "
    "exits 2 and stores nothing. A worker, a drain or any flusher on the queue delivers it."
)


@cli.command("track", epilog=_ENQUEUE_EPILOG, short_help="Queue a track: the user did --event.")
@_user_options
@click.option("--event", metavar="NAME", default=None, help="What the user did (required).")
@_properties_option
@_enqueue_options
def track_command(
    user_id: str | None,
    anonymous_id: str | None,
    event: str | None,
    properties: str | None,
    context: str | None,
    integrations: str | None,
    timestamp: str | None,
    message_id: str | None,
    write_key: str | None,
    host: str | None,
    queue_path: Path | None,
    verbose: int,
) -> int:
    """Queue a track message: the user did --event, with --properties."""
    return _enqueue(
        "track",
        {
            "user_id": user_id,
            "anonymous_id": anonymous_id,
            "event": event,
            "message_id": message_id,
        },
        {"properties": properties, "context": context, "integrations": integrations},
        queue_path=queue_path,
        verbose=verbose,
        write_key=write_key,
        host=host,
        timestamp=timestamp,
    )


@cli.command("identify", epilog=_ENQUEUE_EPILOG, short_help="Queue an identify: who the user is.")
@_user_options
@_traits_option
@_enqueue_options
def identify_command(
    user_id: str | None,
    anonymous_id: str | None,
    traits: str | None,
    context: str | None,
    integrations: str | None,
    timestamp: str | None,
    message_id: str | None,
    write_key: str | None,
    host: str | None,
    queue_path: Path | None,
    verbose: int,
) -> int:
    """Queue an identify message: who the user is, with --traits."""
    return _enqueue(
        "identify",
        {"user_id": user_id, "anonymous_id": anonymous_id, "message_id": message_id},
        {"traits": traits, "context": context, "integrations": integrations},
        queue_path=queue_path,
        verbose=verbose,
        write_key=write_key,
        host=host,
        timestamp=timestamp,
    )


def _page_like(call: str, short: str, doc: str) -> None:
    @cli.command(call, epilog=_ENQUEUE_EPILOG, help=doc, short_help=short)
    @_user_options
    @click.option("--name", metavar="NAME", default=None, help=f"The {call}'s name.")
    @click.option("--category", metavar="NAME", default=None, help=f"The {call}'s category.")
    @_properties_option
    @_enqueue_options
    def command(
        user_id: str | None,
        anonymous_id: str | None,
        name: str | None,
        category: str | None,
        properties: str | None,
        context: str | None,
        integrations: str | None,
        timestamp: str | None,
        message_id: str | None,
        write_key: str | None,
        host: str | None,
        queue_path: Path | None,
        verbose: int,
    ) -> int:
        return _enqueue(
            call,
            {
                "user_id": user_id,
                "anonymous_id": anonymous_id,
                "name": name,
                "category": category,
                "message_id": message_id,
            },
            {"properties": properties, "context": context, "integrations": integrations},
            queue_path=queue_path,
            verbose=verbose,
            write_key=write_key,
            host=host,
            timestamp=timestamp,
        )


_page_like(
    "page",
    "Queue a page: the user saw a web page.",
    "Queue a page message: the user saw the web page --name.",
)
_page_like(
    "screen",
    "Queue a screen: the user saw an app screen.",
    "Queue a screen message: the user saw the app screen --name.",
)


@cli.command(
    "group", epilog=_ENQUEUE_EPILOG, short_help="Queue a group: the user is in --group-id."
)
@_user_options
@click.option("--group-id", metavar="ID", default=None, help="The group's id (required).")
@_traits_option
@_enqueue_options
def group_command(
    user_id: str | None,
    anonymous_id: str | None,
    group_id: str | None,
    traits: str | None,
    context: str | None,
    integrations: str | None,
    timestamp: str | None,
    message_id: str | None,
    write_key: str | None,
    host: str | None,
    queue_path: Path | None,
    verbose: int,
) -> int:
    """Queue a group message: the user belongs to --group-id, with the group's --traits."""
    return _enqueue(
        "group",
        {
            "user_id": user_id,
            "anonymous_id": anonymous_id,
            "group_id": group_id,
            "message_id": message_id,
        },
        {"traits": traits, "context": context, "integrations": integrations},
        queue_path=queue_path,
        verbose=verbose,
        write_key=write_key,
        host=host,
        timestamp=timestamp,
    )


@cli.command("alias", epilog=_ENQUEUE_EPILOG, short_help="Queue an alias: two ids of one user.")
@click.option(
    "--previous-id", metavar="ID", default=None, help="The user's previous id (required)."
)
@click.option("--user-id", metavar="ID", default=None, help="The user's new id (required).")
@_enqueue_options
def alias_command(
    previous_id: str | None,
    user_id: str | None,
    context: str | None,
    integrations: str | None,
    timestamp: str | None,
    message_id: str | None,
    write_key: str | None,
    host: str | None,
    queue_path: Path | None,
    verbose: int,
) -> int:
    """Queue an alias message: --previous-id and --user-id are the same user."""
    return _enqueue(
        "alias",
        {"previous_id": previous_id, "user_id": user_id, "message_id": message_id},
        {"context": context, "integrations": integrations},
        queue_path=queue_path,
        verbose=verbose,
        write_key=write_key,
        host=host,
        timestamp=timestamp,
    )


# --------------------------------------------------------------------------- collector


def _describe(message: dict[str, Any]) -> str:
    kind = str(message.get("type", "?"))
    label = message.get("event") or message.get("name") or message.get("groupId")
    if kind == "alias":
        label = f"{message.get('previousId')} -> {message.get('userId')}"
    who = message.get("userId") or f"anonymous {message.get('anonymousId')}"
    shown = _one_line(str(label)) if label is not None else "-"
    return f"{kind:<8} {shown}  user={_one_line(str(who))}  messageId={message.get('messageId')}"


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
@_verbose_option
def collector_command(port: int, write_key: str | None, verbose: int) -> int:
    """Run a local Segment-compatible server and print each message it receives.

    One line per message on stdout (type, event or name, user, messageId); the address on
    stderr. Point a client at it with DURABLE_ANALYTICS_HOST=<address> to see your events
    without a Segment account. Stops on Ctrl-C or SIGTERM.
    """
    from .testing import Collector

    _setup_logging(verbose)
    collector = Collector(write_key, port=port)
    try:
        collector.start()
    except OSError as exc:
        raise CLIError(
            f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", EXIT_UNDELIVERED
        ) from None
    click.echo(f"collector listening on {collector.url} (Ctrl-C to stop)", err=True)
    click.echo(f"  export DURABLE_ANALYTICS_HOST={collector.url}", err=True)
    stop = threading.Event()
    seen = received = 0
    try:
        with _stop_on_signals(stop):
            while not stop.is_set():
                collector.wait_for_requests(seen + 1, timeout=0.2)
                batches = collector.batches
                for batch in batches[seen:]:
                    if 200 <= batch.status < 300:
                        received += len(batch.messages)
                        for message in batch.messages:
                            click.echo(_describe(message))
                    else:
                        click.echo(
                            f"rejected a request with HTTP {batch.status} "
                            f"({_count(len(batch.messages), 'message')})"
                        )
                seen = len(batches)
    finally:
        collector.stop()
    click.echo(
        f"collector stopped: received {_count(received, 'message')} in {_count(seen, 'request')}",
        err=True,
    )
    return EXIT_OK


# --------------------------------------------------------------------------- demo

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
    root = str(Path(__file__).resolve().parent.parent)
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
@_verbose_option
def demo_command(events: int, verbose: int) -> int:
    """The one-command tour: no event is lost when the process that tracked it is killed.

    Starts a local collector on 127.0.0.1, runs a producer process that tracks --events
    events into a private temporary queue with no flusher, kills it with SIGKILL before
    anything is sent, shows the events on disk, drains them, and counts what arrived.
    Needs no account and no network; exits 0 only if none was lost.
    """
    from .testing import Collector

    _setup_logging(verbose)
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
    queue = Queue(path)
    try:
        stats = queue.stats()
        _step(
            "on disk",
            f"{stats.pending:,} pending, {stats.leased:,} leased, "
            f"{_human_bytes(stats.bytes)} in a private temporary queue",
        )
        progress: _ProgressLine | None = None
        if stats.pending and _stderr_is_tty():
            progress = _ProgressLine(stats.pending, sys.stderr).start()
        try:
            result = drain_queue(queue, progress=progress)
        finally:
            if progress is not None:
                progress.close()
    finally:
        queue.close()
    rate = result.sent / result.elapsed if result.elapsed > 0 else 0.0
    _step(
        "drain",
        f"sent {result.sent:,} in {_duration(result.elapsed)} ({rate:,.0f} msg/s), "
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
        _error_line(f"{_count(lost, 'event')} did not arrive")
        return EXIT_UNDELIVERED
    click.echo("Nothing was lost: every event the killed process tracked was delivered.")
    return EXIT_OK


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``durable-analytics`` and ``python -m durable_analytics.cli``)."""
    code: int = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
