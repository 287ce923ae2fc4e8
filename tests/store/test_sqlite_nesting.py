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

import pytest
from conftest import WRITE_KEY, run_python

from durable_analytics import Client
from durable_analytics._store.sqlite import nesting
from durable_analytics._store.sqlite.waits import Waits


@pytest.fixture(autouse=True)
def _list_handlers_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests install their handlers just before: no listing from an earlier test."""
    monkeypatch.setattr(nesting, "_LISTED_FOR", 0.0)


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
    inside it is the nested one, with the handled signals blocked until it ends (and only
    those: a signal with no Python handler is not held back)."""
    previous = [
        signal.signal(signal.SIGUSR1, lambda signum, frame: None),
        signal.signal(signal.SIGUSR2, signal.SIG_DFL),
    ]
    try:
        outer = nesting.enter()
        try:
            assert not outer.nested
            assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, ())
            inner = nesting.enter()
            try:
                assert inner.nested
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, ())
                assert signal.SIGUSR1 in blocked
                assert signal.SIGUSR2 not in blocked  # default action: not ours to hold
            finally:
                nesting.leave(inner)
            assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, ())
        finally:
            nesting.leave(outer)
    finally:
        signal.signal(signal.SIGUSR1, previous[0])
        signal.signal(signal.SIGUSR2, previous[1])
    assert nesting._depth[0] == 0


class _Stop(Exception):
    """What a handler raises (SystemExit, KeyboardInterrupt in an application)."""


def test_a_handler_that_raises_the_moment_a_nested_wait_takes_its_lock_releases_it() -> None:
    """The main thread waits for one lock; a handler's wait for another nests inside it,
    with the signals held back. A signal then goes to another thread (the main thread has
    it blocked), and its handler runs on the main thread the moment the nested wait takes
    its lock, and raises. The lock is released on the way out (its caller never saw it
    taken: before, it stayed held for good, and with the write lock every other thread's
    transaction failed), and the mask is as it was."""
    waits = Waits(Path("q"), 5.0)
    outer, inner = threading.RLock(), threading.RLock()
    taken = threading.Event()
    report: dict[str, object] = {}

    def holder() -> None:
        with outer:
            with inner:
                taken.set()
                time.sleep(0.3)  # the handler's wait has begun
                os.kill(os.getpid(), signal.SIGUSR2)  # blocked on main: to this thread
                time.sleep(0.05)
            time.sleep(0.3)

    def on_usr2(signum: int, frame: object) -> None:
        raise _Stop

    def on_usr1(signum: int, frame: object) -> None:
        try:
            waits._acquire(inner, time.monotonic())
        except _Stop:
            report["owned after"] = inner._is_owned()  # type: ignore[attr-defined]
            raise
        inner.release()

    previous = [signal.signal(signal.SIGUSR1, on_usr1), signal.signal(signal.SIGUSR2, on_usr2)]
    try:
        threading.Thread(target=holder, daemon=True).start()
        assert taken.wait(5)
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        try:
            waits._acquire(outer, time.monotonic())
            outer.release()
        except _Stop:
            pass
    finally:
        signal.signal(signal.SIGUSR1, previous[0])
        signal.signal(signal.SIGUSR2, previous[1])
    assert report == {"owned after": False}
    got: list[bool] = []
    other = threading.Thread(target=lambda: got.append(inner.acquire(timeout=2)))
    other.start()
    other.join()
    assert got == [True]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == set()
    assert nesting._depth[0] == 0


def test_a_nested_wait_works_beside_a_handler_on_an_unnamed_real_time_signal() -> None:
    """An application's Python handler on SIGRTMIN+1 (a signal with no name in the signal
    module) does not break a handler's nested wait: it waits and takes its lock (before,
    every such wait raised ValueError out of the handler's call)."""
    waits = Waits(Path("q"), 5.0)
    outer, inner = threading.RLock(), threading.RLock()
    taken = threading.Event()
    report: dict[str, object] = {}

    def holder() -> None:
        with outer:
            with inner:
                taken.set()
                time.sleep(0.2)
            time.sleep(0.1)

    def on_usr1(signum: int, frame: object) -> None:
        try:
            waits._acquire(inner, time.monotonic())
        except Exception as exc:  # reported, not raised into the main thread's wait
            report["raised"] = exc
            return
        report["took"] = True
        inner.release()

    real_time = signal.SIGRTMIN + 1
    previous = [
        signal.signal(signal.SIGUSR1, on_usr1),
        signal.signal(real_time, lambda signum, frame: None),
    ]
    try:
        threading.Thread(target=holder, daemon=True).start()
        assert taken.wait(5)
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        waits._acquire(outer, time.monotonic())
        outer.release()
    finally:
        signal.signal(signal.SIGUSR1, previous[0])
        signal.signal(real_time, previous[1])
    assert report == {"took": True}


def test_a_handler_that_raises_as_a_nested_wait_lets_signals_through_releases_its_lock() -> None:
    """A signal that comes while a nested wait holds it back (blocked in the lock's holder
    too, so it stays pending) runs its handler as the wait ends and the signals are let
    through; the handler raises. The lock the wait took is released before the exception
    goes on (its caller never saw it taken), and the mask and the count are as before."""
    waits = Waits(Path("q"), 5.0)
    lock = threading.RLock()
    taken = threading.Event()

    def holder() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        with lock:
            taken.set()
            time.sleep(0.2)  # the main thread's nested wait has begun
            os.kill(os.getpid(), signal.SIGUSR1)  # pending: blocked here and there
            time.sleep(0.05)

    def on_usr1(signum: int, frame: object) -> None:
        raise _Stop

    previous = signal.signal(signal.SIGUSR1, on_usr1)
    try:
        threading.Thread(target=holder, daemon=True).start()
        assert taken.wait(5)
        outer = nesting.enter()  # the wait a handler's call would have interrupted
        try:
            waits._acquire(lock, time.monotonic())
        except _Stop:
            pass
        else:
            raise AssertionError("the handler did not run as the wait ended")
        finally:
            nesting.leave(outer)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not lock._is_owned()  # type: ignore[attr-defined]
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, ())
    assert nesting._depth[0] == 0


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


FORKED_INSIDE_A_WAIT = """
import os
from durable_analytics._store.sqlite import nesting

outer = nesting.enter()  # the main thread waits; a handler of it forks
pid = os.fork()
nesting.leave(outer)  # both processes leave that wait
a = nesting.enter()
b = nesting.enter()
who = "child" if pid == 0 else "parent"
os.write(1, f"{who} {a.nested} {b.nested}\\n".encode())  # one write: no interleaving
nesting.leave(b)
nesting.leave(a)
if pid == 0:
    os._exit(0 if nesting._depth[0] == 0 else 3)
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
os.write(1, f"exit {code} {nesting._depth[0]}\\n".encode())
"""


def test_a_child_forked_inside_a_wait_counts_its_waits_from_zero_once_it_leaves_it() -> None:
    """Forked from the main thread inside a marked wait, the child starts at no wait and
    leaves the inherited one without going below: its next wait is a first one and a wait
    inside that is nested, as in the parent (before, the count stayed at -1 and no wait
    of the child was ever nested)."""
    result = run_python(FORKED_INSIDE_A_WAIT)
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines())
    assert lines == ["child False True", "exit 0 0", "parent False True"]
