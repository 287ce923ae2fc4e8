"""Unit behaviour of the SQLite queue (durable_analytics._queue).

Each test's name states the behaviour it proves. Tests that need another process use real
child processes (``start_python``) or ``os.fork``; the heavier multi-process runs live in
tests/reliability/test_queue_processes.py.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import freezegun
import freezegun.api
import pytest
from conftest import run_python, start_python

from durable_analytics._queue import (
    MAX_BACKOFF_SECONDS,
    SCHEMA_VERSION,
    Queue,
)
from durable_analytics.exceptions import (
    QueueBusy,
    QueueCorrupt,
    QueueDiskFull,
    QueueError,
    QueuePermissionError,
    QueueVersionError,
)

HOST = "https://api.example.test"
KEY = "wk_SECRET_write_key_0123456789"
OTHER_HOST = "https://eu.example.test"
OTHER_KEY = "wk_OTHER_write_key_9876543210"


def _permission_bits_enforced() -> bool:
    """False as root (or with CAP_DAC_OVERRIDE): then chmod cannot deny us anything."""
    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe"
        probe.write_text("x")
        probe.chmod(0o400)
        try:
            with probe.open("a"):
                return False
        except PermissionError:
            return True


NO_PERMISSIONS = not _permission_bits_enforced()
ROOT_REASON = "running as root: root bypasses file permission bits, so chmod cannot deny it"


def body(i: int, pad: int = 0, **extra: Any) -> bytes:
    """A serialized message that names its index (and anything in ``extra``)."""
    msg = {"type": "track", "event": "E", "messageId": f"m-{i}", "properties": {"i": i, **extra}}
    if pad:
        msg["properties"]["pad"] = "x" * pad
    return json.dumps(msg, separators=(",", ":")).encode()


def body_of_size(i: int, size: int) -> bytes:
    """A message body of exactly ``size`` bytes."""
    base = body(i, pad=1)
    out = body(i, pad=1 + size - len(base))
    assert len(out) == size
    return out


def index(b: bytes) -> int:
    return int(json.loads(b)["properties"]["i"])


def fresh_rows(path: Path, sql: str = "SELECT id, body FROM messages ORDER BY id") -> list[Any]:
    """Read through a brand-new connection, as another process would."""
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
def queue(queue_path: Path) -> Iterator[Queue]:
    q = Queue(queue_path)
    yield q
    q.close()


@pytest.fixture
def dest(queue: Queue) -> int:
    return queue.destination(HOST, KEY)


def fill(queue: Queue, dest_id: int, n: int, start: int = 0, pad: int = 0) -> list[int]:
    return [queue.append(dest_id, body(i, pad)) for i in range(start, start + n)]


# --------------------------------------------------------------------------- schema and files


def test_new_file_gets_schema_version_and_wal_journal(queue_path: Path) -> None:
    Queue(queue_path).close()
    conn = sqlite3.connect(str(queue_path))
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"messages", "destinations", "leases", "dead_letters", "counters"} <= tables
    finally:
        conn.close()


def test_reopening_an_existing_queue_keeps_its_messages(queue_path: Path) -> None:
    q = Queue(queue_path)
    ids = fill(q, q.destination(HOST, KEY), 3)
    q.close()
    q2 = Queue(queue_path)
    assert [index(b) for b in q2.bodies()] == [0, 1, 2]
    assert q2.max_id() == ids[-1]
    q2.close()


def test_newer_schema_version_raises_version_error_and_leaves_file_untouched(
    queue_path: Path,
) -> None:
    conn = sqlite3.connect(str(queue_path))
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, future_column TEXT)")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    os.chmod(queue_path, 0o640)
    before = queue_path.read_bytes()

    with pytest.raises(QueueVersionError) as info:
        Queue(queue_path)

    message = str(info.value)
    assert str(queue_path) in message
    assert f"version {SCHEMA_VERSION + 1}" in message
    assert "newer" in message
    assert "upgrade" in message
    assert queue_path.read_bytes() == before  # not even switched to WAL
    assert not Path(f"{queue_path}-wal").exists()
    assert stat.S_IMODE(queue_path.stat().st_mode) == 0o640  # not ours: mode left alone


@pytest.mark.parametrize(
    "content",
    [
        os.urandom(8192),
        b"this is a text file, not a database\n" * 200,
        b"hello\n",
        b"SQLite format 3\x00" + os.urandom(4080),
    ],
    ids=["random-bytes", "long-text", "short-text", "sqlite-header-then-garbage"],
)
def test_non_sqlite_file_raises_queue_corrupt_and_is_left_untouched(
    queue_path: Path, content: bytes
) -> None:
    queue_path.write_bytes(content)
    os.chmod(queue_path, 0o600)
    with pytest.raises(QueueCorrupt) as info:
        Queue(queue_path)
    assert str(queue_path) in str(info.value)
    assert queue_path.read_bytes() == content


def test_sqlite_file_with_foreign_tables_and_version_0_raises_queue_corrupt_untouched(
    queue_path: Path,
) -> None:
    conn = sqlite3.connect(str(queue_path))
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers (name) VALUES ('ada')")
    conn.commit()
    conn.close()
    before = queue_path.read_bytes()

    with pytest.raises(QueueCorrupt, match="not a durable-analytics queue"):
        Queue(queue_path)

    assert queue_path.read_bytes() == before
    assert not Path(f"{queue_path}-wal").exists()
    assert fresh_rows(queue_path, "SELECT name FROM customers") == [("ada",)]


def test_empty_existing_file_becomes_a_queue(queue_path: Path) -> None:
    queue_path.touch(mode=0o600)
    q = Queue(queue_path)
    assert q.append(q.destination(HOST, KEY), body(1)) > 0
    q.close()


def test_queue_path_that_is_a_directory_raises_permission_error(queue_path: Path) -> None:
    queue_path.mkdir(mode=0o700)
    with pytest.raises(QueuePermissionError, match="not a regular file"):
        Queue(queue_path)


def test_queue_directory_that_is_a_file_raises_permission_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "plainfile"
    not_a_dir.write_text("x")
    with pytest.raises(QueuePermissionError):
        Queue(not_a_dir / "queue.sqlite3")


def test_queue_directory_that_cannot_be_created_raises_permission_error(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(QueuePermissionError, match="cannot create the queue directory"):
        Queue(blocker / "sub" / "queue.sqlite3")


def test_queue_permission_error_is_a_permission_error() -> None:
    assert issubclass(QueuePermissionError, PermissionError)
    assert issubclass(QueuePermissionError, QueueError)


@pytest.mark.skipif(NO_PERMISSIONS, reason=ROOT_REASON)
def test_read_only_queue_file_raises_permission_error(queue_path: Path) -> None:
    Queue(queue_path).close()
    os.chmod(queue_path, 0o400)
    try:
        with pytest.raises(QueuePermissionError, match="not readable and writable"):
            Queue(queue_path)
    finally:
        os.chmod(queue_path, 0o600)


@pytest.mark.skipif(NO_PERMISSIONS, reason=ROOT_REASON)
def test_read_only_queue_directory_raises_permission_error(queue_path: Path) -> None:
    Queue(queue_path).close()
    for suffix in ("-wal", "-shm"):
        Path(f"{queue_path}{suffix}").unlink(missing_ok=True)
    os.chmod(queue_path.parent, 0o500)
    try:
        with pytest.raises(QueuePermissionError, match="not writable"):
            Queue(queue_path)
    finally:
        os.chmod(queue_path.parent, 0o700)


def test_symlinked_queue_path_is_refused(queue_path: Path) -> None:
    real = queue_path.parent / "real.sqlite3"
    Queue(real).close()
    queue_path.symlink_to(real)
    with pytest.raises(QueuePermissionError, match="symlink"):
        Queue(queue_path)


def test_dangling_symlink_queue_path_is_refused_and_nothing_is_created(
    queue_path: Path,
) -> None:
    target = queue_path.parent / "elsewhere.sqlite3"
    queue_path.symlink_to(target)
    with pytest.raises(QueuePermissionError, match="symlink"):
        Queue(queue_path)
    assert not target.exists()


def test_world_writable_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(QueuePermissionError, match="writable by other users"):
        Queue(shared / "queue.sqlite3")
    assert not (shared / "queue.sqlite3").exists()


def test_new_files_are_0600_and_created_directories_0700_regardless_of_umask(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a" / "b" / "c" / "queue.sqlite3"
    old = os.umask(0)
    try:
        q = Queue(path)
        dest_id = q.destination(HOST, KEY)
        fill(q, dest_id, 5)
        lease = q.lease(10, 10_000)
        assert lease is not None
        q.ack(lease)
        modes = {
            p: stat.S_IMODE(os.stat(p).st_mode)
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
        }
        dirs = {d: stat.S_IMODE(os.stat(d).st_mode) for d in (path.parents[0], path.parents[1])}
        dirs[path.parents[2]] = stat.S_IMODE(os.stat(path.parents[2]).st_mode)
        q.close()
    finally:
        os.umask(old)
    assert modes == dict.fromkeys(modes, 0o600), modes
    assert dirs == dict.fromkeys(dirs, 0o700), dirs


def test_existing_queue_file_more_permissive_than_0600_is_narrowed(queue_path: Path) -> None:
    q = Queue(queue_path)
    q.append(q.destination(HOST, KEY), body(1))
    for p in (queue_path, Path(f"{queue_path}-wal"), Path(f"{queue_path}-shm")):
        os.chmod(p, 0o644)
    q2 = Queue(queue_path)
    for p in (queue_path, Path(f"{queue_path}-wal"), Path(f"{queue_path}-shm")):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    q2.close()
    q.close()


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


# --------------------------------------------------------------------------- lease


def test_lease_takes_the_oldest_messages_first(queue: Queue, dest: int) -> None:
    ids = fill(queue, dest, 10)
    first = queue.lease(4, 1_000_000)
    second = queue.lease(4, 1_000_000)
    assert first is not None
    assert second is not None
    assert list(first.ids) == ids[:4]
    assert list(second.ids) == ids[4:8]
    assert [index(b) for b in first.bodies] == [0, 1, 2, 3]


def test_lease_never_takes_more_than_max_messages(queue: Queue, dest: int) -> None:
    fill(queue, dest, 25)
    sizes = []
    while (lease := queue.lease(7, 1_000_000)) is not None:
        sizes.append(len(lease))
    assert sizes == [7, 7, 7, 4]


@pytest.mark.parametrize(
    ("max_bytes", "expected"),
    [(1000, 10), (999, 9), (400, 4), (399, 3), (100, 1)],
)
def test_lease_never_exceeds_max_bytes_counting_size_plus_one_per_message(
    queue: Queue, dest: int, max_bytes: int, expected: int
) -> None:
    for i in range(10):
        queue.append(dest, body_of_size(i, 99))  # costs 99 + 1 = 100 bytes each
    lease = queue.lease(100, max_bytes)
    assert lease is not None
    assert len(lease) == expected
    assert sum(len(b) + 1 for b in lease.bodies) <= max_bytes
    assert lease.size == 99 * expected


def test_single_message_larger_than_the_budget_is_leased_alone(queue: Queue, dest: int) -> None:
    queue.append(dest, body_of_size(0, 5000))
    queue.append(dest, body_of_size(1, 100))
    lease = queue.lease(100, 1000)
    assert lease is not None
    assert [index(b) for b in lease.bodies] == [0]
    nxt = queue.lease(100, 1000)
    assert nxt is not None
    assert [index(b) for b in nxt.bodies] == [1]


def test_batches_never_mix_destinations(queue: Queue) -> None:
    a = queue.destination(HOST, KEY)
    b = queue.destination(OTHER_HOST, OTHER_KEY)
    c = queue.destination(HOST, OTHER_KEY)  # same host, another key: another destination
    assert len({a, b, c}) == 3
    owner = {}
    for i in range(60):
        d = (a, b, c)[i % 3 if i % 5 else 0]
        owner[i] = d
        queue.append(d, body(i))
    seen: list[int] = []
    first = True
    while (lease := queue.lease(8, 1_000_000)) is not None:
        idx = [index(x) for x in lease.bodies]
        assert {owner[i] for i in idx} == {lease.destination.id}
        assert idx == sorted(idx)
        if first:  # the batch of the oldest ready message goes first
            assert idx[0] == 0
            first = False
        seen.extend(idx)
    assert sorted(seen) == list(range(60))


def test_lease_reports_its_destination_host_and_key(queue: Queue) -> None:
    d = queue.destination(OTHER_HOST, OTHER_KEY)
    queue.append(d, body(1))
    lease = queue.lease(10, 10_000)
    assert lease is not None
    assert lease.destination.id == d
    assert lease.destination.host == OTHER_HOST
    assert lease.destination.write_key == OTHER_KEY
    assert lease.destination.redacted_key == OTHER_KEY[:4] + "…"


def test_destination_ids_are_stable_and_shared_across_queue_objects(queue_path: Path) -> None:
    q1 = Queue(queue_path)
    q2 = Queue(queue_path)
    assert q1.destination(HOST, KEY) == q2.destination(HOST, KEY)
    assert q1.destination(HOST, KEY) != q2.destination(OTHER_HOST, KEY)
    q1.close()
    q2.close()


def test_leased_messages_are_not_leased_again_while_the_lease_is_live(
    queue: Queue, dest: int, queue_path: Path
) -> None:
    fill(queue, dest, 5)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    assert len(lease) == 5
    assert queue.lease(10, 1_000_000) is None
    other = Queue(queue_path)  # another connection of this (live) process
    assert other.lease(10, 1_000_000) is None
    assert other.reclaim_expired() == 0
    other.close()
    queue.append(dest, body(99))
    nxt = queue.lease(10, 1_000_000)
    assert nxt is not None
    assert [index(b) for b in nxt.bodies] == [99]


def test_lease_destination_filter_takes_only_that_destination(queue: Queue) -> None:
    a = queue.destination(HOST, KEY)
    b = queue.destination(OTHER_HOST, OTHER_KEY)
    queue.append(a, body(0))
    queue.append(b, body(1))
    queue.append(a, body(2))
    lease = queue.lease(10, 1_000_000, destination=b)
    assert lease is not None
    assert [index(x) for x in lease.bodies] == [1]
    assert queue.lease(10, 1_000_000, destination=b) is None
    rest = queue.lease(10, 1_000_000, destination=a)
    assert rest is not None
    assert [index(x) for x in rest.bodies] == [0, 2]


def test_lease_up_to_id_filter_takes_only_messages_stored_up_to_that_id(
    queue: Queue, dest: int
) -> None:
    ids = fill(queue, dest, 6)
    lease = queue.lease(10, 1_000_000, up_to_id=ids[2])
    assert lease is not None
    assert list(lease.ids) == ids[:3]
    assert queue.lease(10, 1_000_000, up_to_id=ids[2]) is None
    assert queue.pending(up_to_id=ids[2]) == 3
    assert queue.pending() == 6


def test_lease_of_an_empty_queue_or_zero_messages_is_none(queue: Queue, dest: int) -> None:
    assert queue.lease(10, 1_000_000) is None
    queue.append(dest, body(1))
    assert queue.lease(0, 1_000_000) is None
    assert queue.lease(1, 1_000_000) is not None


def test_destination_in_backoff_yields_nothing_until_its_time(queue: Queue) -> None:
    a = queue.destination(HOST, KEY)
    b = queue.destination(OTHER_HOST, OTHER_KEY)
    queue.append(a, body(0))
    queue.append(b, body(1))
    now = time.time()
    queue.set_backoff(a, now + 30, "HTTP 503")
    assert queue.backoff(a)[0] == pytest.approx(now + 30)
    assert queue.backoff(a)[1] == 1

    held = queue.lease(10, 1_000_000, now=now)
    assert held is not None
    assert held.destination.id == b  # the other destination is not held back
    queue.ack(held)
    assert queue.lease(10, 1_000_000, now=now) is None
    assert queue.lease(10, 1_000_000, now=now + 29.9) is None
    assert queue.next_ready_at() == pytest.approx(now + 30)
    later = queue.lease(10, 1_000_000, now=now + 30.1)
    assert later is not None
    assert [index(x) for x in later.bodies] == [0]


def test_clear_backoff_makes_the_destination_ready_again(queue: Queue, dest: int) -> None:
    queue.append(dest, body(0))
    queue.set_backoff(dest, time.time() + 300, "HTTP 500")
    assert queue.lease(10, 1_000_000) is None
    queue.clear_backoff(dest)
    assert queue.backoff(dest) == (0.0, 0)
    assert queue.lease(10, 1_000_000) is not None


def test_backoff_far_beyond_max_backoff_is_ignored_as_a_clock_jump(queue: Queue, dest: int) -> None:
    queue.append(dest, body(0))
    now = time.time()
    # Only a wall clock that jumped back explains a not_before this far ahead.
    queue.set_backoff(dest, now + MAX_BACKOFF_SECONDS + 3600, "HTTP 500")
    lease = queue.lease(10, 1_000_000, now=now)
    assert lease is not None
    assert queue.ready_summary(10, now)[0] == 0  # leased now
    queue.release(lease, None)
    assert queue.ready_summary(10, now)[0] == 1
    assert queue.next_ready_at() is not None
    assert queue.next_ready_at() <= time.time()  # type: ignore[operator]


def test_backoff_within_max_backoff_is_honoured(queue: Queue, dest: int) -> None:
    queue.append(dest, body(0))
    now = time.time()
    queue.set_backoff(dest, now + MAX_BACKOFF_SECONDS, "HTTP 500")
    assert queue.lease(10, 1_000_000, now=now) is None


def test_new_backoff_replaces_a_far_future_leftover_of_a_clock_jump(
    queue: Queue, dest: int
) -> None:
    queue.append(dest, body(0))
    now = time.time()
    queue.set_backoff(dest, now + 10 * 3600, "before the clock jumped back")
    queue.set_backoff(dest, now + 30, "HTTP 503")
    assert queue.backoff(dest)[0] == pytest.approx(now + 30)
    assert queue.lease(10, 1_000_000, now=now) is None
    assert queue.lease(10, 1_000_000, now=now + 31) is not None


def test_longer_backoff_is_never_shortened_by_a_shorter_one(queue: Queue, dest: int) -> None:
    now = time.time()
    queue.set_backoff(dest, now + 120)
    queue.set_backoff(dest, now + 10)
    assert queue.backoff(dest) == (pytest.approx(now + 120), 2)


def test_retry_later_backs_off_by_the_shared_failure_count_and_releases_in_one_step(
    queue: Queue, dest: int
) -> None:
    fill(queue, dest, 3)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    queue.set_backoff(dest, 0.0, "another holder failed first")  # failures = 1
    seen: list[int] = []

    def delay(failures: int) -> float:
        seen.append(failures)
        return 42.0

    before = time.time()
    until = queue.retry_later(lease, delay, "HTTP 503")
    assert seen == [2]  # the other holder's failure counts
    assert before + 42.0 <= until <= time.time() + 42.0
    assert queue.backoff(dest) == (pytest.approx(until), 2)
    assert queue.live_leases() == 0
    assert queue.lease(10, 1_000_000, now=until - 1) is None
    again = queue.lease(10, 1_000_000, now=until + 1)
    assert again is not None
    assert again.attempts == 1
    assert [index(b) for b in again.bodies] == [0, 1, 2]


def test_ack_clears_the_destinations_backoff_in_the_same_step(queue: Queue, dest: int) -> None:
    fill(queue, dest, 2)
    lease = queue.lease(1, 1_000_000)
    assert lease is not None
    queue.set_backoff(dest, time.time() + 300, "HTTP 500")
    assert queue.ack(lease) == 1
    assert queue.backoff(dest) == (0.0, 0)
    assert queue.lease(10, 1_000_000) is not None


# --------------------------------------------------------------------------- ack and fencing


def test_ack_deletes_only_the_leases_messages(queue: Queue, dest: int) -> None:
    fill(queue, dest, 10)
    lease = queue.lease(4, 1_000_000)
    other = queue.lease(3, 1_000_000)
    assert lease is not None
    assert other is not None
    assert queue.ack(lease) == 4
    assert sorted(index(b) for b in queue.bodies()) == list(range(4, 10))
    assert queue.ack(lease) == 0  # a second ack changes nothing
    assert queue.pending() == 6
    assert queue.ack(other) == 3
    assert queue.live_leases() == 0


def test_ack_of_some_ids_keeps_the_rest_under_the_lease(queue: Queue, dest: int) -> None:
    ids = fill(queue, dest, 4)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    assert queue.ack(lease, ids[:2]) == 2
    assert queue.ack(lease, [12345]) == 0  # not in the queue at all
    assert queue.lease(10, 1_000_000) is None  # the rest is still leased
    assert queue.stats().leased == 2
    assert queue.ack(lease, ids[2:]) == 2
    assert queue.live_leases() == 0


def test_stale_holder_cannot_ack_release_or_dead_letter_after_a_takeover(
    queue_path: Path,
) -> None:
    stale_q = Queue(queue_path, lease_timeout=0.05)
    new_q = Queue(queue_path, lease_timeout=60)
    dest_id = stale_q.destination(HOST, KEY)
    ids = fill(stale_q, dest_id, 5)
    stale = stale_q.lease(10, 1_000_000)
    assert stale is not None
    time.sleep(0.1)  # the stale lease expires (monotonic clock)
    current = new_q.lease(10, 1_000_000)
    assert current is not None
    assert list(current.ids) == ids
    assert current.token != stale.token

    assert stale_q.ack(stale) == 0
    assert stale_q.ack(stale, ids[:1]) == 0
    assert stale_q.release(stale, time.time() + 300) == 0
    assert stale_q.dead_letter(stale, ids, status=400, reason="bad", excerpt="{}") == 0
    assert new_q.pending() == 5
    assert new_q.dead_letters() == []
    assert new_q.lease(10, 1_000_000) is None  # still held by the new holder
    assert new_q.stats().leased == 5

    assert new_q.dead_letter(current, ids[:1], status=400, reason="bad data") == 1
    assert new_q.release(current, None, ids=ids[1:2]) == 1
    assert new_q.ack(current) == 3
    assert new_q.pending() == 1
    assert len(new_q.dead_letters()) == 1
    assert new_q.live_leases() == 0
    stale_q.close()
    new_q.close()


def test_extend_keeps_a_lease_alive_and_reports_a_lost_one(queue_path: Path) -> None:
    q = Queue(queue_path, lease_timeout=0.5)
    dest_id = q.destination(HOST, KEY)
    fill(q, dest_id, 2)
    lease = q.lease(10, 1_000_000)
    assert lease is not None
    leased_at = time.monotonic()
    for _ in range(3):
        time.sleep(0.2)
        assert q.extend(lease)
    assert time.monotonic() - leased_at > 0.5  # past the first expiry ...
    assert q.lease(10, 1_000_000) is None  # ... and still held
    time.sleep(0.6)
    taken = q.lease(10, 1_000_000)
    assert taken is not None
    assert not q.extend(lease)
    q.close()


# --------------------------------------------------------------------------- release


def test_release_with_not_before_is_not_leased_again_before_then(queue: Queue, dest: int) -> None:
    fill(queue, dest, 3)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    assert lease.attempts == 0
    now = time.time()
    assert queue.release(lease, now + 60) == 3
    assert queue.live_leases() == 0
    assert queue.lease(10, 1_000_000, now=now) is None
    assert queue.lease(10, 1_000_000, now=now + 59) is None
    assert queue.next_ready_at() == pytest.approx(now + 60)
    again = queue.lease(10, 1_000_000, now=now + 60.5)
    assert again is not None
    assert len(again) == 3
    assert again.attempts == 1
    queue.release(again, None)
    third = queue.lease(10, 1_000_000)
    assert third is not None
    assert third.attempts == 2


def test_release_without_counting_an_attempt(queue: Queue, dest: int) -> None:
    fill(queue, dest, 1)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    queue.release(lease, None, count_attempt=False)
    again = queue.lease(10, 1_000_000)
    assert again is not None
    assert again.attempts == 0


def test_released_messages_keep_their_order(queue: Queue, dest: int) -> None:
    fill(queue, dest, 6)
    lease = queue.lease(3, 1_000_000)
    assert lease is not None
    queue.release(lease, None)
    again = queue.lease(10, 1_000_000)
    assert again is not None
    assert [index(b) for b in again.bodies] == list(range(6))


# --------------------------------------------------------------------------- dead letters


def test_dead_letter_moves_messages_with_status_reason_and_excerpt(queue: Queue, dest: int) -> None:
    ids = fill(queue, dest, 3)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    moved = queue.dead_letter(
        lease, [ids[1]], status=400, reason="HTTP 400: invalid", excerpt='{"error":"bad"}'
    )
    assert moved == 1
    assert queue.ack(lease) == 2
    assert queue.pending() == 0
    letters = queue.dead_letters()
    assert len(letters) == 1
    dl = letters[0]
    assert dl.status == 400
    assert dl.reason == "HTTP 400: invalid"
    assert dl.excerpt == '{"error":"bad"}'
    assert dl.body == body(1)
    assert dl.type == "track"
    assert dl.event == "E"
    assert dl.message_id == "m-1"
    assert dl.attempts == 1
    assert dl.host == HOST
    assert dl.write_key == KEY[:4] + "…"
    assert KEY not in repr(dl)
    assert dl.as_dict()["body"]["properties"]["i"] == 1
    assert queue.stats().dead_letters == 1
    assert queue.dead_letters([dl.id]) == [dl]
    assert queue.dead_letters([dl.id + 1000]) == []
    assert queue.dead_letters([]) == []


def test_dead_letter_truncates_long_reasons_and_excerpts(queue: Queue, dest: int) -> None:
    queue.append(dest, body(0))
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    queue.dead_letter(lease, lease.ids, status=413, reason="r" * 5000, excerpt="e" * 50_000)
    dl = queue.dead_letters()[0]
    assert len(dl.reason) <= 500
    assert len(dl.excerpt) <= 2000


def test_requeue_dead_letters_puts_all_or_chosen_ones_back(queue: Queue, dest: int) -> None:
    fill(queue, dest, 4)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    assert queue.dead_letter(lease, lease.ids, status=422, reason="bad") == 4
    letters = queue.dead_letters()
    assert [index(d.body) for d in letters] == [0, 1, 2, 3]

    assert queue.requeue_dead_letters([letters[2].id]) == 1
    assert [index(b) for b in queue.bodies()] == [2]
    assert queue.requeue_dead_letters([]) == 0
    assert queue.requeue_dead_letters() == 3
    assert queue.dead_letters() == []
    assert sorted(index(b) for b in queue.bodies()) == [0, 1, 2, 3]
    again = queue.lease(10, 1_000_000)
    assert again is not None
    assert len(again) == 4
    assert again.attempts == 0  # a requeued message starts over


def test_purge_dead_letters_deletes_all_or_chosen_ones(queue: Queue, dest: int) -> None:
    fill(queue, dest, 3)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    queue.dead_letter(lease, lease.ids, status=400, reason="bad")
    letters = queue.dead_letters()
    assert queue.purge_dead_letters([letters[0].id]) == 1
    assert len(queue.dead_letters()) == 2
    assert queue.purge_dead_letters() == 2
    assert queue.dead_letters() == []
    assert queue.pending() == 0
    assert queue.stats().dead_letters == 0


# --------------------------------------------------------------------------- stats


def test_stats_counts_pending_leased_dead_letters_bytes_and_age(queue: Queue, dest: int) -> None:
    empty = queue.stats()
    assert (empty.pending, empty.leased, empty.dead_letters, empty.bytes) == (0, 0, 0, 0)
    assert empty.oldest_age_seconds is None
    assert empty.dropped == 0
    assert empty.last_error is None

    bodies = [body(i, pad=i * 10) for i in range(6)]
    for i, b in enumerate(bodies):
        queue.append(dest, b, enqueued_at=time.time() - 100 + i)
    lease = queue.lease(2, 1_000_000)
    assert lease is not None
    dead = queue.lease(1, 1_000_000)
    assert dead is not None
    queue.dead_letter(dead, dead.ids, status=400, reason="bad")

    s = queue.stats()
    assert s.pending == 5  # leased messages are still pending
    assert s.leased == 2
    assert s.dead_letters == 1
    assert s.bytes == sum(len(b) for i, b in enumerate(bodies) if i != 2)
    assert s.oldest_age_seconds is not None
    assert 99 <= s.oldest_age_seconds <= 110
    assert len(s.destinations) == 1
    d = s.destinations[0]
    assert (d.host, d.pending, d.leased) == (HOST, 5, 2)
    assert set(s.as_dict()) == {
        "pending",
        "leased",
        "dead_letters",
        "bytes",
        "oldest_age_seconds",
        "dropped",
        "last_error",
        "destinations",
    }


def test_stats_leased_counts_only_rows_under_live_leases(queue_path: Path) -> None:
    q = Queue(queue_path, lease_timeout=0.05)
    dest_id = q.destination(HOST, KEY)
    ids = fill(q, dest_id, 5)
    lease = q.lease(10, 1_000_000)
    assert lease is not None
    assert q.stats().leased == 5
    q.ack(lease, ids[:2])
    assert q.stats().leased == 3  # the acked ones are gone, not leased
    time.sleep(0.1)
    s = q.stats()  # expired, not yet reclaimed by anyone: no longer leased
    assert (s.pending, s.leased) == (3, 0)
    assert s.destinations[0].leased == 0
    q.close()


def test_stats_last_error_and_backoff_after_set_backoff(queue: Queue) -> None:
    a = queue.destination(HOST, KEY)
    b = queue.destination(OTHER_HOST, OTHER_KEY)
    queue.set_backoff(a, time.time() + 60, "HTTP 503 from the server")
    time.sleep(0.01)
    queue.set_backoff(b, time.time() + 60, "connection refused")
    s = queue.stats()
    assert s.last_error is not None
    assert s.last_error["message"] == "connection refused"
    assert s.last_error["host"] == OTHER_HOST
    assert s.last_error["at"].endswith("+00:00")
    by_host = {d.host: d for d in s.destinations}
    assert by_host[HOST].last_error == "HTTP 503 from the server"
    assert by_host[HOST].failures == 1
    assert by_host[HOST].backoff_until is not None
    queue.clear_backoff(a)
    assert {d.host: d for d in queue.stats().destinations}[HOST].backoff_until is None


def test_stats_destinations_show_a_redacted_key_and_never_the_full_key(queue: Queue) -> None:
    d = queue.destination(HOST, KEY)
    queue.append(d, body(0))
    lease = queue.lease(1, 1_000_000)
    assert lease is not None
    s = queue.stats()
    assert s.destinations[0].write_key == KEY[:4] + "…"
    assert s.destinations[0].write_key == "wk_S…"
    for text in (repr(s), str(s), json.dumps(s.as_dict()), repr(lease), repr(queue)):
        assert KEY not in text
        assert KEY[4:] not in text


def test_short_write_key_is_fully_redacted(queue: Queue) -> None:
    queue.destination(HOST, "abc")
    assert queue.stats().destinations[0].write_key == "…"


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


# --------------------------------------------------------------------------- lease holders

HOLDER = """
import sys, time
from durable_analytics._queue import Queue
q = Queue(sys.argv[1], lease_timeout=float(sys.argv[2]))
lease = q.lease(1000, 10_000_000)
print("leased", len(lease), lease.expires_monotonic, flush=True)
time.sleep(120)
"""


def start_holder(path: Path, lease_timeout: float) -> tuple[subprocess.Popen[str], float]:
    """A live child process holding a lease on every message; returns it and its expiry."""
    proc = start_python(HOLDER, str(path), str(lease_timeout))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("leased"):
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the holder did not lease: {line!r} {err}")
    _, _, expires = line.split()
    return proc, float(expires)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_lease_of_a_killed_holder_is_reclaimed_at_once(queue_path: Path) -> None:
    q = Queue(queue_path, lease_timeout=60)
    dest_id = q.destination(HOST, KEY)
    ids = fill(q, dest_id, 10)
    proc, _ = start_holder(queue_path, 60)
    try:
        assert q.lease(100, 10_000_000) is None
        assert q.stats().leased == 10
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lease = q.lease(100, 10_000_000)  # no waiting out the 60 s lease_timeout
        assert lease is not None
        assert list(lease.ids) == ids
    finally:
        stop(proc)
        q.close()


def test_reclaim_expired_frees_a_killed_holders_lease(queue_path: Path) -> None:
    q = Queue(queue_path, lease_timeout=60)
    fill(q, q.destination(HOST, KEY), 3)
    proc, _ = start_holder(queue_path, 60)
    try:
        assert q.reclaim_expired() == 0
        proc.kill()
        proc.wait()
        assert q.reclaim_expired() == 1
        assert q.stats().leased == 0
        assert q.ready_summary(10)[0] == 3
    finally:
        stop(proc)
        q.close()


def test_lease_of_a_live_holder_is_not_reclaimed_before_expiry(queue_path: Path) -> None:
    q = Queue(queue_path, lease_timeout=0.01)  # the reader's own timeout does not matter
    fill(q, q.destination(HOST, KEY), 5)
    proc, _ = start_holder(queue_path, 60)
    try:
        time.sleep(0.1)
        assert q.lease(100, 10_000_000) is None
        assert q.reclaim_expired() == 0
        assert q.stats().leased == 5
    finally:
        stop(proc)
        q.close()


def test_wall_clock_jump_forward_does_not_expire_a_live_holders_lease(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = Queue(queue_path)
    fill(q, q.destination(HOST, KEY), 5)
    proc, _ = start_holder(queue_path, 30)
    try:
        real_time = time.time
        # Only the wall clock jumps (freezegun would move time.monotonic too).
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
        assert q.lease(100, 10_000_000) is None
        assert q.reclaim_expired() == 0
        assert q.stats().leased == 5
        monkeypatch.setattr(time, "time", lambda: real_time() + 86400 * 365)
        assert q.lease(100, 10_000_000) is None
    finally:
        monkeypatch.undo()
        stop(proc)
        q.close()


def test_wall_clock_jump_back_does_not_keep_an_expired_lease_alive(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = Queue(queue_path)
    fill(q, q.destination(HOST, KEY), 5)
    proc, expires = start_holder(queue_path, 0.3)
    try:
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
        time.sleep(max(0.0, expires - time.monotonic()) + 0.05)
        lease = q.lease(100, 10_000_000)  # the holder is alive, but its lease ran out
        assert lease is not None
        assert len(lease) == 5
    finally:
        monkeypatch.undo()
        stop(proc)
        q.close()


def test_wall_clock_jump_under_freezegun_tick_does_not_steal_a_live_lease(
    queue_path: Path,
) -> None:
    q = Queue(queue_path)
    fill(q, q.destination(HOST, KEY), 2)
    proc, _ = start_holder(queue_path, 30)
    try:
        with freezegun.freeze_time("2099-01-01", tick=True):
            # freezegun fakes time.monotonic too (as wall-clock seconds), which no real clock
            # does; give the monotonic clock back (freezegun restores it on exit).
            time.monotonic = freezegun.api.real_monotonic
            assert time.time() > 4e9
            assert q.lease(100, 10_000_000) is None
            assert q.stats().leased == 2
    finally:
        stop(proc)
        q.close()


def test_lease_without_boot_id_expires_by_wall_clock_ignoring_implausible_expiries(
    queue: Queue, dest: int, queue_path: Path
) -> None:
    """A lease from a system without /proc boot ids: only the wall clock can expire it."""
    fill(queue, dest, 2)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    conn = sqlite3.connect(str(queue_path), isolation_level=None)
    now = time.time()
    conn.execute(
        "UPDATE leases SET boot = '', wall_expires = ? WHERE token = ?", (now + 30, lease.token)
    )
    assert queue.lease(10, 1_000_000) is None  # not expired yet
    assert queue.lease(10, 1_000_000, now=now + 31) is not None  # expired by the wall clock
    lease2 = queue.lease(10, 1_000_000, now=now + 31)
    assert lease2 is None
    queue.append(dest, body(5))
    fresh = queue.lease(10, 1_000_000)
    assert fresh is not None
    conn.execute(
        "UPDATE leases SET boot = '', wall_expires = ? WHERE token = ?",
        (now + 100 * 3600, fresh.token),
    )
    conn.close()
    # An expiry 100 h ahead with a 60 s lease_timeout: the wall clock jumped back.
    assert queue.lease(10, 1_000_000) is not None


def test_lease_of_another_boot_is_reclaimed_at_once(
    queue: Queue, dest: int, queue_path: Path
) -> None:
    fill(queue, dest, 2)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    conn = sqlite3.connect(str(queue_path), isolation_level=None)
    conn.execute("UPDATE leases SET boot = 'another-boot' WHERE token = ?", (lease.token,))
    conn.close()
    again = queue.lease(10, 1_000_000)
    assert again is not None
    assert again.ids == lease.ids


# --------------------------------------------------------------------------- fork


def _in_child(fn: Any) -> int:
    """Run ``fn`` in a forked child; return its exit status (0 = no exception)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_forked_child_appends_and_leases_with_its_own_connection(
    queue: Queue, dest: int, queue_path: Path
) -> None:
    fill(queue, dest, 10)
    assert queue.lease(3, 1_000_000) is not None  # the parent holds a lease on 0..2

    def child() -> None:
        for i in range(100, 150):
            assert queue.append(dest, body(i)) > 0
        lease = queue.lease(4, 1_000_000)
        assert lease is not None
        assert [index(b) for b in lease.bodies] == [3, 4, 5, 6]
        assert queue.ack(lease) == 4
        assert queue.integrity_check() == "ok"

    assert _in_child(child) == 0
    got = sorted(index(b) for b in queue.bodies())
    assert got == [0, 1, 2, 7, 8, 9, *range(100, 150)]
    assert queue.append(dest, body(200)) > 0  # the parent goes on after the fork
    assert queue.integrity_check() == "ok"
    assert fresh_rows(queue_path, "PRAGMA integrity_check") == [("ok",)]


