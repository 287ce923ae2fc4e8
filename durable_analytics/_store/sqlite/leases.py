"""The lease records: taking a batch, the fence every settling call goes through, expiry.

A lease is one row of ``leases`` naming its message ids and its holder. Every function here
runs inside the caller's transaction on the given connection.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator

from durable_analytics._store.base import CLOCK_JUMP_MARGIN, MAX_BACKOFF_SECONDS, Destination, Lease

from . import bydest
from .holders import holder, lease_over

__all__ = [
    "ack_in",
    "chosen",
    "chunks",
    "held_ids",
    "leased_ids",
    "parse_ids",
    "reclaim",
    "release_in",
    "scan_leases",
    "settle",
    "store_backoff",
    "take",
]


def parse_ids(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


@functools.lru_cache(maxsize=1024)
def _id_set(text: str) -> frozenset[int]:
    # Every lease and poll reads every live lease's id list: each list is parsed once per
    # process, not once per scan (a list never changes but by being rewritten, and then
    # its text is new).
    return frozenset(parse_ids(text))


def chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def scan_leases(
    conn: sqlite3.Connection, lease_timeout: float, now_wall: float
) -> tuple[set[int], list[str]]:
    """The message ids under live leases, and the tokens of leases that are over."""
    now_mono = time.monotonic()
    leased: set[int] = set()
    dead: list[str] = []
    seen: dict[int, int | None] = {}  # one /proc probe per holder pid in this scan
    for token, ids, boot, pidns, pid, pstart, mono_exp, wall_exp in conn.execute(
        "SELECT token, ids, boot, pidns, pid, pstart, mono_expires, wall_expires FROM leases"
    ).fetchall():
        row = (boot, pidns, pid, pstart, mono_exp, wall_exp)
        if lease_over(lease_timeout, now_wall, now_mono, *row, seen=seen):
            dead.append(token)
        else:
            leased.update(_id_set(ids))
    return leased, dead


def leased_ids(conn: sqlite3.Connection) -> set[int]:
    """Every message id named by a lease record, live or not yet reclaimed."""
    leased: set[int] = set()
    for (ids,) in conn.execute("SELECT ids FROM leases").fetchall():
        leased.update(_id_set(ids))
    return leased


def reclaim(conn: sqlite3.Connection, lease_timeout: float, now_wall: float) -> set[int]:
    """End the leases that expired or lost their holder; return the ids still leased.

    A lease is one record naming its message ids, so ending it frees every message at
    once without touching (rewriting) the messages themselves.
    """
    leased, dead = scan_leases(conn, lease_timeout, now_wall)
    for token in dead:
        conn.execute("DELETE FROM leases WHERE token = ?", (token,))
    return leased


def take(
    conn: sqlite3.Connection,
    lease_timeout: float,
    max_messages: int,
    max_bytes: int,
    *,
    destination: int | None,
    up_to_id: int | None,
    now_wall: float,
    per_message_overhead: int,
    after_dest: int = 0,
    room: Callable[[], bool] | None = None,
) -> Lease | None:
    """Lease the oldest ready messages of one destination (see ``SqliteQueue.lease``).

    Destinations take turns: the ready ones are tried in id order starting after
    ``after_dest`` (the one this holder leased last), so a destination with a large or slow
    backlog does not hold back another's fresh messages. Each try reads that destination's
    next messages through the index by destination (``bydest``, whose tail of new messages
    is first folded into it once it is long): the cost is the batch, whatever other
    destinations hold. A destination that backs off is not read at all. ``room`` says
    whether the disk has room to extend the index (asked only when a fold is due; False:
    the disk is nearly full, see ``bydest.ROOM_BYTES``).
    """
    horizon = now_wall + MAX_BACKOFF_SECONDS + CLOCK_JUMP_MARGIN
    top = up_to_id if up_to_id is not None else (1 << 62)
    leased = reclaim(conn, lease_timeout, now_wall)
    mark = bydest.folded_mark(conn, room or _always)
    dests = {
        int(r[0]): r
        for r in conn.execute(
            "SELECT id, host, write_key, not_before, failures FROM destinations"
        ).fetchall()
    }
    ready = sorted(
        d
        for d, r in dests.items()
        if (r[3] <= now_wall or r[3] > horizon) and destination in (None, d)
    )
    turn = [d for d in ready if d > after_dest] + [d for d in ready if d <= after_dest]
    picked = None
    dest_id = 0
    for dest_id in turn:
        picked = _pick(
            conn,
            dest_id,
            leased,
            (top, now_wall, horizon, mark),
            max_messages,
            max_bytes,
            per_message_overhead,
        )
        if picked is not None:
            break
    if picked is None:
        return None
    ids, bodies, attempts = picked
    # 128 random bits in hex, as uuid4().hex gave, without building a UUID object.
    token = os.urandom(16).hex()
    me = holder()
    mono_expires = time.monotonic() + lease_timeout
    conn.execute(
        "INSERT INTO leases (token, dest, ids, count, boot, pidns, pid, pstart, "
        "mono_expires, wall_expires, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            token,
            dest_id,
            ",".join(map(str, ids)),
            len(ids),
            me.boot,
            me.pidns,
            me.pid,
            me.start,
            mono_expires,
            now_wall + lease_timeout,
            now_wall,
        ),
    )
    row = dests[dest_id]
    dest = Destination(dest_id, row[1], row[2])
    return Lease(token, dest, tuple(ids), tuple(bodies), attempts, mono_expires, int(row[4]))


#: Rows of batches in flight a lease's first page reads beyond its own (two of 20).
_COVERED = 40


def _always() -> bool:
    return True


def _pick(
    conn: sqlite3.Connection,
    dest_id: int,
    leased: set[int],
    window: tuple[int, float, float, int],
    max_messages: int,
    max_bytes: int,
    per_message_overhead: int,
) -> tuple[list[int], list[bytes], int] | None:
    """The ids, bodies and highest attempts of the batch ``take`` would lease from ``dest_id``."""
    top, now_wall, horizon, mark = window
    # Leased messages are skipped here rather than excluded in SQL: the query stays one
    # cached statement. They are the oldest of the destination's messages (the batches in
    # flight), so rows are read a page at a time, and a page that ends in a leased message
    # goes on after the run of leased ids that follows it: a lease reads about one page of
    # other batches' messages, not all of them (32 batches in flight made every lease read
    # and convert 640 rows). Bodies come with the page: at most a page of other batches'
    # bodies is read, and no second statement for the batch's own.
    if max_messages < 1:
        return None
    ids: list[int] = []
    bodies: list[bytes] = []
    total = 0
    attempts = 0
    after = 0
    # A page a batch of ``flush_at`` fits in; a larger batch (``max_batch_messages``) is read
    # in pages of ~100 so that the bytes budget stops it before it reads thousands of bodies.
    page = min(max_messages, 100) + 1
    # The first page also covers a few batches in flight (the oldest messages, read and
    # skipped): with one or two batches of ``flush_at`` out, as a delivery pass keeps them,
    # the batch comes from one statement instead of two. At most ``_COVERED`` rows more, so
    # that a page of large messages stays about a page.
    first = page + min(len(leased), _COVERED)
    while True:
        asked = first if after == 0 else page
        rows = bydest.rows_with_bodies(conn, dest_id, (top, now_wall, horizon), asked, mark, after)
        taken = len(ids)
        for row_id, size, row_attempts, body in rows:
            if row_id in leased:
                continue
            cost = int(size) + per_message_overhead
            if taken and (total + cost > max_bytes or taken >= max_messages):
                return ids, bodies, attempts
            ids.append(row_id)
            bodies.append(bytes(body))  # the same object for a BLOB (a damaged file: text)
            taken += 1
            total += cost
            attempts = max(attempts, int(row_attempts))
        if len(rows) < asked:
            break  # nothing more is ready
        after = rows[-1][0]
        while after + 1 in leased:
            after += 1
    return (ids, bodies, attempts) if ids else None


def held_ids(conn: sqlite3.Connection, lease: Lease) -> list[int] | None:
    """The ids ``lease`` still holds, or None once it has ended or been taken over.

    This is the fence: a lease record names the ids its holder has not yet acked,
    released or dead-lettered, and every operation works only on those, so a stale
    holder can never touch a message it no longer holds (nor a new message that
    reused the id of one it acked).
    """
    row = conn.execute("SELECT ids FROM leases WHERE token = ?", (lease.token,)).fetchone()
    return None if row is None else parse_ids(row[0])


def settle(conn: sqlite3.Connection, lease: Lease, held: list[int], done: set[int]) -> None:
    """Remove ``done`` from the lease record, ending the lease when nothing is left."""
    left = [i for i in held if i not in done]
    if left:
        conn.execute(
            "UPDATE leases SET ids = ?, count = ? WHERE token = ?",
            (",".join(map(str, left)), len(left), lease.token),
        )
    else:
        conn.execute("DELETE FROM leases WHERE token = ?", (lease.token,))


def chosen(held: list[int], ids: Iterable[int] | None) -> list[int]:
    """The held ids among ``ids`` (all of them when None)."""
    if ids is None:
        return held
    wanted = set(ids)
    return [i for i in held if i in wanted]


def ended_whole(conn: sqlite3.Connection, lease: Lease) -> bool:
    """End the lease if it still holds every message it took; whether it did.

    One statement for the usual settlement (the whole batch at once), where ``held_ids``
    and ``settle`` take two: the record's id list is compared as text with the one the
    lease was taken with (ids are only ever removed from it, so equal text means all held).
    """
    cur = conn.execute(
        "DELETE FROM leases WHERE token = ? AND ids = ?",
        (lease.token, ",".join(map(str, lease.ids))),
    )
    return cur.rowcount > 0


def ack_in(conn: sqlite3.Connection, lease: Lease, wanted: list[int] | None) -> int:
    """Delete the chosen messages the lease still holds; returns how many."""
    if (wanted is None or set(wanted) >= set(lease.ids)) and ended_whole(conn, lease):
        return _delete_messages(conn, list(lease.ids))
    held = held_ids(conn, lease)
    if held is None:
        return 0
    picked = chosen(held, wanted)
    deleted = _delete_messages(conn, picked)
    settle(conn, lease, held, set(picked))
    return deleted


def _delete_messages(conn: sqlite3.Connection, picked: list[int]) -> int:
    if picked and max(picked) - min(picked) + 1 == len(picked) == len(set(picked)):
        # Every id of the range is in the batch (the usual case: a batch is a run of ids),
        # so the range deletes exactly the batch, walking the leaf pages in order instead
        # of one lookup per id.
        return int(
            conn.execute(
                "DELETE FROM messages WHERE id BETWEEN ? AND ?", (min(picked), max(picked))
            ).rowcount
        )
    deleted = 0
    for chunk in chunks(picked, 500):
        deleted += conn.execute(
            f"DELETE FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk
        ).rowcount
    return deleted


def release_in(
    conn: sqlite3.Connection,
    lease: Lease,
    not_before: float | None,
    wanted: list[int] | None,
    bump: int,
) -> int:
    """Hand the chosen messages the lease still holds back; returns how many."""
    held = held_ids(conn, lease)
    if held is None:
        return 0
    picked = chosen(held, wanted)
    released = 0
    if not_before is not None or bump:
        for chunk in chunks(picked, 500):
            released += conn.execute(
                "UPDATE messages SET not_before = ?, attempts = attempts + ? "
                f"WHERE id IN ({','.join('?' * len(chunk))})",
                (not_before, bump, *chunk),
            ).rowcount
    else:
        for chunk in chunks(picked, 500):
            released += conn.execute(
                f"SELECT count(*) FROM messages WHERE id IN ({','.join('?' * len(chunk))})",
                chunk,
            ).fetchone()[0]
    settle(conn, lease, held, set(picked))
    return int(released)


def store_backoff(
    conn: sqlite3.Connection, dest_id: int, until: float, error: str | None, now: float
) -> None:
    """Record one more failure of ``dest_id`` and hold it back until ``until``."""
    horizon = now + MAX_BACKOFF_SECONDS + CLOCK_JUMP_MARGIN
    # A stored not_before beyond the horizon is a leftover of a wall clock that jumped
    # back; lease() ignores it, so it must not outvote the new backoff either.
    conn.execute(
        "UPDATE destinations SET not_before = CASE WHEN not_before > ? THEN ? "
        "ELSE max(not_before, ?) END, failures = failures + 1,"
        " last_error = coalesce(?, last_error), last_error_at = CASE WHEN ? IS NULL "
        "THEN last_error_at ELSE ? END WHERE id = ?",
        (horizon, until, until, error, error, now, dest_id),
    )
