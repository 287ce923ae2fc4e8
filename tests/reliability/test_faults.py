"""Faults found outside the matrix: calls at interpreter exit, from signal handlers, and
child flushers that cannot start.

Each test runs real child interpreters and counts messages: what the calls returned, what
is on disk, what a Collector received.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import WRITE_KEY, child_env, directory_locked_by_someone, run_python

from durable_analytics import Client
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite.schema import INSERT
from durable_analytics.testing import Collector


def pending_on_disk(queue_path: Path) -> int:
    """Messages in the queue file, once a mover took in what the producers' journals and
    spools hold (as the next worker or drain would)."""
    mover = Queue(queue_path)
    try:
        mover.move_spools(scan_now=True)
    finally:
        mover.close()
    conn = sqlite3.connect(queue_path)
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


# --------------------------------------------------------------------------- calls at exit

CLOSED_THEN_EXIT = """
import logging, sys
from durable_analytics import Client
logging.basicConfig()  # the library only attaches a NullHandler: show its warnings
key, host, path = sys.argv[1:4]
closed = Client(key, host=host, queue_path=path, flush_interval=0.05)
closed.track("u", "before close")
print(closed.close().pending, flush=True)
# Another client of the same destination leaves its message for a later process.
Client(key, host=host, queue_path=path, flusher="none", on_exit="none").track("u", "left")
"""


def test_a_closed_client_does_nothing_more_at_exit(queue_path: Path, collector: Collector) -> None:
    """close() settles the client: at exit it neither flushes again nor warns; what another
    client left on disk stays there (1 sent, 1 on disk, no second delivery attempt)."""
    result = run_python(CLOSED_THEN_EXIT, WRITE_KEY, collector.url, str(queue_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0"]
    assert [m["event"] for m in collector.messages()] == ["before close"]
    assert collector.requests == 1
    assert "stay queued" not in result.stderr
    assert pending_on_disk(queue_path) == 1


LATE_CALLS = """
import atexit, sys, threading
from durable_analytics import Client

returned = []

def late():
    # Registered before the client's first call, so it runs after the client's exit handler.
    # (The exit delivery may have left its daemon lease keeper; the late calls add nothing.)
    before = {t.ident for t in threading.enumerate()}
    for i in range(25):
        returned.append(client.track("u", "late", {"i": i})[0])
    started = {t.ident for t in threading.enumerate()} - before
    print(returned.count(True), len(started), flush=True)

atexit.register(late)
client = Client(sys.argv[1], host=sys.argv[2], queue_path=sys.argv[3], flusher=sys.argv[4],
                on_exit=sys.argv[5], flush_interval=0.05)
client.track("u", "first")
"""


@pytest.mark.parametrize(
    ("flusher", "on_exit"), [("thread", "flush"), ("process", "flush"), ("thread", "spawn")]
)
def test_calls_after_the_exit_handler_append_return_true_and_start_no_thread(
    queue_path: Path, collector: Collector, flusher: str, on_exit: str
) -> None:
    """An atexit handler that runs after the client's own (registered before the first call)
    makes 25 calls: each returns True, no thread or child starts at shutdown (Python 3.12
    refuses new threads then), and all 25 stay on disk; a later Client delivers all 26."""
    result = run_python(LATE_CALLS, WRITE_KEY, collector.url, str(queue_path), flusher, on_exit)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout.split() == ["25", "0"], result.stderr
    if on_exit == "flush":  # (spawn's detached drain may be delivering them already)
        assert pending_on_disk(queue_path) == 25  # "first" went at exit; the late ones wait
    later = Client(WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="none")
    try:
        assert later.flush(timeout=30).pending == 0
    finally:
        later.close(timeout=0)
    assert collector.wait_for_messages(26, timeout=30)
    events = sorted(m["event"] for m in collector.messages())
    assert events == ["first"] + ["late"] * 25
    assert set(collector.message_ids().values()) == {1}


# --------------------------------------------------------------------------- child flushers


class FailingChildClient(Client):
    """A client whose flusher process is a real interpreter that fails at once, as one
    that cannot start would (a broken environment, an unusable queue)."""

    spawned: int = 0

    def _spawn_flusher_process(self) -> subprocess.Popen[bytes]:
        type(self).spawned += 1
        return subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.exit('cannot start: broken on purpose')"],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def test_a_flusher_process_that_cannot_start_is_restarted_with_backoff_and_one_warning(
    queue_path: Path, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """A child that always fails is started again after 0.5 s, then 1 s more: within 1 s of
    the second start at most one more (without backoff it was dozens), one WARNING that
    says why, and the 50 messages wait on disk; close() still delivers all of them in this
    process. (The second start is waited for, however long a loaded machine takes.)"""
    caplog.set_level(logging.DEBUG, logger="durable_analytics")
    FailingChildClient.spawned = 0
    client = FailingChildClient(
        WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="process", on_exit="none"
    )
    for i in range(50):
        assert client.track("u", "E", {"i": i})[0]
    deadline = time.monotonic() + 30
    while FailingChildClient.spawned < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)  # the window in which restarts are counted: the next is 1 s away
    spawned = FailingChildClient.spawned
    assert pending_on_disk(queue_path) == 50
    result = client.close(timeout=30)
    assert 2 <= spawned <= 3, spawned
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "flusher process exited" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert "exit code 1" in warnings[0]
    assert (result.sent, result.pending) == (50, 0)
    assert len(collector.message_ids()) == 50


RELATIVE_QUEUE = """
import os, sys
from durable_analytics import Client
home, elsewhere, key, host, flusher, on_exit = sys.argv[1:7]
os.chdir(home)
client = Client(key, host=host, queue_path="q.sqlite3", flusher=flusher, on_exit=on_exit,
                flush_interval=0.05)