def test_forked_child_commits_survive_the_parent_closing_and_another_process_exiting(
    queue_path: Path,
) -> None:
    """A fork child must hold its own SQLite locks, not rely on the parent's.

    When it inherited the parent's lock bookkeeping, another process closing the last
    connection deleted the WAL under the child, and every later commit of the child was lost.
    """
    q = Queue(queue_path)
    dest_id = q.destination(HOST, KEY)
    q.append(dest_id, body(0))
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            q.append(dest_id, body(1))
            os.write(ready_w, b"r")
            os.read(go_r, 1)
            for i in range(2, 102):
                q.append(dest_id, body(i))
            code = 0
        finally:
            os._exit(code)
    os.read(ready_r, 1)
    q.close()  # the parent lets go of the file
    other = run_python(
        """
        import sqlite3, sys
        conn = sqlite3.connect(sys.argv[1])
        print(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        conn.close()
        """,
        str(queue_path),
    )
    assert other.returncode == 0, other.stderr
    os.write(go_w, b"g")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for fd in (go_r, go_w, ready_r, ready_w):
        os.close(fd)
    check = run_python(
        """
        import sqlite3, sys
        conn = sqlite3.connect(sys.argv[1])
        print(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        print(conn.execute("PRAGMA integrity_check").fetchone()[0])
        """,
        str(queue_path),
    )
    assert check.stdout.split() == ["102", "ok"], check.stderr


def test_threads_of_the_parent_keep_working_across_forks(queue: Queue, dest: int) -> None:
    stop_flag = threading.Event()
    errors: list[BaseException] = []
    stored: list[int] = []

    def produce() -> None:
        n = 0
        try:
            while not stop_flag.is_set():
                stored.append(queue.append(dest, body(n)))
                n += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=produce)
    worker.start()
    try:
        for _ in range(5):
            assert _in_child(lambda: queue.append(dest, body(-1))) == 0
            time.sleep(0.01)
    finally:
        stop_flag.set()
        worker.join()
    assert errors == []
    assert queue.pending() == len(stored) + 5
    assert queue.integrity_check() == "ok"


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
