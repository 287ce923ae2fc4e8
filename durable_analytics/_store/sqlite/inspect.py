"""Reading the SQLite queue as a whole: the counts ``stats()`` reports."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping

from durable_analytics._store.base import Destination, DestinationStats, QueueStats, iso_utc

from .holders import lease_over
from .leases import chunks, parse_ids
from .spool_counts import Spooled

__all__ = ["SpooledLook", "stats"]

#: A look at what waits in the journals and spools, made inside the file's snapshot.
SpooledLook = Callable[[sqlite3.Connection], Mapping[tuple[str, str], Spooled]]


def stats(
    conn: sqlite3.Connection,
    lease_timeout: float,
    now: float,
    spooled: SpooledLook | Mapping[tuple[str, str], Spooled] | None = None,
) -> QueueStats:
    """Counts and health of the queue, from one consistent snapshot (see ``QueueStats``).

    ``spooled`` (by host and write key: what waits in producers' journals and spools) is
    counted pending too, in the totals and in each destination's; as a function, it is
    called inside the snapshot, so that a message moved into the file meanwhile counts
    once.
    """
    conn.execute("BEGIN")  # one consistent snapshot for every count
    try:
        waiting = (spooled(conn) if callable(spooled) else spooled) or {}
        now_mono = time.monotonic()
        live_ids: set[int] = set()
        for ids, *holder_row in conn.execute(
            "SELECT ids, boot, pidns, pid, pstart, mono_expires, wall_expires FROM leases"
        ).fetchall():
            if not lease_over(lease_timeout, now, now_mono, *holder_row):
                live_ids.update(parse_ids(ids))
        per_dest: dict[int, tuple[int, int]] = {}
        leased_by_dest: dict[int, int] = {}
        # One scan per destination (there are few) rather than GROUP BY dest, which
        # sorts every message in memory (temp_store=MEMORY): ~40 MB per million.
        for (d,) in conn.execute("SELECT id FROM destinations ORDER BY id").fetchall():
            n, b = conn.execute(
                "SELECT count(*), total(size) FROM messages WHERE dest = ?", (d,)
            ).fetchone()
            if n:
                per_dest[int(d)] = (int(n), int(b))
        # Leased means under a live lease: not a record that expired, nor the
        # messages of a lease already acked or dead-lettered.
        for chunk in chunks(sorted(live_ids), 500):
            for d, n in conn.execute(
                f"SELECT dest, count(*) FROM messages WHERE id IN "
                f"({','.join('?' * len(chunk))}) GROUP BY dest",
                chunk,
            ).fetchall():
                leased_by_dest[int(d)] = leased_by_dest.get(int(d), 0) + int(n)
        dead = int(conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0])
        oldest = conn.execute("SELECT min(enqueued_at) FROM messages").fetchone()[0]
        dropped = int(
            conn.execute(
                "SELECT total(value) FROM counters WHERE name LIKE 'dropped_%'"
            ).fetchone()[0]
        )
        dests = conn.execute(
            "SELECT id, host, write_key, not_before, failures, last_error, last_error_at "
            "FROM destinations ORDER BY id"
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    destinations = []
    last: tuple[float, str, str] | None = None
    for d, host, key, not_before, failures, err, err_at in dests:
        n, _ = per_dest.get(int(d), (0, 0))
        held = waiting.get((str(host), str(key)))
        n += 0 if held is None else held.messages
        # The queue's last error is that of a destination still failing: a delivery clears
        # its failures, and the error is then history (kept in its DestinationStats).
        if (
            failures
            and err is not None
            and err_at is not None
            and (last is None or err_at > last[0])
        ):
            last = (float(err_at), str(err), str(host))
        destinations.append(
            DestinationStats(
                host=host,
                write_key=Destination(int(d), host, key).redacted_key,
                pending=n,
                leased=leased_by_dest.get(int(d), 0),
                backoff_until=iso_utc(not_before) if not_before > now else None,
                failures=int(failures),
                last_error=err,
            )
        )
    in_spools = sum(w.messages for w in waiting.values())
    pending = sum(n for n, _ in per_dest.values()) + in_spools
    times = [t for t in (oldest, *(w.oldest for w in waiting.values())) if t is not None]
    oldest = min(times) if times else None
    return QueueStats(
        spooled=in_spools,
        pending=pending,
        leased=sum(leased_by_dest.values()),
        dead_letters=dead,
        bytes=int(sum(b for _, b in per_dest.values()) + sum(w.bytes for w in waiting.values())),
        oldest_age_seconds=None if oldest is None else max(0.0, round(now - oldest, 3)),
        dropped=dropped,
        last_error=None
        if last is None
        else {"message": last[1], "at": iso_utc(last[0]) or "", "host": last[2]},
        destinations=destinations,
    )
