"""fork() while a thread of the parent is inside a queue call (issue 11, item 2).

Another process holds the queue's write lock; a thread of the parent is blocked in
``track()`` waiting for it (and the flusher thread in its lease); the main thread forks.
Before, the before-fork hook waited 5 s for the blocked thread, gave up and forked with the
parent's SQLite connections open. SQLite keeps its locks' bookkeeping per file and per
process, so the child's own fresh connections believed they held locks that only the
parent held: once the parent exited, an unrelated process that opened and closed the queue
took itself for the last user, checkpointed and deleted the -wal under the child, and the
child's later calls went to the deleted file (628 of 894 returned calls lost). Now a call
waiting for another process's lock lets go of this process's lock between its attempts, so
the fork closes every connection first, and a child that did inherit open connections
refuses to use the file at all. Counted: every call the child returned is delivered.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from pathlib import Path

from conftest import WRITE_KEY, start_python

from durable_analytics import Client
from durable_analytics.testing import Collector

# SQLite's unix VFS: every process with the -shm open holds a shared lock on this byte of
# it (the "DMS" lock); the one that can take it exclusively believes it is the last user.
SHM_DMS_BYTE = 128

PARENT = """
import json, os, subprocess, sys, threading, time
from durable_analytics import Client
from durable_analytics._store.sqlite import connections

key, host, path, work, fork_wait, hold_lock = sys.argv[1:7]
connections._FORK_WAIT = float(fork_wait)
client = Client(key, host=host, queue_path=path, on_exit="none", flush_interval=0.05)
client.track("parent", "first")
holder = subprocess.Popen(
    [sys.executable, "-c", '''
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
conn.close()
''', path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert holder.stdout.readline().strip() == "held"
if hold_lock == "1":
    # A thread inside a long operation of this process (not merely waiting): the fork
    # cannot wait for it.
    db = client._queue._db
    inside, release = threading.Event(), threading.Event()
    def long_operation():
        with db.locked(db.write_lock):
            db.conn()
            inside.set()
            release.wait()
    threading.Thread(target=long_operation, daemon=True).start()
    inside.wait()
stuck = threading.Thread(target=client.track, args=("parent", "stuck"))
stuck.start()
time.sleep(0.3)  # the thread waits for the holder's lock inside track()
pid = os.fork()
if pid == 0:
    returned, errors = [], []
    def calls(n, phase):
        for i in range(n):
            try:
                ok, msg = client.track("child", phase, {"i": i})
            except Exception as exc:
                errors.append(type(exc).__name__ + ": " + str(exc))
                continue
            if ok:
                returned.append(msg["messageId"])
    calls(300, "before")
    open(os.path.join(work, "phase1"), "w").close()
    while not os.path.exists(os.path.join(work, "go")):
        time.sleep(0.01)
    calls(600, "after")
    with open(os.path.join(work, "result.tmp"), "w") as f:
        json.dump({"returned": returned, "errors": errors[:3], "n_errors": len(errors)}, f)
    os.rename(os.path.join(work, "result.tmp"), os.path.join(work, "result"))
    try:
        client.close(timeout=10)
    finally:
        os._exit(0)
print(pid, flush=True)
holder.stdin.write("\\n")
holder.stdin.flush()
holder.wait()
if hold_lock == "1":
    release.set()
stuck.join()
client.close(timeout=10)
"""


def wait_for(path: Path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never came"
        time.sleep(0.01)


def shm_lock_held_by_another_process(queue_path: Path) -> bool:
    """Whether some process holds SQLite's "I use this -shm" lock (taken: nobody does)."""
    try:
        fd = os.open(f"{queue_path}-shm", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, SHM_DMS_BYTE, os.SEEK_SET)
    except OSError:
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, SHM_DMS_BYTE, os.SEEK_SET)
        return False
    finally:
        os.close(fd)


def run_fork_case(
    queue_path: Path, collector: Collector, tmp_path: Path, *, hold_lock: bool
) -> tuple[dict[str, object], bool]:
    work = tmp_path / "work"
    work.mkdir()
    parent = start_python(
        PARENT,
        WRITE_KEY,
        collector.url,
        str(queue_path),
        str(work),
        "0.5" if hold_lock else "5",
        "1" if hold_lock else "0",
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline().strip() or 0)
    assert parent.wait(timeout=60) == 0, parent.stderr.read() if parent.stderr else ""
    assert child > 0
    wait_for(work / "phase1")
    # The parent is gone; the child has the queue open. An unrelated process opens and
    # closes it (a drain, a status, a sqlite3 shell): it must not take itself for the last.
    child_locks = shm_lock_held_by_another_process(queue_path)
    other = sqlite3.connect(queue_path)
    other.execute("SELECT count(*) FROM messages").fetchone()
    other.close()
    (work / "go").touch()
    wait_for(work / "result")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the child exits after its close
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    later = Client(WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="none")
    try:
        assert later.flush(timeout=60).pending == 0
    finally:
        later.close(timeout=0)
    result = json.loads((work / "result").read_text())
    return result, child_locks


def test_a_fork_while_a_thread_waits_in_track_loses_none_of_the_childs_returned_calls(
    queue_path: Path, collector: Collector, tmp_path: Path
) -> None:
    """The parent forks while a thread waits inside ``track()`` (and its flusher inside a
    lease) for a lock another process holds. The child makes 900 calls; after the parent
    exited, an unrelated process opens and closes the queue between them. The child holds
    its own real lock on the queue's files (before: none), and every call it returned is
    delivered."""
    result, child_locks = run_fork_case(queue_path, collector, tmp_path, hold_lock=False)
    returned = set(result["returned"])  # type: ignore[call-overload]
    received = {m["messageId"] for m in collector.messages() if m.get("userId") == "child"}
    lost = returned - received
    print(f"\nFORK-IN-FLIGHT: child returned {len(returned)}, delivered {len(received)}")
    assert result["n_errors"] == 0, result["errors"]
    assert len(returned) == 900
    assert child_locks, "the child's connection holds no lock of its own on the -shm"
    assert not lost, f"{len(lost)} of {len(returned)} returned calls lost"
    assert received <= returned


def test_a_child_forked_with_connections_open_refuses_the_file_and_loses_nothing(
    queue_path: Path, collector: Collector, tmp_path: Path
) -> None:
    """When a thread of the parent is inside a long operation of the queue (holding its
    lock, not waiting) the fork cannot close the connections first. The child inherits
    SQLite's bookkeeping of them in an unknown state: it never uses the file (its calls
    raise ``QueueError`` at once, naming the cause) rather than write where another
    process may delete it. Counted: no call returned True and was lost."""
    result, _ = run_fork_case(queue_path, collector, tmp_path, hold_lock=True)
    returned = set(result["returned"])  # type: ignore[call-overload]
    received = {m["messageId"] for m in collector.messages() if m.get("userId") == "child"}
    assert not returned - received
    assert result["n_errors"] == 900
    assert "fork" in str(result["errors"])
