"""The SQLite queue's index by destination (schema version 3, ``bydest.py``).

It is kept off the append path and folded in by leases and polls; these tests prove that it
never hides a message (ids reused, drops, dead letters, requeues, a v2 file migrated), that
a poll folds in a tail nobody leased, and that leasing one destination and polling cost the
same whatever another destination's backlog (counted in SQLite VM instructions, which do
not depend on the machine's load).
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from durable_analytics._store.sqlite import SCHEMA_VERSION, bydest
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite.schema import SCHEMA_V1, SCHEMA_V2

from .sqlite_helpers import HOST, KEY, OTHER_HOST, OTHER_KEY, body, index

BIG = 1 << 30


def _bulk(path: Path, dest: int, start: int, n: int) -> None:
    """Store ``n`` messages of ``dest`` as appends do (no index entry), in one transaction."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    now = time.time()
    rows = [(dest, body(i), len(body(i)), now) for i in range(start, start + n)]
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO messages (dest, body, size, enqueued_at) VALUES (?, ?, ?, ?)", rows
    )
    conn.execute("COMMIT")
    conn.close()


def _index_is_exact(path: Path) -> None:
    """Every message up to ``upto`` has its entry, and no entry names a missing message."""
    conn = sqlite3.connect(str(path))
    try:
        mark = bydest.upto(conn)
        missing = conn.execute(
            "SELECT count(*) FROM messages m WHERE m.id <= ? AND NOT EXISTS "
            "(SELECT 1 FROM dest_ids x WHERE x.dest = m.dest AND x.id = m.id)",
            (mark,),
        ).fetchone()[0]
        stale = conn.execute(
            "SELECT count(*) FROM dest_ids x WHERE NOT EXISTS "
            "(SELECT 1 FROM messages m WHERE m.id = x.id AND m.dest = x.dest)"
        ).fetchone()[0]
        beyond = conn.execute("SELECT count(*) FROM dest_ids WHERE id > ?", (mark,)).fetchone()[0]
    finally:
        conn.close()
    assert (missing, stale, beyond) == (0, 0, 0)


def _drain(q: Queue, now: float | None = None) -> list[tuple[int, int]]:
    """Lease and ack everything ready: ``(destination, index)`` of each message, in order."""
    out: list[tuple[int, int]] = []
    while (lease := q.lease(64, BIG, now=now)) is not None:
        out.extend((lease.destination.id, index(b)) for b in lease.bodies)
        q.ack(lease)
    return out


def test_appends_write_no_index_entry_and_a_lease_folds_in_a_long_tail(tmp_path: Path) -> None:
    """The append path stays one INSERT, and a flusher that keeps up never writes the index
    (its messages are acked while still in the tail); once the tail is longer than
    TAIL_ROWS, the next lease folds in FOLD_ROWS of it, in that lease's transaction, and a
    poll the rest (in transactions of FOLD_ROWS)."""
    path = tmp_path / "q.sqlite3"
    q = Queue(path)
    a = q.destination(HOST, KEY)
    conn = sqlite3.connect(str(path))
    for i in range(5):
        q.append(a, body(i))
    lease = q.lease(100, BIG)
    assert lease is not None
    assert q.ack(lease) == 5
    assert conn.execute("SELECT count(*) FROM dest_ids").fetchone()[0] == 0
    n = bydest.TAIL_ROWS + bydest.FOLD_ROWS + 5
    for i in range(n):
        q.append(a, body(i))
    assert conn.execute("SELECT count(*) FROM dest_ids").fetchone()[0] == 0
    lease = q.lease(2, BIG)
    assert lease is not None
    assert [index(b) for b in lease.bodies] == [0, 1]
    assert conn.execute("SELECT count(*) FROM dest_ids").fetchone()[0] == bydest.FOLD_ROWS
    q.ack(lease)
    writes: list[str] = []
    q._conn().set_trace_callback(
        lambda sql: writes.append(sql) if sql == "BEGIN IMMEDIATE" else None
    )
    q.ready_summary(20)  # the rest, a transaction per chunk
    q._conn().set_trace_callback(None)
    assert len(writes) >= (n - bydest.FOLD_ROWS) // bydest.FOLD_ROWS  # chunks, not one
    assert conn.execute("SELECT count(*) FROM dest_ids").fetchone()[0] == n - 2
    assert bydest.upto(conn) == q.max_id()
    conn.close()
    _index_is_exact(path)
    q.close()


