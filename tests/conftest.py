"""Shared fixtures: a private queue path, a running Collector, a child-process helper, and a
private PostgreSQL server (``pg_dsn``) for the tests of the PostgreSQL queue."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _postgres import Cluster, ServerUnavailable, unique_schema
from _rawserver import RawServer

from durable_analytics import _pipeline
from durable_analytics.testing import Collector

WRITE_KEY = "test-write-key-0001"


@pytest.fixture
def queue_path(tmp_path: Path) -> Path:
    """A queue file path inside a fresh 0700 directory."""
    directory = tmp_path / "queue"
    directory.mkdir(mode=0o700)
    return directory / "queue.sqlite3"


@pytest.fixture
def collector() -> Iterator[Collector]:
    """A real Segment-compatible server on 127.0.0.1 that checks WRITE_KEY."""
    with Collector(WRITE_KEY) as c:
        yield c


@pytest.fixture
def refused_url() -> Iterator[str]:
    """An ``http://127.0.0.1:port`` URL that refuses every connection until the test ends.

    The port stays bound (never listening) meanwhile: a port merely found free and closed
    may be handed to another server (a Collector of this test, another suite on the
    machine with the same test write key), which would then answer the "dead" host.
    """
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


def child_env() -> dict[str, str]:
    """The environment for child Python processes: this checkout importable, no DEBUG noise."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("DEBUG", None)
    return env


def run_python(code: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter and wait for it."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        check=False,
    )


def start_python(code: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    """Start ``code`` in a fresh interpreter (stdout/stderr piped, text mode)."""
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        **kwargs,
    )


def directory_locked_by_someone(directory: Path) -> bool:
    """Whether a flock is held on ``directory`` (an exclusive one cannot be taken)."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# Every child process a test starts (through start_python, or subprocess.Popen directly, the
# library's own children included) is kept until the test ends, and its pipes are closed
# then. A test reads what it needs; the pipes it leaves open would otherwise be closed by
# the garbage collector with a ResourceWarning, which is an error in this suite. One still
# running then (a detached drain) is kept until it has exited: collecting it earlier warns.
_started: list[subprocess.Popen[Any]] = []
_popen_init = subprocess.Popen.__init__


def _tracked_init(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
    _popen_init(self, *args, **kwargs)
    _started.append(self)


subprocess.Popen.__init__ = _tracked_init  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _fresh_windows() -> None:
    """Every test starts with no destination windows in this process.

    Windows are per process and keyed by host, and the kernel hands a later test's Collector
    a port an earlier one used: that test would inherit a Retry-After gate or a halved window
    (a gated batch goes back to the queue unsent, so a test that expected a request saw none).
    """
    _pipeline._registry.reset()


@pytest.fixture(autouse=True)
def _close_child_pipes() -> Iterator[None]:
    yield
    for proc in _started:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
    _started[:] = [proc for proc in _started if proc.poll() is None]


# The matrix's extra Pythons run the fast tests only (.ci/run, README "Other Pythons"): the
# tests of these directories and modules, built around real processes (child interpreters,
# forks, servers) or waits of seconds (the comparison with the peer library), are `heavy`.
TESTS = Path(__file__).resolve().parent
HEAVY = (
    "reliability/",
    "contrib/",
    "compat/",
    "test_flusher_process.py",
    "store/test_sqlite_connections.py",
    "store/test_sqlite_holders.py",
    "store/test_postgres_processes.py",
    "store/test_postgres_bounds.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        where = item.path.relative_to(TESTS).as_posix()
        if where.startswith(HEAVY):
            item.add_marker(pytest.mark.heavy)


def _postgres_unavailable(reason: str) -> None:
    """Skip outside CI; in CI (the ``CI`` environment variable set) a missing server fails."""
    message = f"PostgreSQL tests need a server: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set, so this fails instead of skipping)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """The URL of a private PostgreSQL cluster started for this test session.

    Skips (fails when ``CI`` is set) when psycopg is not installed or no server can start.
    """
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _postgres_unavailable(
            "psycopg is not installed (pip install 'durable-analytics[postgres]')"
        )
    try:
        cluster = Cluster()
        cluster.start()
    except ServerUnavailable as exc:
        _postgres_unavailable(str(exc))
    try:
        yield cluster.dsn
    finally:
        cluster.stop()


@pytest.fixture
def pg_schema() -> str:
    """A schema name of this test's own, so its queue tables start empty."""
    return unique_schema()


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawServer]]:
    """Make ``RawServer``s (``raw_server(handler, tls=..., host=...)``), stopped at the end."""
    servers: list[RawServer] = []

    def make(handler: Callable[[socket.socket], None], **kwargs: Any) -> RawServer:
        server = RawServer(handler, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
