"""Faults found outside the matrix: calls at interpreter exit, from signal handlers, and
child flushers that cannot start.

Each test runs real child interpreters and counts messages: what the calls returned, what
is on disk, what a Collector received.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import WRITE_KEY, run_python

from durable_analytics import Client
from durable_analytics.testing import Collector


def pending_on_disk(queue_path: Path) -> int:
    conn = sqlite3.connect(queue_path)
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


# --------------------------------------------------------------------------- calls at exit

LATE_CALLS = """
import atexit, sys, threading
from durable_analytics import Client

returned = []

def late():
    # Registered before the client's first call, so it runs after the client's exit handler.
    for i in range(25):
        returned.append(client.track("u", "late", {"i": i})[0])
    print(returned.count(True), threading.active_count(), flush=True)

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
    assert result.stdout.split() == ["25", "1"], result.stderr
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
    """Within 1.5 s of a child that always fails: at most 3 starts (the first, then after
    0.5 s and 1 s more; without backoff it was dozens), one WARNING that says why, and the
    50 messages wait on disk; close() still delivers all of them in this process."""
    caplog.set_level(logging.DEBUG, logger="durable_analytics")
    FailingChildClient.spawned = 0
    client = FailingChildClient(
        WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="process", on_exit="none"
    )
    for i in range(50):
        assert client.track("u", "E", {"i": i})[0]
    time.sleep(1.5)  # the bounded window in which restarts are counted
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
