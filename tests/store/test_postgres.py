"""What only the PostgreSQL queue has to prove (the shared contract is test_contract.py).

Every test runs against the real private server of the ``pg_dsn`` fixture, each in a
schema of its own.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from conftest import run_python

from durable_analytics._store.postgres._queue import PostgresQueue, _StaleConnection
from durable_analytics.exceptions import (
    ConfigError,
    QueueBusy,
    QueueUnavailable,
    QueueVersionError,
)

HOST = "https://collector.test"
KEY = "write-key-postgres"


@pytest.fixture
def pgq(pg_dsn: str, pg_schema: str) -> Iterator[PostgresQueue]:
    queue = PostgresQueue(pg_dsn, schema=pg_schema, lease_timeout=30.0)
    yield queue
    queue.close()


def server_now_and_expiry(pg_dsn: str, schema: str, token: str) -> tuple[float, float]:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            f"SELECT extract(epoch FROM now()), extract(epoch FROM max(lease_expires)) "
            f'FROM "{schema}".messages WHERE lease_token = %s::uuid',
            (token,),
        ).fetchone()
    assert row is not None
    return float(row[0]), float(row[1])


def test_a_stale_holder_changes_nothing_after_its_lease_expired_and_was_taken(
    pg_dsn: str, pg_schema: str
) -> None:
    q = PostgresQueue(pg_dsn, schema=pg_schema, lease_timeout=0.3)
    dest = q.destination(HOST, KEY)
    ids = [q.append(dest, b'{"n":%d}' % i) for i in range(5)]
    first = q.lease(3, 1_000_000)
    second = q.lease(10, 1_000_000)
    assert first is not None
    assert second is not None
    assert first.ids == tuple(ids[:3])
    assert second.ids == tuple(ids[3:])
    assert q.lease(10, 1_000_000) is None  # both live: nothing to take
    time.sleep(0.4)  # the server's expiry passes (0.3 s)
    third = q.lease(10, 1_000_000)
    assert third is not None
    assert third.ids == tuple(ids)
    assert q.ack(first) == 0
    assert q.release(second, None) == 0
    assert q.dead_letter(first, first.ids, status=400, reason="stale") == 0
    assert not q.extend(second)
    assert q.pending() == 5
    assert q.ack(third) == 5
    assert q.pending() == 0
    assert q.dead_letters() == []


def test_an_expired_lease_partly_taken_by_another_holder_is_not_held_whole(
    pg_dsn: str, pg_schema: str
) -> None:
    """Messages are leased one by one: another holder may take some of an expired lease.
    ``extend`` still renews what is left (a request in flight keeps it), but
    ``extend(whole=True)``, what a batch about to be sent asks, answers False: sending
    it would send the other holder's messages twice."""
    q = PostgresQueue(pg_dsn, schema=pg_schema, lease_timeout=0.3)
    try:
        dest = q.destination(HOST, KEY)
        ids = [q.append(dest, b'{"n":%d}' % i) for i in range(4)]
        first = q.lease(4, 1_000_000)
        assert first is not None
        time.sleep(0.4)  # the server's expiry passes (0.3 s)
        other = q.lease(2, 1_000_000)
        assert other is not None
        assert other.ids == tuple(ids[:2])
        assert not q.extend(first, whole=True)
        assert q.extend(first)  # the two still under it
        assert q.release(first, None, count_attempt=False) == 2
        assert q.extend(other, whole=True)
    finally:
        q.close()


@pytest.mark.parametrize("skew", [-30.0, 30.0])
def test_the_oldest_ready_message_is_dated_on_the_asking_hosts_clock(
    pgq: PostgresQueue, skew: float
) -> None:
    """A host whose clock is off from the server's by more than ``flush_interval`` saw
    every stored message overdue (or from the future, sent at once): batching stopped, one
    request a message. ``ready_summary`` now gives the oldest's age by the server's clock,
    dated on the host's: a message just stored is just stored, whatever the skew."""
    dest = pgq.destination(HOST, KEY)
    pgq.append(dest, b'{"n":1}')
    host_now = time.time() + skew
    count, oldest = pgq.ready_summary(20, host_now)
    assert count == 1
    assert oldest is not None
    assert host_now - 5.0 < oldest <= host_now + 0.5


