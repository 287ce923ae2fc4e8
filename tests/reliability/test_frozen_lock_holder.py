"""A process stopped (SIGSTOP) inside a write transaction on the queue file: every bound
still holds. ``track()`` spools without waiting, and past the spool's bound raises the
documented ``QueueBusy`` after ``busy_timeout``, an exit
takes at most ``shutdown_timeout`` (plus a second), and no message is lost: once the frozen
process is gone, every message a call returned True for is delivered exactly once.

The one timing bound asserted is the issue's own (``shutdown_timeout`` + 1 s; the documented
wait + 1 s), generous against a wait of SQLite's 30 s busy timeout that it replaces.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WRITE_KEY, start_python

import durable_analytics
from durable_analytics._config import Config
from durable_analytics._drain import drain_queue
from durable_analytics._store import open_queue
from durable_analytics._store.sqlite import SqliteQueue
from durable_analytics._store.sqlite import journal as journal_module
from durable_analytics._store.sqlite.files import make_private_dirs
from durable_analytics._store.sqlite.spool import MOST_SPOOLED, spool_dir
from durable_analytics._store.sqlite.waits import GRACE
from durable_analytics.cli import EXIT_UNDELIVERED
from durable_analytics.cli import main as cli_main
from durable_analytics.exceptions import QueueBusy, QueueCorrupt
from durable_analytics.testing import Collector, RecordingTransport

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")


def _frozen_writer(path: Path) -> subprocess.Popen[str]:
    """A process that takes the queue's write lock, says so, and is then stopped."""
    proc = start_python(
        """
        import sqlite3, sys, time
        c = sqlite3.connect(sys.argv[1], isolation_level=None)
        c.execute("BEGIN IMMEDIATE")
        c.execute("UPDATE counters SET value = value WHERE name = 'dropped_newest'")
        print("locked", flush=True)
        time.sleep(300)
        """,
        str(path),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    os.kill(proc.pid, signal.SIGSTOP)
    return proc


@pytest.fixture
def frozen(tmp_path: Path) -> Iterator[tuple[Path, list[subprocess.Popen[str]]]]:
    procs: list[subprocess.Popen[str]] = []
    yield tmp_path / "queue.sqlite3", procs
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_track_raises_queue_busy_after_busy_timeout_and_loses_nothing(
    frozen: tuple[Path, list[subprocess.Popen[str]]],
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the write lock frozen, ``track()`` stores into its process's spool without
    waiting, up to the spool's bound; past it, it raises ``QueueBusy`` within
    ``busy_timeout`` (+1 s), and ``close()`` returns within its timeout (+1 s); every call
    that returned True, spooled or not, is delivered once when the frozen process is gone.
    (The journal, which takes calls first and never waits for the lock, is kept at a bound
    of 0 bytes here: ``test_sqlite_journal.py`` shows it with the lock frozen.)"""
    monkeypatch.setattr(journal_module, "MOST_JOURNALED", 0)
    path, procs = frozen
    client = durable_analytics.Client(
        WRITE_KEY,
        host=collector.url,
        queue_path=path,
        flusher="none",
        on_exit="none",
        busy_timeout=0.5,
    )
    stored = [client.track("u", "Before", {"i": i})[1]["messageId"] for i in range(10)]
    procs.append(_frozen_writer(path))
    for i in range(MOST_SPOOLED):
        ok, msg = client.track("u", "Spooled", {"i": i})
        assert ok
        stored.append(msg["messageId"])
    started = time.monotonic()
    with pytest.raises(QueueBusy):
        client.track("u", "Blocked")
    assert time.monotonic() - started < 0.5 + 1.0
    started = time.monotonic()
    result = client.close(timeout=1.0)
    assert time.monotonic() - started < 1.0 + 1.0
    assert result.sent == 0
    # The frozen holder ends; its transaction rolls back and the queue is whole.
    os.kill(procs[0].pid, signal.SIGKILL)
    procs[0].wait()
    again = durable_analytics.Client(
        WRITE_KEY, host=collector.url, queue_path=path, flusher="none", on_exit="none"
    )
    flushed = again.flush(timeout=30)
    assert flushed.pending == 0
    ids = collector.message_ids()
    assert set(stored) <= set(ids)  # lost 0
    assert all(n == 1 for n in ids.values())  # duplicated 0
    again.close()


def test_exit_honours_shutdown_timeout_while_a_lock_holder_is_frozen(
    frozen: tuple[Path, list[subprocess.Popen[str]]], collector: Collector
) -> None:
    """A producer with on_exit="flush" and shutdown_timeout=2 exits within 3 s while another
    process is stopped inside a write transaction (before: 30 to 90 s); its messages stay
    on disk and are all delivered once the frozen process is gone."""
    path, procs = frozen
    producer = start_python(
        """
        import sys
        import durable_analytics
        c = durable_analytics.Client(
            sys.argv[1], host=sys.argv[2], queue_path=sys.argv[3], shutdown_timeout=2.0,
            flush_interval=60, flush_at=1000,
        )
        for i in range(50):
            assert c.track("u", "E", {"i": i})[0]
        print("tracked", flush=True)
        sys.stdin.readline()
        """,
        WRITE_KEY,
        collector.url,
        str(path),
        stdin=subprocess.PIPE,
    )
    procs.append(producer)
    assert producer.stdout is not None
    assert producer.stdin is not None
    assert producer.stdout.readline().strip() == "tracked"
    procs.append(_frozen_writer(path))
    started = time.monotonic()
    producer.stdin.write("exit\n")
    producer.stdin.flush()
    producer.wait(timeout=60)
    elapsed = time.monotonic() - started
    assert producer.returncode == 0, producer.stderr.read() if producer.stderr else ""
    assert elapsed < 2.0 + 1.0
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].wait()
    drainer = durable_analytics.Client(
        WRITE_KEY, host=collector.url, queue_path=path, flusher="none", on_exit="none"
    )
    assert drainer.flush(timeout=30).pending == 0
    drainer.close()
    ids = collector.message_ids()
    assert len(ids) == 50
    assert all(n == 1 for n in ids.values())


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts: it runs nothing any more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout: float) -> float:
    """Seconds until ``pid`` exited, polling; ``timeout`` + 1 if it outlived ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if _gone(pid):
            return time.monotonic() - started
        time.sleep(0.02)
    return timeout + 1.0


_PROCESS_PRODUCER = """
import os, sys
import durable_analytics
c = durable_analytics.Client(
    sys.argv[1], host=sys.argv[2], queue_path=sys.argv[3], flusher="process",
    shutdown_timeout=1.0, flush_interval=60, flush_at=1000, busy_timeout=120,
)
for i in range(50):
    assert c.track("u", "E", {"i": i})[0]
print(c._child.pid, flush=True)
if sys.stdin.readline().strip() == "crash":
    os._exit(0)  # no exit handler: the child finds its parent gone
"""


def _process_producer(
    path: Path, collector: Collector, procs: list[subprocess.Popen[str]]
) -> tuple[subprocess.Popen[str], int]:
    producer = start_python(
        _PROCESS_PRODUCER, WRITE_KEY, collector.url, str(path), stdin=subprocess.PIPE
    )
    procs.append(producer)
    assert producer.stdout is not None
    child = int(producer.stdout.readline())
    return producer, child


def _all_delivered_once(path: Path, collector: Collector, expected: int) -> None:
    drainer = durable_analytics.Client(
        WRITE_KEY, host=collector.url, queue_path=path, flusher="none", on_exit="none"
    )
    assert drainer.flush(timeout=30).pending == 0
    drainer.close()
    ids = collector.message_ids()
    assert len(ids) == expected
    assert all(n == 1 for n in ids.values())


@pytest.mark.parametrize("ending", ["exit", "crash"])
def test_a_flusher_process_ends_within_shutdown_timeout_while_a_lock_holder_is_frozen(
    frozen: tuple[Path, list[subprocess.Popen[str]]], collector: Collector, ending: str
) -> None:
    """flusher="process", shutdown_timeout=1, another process stopped inside a write
    transaction (busy_timeout 120 s): when the parent exits (its exit handler) or dies
    without one (the child finds it gone), the parent and its flusher child are both gone
    within 1 + 10 s (interpreters ending on a loaded machine), not after a 120 s lock wait;
    every message is delivered exactly once after the frozen process is gone."""
    path, procs = frozen
    producer, child = _process_producer(path, collector, procs)
    procs.append(_frozen_writer(path))
    frozen_writer = procs[-1]
    assert producer.stdin is not None
    started = time.monotonic()
    producer.stdin.write(ending + "\n")
    producer.stdin.flush()
    producer.wait(timeout=60)
    assert producer.returncode == 0, producer.stderr.read() if producer.stderr else ""
    assert time.monotonic() - started < 1.0 + 10.0
    assert _wait_gone(child, 30) <= 30
    assert time.monotonic() - started < 1.0 + 10.0
    os.kill(frozen_writer.pid, signal.SIGKILL)
    frozen_writer.wait()
    _all_delivered_once(path, collector, 50)


@pytest.mark.parametrize("override", ["ignore_backoff", "host"])
def test_drain_that_clears_backoffs_ends_by_its_timeout_while_a_lock_holder_is_frozen(
    frozen: tuple[Path, list[subprocess.Popen[str]]], override: str
) -> None:
    """``drain --timeout`` with ``--ignore-backoff`` (or ``--host``, which also clears the
    stored backoffs first) returns while another process is still stopped inside a write
    transaction, although the queue's busy_timeout is ten minutes: clearing the backoffs
    waits at most until the drain's deadline (it waited busy_timeout, 10 s by default, before
    the drain began). Nothing is lost: once the frozen process is gone a drain delivers all."""
    path, procs = frozen
    config = Config.for_delivery(queue_path=path, busy_timeout=600.0, max_retries=0)
    queue = open_queue(config)
    dest = queue.destination("https://api.example.test", WRITE_KEY)
    for i in range(5):
        queue.append(dest, b'{"messageId":"m-%d"}' % i)
    queue.set_backoff(dest, time.time() + 300, "HTTP 503")
    procs.append(_frozen_writer(path))
    transport = RecordingTransport()
    done = threading.Event()
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(
                drain_queue(
                    queue,
                    config,
                    timeout=0.5,
                    ignore_backoff=override == "ignore_backoff",
                    host="https://elsewhere.test" if override == "host" else None,
                    transport=lambda: transport,
                )
            )
        except QueueBusy as exc:
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    # Generous: the drain's deadline is half a second, the lock it waits for ten minutes.
    assert done.wait(60), "drain --timeout waited on the frozen lock holder past its deadline"
    assert procs[-1].poll() is None  # the lock holder was still frozen when the drain ended
    assert outcome
    os.kill(procs[-1].pid, signal.SIGKILL)
    procs[-1].wait()
    result = drain_queue(queue, config, ignore_backoff=True, transport=lambda: transport)
    assert result.left == 0
    assert sorted(transport.message_ids()) == [f"m-{i}" for i in range(5)]
    queue.close()


def test_drain_behind_a_frozen_lock_holder_exits_1_not_the_missing_queue_code(
    frozen: tuple[Path, list[subprocess.Popen[str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    """``durable-analytics drain --timeout`` that meets a queue another process keeps locked
    past its deadline ends with exit code 1 (messages could not be sent: the queue stayed
    busy), not 3 (missing or corrupt queue, which tells an operator to look at the file),
    and says why. Nothing is lost."""
    path, procs = frozen
    queue = open_queue(Config.for_delivery(queue_path=path))
    dest = queue.destination("https://api.example.test", WRITE_KEY)
    for i in range(5):
        queue.append(dest, b'{"messageId":"m-%d"}' % i)
    queue.close()
    procs.append(_frozen_writer(path))
    code = cli_main(["drain", "--queue", str(path), "--timeout", "0.5", "--ignore-backoff"])
    assert procs[-1].poll() is None  # still frozen when the drain ended
    assert code == EXIT_UNDELIVERED
    assert "stayed locked by another" in capsys.readouterr().err
    os.kill(procs[-1].pid, signal.SIGKILL)
    procs[-1].wait()
    queue = open_queue(Config.for_delivery(queue_path=path))
    assert queue.pending() == 5
    queue.close()


def test_a_client_on_a_known_queue_is_built_and_flushed_while_a_lock_holder_is_frozen(
    frozen: tuple[Path, list[subprocess.Popen[str]]], collector: Collector
) -> None:
    """Building a Client looked its destination up in a write transaction: with another
    process stopped inside one, ``Client(...)`` (and so a module-level ``flush(timeout=1)``
    that builds the default client) waited the whole ``busy_timeout``, then raised
    ``QueueBusy``. A destination the queue knows is now read without the write lock: the
    Client is built and ``flush(timeout=0.5)`` returns while the holder is still frozen."""
    path, procs = frozen
    first = durable_analytics.Client(
        WRITE_KEY, host=collector.url, queue_path=path, flusher="none", on_exit="none"
    )
    assert first.track("u", "Before")[0]
    first.close(timeout=0)
    procs.append(_frozen_writer(path))
    done = threading.Event()
    results: list[object] = []

    def build_and_flush() -> None:
        try:
            client = durable_analytics.Client(
                WRITE_KEY,
                host=collector.url,
                queue_path=path,
                flusher="none",
                on_exit="none",
                busy_timeout=600.0,
            )
            results.append(client.flush(timeout=0.5))
            client.close(timeout=0)
        except QueueBusy as exc:
            results.append(exc)
        finally:
            done.set()

    threading.Thread(target=build_and_flush, daemon=True).start()
    # Generous: the flush's deadline is half a second, the lock wait it replaces ten minutes.
    assert done.wait(60), "building the Client waited on the frozen lock holder"
    assert procs[-1].poll() is None  # the holder was still frozen
    [result] = results
    assert isinstance(result, durable_analytics.FlushResult)
    assert result.pending == 1


def _frozen_recovery(directory: Path) -> subprocess.Popen[str]:
    """A process that holds the queue directory's exclusive flock, as a recovery of a queue
    file in that directory does (the commit fence), and is then stopped."""
    proc = start_python(
        """
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(300)
        """,
        str(directory),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    os.kill(proc.pid, signal.SIGSTOP)
    return proc


def test_flush_and_track_are_bounded_while_a_recovery_holding_the_commit_fence_is_frozen(
    frozen: tuple[Path, list[subprocess.Popen[str]]],
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process recovering a queue file of the same directory holds the commit
    fence (an exclusive flock on the directory) and is stopped. ``flush(timeout=0.5)``
    returns by its deadline (+1 s) and ``track()``, once its spool is full, raises
    ``QueueBusy`` within ``busy_timeout`` (+1 s): both waited for the fence the recovery's
    own 180 s. Nothing is lost: once the frozen process is gone, everything is delivered.
    (The journal, which never takes the fence, is kept at a bound of 0 bytes here.)"""
    monkeypatch.setattr(journal_module, "MOST_JOURNALED", 0)
    path, procs = frozen
    client = durable_analytics.Client(
        WRITE_KEY,
        host=collector.url,
        queue_path=path,
        flusher="none",
        on_exit="none",
        busy_timeout=0.5,
    )
    stored = [client.track("u", "Before", {"i": i})[1]["messageId"] for i in range(10)]
    procs.append(_frozen_recovery(path.parent))
    done = threading.Event()
    results: list[object] = []

    def flush_then_track() -> None:
        try:
            started = time.monotonic()
            results.append(client.flush(timeout=0.5))
            results.append(time.monotonic() - started)
            for i in range(MOST_SPOOLED):
                ok, msg = client.track("u", "Spooled", {"i": i})
                assert ok
                stored.append(msg["messageId"])
            started = time.monotonic()
            try:
                client.track("u", "Blocked")
            except QueueBusy as exc:
                results.append(exc)
            results.append(time.monotonic() - started)
        finally:
            done.set()

    threading.Thread(target=flush_then_track, daemon=True).start()
    # Generous: the deadlines are half a second, the fence's wait it replaces 180 s.
    assert done.wait(30), "a wait for the commit fence outlasted its deadline"
    assert procs[-1].poll() is None  # the recovery was still frozen
    flushed, flush_took, busy, track_took = results
    assert isinstance(flushed, durable_analytics.FlushResult)
    assert flushed.pending == 10
    assert isinstance(flush_took, float)
    assert flush_took < 0.5 + 1.0
    assert isinstance(busy, QueueBusy)
    assert isinstance(track_took, float)
    assert track_took < 0.5 + 1.0
    os.kill(procs[-1].pid, signal.SIGKILL)
    procs[-1].wait()
    assert client.flush(timeout=30).pending == 0
    client.close()
    ids = collector.message_ids()
    assert set(stored) <= set(ids)  # lost 0
    assert all(n == 1 for n in ids.values())  # duplicated 0


def test_a_recovery_met_under_a_deadline_waits_for_another_recovery_only_until_it(
    frozen: tuple[Path, list[subprocess.Popen[str]]],
) -> None:
    """An operation of a flush, an exit or a drain that meets a damaged file starts a
    recovery, which first waits for any other process's recovery of the directory. With that
    process stopped while it holds the directory, the wait ends by the deadline (+1 s; it
    was the recovery's own 180 s) with ``QueueBusy``, and nothing has been touched: the
    file and its messages are as they were, and nothing was set aside."""
    path, procs = frozen
    q = SqliteQueue(path, recover=True, busy_timeout=30.0)
    dest = q.destination("https://api.example.com", WRITE_KEY)
    for i in range(3):
        q.append(dest, b'{"i":%d}' % i)
    procs.append(_frozen_recovery(path.parent))
    q._recovery.healthy_at = -1e9  # no full check just found the file sound
    started = time.monotonic()
    with q.bounded(0.5), pytest.raises(QueueBusy, match="recovering"):
        q._recovery.recover_from(QueueCorrupt("database disk image is malformed"))
    assert time.monotonic() - started < 0.5 + 1.0
    assert q.pending() == 3
    assert sorted(p.name for p in path.parent.iterdir() if ".corrupt-" in p.name) == []
    q.close()


def test_a_recovery_met_under_a_deadline_waits_for_this_process_only_until_it(
    tmp_path: Path,
) -> None:
    """The recovery's wait for this process's other operations (another thread holding the
    queue's write lock) ends by the deadline too, with ``QueueBusy`` and nothing touched."""
    path = tmp_path / "queue.sqlite3"
    q = SqliteQueue(path, recover=True)
    dest = q.destination("https://api.example.com", WRITE_KEY)
    q.append(dest, b'{"i":1}')
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with q._db.write_lock:
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    q._recovery.healthy_at = -1e9
    started = time.monotonic()
    try:
        with q.bounded(0.3), pytest.raises(QueueBusy, match="needs recovering"):
            q._recovery.recover_from(QueueCorrupt("database disk image is malformed"))
        assert time.monotonic() - started < 0.3 + 1.0
    finally:
        release.set()
        holder.join()
    assert q.pending() == 1
    q.close()


def test_a_track_that_would_spool_does_not_wait_for_a_mover_stopped_holding_the_spools_fence(
    frozen: tuple[Path, list[subprocess.Popen[str]]],
) -> None:
    """A process stopped while it holds the fence of the spool directory exclusively keeps
    every spool's commits out (a mover of this version never holds it so: it restarts a
    spool's log holding it shared, see ``checkpoint.restart_log``). An append that finds
    the queue file busy and would spool (its spool knows no destination yet: it writes one)
    gives the spool up after ``GRACE`` and stores in the queue file once that is free
    (+1 s): before, every such call waited ``busy_timeout`` for the fence first. Nothing is
    lost."""
    path, procs = frozen
    path.parent.mkdir(mode=0o700, exist_ok=True)
    q = SqliteQueue(path, spool=True, busy_timeout=5.0)
    dest = q.destination("https://api.example.com", WRITE_KEY)
    assert q.append(dest, b'{"i":0}') > 0
    spools = spool_dir(path)
    make_private_dirs(spools)
    procs.append(_frozen_recovery(spools))  # the fence's flock, as the stopped mover holds it
    waited = []
    for i in (1, 2):
        holding, release = threading.Event(), threading.Event()

        def hold(holding: threading.Event = holding, release: threading.Event = release) -> None:
            with q._db.write_lock:  # a delivering transaction of this process, for 0.2 s
                holding.set()
                release.wait(0.2)

        holder = threading.Thread(target=hold)
        holder.start()
        assert holding.wait(10)
        started = time.monotonic()
        try:
            assert q.append(dest, b'{"i":%d}' % i) != 0
            waited.append(time.monotonic() - started)
        finally:
            release.set()
            holder.join()
    assert max(waited) < 0.2 + GRACE + 1.0
    os.kill(procs[0].pid, signal.SIGKILL)
    procs[0].wait()
    q.move_spools()
    assert q.pending() == 3
    q.close()
