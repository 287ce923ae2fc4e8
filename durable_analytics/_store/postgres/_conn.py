"""Connections to the PostgreSQL queue: the URL, a small per-process pool, errors, fork.

psycopg 3 is an optional dependency: importing this module without it raises a
``ConfigError`` that names the extra to install.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from durable_analytics._bounded_call import Background
from durable_analytics._urls import SECRET_URL_PARAMETERS
from durable_analytics.exceptions import ConfigError, QueueBusy, QueueError, QueueUnavailable

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.conninfo import conninfo_to_dict
except ImportError as _missing:  # pragma: no cover - exercised in a child without psycopg
    raise ConfigError(
        "a postgresql:// queue needs psycopg 3: pip install 'durable-analytics[postgres]'"
    ) from _missing

from . import DEFAULT_SCHEMA, is_postgres_url

__all__ = [
    "Connection",
    "Cursor",
    "Pool",
    "Target",
    "parse_url",
    "pg_errors",
    "psycopg",
    "translate",
]

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")

Connection = psycopg.Connection[Any]
Cursor = psycopg.Cursor[Any]


@dataclass(frozen=True)
class Target:
    """Where the queue lives: connection settings, the schema, and a printable identity."""

    conninfo: str  # holds the password: never printed
    schema: str
    #: ``postgresql://user@host:port/dbname#schema``: no password, safe in logs and errors.
    identity: str
    #: A dead holder's lease is taken over at once (``?fast_takeover=off``: at expiry).
    fast_takeover: bool = True
    #: ``?fleet_max_in_flight=N``: leases of one destination live at once, fleet-wide.
    fleet_max_in_flight: int | None = None


def parse_url(url: str, *, schema: str | None = None, timeout: float = 10.0) -> Target:
    """Split a queue URL into libpq settings and the queue's schema.

    ``?schema=name`` (stripped before connecting; libpq does not know it) names the
    PostgreSQL schema holding the queue's tables, default ``durable_analytics``; the
    ``schema`` argument wins over it. ``?fast_takeover=off`` (stripped too) leaves a dead
    holder's lease to expire (behind a pooler in transaction mode). ``connect_timeout``
    defaults to ``timeout``. ``?fleet_max_in_flight=N`` (stripped too) caps the leases of
    one destination live at once across every process of every host (``_window.py``).
    """
    if not is_postgres_url(url):
        raise ConfigError("a PostgreSQL queue URL starts with postgresql:// or postgres://")
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    from_url = [v for k, v in query if k == "schema"]
    chosen = schema or (from_url[-1] if from_url else DEFAULT_SCHEMA)
    if not _SCHEMA_NAME.match(chosen):
        raise ConfigError(
            f"queue schema {chosen!r} is not a plain lower-case PostgreSQL name "
            "(letters, digits, _; at most 63)"
        )
    takeover = [v.strip().lower() for k, v in query if k == "fast_takeover"]
    if takeover and takeover[-1] not in _SWITCH:
        raise ConfigError("fast_takeover in the queue URL is 'on' or 'off'")
    fleet = [v.strip() for k, v in query if k == "fleet_max_in_flight"]
    if fleet and not (
        fleet[-1].isascii() and fleet[-1].isdigit() and 1 <= int(fleet[-1]) <= 100_000
    ):
        raise ConfigError("fleet_max_in_flight in the queue URL is a whole number from 1 to 100000")
    own = ("schema", "fast_takeover", "fleet_max_in_flight")
    rest = [(k, v) for k, v in query if k not in own]
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), ""))
    try:
        settings = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid PostgreSQL queue URL: {_redact(str(exc), url)}") from None
    extra: dict[str, Any] = {"application_name": "durable-analytics"}
    if "connect_timeout" not in settings:
        # libpq counts it per host: a URL of several hosts gives each its share of
        # ``timeout`` (at least 2 s, libpq's least), so that a hung first host leaves time
        # for the next (failover) and trying them all takes about ``timeout``, not hosts
        # times it.
        hosts = max(1, str(settings.get("host") or "").count(",") + 1)
        extra["connect_timeout"] = max(2, math.ceil(timeout / hosts))
    if "tcp_user_timeout" not in settings:
        # A server that vanished without closing the socket must not hang a call for the
        # kernel's retransmission timeout (minutes).
        extra["tcp_user_timeout"] = int(timeout * 1000)
    conninfo = psycopg.conninfo.make_conninfo(conninfo, **extra)
    user = str(settings.get("user") or "")
    host = str(settings.get("host") or "")
    port = str(settings.get("port") or "")
    dbname = str(settings.get("dbname") or "")
    where = f"{host}:{port}" if port else host
    identity = f"postgresql://{user + '@' if user else ''}{where}/{dbname}#{chosen}"
    return Target(
        conninfo,
        chosen,
        identity,
        _SWITCH[takeover[-1]] if takeover else True,
        int(fleet[-1]) if fleet else None,
    )


_SWITCH = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


def _redact(text: str, url: str) -> str:
    parts = urlsplit(url)
    secrets = [parts.password] + [
        v for k, v in parse_qsl(parts.query) if k.lower() in SECRET_URL_PARAMETERS
    ]
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def translate(exc: Exception, identity: str) -> QueueError:
    """The durable-analytics error for a psycopg failure (never showing a password)."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, (pg_errors.QueryCanceled, pg_errors.LockNotAvailable)):
        return QueueBusy(f"the PostgreSQL queue {identity} did not answer in time: {detail}")
    if isinstance(exc, psycopg.OperationalError) and not isinstance(
        exc, pg_errors.DiskFull | pg_errors.InsufficientResources
    ):
        return QueueUnavailable(f"the PostgreSQL queue {identity} is unreachable: {detail}")
    return QueueError(f"the PostgreSQL queue {identity} failed: {detail}")