def test_a_call_on_a_pooled_connection_the_server_ended_runs_on_a_new_one(
    pgq: PostgresQueue, pg_dsn: str
) -> None:
    """After a server restart, a failover or ``idle_session_timeout`` ended the pooled
    sessions, the next call raised ``QueueUnavailable`` and its event was not stored,
    though the server was up. A transaction whose first statement finds its connection
    ended (nothing ran) now runs once more on a new connection."""
    dest = pgq.destination(HOST, KEY)
    pgq.append(dest, b'{"n":1}')  # leaves a connection idle in the pool
    pids = [conn.info.backend_pid for conn in pgq._pool._idle]
    assert pids
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
        ).fetchone() != (0,):
            assert time.monotonic() < deadline, "the sessions did not end"
            time.sleep(0.01)
    assert pgq.append(dest, b'{"n":2}') > 0
    assert pgq.pending() == 2


def test_the_retry_on_a_new_connection_gets_only_what_is_left_of_the_timeout(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pooled socket dropped silently is found dead only when the kernel gives up on it
    (``tcp_user_timeout`` = the queue's ``timeout``): the retry on a new connection then
    started a second full ``timeout``. It gets what is left, and past it the call raises."""
    q = PostgresQueue(pg_dsn, schema=pg_schema, timeout=1.0)
    try:
        dest = q.destination(HOST, KEY)
        given: list[float | None] = []
        real = q._tx_once

        def found_dead_after(spent: float) -> Any:
            def once(*args: Any, within: float | None = None) -> Any:
                if within is None:  # the first attempt
                    time.sleep(spent)
                    raise _StaleConnection
                given.append(within)
                return real(*args, within=within)

            return once

        monkeypatch.setattr(q, "_tx_once", found_dead_after(0.3))
        assert q.append(dest, b'{"n":1}') > 0
        assert given  # every transaction of the call retried once, with what was left
        assert all(left is not None and 0.0 < left <= 0.71 for left in given)
        monkeypatch.setattr(q, "_tx_once", found_dead_after(1.0))
        with pytest.raises(QueueUnavailable, match="found closed"):
            q.append(dest, b'{"n":2}')
    finally:
        q.close()


def test_the_holders_local_deadline_is_never_later_than_the_servers_expiry(
    pg_dsn: str, pg_schema: str, pgq: PostgresQueue
) -> None:
    dest = pgq.destination(HOST, KEY)
    pgq.append(dest, b"{}")
    lease = pgq.lease(1, 1000)
    assert lease is not None
    now, expires = server_now_and_expiry(pg_dsn, pg_schema, lease.token)
    # Read after the server's now: had the local deadline been later than the server's
    # expiry, what is left of it here would exceed what the server had left then.
    local_left = lease.expires_monotonic - time.monotonic()
    assert local_left <= expires - now


def test_bodies_come_back_as_the_exact_bytes_stored(pgq: PostgresQueue) -> None:
    dest = pgq.destination(HOST, KEY)
    bodies = [bytes(range(256)), b"\x00" * 10, '{"é":"\\u0000 ☃"}'.encode(), os.urandom(4000)]
    for body in bodies:
        pgq.append(dest, body)
    assert pgq.bodies() == bodies
    lease = pgq.lease(10, 1 << 20)
    assert lease is not None
    assert list(lease.bodies) == bodies


def test_the_schema_comes_from_the_url_and_holds_every_table(pg_dsn: str, pg_schema: str) -> None:
    q = PostgresQueue(f"{pg_dsn}&schema={pg_schema}")
    assert q.identity.endswith(f"#{pg_schema}")
    q.append(q.destination(HOST, KEY), b"{}")
    with psycopg.connect(pg_dsn) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", (pg_schema,)
            )
        }
    assert tables == {
        "meta",
        "destinations",
        "messages",
        "dead_letters",
        "counters",
        "holders",
        "leases",
    }


def test_processes_opening_a_fresh_schema_at_once_create_it_once(
    pg_dsn: str, pg_schema: str
) -> None:
    errors: list[BaseException] = []
    instances: list[str] = []

    def open_one() -> None:
        try:
            instances.append(PostgresQueue(pg_dsn, schema=pg_schema).instance)
        except BaseException as exc:  # the test reports it below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(instances)) == 1


def test_a_schema_written_by_a_newer_version_is_refused(pg_dsn: str, pg_schema: str) -> None:
    PostgresQueue(pg_dsn, schema=pg_schema)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(f"UPDATE \"{pg_schema}\".meta SET value = '99' WHERE key = 'version'")
    with pytest.raises(QueueVersionError, match="newer"):
        PostgresQueue(pg_dsn, schema=pg_schema)


@pytest.mark.parametrize(("durability", "expected"), [("normal", "off"), ("full", "on")])
def test_durability_sets_synchronous_commit_for_the_queues_own_transactions_only(
    pg_dsn: str, pg_schema: str, durability: str, expected: str
) -> None:
    q = PostgresQueue(pg_dsn, schema=pg_schema, durability=durability)  # type: ignore[arg-type]
    inside = q._tx(lambda c: c.execute("SHOW synchronous_commit")).fetchone()
    assert inside == (expected,)
    with q._pool.connection() as conn:  # the same session, after the transaction
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)


def test_an_unreachable_server_raises_queue_unavailable(tmp_path: object) -> None:
    started = time.monotonic()
    with pytest.raises(QueueUnavailable, match="unreachable"):
        PostgresQueue("postgresql://nobody@/db?host=/nonexistent-da-socket-dir&port=1")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(("hosts", "timeout", "most"), [(1, 2.0, 4.5), (3, 6.0, 8.5)])
def test_a_server_that_never_answers_raises_within_the_timeout(
    hosts: int, timeout: float, most: float
) -> None:
    """A TCP peer that accepts and then says nothing: bounded by the connect timeout, also
    when the URL names several hosts: libpq counts ``connect_timeout`` per host, so each
    gets its share of ``timeout`` (three such hosts took three times the timeout)."""
    listeners = []
    for i in range(hosts):
        listener = socket.socket()
        listener.bind((f"127.0.0.{i + 1}", 0))
        listener.listen(8)
        listeners.append(listener)
    where = ",".join(f"127.0.0.{i + 1}:{ln.getsockname()[1]}" for i, ln in enumerate(listeners))
    try:
        started = time.monotonic()
        with pytest.raises(QueueUnavailable):
            PostgresQueue(f"postgresql://u:secret-pw@{where}/db?sslmode=disable", timeout=timeout)
        assert time.monotonic() - started < most  # about one timeout, not one per host
    finally:
        for listener in listeners:
            listener.close()


def test_a_url_whose_first_host_hangs_connects_to_the_next_within_the_timeout(
    pg_dsn: str, pg_schema: str
) -> None:
    """Failover: the old primary hangs, the next host answers. Each host's share of
    ``timeout`` leaves time for the next one (a give-up at ``timeout`` for all of them
    together, tried first, refused every new connection while the first host hung)."""
    parts = urlsplit(pg_dsn)
    query = parse_qs(parts.query)
    socket_dir, port = query["host"][0], query["port"][0]
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    try:
        url = (
            f"postgresql://{parts.username}@/{parts.path.lstrip('/')}?schema={pg_schema}"
            f"&host=127.0.0.1,{socket_dir}&port={hung.getsockname()[1]},{port}&sslmode=disable"
        )
        started = time.monotonic()
        queue = PostgresQueue(url, timeout=5.0)
        try:
            queue.append(queue.destination(HOST, KEY), b'{"n":1}')
            assert queue.pending() == 1
        finally:
            queue.close()
        assert time.monotonic() - started < 5.0 + 1.0
    finally:
        hung.close()


def test_a_statement_held_up_by_a_lock_raises_queue_busy_after_the_timeout(
    pg_dsn: str, pg_schema: str
) -> None:
    q = PostgresQueue(pg_dsn, schema=pg_schema, timeout=1.0)
    dest = q.destination(HOST, KEY)
    q.append(dest, b"{}")
    lease = q.lease(1, 1000)
    assert lease is not None
    with psycopg.connect(pg_dsn) as other, other.transaction():
        other.execute(f'SELECT 1 FROM "{pg_schema}".destinations FOR UPDATE')
        started = time.monotonic()
        with pytest.raises(QueueBusy):
            q.retry_later(lease, lambda failures: 1.0, "boom")
        assert time.monotonic() - started < 5
    # Nothing was half-done: the batch is still leased, and the queue works on.
    assert q.backoff(dest)[1] == 0
    assert q.ack(lease) == 1


def test_the_password_never_appears_in_the_identity_or_an_error() -> None:
    with pytest.raises(QueueUnavailable) as raised:
        PostgresQueue("postgresql://user:hunter2-secret@/db?host=/nonexistent-da&port=1")
    assert "hunter2" not in str(raised.value)
    with pytest.raises(ConfigError) as bad:
        PostgresQueue("postgresql://user:hunter2-secret@/db?schema=Bad-Name")
    assert "hunter2" not in str(bad.value)


def test_without_psycopg_the_error_names_the_extra() -> None:
    result = run_python(
        """
        import sys
        sys.modules["psycopg"] = None  # as if it were not installed
        from durable_analytics.exceptions import ConfigError
        try:
            from durable_analytics._store.postgres._queue import PostgresQueue
        except ConfigError as exc:
            print("ConfigError:", exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'durable-analytics[postgres]'" in result.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_a_forked_child_uses_its_own_connection_and_never_ends_the_parents(
    pgq: PostgresQueue,
) -> None:
    dest = pgq.destination(HOST, KEY)
    pgq.append(dest, b'{"who":"parent"}')  # the parent's pooled connection is now open
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            import gc

            from durable_analytics._store.postgres import _conn

            pgq.append(dest, b'{"who":"child"}')
            _conn._INHERITED.clear()  # let the inherited connections be finalized
            gc.collect()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's connection (the same one it had before the fork) still works.
    pgq.append(dest, b'{"who":"parent again"}')
    assert pgq.bodies() == [b'{"who":"parent"}', b'{"who":"child"}', b'{"who":"parent again"}']


def test_stats_count_under_live_leases_and_show_table_health(pgq: PostgresQueue) -> None:
    dest = pgq.destination(HOST, KEY)
    for i in range(4):
        pgq.append(dest, b'{"i":%d}' % i)
    lease = pgq.lease(3, 1 << 20)
    assert lease is not None
    stats = pgq.stats()
    assert (stats.pending, stats.leased, stats.bytes) == (4, 3, 4 * 7)
    assert pgq.live_leases() == 1
    health = pgq.table_health()
    assert set(health) >= {"dead_rows", "live_rows", "table_bytes", "oldest_transaction_seconds"}


def test_far_below_the_cap_appends_do_not_scan_the_table_each_few_hundred_kilobytes(
    pgq: PostgresQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each size measure is a scan: a fleet far from the cap must not pay it every 256 KB."""
    dest = pgq.destination(HOST, KEY)
    measures = []
    real = pgq._caps.remeasure
    monkeypatch.setattr(pgq._caps, "remeasure", lambda: measures.append(1) or real())
    for _ in range(600):
        assert pgq.append(dest, b"x" * 1000)  # 600 KB, far below the 1 GiB default cap
    assert len(measures) == 1  # the first append's, none since


def _buffers(plan: dict[str, object]) -> int:
    """Shared buffers a plan node (and the nodes under it) touched."""
    hit = plan.get("Shared Hit Blocks", 0)
    read = plan.get("Shared Read Blocks", 0)
    assert isinstance(hit, int)
    assert isinstance(read, int)
    return hit + read


def _poll_and_lease_buffers(pg_dsn: str, schema: str, backlog: int) -> tuple[int, ...]:
    """Buffers touched by NEXT_READY, READY_SUMMARY, CHOOSE and LEASE (rolled back) while A
    backs off behind ``backlog`` messages and B has 100 fresh ones."""
    from durable_analytics._store.postgres import _sql as q

    queue = PostgresQueue(pg_dsn, schema=schema, lease_timeout=30.0)
    a = queue.destination(HOST, KEY)
    b = queue.destination("https://other.test", KEY)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{schema}".messages (dest, body, size) '
            "SELECT %s, convert_to(repeat('x', 300), 'UTF8'), 300 FROM generate_series(1, %s)",
            (a, backlog),
        )
        conn.execute(f'VACUUM ANALYZE "{schema}".messages')
    queue.set_backoff(a, time.time() + 300, "HTTP 503")
    for i in range(100):
        queue.append(b, b'{"i":%d}' % i)
    horizon = 660
    params: dict[str, object] = {
        "top": 1 << 62,
        "limit": 100,
        "horizon": horizon,
        "dest": None,
        "n": 100,
        "max_bytes": 1 << 30,
        "overhead": 1,
        "token": uuid.uuid4(),
        "timeout": 30.0,
        "holder": None,
        "max": 32,
        "cls": 1,
    }
    found = []
    with psycopg.connect(pg_dsn) as conn:
        for statement in (q.NEXT_READY, q.READY_SUMMARY, q.CHOOSE, q.LEASE):
            explain = b"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queue._sql(statement)
            row = conn.execute(explain, params).fetchone()
            assert row is not None
            found.append(_buffers(row[0][0]["Plan"]))
        conn.rollback()
    queue.close()
    return tuple(found)


def test_polls_and_leases_read_the_same_behind_a_backlog_ten_times_larger(
    pg_dsn: str,
) -> None:
    """With A backing off behind 2,000 and then 20,000 messages and B holding 100 fresh
    ones, "when is the next message ready", "how many are ready", choosing B and leasing
    B's batch touch about the same number of buffers: each destination is read on the (dest, id)
    index, and A's backlog is never walked (scanning in id order touched it all)."""
    from _postgres import unique_schema

    small = _poll_and_lease_buffers(pg_dsn, unique_schema(), 2_000)
    large = _poll_and_lease_buffers(pg_dsn, unique_schema(), 20_000)
    for before, after in zip(small, large, strict=True):
        assert after < before * 1.5 + 10
