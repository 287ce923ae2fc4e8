"""The SQLite queue's -wal: checkpointed off the caller's thread, bounded by the cap, and a
reader that pins it named in a warning while appends follow the cap instead of growing it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from conftest import start_python

from durable_analytics._store.base import Lease
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite import wal as wal_module
from durable_analytics._store.sqlite.checkpoint import restart_log
from durable_analytics._store.sqlite.schema import SCHEMA_V1, SCHEMA_VERSION
from durable_analytics._store.sqlite.wal import WalBudget, log_frames, wal_bytes

from .sqlite_helpers import HOST, KEY, body_of_size, index

CAP = 2 * 1024 * 1024


def deliver_batches(q: Queue, batches: int) -> None:
    """Lease ``batches`` batches of 20 messages in turn and acknowledge each (what a
    delivering connection does); each must find messages to lease."""
    for _ in range(batches):
        lease = q.lease(20, 500_000)
        assert lease is not None
        q.ack(lease)


def _file_bytes(path: Path) -> int:
    return path.stat().st_size


def _wal_salt(path: Path) -> bytes:
    """The salts of the ``-wal``'s header: a restart of the log writes new ones."""
    with open(f"{path}-wal", "rb") as f:  # the -wal carries no lock of SQLite's
        return f.read(24)[16:24]


def test_producer_appends_leave_the_checkpoint_to_the_delivering_connection(
    tmp_path: Path,
) -> None:
    """Appends past the normal checkpoint size do not checkpoint on the caller's thread;
    the first lease/ack (a flusher's connection, here another thread) does, and the next
    append then restarts the log in the file it keeps: no truncation on the caller's
    thread. An idle poll of the delivering side then gives the file's space back."""
    path = tmp_path / "q.sqlite3"
    q = Queue(path, max_queue_bytes=64 * 1024 * 1024)
    budget = q.wal_budget
    dest = q.destination(HOST, KEY)
    frame = 4096 + 24
    # Each append commits at least one frame: 1.5 times the normal checkpoint size, well
    # under the producers' one.
    n = budget.normal_pages * 3 // 2
    for i in range(n):
        q.append(dest, body_of_size(i, 200))
    grown = wal_bytes(path)
    assert grown > budget.normal_pages * frame  # nobody checkpointed on the call path
    salt = _wal_salt(path)

    t = threading.Thread(target=deliver_batches, args=(q, 1))
    t.start()
    t.join()
    q.append(dest, body_of_size(n, 200))
    assert _wal_salt(path) != salt  # the append restarted the log...
    assert grown <= wal_bytes(path) <= budget.keep_limit  # ...in the file it kept
    assert q.pending() == n + 1 - 20

    def drain_then_poll() -> None:
        while (lease := q.lease(20, 500_000)) is not None:
            q.ack(lease)
        assert q.ready_summary(20)[0] == 0

    t = threading.Thread(target=drain_then_poll)
    t.start()
    t.join()
    assert wal_bytes(path) == 0  # idle: the file was given back
    assert q.pending() == 0
    q.close()