def test_ids_reused_after_the_newest_messages_went_are_never_hidden(tmp_path: Path) -> None:
    """SQLite gives a new row max(id) + 1: once the newest indexed messages are acked, new
    messages take their ids again. They are not mistaken for indexed ones: every one is
    leased, counted and delivered once."""
    path = tmp_path / "q.sqlite3"
    q = Queue(path)
    a = q.destination(HOST, KEY)
    b = q.destination(OTHER_HOST, OTHER_KEY)
    n = bydest.TAIL_ROWS + 3
    first = [q.append(b, body(i)) for i in range(n)]  # long enough to be indexed
    assert [i for _, i in _drain(q)] == list(range(n))
    again = [q.append(a, body(i)) for i in range(10, 13)]
    assert again == first[:3]  # the same ids, handed out again
    assert q.pending(destination=a) == 3
    assert q.pending(destination=b) == 0
    assert _drain(q) == [(a, 10), (a, 11), (a, 12)]
    _index_is_exact(path)
    q.close()


def test_random_operations_keep_the_index_exact_and_lose_or_repeat_nothing(
    tmp_path: Path,
) -> None:
    """Appends to three destinations, leases, acks, releases, dead letters, requeues and
    drop_oldest at a small cap, in a seeded random order: after each step the index is
    exact and the counts match the table; at the end every message still queued is
    delivered exactly once and each one appended is accounted for (delivered, dead, or
    dropped)."""
    path = tmp_path / "q.sqlite3"
    q = Queue(path, max_queue_bytes=96 * 1024, overflow="drop_oldest", max_queue_size=300)
    dests = [q.destination(f"https://h{n}.example.test", KEY) for n in range(3)]
    rng = random.Random(20261130)
    appended = 0
    delivered: list[int] = []
    held = []
    for _ in range(600):
        op = rng.random()
        if op < 0.55:
            q.append(rng.choice(dests), body(appended, pad=rng.choice((0, 300, 900))))
            appended += 1
        elif op < 0.7:
            lease = q.lease(rng.randint(1, 20), BIG, destination=rng.choice([None, *dests]))
            if lease is not None:
                held.append(lease)
        elif op < 0.8 and held:
            lease = held.pop(rng.randrange(len(held)))
            q.ack(lease)
            delivered.extend(index(b) for b in lease.bodies)
        elif op < 0.87 and held:
            q.release(held.pop(rng.randrange(len(held))), count_attempt=False)
        elif op < 0.94 and held:
            lease = held.pop(rng.randrange(len(held)))
            q.dead_letter(lease, lease.ids[:1], status=400, reason="bad")
            q.release(lease, count_attempt=False)
        elif op < 0.97:
            q.requeue_dead_letters()
        _index_is_exact(path)
        check = sqlite3.connect(str(path))
        for d in dests:
            want = check.execute("SELECT count(*) FROM messages WHERE dest = ?", (d,))
            assert q.pending(destination=d) == want.fetchone()[0]
        check.close()
    for lease in held:
        q.release(lease, count_attempt=False)
    rest = [i for _, i in _drain(q)]
    assert len(rest) == len(set(rest))
    dead = [index(x.body) for x in q.dead_letters()]
    dropped = q.stats().dropped
    everything = delivered + rest + dead
    assert len(everything) == len(set(everything))  # nothing twice
    assert len(everything) + dropped == appended  # nothing lost
    q.close()


