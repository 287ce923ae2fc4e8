"""Reading the in-memory queue: which batch to lease, what is ready, the stats.

Pure functions of the queue's rows; ``MemoryQueue`` calls them under its lock.
"""

from __future__ import annotations

from durable_analytics._store.base import (
    CLOCK_JUMP_MARGIN,
    MAX_BACKOFF_SECONDS,
    Destination,
    DestinationStats,
    QueueStats,
    iso_utc,
)

from .records import Dest, LeaseRecord, Message

__all__ = ["next_ready", "ready_times", "select_batch", "stats"]


def _horizon(now: float) -> float:
    return now + MAX_BACKOFF_SECONDS + CLOCK_JUMP_MARGIN


def _ready(not_before: float | None, now: float, horizon: float) -> bool:
    # A time beyond the horizon is the leftover of a wall clock that jumped back.
    return not_before is None or not_before <= now or not_before > horizon


def select_batch(
    messages: dict[int, Message],
    dests: dict[int, Dest],
    leased: set[int],
    max_messages: int,
    max_bytes: int,
    *,
    destination: int | None,
    top: int,
    now: float,
    per_message_overhead: int,
) -> tuple[int | None, list[int], list[bytes], int]:
    """The oldest ready messages of one destination: ``(destination, ids, bodies, attempts)``.

    The first message is always taken; the destination is None when nothing is ready.
    """
    horizon = _horizon(now)
    ready = {
        d
        for d, rec in dests.items()
        if _ready(rec.not_before, now, horizon) and destination in (None, d)
    }
    chosen: int | None = None
    ids: list[int] = []
    bodies: list[bytes] = []
    total = attempts = 0
    for row_id, msg in messages.items():
        if len(ids) >= max_messages or row_id > top:
            break
        if (
            row_id in leased
            or msg.dest not in ready
            or chosen not in (None, msg.dest)
            or not _ready(msg.not_before, now, horizon)
        ):
            continue
        cost = len(msg.body) + per_message_overhead
        if ids and total + cost > max_bytes:
            break
        chosen = msg.dest
        ids.append(row_id)
        bodies.append(msg.body)
        total += cost
        attempts = max(attempts, msg.attempts)
    return chosen, ids, bodies, attempts


def next_ready(
    messages: dict[int, Message],
    dests: dict[int, Dest],
    leased: set[int],
    top: int,
    now: float,
    destination: int | None = None,
) -> float | None:
    """The earliest time an unleased message up to ``top`` (of ``destination`` when given) may
    be leased (clock jumps: now)."""
    horizon = _horizon(now)
    best: float | None = None
    for row_id, msg in messages.items():
        if row_id > top:
            break
        if row_id in leased or (destination is not None and msg.dest != destination):
            continue
        own = msg.not_before or 0.0
        shared = dests[msg.dest].not_before if msg.dest in dests else 0.0
        at = max(0.0 if own > horizon else own, 0.0 if shared > horizon else shared)
        best = at if best is None else min(best, at)
    return best


def ready_times(
    messages: dict[int, Message], dests: dict[int, Dest], leased: set[int], limit: int, now: float
) -> list[float]:
    """The enqueue times of the ready messages among the oldest ``limit`` ready ones."""
    horizon = _horizon(now)
    times: list[float] = []
    for row_id, msg in messages.items():
        if len(times) >= limit:
            break
        dest = dests.get(msg.dest)
        if (
            row_id not in leased
            and dest is not None
            and _ready(dest.not_before, now, horizon)
            and _ready(msg.not_before, now, horizon)
        ):
            times.append(msg.enqueued_at)
    return times


def stats(
    messages: dict[int, Message],
    dests: dict[int, Dest],
    leases: dict[str, LeaseRecord],
    *,
    dead_letters: int,
    dropped: int,
    mono: float,
    now: float,
) -> QueueStats:
    """Counts and health of the queue (see ``QueueStats``)."""
    live = {i for rec in leases.values() if mono <= rec.mono_expires for i in rec.ids}
    count: dict[int, int] = {}
    leased: dict[int, int] = {}
    size = 0
    for row_id, msg in messages.items():
        count[msg.dest] = count.get(msg.dest, 0) + 1
        size += len(msg.body)
        if row_id in live:
            leased[msg.dest] = leased.get(msg.dest, 0) + 1
    oldest = min((m.enqueued_at for m in messages.values()), default=None)
    last: tuple[float, str, str] | None = None
    destinations = []
    for d, dest in dests.items():
        err, err_at = dest.last_error, dest.last_error_at
        # Only a destination still failing gives the queue's last error (see QueueStats).
        if (
            dest.failures
            and err is not None
            and err_at is not None
            and (last is None or err_at > last[0])
        ):
            last = (err_at, err, dest.host)
        destinations.append(
            DestinationStats(
                host=dest.host,
                write_key=Destination(d, dest.host, dest.write_key).redacted_key,
                pending=count.get(d, 0),
                leased=leased.get(d, 0),
                backoff_until=iso_utc(dest.not_before) if dest.not_before > now else None,
                failures=dest.failures,
                last_error=err,
            )
        )
    return QueueStats(
        pending=len(messages),
        leased=sum(leased.values()),
        dead_letters=dead_letters,
        bytes=size,
        oldest_age_seconds=None if oldest is None else max(0.0, round(now - oldest, 3)),
        dropped=dropped,
        last_error=None
        if last is None
        else {"message": last[1], "at": iso_utc(last[0]) or "", "host": last[2]},
        destinations=destinations,
    )
