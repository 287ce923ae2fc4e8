"""The command group, its error handling and exit codes, logging, and the options commands share.

Every command module registers itself on :data:`cli`; this module knows none of them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from durable_analytics._config import (
    DEFAULT_HOST,
    DEFAULT_MAX_IN_FLIGHT,
    Config,
    default_queue_path,
    env_queue_url,
    is_queue_url,
)
from durable_analytics._store import QueueBackend
from durable_analytics._store import open_queue as open_backend
from durable_analytics._version import __version__
from durable_analytics.exceptions import ConfigError, QueueBusy, QueueError, ValidationError

from ._output import PROG, clear_progress_line, error_line

EXIT_OK = 0
EXIT_UNDELIVERED = 1
EXIT_USAGE = 2
EXIT_QUEUE = 3
EXIT_INTERRUPTED = 130

log = logging.getLogger("durable_analytics")

F = TypeVar("F", bound=Callable[..., Any])

# -v count of the running command: decides the log level and whether errors show a traceback.
_verbosity = 0


class CLIError(Exception):
    """A one-line error with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_UNDELIVERED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
            clear_progress_line()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def setup_logging(verbosity: int, *, worker: bool = False) -> None:
    """Library logs to stderr: warnings by default (info for the worker), -v info, -vv debug."""
    # One handler per process, replaced per command: every earlier one goes, even one that
    # was put back on the logger by code that saved and restored its handler list.
    for old in [h for h in log.handlers if isinstance(h, _StderrHandler)]:
        log.removeHandler(old)
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


# --------------------------------------------------------------------------- shared options


def _remember_verbosity(ctx: click.Context, param: click.Parameter, value: int) -> int:
    global _verbosity  # noqa: PLW0603
    _verbosity = max(_verbosity, value or 0)
    return value


def verbose_option(f: F) -> F:
    """``-v/--verbose`` (counted), passed to the command as ``verbose``."""
    return click.option(
        "-v",
        "--verbose",
        count=True,
        callback=_remember_verbosity,
        help="Log to stderr: -v for info, -vv for debug (and tracebacks on errors).",
    )(f)


def queue_option(f: F) -> F:
    """``--queue PATH|URL``, passed to the command as ``queue_path`` (None: the default)."""
    return click.option(
        "--queue",
        "queue_path",
        type=click.UNPROCESSED,  # a path, or a postgresql:// URL that a Path would mangle
        callback=_path_or_url,
        default=None,
        metavar="PATH|URL",
        help="The queue file, or a postgresql:// URL. Default: $DURABLE_ANALYTICS_QUEUE, else "
        "<user data dir>/durable-analytics/queue.sqlite3.",
    )(f)


def _path_or_url(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None or is_queue_url(value):
        return value
    if not value:
        raise click.BadParameter("must not be empty", ctx, param)
    return Path(value)


def common_options(f: F) -> F:
    """``--queue`` and ``-v``: every command that works on a queue takes both."""
    return queue_option(verbose_option(f))


def json_option(f: F) -> F:
    """``--json``, passed to the command as ``as_json``."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def max_in_flight_option(f: F) -> F:
    """``--max-in-flight`` (old name ``--concurrency``), passed as ``max_in_flight``."""
    return click.option(
        "--max-in-flight",
        "--concurrency",
        "max_in_flight",
        type=click.IntRange(1, 256),
        default=DEFAULT_MAX_IN_FLIGHT,
        show_default=True,
        metavar="N",
        help="Requests in flight per destination, each batch under its own lease; the window "
        "halves on 429/5xx and grows back by one per success. (--concurrency: old name.)",
    )(f)


class Seconds(click.FloatRange):
    """A number of seconds in a range, and finite: ``FloatRange`` takes "nan" and "inf",
    which every comparison with a deadline gets wrong (a drain with ``--timeout nan`` never
    ended, looping without a pause)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds.", param, ctx)
        return seconds


def lease_timeout_option(request_timeout: str) -> Callable[[F], F]:
    """``--lease-timeout``, passed as ``lease_timeout``.

    ``request_timeout`` says, in its help, what bounds one request in that command.
    """
    return click.option(
        "--lease-timeout",
        type=Seconds(min=0, min_open=True),
        default=60.0,
        show_default=True,
        metavar="SECONDS",
        help="A batch this process leased and did not settle by then (it died) may be sent "
        f"by another process; extended while its request is in flight. At least "
        f"{request_timeout}.",
    )


def resolve_queue(queue_path: Path | str | None) -> Path | str:
    """The ``--queue`` given, else the default queue (a path, or a postgresql:// URL)."""
    if isinstance(queue_path, str):
        return queue_path
    if queue_path is None and env_queue_url():
        return env_queue_url() or ""
    return (queue_path if queue_path is not None else default_queue_path()).expanduser()


def queue_config(
    path: Path | str, *, write_key: str | None = None, host: str | None = None, **settings: Any
) -> Config:
    """The settings of a command that works on the queue at ``path``, checked as a Client's.

    Each stored message carries its own destination, so the result has no write key and
    ``write_key`` / ``host`` are only overrides, validated here. Without ``host`` the default
    stands in, which keeps Config from reading DURABLE_ANALYTICS_HOST for such a command.
    """
    host = DEFAULT_HOST if host is None else host
    if write_key is not None:
        Config.build(write_key, host=host)  # a bad override is a usage error (exit 2)
    return Config.for_delivery(host=host, queue_path=path, **settings)


def queue_exists(config: Config) -> bool:
    """Whether the queue file is there (a PostgreSQL queue always counts as there)."""
    return config.queue_url is not None or os.path.lexists(config.queue_path)


def open_queue(config: Config, *, must_exist: bool = True, hint: str = "") -> QueueBackend:
    """Open the queue; without ``must_exist`` it is created (0600 in a 0700 directory).

    A missing queue is exit 3 (``hint`` ends its message), a damaged one too: reported,
    never repaired from a shell.
    """
    if must_exist and not queue_exists(config):
        # Opening would create the file: say so instead of making an empty queue. The
        # common cause is a fresh deploy, so say what creates it; a wrong path is the other.
        raise CLIError(
            f"no queue at {config.queue_path}: nothing has been tracked there yet (the first "
            "message a Client or `durable-analytics track` stores there creates it), or the "
            f"path is not the one your clients use{hint}",
            EXIT_QUEUE,
        )
    return open_backend(config, recover=False)  # a QueueError becomes exit 3 in main


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
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
        error_line(exc.format_message() + hint)
        return EXIT_USAGE
    except click.ClickException as exc:
        error_line(exc.format_message())
        return exc.exit_code
    except CLIError as exc:
        error_line(str(exc))
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        error_line("interrupted")
        return EXIT_INTERRUPTED
    except QueueBusy as exc:
        # Another process held the queue's lock past the wait (or the --timeout): the file
        # is fine, what was to be done was not done. 3 would send an operator to the file.
        error_line(str(exc))
        return EXIT_UNDELIVERED
    except QueueError as exc:
        error_line(str(exc))
        return EXIT_QUEUE
    except (ConfigError, ValidationError) as exc:
        error_line(str(exc))
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
        error_line(
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
  1    some messages could not be sent (server down, refused, timeout, or
       the queue stayed locked by another process)
  2    usage or configuration error (bad option or JSON, missing field or key)
  3    the queue file is missing (nothing tracked there yet: see status
       --missing-ok), unreadable or corrupt
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``durable-analytics`` and ``python -m durable_analytics.cli``)."""
    code: int = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    return code