def _v2_file(path: Path) -> None:
    """A queue file as durable-analytics with schema version 2 left it: two destinations,
    A backing off with a backlog (some of it waiting out a retry), B's messages after it,
    and dead letters."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA_V1 + SCHEMA_V2)
    conn.execute("PRAGMA user_version=2")
    until = time.time() + 300
    conn.execute(
        "INSERT INTO destinations (id, host, write_key, not_before, failures, last_error, "
        "last_error_at) VALUES (1, ?, ?, ?, 3, 'HTTP 503', ?)",
        (HOST, KEY, until, time.time()),
    )
    conn.execute(
        "INSERT INTO destinations (id, host, write_key) VALUES (2, ?, ?)", (OTHER_HOST, KEY)
    )
    for i in range(250):
        b = body(i)
        waiting = until if i < 20 else None
        conn.execute(
            "INSERT INTO messages (dest, body, size, enqueued_at, attempts, not_before) "
            "VALUES (1, ?, ?, 0, ?, ?)",
            (b, len(b), 1 if waiting else 0, waiting),
        )
    for i in range(250, 280):
        b = body(i)
        conn.execute(
            "INSERT INTO messages (dest, body, size, enqueued_at) VALUES (2, ?, ?, 0)", (b, len(b))
        )
    for i in range(280, 284):
        b = body(i)
        conn.execute(
            "INSERT INTO dead_letters (dest, body, size, enqueued_at, dead_at, attempts, status, "
            "reason, excerpt) VALUES (2, ?, ?, 0, 0, 1, 400, 'rejected', 'bad')",
            (b, len(b)),
        )
    conn.close()


def test_a_version_2_file_with_a_backlog_backoff_and_dead_letters_migrates_whole(
    tmp_path: Path,
) -> None:
    """Opening a v2 file migrates it to version 3 in place: every message is indexed and
    kept (250 of A, 30 of B, counted), A's backoff and failures and the dead letters are
    kept; B is leased at once while A backs off, and after A's backoff and the requeue
    of the dead letters every one of the 284 messages is delivered exactly once."""
    path = tmp_path / "v2.sqlite3"
    _v2_file(path)
    q = Queue(path)
    check = sqlite3.connect(str(path))
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert check.execute("SELECT count(*) FROM dest_ids").fetchone()[0] == 280
    check.close()
    _index_is_exact(path)
    assert (q.pending(), q.pending(destination=1), q.pending(destination=2)) == (280, 250, 30)
    assert q.backoff(1)[1] == 3
    assert q.stats().dead_letters == 4
    first = _drain(q)
    assert first == [(2, i) for i in range(250, 280)]  # A still backs off
    assert q.lease(64, BIG) is None
    later = time.time() + 301
    second = _drain(q, now=later)
    assert second == [(1, i) for i in range(250)]
    assert q.requeue_dead_letters() == 4
    third = _drain(q, now=later)
    assert third == [(2, i) for i in range(280, 284)]
    everything = [i for _, i in first + second + third]
    assert sorted(everything) == list(range(284))
    assert q.pending() == 0
    _index_is_exact(path)
    q.close()


def test_a_poll_folds_in_a_tail_nobody_leased(tmp_path: Path) -> None:
    """With every destination backing off nobody leases; producers keep appending. The
    flusher's polls fold the new messages into the index (a bounded chunk each), so the
    tail a poll reads stays short."""
    path = tmp_path / "q.sqlite3"
    q = Queue(path)
    a = q.destination(HOST, KEY)
    q.set_backoff(a, time.time() + 300, "HTTP 503")
    _bulk(path, a, 0, 3 * bydest.CATCH_UP_ROWS)
    conn = sqlite3.connect(str(path))
    assert bydest.tail(conn) == 3 * bydest.CATCH_UP_ROWS
    for _ in range(3):
        assert q.ready_summary(100) == (0, None)
    assert bydest.tail(conn) <= bydest.TAIL_ROWS
    conn.close()
    _index_is_exact(path)
    q.close()


def _vm_steps(q: Queue, work: Callable[[], Any]) -> int:
    """SQLite VM instructions ``work`` runs on this thread's connection (a measure of the
    rows it reads that does not depend on the machine's speed or load)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn = q._conn()
    conn.set_progress_handler(count, 1)
    try:
        work()
    finally:
        conn.set_progress_handler(None, 1)
    return steps


def _behind_backlog(tmp_path: Path, backlog: int) -> tuple[int, int]:
    """(lease B's batch, one idle poll) in VM instructions, A backing off behind ``backlog``."""
    path = tmp_path / f"q-{backlog}.sqlite3"
    q = Queue(path)
    a = q.destination(HOST, KEY)
    b = q.destination(OTHER_HOST, OTHER_KEY)
    _bulk(path, a, 0, backlog)
    q.set_backoff(a, time.time() + 300, "HTTP 503")
    while q.lease(1, BIG) is not None:  # nothing of A is ready; each try folds in a chunk
        raise AssertionError("A backs off")
    while q.next_ready_at() is not None and bydest.tail(q._conn()):
        q.ready_summary(100)
    for i in range(100):
        q.append(b, body(backlog + i))

    def lease_b() -> None:
        lease = q.lease(100, BIG)
        assert lease is not None
        assert lease.destination.id == b
        assert len(lease.ids) == 100
        q.ack(lease)

    def idle_poll() -> None:
        assert q.ready_summary(100) == (0, None)
        assert q.next_ready_at() is not None
        assert q.lease(100, BIG) is None

    leasing = _vm_steps(q, lease_b)
    polling = _vm_steps(q, idle_poll)
    q.close()
    return leasing, polling


