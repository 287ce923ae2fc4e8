"""Journals: a Client's calls are stored with one ``write()`` each in its process's journal,
and every journaled call reaches the queue exactly once — whoever moves it, however many
move at once, whichever process dies on the way, whatever a damaged or foreign file holds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import WRITE_KEY, run_python, start_python

from durable_analytics import Client
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite import journal as journal_module
from durable_analytics._store.sqlite import journal_moves
from durable_analytics._store.sqlite import spool as spool_module
from durable_analytics._store.sqlite.journal import encode, names_of, parse
from durable_analytics._store.sqlite.spool import spool_dir
from durable_analytics.testing import Collector

from .sqlite_helpers import HOST, KEY, body


def in_file(path: Path) -> Counter[str]:
    """The messageIds in the queue file itself (not in journals or spools)."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT body FROM messages").fetchall()
    finally:
        conn.close()
    return Counter(str(json.loads(r[0])["messageId"]) for r in rows)


def journals(path: Path) -> list[Path]:
    directory = spool_dir(path)
    return sorted(directory.glob("*.log")) if directory.is_dir() else []


def move_all(path: Path) -> int:
    """What a worker or drain does first: move every process's journals and spools in."""
    mover = Queue(path)
    try:
        return mover.move_spools(scan_now=True)
    finally:
        mover.close()


def records(n: int, start: int = 0) -> tuple[bytes, list[bytes]]:
    """``n`` journal records of distinct bodies, and those bodies."""
    names = names_of(HOST, KEY)
    bodies = [body(start + i, pad=i * 7 % 50) for i in range(n)]
    return b"".join(encode(names, b, 1_700_000_000.0 + i) for i, b in enumerate(bodies)), bodies


# --------------------------------------------------------------------------- the format


def test_a_journal_cut_at_any_byte_reads_as_a_prefix_of_its_records_never_damaged() -> None:
    """A record cut short (a writer killed inside ``write()``, a read racing a write) ends
    the read; every complete record before it is read whole, with its names and time."""
    data, bodies = records(6)
    ends = [e.end for e in parse(data, 0)[0]]
    for cut in range(len(data) + 1):
        entries, end, damaged = parse(data[:cut], 0)
        complete = sum(1 for e in ends if e <= cut)
        assert not damaged
        assert [e.body for e in entries] == bodies[:complete]
        assert end == (ends[complete - 1] if complete else 0)
        assert all((e.host, e.write_key) == (HOST, KEY) for e in entries)
        assert [e.enqueued_at for e in entries] == [1_700_000_000.0 + i for i in range(complete)]
        assert all(e.size == len(e.body) for e in entries)


def test_a_changed_byte_never_yields_a_record_that_was_not_written() -> None:
    """Any single byte changed anywhere: the read stops at or before the changed record
    (damaged, or cut short when the length grew), and what it returns is the records
    before it, unchanged."""
    data, bodies = records(4)
    for at in range(len(data)):
        changed = bytearray(data)
        changed[at] ^= 0x41
        entries, _, _ = parse(bytes(changed), 0)
        assert [e.body for e in entries] == bodies[: len(entries)]
        first_changed = sum(1 for e in parse(data, 0)[0] if e.end <= at)
        assert len(entries) <= first_changed


def test_offsets_are_those_of_the_file_when_read_from_the_middle() -> None:
    data, bodies = records(5)
    ends = [e.end for e in parse(data, 0)[0]]
    entries, end, damaged = parse(data[ends[1] :], ends[1])
    assert not damaged
    assert [e.body for e in entries] == bodies[2:]
    assert [e.end for e in entries] == ends[2:]
    assert end == len(data)


# --------------------------------------------------------------------------- a Client's calls


def test_a_clients_calls_go_to_its_journal_counted_pending_and_are_delivered_once(
    queue_path: Path, collector: Collector
) -> None:
    client = Client(
        WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="none", on_exit="none"
    )
    ids = [client.track("u", "J", {"i": i})[1]["messageId"] for i in range(200)]
    assert len(journals(queue_path)) == 1
    in_journal = set(ids) - set(in_file(queue_path))
    assert len(in_journal) >= 199  # (the first call may meet an empty file: it goes there)
    assert client.queue.pending() == 200
    stats = client.stats()
    assert stats.pending == 200
    assert stats.spooled == len(in_journal)
    result = client.flush(timeout=30)
    assert (result.sent, result.pending) == (200, 0)
    assert collector.message_ids() == Counter(ids)
    client.close()


