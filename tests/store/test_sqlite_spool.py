"""Spools: an append that would wait for the queue file's write lock commits to its
process's own spool instead, and every spooled message reaches the queue exactly once —
whoever moves it, however many move at once, and whichever process dies on the way.

A Client's calls go to its journal first (``test_sqlite_journal.py``): here the journal is
kept at a bound of 0 bytes, so that the calls meet the queue file and its spools as a call
does once its journal is full or off.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import WRITE_KEY, child_env, start_python

from durable_analytics import Client
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite import journal as journal_module
from durable_analytics._store.sqlite import spool as spool_module
from durable_analytics._store.sqlite import spool_counts, spool_moves
from durable_analytics._store.sqlite.dead_letters import used_bytes
from durable_analytics._store.sqlite.move_records import owner_gone
from durable_analytics._store.sqlite.spool import LEAST_SHARE, MOST_SPOOLED, SPOOL_MARGIN, spool_dir
from durable_analytics._store.sqlite.spool_moves import MOVE_ROWS
from durable_analytics._store.sqlite.waits import owned
from durable_analytics._store.sqlite.wal import log_frames
from durable_analytics.testing import Collector

from .sqlite_helpers import HOST, KEY, OTHER_HOST, OTHER_KEY, body, index


@pytest.fixture(autouse=True)
def _no_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls skip the journal (its bound is 0 bytes) and meet the file and its spools."""
    monkeypatch.setattr(journal_module, "MOST_JOURNALED", 0)


@contextmanager
def write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Hold the file's write lock from another connection (as another process's lease)."""
    holder = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield holder
        holder.execute("COMMIT")
    finally:
        holder.close()


@contextmanager
def write_lock_released_later(path: Path) -> Iterator[Callable[[float], None]]:
    """Hold the file's write lock from another connection; the block calls the function it
    gets to have a timer commit (and so release the lock) that many seconds later."""
    holder = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    timers: list[threading.Timer] = []

    def release_after(seconds: float) -> None:
        timer = threading.Timer(seconds, holder.execute, ("COMMIT",))
        timers.append(timer)
        timer.start()

    try:
        holder.execute("BEGIN IMMEDIATE")
        yield release_after
    finally:
        for timer in timers:
            timer.join()
        holder.close()


def spooling(path: Path, **options: object) -> tuple[Queue, int]:
    """A queue that spools, past its first append (which measures the file for the caps)."""
    q = Queue(path, spool=True, **options)  # type: ignore[arg-type]
    dest = q.destination(HOST, KEY)
    assert q.append(dest, body(-1)) > 0
    lease = q.lease(1, 500_000)
    assert lease is not None
    q.ack(lease)
    return q, dest


def spool_files(path: Path) -> list[str]:
    d = spool_dir(path)
    return sorted(os.listdir(d)) if d.exists() else []


def queued_indexes(q: Queue) -> list[int]:
    return sorted(index(b) for b in q.bodies())


def test_an_append_that_would_wait_commits_to_the_spool_and_returns_at_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    q, dest = spooling(path)
    with write_lock_held(path):
        started = time.monotonic()
        ids = [q.append(dest, body(i)) for i in range(50)]
        took = time.monotonic() - started
    # Waiting for the holder would have raised QueueBusy after busy_timeout or never
    # returned before the COMMIT above: these returned while it held the lock.
    assert took < q.busy_timeout
    assert all(i < 0 for i in ids)
    assert ids == sorted(ids, reverse=True)
    assert q.bodies() == []  # not in the file yet ...
    assert q.stats().spooled == 50  # ... but counted, and pending
    assert q.stats().pending == 50
    assert q.pending() == q.pending(destination=dest) == 50
    assert q.pending(destination=q.destination(OTHER_HOST, OTHER_KEY)) == 0
    spooled = sqlite3.connect(str(spool_dir(path) / spool_files(path)[0]))
    assert spooled.execute("SELECT count(*) FROM messages").fetchone()[0] == 50
    spooled.close()


def test_max_id_moves_this_process_spool_so_flush_counts_it(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q, dest = spooling(path)
    q.append(dest, body(0))
    with write_lock_held(path):
        for i in range(1, 11):
            q.append(dest, body(i))
    top = q.max_id()
    assert q.pending(up_to_id=top) == 11
    assert queued_indexes(q) == list(range(11))
    assert q.stats().spooled == 0


def test_stats_count_spooled_messages_in_pending_and_in_bytes(tmp_path: Path) -> None:
    """``bytes`` is the size of the pending messages, and spooled ones are pending: a look
    at the stats while calls wait in a spool gives the same totals as after they moved."""
    path = tmp_path / "q.db"
    q, dest = spooling(path)
    stored = [body(i, pad=100 * i) for i in range(10)]
    q.append(dest, stored[0])
    with write_lock_held(path):
        for b in stored[1:]:
            assert q.append(dest, b) < 0  # spooled
    waiting = q.stats()
    assert (waiting.pending, waiting.spooled) == (10, 9)
    assert waiting.bytes == sum(len(b) for b in stored)
    q.max_id()  # moves the spool in
    moved = q.stats()
    assert (moved.pending, moved.spooled, moved.bytes) == (10, 0, waiting.bytes)


def test_stats_count_spooled_messages_under_their_destination_and_in_the_oldest_age(
    tmp_path: Path,
) -> None:
    """Each destination's ``pending`` (what ``status`` lists) counts its spooled calls as
    the total does, and ``oldest_age_seconds`` sees a spooled call when the file holds none:
    before, a destination with only spooled calls showed 0 pending and no oldest age."""
    path = tmp_path / "q.db"
    q, dest = spooling(path)  # the file is empty again
    other = q.destination(OTHER_HOST, OTHER_KEY)
    with write_lock_held(path):
        for i in range(5):
            assert q.append(dest, body(i)) < 0
        for i in range(3):
            assert q.append(other, body(10 + i)) < 0
    waiting = q.stats()
    by_host = {d.host: d.pending for d in waiting.destinations}
    assert by_host == {HOST: 5, OTHER_HOST: 3}
    assert (waiting.pending, waiting.spooled) == (8, 8)
    assert waiting.oldest_age_seconds is not None
    assert waiting.oldest_age_seconds >= 0
    q.max_id()  # moves the spool in: the same counts, from the file
    moved = q.stats()
    assert {d.host: d.pending for d in moved.destinations} == by_host
    assert (moved.pending, moved.spooled) == (8, 0)


def test_a_queue_without_spool_waits_for_the_lock_as_before(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = Queue(path)  # spool=False: what sync_mode and the CLI use
    dest = q.destination(HOST, KEY)
    with write_lock_released_later(path) as release_after:
        release_after(0.2)
        row_id = q.append(dest, body(0))
    assert row_id > 0
    assert not spool_dir(path).exists()


def test_lease_moves_the_spool_first_and_keeps_each_destination(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q, a = spooling(path)
    b = q.destination(OTHER_HOST, OTHER_KEY)
    with write_lock_held(path):
        for i in range(10):
            q.append(a if i % 2 else b, body(i))
    leased: dict[str, list[int]] = {}
    while (lease := q.lease(20, 500_000)) is not None:
        leased.setdefault(lease.destination.host, []).extend(index(m) for m in lease.bodies)
        q.ack(lease)
    assert sorted(leased[HOST]) == [1, 3, 5, 7, 9]
    assert sorted(leased[OTHER_HOST]) == [0, 2, 4, 6, 8]


def test_rows_spooled_after_a_move_are_never_taken_for_moved_ones(tmp_path: Path) -> None:
    """The spool keeps its newest moved row: SQLite gives a new row the largest id plus one,
    and an emptied table would start again at 1, below the move's record (lost)."""
    path = tmp_path / "q.db"
    q, dest = spooling(path)
    for round_ in range(3):
        with write_lock_held(path):
            for i in range(5):
                q.append(dest, body(round_ * 5 + i))
        assert q.move_spools() == 5
    assert queued_indexes(q) == list(range(15))


