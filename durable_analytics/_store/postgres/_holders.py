"""Who holds a lease on the PostgreSQL queue, and the fast takeover of a dead holder's.

A process registers once, on its first lease: a row of ``holders``, and a session-level
advisory lock keyed by the row's id, taken in the transaction that inserts the row (so the
row is never seen without its lock), on a connection kept for that alone (the presence).
Its leases name the id. When the process dies (SIGKILL, a crash), its sessions end and the
server releases the lock; any process then finds a holder row without its lock and frees
that holder's leases at once (``take_over``) instead of after ``lease_timeout``.

A holder that lives on while its presence session was cut (``pg_terminate_backend``, a
network failure the server saw) looks dead too: its leases are taken over, its own
settlements change nothing (the token fences them), so its batches in flight may be sent
twice; it notices the cut connection and registers again. Behind a pooler in transaction
mode a session lock stays on a server connection rather than with the process, so the
takeover cannot be trusted there: ``?fast_takeover=off`` in the URL leaves leases to expire.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import threading
import time
import zlib
from collections.abc import Callable

from durable_analytics.exceptions import QueueError

from . import _sql as q
from ._bounds import WATCHDOG
from ._conn import Connection, Pool, psycopg
from ._schema import Sql

__all__ = ["TAKEOVER_EVERY", "Presence"]

log = logging.getLogger("durable_analytics.queue")

#: How often ``lease`` looks for dead holders (``reclaim_expired`` looks every time).
TAKEOVER_EVERY = 1.0
# After a failed registration, leases name no holder (they expire) for this long.
_RETRY_EVERY = 10.0
# Advisory lock keys are two int4: the queue's class, and the holder id modulo 2**31.
_KEYS = 1 << 31


def holder_class(schema: str) -> int:
    """The first key of every holder lock of the queue in ``schema``."""
    return zlib.crc32(f"durable-analytics-holders:{schema}".encode()) & (_KEYS - 1)


def _cut(conn: Connection) -> bool:
    """Whether the server ended an idle session (it writes nothing to a live idle one)."""
    if conn.closed or conn.broken:
        return True
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


class Presence:
    """This process's mark of life on the server, and the search for dead holders."""

    def __init__(
        self,
        pool: Pool,
        sql: Sql,
        *,
        enabled: bool = True,
        limit: Callable[[float], float] | None = None,
    ) -> None:
        self._pool = pool
        # How long a call starting now may wait (``Deadlines.limit``: the pool's timeout,
        # or what a flush, an exit or a drain running now has left).
        self._limit = limit or (lambda timeout: timeout)
        self._sql = sql
        self.enabled = enabled
        self.key_class = holder_class(sql.schema)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        #: The id this process's leases name (None: not registered; leases expire).
        self.id: int | None = None
        self._failed_at = -math.inf
        self._checked_at = -math.inf

    def holder(self) -> int | None:
        """The holder id for a new lease, registering this process first if needed."""
        if not self.enabled:
            return None
        if self._pid != os.getpid():
            # Forked: the parent's session is not ours (the pool keeps the child off it).
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._conn = None
            self.id = None
        # Another thread may be registering: wait for it no longer than this call may wait.
        if not self._lock.acquire(timeout=self._limit(self._pool.timeout)):
            return None  # this lease names no holder: it expires instead
        try:
            if self._conn is not None and _cut(self._conn):
                self._drop()
            if self._conn is None and time.monotonic() - self._failed_at >= _RETRY_EVERY:
                self._register()
            return self.id
        finally:
            self._lock.release()

    def pid(self) -> int | None:
        """The server process of the presence session (for tests and ``status``)."""
        conn = self._conn
        return None if conn is None or conn.closed else int(conn.info.backend_pid)

    def _register(self) -> None:
        # Within the caller's bound (a flush, an exit or a drain may have less left than
        # the pool's timeout): the connect, the statements, and the watchdog past them.
        limit = self._limit(self._pool.timeout)
        try:
            conn = self._pool.dedicated(None if limit >= self._pool.timeout else limit)
        except QueueError as exc:
            self._failed(exc)
            return
        try:
            with WATCHDOG.watching(conn, limit) as watch:
                if conn.info.server_version >= 140000:
                    # An idle-session limit would end the presence of a live process.
                    conn.execute(b"SET idle_session_timeout = 0")
                bound = max(1, int(limit * 1000))
                with conn.transaction():
                    conn.execute(b"SET LOCAL statement_timeout = %d" % bound)
                    row = conn.execute(self._sql(q.REGISTER_HOLDER)).fetchone()
                    holder = int(row[0]) if row else 0
                    conn.execute(
                        b"SELECT pg_advisory_lock(%s::int4, %s::int4)",
                        (self.key_class, holder % _KEYS),
                    )
            if watch.cut:  # cut in the instant it ended: the session (and its lock) is gone
                raise psycopg.OperationalError("the presence connection was cut")
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                conn.close()
            self._failed(exc)
            return
        self._conn, self.id = conn, holder

    def _failed(self, exc: Exception) -> None:
        self._failed_at = time.monotonic()
        log.debug("could not register as a lease holder (leases will expire instead): %s", exc)

    def _drop(self) -> None:
        conn, self._conn, self.id = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def due(self) -> bool:
        """Whether ``lease`` should look for dead holders now (at most every second)."""
        return self.enabled and time.monotonic() - self._checked_at >= TAKEOVER_EVERY

    def take_over(self, conn: Connection) -> int:
        """In the caller's transaction: end the leases of dead holders; how many ended."""
        self._checked_at = time.monotonic()
        params = {"cls": self.key_class}
        dead = [int(r[0]) for r in conn.execute(self._sql(q.DEAD_HOLDERS), params).fetchall()]
        if not dead:
            return 0
        if self.id in dead:
            # Our own presence was cut while we live: register again on the next lease.
            with self._lock:
                self._drop()
        row = conn.execute(self._sql(q.TAKE_OVER), {"dead": dead}).fetchone()
        ended = int(row[0]) if row else 0
        if ended:
            log.info("took over %d lease(s) of %d holder(s) that are gone", ended, len(dead))
        return ended

    def close(self) -> None:
        """End the presence (its leases then look dead to every other process)."""
        if self._pid == os.getpid():
            with self._lock:
                self._drop()