def test_calls_journal_without_waiting_while_another_process_holds_the_write_lock(
    queue_path: Path, collector: Collector
) -> None:
    """A lease or ack of another process (here a connection in a write transaction) makes
    no call wait: each is one ``write()`` to the journal; once the lock is free, a flush
    moves and delivers every one."""
    client = Client(
        WRITE_KEY,
        host=collector.url,
        queue_path=queue_path,
        flusher="none",
        on_exit="none",
        busy_timeout=0.5,
    )
    client.track("u", "First")  # the file exists
    holder = sqlite3.connect(queue_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    ids = [client.track("u", "Held", {"i": i})[1]["messageId"] for i in range(500)]
    took = time.monotonic() - started
    holder.execute("COMMIT")
    holder.close()
    assert took < 0.5  # a single wait for the lock would have been busy_timeout, 0.5 s
    assert client.flush(timeout=30).pending == 0
    received = collector.message_ids()
    assert all(received[i] == 1 for i in ids)
    client.close()


def test_durability_full_never_journals(queue_path: Path) -> None:
    """With ``durability="full"`` each call is a synced commit in the file itself."""
    client = Client(
        WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none", durability="full"
    )
    for i in range(20):
        client.track("u", "Full", {"i": i})
    assert journals(queue_path) == []
    assert sum(in_file(queue_path).values()) == 20
    client.close(timeout=0)


def test_the_first_call_of_a_process_is_stored_in_the_file_not_journaled(
    queue_path: Path,
) -> None:
    """The first measure after the file is opened is the exact one (never the files'
    sizes), so a process that makes one call and exits (``durable-analytics enqueue``, a
    cron script) leaves it in the queue file, not in a journal for the next process; the
    calls after it journal."""
    for run in range(2):
        client = Client(WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none")
        first = client.track("u", "First", {"run": run})[1]["messageId"]
        assert in_file(queue_path).get(first) == 1
        later = client.track("u", "Later", {"run": run})[1]["messageId"]
        assert later not in in_file(queue_path)  # journaled
        client.queue.move_spools()
        client.queue.close()


@pytest.mark.parametrize("room", ["to spare", "near the cap"])
def test_a_due_measure_far_from_the_cap_takes_the_files_sizes_and_the_call_still_journals(
    queue_path: Path, room: str
) -> None:
    """The periodic measure of the file for the caps: with room to spare (the default 1 GiB
    cap), the call that finds it due takes the sizes of the file and its ``-wal`` (never
    less than the pages in use) and journals, with no SQLite read and no commit (that call
    took ~0.3 ms, one in ~7,000); near the cap it reads the exact size and stores the
    call in the file, as before."""
    cap = {"to spare": None, "near the cap": 64 * 1024 * 1024}[room]
    client = Client(
        WRITE_KEY,
        queue_path=queue_path,
        flusher="none",
        on_exit="none",
        **({} if cap is None else {"max_queue_bytes": cap}),
    )
    for i in range(50):
        client.track("u", "Before", {"i": i, "pad": "p" * 500})
    client.queue.move_spools()  # pages in use in the file, and some in its -wal
    queue = client.queue
    appender = queue._appender
    statements: list[str] = []
    with queue._db.locked(queue._db.read_lock):
        queue._db.conn().set_trace_callback(statements.append)
    appender.since_refresh = appender.refresh_every  # the measure is due
    due = client.track("u", "Due")[1]["messageId"]
    queue._db.conn().set_trace_callback(None)
    assert appender.since_refresh < appender.refresh_every  # measured
    conn = sqlite3.connect(queue_path)
    try:
        pages, free, size = (
            conn.execute(f"PRAGMA {p}").fetchone()[0]
            for p in ("page_count", "freelist_count", "page_size")
        )
        exact = (pages - free) * size
    finally:
        conn.close()
    if room == "to spare":
        assert statements == []
        assert due not in in_file(queue_path)  # journaled
        assert appender.est_used >= exact  # on the safe side
    else:
        assert any("page_count" in sql for sql in statements)
        assert due in in_file(queue_path)
    client.queue.move_spools()
    assert in_file(queue_path)[due] == 1
    client.close(timeout=0)


def test_the_bound_sends_calls_to_the_file_until_moves_free_the_journal(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal holds at most ``MOST_JOURNALED`` bytes of files not yet deleted (its
    mover may be away): past it, calls go to the queue file; once its sealed files are
    moved and deleted, calls journal again. Every call is stored once."""
    monkeypatch.setattr(journal_module, "ROTATE_BYTES", 4096)
    monkeypatch.setattr(journal_module, "MOST_JOURNALED", 16 * 1024)
    client = Client(WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none")
    ids = [client.track("u", "B", {"i": i, "pad": "x" * 200})[1]["messageId"] for i in range(300)]
    held = sum(p.stat().st_size for p in journals(queue_path))
    assert 16 * 1024 <= held < 16 * 1024 + 4096
    assert sum(in_file(queue_path).values()) > 200  # the rest went to the file
    assert client.queue.move_spools() > 0
    assert len(journals(queue_path)) == 1  # the sealed files were deleted once moved
    more = [client.track("u", "B2", {"i": i})[1]["messageId"] for i in range(20)]
    assert journals(queue_path)[0].stat().st_size > 0  # journaling again
    client.queue.move_spools()
    assert in_file(queue_path) == Counter(ids + more)
    client.close(timeout=0)


def test_with_many_processes_on_the_queue_a_journal_holds_its_share_in_smaller_files(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the processes holding journals or spools outnumber what ``SPOOL_MARGIN`` each
    leaves under ``max_queue_bytes``, a journal holds its share of ``MOST_JOURNALED`` (and
    rotates at a quarter of that, so that moved files are deleted within it); past the
    share, calls go to the file. Every call is stored once."""
    monkeypatch.setattr(journal_module, "MOST_JOURNALED", 64 * 1024)
    client = Client(WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none")
    first = client.track("u", "first")[1]["messageId"]
    spools = client.queue._spools
    assert spools is not None
    monkeypatch.setattr(spools, "spoolers", lambda: 40)
    share = spools.hold_share(client.queue, 300)
    assert 0.5 < share < 1
    bound = int(64 * 1024 * share)
    ids = [client.track("u", "B", {"i": i, "pad": "x" * 200})[1]["messageId"] for i in range(400)]
    files = journals(queue_path)
    held = sum(p.stat().st_size for p in files)
    assert bound <= held < bound + bound // 4 + 1024
    assert len(files) >= 4  # files of about a quarter of the bound each
    assert sum(in_file(queue_path).values()) > 100  # the rest went to the file
    client.queue.move_spools()
    assert in_file(queue_path) == Counter([first, *ids])
    client.close(timeout=0)


def test_a_share_that_shrank_below_the_file_being_written_rotates_it_and_journals_again(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal file that grew under a full share (up to 1 MiB) when the share then
    shrinks below it (more processes, a file nearer its cap): the next call seals that
    file, which its mover deletes once moved, and calls journal again. Before, the bound
    refused every call while the file, never sealed, stayed on disk whole."""
    monkeypatch.setattr(journal_module, "LOOK_EVERY", 0.0)
    client = Client(WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none")
    first = client.track("u", "first")[1]["messageId"]
    spools = client.queue._spools
    assert spools is not None
    share = [1.0]
    monkeypatch.setattr(spools, "hold_share", lambda queue, size, nested=False: share[0])
    ids = [client.track("u", "burst", {"pad": "x" * 250})[1]["messageId"] for _ in range(1700)]
    (big,) = journals(queue_path)
    assert big.stat().st_size > 800 * 1024  # one file, not yet rotated
    client.queue.move_spools(scan_now=True)
    share[0] = 1 / 16  # a bound of 512 KiB, below that file
    before = sum(in_file(queue_path).values())
    later = [client.track("u", "later", {"i": i})[1]["messageId"] for i in range(200)]
    assert sum(in_file(queue_path).values()) - before == 200  # past the bound: to the file
    client.queue.move_spools(scan_now=True)
    assert not big.exists()  # sealed by the first later call, deleted once moved
    before = sum(in_file(queue_path).values())
    more = [client.track("u", "more", {"i": i})[1]["messageId"] for i in range(200)]
    assert sum(in_file(queue_path).values()) == before  # journaled again
    client.queue.move_spools(scan_now=True)
    assert in_file(queue_path) == Counter([first, *ids, *later, *more])
    client.close(timeout=0)


_SHARING_PRODUCER = """
import json, os, sys, time
from durable_analytics import Client
from durable_analytics.exceptions import QueueBusy
path, cap, ready, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
client = Client("key", queue_path=path, flusher="none", on_exit="none",
                max_queue_bytes=cap, busy_timeout=0.3)
client.track("u", "first")  # the destination exists, and this process's journal
open(ready + str(os.getpid()), "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
time.sleep(0.2)  # past the next count of the processes that hold journals
ids, raised = [], 0
for i in range(200):
    try:
        ids.append(client.track("u", "shared", {"i": i})[1]["messageId"])
    except QueueBusy:
        raised += 1
        if raised == 3:
            break
print(json.dumps({"ids": ids, "raised": raised}))
"""


def test_processes_beyond_what_the_margin_fits_still_journal_and_never_wait_for_the_file(
    tmp_path: Path,
) -> None:
    """Six producer processes on a queue whose cap fits ``SPOOL_MARGIN`` for four; the file
    held locked by another connection (a lease, a move) while all of them call. Every call
    returns at once from the journal: none raises ``QueueBusy`` (before, once a process
    had counted the others, each of its calls waited for the file). Lost 0, duplicated 0."""
    path = tmp_path / "q.db"
    cap = 4 * spool_module.SPOOL_MARGIN
    Queue(path, max_queue_bytes=cap).close()
    ready, go = str(tmp_path / "ready-"), tmp_path / "go"
    procs = [start_python(_SHARING_PRODUCER, str(path), str(cap), ready, str(go)) for _ in range(6)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    holder = sqlite3.connect(str(path), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        go.touch()
        outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    finally:
        holder.close()
    assert [o["raised"] for o in outs] == [0] * 6
    move_all(path)
    stored = in_file(path)
    sent = Counter(i for o in outs for i in o["ids"])
    assert len(sent) == 1200
    assert all(stored[i] == 1 for i in sent)  # lost 0, duplicated 0


@pytest.mark.parametrize("outlet", ["journal", "spool", "refresh due"])
def test_a_signal_handlers_call_inside_a_waiting_call_is_stored_past_the_bound_at_once(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch, outlet: str
) -> None:
    """A call waits for the write lock (its journal at the bound and its spool full, or the
    estimates of the file's size due to be measured; another thread holding the lock); a
    signal handler's call on that thread does not wait behind it but journals past the
    bound (or, with the journal off, spools past the spool's).
    Before, each handler's call waited too, inside the one it interrupted: a storm of
    signals nested deeper with every signal, until a RecursionError (CI, 1,500 signals a
    second beside a flusher thread)."""
    if outlet != "refresh due":
        monkeypatch.setattr(journal_module, "MOST_JOURNALED", 0)
        monkeypatch.setattr(spool_module, "MOST_SPOOLED", 0)
    client = Client(WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none")
    client.track("u", "first")  # the destination and the queue's connection exist
    journal = client.queue._spools.journal
    assert journal is not None
    if outlet == "spool":
        journal.off = True
    appender = client.queue._appender
    lock = client.queue._db.write_lock
    held = threading.Event()
    release = threading.Event()
    seen: dict[str, object] = {}

    def holder() -> None:
        with lock:
            held.set()
            release.wait(10)

    def on_usr1(signum: int, frame: object) -> None:
        seen["ok"] = client.track("u", "handler")[0]
        seen["while_held"] = not release.is_set()

    main = threading.get_ident()
    spools = client.queue._spools

    def signal_then_release() -> None:
        # Once the main thread's call waits for the lock (it counts itself waiting then).
        deadline = time.monotonic() + 10
        while main not in spools._waiting and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.3)
        release.set()

    previous = signal.signal(signal.SIGUSR1, on_usr1)
    try:
        threading.Thread(target=holder, daemon=True).start()
        assert held.wait(5)
        threading.Thread(target=signal_then_release, daemon=True).start()
        if outlet == "refresh due":
            # This call measures the file for the caps, inside a write transaction (a drop
            # to record: no measuring by a read first): it waits for the lock.
            appender.since_refresh = appender.refresh_every
            appender.unsaved_drops = 1
        ok, _ = client.track("u", "waiting")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert ok
    assert seen["ok"] is True
    assert seen["while_held"] is True  # it returned while the lock was still held
    spooled = list(spool_dir(queue_path).glob("*.db"))
    assert bool(spooled) == (outlet == "spool")
    client.queue.move_spools()
    assert Counter(m["event"] for m in _bodies_in_file(queue_path)) == {
        "first": 1,
        "waiting": 1,
        "handler": 1,
    }
    client.close(timeout=0)


@pytest.mark.parametrize(
    "moment", ["after its write", "before its write", "after a short write", "inside a handler"]
)
def test_a_signal_handlers_call_right_after_its_threads_own_journal_write_is_journaled_too(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """A real SIGUSR1 whose handler calls track() lands while the main thread's call is
    inside its journal write (sent from inside that ``os.write``). Right after the write,
    the handler's call journals its record after the interrupted one, at once, instead of
    going to the queue file and its locks (CI: behind a delivery thread that held the
    file's lock and waited for a lock the interrupted call held, every further handler
    nested until a RecursionError). Anywhere else it goes to the queue file: before the
    write; after a short write (as on a full disk), which the interrupted call cuts off
    with whatever would follow it; and inside the handler's own journal write (a second
    handler). Every call is stored once, the journal holds whole records only, and its
    bookings match the file."""
    client = Client(WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none")
    client.track("u", "first")  # the destination, the connection and the journal exist
    journal = client.queue._spools.journal
    assert journal is not None
    real_write = os.write
    writes: list[int] = []
    seen: dict[str, object] = {}

    def on_usr1(signum: int, frame: object) -> None:
        inner = "entered" in seen
        seen["entered"] = True
        name = "inner handler" if inner else "handler"
        seen["inner ok" if inner else "ok"] = client.track("u", name)[0]

    def write(fd: int, data: bytes) -> int:
        if fd != journal.fd_box[0]:
            return real_write(fd, data)
        writes.append(len(data))
        signalled = len(writes) == 1 or (len(writes) == 2 and moment == "inside a handler")
        if not signalled:
            return real_write(fd, data)
        if moment == "before its write":
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs here, before the write
            return real_write(fd, data)
        if moment == "after a short write":
            data = data[: len(data) // 2]
        written = real_write(fd, data)
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs here, after the write
        return written

    previous = signal.signal(signal.SIGUSR1, on_usr1)
    try:
        monkeypatch.setattr(journal_module.os, "write", write)
        ok, _ = client.track("u", "interrupted")
        monkeypatch.setattr(journal_module.os, "write", real_write)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert ok
    assert seen["ok"] is True
    assert seen.get("inner ok", True) is True
    data = b"".join(f.read_bytes() for f in journals(queue_path))
    assert journal.files.get(journal.stem, 0) == len(data)  # booked: what the file holds
    entries, end, damaged = parse(data, 0)
    assert (end, damaged) == (len(data), False)  # whole records only
    in_journal = [e for e in (json.loads(e.body)["event"] for e in entries) if e != "first"]
    expected = {
        "after its write": ["interrupted", "handler"],
        "before its write": ["interrupted"],
        "after a short write": [],  # cut off: the interrupted call went to the file too
        "inside a handler": ["interrupted", "handler"],
    }
    assert in_journal == expected[moment]
    client.queue.move_spools()
    stored = Counter(m["event"] for m in _bodies_in_file(queue_path))
    assert stored == {"first": 1, "interrupted": 1, "handler": 1} | (
        {"inner handler": 1} if moment == "inside a handler" else {}
    )
    client.close(timeout=0)


def _bodies_in_file(path: Path) -> list[dict[str, object]]:
    conn = sqlite3.connect(path)
    try:
        return [json.loads(r[0]) for r in conn.execute("SELECT body FROM messages")]
    finally:
        conn.close()


def test_a_journal_rotates_and_a_worker_deletes_a_live_owners_sealed_files(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files of ``ROTATE_BYTES``: another process's mover (a worker) moves them all and
    deletes those sealed by a newer one, with their records; the file being written stays.
    Then the owner's own move finds nothing more and nothing twice."""
    monkeypatch.setattr(journal_module, "ROTATE_BYTES", 4096)
    client = Client(WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none")
    ids = [client.track("u", "R", {"i": i, "pad": "y" * 100})[1]["messageId"] for i in range(150)]
    assert len(journals(queue_path)) > 3
    move_all(queue_path)
    left = journals(queue_path)
    assert len(left) == 1
    assert left[0].stem == client.queue._spools.journal.stem  # type: ignore[union-attr]
    conn = sqlite3.connect(queue_path)
    records = dict(conn.execute("SELECT name, value FROM counters WHERE name LIKE 'spool:%'"))
    conn.close()
    # The deleted files' records are tombstones (the deletion's time, negated) for a while.
    assert [name for name, value in records.items() if value >= 0] == ["spool:" + left[0].stem]
    assert all(-value > time.time() - 60 for value in records.values() if value < 0)
    assert client.queue.move_spools() == 0
    assert in_file(queue_path) == Counter(ids)
    client.close(timeout=0)


# --------------------------------------------------------------------------- processes

PRODUCER = """
import os, sys, time
from durable_analytics import Client
path, n = sys.argv[1], int(sys.argv[2])
client = Client("k", host="https://api.example.test", queue_path=path, flusher="none",
                on_exit="none")
for i in range(n):
    client.track("u", "P", {"i": i}, message_id="p-%06d" % i)
j = client.queue._spools.journal
print(j.dir / (j.stem + ".log"), flush=True)
time.sleep(600)
"""


def test_a_killed_producers_journal_is_adopted_and_its_cut_off_record_dropped(
    queue_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A producer killed while writing a record: a mover takes every complete record (each
    a call that returned), drops the part (a call that never returned), says so, and
    deletes the journal and its owner lock once the owner is gone."""
    proc = start_python(PRODUCER, str(queue_path), "300")
    assert proc.stdout is not None
    journal_path = Path(proc.stdout.readline().strip())
    partial, _ = records(1, start=999)
    with journal_path.open("ab") as f:
        f.write(partial[: len(partial) // 2])  # as a write() cut by the kill would
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="durable_analytics.queue"):
        moved = move_all(queue_path)
    assert moved >= 299
    assert in_file(queue_path) == Counter(f"p-{i:06d}" for i in range(300))
    assert "killed while writing" in caplog.text
    assert list(spool_dir(queue_path).iterdir()) == []


def test_movers_racing_a_producer_move_each_journaled_call_exactly_once(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer process journals 3,000 calls (small files: many rotations) while three
    movers of this process, each with its own queue object as separate workers would,
    move in a loop. Counted in the file afterwards: 3,000 messages, none twice."""
    Queue(queue_path).close()
    producer = start_python(
        """
        import sys
        from durable_analytics import Client
        from durable_analytics._store.sqlite import journal
        journal.ROTATE_BYTES = 8192
        client = Client("k", host="https://api.example.test", queue_path=sys.argv[1],
                        flusher="none", on_exit="none")
        for i in range(3000):
            client.track("u", "Race", {"i": i}, message_id="r-%06d" % i)
        print("done", flush=True)
        sys.stdin.readline()
        """,
        str(queue_path),
        stdin=-1,
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def mover() -> None:
        q = Queue(queue_path)
        try:
            while not stop.is_set():
                q.move_spools(scan_now=True)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            q.close()

    threads = [threading.Thread(target=mover) for _ in range(3)]
    for t in threads:
        t.start()
    assert producer.stdout is not None
    assert producer.stdout.readline().strip() == "done"
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(30)
    assert producer.stdin is not None
    producer.stdin.write("\n")
    producer.stdin.flush()
    producer.wait(30)
    move_all(queue_path)
    assert not errors
    counted = in_file(queue_path)
    assert len(counted) == 3000
    assert max(counted.values()) == 1
    assert list(spool_dir(queue_path).glob("*.log")) == []  # the owner is gone: all deleted


def test_a_forked_child_journals_to_a_file_of_its_own(queue_path: Path) -> None:
    """After ``fork()`` the child never appends to its parent's journal: each process's
    calls are in its own file, and a mover takes both, once each."""
    result = run_python(
        """
        import os, sys
        from durable_analytics import Client
        client = Client("k", host="https://api.example.test", queue_path=sys.argv[1],
                        flusher="none", on_exit="none")
        for i in range(10):
            client.track("u", "Parent", message_id="parent-%d" % i)
        pid = os.fork()
        if pid == 0:
            for i in range(10):
                client.track("u", "Child", message_id="child-%d" % i)
            os._exit(0)
        os.waitpid(pid, 0)
        for i in range(10, 20):
            client.track("u", "Parent", message_id="parent-%d" % i)
        print(len({p.name.split(".")[0] for p in client.queue._spools.dir.glob("*.log")}))
        """,
        str(queue_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"
    move_all(queue_path)
    expected = [f"parent-{i}" for i in range(20)] + [f"child-{i}" for i in range(10)]
    assert in_file(queue_path) == Counter(expected)


# --------------------------------------------------------------------------- damaged, foreign


def test_a_damaged_journal_moves_what_precedes_the_damage_and_is_left_on_disk(
    queue_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record that fails its check (the owner gone): the records before it are moved,
    the file stays as it is (for an operator), warned about once, and no longer counted."""
    Queue(queue_path).close()
    data, bodies = records(5)
    ends = [e.end for e in parse(data, 0)[0]]
    damaged = bytearray(data)
    damaged[ends[2] + 20] ^= 0xFF  # inside the fourth record's payload
    directory = spool_dir(queue_path)
    directory.mkdir(mode=0o700)
    path = directory / "4242-0123456789ab.1.log"
    path.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="durable_analytics.queue"):
        mover = Queue(queue_path)
        mover.move_spools(scan_now=True)
        assert mover.pending() == 3
        assert mover.stats().spooled == 0
        mover.close()
    assert in_file(queue_path) == Counter(json.loads(b)["messageId"] for b in bodies[:3])
    assert path.read_bytes() == bytes(damaged)
    assert "could not be moved" in caplog.text


def test_a_symlink_named_like_a_journal_is_never_followed(queue_path: Path, tmp_path: Path) -> None:
    """Whatever a link in the spool directory points at is neither moved nor counted."""
    Queue(queue_path).close()
    data, _ = records(3)
    target = tmp_path / "elsewhere.log"
    target.write_bytes(data)
    directory = spool_dir(queue_path)
    directory.mkdir(mode=0o700)
    (directory / "4242-0123456789ab.1.log").symlink_to(target)
    mover = Queue(queue_path)
    assert mover.move_spools(scan_now=True) == 0
    assert mover.pending() == 0
    mover.close()
    assert target.read_bytes() == data
    assert sum(in_file(queue_path).values()) == 0


def _plant_unsafe_spool_directory(queue_path: Path, kind: str) -> Path:
    """A spool directory another user could write, or theirs, or a link: a journal planted
    in it (three calls another user made up)."""
    directory = spool_dir(queue_path)
    data, _ = records(3)
    if kind == "link":
        real = queue_path.parent / "real-spool"
        real.mkdir(mode=0o700)
        (real / "4242-0123456789ab.1.log").write_bytes(data)
        directory.symlink_to(real)
        return directory
    directory.mkdir(mode=0o700)
    (directory / "4242-0123456789ab.1.log").write_bytes(data)
    if kind == "others-writable":
        os.chmod(directory, 0o777)
    else:
        os.chown(directory / "4242-0123456789ab.1.log", 65534, 65534)
        os.chown(directory, 65534, 65534)
    return directory


@pytest.mark.parametrize(
    "kind",
    [
        "others-writable",
        "link",
        pytest.param(
            "another-users",
            marks=pytest.mark.skipif(
                os.geteuid() != 0, reason="making a directory another user's needs root"
            ),
        ),
    ],
)
def test_a_spool_directory_another_user_controls_is_neither_journaled_to_nor_moved_from(
    queue_path: Path, collector: Collector, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Its owner (or anyone, when others can write it) could delete a journal before it is
    moved, losing calls that returned, or plant one that a mover delivers as if a call had
    made it. The queue file's directory was refused for that; the spool directory was used
    as found. Now calls go to the queue file, and nothing in the directory is moved or
    counted, with a warning saying why."""
    Queue(queue_path).close()
    directory = _plant_unsafe_spool_directory(queue_path, kind)
    client = Client(
        WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="none", on_exit="none"
    )
    with caplog.at_level(logging.WARNING, logger="durable_analytics"):
        ids = [client.track("u", "J", {"i": i})[1]["messageId"] for i in range(20)]
        assert in_file(queue_path) == Counter(ids)  # every call in the queue file itself
        assert client.queue.pending() == 20
        result = client.flush(timeout=30)
    client.close()
    assert (result.sent, result.pending) == (20, 0)
    assert collector.message_ids() == Counter(ids)  # not one of the planted calls
    assert move_all(queue_path) == 0
    assert sorted(p.name for p in directory.iterdir()) == ["4242-0123456789ab.1.log"]
    assert "not moving or counting what is in" in caplog.text


def test_looking_at_the_journals_files_while_they_rotate_and_are_forgotten_never_raises(
    tmp_path: Path,
) -> None:
    """A caller's append rotates files in while a mover forgets moved ones; what movers and
    calls ask of the list (``has_unmoved``, ``sealed``) iterated it unlocked, and a dict
    changed meanwhile raised ``RuntimeError`` (thousands of times in 20 s with a 1 us thread
    switch). They now read a copy."""
    journal = journal_module.Journal(tmp_path, lambda: "4242-0123456789ab")
    errors: list[BaseException] = []
    stop = threading.Event()

    def rotate_and_forget() -> None:
        while not stop.is_set():
            old = journal.stem
            journal._next_file()
            if old:
                journal.forget(old)
                (tmp_path / f"{old}.log").unlink()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    rotating = threading.Thread(target=rotate_and_forget)
    rotating.start()
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                journal.has_unmoved()
                journal.sealed()
            except RuntimeError as exc:
                errors.append(exc)
    finally:
        stop.set()
        rotating.join(5)
        sys.setswitchinterval(interval)
    assert errors == []


def test_a_file_not_named_as_a_journal_is_left_alone(queue_path: Path) -> None:
    Queue(queue_path).close()
    data, _ = records(3)
    directory = spool_dir(queue_path)
    directory.mkdir(mode=0o700)
    (directory / "notes.log").write_bytes(data)
    assert move_all(queue_path) == 0
    assert (directory / "notes.log").read_bytes() == data


def test_a_length_no_record_can_have_is_damage_not_a_record_still_being_written() -> None:
    """A header naming more than ``MOST_PAYLOAD`` bytes: the read stops there, damaged, so
    a gone owner's file is kept for an operator rather than dropped as a cut-off record."""
    data, bodies = records(2)
    bogus = bytes([0xDA]) + (journal_module.MOST_PAYLOAD + 1).to_bytes(4, "little") + bytes(4)
    entries, end, damaged = parse(data + bogus, 0)
    assert [e.body for e in entries] == bodies
    assert (end, damaged) == (len(data), True)


def test_a_write_cut_short_by_a_file_size_limit_is_taken_back_and_nothing_returned_is_lost(
    queue_path: Path,
) -> None:
    """A real short ``write()`` (``RLIMIT_FSIZE`` reached inside a record, as a full disk
    does): the partial record is cut off the journal, the call goes to the queue file, and
    the journal stops in that process (the next write fails outright). Counted: every call
    that returned is stored once, and the journal ends on a record boundary."""
    result = run_python(
        """
        import resource, signal, sys
        from durable_analytics import Client
        from durable_analytics._store.sqlite import journal
        journal.ROTATE_BYTES = 1 << 30  # one file, which meets the limit
        client = Client("k", host="https://api.example.test", queue_path=sys.argv[1],
                        flusher="none", on_exit="none")
        client.track("u", "Warm", message_id="warm")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))
        returned = ["warm"]
        for i in range(400):
            try:
                client.track("u", "Cut", {"pad": "z" * 700}, message_id="c-%04d" % i)
            except Exception as exc:
                print("raised", type(exc).__name__, file=sys.stderr)
                continue
            returned.append("c-%04d" % i)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        print(" ".join(returned))
        """,
        str(queue_path),
    )
    assert result.returncode == 0, result.stderr
    returned = result.stdout.split()
    assert len(returned) > 300  # the journal took ~300 KB, the file the rest (or refused)
    (path,) = journals(queue_path)
    data = path.read_bytes()
    entries, end, damaged = parse(data, 0)
    assert (end, damaged) == (len(data), False)
    assert 290_000 < len(data) <= 300_000
    assert {json.loads(e.body)["messageId"] for e in entries} <= set(returned)
    move_all(queue_path)
    stored = in_file(queue_path)
    assert max(stored.values()) == 1
    assert set(returned[1:]) <= set(stored)


def test_a_message_longer_than_a_move_chunk_is_moved_and_delivered(
    queue_path: Path, collector: Collector
) -> None:
    """A move reads 32 KiB at a time; a record longer than that (a message at the 32 KiB
    limit, with its names and header) is read whole and moved, with those around it."""
    client = Client(
        WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="none", on_exit="none"
    )
    ids = [client.track("u", "Small", {"i": 0})[1]["messageId"]]
    ids.append(client.track("u", "Big", {"pad": "b" * 32_000})[1]["messageId"])
    ids.append(client.track("u", "Small", {"i": 2})[1]["messageId"])
    assert client.queue.max_id() > 0
    assert set(ids) <= set(in_file(queue_path))
    assert client.flush(timeout=30).pending == 0
    assert collector.message_ids() == Counter(ids)
    client.close()


def test_pending_and_stats_count_each_call_once_while_movers_take_journals_in(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mover takes the journals in a little at a time (sealed files deleted as it goes)
    while ``pending()`` and ``stats()`` look, again and again: each look counts every call
    exactly once, in the file or in a journal, never in both nor in neither."""
    monkeypatch.setattr(journal_module, "ROTATE_BYTES", 8192)
    client = Client(WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none")
    for i in range(2000):
        client.track("u", "Count", {"i": i})
    stop = threading.Event()

    def mover() -> None:
        q = Queue(queue_path)
        try:
            while not stop.is_set() and q.move_spools(scan_now=True, budget=4096):
                pass
        finally:
            q.close()

    thread = threading.Thread(target=mover)
    thread.start()
    seen = set()
    try:
        for _ in range(150):
            seen.add(client.queue.pending())
            seen.add(client.stats().pending)
    finally:
        stop.set()
        thread.join(30)
    assert seen == {2000}
    assert client.queue.pending() == 2000
    client.close(timeout=0)


def test_tombstones_of_deleted_journals_are_purged_after_they_are_kept(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deleted file's record stays as a tombstone for ``TOMBSTONE_KEEP`` seconds, then a
    later deletion purges it: the counters table does not grow with every file."""
    monkeypatch.setattr(journal_module, "ROTATE_BYTES", 4096)
    client = Client(WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none")
    for i in range(60):
        client.track("u", "T", {"i": i, "pad": "t" * 100})
    client.queue.move_spools()

    def tombstones() -> list[int]:
        conn = sqlite3.connect(queue_path)
        try:
            rows = conn.execute("SELECT value FROM counters WHERE name LIKE 'spool:%'")
            return [int(v) for (v,) in rows if v < 0]
        finally:
            conn.close()

    assert tombstones()
    monkeypatch.setattr(journal_moves, "TOMBSTONE_KEEP", -5.0)  # "kept" until 5 s from now
    for i in range(60):
        client.track("u", "T2", {"i": i, "pad": "t" * 100})
    client.queue.move_spools()
    assert tombstones() == []
    client.close(timeout=0)
