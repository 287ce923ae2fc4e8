"""Appending to the SQLite queue: commits, concurrency, busy locks, the size cap, a full disk.

Each test's name states the behaviour it proves. Child processes are real (``start_python``,
``os.fork``); the heavier multi-process runs live in tests/reliability/.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import start_python

from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics.exceptions import (
    QueueBusy,
    QueueDiskFull,
    QueueError,
)

from .sqlite_helpers import (
    HOST,
    KEY,
    body,
    fill,
    fresh_rows,
    index,
)

# --------------------------------------------------------------------------- append


def test_append_commits_before_returning(queue: Queue, dest: int, queue_path: Path) -> None:
    for i in range(3):
        row_id = queue.append(dest, body(i))
        # A brand-new connection (another process's view) sees the row at once.
        rows = fresh_rows(queue_path)
        assert rows[-1][0] == row_id
        assert bytes(rows[-1][1]) == body(i)
        assert len(rows) == i + 1


def test_append_returns_increasing_row_ids(queue: Queue, dest: int) -> None:
    ids = fill(queue, dest, 10)
    assert all(i > 0 for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == 10


def test_threads_appending_at_once_all_commit(queue: Queue, dest: int) -> None:
    errors: list[BaseException] = []

    def produce(t: int) -> None:
        try:
            for n in range(300):
                queue.append(dest, body(t * 1000 + n))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = sorted(index(b) for b in queue.bodies())
    assert got == sorted(t * 1000 + n for t in range(4) for n in range(300))


@pytest.mark.parametrize(("durability", "level"), [("normal", 1), ("full", 2)])
def test_durability_sets_the_synchronous_level_of_every_connection(
    queue_path: Path, durability: Any, level: int
) -> None:
    q = Queue(queue_path, durability=durability)
    levels = [q._conn().execute("PRAGMA synchronous").fetchone()[0]]

    def other_thread() -> None:
        levels.append(q._conn().execute("PRAGMA synchronous").fetchone()[0])

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert levels == [level, level]
    q.close()


def test_append_raises_queue_busy_when_another_writer_holds_the_lock_too_long(
    queue_path: Path,
) -> None:
    q = Queue(queue_path, busy_timeout=0.2)
    dest_id = q.destination(HOST, KEY)
    q.append(dest_id, body(0))  # the first append measures the file; the next is the hot path
    blocker = sqlite3.connect(str(queue_path), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(QueueBusy, match="locked"):
            q.append(dest_id, body(1))
        assert 0.15 <= time.monotonic() - started < 5
        with pytest.raises(QueueBusy):
            q.lease(10, 1_000_000)
        # Readers are not blocked by a writer (WAL).
        assert q.pending() == 1
        assert q.stats().pending == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert q.append(dest_id, body(2)) > 0
    assert [index(b) for b in q.bodies()] == [0, 2]
    q.close()


def test_append_waits_for_a_short_lock_held_by_another_process(queue_path: Path) -> None:
    q = Queue(queue_path)
    dest_id = q.destination(HOST, KEY)
    q.append(dest_id, body(0))
    holder = start_python(
        """
        import sqlite3, sys, time
        conn = sqlite3.connect(sys.argv[1], isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        print("locked", flush=True)
        time.sleep(0.3)
        conn.execute("COMMIT")
        """,
        str(queue_path),
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        assert q.append(dest_id, body(1)) > 0  # waited for the lock instead of failing
    finally:
        holder.communicate(timeout=30)
    assert holder.returncode == 0
    q.close()


def test_closed_queue_refuses_calls_with_queue_error(queue_path: Path) -> None:
    q = Queue(queue_path)
    dest_id = q.destination(HOST, KEY)
    q.close()
    with pytest.raises(QueueError, match="closed"):
        q.append(dest_id, body(1))


# --------------------------------------------------------------------------- max_queue_bytes


CAP = 3 * 1024 * 1024


def test_drop_newest_cap_returns_0_and_counts_exactly_the_dropped(queue_path: Path) -> None:
    q = Queue(queue_path, max_queue_bytes=CAP, overflow="drop_newest")
    dest_id = q.destination(HOST, KEY)
    results = [q.append(dest_id, body(i, pad=1000)) for i in range(6000)]
    zeros = results.count(0)
    kept = len(results) - zeros
    assert 0 < zeros < len(results)
    # The oldest are kept: once full, the newest are refused.
    first_zero = results.index(0)
    assert all(results[:first_zero])
    s = q.stats()
    assert s.dropped == zeros
    assert s.pending == kept
    assert s.bytes <= CAP
    q.close()

    conn = sqlite3.connect(str(queue_path))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert queue_path.stat().st_size <= CAP + 1024 * 1024

    reopened = Queue(queue_path, max_queue_bytes=CAP, overflow="drop_newest")
    assert reopened.stats().dropped == zeros  # the counter is on disk
    assert reopened.append(reopened.destination(HOST, KEY), body(1, pad=1000)) == 0
    assert reopened.stats().dropped == zeros + 1
    reopened.close()


def test_drop_newest_cap_accepts_again_after_messages_are_delivered(queue_path: Path) -> None:
    q = Queue(queue_path, max_queue_bytes=1024 * 1024, overflow="drop_newest")
    dest_id = q.destination(HOST, KEY)
    results = [q.append(dest_id, body(i, pad=1000)) for i in range(2000)]
    assert results[-1] == 0
    while (lease := q.lease(100, 10_000_000)) is not None:
        q.ack(lease)
    assert q.append(dest_id, body(1, pad=1000)) > 0
    q.close()


def test_drop_oldest_cap_keeps_appending_and_drops_the_oldest_unleased_exactly(
    queue_path: Path,
) -> None:
    q = Queue(queue_path, max_queue_bytes=CAP, overflow="drop_oldest")
    dest_id = q.destination(HOST, KEY)
    early = fill(q, dest_id, 10, pad=1000)
    held = q.lease(5, 10_000_000)  # leased messages are never dropped
    assert held is not None
    assert list(held.ids) == early[:5]
    appended = 10
    for i in range(10, 6000):
        assert q.append(dest_id, body(i, pad=1000)) > 0
        appended += 1
    s = q.stats()
    assert s.dropped > 0
    assert s.dropped == appended - s.pending
    assert s.bytes <= CAP
    left = [index(b) for b in q.bodies()]
    assert left[:5] == [0, 1, 2, 3, 4]  # the leased ones survived
    assert left[-1] == 5999  # the newest is kept
    survivors = left[5:]
    assert survivors == list(range(survivors[0], 6000))  # only the oldest went
    assert q.ack(held) == 5
    q.close()

    reopened = Queue(queue_path, max_queue_bytes=CAP, overflow="drop_oldest")
    assert reopened.stats().dropped == s.dropped
    reopened.close()


def test_drop_counters_of_both_policies_add_up(queue_path: Path) -> None:
    q = Queue(queue_path, max_queue_bytes=1024 * 1024, overflow="drop_newest")
    dest_id = q.destination(HOST, KEY)
    newest = [q.append(dest_id, body(i, pad=1000)) for i in range(1500)].count(0)
    q.close()
    q2 = Queue(queue_path, max_queue_bytes=1024 * 1024, overflow="drop_oldest")
    for i in range(200):
        assert q2.append(dest_id, body(i, pad=1000)) > 0
    s = q2.stats()
    assert s.dropped == newest + (1500 - newest + 200 - s.pending)
    q2.close()


# --------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("max_queue_bytes", [1 << 30, 1 << 20], ids=["hot-path", "capped-path"])
def test_disk_full_raises_queue_disk_full_keeps_committed_and_recovers(
    queue_path: Path, max_queue_bytes: int
) -> None:
    q = Queue(queue_path, max_queue_bytes=max_queue_bytes)
    dest_id = q.destination(HOST, KEY)
    fill(q, dest_id, 5)
    conn = q._conn()  # the connection this thread appends through
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 8}")

    committed = 5
    raised: QueueDiskFull | None = None
    for i in range(5, 1000):
        try:
            q.append(dest_id, body(i, pad=1500))
        except QueueDiskFull as exc:
            raised = exc
            break
        committed += 1
    assert raised is not None
    assert isinstance(raised, OSError)
    assert "full" in str(raised)
    assert "not stored" in str(raised)
    assert 5 < committed < 1000
    with pytest.raises(QueueDiskFull):  # still full: still refused, cleanly
        q.append(dest_id, body(committed, pad=1500))

    rows = fresh_rows(queue_path)
    assert [index(bytes(b)) for _, b in rows] == list(range(committed))
    assert q.integrity_check() == "ok"

    conn.execute("PRAGMA max_page_count = 1073741823")
    assert q.append(dest_id, body(committed, pad=1500)) > 0
    lease = q.lease(10_000, 100_000_000)
    assert lease is not None
    assert [index(b) for b in lease.bodies] == list(range(committed + 1))
    q.close()