os.chdir(elsewhere)  # the flusher process (first call) or the exit drain start here
for i in range(5):
    client.track("u", "E", {"i": i})
"""


@pytest.mark.parametrize(("flusher", "on_exit"), [("process", "flush"), ("none", "spawn")])
def test_a_relative_queue_path_is_the_one_the_flusher_process_and_exit_drain_deliver(
    tmp_path: Path, collector: Collector, flusher: str, on_exit: str
) -> None:
    """queue_path="q.sqlite3", then chdir before the first call: the child flusher and the
    detached exit drain open the queue the Client made (5 of 5 delivered, once each), not a
    new empty one in the new working directory."""
    home, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    home.mkdir(mode=0o700)
    elsewhere.mkdir(mode=0o700)
    result = run_python(
        RELATIVE_QUEUE, str(home), str(elsewhere), WRITE_KEY, collector.url, flusher, on_exit
    )
    assert result.returncode == 0, result.stderr
    assert collector.wait_for_messages(5, timeout=30)
    assert set(collector.message_ids().values()) == {1}
    assert not (elsewhere / "q.sqlite3").exists()


# --------------------------------------------------------------------------- signal handlers

SIGNALLED = """
import json, os, random, signal, sys, threading, time
from durable_analytics import Client

key, host, path, flusher = sys.argv[1:5]
signals = int(sys.argv[5])
client = Client(key, host=host, queue_path=path, flusher=flusher, on_exit="none",
                flush_at=20, flush_interval=0.01, max_retries=0)
counts = {"main": 0, "handler": 0, "handler_false": 0}
pad = "x" * 2000  # every ~120 calls an append takes the capped path (a transaction)

def on_usr1(signum, frame):
    # What an application's handler does: record the signal as an event.
    ok, _ = client.track("u", "signal", {"n": counts["handler"]})
    counts["handler" if ok else "handler_false"] += 1

def on_term(signum, frame):
    client.track("u", "shutting down")
    counts["term"] = 1
    raise SystemExit(0)

signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGTERM, on_term)

def killer():
    rng = random.Random(int(sys.argv[6]))
    for _ in range(signals):
        time.sleep(rng.uniform(0, 0.0015))
        os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=killer, daemon=True).start()
try:
    while True:
        ok, _ = client.track("u", "main", {"pad": pad})
        counts["main"] += ok
        if counts["main"] % 97 == 0:
            client.flush(timeout=5)  # leases and acks on this thread too
finally:
    print(json.dumps(counts), flush=True)