def test_an_idle_poll_gives_the_wal_back_at_most_once_a_while_and_never_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle TRUNCATE checkpoint runs only when the file is past its normal size, at
    most every ``SHRINK_EVERY``, and gives up at once when a reader of an older snapshot
    is in the way (the file stays; nothing is lost; the next idle poll tries again)."""
    path = tmp_path / "q.sqlite3"
    q = Queue(path)
    budget = q.wal_budget
    dest = q.destination(HOST, KEY)
    conn = grow_the_log(q, dest, budget.normal_pages * 2)
    assert wal_bytes(path) > budget.size_limit
    monkeypatch.setattr(wal_module, "SHRINK_EVERY", 3600.0)
    checkpoints: list[str] = []
    conn.set_trace_callback(
        lambda sql: checkpoints.append(sql) if "wal_checkpoint" in sql else None
    )
    reader = sqlite3.connect(str(path))
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM messages").fetchone()  # an older snapshot
    q.set_backoff(dest, time.time() + 300, "503")  # nothing ready: the polls are idle
    for _ in range(5):
        assert q.ready_summary(20)[0] == 0
    assert checkpoints == ["PRAGMA wal_checkpoint(TRUNCATE)"]  # once, not on every poll
    assert wal_bytes(path) > budget.size_limit  # the reader kept it; the poll returned
    reader.execute("COMMIT")
    reader.close()
    monkeypatch.setattr(wal_module, "SHRINK_EVERY", 0.0)
    assert q.ready_summary(20)[0] == 0
    conn.set_trace_callback(None)
    assert len(checkpoints) == 2
    assert wal_bytes(path) == 0
    assert q.pending() == budget.normal_pages * 2
    q.close()


def test_wal_stays_within_its_budget_through_a_fill_and_drain_cycle(tmp_path: Path) -> None:
    """With max_queue_bytes=2 MB: fill until the cap drops messages, then drain everything;
    the -wal never exceeds its budget (well under the cap) and the files on disk never
    exceed the cap plus that budget."""
    path = tmp_path / "q.sqlite3"
    q = Queue(path, max_queue_bytes=CAP)
    budget = WalBudget.for_cap(CAP)
    assert budget.allowance < CAP
    dest = q.destination(HOST, KEY)
    worst_wal = 0
    worst_total = 0
    stored = dropped = 0
    i = 0
    while dropped < 50:
        if q.append(dest, body_of_size(i, 3000)):
            stored += 1
        else:
            dropped += 1
        i += 1
        if i % 25 == 0:
            worst_wal = max(worst_wal, wal_bytes(path))
            worst_total = max(worst_total, wal_bytes(path) + _file_bytes(path))
    assert stored > 300  # the cap held about 2 MB of messages
    acked = 0

    def drain() -> None:
        nonlocal acked, worst_wal, worst_total
        while (lease := q.lease(20, 500_000)) is not None:
            acked += q.ack(lease)
            worst_wal = max(worst_wal, wal_bytes(path))
            worst_total = max(worst_total, wal_bytes(path) + _file_bytes(path))

    t = threading.Thread(target=drain)  # a flusher's thread, as in a Client
    t.start()
    t.join()
    assert acked == stored
    assert worst_wal <= budget.allowance
    assert worst_total <= CAP + budget.allowance
    assert q.stats().dropped == dropped
    q.close()


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
def test_a_reader_pinning_the_wal_is_named_and_the_cap_drops_new_messages(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, overflow: str
) -> None:
    """Another process holding a read transaction open keeps every checkpoint from
    resetting the -wal: appends go on until the files reach the cap, then new messages are
    dropped (counted) instead of growing the disk; a warning names the reader's pid, and
    stats show the -wal's size. Nothing stored before is lost."""
    path = tmp_path / "q.sqlite3"
    q = Queue(path, max_queue_bytes=CAP, overflow=overflow)  # type: ignore[arg-type]
    dest = q.destination(HOST, KEY)
    q.append(dest, body_of_size(0, 3000))
    reader = start_python(
        """
        import sqlite3, sys, time
        c = sqlite3.connect(sys.argv[1], isolation_level=None)
        c.execute("BEGIN")
        c.execute("SELECT count(*) FROM messages").fetchone()
        print("reading", flush=True)
        time.sleep(120)
        """,
        str(path),
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "reading"
        stored = 1
        dropped = 0
        worst_total = 0
        with caplog.at_level(logging.WARNING, logger="durable_analytics"):
            for i in range(1, 3000):
                if q.append(dest, body_of_size(i, 3000)):
                    stored += 1
                else:
                    dropped += 1
                worst_total = max(worst_total, wal_bytes(path) + _file_bytes(path))
        budget = q.wal_budget
        assert dropped > 0
        assert worst_total <= CAP + budget.allowance + 64 * 1024
        warnings = [r.getMessage() for r in caplog.records if "old snapshot" in r.getMessage()]
        assert warnings, "no warning about the pinned -wal"
        assert str(reader.pid) in warnings[0]
        stats = q.stats()
        assert stats.wal_bytes > budget.allowance
        assert stats.dropped == dropped
        assert stats.pending == stored
    finally:
        reader.kill()
        reader.wait()
    # The reader is gone: a flusher's next deliveries checkpoint and reset the log, and
    # appends are stored again.

    t = threading.Thread(target=deliver_batches, args=(q, 3))
    t.start()
    t.join()
    assert q.stats().wal_bytes <= q.wal_budget.allowance
    assert q.append(dest, body_of_size(10_000, 100))
    assert q.pending() == stored - 60 + 1
    q.close()


# --------------------------------------------------------------------------- destinations


def test_a_version_1_file_is_migrated_to_the_destination_indexes_with_its_messages(
    tmp_path: Path,
) -> None:
    """A queue file written by schema version 1 opens at the current version: its
    messages, leases' destinations and counters are kept, and the new indexes exist."""
    path = tmp_path / "v1.sqlite3"
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA_V1)
    conn.execute("PRAGMA user_version=1")
    conn.execute("INSERT INTO destinations (host, write_key) VALUES (?, ?)", (HOST, KEY))
    for i in range(30):
        b = body_of_size(i, 300)
        conn.execute(
            "INSERT INTO messages (dest, body, size, enqueued_at) VALUES (1, ?, ?, 0)",
            (b, len(b)),
        )
    conn.close()
    q = Queue(path)
    check = sqlite3.connect(str(path))
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    names = {r[0] for r in check.execute("SELECT name FROM sqlite_master")}
    check.close()
    assert {"messages_waiting", "dest_ids", "dest_ids_forget"} <= names
    lease = q.lease(20, 500_000)
    assert lease is not None
    assert lease.bodies == tuple(body_of_size(i, 300) for i in range(20))
    assert q.ack(lease) == 20
    assert q.pending() == 10
    q.close()


