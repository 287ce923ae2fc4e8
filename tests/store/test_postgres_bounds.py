"""The PostgreSQL queue's waits end by the caller's bound when the server stalls.

Two stalls, both real: another connection holding a lock every statement needs (the
server is running, so ``statement_timeout`` can end the wait), and the queue's own server
process stopped with SIGSTOP (it runs nothing, so only the client can end the wait). Each
stall lasts a minute unless the test ends it; a call must return while it still holds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from conftest import WRITE_KEY, run_python, start_python

from durable_analytics import Client
from durable_analytics._store.postgres._bounds import GRACE as PG_GRACE
from durable_analytics._store.postgres._bounds import Deadlines
from durable_analytics._store.postgres._queue import PostgresQueue
from durable_analytics._store.settle import SETTLE_GRACE, settling
from durable_analytics.cli import EXIT_UNDELIVERED
from durable_analytics.cli import main as cli_main
from durable_analytics.exceptions import QueueBusy, QueueError
from durable_analytics.testing import Collector

STALL = 60.0  # seconds a stall lasts unless the test ends it first
#: What a loaded machine may add to a wait bounded by a deadline, in the tests whose
#: defect waited 10 s or more past it (a tighter bound would only catch the machine).
SLACK = 3.0

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")


@pytest.fixture
def url(pg_dsn: str, pg_schema: str) -> str:
    return f"{pg_dsn}&schema={pg_schema}"


class Stall:
    """A stall that ``end`` (or a minute passing) ends; ``ended`` says whether it has."""

    def __init__(self, end: Callable[[], None]) -> None:
        self._end = end
        self._lock = threading.Lock()
        self.ended = threading.Event()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._run, daemon=True)
        self._timer.start()

    def _run(self) -> None:
        self._stop.wait(STALL)
        self.end()

    def end(self) -> None:
        with self._lock:
            if not self.ended.is_set():
                # Set first: a call the stall held may return the moment it ends.
                self.ended.set()
                self._end()
        self._stop.set()


@pytest.fixture
def stalls() -> Iterator[list[Stall]]:
    made: list[Stall] = []
    yield made
    for stall in made:
        stall.end()


def _locked(
    pg_dsn: str, table: str, mode: str, stalls: list[Stall]
) -> tuple[psycopg.Connection[Any], Stall]:
    """Another session holding ``LOCK TABLE table IN mode MODE`` until its stall ends."""
    other = psycopg.connect(pg_dsn, autocommit=True)
    other.execute("BEGIN")
    other.execute(f"LOCK TABLE {table} IN {mode} MODE")

    def rollback() -> None:
        other.execute("ROLLBACK")

    stall = Stall(rollback)
    stalls.append(stall)
    return other, stall


def _stopped(pid: int, stalls: list[Stall]) -> Stall:
    """The server process ``pid`` stopped (SIGSTOP) until its stall ends (SIGCONT)."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except PermissionError:
        pytest.skip("cannot stop the server's processes (not root, not their owner)")
    stall = Stall(lambda: os.kill(pid, signal.SIGCONT))
    stalls.append(stall)
    return stall


def _client(collector: Collector, url: str) -> Client:
    """A Client on the PostgreSQL queue whose own waits are long (``timeout`` 60 s): only
    the deadline of the call under test can end them early."""
    return Client(
        WRITE_KEY,
        host=collector.url,
        queue_url=url,
        flusher="none",
        on_exit="none",
        timeout=60,
        lease_timeout=120,
    )


def test_a_settling_call_may_wait_the_grace_past_a_deadline_and_no_longer() -> None:
    """The PostgreSQL bound honours ``settling`` as SQLite's does: past a deadline a call
    keeps 50 ms, an ack of a delivered batch the grace."""
    deadlines = Deadlines()
    with deadlines.bounded(0.0):
        assert deadlines.limit(10.0) == pytest.approx(PG_GRACE, abs=0.01)
        with settling():
            assert deadlines.limit(10.0) == pytest.approx(SETTLE_GRACE, abs=0.05)
    assert deadlines.limit(10.0) == 10.0


