"""Adversarial review of spools: each test states a promise and fails while it is broken."""

from __future__ import annotations

import gc
import os
import shutil
import sqlite3
from pathlib import Path

from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite.spool import _owner_gone, spool_dir

from .sqlite_helpers import HOST, KEY, body
from .test_sqlite_spool import queued_indexes, spool_files, spooling, write_lock_held


def _spool_db(path: Path) -> Path:
    return spool_dir(path) / next(n for n in spool_files(path) if n.endswith(".db"))


def test_a_damaged_own_spool_does_not_stop_this_process_from_delivering(tmp_path: Path) -> None:
    """The docs: a damaged spool turns spooling off; nothing else changes. A lease of
    the file's own messages must go on."""
    path = tmp_path / "q.db"
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
        fd = _owner_gone(spool_dir(path) / name)
        if fd == -1:
            held += 1
        elif fd >= 0:
            os.close(fd)
    assert held == 0, f"{held} spools of closed queues still locked by this process"


def test_spooled_rows_moved_in_never_push_the_file_past_max_queue_size(tmp_path: Path) -> None:
    """max_queue_size with overflow=drop_newest: the file never holds more than the cap."""
    path = tmp_path / "q.db"
    cap = 400
    q, dest = spooling(path, max_queue_size=cap, overflow="drop_newest")
    with write_lock_held(path):
        spooled = [q.append(dest, body(i)) for i in range(200)]
    assert sum(1 for i in spooled if i < 0) > 100
    # Another process (its own queue object, no spool) fills the file up to the cap.
    other = Queue(path, max_queue_size=cap, overflow="drop_newest")
    odest = other.destination(HOST, KEY)
    for i in range(1000, 1000 + cap + 50):
        other.append(odest, body(i))
    other.max_id()  # the other process does not own the spool; it moves others' too
    q.max_id()  # this process's flush moves its own spool
    assert len(q.bodies()) <= cap


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
    path = tmp_path / "q.db"
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
