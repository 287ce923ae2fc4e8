"""What the PostgreSQL queue shows about itself: ``stats`` and the message table's health."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Protocol, TypeVar

from durable_analytics._store.base import Destination, DestinationStats, QueueStats
from durable_analytics.exceptions import QueueError

from . import _sql as q
from ._caps import Runner
from ._conn import Connection, Cursor
from ._schema import Sql

__all__ = ["iso", "stats", "table_health"]

T = TypeVar("T")


class SnapshotRunner(Protocol):
    """Runs a function in one transaction, optionally one snapshot (``PostgresQueue._tx``)."""

    def __call__(self, run: Callable[[Connection], T], *, snapshot: bool = False) -> T: ...


def iso(ts: float) -> str:
    """A wall-clock time as ISO 8601 UTC to the second."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def stats(tx: SnapshotRunner, sql: Sql, identity: str) -> QueueStats:
    """Counts and health of the queue, from one snapshot (see ``QueueStats``)."""

    def run(conn: Connection) -> tuple[Cursor, Cursor]:
        return (
            conn.execute(sql(q.STATS_DESTINATIONS)),
            conn.execute(sql(q.STATS_TOTALS)),
        )

    per_dest, total = tx(run, snapshot=True)
    dests, totals = per_dest.fetchall(), total.fetchone()
    if totals is None:  # pragma: no cover - an aggregate always returns one row
        raise QueueError(f"the PostgreSQL queue {identity} returned no totals")
    destinations = []
    last: tuple[float, str, str] | None = None
    for d, host, key, until, failures, err, err_ago, n, leased, window, live in dests:
        # Only a destination still failing gives the queue's last error (see QueueStats).
        if failures and err is not None and err_ago is not None:
            at = time.time() - float(err_ago)
            if last is None or at > last[0]:
                last = (at, str(err), str(host))
        destinations.append(
            DestinationStats(
                host=host,
                write_key=Destination(int(d), host, key).redacted_key,
                pending=int(n),
                leased=int(leased),
                backoff_until=None if until is None else iso(time.time() + float(until)),
                failures=int(failures),
                last_error=err,
                # None until a lease stored the destination's window.
                window=None if window is None else int(window),
                live_leases=None if window is None else int(live),
            )
        )
    pending, leased, size, oldest_age, dead, dropped = totals
    return QueueStats(
        pending=int(pending),
        leased=int(leased),
        dead_letters=int(dead),
        bytes=int(size),
        oldest_age_seconds=None if oldest_age is None else round(float(oldest_age), 3),
        dropped=int(dropped),
        last_error=None
        if last is None
        else {"message": last[1], "at": iso(last[0]), "host": last[2]},
        destinations=destinations,
    )


def table_health(tx: Runner, schema: str) -> dict[str, Any]:
    """Dead rows, size and vacuum times of the message table, and the oldest snapshot."""
    row = tx(lambda c: c.execute(q.TABLE_HEALTH.encode(), (schema,))).fetchone()
    if row is None:
        return {}
    live, dead, total_bytes, vacuumed_ago, oldest_xmin_age, oldest_tx_seconds = row
    return {
        "live_rows": int(live or 0),
        "dead_rows": int(dead or 0),
        "table_bytes": int(total_bytes or 0),
        "last_vacuum_seconds_ago": None if vacuumed_ago is None else round(vacuumed_ago, 1),
        "oldest_snapshot_xid_age": None if oldest_xmin_age is None else int(oldest_xmin_age),
        "oldest_transaction_seconds": None
        if oldest_tx_seconds is None
        else round(float(oldest_tx_seconds), 1),
    }
