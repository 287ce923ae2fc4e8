"""The PostgreSQL queue: the ``QueueBackend`` contract on a server that a fleet shares.

Leasing is one statement: the oldest ready rows of one destination, ``FOR UPDATE SKIP
LOCKED`` so that concurrent holders never wait on (nor take) each other's rows, stamped
with a fresh token and an expiry of the server's ``now()`` plus ``lease_timeout``. Every
settlement (``ack``, ``release``, ``retry_later``, ``dead_letter``, ``extend``) names the
token, so a holder whose lease expired and was taken over changes nothing. Every time is
the server's: hosts whose clocks disagree still agree on who holds what. A holder's local
deadline (``Lease.expires_monotonic``) is read before the lease statement is sent, so it is
never later than the server's expiry.

Each destination's in-flight window is stored too, for the whole fleet (``_window.py``):
``lease`` refuses a destination whose live leases reached it.

Each call is one short transaction; ``durability`` sets ``synchronous_commit`` for it with
``SET LOCAL`` (so it works behind PgBouncer in transaction mode) and a ``statement_timeout``
bounds it: a call never waits on the server longer than ``timeout``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

from durable_analytics._config import DEFAULT_MAX_IN_FLIGHT
from durable_analytics._store.base import (
    CLOCK_JUMP_MARGIN,
    MAX_BACKOFF_SECONDS,
    Destination,
    Lease,
)
from durable_analytics.exceptions import ConfigError, QueueBusy, QueueError, QueueUnavailable

from . import _sql as q
from ._bounds import GRACE, WATCHDOG, Deadlines
from ._caps import Caps
from ._conn import Connection, Pool, parse_url, psycopg, translate
from ._holders import Presence
from ._outbox import DBAPIConnection, Outbox
from ._reads import QueueReads
from ._schema import ROW_OVERHEAD, Sql, migrate
from ._window import StoredWindow

__all__ = ["DBAPIConnection", "PostgresQueue"]

log = logging.getLogger("durable_analytics.queue")

T = TypeVar("T")


def _local(delta: float | None) -> float | None:
    """A server time, given as seconds from the server's now, on this host's wall clock."""
    return None if delta is None else time.time() + float(delta)


class _StaleConnection(Exception):
    """A pooled connection was found closed by the server at a transaction's first
    statement: nothing ran; ``_tx`` runs it again on a new connection."""


class PostgresQueue(QueueReads):
    """A durable message queue in PostgreSQL, shared by every process of every host.

    ``url`` is a libpq URL (``postgresql://user:password@host:5432/dbname``), optionally
    with ``?schema=name`` for the schema holding the queue's tables (default
    ``durable_analytics``; created and migrated on first use, which needs the CREATE
    privilege once). ``durability="normal"`` commits the queue's own transactions with
    ``synchronous_commit=off`` (a crash of the application loses nothing; a crash of the
    *server* may lose its last fraction of a second of appends), ``"full"`` with ``on``.

    ``timeout`` bounds every call: connecting, waiting for a connection of this process's
    pool (``pool_size``), and each statement. Past it the call raises ``QueueUnavailable``
    (server unreachable) or ``QueueBusy`` (it answered too slowly); nothing is half-done.

    ``fleet_max_in_flight`` (or ``?fleet_max_in_flight=N`` in the URL; default 32) caps
    the leases of one destination live at once across every process of every host: the
    destination's window, halved on 429/5xx and grown by one per ack up to that cap, is
    stored in the queue (``window``). Give every process of the fleet the same value.

    ``clock`` is for tests only: a function returning the wall-clock time that replaces
    the server's ``now()`` in the queue's own statements (``time.time`` under freezegun).
    """

    def __init__(
        self,
        url: str,
        *,
        durability: Literal["normal", "full"] = "normal",
        max_queue_bytes: int = 1 << 30,
        max_queue_size: int | None = None,
        overflow: Literal["drop_newest", "drop_oldest"] = "drop_newest",
        lease_timeout: float = 60.0,
        max_dead_letter_bytes: int | None = None,
        schema: str | None = None,
        timeout: float = 10.0,
        pool_size: int = 4,
        clock: Callable[[], float] | None = None,
        fleet_max_in_flight: int | None = None,
    ) -> None:
        if durability not in ("normal", "full"):
            raise ConfigError("durability must be 'normal' or 'full'")
        self.target = parse_url(url, schema=schema, timeout=timeout)
        #: ``postgresql://user@host:port/dbname#schema``: no password.
        self.identity = self.target.identity
        self.path = Path(self.identity)
        self.durability = durability
        self.max_queue_bytes = max_queue_bytes
        self.max_queue_size = max_queue_size
        self.overflow = overflow
        self.lease_timeout = lease_timeout
        self.timeout = timeout
        self.max_dead_letter_bytes = (
            max_queue_bytes // 10 if max_dead_letter_bytes is None else max_dead_letter_bytes
        )
        self._sql = Sql(self.target.schema)
        self._pool = Pool(self.target, size=pool_size, timeout=timeout)
        #: The deadlines of the flushes, exits and drains running now (``bounded``).
        self._deadlines = Deadlines()
        self._presence = Presence(
            self._pool, self._sql, enabled=self.target.fast_takeover, limit=self._deadlines.limit
        )
        # Per transaction (SET LOCAL), so that a pooler in transaction mode keeps them to
        # this transaction: synchronous_commit (durability), statement_timeout (the bound).
        settings = (
            f"SET LOCAL synchronous_commit = {'off' if durability == 'normal' else 'on'}; "
            f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}"
        )
        self._begin = f"BEGIN; {settings}".encode()
        self._begin_snapshot = f"BEGIN ISOLATION LEVEL REPEATABLE READ; {settings}".encode()
        self._clock = clock
        self._dest_cache: dict[tuple[str, str], int] = {}
        self._caps = Caps(
            self._tx,
            self._sql,
            self.identity,
            max_queue_bytes=max_queue_bytes,
            max_queue_size=max_queue_size,
            overflow=overflow,
            max_dead_letter_bytes=self.max_dead_letter_bytes,
        )
        fleet = fleet_max_in_flight or self.target.fleet_max_in_flight or DEFAULT_MAX_IN_FLIGHT
        if fleet < 1:
            raise ConfigError("fleet_max_in_flight must be at least 1")
        #: The destinations' in-flight windows, stored here for every process.
        self.window = StoredWindow(self._tx, self._sql, max_in_flight=fleet)
        with self._pool.connection() as conn:
            try:
                # No statement_timeout on this connection yet (it is set per transaction):
                # the watchdog bounds the check, behind a lock held by a stuck migrator too.
                with WATCHDOG.watching(conn, timeout) as watch:
                    self.instance = migrate(conn, self._sql, self.identity)
                if watch.cut:  # cut in the instant the check ended: never to be used again
                    conn.close()
            except psycopg.Error as exc:
                if watch.cut:
                    raise QueueBusy(
                        f"the PostgreSQL queue {self.identity} did not answer within "
                        f"{timeout:g} s while checking its schema"
                    ) from None
                raise translate(exc, self.identity) from None
        self._outbox = Outbox(self._sql, self.identity, self._caps, self.instance)

    def __repr__(self) -> str:
        return f"PostgresQueue({self.identity!r})"

    # ---------------------------------------------------------------- plumbing

    def _tx(
        self, run: Callable[[Connection], T], *, snapshot: bool = False, now: float | None = None
    ) -> T:
        """Run ``run`` in one transaction with the queue's durability and timeout.

        BEGIN and the ``SET LOCAL`` settings travel as one message, so a call of one
        statement costs three round trips (measured faster than psycopg's pipeline mode
        here). Results are read after COMMIT, from the cursors ``run`` returns.
        """
        started = time.monotonic()
        try:
            return self._tx_once(run, snapshot, now)
        except _StaleConnection:
            # The server ended the session while it sat idle in the pool (a restart, a
            # failover, ``idle_session_timeout``, a pooler or NAT dropping idle sockets):
            # nothing of this transaction ran, so it runs once more on a new connection
            # (the other idle ones are most likely dead too: dropped), within what is left
            # of the call's bound: a socket dropped silently is found dead only by the
            # kernel's ``tcp_user_timeout``, and the call still ends by its ``timeout``.
            self._pool.drop_idle()
            left = self.timeout - (time.monotonic() - started)
            if left < GRACE:
                raise QueueUnavailable(
                    f"the PostgreSQL queue {self.identity} is unreachable: its connection "
                    f"was found closed after {self.timeout:.3g} s"
                ) from None
            return self._tx_once(run, snapshot, now, within=left)

    def _tx_once(
        self,
        run: Callable[[Connection], T],
        snapshot: bool,
        now: float | None,
        *,
        within: float | None = None,
    ) -> T:
        """``_tx``'s one attempt; ``within``: the retry's, given what is left of the bound
        (raises ``_StaleConnection`` on a first attempt only)."""
        limit = self._deadlines.limit(self.timeout if within is None else within)
        watch = None
        try:
            with self._pool.connection(limit) as conn:
                begin = self._begin_snapshot if snapshot else self._begin
                if limit < self.timeout:  # a flush, exit or drain has less time left
                    begin += b"; SET LOCAL statement_timeout = %d" % max(1, int(limit * 1000))
                if self._clock is not None:
                    at = self._clock() if now is None else now
                    begin += b"; SET LOCAL durable_analytics.now = '%.6f'" % at
                with WATCHDOG.watching(conn, limit) as watch:
                    try:
                        conn.execute(begin)
                    except psycopg.OperationalError:
                        if within is None and not watch.cut and (conn.closed or conn.broken):
                            raise _StaleConnection from None
                        raise
                    try:
                        result = run(conn)
                        conn.execute(b"COMMIT")
                    except BaseException:
                        if not conn.closed and not conn.broken:
                            with contextlib.suppress(psycopg.Error):
                                conn.execute(b"ROLLBACK")
                        raise
                if watch.cut:  # cut in the instant the call ended: never to be used again
                    conn.close()
                return result
        except psycopg.Error as exc:
            if watch is not None and watch.cut:
                raise QueueBusy(
                    f"the PostgreSQL queue {self.identity} did not answer within {limit:.3g} s "
                    "(its server process may be stopped or hung); the connection was dropped"
                ) from None
            raise translate(exc, self.identity) from None

    def close(self) -> None:
        """Close this process's idle connections (busy ones close when their call ends).

        Leases this process still holds are then taken over at once by other processes.
        """
        self._presence.close()
        self._pool.close()

    def bounded(self, seconds: float | None) -> contextlib.AbstractContextManager[None]:
        """Inside the block, no call of this queue (any thread) waits past ``seconds``."""
        return self._deadlines.bounded(seconds)

    # ---------------------------------------------------------------- destinations

    def destination(self, host: str, write_key: str) -> int:
        """The id of the (host, write key) destination, created on first use."""
        key = (host, write_key)
        cached = self._dest_cache.get(key)
        if cached is not None:
            return cached
        params = {"host": host, "key": write_key}
        row = None
        for _ in range(3):  # a concurrent first insert may hide the row from one statement
            row = self._tx(lambda c: c.execute(self._sql(q.DESTINATION), params)).fetchone()
            if row is not None:
                break
        if row is None:
            raise QueueError(f"the PostgreSQL queue {self.identity} lost a destination row")
        self._dest_cache[key] = int(row[0])
        return int(row[0])

    # ---------------------------------------------------------------- append

    def append(self, dest_id: int, body: bytes, enqueued_at: float | None = None) -> int:
        """Store one serialized message; its id after COMMIT, 0 when a cap dropped it.

        ``max_queue_bytes`` is applied first, then ``max_queue_size``: near the count cap
        the append counts the rows, applies the overflow policy and inserts in one
        transaction under the queue's count lock (see ``_caps.py``).
        """
        body = bytes(body)
        caps = self._caps
        if not caps.room_for(len(body)):
            return 0
        params = (dest_id, body, len(body), enqueued_at)

        def run(c: Connection) -> Any:
            if counted and not caps.counted(c):
                return None
            return c.execute(self._sql(q.INSERT), params).fetchone()

        counted = caps.count_due()
        try:
            row = self._tx(run)
        except BaseException:
            caps.told(committed=False)
            raise
        caps.told()
        if row is None:
            return 0
        caps.appended(len(body))
        return int(row[0])

    def stage(self, dest_id: int, body: bytes, connection: DBAPIConnection) -> int:
        """The transactional outbox: insert the message in the caller's open transaction.

        The message is inserted on the caller's own connection and not committed: it
        exists (and any flusher delivers it) if and only if the caller commits. Returns its
        id (meaningful only once committed), or 0 when a cap dropped it. The connection
        must reach the database holding this queue; ``ConfigError`` otherwise, and the
        caller's transaction is left as it was. The caps are applied on the queue's own
        connections (a message staged in a transaction still open is not counted yet).
        """
        return self._outbox.stage(dest_id, body, connection)

    # ---------------------------------------------------------------- leases

    def lease(
        self,
        max_messages: int,
        max_bytes: int,
        *,
        destination: int | None = None,
        up_to_id: int | None = None,
        now: float | None = None,
        per_message_overhead: int = 1,
    ) -> Lease | None:
        """Take the oldest ready messages of one destination, or None when none are ready.

        At most ``max_messages`` messages and ``max_bytes`` bytes (each costing its size
        plus ``per_message_overhead``); the first is always taken. A destination whose
        live leases reached its window is not leased from. ``now`` is honoured only with a
        test ``clock``: otherwise every time is the server's.
        """
        if max_messages <= 0:
            return None
        token = uuid.uuid4()
        params = {
            "dest": destination,
            "top": up_to_id if up_to_id is not None else (1 << 62),
            "n": max_messages,
            "max_bytes": max_bytes,
            "overhead": per_message_overhead,
            "token": token,
            "timeout": self.lease_timeout,
            "horizon": MAX_BACKOFF_SECONDS + CLOCK_JUMP_MARGIN,
        }
        presence = self._presence

        def run(c: Connection) -> list[Any]:
            if presence.due():
                presence.take_over(c)  # a dead holder's messages are ready again
            params["holder"] = presence.holder()
            params["dest"] = self.window.choose(c, params)
            if params["dest"] is None:
                return []
            return c.execute(self._sql(q.LEASE), params, binary=True).fetchall()

        # Read before the statement is sent: never later than the server's expiry.
        deadline = time.monotonic() + self.lease_timeout
        rows = self._tx(run, now=now)
        if not rows:
            return None
        rows.sort(key=lambda r: int(r[0]))
        _, dest_id, host, key, failures = rows[0][:5]
        return Lease(
            token=token.hex,
            destination=Destination(int(dest_id), host, key),
            ids=tuple(int(r[0]) for r in rows),
            bodies=tuple(bytes(r[5]) for r in rows),
            attempts=max(int(r[6]) for r in rows),
            expires_monotonic=deadline,
            failures=int(failures),
            window_epoch=int(rows[0][7]),
        )

    @staticmethod
    def _ids(lease: Lease, ids: Iterable[int] | None) -> list[int]:
        if ids is None:
            return list(lease.ids)
        wanted = set(ids)
        return [i for i in lease.ids if i in wanted]

    @staticmethod
    def _fenced(lease: Lease, chosen: list[int]) -> dict[str, Any]:
        """The ids a settlement names, the lease's others (``rest``), and its token."""
        named = set(chosen)
        return {
            "ids": chosen,
            "rest": [i for i in lease.ids if i not in named],
            "token": uuid.UUID(lease.token),
        }

    def extend(self, lease: Lease, *, whole: bool = False) -> bool:
        """Push the lease's expiry ``lease_timeout`` from now; False if it was lost already.

        Messages are leased one by one: another holder may have taken some of an expired
        lease. What is left is extended; ``whole`` answers False then too.
        """
        params = {
            "timeout": self.lease_timeout,
            "ids": list(lease.ids),
            "token": uuid.UUID(lease.token),
        }
        row = self._tx(lambda c: c.execute(self._sql(q.EXTEND), params)).fetchone()
        kept = int(row[0]) if row else 0
        return kept == len(lease.ids) if whole else kept > 0

    def ack(self, lease: Lease, ids: Iterable[int] | None = None) -> int:
        """Delete delivered messages and clear the destination's backoff; returns how many.

        Fenced by the token: once the lease was taken over, its holder's ack deletes nothing.
        """
        chosen = self._ids(lease, ids)
        params = {**self._fenced(lease, chosen), "dest": lease.destination.id}
        row = self._tx(lambda c: c.execute(self._sql(q.ACK), params)).fetchone()
        deleted = int(row[0]) if row else 0
        if deleted:
            self._shrank(lease, chosen)
        return deleted

    def ack_and_lease(
        self,
        lease: Lease,
        max_messages: int,
        max_bytes: int,
        *,
        destination: int | None = None,
        up_to_id: int | None = None,
        now: float | None = None,
        per_message_overhead: int = 1,
    ) -> tuple[int, Lease | None]:
        """``ack(lease)`` then ``lease(...)``: two transactions (the ack frees its window slot
        before the lease asks for one)."""
        deleted = self.ack(lease)
        return deleted, self.lease(
            max_messages,
            max_bytes,
            destination=destination,
            up_to_id=up_to_id,
            now=now,
            per_message_overhead=per_message_overhead,
        )

    def _shrank(self, lease: Lease, ids: list[int]) -> None:
        """Take what this process removed off its estimate of the queue's size."""
        gone = set(ids)
        freed = sum(
            len(b) + ROW_OVERHEAD for i, b in zip(lease.ids, lease.bodies, strict=True) if i in gone
        )
        self._caps.removed(freed, len(gone))

    def release(
        self,
        lease: Lease,
        not_before: float | None = None,
        *,
        ids: Iterable[int] | None = None,
        count_attempt: bool = True,
    ) -> int:
        """Return leased messages to the queue, not to be leased again before ``not_before``.

        ``not_before`` is this host's wall-clock time; it is stored as the same distance from
        the server's now. Fenced by the token.
        """
        delay = None if not_before is None else max(0.0, not_before - time.time())
        params = self._release_params(lease, ids, delay, 1 if count_attempt else 0)
        row = self._tx(lambda c: c.execute(self._sql(q.RELEASE), params)).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _release_params(
        lease: Lease, ids: Iterable[int] | None, delay: float | None, bump: int
    ) -> dict[str, Any]:
        chosen = PostgresQueue._ids(lease, ids)
        return {**PostgresQueue._fenced(lease, chosen), "delay": delay, "bump": bump}

    def retry_later(self, lease: Lease, delay: Callable[[int], float], error: str) -> float:
        """Back the destination off and hand the batch back, in one transaction.

        The destination's row is locked while ``delay(failures + 1)`` is computed, so holders
        on other hosts failing at once count every failure. Returns this host's wall-clock
        time at which the backoff ends. The failure counts even for a stale lease.
        """
        dest_id = lease.destination.id

        def run(conn: Connection) -> float:
            row = conn.execute(self._sql(q.LOCK_DESTINATION), (dest_id,)).fetchone()
            seconds = max(0.0, float(delay((int(row[0]) if row else 0) + 1)))
            conn.execute(self._sql(q.SET_BACKOFF), self._backoff_params(dest_id, seconds, error))
            conn.execute(self._sql(q.RELEASE), self._release_params(lease, None, seconds, 1))
            return seconds

        return time.time() + self._tx(run)

    @staticmethod
    def _backoff_params(dest_id: int, seconds: float, error: str | None) -> dict[str, Any]:
        return {
            "dest": dest_id,
            "delay": seconds,
            "horizon": MAX_BACKOFF_SECONDS + CLOCK_JUMP_MARGIN,
            "error": None if error is None else error[:500],
        }

    def dead_letter(
        self,
        lease: Lease,
        ids: Iterable[int],
        *,
        status: int | None,
        reason: str,
        excerpt: str = "",
    ) -> int:
        """Move leased messages to the dead letters (fenced by the token); returns how many."""
        chosen = self._ids(lease, ids)
        if not chosen:
            return 0
        params = {
            **self._fenced(lease, chosen),
            "status": status,
            "reason": reason[:500],
            "excerpt": excerpt[:2000],
        }
        moved = self._tx(lambda c: c.execute(self._sql(q.DEAD_LETTER), params)).rowcount
        if moved:
            done = set(chosen)
            self._caps.est_count = max(0, self._caps.est_count - int(moved))
            self._caps.dead_since_check += sum(
                len(b) for i, b in zip(lease.ids, lease.bodies, strict=True) if i in done
            )
            self._caps.bound_dead_letters()
        return int(moved)

    # ---------------------------------------------------------------- backoff

    def set_backoff(self, dest_id: int, until: float, error: str | None = None) -> None:
        """Hold every holder on every host back from ``dest_id`` until ``until`` (wall clock)."""
        params = self._backoff_params(dest_id, max(0.0, until - time.time()), error)
        self._tx(lambda c: c.execute(self._sql(q.SET_BACKOFF), params))

    def clear_backoff(self, dest_id: int | None, *, messages: bool = False) -> None:
        """Forget the destination's failures and backoff (a successful delivery does this).

        ``dest_id=None`` does it for every destination. ``messages=True`` also clears the
        retry time of each of their queued messages, so all of it is ready at once
        (``drain --ignore-backoff``).
        """

        def run(c: Connection) -> None:
            if dest_id is None:
                c.execute(self._sql(q.CLEAR_ALL_BACKOFF))
            else:
                c.execute(self._sql(q.CLEAR_BACKOFF), (dest_id,))
            if messages:
                c.execute(self._sql(q.CLEAR_MESSAGE_BACKOFF), (dest_id, dest_id))

        self._tx(run)

    def backoff(self, dest_id: int) -> tuple[float, int]:
        """``(not_before, consecutive failures)`` of a destination (not_before 0: none)."""
        row = self._tx(lambda c: c.execute(self._sql(q.BACKOFF), (dest_id,))).fetchone()
        if row is None:
            return 0.0, 0
        return (_local(row[0]) or 0.0), int(row[1])

    def next_ready_at(
        self, *, up_to_id: int | None = None, destination: int | None = None
    ) -> float | None:
        """The earliest wall-clock time some pending message (of ``destination``) may be leased.

        A destination whose window is full counts as leased by others (None if only such
        messages are left): they end when those holders settle.
        """
        params = {
            "top": up_to_id if up_to_id is not None else (1 << 62),
            "horizon": MAX_BACKOFF_SECONDS + CLOCK_JUMP_MARGIN,
            "max": self.window.max_in_flight,
            "dest": destination,
        }
        row = self._tx(lambda c: c.execute(self._sql(q.NEXT_READY), params)).fetchone()
        return None if row is None else _local(row[0])

    def ready_summary(self, limit: int, now: float | None = None) -> tuple[int, float | None]:
        """How many of the oldest ``limit`` messages are ready to lease, and the oldest's time.

        Messages of a destination whose window is full are not ready (a flusher then polls
        at its idle pace, not at once: a fleet waiting for a slot does not load the server).
        """
        params = {
            "limit": limit,
            "horizon": MAX_BACKOFF_SECONDS + CLOCK_JUMP_MARGIN,
            "max": self.window.max_in_flight,
        }
        row = self._tx(lambda c: c.execute(self._sql(q.READY_SUMMARY), params), now=now).fetchone()
        if row is None or not row[0]:
            return 0, None
        # The oldest's age by the server's clock, on this host's (or the caller's ``now``):
        # a host whose clock is off from the server's by more than ``flush_interval`` saw
        # every message overdue (or from the future, sent at once), one request each.
        here = now if now is not None else (self._clock() if self._clock else time.time())
        return int(row[0]), here + float(row[1])

    def reclaim_expired(self) -> int:
        """Free the messages of expired leases and of dead holders now; how many leases ended.

        ``lease`` already takes expired messages (and looks for dead holders once a second);
        this makes them ready at once. A dead holder is a process whose server session
        ended (``_holders.py``).
        """

        def run(c: Connection) -> int:
            ended = self._presence.take_over(c) if self._presence.enabled else 0
            row = c.execute(self._sql(q.RECLAIM)).fetchone()
            return ended + (int(row[0]) if row else 0)

        return self._tx(run)
