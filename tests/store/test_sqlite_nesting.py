"""Signal handlers whose calls wait inside their thread's own wait (``nesting.py``).

Each test's name states the behaviour it proves; the signals are real.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

from conftest import WRITE_KEY

from durable_analytics import Client
from durable_analytics._store.sqlite import nesting
from durable_analytics._store.sqlite.waits import Waits


def _events_in_file(path: Path) -> Counter[str]:
    conn = sqlite3.connect(path)
    try:
        return Counter(json.loads(r[0])["event"] for r in conn.execute("SELECT body FROM messages"))
    finally:
        conn.close()


def test_a_storm_of_signals_during_a_long_wait_nests_two_handlers_deep_not_one_per_signal(
    queue_path: Path,
) -> None:
    """Another thread holds the queue's lock for 0.4 s while the main thread's call waits
    for it (a count cap: no journal, no spool) and 60 SIGUSR1s come, each handler calling
    track(). The first handler's call waits too, with the signals held back, so the others
    run once it has the lock (and join it) instead of each interrupting the wait of the one
    before: at most two handlers deep (before: one level per signal, about 60, and in CI
    a RecursionError). Every call that returned True is in the file, once."""
    client = Client(
        WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none", max_queue_size=100_000
    )
    client.track("u", "first")
    lock = client.queue._db.write_lock
    held = threading.Event()
    release = threading.Event()
    state = {"depth": 0, "deepest": 0, "stored": 0, "refused": 0}

    def holder() -> None:
        with lock:
            held.set()
            release.wait(10)

    def on_usr1(signum: int, frame: object) -> None:
        state["depth"] += 1
        state["deepest"] = max(state["deepest"], state["depth"])
        try:
            ok = client.track("u", "handler")[0]
            state["stored" if ok else "refused"] += 1
        finally:
            state["depth"] -= 1

    def storm() -> None:
        time.sleep(0.05)  # the main thread's call is waiting by then
        for _ in range(60):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.005)
        time.sleep(0.05)
        release.set()

    previous = signal.signal(signal.SIGUSR1, on_usr1)
    try:
        threading.Thread(target=holder, daemon=True).start()
        assert held.wait(5)
        sender = threading.Thread(target=storm, daemon=True)
        sender.start()
        ok, _ = client.track("u", "waiting")
        sender.join(10)
        time.sleep(0.05)  # a signal still pending runs its handler here
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert ok
    assert state["refused"] == 0
    assert state["stored"] >= 1
    assert state["deepest"] <= 2
    assert _events_in_file(queue_path) == {
        "first": 1,
        "waiting": 1,
        "handler": state["stored"],
    }
    client.close(timeout=0)


def test_a_wait_outside_any_other_is_not_marked_nested_and_holds_no_signal() -> None:
    """The main thread's first wait keeps its signals (a handler may interrupt it); a wait
    inside it is the nested one, with the handled signals blocked until it ends."""
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    try:
        with nesting.waiting() as outer:
            assert outer is False
            assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, ())
            with nesting.waiting() as inner:
                assert inner is True
                assert signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, ())
            assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, ())
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_handler_that_raises_when_a_nested_wait_ends_releases_the_lock_it_took() -> None:
    """A signal held back during a nested wait runs its handler as the wait ends; if that
    handler raises, the lock the wait acquired is released before the exception goes on
    (its caller never saw the lock taken), and the signals are let through again."""
    lock = threading.RLock()

    def on_usr1(signum: int, frame: object) -> None:
        raise KeyError("from the handler")

    previous = signal.signal(signal.SIGUSR1, on_usr1)
    try:
        with nesting.waiting():
            try:
                with nesting.waiting(lock) as nested:
                    assert nested
                    os.kill(os.getpid(), signal.SIGUSR1)  # held back: pending
                    assert lock.acquire(timeout=1)
            except KeyError:
                pass
            else:
                raise AssertionError("the handler's exception was lost")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not lock._is_owned()  # type: ignore[attr-defined]
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, ())


def test_a_handlers_call_may_read_the_deadlines_while_its_thread_reads_them() -> None:
    """The lock of the flush deadlines is reentrant: a signal handler's call that reads
    them (a wait's limit) while its thread was inside that read goes on instead of
    deadlocking on a lock its own thread holds."""
    waits = Waits(Path("q"), 1.0)
    done = threading.Event()

    def reader() -> None:
        with waits.bounded(5.0), waits._deadlines_lock:
            waits.limit(time.monotonic())  # what the handler's call does
            done.set()

    threading.Thread(target=reader, daemon=True).start()
    assert done.wait(5)