def test_leasing_and_polling_cost_the_same_behind_a_backlog_ten_times_larger(
    tmp_path: Path,
) -> None:
    """Leasing B's 100 messages and an idle poll (B empty, A backing off) run about the
    same number of SQLite instructions behind 2,000 and behind 20,000 messages of A: their
    cost does not grow with another destination's backlog (it grew tenfold before)."""
    small = _behind_backlog(tmp_path, 2_000)
    large = _behind_backlog(tmp_path, 20_000)
    assert large[0] < small[0] * 1.3
    assert large[1] < small[1] * 1.3


def _holds_others_steps(tmp_path: Path, backlog: int) -> tuple[int, int]:
    """(``holds_others([A])``, ``pending(destination=A)``) in VM instructions, A's
    ``backlog`` folded into the index, B with none."""
    path = tmp_path / f"h-{backlog}.sqlite3"
    q = Queue(path)
    a = q.destination(HOST, KEY)
    q.destination(OTHER_HOST, OTHER_KEY)
    _bulk(path, a, 0, backlog)
    while q._db.write(bydest.fold_chunk):
        pass
    assert bydest.tail(q._conn()) == 0
    looked = _vm_steps(q, lambda: q.holds_others([a]))
    counted = _vm_steps(q, lambda: q.pending(destination=a))
    assert not q.holds_others([a])
    q.close()
    return looked, counted


def test_holds_others_costs_the_same_behind_a_backlog_ten_times_larger(tmp_path: Path) -> None:
    """What the flusher asks while ``flush()`` delivers one destination: a seek per other
    destination, where counting (what it asked before) grows with the backlog."""
    small = _holds_others_steps(tmp_path, 2_000)
    large = _holds_others_steps(tmp_path, 20_000)
    assert large[0] < small[0] * 1.3
    assert large[1] > small[1] * 5  # the count it replaced does grow


def test_holds_others_reads_the_tail_and_says_maybe_past_tail_look(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Messages not folded into the index yet are looked at too, up to ``TAIL_LOOK`` rows;
    a longer tail answers True (other destinations may be there), never a wrong False."""
    monkeypatch.setattr(bydest, "TAIL_LOOK", 50)
    path = tmp_path / "q.sqlite3"
    q = Queue(path)
    a = q.destination(HOST, KEY)
    b = q.destination(OTHER_HOST, OTHER_KEY)
    _bulk(path, a, 0, 40)
    assert bydest.tail(q._conn()) == 40
    assert not q.holds_others([a])
    _bulk(path, b, 40, 1)
    assert q.holds_others([a])
    assert not q.holds_others([a, b])
    _bulk(path, a, 41, 20)  # 61 rows in the tail: past the look
    assert q.holds_others([a, b])
    q.close()


def test_holds_others_finds_a_message_whose_destination_has_no_row(tmp_path: Path) -> None:
    """``pending`` counts every message, whatever its destination's row says; so does
    ``holds_others``, in the index (seeks over ``dest_ids`` itself) and in the tail: a
    message of a destination id with no row (a damaged file, an append with a bad id) is
    another destination's."""
    path = tmp_path / "q.sqlite3"
    q = Queue(path)
    a = q.destination(HOST, KEY)
    _bulk(path, 99, 0, 1)  # no destination 99
    _bulk(path, a, 1, 10)
    assert q.pending() == 11
    assert q.holds_others([a])  # in the tail
    while q._db.write(bydest.fold_chunk):
        pass
    assert bydest.tail(q._conn()) == 0
    assert q.holds_others([a])  # in the index only
    assert not q.holds_others([a, 99])
    _bulk(path, 99, 11, 1)
    assert q.holds_others([a])  # and in the tail again
    q.close()