# Connections a forked child inherited: their sockets are the parent's. They are kept
# (never closed nor collected: closing would end the parent's session) with their file
# descriptors pointed at /dev/null.
_INHERITED: list[Connection] = []
_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()


class Pool:
    """At most ``size`` connections per process, handed to one caller at a time.

    A connection is made on demand, kept for reuse, and dropped when it broke. After
    ``fork()`` the child never touches the parent's connections (see ``_after_fork``).
    """

    def __init__(self, target: Target, *, size: int = 4, timeout: float = 10.0) -> None:
        self.target = target
        self.size = size
        self.timeout = timeout
        self._reset()
        self._closed = False
        _POOLS.add(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.size)
        self._idle: list[Connection] = []
        self._all: weakref.WeakSet[Connection] = weakref.WeakSet()

    def _connect(self, timeout: float | None = None) -> Connection:
        # libpq's connect_timeout counts whole seconds, at least 2; the URL's (default the
        # queue's timeout) unless a deadline leaves less.
        conninfo = self.target.conninfo
        if timeout is not None:
            conninfo = psycopg.conninfo.make_conninfo(
                conninfo, connect_timeout=max(2, math.ceil(timeout))
            )
        try:
            # Under a deadline, given up at it (see _open_within).
            if timeout is not None:
                conn = self._open_within(conninfo, timeout)
            else:
                conn = self._open(conninfo)
        except psycopg.Error as exc:
            raise translate(exc, self.target.identity) from None
        self._all.add(conn)
        return conn

    @staticmethod
    def _open(conninfo: str) -> Connection:
        return psycopg.connect(
            conninfo,
            autocommit=True,
            # No server-side prepared statements: they break behind PgBouncer in
            # transaction mode, where each transaction may get another server session.
            prepare_threshold=None,
        )

    def _open_within(self, conninfo: str, timeout: float) -> Connection:
        """Connect by ``timeout`` (a deadline's rest), which libpq would round up to whole
        seconds, at least 2: on a helper thread, given up at ``timeout``; a connection
        made after that is closed by the helper."""
        lock = threading.Lock()
        given_up = False
        made: list[Connection] = []

        def connect() -> None:
            conn = self._open(conninfo)
            with lock:
                if not given_up:
                    made.append(conn)
                    return
            with contextlib.suppress(psycopg.Error):
                conn.close()

        call = Background(connect, "durable-analytics-pg-connect")
        call.start()
        call.wait(timeout)
        with lock:
            given_up = True
        if made:
            return made[0]
        if call.done:
            call.result()  # its exception
        raise QueueUnavailable(
            f"the PostgreSQL queue {self.target.identity} is unreachable: no connection "
            f"within {timeout:.3g} s"
        )

    def dedicated(self, timeout: float | None = None) -> Connection:
        """A connection of its own, outside the pool (the caller closes it); ``timeout``
        (default the URL's) bounds connecting.

        Counted among this process's connections for ``fork()``: a child never touches it.
        """
        if self._closed:
            raise QueueError(f"the PostgreSQL queue {self.target.identity} was closed")
        return self._connect(timeout)

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Connection]:
        """A connection for the caller alone, returned to the pool afterwards.

        ``timeout`` (default the pool's) bounds the wait for a free one and for connecting.
        """
        if self._closed:
            raise QueueError(f"the PostgreSQL queue {self.target.identity} was closed")
        wait = self.timeout if timeout is None else timeout
        if not self._slots.acquire(timeout=wait):
            raise QueueBusy(
                f"no connection to the PostgreSQL queue {self.target.identity} came free "
                f"within {wait:g} s (all {self.size} of this process are busy)"
            )
        slots = self._slots
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self._connect(None if wait >= self.timeout else wait)
            try:
                yield conn
            finally:
                self._give_back(conn)
        finally:
            slots.release()

    def _give_back(self, conn: Connection) -> None:
        if self._pid != os.getpid():
            return  # forked meanwhile: the child's pool starts empty
        healthy = not conn.closed and not conn.broken
        if healthy and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            healthy = False  # an interrupted transaction: never hand it to the next caller
        if healthy and not self._closed:
            with self._lock:
                self._idle.append(conn)
            return
        with contextlib.suppress(psycopg.Error):
            conn.close()

    def drop_idle(self) -> None:
        """Close the idle connections (the server ended their sessions: a restart); new
        ones are made on demand."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def close(self) -> None:
        """Close the idle connections (busy ones close when given back); no new ones."""
        self._closed = True
        self.drop_idle()

    def _after_fork(self) -> None:
        inherited = list(self._all)
        self._reset()
        if not inherited:
            return
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            for conn in inherited:
                with contextlib.suppress(Exception):
                    # Whatever libpq writes on this connection from now on (a Terminate
                    # message when it is finally closed) must not reach the parent's socket.
                    os.dup2(devnull, conn.pgconn.socket)
                _INHERITED.append(conn)
        finally:
            os.close(devnull)


def _before_fork() -> None:
    for pool in list(_POOLS):
        pool._lock.acquire()


def _after_fork_in_parent() -> None:
    for pool in list(_POOLS):
        pool._lock.release()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._after_fork()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