def test_a_mover_killed_between_its_two_commits_moves_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "q.db"
    q, dest = spooling(path)
    with write_lock_held(path):
        for i in range(30):
            q.append(dest, body(i))

    def killed(conn: sqlite3.Connection, last: int) -> None:
        raise KeyboardInterrupt  # the mover dies after the queue's COMMIT

    monkeypatch.setattr(spool_moves, "_delete_moved", killed)
    with pytest.raises(KeyboardInterrupt):
        q.move_spools()
    monkeypatch.undo()
    # Every row is still in the spool; another process's mover starts after the record.
    other = Queue(path)
    assert other.move_spools(scan_now=True) == 0
    assert q.move_spools() == 0
    assert queued_indexes(q) == list(range(30))


def test_two_movers_at_once_move_every_row_once(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    producer, dest = spooling(path)
    total = 3 * MOVE_ROWS
    with write_lock_held(path):
        for i in range(total):
            producer.append(dest, body(i))
    movers = [Queue(path) for _ in range(3)]
    barrier = threading.Barrier(len(movers) + 1)
    moved: list[int] = []

    def move(m: Queue) -> None:
        barrier.wait()
        moved.append(m.move_spools(scan_now=True))

    threads = [threading.Thread(target=move, args=(m,)) for m in movers]
    for t in threads:
        t.start()
    barrier.wait()
    moved.append(producer.move_spools())
    for t in threads:
        t.join()
    assert sum(moved) == total
    assert queued_indexes(producer) == list(range(total))


def test_a_move_never_holds_the_locks_of_two_files_at_once(tmp_path: Path) -> None:
    """fork() closes each file's connections in turn, taking each one's locks: a mover that
    held the queue's write lock while waiting for the spool's (or the reverse) would hold
    the fork up for its 5 s, and the child would refuse the queue."""
    path = tmp_path / "q.db"
    q, dest = spooling(path)
    with write_lock_held(path):
        for i in range(2 * MOVE_ROWS + 5):
            q.append(dest, body(i))
    spools = q._spools
    assert spools is not None
    spool = spools._own
    assert spool is not None
    both: list[str] = []
    real_read, real_write = spool._db.read, spool._db.write

    def read(fn: Any) -> Any:
        if owned(q._db.write_lock) or owned(q._db.read_lock):
            both.append("spool read inside a queue operation")
        return real_read(fn)

    def write(fn: Any, **kwargs: Any) -> Any:
        if owned(q._db.write_lock) or owned(q._db.read_lock):
            both.append("spool write inside a queue operation")
        return real_write(fn, **kwargs)

    spool._db.read = read  # type: ignore[method-assign]
    spool._db.write = write  # type: ignore[method-assign]
    assert q.move_spools() == 2 * MOVE_ROWS + 5
    assert both == []
    assert queued_indexes(q) == list(range(2 * MOVE_ROWS + 5))


def test_spooling_stops_past_the_bound_and_appends_wait_instead(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q, dest = spooling(path)
    with write_lock_released_later(path) as release_after:
        for i in range(MOST_SPOOLED):
            assert q.append(dest, body(i)) < 0
        release_after(0.2)
        assert q.append(dest, body(MOST_SPOOLED)) > 0  # waited for the file, as before
    assert q.max_id() > 0
    assert queued_indexes(q) == list(range(MOST_SPOOLED + 1))


def test_near_the_cap_an_append_measures_the_file_instead_of_spooling(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = Queue(path, spool=True, max_queue_bytes=64 * 1024)
    dest = q.destination(HOST, KEY)
    with write_lock_released_later(path) as release_after:
        release_after(0.2)
        row_id = q.append(dest, body(0))
    assert row_id > 0
    assert not spool_dir(path).exists()


_SPOOLING_CHILD = """
import sys
from durable_analytics._store.sqlite import SqliteQueue
q = SqliteQueue(sys.argv[1], spool=True)
dest = q.destination(sys.argv[2], sys.argv[3])
q.append(dest, b'{"type":"track","event":"E","userId":"u","messageId":"m--1","i":-1}')
print("ready", flush=True)
sys.stdin.readline()
body = '{"type":"track","event":"E","userId":"u","messageId":"m-%d","i":%d}'
ids = [q.append(dest, (body % (i, i)).encode()) for i in range(int(sys.argv[4]))]
print("spooled" if all(i < 0 for i in ids) else "stored", flush=True)
sys.stdin.read()
"""


def _child_spools(path: Path, count: int, *, host: str = HOST, key: str = KEY) -> object:
    """A child process that spooled ``count`` messages (the file's lock held meanwhile)."""
    child = start_python(_SPOOLING_CHILD, str(path), host, key, str(count), stdin=subprocess.PIPE)
    assert child.stdout is not None
    assert child.stdin is not None
    assert child.stdout.readline().strip() == "ready"
    with write_lock_held(path):
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "spooled"
    return child


def spooled_indexes(q: Queue) -> list[int]:
    """The indexes of the children's messages in the file (their first one left out)."""
    return sorted(i for i in (json.loads(b)["i"] for b in q.bodies()) if i >= 0)


def test_the_spool_of_a_killed_process_is_moved_and_then_removed(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    Queue(path).destination(HOST, KEY)
    child = _child_spools(path, 40)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    child.wait()  # type: ignore[attr-defined]
    worker = Queue(path)
    assert worker.move_spools(scan_now=True) == 40
    assert spooled_indexes(worker) == list(range(40))
    assert spool_files(path) == []
    with contextlib.closing(sqlite3.connect(str(path))) as conn:
        counters = conn.execute("SELECT name FROM counters").fetchall()
    assert not [n for (n,) in counters if n.startswith("spool:")]


def test_a_live_process_spool_is_moved_but_kept(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    Queue(path).destination(HOST, KEY)
    child = _child_spools(path, 10)
    try:
        worker = Queue(path)
        assert worker.move_spools(scan_now=True) == 10
        assert any(f.endswith(".db") for f in spool_files(path))  # its owner still appends
        assert worker.move_spools(scan_now=True) == 0
    finally:
        child.stdin.close()  # type: ignore[attr-defined]
        child.wait()  # type: ignore[attr-defined]
    assert worker.move_spools(scan_now=True) == 0
    assert spool_files(path) == []  # gone once its owner exited
    assert spooled_indexes(worker) == list(range(10))


def test_a_move_that_meets_a_held_lock_leaves_the_spool_for_the_next_move(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "q.db"
    Queue(path).destination(HOST, KEY)
    child = _child_spools(path, 10)
    try:
        worker = Queue(path, busy_timeout=0.2)
        with caplog.at_level(logging.WARNING), write_lock_held(path):
            assert worker.move_spools(scan_now=True) == 0  # waited 0.2 s, then gave up
            assert worker.max_id() == 1  # a flush goes on with what the file holds
        assert not caplog.records  # not taken for a damaged spool
        assert worker.move_spools(scan_now=True) == 10
        assert spooled_indexes(worker) == list(range(10))
    finally:
        child.stdin.close()  # type: ignore[attr-defined]
        child.wait()  # type: ignore[attr-defined]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_spools_to_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q, dest = spooling(path)
    with write_lock_held(path):
        q.append(dest, body(0))
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            code = 1
            try:
                code = 0 if q.append(dest, body(1)) < 0 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    dbs = [f for f in spool_files(path) if f.endswith(".db")]
    assert sorted(int(f.split("-")[0]) for f in dbs) == sorted([os.getpid(), pid])
    assert q.move_spools(scan_now=True) == 2
    assert queued_indexes(q) == [0, 1]


def test_a_symlink_or_a_foreign_file_in_the_spool_directory_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "q.db"
    q = Queue(path)
    dest = q.destination(HOST, KEY)
    d = spool_dir(path)
    d.mkdir(mode=0o700)
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"x" * 100)
    (d / "1-link.db").symlink_to(target)
    (d / "2-junk.db").write_bytes(b"not a database at all, just some bytes" * 50)
    with caplog.at_level(logging.WARNING, logger="durable_analytics.queue"):
        assert q.move_spools(scan_now=True) == 0
        assert q.move_spools(scan_now=True) == 0
    warned = [r for r in caplog.records if "2-junk" in r.getMessage()]
    assert len(warned) == 1  # once, not at every poll
    assert target.read_bytes() == b"x" * 100
    assert (d / "2-junk.db").exists()
    q.append(dest, body(0))
    assert queued_indexes(q) == [0]


# ---------------------------------------------------------------- through the Client


def test_a_client_whose_calls_spooled_delivers_each_message_once(
    collector: Collector, queue_path: Path
) -> None:
    """Calls made while another process holds the file's write lock return at once; the
    flusher thread moves them in and delivers every one, once."""
    client = Client(WRITE_KEY, host=collector.url, queue_path=queue_path, on_exit="none")
    try:
        sent = [client.track("user-1", "Before", {"i": i})[1]["messageId"] for i in range(50)]
        assert client.flush().pending == 0
        with write_lock_held(queue_path):
            sent += [client.track("user-1", "During", {"i": i})[1]["messageId"] for i in range(200)]
            assert client.stats().spooled == 200
        sent += [client.track("user-1", "After", {"i": i})[1]["messageId"] for i in range(50)]
        result = client.flush()
    finally:
        client.close(timeout=5)
    assert result.pending == 0
    received = collector.message_ids()
    assert sorted(received) == sorted(sent)  # lost 0
    assert max(received.values()) == 1  # duplicated 0
    assert [f for f in spool_files(queue_path) if f.endswith(".db")]  # its owner's, kept


def test_drain_delivers_what_a_killed_producer_left_in_its_spool(
    collector: Collector, queue_path: Path
) -> None:
    Queue(queue_path).destination(collector.url, WRITE_KEY)
    child = _child_spools(queue_path, 120, host=collector.url, key=WRITE_KEY)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    child.wait()  # type: ignore[attr-defined]
    result = subprocess.run(
        [sys.executable, "-m", "durable_analytics.cli", "drain", "--queue", str(queue_path)],
        check=False,
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    received = [m["i"] for m in collector.messages()]
    assert sorted(i for i in received if i >= 0) == list(range(120))  # lost 0
    assert len(received) == len(set(received))  # duplicated 0
    assert spool_files(queue_path) == []


def _spool_db(path: Path) -> Path:
    return spool_dir(path) / next(n for n in spool_files(path) if n.endswith(".db"))


def _with_damaged_own_spool(path: Path) -> Queue:
    """A queue with one message spooled and one in the file, whose own spool file was then
    overwritten with garbage."""
    q, dest = spooling(path)
    with write_lock_held(path):
        assert q.append(dest, body(1)) < 0
    assert q.append(dest, body(2)) > 0
    own = q._spools._own  # type: ignore[union-attr]
    assert own is not None
    own._db.close_all()
    db = _spool_db(path)
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(b"garbage, not a database" * 400)
    return q


def test_a_damaged_own_spool_does_not_stop_this_process_from_delivering(tmp_path: Path) -> None:
    """The docs: a damaged spool turns spooling off; nothing else changes. A lease of
    the file's own messages must go on."""
    q = _with_damaged_own_spool(tmp_path / "q.db")
    lease = q.lease(10, 500_000)  # raises QueueCorrupt from the own spool's move
    assert lease is not None


def test_closing_a_queue_releases_its_spool_lock_and_descriptor(tmp_path: Path) -> None:
    """A queue object that was closed and dropped leaves no descriptor open, and its spool
    can be adopted (moved and removed) by another mover while this process lives."""
    path = tmp_path / "q.db"
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        q, dest = spooling(path)
        with write_lock_held(path):
            assert q.append(dest, body(1)) < 0
        q.max_id()  # moves it
        q.close()
        del q
        gc.collect()
    after = len(os.listdir("/proc/self/fd"))
    assert after - before < 5, f"{after - before} descriptors leaked"
    locks = [n for n in spool_files(path) if n.endswith(".lock")]
    held = 0
    for name in locks:
        fd = owner_gone(spool_dir(path) / name)
        if fd == -1:
            held += 1
        elif fd >= 0:
            os.close(fd)
    assert held == 0, f"{held} spools of closed queues still locked by this process"


def test_pending_never_counts_what_no_mover_will_ever_move(tmp_path: Path) -> None:
    """pending()/stats().pending (status, prometheus, on_exit="spawn"): a spool file the
    movers skip (here a symlink, which they rightly refuse) must not be counted forever."""
    path = tmp_path / "q.db"
    q, _ = spooling(path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    target = elsewhere / "x.db"
    t = Queue(target)
    tdest = t.destination(HOST, KEY)
    for i in range(5):
        t.append(tdest, body(i))
    t.close()
    d = spool_dir(path)
    d.mkdir(mode=0o700, exist_ok=True)
    (d / "1-link.db").symlink_to(target)
    q.move_spools(scan_now=True)
    assert queued_indexes(q) == []
    assert q.pending() == 0


def test_a_spool_with_a_damaged_body_is_not_counted_pending_forever(tmp_path: Path) -> None:
    """A dead producer's spool whose message table reads but whose bodies do not (a torn
    overflow page): the mover skips it; pending() must not report it forever."""
    path = tmp_path / "q.db"
    q, _ = spooling(path)
    src = tmp_path / "src"
    src.mkdir(mode=0o700)
    donor = src / "9-dead.db"
    t = Queue(donor)
    tdest = t.destination(HOST, KEY)
    t.append(tdest, b"{" + b"x" * 20000 + b"}")  # overflow pages
    t.close()
    conn = sqlite3.connect(str(donor))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    raw = bytearray(donor.read_bytes())
    # Point the first overflow page's next-page pointer past the end of the file: find a
    # page full of 'x' (an overflow page starts with a 4-byte next-page number).
    for p in range(pages):
        page = raw[p * page_size : (p + 1) * page_size]
        if page[4:64] == b"x" * 60 and page[:4] != b"\0\0\0\0":
            raw[p * page_size : p * page_size + 4] = (pages + 50).to_bytes(4, "big")
            break
    else:  # pragma: no cover
        raise AssertionError("no overflow page found")
    d = spool_dir(path)
    d.mkdir(mode=0o700, exist_ok=True)
    (d / donor.name).write_bytes(bytes(raw))
    os.chmod(d / donor.name, 0o600)
    shutil.rmtree(src)
    for _ in range(3):
        q.move_spools(scan_now=True)
    assert q.pending() == len(q.bodies())


def test_a_damaged_own_spool_does_not_make_flush_raise(tmp_path: Path) -> None:
    """flush() starts with max_id(), which moves this process's spool: a damaged spool
    must not turn every flush (and close, and the exit handler) into an exception."""
    q = _with_damaged_own_spool(tmp_path / "q.db")
    assert q.max_id() > 0


def test_a_frozen_producer_holding_its_spool_lock_does_not_fail_another_process_lease(
    tmp_path: Path,
) -> None:
    """Another process's spool is not on the delivery path: its lock, held by a producer
    frozen mid-INSERT (SIGSTOP, a debugger), must not make this process's lease wait out
    busy_timeout and raise QueueBusy."""
    import pytest

    from durable_analytics.exceptions import QueueBusy

    path = tmp_path / "q.db"
    producer, dest = spooling(path)  # stands for the other process
    with write_lock_held(path):
        assert producer.append(dest, body(1)) < 0
    deliverer = Queue(path, busy_timeout=0.3)
    ddest = deliverer.destination(HOST, KEY)
    deliverer.append(ddest, body(2))
    with write_lock_held(_spool_db(path)):  # the producer, frozen inside its spool's INSERT
        try:
            lease = deliverer.lease(10, 500_000)
        except QueueBusy:
            pytest.fail("lease raised QueueBusy for another process's spool lock")
    assert lease is not None


@contextmanager
def spools_held_exclusively(path: Path) -> Iterator[int]:
    """Every spool file of ``path`` held by another connection in exclusive locking mode
    (an operator's ``sqlite3`` shell, a backup tool): no other connection can even read it.
    Gives how many files are held."""
    holders = []
    try:
        for file in sorted(spool_dir(path).glob("*.db")):
            holder = sqlite3.connect(str(file), isolation_level=None)
            holders.append(holder)
            holder.execute("PRAGMA locking_mode=EXCLUSIVE")
            holder.execute("BEGIN EXCLUSIVE")
        yield len(holders)
    finally:
        for holder in holders:
            holder.close()


def test_spools_nobody_can_read_keep_a_bounded_call_within_its_deadline(tmp_path: Path) -> None:
    """Flush, close and the exit handler bound the queue with their deadline. A look into
    the spools (pending, held_back) and a move of a dead producer's spool (max_id) must end
    by it too, however many spool files are held: before, a look waited 1 s per held file
    and a move 30 s (SQLite's wait at the spool's open) twice over."""
    path = tmp_path / "q.db"
    Queue(path).destination(HOST, KEY)
    for _ in range(3):
        child = _child_spools(path, 5)
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        child.wait()  # type: ignore[attr-defined]
    q = Queue(path)
    dest = q.destination(HOST, KEY)
    with spools_held_exclusively(path) as held:
        assert held == 3
        for name, op in [
            ("max_id", q.max_id),
            ("pending", q.pending),
            ("held_back", lambda: q.held_back(destination=dest)),
        ]:
            started = time.monotonic()
            with q.bounded(0.2):
                op()
            took = time.monotonic() - started
            assert took < 1.0, f"{name} took {took:.2f} s under a 0.2 s deadline"
    # Nothing was lost or moved twice: released, every spooled message moves in once.
    assert q.move_spools(scan_now=True) == 15
    assert spooled_indexes(q) == sorted(list(range(5)) * 3)
    assert spool_files(path) == []


def test_a_flush_with_a_timeout_returns_by_it_while_a_dead_producers_spool_is_held(
    tmp_path: Path, collector: Collector
) -> None:
    """The same bound seen from the Client: ``flush(timeout=0.3)`` (what ``close`` and the
    exit handler call) returns by its deadline, counting what it could not reach pending,
    and a later flush delivers every spooled message once."""
    path = tmp_path / "q.db"
    Queue(path).destination(collector.url, WRITE_KEY)
    child = _child_spools(path, 5, host=collector.url, key=WRITE_KEY)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    child.wait()  # type: ignore[attr-defined]
    client = Client(WRITE_KEY, host=collector.url, queue_path=path, flusher="none")
    try:
        client.track(user_id="u", event="Mine")
        with spools_held_exclusively(path):
            started = time.monotonic()
            result = client.flush(timeout=0.3)
            took = time.monotonic() - started
        assert took < 1.3, f"flush(timeout=0.3) took {took:.2f} s"
        # The child's first message (in the file) and ours; the held spool is not even
        # readable, so its 5 are not counted (nor lost).
        assert result.sent + result.pending == 2
        assert client.flush().pending == 0
    finally:
        client.close()
    ids = collector.message_ids()
    assert len(ids) == 7
    assert set(ids.values()) == {1}


def test_with_a_count_cap_or_a_file_near_its_byte_cap_a_call_waits_instead_of_spooling(
    tmp_path: Path,
) -> None:
    """With ``max_queue_size``, or a file whose room under ``max_queue_bytes`` is less than
    ``LEAST_SHARE`` of ``SPOOL_MARGIN``, a call waits for the file (the caps stay exact),
    and a file filled to the count cap is never pushed past it."""
    near = int(SPOOL_MARGIN * LEAST_SHARE)
    for n, options in enumerate(({"max_queue_size": 400}, {"max_queue_bytes": near})):
        path = tmp_path / f"q{n}.db"
        q, dest = spooling(path, overflow="drop_newest", **options)
        with write_lock_released_later(path) as release_after:
            release_after(0.2)
            assert q.append(dest, body(0)) > 0
        assert not [f for f in spool_files(path) if f.endswith(".db")]
        if "max_queue_size" in options:
            for i in range(1, 450):
                q.append(dest, body(i))
            q.max_id()
            assert len(q.bodies()) == 400


def test_many_processes_on_one_queue_each_spool_a_share_that_keeps_them_all_under_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``SPOOL_MARGIN`` for every process with a spool does not fit under
    ``max_queue_bytes`` (40 such processes at the default cap), each spools a share of
    ``MOST_SPOOLED`` instead of none: room / (margin x processes) of it, so that what they
    hold together stays within the cap. Before, every call of every one of them waited for
    the file's lock (``busy_timeout``, then ``QueueBusy``); past its share, a call waits as
    before. Every call is stored once."""
    path = tmp_path / "q.db"
    q, dest = spooling(path)
    monkeypatch.setattr(q._spools, "spoolers", lambda: 40)
    share = q._spools.hold_share(q, 200)
    assert 0.5 < share < 1  # 1 GiB among 40 margins of 40 MiB
    most = int(MOST_SPOOLED * share)
    with write_lock_released_later(path) as release_after:
        assert all(q.append(dest, body(i)) < 0 for i in range(most))  # spooled at once
        release_after(0.2)
        assert q.append(dest, body(most)) > 0  # past its share: waited for the file
    q.move_spools(others=False)
    assert queued_indexes(q) == list(range(most + 1))
    q.close()


def test_the_share_shrinks_as_the_file_nears_its_cap_and_ends_before_it(tmp_path: Path) -> None:
    """The share of one process follows the room left: all of it far from the cap, the
    room divided by the margin nearer, none within ``LEAST_SHARE`` of a margin."""
    path = tmp_path / "q.db"
    q, _ = spooling(path, max_queue_bytes=4 * SPOOL_MARGIN)
    spools = q._spools
    assert spools is not None
    appender = q._appender
    appender.est_used = 0
    assert spools.hold_share(q, 100) == 1.0
    appender.est_used = 3 * SPOOL_MARGIN + SPOOL_MARGIN // 2
    assert spools.hold_share(q, 100) == pytest.approx(0.5, abs=0.01)
    appender.est_used = 4 * SPOOL_MARGIN - int(SPOOL_MARGIN * LEAST_SHARE) + 1
    assert spools.hold_share(q, 100) == 0.0
    q.close()


# ---------------------------------------------------------------- checkpoints, measures


def test_the_mover_checkpoints_a_spool_so_that_its_log_starts_over(tmp_path: Path) -> None:
    """The owner never checkpoints its spool on a call (a few milliseconds each time): the
    mover's RESTART checkpoint lets the next commit write the spool's log from its start,
    instead of past the ~1,000 frames the calls wrote."""
    path = tmp_path / "q.db"
    q, dest = spooling(path)
    count = MOST_SPOOLED - 1
    with write_lock_held(path):
        assert all(q.append(dest, body(i)) < 0 for i in range(count))
    db = _spool_db(path)
    found = log_frames(db)
    assert found is not None
    generation, frames = found
    assert frames >= q.wal_budget.normal_pages  # past the normal size: a mover checkpoints
    assert q.move_spools(others=False) == count
    with write_lock_held(path):
        assert q.append(dest, body(count)) < 0
    after = log_frames(db)
    assert after is not None
    assert after[0] != generation  # restarted ...
    assert after[1] < 100  # ... from its start, by the mover's last deletes or the append
    q.move_spools(others=False)
    assert queued_indexes(q) == list(range(count + 1))


def test_what_a_move_took_is_made_durable_in_the_queue_before_the_spool_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``synchronous=NORMAL`` a commit is not synced: the spool's checkpoint (which
    syncs the spool, and with it the deletes of moved rows) must come after the queue's
    ``-wal`` holding those rows was synced, or a power loss could keep only the deletes."""
    order: list[str] = []
    real_sync = spool_module.sync_wal
    monkeypatch.setattr(
        spool_module, "sync_wal", lambda p: (order.append(f"sync {Path(p).name}"), real_sync(p))
    )
    path = tmp_path / "q.db"
    q, dest = spooling(path)
    with write_lock_held(path):
        assert all(q.append(dest, body(i)) < 0 for i in range(MOST_SPOOLED - 1))
    spool = q._spools._own  # type: ignore[union-attr]
    assert spool is not None
    spool._conn().set_trace_callback(
        lambda sql: order.append("checkpoint") if "wal_checkpoint" in sql else None
    )
    q.move_spools(others=False)
    assert order == ["sync q.db", "checkpoint", "checkpoint"]  # PASSIVE, then RESTART
    full = Queue(tmp_path / "full.db", spool=True, durability="full")
    assert spool_module.open_spool(full, tmp_path / "full-spool.db").before_checkpoint is None


def test_far_from_the_cap_the_file_is_measured_less_often(tmp_path: Path) -> None:
    """Each measure of the file's size is a slower call: with room, the estimate goes on
    for up to 4 MiB; close to the cap, every 256 KiB as before."""
    far = Queue(tmp_path / "far.db")
    assert far.append(far.destination(HOST, KEY), body(0)) > 0
    assert far._appender.refresh_every == 4 * 1024 * 1024
    near = Queue(tmp_path / "near.db", max_queue_bytes=8 * 1024 * 1024)
    assert near.append(near.destination(HOST, KEY), body(0)) > 0
    assert near._appender.refresh_every == 256 * 1024


def test_a_move_leaves_what_has_no_room_under_the_cap_in_the_spool_until_there_is(
    tmp_path: Path,
) -> None:
    """Every spooling process may hold spooled messages, so the appends' margin cannot
    bound what all of them move in at once: a chunk that would take the file past
    ``max_queue_bytes`` waits in its spool, counted as pending and lost by nobody, and
    moves once deliveries made room."""
    path = tmp_path / "q.db"
    cap = SPOOL_MARGIN + 8 * 1024 * 1024
    q, dest = spooling(path, max_queue_bytes=cap)
    with write_lock_held(path):
        assert all(q.append(dest, body(i)) < 0 for i in range(100))
    # Another process fills the file to just under the cap meanwhile (no room for a chunk).
    filler = sqlite3.connect(str(path), isolation_level=None)
    filler.execute("BEGIN IMMEDIATE")
    pad = b"p" * 3_000  # a page each: the file ends 4-8 KiB under the cap
    while (
        filler.execute("PRAGMA page_count").fetchone()[0]
        - filler.execute("PRAGMA freelist_count").fetchone()[0]
    ) * 4096 < cap - 8 * 1024:
        filler.execute(
            "INSERT INTO messages (dest, body, size, enqueued_at) VALUES (?, ?, ?, 0)",
            (dest, pad, len(pad)),
        )
    filler.execute("COMMIT")
    filled = q.pending()
    assert q.move_spools(others=False) == 0  # no room: nothing moved ...
    assert q.stats().spooled == 100  # ... nothing lost, still counted
    assert q.pending() == filled
    filler.execute("DELETE FROM messages WHERE size = ?", (len(pad),))  # delivered
    filler.close()
    assert q.move_spools(others=False) == 100
    assert queued_indexes(q) == [*range(100)]
    assert q.stats().spooled == 0


def _fill_to_just_under(queue_path: Path, dest: int, cap: int) -> int:
    """Fill the file to just under ``cap`` bytes from another connection (as another
    process's appends); returns how many messages that took."""
    filler = sqlite3.connect(str(queue_path), isolation_level=None)
    filler.execute("BEGIN IMMEDIATE")
    padded = 0
    while (
        filler.execute("PRAGMA page_count").fetchone()[0]
        - filler.execute("PRAGMA freelist_count").fetchone()[0]
    ) * 4096 < cap - 8 * 1024:
        pad = body(10_000 + padded, pad=30_000)
        filler.execute(
            "INSERT INTO messages (dest, body, size, enqueued_at) VALUES (?, ?, ?, 0)",
            (dest, pad, len(pad)),
        )
        padded += 1
    filler.execute("COMMIT")
    filler.close()
    return padded


def _capped_client(collector: Collector, queue_path: Path, cap: int, **settings: Any) -> Client:
    """A Client with no flusher (only ``flush()`` delivers) under ``max_queue_bytes=cap``."""
    return Client(
        WRITE_KEY,
        host=collector.url,
        queue_path=queue_path,
        on_exit="none",
        flusher="none",
        max_queue_bytes=cap,
        **settings,
    )


def _held_back_by_the_cap(
    client: Client, collector: Collector, queue_path: Path, cap: int
) -> tuple[list[str], int]:
    """60 calls of ``client`` spooled, then the file filled by another process to just under
    ``cap``: no room for them to move in. Their messageIds, and how many rows filled it."""
    assert client.flush().pending == 0  # the file exists and was measured
    with write_lock_held(queue_path):
        spooled = [client.track("u", "Held", {"i": i})[1]["messageId"] for i in range(60)]
        assert client.stats().spooled == 60
    padded = _fill_to_just_under(
        queue_path, client.queue.destination(collector.url, WRITE_KEY), cap
    )
    assert client.queue.move_spools(others=False) == 0  # held back by the cap
    return spooled, padded


def test_flush_delivers_spooled_calls_the_byte_cap_held_back_and_counts_them(
    collector: Collector, queue_path: Path
) -> None:
    """Calls spooled while the file had no room under ``max_queue_bytes`` were pending when
    ``flush()`` was called: it delivers them once its deliveries made room, and counts
    them in ``sent`` (before, it returned ``pending=0`` with them still on disk)."""
    cap = SPOOL_MARGIN + 8 * 1024 * 1024
    client = _capped_client(collector, queue_path, cap)
    try:
        spooled, padded = _held_back_by_the_cap(client, collector, queue_path, cap)
        result = client.flush()
        received = collector.message_ids()
        left = client.stats()
    finally:
        client.close(timeout=5)
    assert all(received[m] == 1 for m in spooled)  # lost 0, duplicated 0
    assert (result.sent, result.pending, result.dead_lettered) == (padded + 60, 0, 0)
    assert (left.pending, left.spooled) == (0, 0)


def test_flush_does_not_count_held_back_calls_pending_once_another_deliverer_sent_them(
    collector: Collector, queue_path: Path
) -> None:
    """Calls held back by the byte cap that another deliverer (the flusher thread, a
    ``worker``, another client) moved in and delivered while flush() delivered its own were
    sent, not pending: flush counts them in ``sent`` and ``pending`` is 0. (It counted
    every one of them ``pending``: it found nothing new to move, and its count of what it
    still held was never brought down.)"""
    cap = SPOOL_MARGIN + 8 * 1024 * 1024
    client = _capped_client(collector, queue_path, cap)
    other = _capped_client(collector, queue_path, cap)
    try:
        spooled, padded = _held_back_by_the_cap(client, collector, queue_path, cap)
        queue = client.queue
        newest = queue.max_id
        calls = 0

        def max_id() -> int:
            nonlocal calls
            calls += 1
            if calls == 2:
                # flush() delivered what was in the file and looks for what moved in: the
                # other deliverer was quicker and sent the held-back calls.
                assert other.flush(timeout=30).pending == 0
            return newest()

        queue.max_id = max_id  # type: ignore[method-assign]
        try:
            result = client.flush(timeout=30)
        finally:
            del queue.max_id  # type: ignore[method-assign]
        received = collector.message_ids()
        left = client.stats()
    finally:
        other.close(timeout=5)
        client.close(timeout=5)
    assert calls >= 2
    assert all(received[m] == 1 for m in spooled)  # lost 0, duplicated 0
    assert (left.pending, left.spooled) == (0, 0)
    assert (result.sent, result.pending, result.dead_lettered) == (padded + 60, 0, 0)


def test_flush_counts_held_back_calls_another_mover_took_in_but_nobody_delivered_pending(
    collector: Collector, queue_path: Path
) -> None:
    """Held-back calls that another mover (a ``worker`` with a larger cap, another client)
    moved into the file during ``flush()`` are still pending when its delivery failed: it
    counts them ``pending``, never ``sent`` (it counted them sent: they were neither in
    its spool look nor at or below the ids it delivered up to)."""
    cap = SPOOL_MARGIN + 8 * 1024 * 1024
    mover = Queue(queue_path)  # the default cap: room for everything
    moved: list[int] = []

    def on_error(exc: Exception, batch: list[dict[str, Any]]) -> None:
        if not moved:  # while flush() delivers: the other mover takes the spools in
            moved.append(mover.move_spools(scan_now=True))

    client = _capped_client(collector, queue_path, cap, max_retries=0, on_error=on_error)
    try:
        _, padded = _held_back_by_the_cap(client, collector, queue_path, cap)
        collector.set_default(500)  # every delivery fails from now on
        result = client.flush()
        accepted = len(collector.messages())
        left = client.stats()
    finally:
        client.close(timeout=5)
        mover.close()
    assert moved == [60]
    assert accepted == 0
    assert (left.pending, left.spooled) == (padded + 60, 0)
    assert (result.sent, result.pending, result.dead_lettered) == (0, padded + 60, 0)


def test_flush_ends_when_others_calls_keep_taking_the_room_its_held_back_calls_need(
    collector: Collector, queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other processes' calls that take every bit of room as soon as deliveries make it
    keep the held-back calls out; flush() delivers those calls each round, and would go on
    as long as they come. It ends once a whole round took none of its held-back calls in,
    and counts them pending."""
    cap = SPOOL_MARGIN + 8 * 1024 * 1024
    client = _capped_client(collector, queue_path, cap)
    try:
        _, padded = _held_back_by_the_cap(client, collector, queue_path, cap)
        queue = client.queue
        dest = queue.destination(collector.url, WRITE_KEY)
        newest = queue.max_id
        rounds = 0

        def max_id() -> int:
            # Another process's call lands first every time, and the room goes to it.
            nonlocal rounds
            rounds += 1
            assert rounds < 50, "flush() kept going while no held-back call moved in"
            with contextlib.closing(sqlite3.connect(str(queue_path))) as other, other:
                other.execute(
                    "INSERT INTO messages (dest, body, size, enqueued_at) VALUES (?, ?, ?, 0)",
                    (dest, body(20_000 + rounds), len(body(20_000 + rounds))),
                )
            return newest()

        monkeypatch.setattr(queue, "max_id", max_id)
        # The room each round makes is gone before a move gets there: none moves in.
        monkeypatch.setattr(spool_module.Spools, "move", lambda *_, **__: 0)
        result = client.flush()
    finally:
        monkeypatch.undo()
        client.close(timeout=5)
    assert rounds <= 3
    assert (result.pending, result.dead_lettered) == (60, 0)
    assert result.sent >= padded


def test_flush_delivers_held_back_calls_that_moved_into_a_file_its_deliveries_emptied(
    collector: Collector, queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that deliveries emptied gives the next rows ids from 1 again, at or below
    the id flush() delivered up to: held-back calls moved in then are still delivered by
    it (not taken for sent because no id past its top appeared)."""
    cap = SPOOL_MARGIN + 8 * 1024 * 1024
    client = _capped_client(collector, queue_path, cap)
    try:
        spooled, padded = _held_back_by_the_cap(client, collector, queue_path, cap)
        queue = client.queue
        move = spool_module.Spools.move
        newest = queue.max_id
        moving = [False]

        def max_id() -> int:
            moving[0] = True  # only flush's own look moves spools in, once the file is empty
            try:
                return newest()
            finally:
                moving[0] = False

        def move_when_looked_for(self: Any, *args: Any, **kwargs: Any) -> int:
            return move(self, *args, **kwargs) if moving[0] else 0

        monkeypatch.setattr(spool_module.Spools, "move", move_when_looked_for)
        monkeypatch.setattr(queue, "max_id", max_id)
        result = client.flush()
        received = collector.message_ids()
    finally:
        monkeypatch.undo()
        client.close(timeout=5)
    assert all(received[m] == 1 for m in spooled)
    assert (result.sent, result.pending, result.dead_lettered) == (padded + 60, 0, 0)


_CAPPED_PRODUCER = r"""
import os, sys, time
from durable_analytics._store.sqlite import SqliteQueue as Queue
path, cap, size, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[5]
spool = sys.argv[4] == "1"
q = Queue(path, max_queue_bytes=cap, spool=spool)
dest = q.destination(sys.argv[6], sys.argv[7])
while not os.path.exists(go):
    time.sleep(0.001)
stored = drops = 0
while drops < 2000:
    if q.append(dest, b"x" * size):
        stored += 1
    else:
        drops += 1
q.max_id()  # as flush() does: moves what this process spooled
q.close()
print(stored)
"""


@pytest.mark.parametrize("spool", [False, True], ids=["no-spool", "spool"])
def test_several_producer_processes_filling_a_capped_queue_stay_near_the_cap(
    tmp_path: Path, spool: bool
) -> None:
    """Four processes append 2,100-byte messages (one row per page: about twice the cap's
    estimate of a row) until each saw 2,000 drops, with nobody delivering
    (``flusher="none"``, no worker). The file's used size ends within 2 MiB of
    ``max_queue_bytes``; every stored message is in it once.

    With spools, 5-12 MiB over before: ``SPOOL_MARGIN`` covered one process's spool, but
    each process spools up to ``MOST_SPOOLED`` rows and a move skipped the cap's check.
    Now the margin counts every spool and a move leaves what has no room in its spool.
    """
    path = tmp_path / "q.db"
    cap = SPOOL_MARGIN + 16 * 1024 * 1024
    Queue(path, max_queue_bytes=cap).close()
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CAPPED_PRODUCER,
                str(path),
                str(cap),
                "2100",
                "1" if spool else "0",
                str(go),
                HOST,
                KEY,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    go.touch()
    stored = sum(int(p.communicate(timeout=120)[0]) for p in procs)
    q = Queue(path, max_queue_bytes=cap)
    q.max_id()  # adopts any spool left behind
    used = q._db.read(lambda conn: used_bytes(conn, 4096))
    assert q.pending() == stored  # lost 0, duplicated 0
    q.close()
    assert used <= cap + 2 * 1024 * 1024, f"{(used - cap) / 2**20:.1f} MiB over the cap"


@contextmanager
def spool_held_exclusively(file: Path) -> Iterator[None]:
    """One spool file held by another connection in exclusive locking mode."""
    holder = sqlite3.connect(str(file), isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        holder.close()


def _killed_spoolers(path: Path, *counts: int) -> list[Path]:
    """Spools left by killed producers, ``counts[i]`` messages each; their files, sorted."""
    for count in counts:
        child = _child_spools(path, count)
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        child.wait()  # type: ignore[attr-defined]
    return sorted(spool_dir(path).glob("*.db"))


def test_a_spool_nobody_can_read_does_not_fail_another_process_lease(tmp_path: Path) -> None:
    """Another process's spool is not on the delivery path: held so that it cannot even be
    read (an operator's shell in exclusive locking mode), it is left for later; the lease
    of what the file holds goes on, instead of raising QueueBusy at every retry of it."""
    from durable_analytics.exceptions import QueueBusy

    path = tmp_path / "q.db"
    Queue(path).destination(HOST, KEY)
    (held,) = _killed_spoolers(path, 5)
    deliverer = Queue(path)
    dest = deliverer.destination(HOST, KEY)
    deliverer.append(dest, body(100))
    with spool_held_exclusively(held):
        try:
            lease = deliverer.lease(10, 500_000)
        except QueueBusy:
            pytest.fail("lease raised QueueBusy for another process's unreadable spool")
    assert lease is not None
    deliverer.ack(lease)
    assert deliverer.move_spools(scan_now=True) == 5
    assert spooled_indexes(deliverer) == list(range(5))
    assert spool_files(path) == []


def test_a_spool_nobody_can_read_does_not_keep_the_others_from_moving_in(tmp_path: Path) -> None:
    """``max_id`` (each flush, drain and exit) moves in every spool it can: one that cannot
    be read, first in the directory's order, must not hold back those after it, which it
    retries at each flush while it stays held."""
    path = tmp_path / "q.db"
    Queue(path).destination(HOST, KEY)
    held, readable = _killed_spoolers(path, 3, 4)
    q = Queue(path)
    with spool_held_exclusively(held):
        for _ in range(2):  # the second flush retries the held one first (scan_now)
            started = time.monotonic()
            with q.bounded(0.5):
                q.max_id()
            assert time.monotonic() - started < 1.0
        assert not readable.exists()  # moved in, and its files removed
        assert spooled_indexes(q) == list(range(4))
        assert q.pending() == 2 + 4  # each child's first call, in the file; the held spool
        # is not counted (nor lost)
    assert q.move_spools(scan_now=True) == 3
    assert spooled_indexes(q) == sorted([*range(3), *range(4)])
    assert spool_files(path) == []


def test_held_back_calls_in_a_spool_nobody_can_read_still_count_as_held(tmp_path: Path) -> None:
    """``held_back_left`` tells flush how many of its held-back calls are not moved in yet.
    A spool held so that it cannot be read since ``held_back`` looked is not moved in:
    counted 0, flush took its calls for delivered (``sent``) and stopped waiting for them."""
    path = tmp_path / "q.db"
    Queue(path).destination(HOST, KEY)
    (held,) = _killed_spoolers(path, 5)
    q = Queue(path)
    dest = q.destination(HOST, KEY)
    marks = q.held_back(destination=dest)
    assert q.held_back_left(marks, destination=dest) == 5
    with spool_held_exclusively(held), q.bounded(0.2):
        assert q.held_back_left(marks, destination=dest) == 5
    assert q.move_spools(scan_now=True) == 5
    assert q.held_back_left(marks, destination=dest) == 0


def test_a_mover_restarting_a_spools_log_never_holds_the_spool_directory_exclusively(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool directory's fence is every process's spool's: a mover that checkpoints a
    spool and starts its log over takes it shared, like any writer, never exclusively (the
    queue file's restart does take its own directory's exclusively)."""
    from durable_analytics._store.sqlite import fence as fence_module
    from durable_analytics._store.sqlite.spool import open_spool, spool_dir

    taken: list[Path] = []
    real = fence_module.CommitFence.try_exclusive

    def recording(self: fence_module.CommitFence, wait: float) -> bool:
        taken.append(self.directory)
        return real(self, wait)

    monkeypatch.setattr(fence_module.CommitFence, "try_exclusive", recording)
    q = Queue(tmp_path / "q.sqlite3")
    spool = open_spool(q, spool_dir(q.path) / "1-test.db")
    assert not spool.restart_exclusive
    for target in (spool, q):
        dest = target.destination(HOST, KEY)
        for i in range(5):
            target.append(dest, b'{"i":%d}' % i)
        target._run_checkpoint(False)  # PASSIVE, RESTART and the commit starting the log
    assert taken == [q.path.parent]
    spool.close()
    q.close()


def test_holds_others_sees_another_destinations_calls_still_in_a_spool(tmp_path: Path) -> None:
    """A call spooled for another destination is pending (``pending`` counts it), so the
    look the flusher makes while ``flush()`` delivers one destination finds it too."""
    path = tmp_path / "q.db"
    q, dest = spooling(path)
    other = q.destination(OTHER_HOST, OTHER_KEY)
    with write_lock_held(path):
        assert q.append(dest, body(0)) < 0
        assert not q.holds_others([dest])
        assert q.append(other, body(1)) < 0
        assert q.holds_others([dest])
        assert not q.holds_others([dest, other])
    q.close()


def test_holds_others_sees_a_spooled_message_moved_in_between_its_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spools are looked at before the file: a spooled message of another destination
    that a mover (``flush()``'s own pass before each lease, a worker) moves into the file
    while ``holds_others`` looks is seen in one or the other. With the file looked at
    first, a move just before the spools' look hid it from both (pinned here by moving
    it at that moment)."""
    path = tmp_path / "q.db"
    q, dest = spooling(path)
    other = q.destination(OTHER_HOST, OTHER_KEY)
    with write_lock_held(path):
        assert q.append(other, body(1)) < 0  # spooled: the queue file was busy
    real = spool_counts.holds_others
    moves: list[int] = []

    def moved_meanwhile(spools: Any, queue: Any, destinations: tuple[int, ...]) -> bool:
        moves.append(queue.move_spools(scan_now=True))  # another thread's move, right now
        return real(spools, queue, destinations)

    monkeypatch.setattr(spool_counts, "holds_others", moved_meanwhile)
    assert q.holds_others([dest])
    assert moves == [1]
    assert q.pending(destination=other) == 1  # in the file now
    q.close()


def test_holds_others_says_maybe_for_a_spool_it_could_not_read(tmp_path: Path) -> None:
    """A spool another connection holds exclusively (a backup, an operator's shell) cannot
    be looked into: it may hold another destination's messages, so the answer is True."""
    path = tmp_path / "q.db"
    q = Queue(path, spool=True)
    dest = q.destination(HOST, KEY)
    other = q.destination(OTHER_HOST, OTHER_KEY)
    child = _child_spools(path, 5, host=OTHER_HOST, key=OTHER_KEY)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with contextlib.closing(sqlite3.connect(str(path), isolation_level=None)) as conn:
        conn.execute("DELETE FROM messages")  # the child's one message in the file
    assert q.pending(destination=other) == 5  # all in its spool
    assert q.holds_others([dest])
    assert not q.holds_others([dest, other])
    with spools_held_exclusively(path) as held:
        assert held == 1
        assert q.holds_others([dest, other])  # unsure: True
    q.close()
