"""Connections across fork(): children get their own, parents keep working.

Each test's name states the behaviour it proves. Child processes are real (``start_python``,
``os.fork``); the heavier multi-process runs live in tests/reliability/.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_python, start_python

from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite import forks

from .sqlite_helpers import (
    HOST,
    KEY,
    body,
    fill,
    fresh_rows,
    index,
)

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


HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


@pytest.mark.parametrize("waiting_in", ["append", "lease"])
def test_fork_closes_every_connection_while_a_thread_waits_for_another_processs_lock(
    queue: Queue, dest: int, queue_path: Path, monkeypatch: pytest.MonkeyPatch, waiting_in: str
) -> None:
    """A thread blocked in ``append`` (or in a lease's transaction) because another process
    holds the write lock waits without this process's write lock: the step before a fork
    closes every connection instead of giving up after its wait (the child then starts
    clean), and the waiting call goes on afterwards on a new connection."""
    monkeypatch.setattr(forks, "FORK_WAIT", 2.0)
    queue.append(dest, body(0))
    holder = start_python(HOLDER, str(queue_path), stdin=subprocess.PIPE)
    assert holder.stdout is not None
    assert holder.stdin is not None
    assert holder.stdout.readline().strip() == "held"
    done: list[object] = []

    def call() -> None:
        if waiting_in == "append":
            done.append(queue.append(dest, body(1)))
        else:
            done.append(queue.lease(10, 1 << 20))

    waiter = threading.Thread(target=call)
    waiter.start()
    time.sleep(0.2)  # the thread is now retrying against the holder's lock
    db = queue._db
    db.close_for_fork()
    try:
        assert not db.conns
        assert not db.open_at_fork
    finally:
        db.resume_after_fork()
    holder.stdin.write("\n")
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    waiter.join(30)
    assert not waiter.is_alive()
    assert done
    assert done[0]
    assert queue.pending() == (2 if waiting_in == "append" else 1)