"""


@pytest.mark.parametrize("flusher", ["none", "thread"])
def test_signal_handlers_that_track_never_deadlock_and_every_returned_call_is_stored(
    queue_path: Path, collector: Collector, flusher: str
) -> None:
    """A SIGUSR1 handler that calls track() interrupts the main thread's own track() and
    flush() calls 1,500 times at random moments (real signals, from a thread of the child);
    then a SIGTERM handler tracks "shutting down" and exits. The child ends within its bound
    (before: deadlocked in the append's lock), and every call that returned True, in the
    main loop and in the handlers, reaches the Collector (a later flush delivers the rest)."""
    result = run_python(
        SIGNALLED, WRITE_KEY, collector.url, str(queue_path), flusher, "1500", "7", timeout=120
    )
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert counts["term"] == 1
    assert counts["handler_false"] == 0
    assert counts["handler"] > 100  # signals that arrive together are delivered once
    later = Client(WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="none")
    try:
        assert later.flush(timeout=60).pending == 0
    finally:
        later.close(timeout=0)
    distinct = {m["messageId"]: m["event"] for m in collector.messages()}
    events = Counter(distinct.values())
    assert events["shutting down"] == 1
    # Every call that returned was delivered; the SIGTERM may also cut one call off after it
    # stored its message and before its caller counted it (stored, never reported lost).
    extra = (events["main"] - counts["main"], events["signal"] - counts["handler"])
    assert min(extra) >= 0, (events, counts)
    assert sum(extra) <= 1, (events, counts)
    assert set(events) == {"main", "signal", "shutting down"}
    resent = sum(n - 1 for n in collector.message_ids().values())
    print(
        f"\nSIGNALS[{flusher}]: {counts['main']} calls and {counts['handler']} handler calls "
        f"returned, delivered {events['main']} + {events['signal']}, resent {resent}"
    )
    # At most the batches in flight when SIGTERM ended the process after the server had them:
    # the main thread's flush(), and the flusher thread's; each thread two (the batch whose
    # answer it reads and the one it sent ahead).
    assert resent <= 20 * 2 * (2 if flusher == "thread" else 1)


def on_this_thread_within(seconds: float, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread (so that a deadlock fails the test instead of hanging it)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "deadlocked"
    if "error" in box:
        raise box["error"]
    return box.get("result")


class Interrupted(Exception):
    """What a signal handler may raise into the code it interrupted."""


@pytest.mark.parametrize("outcome", ["committed", "rolled back"])
def test_an_append_made_inside_a_transaction_on_the_same_thread_is_kept_either_way(
    queue_path: Path, outcome: str
) -> None:
    """What a signal handler does when it interrupts a transaction of its own thread: the
    append joins it (no deadlock, no "transaction within a transaction"); if the interrupted
    transaction then rolls back, the append, whose call returned, is stored on its own.
    Counted: the outer transaction's row only when committed, the inner one always."""
    queue = Queue(queue_path)
    dest = queue.destination("https://api.example.test", WRITE_KEY)

    def outer() -> int:
        with contextlib.suppress(Interrupted), queue._db.transaction() as conn:
            conn.execute(INSERT, (dest, b'{"outer":1}', 11, time.time()))
            assert queue.append(dest, b'{"inner":1}') > 0  # as the handler would
            if outcome == "rolled back":
                raise Interrupted
        return 0

    on_this_thread_within(30, outer)
    with contextlib.closing(sqlite3.connect(queue_path)) as check:
        bodies = sorted(bytes(b) for (b,) in check.execute("SELECT body FROM messages"))
    expected = [b'{"inner":1}'] + ([b'{"outer":1}'] if outcome == "committed" else [])
    assert bodies == expected
    queue.close()


def test_an_append_made_inside_a_read_on_the_same_thread_is_stored_at_once(
    queue_path: Path,
) -> None:
    """A signal handler that interrupts a read of its own thread (its statement still open,
    its snapshot older than another thread's commit) stores through a connection of its own:
    it neither deadlocks nor waits on a snapshot that can never write."""
    queue = Queue(queue_path)
    dest = queue.destination("https://api.example.test", WRITE_KEY)
    queue.append(dest, b'{"first":1}')
    queue.append(dest, b'{"second":1}')

    def read_interrupted(conn: sqlite3.Connection) -> int:
        rows = conn.execute("SELECT id FROM messages")
        rows.fetchone()  # the statement is open: this connection holds a snapshot
        # Another thread commits meanwhile, so the snapshot can no longer write.
        other = threading.Thread(target=queue.append, args=(dest, b'{"other":1}'))
        other.start()
        other.join(30)
        return queue.append(dest, b'{"inner":1}')

    assert on_this_thread_within(30, lambda: queue._db.read(read_interrupted)) > 0
    assert queue.pending() == 4
    queue.close()


def test_an_append_made_while_its_thread_holds_the_commit_fence_keeps_the_fence_held(
    queue_path: Path,
) -> None:
    """A signal handler that interrupts a commit of its own thread after it took the commit
    fence (the shared flock a recovery of another process waits for) stores its message
    without waiting on that flock, and leaving does not release the interrupted commit's
    lock: until the outer commit leaves, no recovery can take the directory."""
    queue = Queue(queue_path)
    dest = queue.destination("https://api.example.test", WRITE_KEY)
    queue.append(dest, b'{"first":1}')
    db = queue._db
    held: list[bool] = []

    def outer() -> int:
        with db.locked(db.write_lock):
            conn = db.conn()

            def commit() -> Any:
                assert queue.append(dest, b'{"inner":1}') > 0  # as the handler would
                held.append(directory_locked_by_someone(queue_path.parent))
                return conn.execute(INSERT, (dest, b'{"outer":1}', 11, time.time()))

            db.fenced(commit)
        held.append(directory_locked_by_someone(queue_path.parent))
        return 0

    on_this_thread_within(30, outer)
    assert held == [True, False]
    assert queue.pending() == 3
    queue.close()


def test_an_append_that_joined_a_transaction_rolled_back_to_wait_for_a_recovery_is_kept(
    queue_path: Path,
) -> None:
    """A transaction that finds another process recovering the queue (the commit fence held
    exclusively) rolls back and waits. A signal handler's append that joined it just before
    (its call returned) is stored again in the transaction that follows: counted on disk."""
    queue = Queue(queue_path)
    dest = queue.destination("https://api.example.test", WRITE_KEY)
    db = queue._db
    fence = db.fence
    real_try_enter = fence.try_enter
    recovering = os.open(queue_path.parent, os.O_RDONLY)  # a recovery elsewhere holds it
    fcntl.flock(recovering, fcntl.LOCK_EX)

    def interrupted_try_enter() -> bool:
        # The signal lands after BEGIN IMMEDIATE, before the fence is tried.
        del fence.try_enter
        assert queue.append(dest, b'{"inner":1}') > 0
        threading.Timer(0.05, fcntl.flock, (recovering, fcntl.LOCK_UN)).start()
        return real_try_enter()

    fence.try_enter = interrupted_try_enter  # type: ignore[method-assign]
    try:

        def outer() -> None:
            with db.transaction() as conn:
                conn.execute(INSERT, (dest, b'{"outer":1}', 11, time.time()))

        on_this_thread_within(30, outer)
    finally:
        os.close(recovering)
    with contextlib.closing(sqlite3.connect(queue_path)) as check:
        bodies = sorted(bytes(b) for (b,) in check.execute("SELECT body FROM messages"))
    assert bodies == [b'{"inner":1}', b'{"outer":1}']
    queue.close()


@pytest.mark.parametrize("fence_taken", [False, True], ids=["after BEGIN", "after the fence"])
def test_an_append_that_joined_a_begin_a_handler_then_cut_short_is_kept(
    queue_path: Path, fence_taken: bool
) -> None:
    """A signal handler runs right after a C call returns: a SIGTERM handler can track (its
    append joins the transaction BEGIN IMMEDIATE just opened) and then raise SystemExit
    before the interrupted call knew it held a transaction or the fence. The handler's call
    returned, so its message is on disk afterwards; nothing stays open or held. (Before: the
    transaction stayed open and the message was gone with the process, 2 runs in 100.)"""
    queue = Queue(queue_path)
    dest = queue.destination("https://api.example.test", WRITE_KEY)
    db = queue._db
    fence = db.fence
    real_try_enter = fence.try_enter

    def interrupted_try_enter() -> bool:
        del fence.try_enter
        if fence_taken:
            assert real_try_enter()  # the flock returned: the signal lands after it
        assert queue.append(dest, b'{"handler":1}') > 0  # as the SIGTERM handler would
        raise SystemExit(0)

    fence.try_enter = interrupted_try_enter  # type: ignore[method-assign]

    def outer() -> None:
        with contextlib.suppress(SystemExit), db.transaction() as conn:
            conn.execute(INSERT, (dest, b'{"outer":1}', 11, time.time()))

    on_this_thread_within(30, outer)
    with contextlib.closing(sqlite3.connect(queue_path)) as check:
        bodies = sorted(bytes(b) for (b,) in check.execute("SELECT body FROM messages"))
    assert bodies == [b'{"handler":1}']
    assert fence.depth == 0
    assert not directory_locked_by_someone(queue_path.parent)
    queue.close()


# --------------------------------------------------------------------------- warnings

CLOSED_CLEANLY = """
import sys
from durable_analytics import Client
client = Client(sys.argv[1], host=sys.argv[2], queue_path=sys.argv[3], on_exit="none")
for i in range(50):
    client.track("u", "E", {"i": i})
client.flush(timeout=30)
client.close(timeout=30)
"""


def test_a_client_closed_then_exiting_leaves_no_resource_warning(
    queue_path: Path, collector: Collector
) -> None:
    """A script that tracks (its flusher thread has a connection of its own), flushes,
    closes and exits, run with every warning shown: no ResourceWarning (Python 3.13 warned
    about the ended flusher thread's connection, collected open, at exit)."""
    args = [WRITE_KEY, collector.url, str(queue_path)]
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", CLOSED_CLEANLY, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=child_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "ResourceWarning" not in result.stderr, result.stderr
    assert len(collector.message_ids()) == 50