def test_destinations_take_turns_and_a_backed_off_backlog_is_not_read(tmp_path: Path) -> None:
    """With A's large backlog backing off, B's messages are leased, polled and summarised
    without A's; when both are ready, leases alternate between them (round-robin) instead of
    draining A's older backlog first."""
    q = Queue(tmp_path / "q.sqlite3")
    a = q.destination(HOST, KEY)
    b = q.destination("https://other.example.test", KEY)
    for i in range(200):
        q.append(a, body_of_size(i, 200))
    for i in range(200, 210):
        q.append(b, body_of_size(i, 200))
    q.set_backoff(a, time.time() + 300, "503")
    assert q.ready_summary(20)[0] == 10
    lease = q.lease(20, 500_000)
    assert lease is not None
    assert lease.destination.id == b
    q.ack(lease)
    # Only A is left, backing off: nothing ready; its next time is the backoff's end.
    assert q.lease(20, 500_000) is None
    assert q.ready_summary(20)[0] == 0
    next_at = q.next_ready_at()
    assert next_at is not None
    assert next_at > time.time() + 200
    q.clear_backoff(a)
    for i in range(300, 340):
        q.append(b, body_of_size(i, 200))
    order = []
    for _ in range(4):
        lease = q.lease(10, 500_000)
        assert lease is not None
        order.append(lease.destination.id)
        q.ack(lease)
    assert order in ([a, b, a, b], [b, a, b, a])
    q.close()


def grow_the_log(q: Queue, dest: int, messages: int) -> sqlite3.Connection:
    """Append ``messages`` of 2 KB in one transaction (the log grows past its normal size);
    returns the queue's connection of this thread."""
    conn = q._conn()
    conn.execute("BEGIN IMMEDIATE")
    for i in range(messages):
        conn.execute(
            "INSERT INTO messages (dest, body, size, enqueued_at) VALUES (?, ?, 2000, 0)",
            (dest, body_of_size(i, 2000)),
        )
    conn.execute("COMMIT")
    return conn