def test_flush_returns_by_its_timeout_while_another_connection_locks_the_queue(
    pg_dsn: str, url: str, pg_schema: str, stalls: list[Stall]
) -> None:
    """Another session holds an exclusive lock on the messages table; with the queue's
    ``timeout`` at 60 s, ``flush(timeout=0.5)`` returns (or raises ``QueueBusy``) while the
    lock is still held: each statement gets what is left of the flush, not 60 s."""
    with Collector(WRITE_KEY) as collector:
        client = _client(collector, url)
        for i in range(5):
            assert client.track("u", "Kept", {"i": i})[0]
        other, stall = _locked(pg_dsn, f"{pg_schema}.messages", "ACCESS EXCLUSIVE", stalls)
        with contextlib.suppress(QueueBusy):
            client.flush(timeout=0.5)
        assert not stall.ended.is_set()  # it returned while the lock was still held
        stall.end()
        other.close()
        assert client.flush(timeout=30).pending == 0
        client.close(timeout=5)
    assert len(collector.message_ids()) == 5


def test_close_stops_the_flusher_even_when_its_flush_raises(
    pg_dsn: str, url: str, pg_schema: str, stalls: list[Stall]
) -> None:
    """``close(timeout=0.5)`` while another session locks the messages table: its flush
    cannot even count what is pending and raises ``QueueBusy``. The flusher thread must be
    stopped all the same (before, close() raised with it still running, delivering behind
    the caller's back after the caller was told the client was closed); nothing is lost."""
    with Collector(WRITE_KEY) as collector:
        client = Client(
            WRITE_KEY,
            host=collector.url,
            queue_url=url,
            on_exit="none",
            timeout=60,
            lease_timeout=120,
        )
        assert client.track("u", "Kept")[0]
        flusher = client._flusher
        assert flusher is not None
        assert flusher.alive
        other, stall = _locked(pg_dsn, f"{pg_schema}.messages", "ACCESS EXCLUSIVE", stalls)
        with pytest.raises(QueueBusy):
            client.close(timeout=0.5)
        assert client._flusher is None
        stall.end()
        other.close()
        # Asked to stop by close(), it ends on its own once its wait for the lock is over
        # (without the fix it was never asked, and kept polling).
        flusher._thread.join(5.0)
        assert not flusher.alive
        assert client.flush(timeout=30).pending == 0  # another close delivers it
        client.close(timeout=5)
    assert len(collector.message_ids()) == 1


def _backend_pid(queue: PostgresQueue) -> int:
    """The server process of the queue's one pooled connection."""
    row = queue._tx(lambda c: c.execute(b"SELECT pg_backend_pid()").fetchone())
    return int(row[0])


@pytest.mark.parametrize("bound", ["deadline", "timeout"])
def test_a_stopped_server_process_cannot_hold_a_call_past_its_bound(
    url: str, stalls: list[Stall], bound: str
) -> None:
    """The queue's server process is stopped (SIGSTOP): it never applies its
    ``statement_timeout``, and libpq waited for its answer as long as the stop lasted (for
    ever). A call inside ``bounded(0.5)`` (a flush, an exit, a drain), or any call with the
    queue's ``timeout`` at 1 s (a ``track()``), now raises ``QueueBusy`` while the process
    is still stopped; its connection is dropped and the next call, on a new one, works."""
    queue = PostgresQueue(url, timeout=60 if bound == "deadline" else 1, pool_size=1)
    dest = queue.destination("https://api.example.test", WRITE_KEY)
    assert queue.append(dest, b'{"messageId":"m-1"}')
    pid = _backend_pid(queue)
    stall = _stopped(pid, stalls)
    bounded = queue.bounded(0.5 if bound == "deadline" else None)
    with pytest.raises(QueueBusy, match="did not answer within"), bounded:
        queue.pending()
    assert not stall.ended.is_set()  # it returned while the server process was stopped
    assert queue.pending() == 1  # on a new connection: nothing was lost
    stall.end()
    queue.close()


def test_a_flush_of_a_client_whose_server_process_is_stopped_returns_by_its_timeout(
    url: str, stalls: list[Stall]
) -> None:
    """The Client's ``flush(timeout=0.5)`` with its queue's server process stopped returns,
    or raises a ``QueueError``, while that process is still stopped."""
    with Collector(WRITE_KEY) as collector:
        client = _client(collector, url)
        assert client.track("u", "Kept")[0]
        queue = client.queue
        assert isinstance(queue, PostgresQueue)
        with queue._pool.connection() as conn:  # the one the call used, idle now
            pid = int(conn.info.backend_pid)
        stall = _stopped(pid, stalls)
        with contextlib.suppress(QueueError):
            client.flush(timeout=0.5)
        assert not stall.ended.is_set()  # it returned while the server process was stopped
        stall.end()
        assert client.flush(timeout=30).pending == 0
        client.close(timeout=5)
    assert len(collector.message_ids()) == 1


def test_a_forked_child_is_not_bound_by_its_parents_deadline(url: str) -> None:
    """A process forks while a flush with a deadline runs (its deadline has passed): the
    child, where that flush does not run, still gives its calls the queue's timeout, not the
    parent's spent deadline (a statement of 0.3 s succeeds there, and fails in the parent).
    In a child interpreter: forking this multi-threaded test process would warn."""
    result = run_python(
        """
        import os, sys
        from durable_analytics._store.postgres._queue import PostgresQueue
        from durable_analytics.exceptions import QueueBusy
        queue = PostgresQueue(sys.argv[1], timeout=30, pool_size=1)
        slow = lambda c: c.execute(b"SELECT pg_sleep(0.3)").fetchone()
        with queue.bounded(0):
            try:
                queue._tx(slow)
                print("parent not bound")
            except QueueBusy:
                print("parent bound")
            pid = os.fork()
            if pid == 0:
                try:
                    queue._tx(slow)
                    os._exit(0)
                except QueueBusy:
                    os._exit(3)
        print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        """,
        url,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["parent bound", "child 0"]


def test_opening_the_queue_ends_by_its_timeout_behind_a_lock_on_its_schema(
    pg_dsn: str, url: str, pg_schema: str, stalls: list[Stall]
) -> None:
    """Opening the queue checks its schema on a connection that has no
    ``statement_timeout`` yet: behind another session's lock on the schema's ``meta`` table
    (a migration that is stuck) ``PostgresQueue(url, timeout=1)`` (so ``Client(...)``)
    waited as long as the lock was held. It now raises ``QueueBusy`` while it still is."""
    PostgresQueue(url, timeout=1).close()
    other, stall = _locked(pg_dsn, f"{pg_schema}.meta", "ACCESS EXCLUSIVE", stalls)
    with pytest.raises(QueueBusy, match="checking its schema"):
        PostgresQueue(url, timeout=1)
    assert not stall.ended.is_set()  # it returned while the lock was still held
    stall.end()
    other.close()
    PostgresQueue(url, timeout=1).close()


def test_an_exit_that_spawns_a_drain_returns_by_shutdown_timeout_with_the_server_stopped(
    url: str, stalls: list[Stall]
) -> None:
    """``on_exit="spawn"`` looks whether its destination has pending messages before it
    starts the drain: with the queue's server process stopped, that look waited the queue's
    ``timeout`` (60 s here) plus the watchdog's margin, past ``shutdown_timeout``. The exit
    handler now returns by ``shutdown_timeout`` (+ ``SLACK``) while the process is still
    stopped, and still hands the queue to a drain, which delivers everything."""
    with Collector(WRITE_KEY) as collector:
        client = Client(
            WRITE_KEY,
            host=collector.url,
            queue_url=url,
            flusher="none",
            on_exit="spawn",
            shutdown_timeout=0.5,
            timeout=60,
            lease_timeout=120,
        )
        for i in range(3):
            assert client.track("u", "Kept", {"i": i})[0]
        queue = client.queue
        assert isinstance(queue, PostgresQueue)
        with queue._pool.connection() as conn:  # the one the calls used, idle now
            pid = int(conn.info.backend_pid)
        stall = _stopped(pid, stalls)
        started = time.monotonic()
        client._at_exit()
        took = time.monotonic() - started
        assert not stall.ended.is_set()  # it returned while the server process was stopped
        assert took < 0.5 + SLACK
        stall.end()
        deadline = time.monotonic() + 30
        while len(collector.message_ids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(collector.message_ids()) == 3  # the spawned drain delivered them


def test_a_first_flush_returns_by_its_timeout_while_the_holders_table_is_locked(
    pg_dsn: str, url: str, pg_schema: str, stalls: list[Stall]
) -> None:
    """A process registers as a lease holder on its first lease, on a connection of its
    own: with another session holding a lock that stops the registration's INSERT (reads
    still pass), ``flush(timeout=0.5)`` waited the queue's ``timeout`` (60 s here), since
    neither the deadline nor the watchdog reached that connection. It now returns by its
    deadline (+ ``SLACK``) while the lock is held; its leases then name no holder (they
    expire) until it registers, and everything is delivered."""
    with Collector(WRITE_KEY) as collector:
        client = _client(collector, url)
        for i in range(3):
            assert client.track("u", "Kept", {"i": i})[0]
        other, stall = _locked(pg_dsn, f"{pg_schema}.holders", "EXCLUSIVE", stalls)
        started = time.monotonic()
        with contextlib.suppress(QueueBusy):
            client.flush(timeout=0.5)
        took = time.monotonic() - started
        assert not stall.ended.is_set()  # it returned while the lock was still held
        assert took < 0.5 + SLACK
        stall.end()
        other.close()
        assert client.flush(timeout=30).pending == 0
        client.close(timeout=5)
    assert len(collector.message_ids()) == 3


def _postmaster_pid(pg_dsn: str) -> int:
    """The cluster's postmaster (the process that accepts new connections)."""
    base = parse_qs(urlsplit(pg_dsn).query)["host"][0]
    return int(Path(base, "data", "postmaster.pid").read_text().split()[0])


def test_a_flush_that_must_connect_returns_by_its_timeout_while_the_postmaster_is_stopped(
    pg_dsn: str, url: str, stalls: list[Stall]
) -> None:
    """The server's postmaster is stopped (SIGSTOP), so a new connection gets no answer, and
    the process has no idle connection left (a cut one was dropped): ``flush(timeout=0.5)``
    and ``close(timeout=0.5)`` each waited libpq's least connect timeout, 2 s, past their
    deadline. Each now returns (or raises a ``QueueError``) by its deadline (+1.5 s: the
    defect waited 2 s past it)."""
    with Collector(WRITE_KEY) as collector:
        client = _client(collector, url)
        assert client.track("u", "Kept")[0]
        queue = client.queue
        assert isinstance(queue, PostgresQueue)
        with queue._pool._lock:  # as if the watchdog had cut the idle one
            idle, queue._pool._idle = queue._pool._idle, []
        for conn in idle:
            conn.close()
        pid = _postmaster_pid(pg_dsn)
        stall = _stopped(pid, stalls)
        for call in (client.flush, client.close):
            started = time.monotonic()
            with contextlib.suppress(QueueError):
                call(timeout=0.5)
            took = time.monotonic() - started
            assert took < 0.5 + 1.5, call
        assert not stall.ended.is_set()  # it returned while the postmaster was stopped
        stall.end()
        assert client.flush(timeout=30).pending == 0
        client.close(timeout=5)
    assert len(collector.message_ids()) == 1


def test_drain_with_a_timeout_returns_by_it_while_another_connection_locks_the_queue(
    pg_dsn: str, url: str, pg_schema: str, stalls: list[Stall]
) -> None:
    """``durable-analytics drain --timeout 0.5`` on a PostgreSQL queue whose messages table
    another session locks: the counts it reads for its progress bar before the drain, and
    for its report after it, each waited the queue's ``timeout`` (10 s). It now ends by its
    timeout (+ ``SLACK``) while the lock is held, exit 1, and nothing is lost."""
    queue = PostgresQueue(url, timeout=10)
    dest = queue.destination("https://api.example.test", WRITE_KEY)
    for i in range(3):
        assert queue.append(dest, b'{"messageId":"m-%d"}' % i)
    queue.close()
    other, stall = _locked(pg_dsn, f"{pg_schema}.messages", "ACCESS EXCLUSIVE", stalls)
    started = time.monotonic()
    code = cli_main(["drain", "--queue", url, "--timeout", "0.5"])
    took = time.monotonic() - started
    assert not stall.ended.is_set()  # it returned while the lock was still held
    assert took < 0.5 + SLACK
    assert code == EXIT_UNDELIVERED
    stall.end()
    other.close()
    queue = PostgresQueue(url, timeout=10)
    assert queue.pending() == 3
    queue.close()


def test_a_worker_stops_within_its_shutdown_timeout_while_another_connection_locks_the_queue(
    pg_dsn: str, url: str, pg_schema: str, stalls: list[Stall]
) -> None:
    """``durable-analytics worker --shutdown-timeout 0.5`` on a PostgreSQL queue whose
    messages table another session locks: after stopping its flushers it counted what is
    pending for its last log line with the queue's ``timeout`` (10 s). It now exits within
    its shutdown timeout (+ ``SLACK``) of SIGTERM while the lock is held."""
    worker = start_python(
        "from durable_analytics.cli import main; raise SystemExit(main())",
        "worker",
        "--queue",
        url,
        "--poll",
        "0.05",
        "--shutdown-timeout",
        "0.5",
    )
    assert worker.stderr is not None
    try:
        while "worker started" not in (line := worker.stderr.readline()):
            assert line, "the worker ended before it started"
        other, stall = _locked(pg_dsn, f"{pg_schema}.messages", "ACCESS EXCLUSIVE", stalls)
        worker.send_signal(signal.SIGTERM)
        started = time.monotonic()
        worker.wait(timeout=60)
        took = time.monotonic() - started
        assert not stall.ended.is_set()  # it exited while the lock was still held
        assert took < 0.5 + SLACK
        stall.end()
        other.close()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