def test_a_restarted_log_in_a_long_file_is_not_checkpointed_after_every_lease_and_ack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a checkpoint has reset the ``-wal`` and the next commit restarted it, the file
    keeps its size (past the normal size) while the log holds only a few frames: leases
    and acks go on without checkpointing after each one, only after another normal size of
    log or ``CHECKPOINT_EVERY`` (counted, with the interval made long)."""
    monkeypatch.setattr(wal_module, "CHECKPOINT_EVERY", 3600.0)
    path = tmp_path / "q.sqlite3"
    q = Queue(path)
    budget = q.wal_budget
    dest = q.destination(HOST, KEY)
    # Grow the log well past the normal size in one transaction, then let a lease/ack
    # checkpoint it and the next commit restart it.
    conn = grow_the_log(q, dest, budget.normal_pages * 2)
    grown = wal_bytes(path)
    assert grown > budget.size_limit
    salt = _wal_salt(path)
    deliver_batches(q, 2)
    assert _wal_salt(path) != salt  # restarted...
    assert wal_bytes(path) >= grown  # ...in the file it kept: not cut back
    checkpoints: list[str] = []
    conn.set_trace_callback(
        lambda sql: checkpoints.append(sql) if "wal_checkpoint" in sql else None
    )
    cycles = 20  # ~2 pages a transaction: far below the normal size of 1000 pages
    deliver_batches(q, cycles)
    conn.set_trace_callback(None)
    assert checkpoints == []
    assert q.pending() == budget.normal_pages * 2 - 20 * (cycles + 2)
    q.close()


def test_the_log_is_counted_by_its_frames_in_a_file_kept_longer(tmp_path: Path) -> None:
    """``log_frames`` counts the frames of the current log, not the file's: after a
    restart into the kept file it reports a new generation and only the new frames; a
    missing ``-wal`` or one that is not a WAL file gives None (the size rule then)."""
    path = tmp_path / "q.sqlite3"
    assert log_frames(path) is None
    q = Queue(path)
    budget = q.wal_budget
    dest = q.destination(HOST, KEY)
    grow_the_log(q, dest, budget.normal_pages * 2)
    first = log_frames(path)
    assert first is not None
    frame = 4096 + 24
    assert first[1] == (wal_bytes(path) - 32) // frame  # every frame of the file is the log's
    deliver_batches(q, 2)  # a lease/ack checkpoints, the next commit restarts the log
    again = log_frames(path)
    assert again is not None
    assert again[0] != first[0]
    assert 0 < again[1] < 50  # the new log's few frames, in a file of thousands
    assert wal_bytes(path) >= (first[1] * frame)
    q.close()
    other = tmp_path / "garbage.sqlite3"
    Path(f"{other}-wal").write_bytes(b"not a write-ahead log" * 100)
    assert log_frames(other) is None


def test_a_restarted_log_in_a_long_file_is_checkpointed_once_it_grows_by_the_normal_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the file kept long after a restart, the delivering connection still checkpoints
    when the new log has grown by the normal size (counted by frames), not only every
    ``CHECKPOINT_EVERY`` (made long here): a producer appending without pause otherwise
    reached its own, larger checkpoint size on the caller's thread first."""
    monkeypatch.setattr(wal_module, "CHECKPOINT_EVERY", 3600.0)
    path = tmp_path / "q.sqlite3"
    q = Queue(path)
    budget = q.wal_budget
    dest = q.destination(HOST, KEY)
    conn = grow_the_log(q, dest, budget.normal_pages * 3)
    deliver_batches(q, 2)
    restarted = log_frames(path)
    assert restarted is not None
    assert restarted[1] < 50
    checkpoints: list[str] = []
    conn.set_trace_callback(
        lambda sql: checkpoints.append(sql) if "wal_checkpoint" in sql else None
    )
    # A frame or two per append: well under the normal size, no checkpoint yet.
    for i in range(budget.normal_pages * 4 // 10):
        q.append(dest, body_of_size(i, 200))
    deliver_batches(q, 1)
    assert checkpoints == []
    # Past the normal size: the next lease/ack checkpoints.
    for i in range(budget.normal_pages * 8 // 10):
        q.append(dest, body_of_size(i, 200))
    deliver_batches(q, 1)
    conn.set_trace_callback(None)
    # One checkpoint: a PASSIVE pass, then a RESTART of what is left (checkpoint.py).
    assert checkpoints == ["PRAGMA wal_checkpoint(PASSIVE)", "PRAGMA wal_checkpoint(RESTART)"]
    q.close()


def test_a_log_that_cannot_restart_is_not_checkpointed_after_every_lease_and_ack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the log cannot restart (here a reader pins it; in production a producer that
    commits without pause), the file stays past its limit: the delivering connection
    checkpoints once, then only after another normal size of log or ``CHECKPOINT_EVERY``,
    not after every lease and ack (counted, with the interval made long)."""
    monkeypatch.setattr(wal_module, "CHECKPOINT_EVERY", 3600.0)
    path = tmp_path / "q.sqlite3"
    q = Queue(path)
    budget = q.wal_budget
    dest = q.destination(HOST, KEY)
    conn = grow_the_log(q, dest, budget.normal_pages * 2)
    reader = sqlite3.connect(str(path))
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM messages").fetchone()  # pins the log
    checkpoints: list[str] = []
    conn.set_trace_callback(
        lambda sql: checkpoints.append(sql) if "wal_checkpoint" in sql else None
    )
    deliver_batches(q, 20)
    conn.set_trace_callback(None)
    assert wal_bytes(path) > budget.size_limit
    # One checkpoint (a PASSIVE pass, then a RESTART of what is left), not one per batch.
    assert checkpoints == ["PRAGMA wal_checkpoint(PASSIVE)", "PRAGMA wal_checkpoint(RESTART)"]
    reader.execute("COMMIT")
    reader.close()
    assert q.pending() == budget.normal_pages * 2 - 400
    q.close()


def test_a_producer_appending_without_pause_never_reaches_its_own_checkpoint(
    tmp_path: Path,
) -> None:
    """A producer that never pauses leaves a PASSIVE checkpoint always behind, so the log
    never started over and grew to the producers' backstop size, where SQLite checkpointed
    inside a caller's commit. The delivering connection's RESTART checkpoint (the caller's
    appends spool meanwhile) lets the log start over: sampled all along, it stays under the
    backstop size, it restarts many times, and every message is there once."""
    path = tmp_path / "q.sqlite3"
    producer = Queue(path, spool=True)
    deliverer = Queue(path)
    budget = producer.wal_budget
    dest = producer.destination(HOST, KEY)
    total = budget.producer_pages * 3
    done = threading.Event()
    delivered: list[int] = []
    longest = 0
    generations: set[tuple[int, int, int]] = set()

    def deliver() -> None:
        while not done.is_set() or deliverer.pending():
            lease = deliverer.lease(20, 500_000)
            if lease is None:
                time.sleep(0.001)
                continue
            delivered.extend(index(b) for b in lease.bodies)
            deliverer.ack(lease)

    worker = threading.Thread(target=deliver)
    worker.start()
    try:
        for i in range(total):
            producer.append(dest, body_of_size(i, 200))
            if i % 25 == 0 and (log := log_frames(path)) is not None:
                generations.add(log[0])
                longest = max(longest, log[1])
    finally:
        done.set()
        worker.join()
    assert longest < budget.producer_pages
    assert len(generations) > 3
    assert sorted(delivered) == list(range(total))  # lost 0, duplicated 0
    producer.close()
    deliverer.close()


def test_the_delivering_connection_starts_the_log_over_itself_after_its_checkpoint(
    tmp_path: Path,
) -> None:
    """The commit that starts a log over syncs the log's header: after the checkpoint that
    follows an ack, the delivering thread makes that commit itself (a count in
    ``counters``), so the caller's next append goes on in the new log instead of starting
    it (its header stays the same) and pays no fsync."""
    path = tmp_path / "q.sqlite3"
    q = Queue(path, max_queue_bytes=64 * 1024 * 1024)
    budget = q.wal_budget
    dest = q.destination(HOST, KEY)
    for i in range(20):
        q.append(dest, body_of_size(i, 200))
    leased: list[Lease] = []
    t = threading.Thread(target=lambda: leased.append(q.lease(20, 500_000)))
    t.start()
    t.join()
    n = budget.normal_pages * 3 // 2  # past the normal size: the ack's checkpoint is due
    for i in range(n):
        q.append(dest, body_of_size(i, 200))
    salt = _wal_salt(path)
    t = threading.Thread(target=q.ack, args=(leased[0],))  # the delivering thread's last op
    t.start()
    t.join()
    restarted = _wal_salt(path)
    assert restarted != salt  # the delivering thread started the log over
    q.append(dest, body_of_size(n, 200))
    assert _wal_salt(path) == restarted  # the append went on in that log
    log = log_frames(path)
    assert log is not None
    assert log[1] < 10  # one frame of that commit, one of the append
    conn = q._conn()
    counted = conn.execute("SELECT value FROM counters WHERE name = 'log_restarts'")
    assert counted.fetchone() == (1,)
    assert q.pending() == n + 1
    q.close()


def test_the_log_is_left_to_the_next_writer_when_another_connection_writes(
    tmp_path: Path,
) -> None:
    """When another connection holds the write lock at the checkpoint, the delivering
    thread does not wait for it past the RESTART's short wait: that writer's commit starts
    the log over."""
    path = tmp_path / "q.sqlite3"
    q = Queue(path)
    dest = q.destination(HOST, KEY)
    grow_the_log(q, dest, 10)
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    restart_log(q._db)
    assert time.monotonic() - started < 0.5
    other.execute("ROLLBACK")
    other.close()
    counted = q._conn().execute("SELECT count(*) FROM counters WHERE name = 'log_restarts'")
    assert counted.fetchone() == (0,)
    q.close()


def _hold_read_lock(q: Queue, until: threading.Event) -> tuple[threading.Thread, threading.Event]:
    """Another thread of this process inside a long read (``stats()`` of a large queue):
    it holds the queue's read lock until ``until`` is set (at most 5 s)."""
    holding = threading.Event()

    def hold() -> None:
        with q._db.read_lock:
            holding.set()
            until.wait(5)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert holding.wait(10)
    return thread, holding


def test_a_long_read_of_this_process_does_not_keep_other_processes_writers_out_of_the_log_restart(
    tmp_path: Path,
) -> None:
    """The delivering thread holds the commit fence exclusively only for a moment: while
    another thread of its process is inside a long read, it does not hold the fence (and
    the write lock) waiting for that read, so a writer of another process that does not
    spool commits at once (+1 s; it waited for the whole read before)."""
    path = tmp_path / "q.sqlite3"
    q = Queue(path)
    dest = q.destination(HOST, KEY)
    grow_the_log(q, dest, 10)
    other = Queue(path)  # another process's queue object: its own locks and descriptor
    other_dest = other.destination(HOST, KEY)
    done = threading.Event()
    reader, _ = _hold_read_lock(q, done)
    restarter = threading.Thread(target=restart_log, args=(q._db,), daemon=True)
    try:
        restarter.start()
        time.sleep(0.1)  # it took what it could, and waits for the read
        started = time.monotonic()
        assert other.append(other_dest, b'{"i":1}') > 0
        waited = time.monotonic() - started
    finally:
        done.set()
        reader.join()
        restarter.join()
    assert waited < 1.0
    assert q.pending() == 11
    other.close()
    q.close()


def test_a_signal_handler_tracking_inside_a_read_does_not_wait_for_the_log_restart(
    tmp_path: Path,
) -> None:
    """A signal handler that calls ``track()`` (no spool: ``sync_mode``) runs on the thread
    it interrupted, maybe inside a read, holding the read lock; the delivering thread's
    restart of the log, holding the write lock, must not wait for that read lock while the
    handler's append waits for the write lock: the append is stored at once (+1 s; it
    waited ``busy_timeout`` before, until the restart gave up)."""
    path = tmp_path / "q.sqlite3"
    q = Queue(path, busy_timeout=3.0)
    dest = q.destination(HOST, KEY)
    grow_the_log(q, dest, 10)
    restarter = threading.Thread(target=restart_log, args=(q._db,), daemon=True)
    with q._db.read_lock:  # this thread is inside a read when the signal comes
        restarter.start()
        time.sleep(0.1)  # it took what it could, and waits for the read
        started = time.monotonic()
        assert q.append(dest, b'{"handler":1}') > 0  # what the handler's track() does
        waited = time.monotonic() - started
    restarter.join()
    assert waited < 1.0
    assert q.pending() == 11
    q.close()
