"""A PostgreSQL lease whose holder's session died is taken over at once, not after
``lease_timeout``; a live holder's never is.

Every lease here lasts 600 s: a message delivered within the test came back through the
takeover. Holders are real: a child process killed with SIGKILL, or a live queue whose
presence session the server terminates (``pg_terminate_backend``).
"""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable

import psycopg
import pytest
from conftest import WRITE_KEY, start_python

from durable_analytics._config import Config
from durable_analytics._drain import drain_queue
from durable_analytics._store.postgres._queue import PostgresQueue
from durable_analytics.exceptions import ConfigError
from durable_analytics.testing import Collector

from .pg_helpers import OpenPg, body

LEASE_TIMEOUT = 600.0
MESSAGES = 100
BATCH = 10

# Leases one batch, sends it to the collector (the server has it), prints its ids, and
# waits for the SIGKILL before it could ack: the worst moment to die.
HOLDER = """
import sys
from durable_analytics._store.postgres._queue import PostgresQueue
from durable_analytics._transport.http import HTTPTransport

url, schema, batch = sys.argv[1:4]
q = PostgresQueue(url, schema=schema, lease_timeout=600)
lease = q.lease(int(batch), 1 << 20)
outcome = HTTPTransport().send(lease.destination, list(lease.bodies))
print(outcome.kind, ",".join(map(str, lease.ids)), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def open_held(open_pg: OpenPg) -> OpenPg:
    """Sessions whose leases live ``LEASE_TIMEOUT``: only a takeover, never expiry, ends them."""
    return functools.partial(open_pg, lease_timeout=LEASE_TIMEOUT)


def until_taken_over(queue: PostgresQueue, bound: float = 10.0) -> int:
    """Leases ended by ``reclaim_expired`` once the dead session's lock is released.

    The server ends a killed client's session as soon as it reads the closed socket; the
    loop only bridges that moment (bounded: a lease of 600 s never expires here).
    """
    end = time.monotonic() + bound
    while True:
        ended = queue.reclaim_expired()
        if ended or time.monotonic() > end:
            return ended
        time.sleep(0.02)


def test_a_sigkilled_holders_batch_is_taken_over_at_once_and_delivered_lost_0(
    open_held: Callable[..., PostgresQueue], pg_dsn: str, pg_schema: str
) -> None:
    """A child leases a batch, sends it, and is SIGKILLed before its ack: another process
    takes the batch over within moments (not 600 s), the drain delivers every message, and
    the only duplicates are the dead child's batch."""
    with Collector(WRITE_KEY) as collector:
        queue = open_held()
        dest = queue.destination(collector.url, WRITE_KEY)
        assert all(queue.append(dest, body(i)) for i in range(MESSAGES))
        child = start_python(HOLDER, pg_dsn, pg_schema, str(BATCH), stdin=-1)
        assert child.stdout is not None
        kind, ids = child.stdout.readline().split()
        assert kind == "ok"
        held = [int(i) for i in ids.split(",")]
        assert len(held) == BATCH
        assert queue.reclaim_expired() == 0  # alive: its lease stands
        assert queue.stats().leased == BATCH
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert until_taken_over(queue) == 1
        assert queue.stats().leased == 0
        config = Config.build(WRITE_KEY, host=collector.url)
        result = drain_queue(queue, config, concurrency=1, timeout=30)
        assert result.left == 0
        assert queue.pending() == 0
        received = collector.message_ids()
    lost = {f"m-{i}" for i in range(MESSAGES)} - set(received)
    duplicates = sum(n - 1 for n in received.values())
    assert lost == set()
    assert duplicates == BATCH  # the dead child's batch, sent before it died: at most that
    assert {m for m, n in received.items() if n > 1} == {f"m-{i}" for i in range(BATCH)}


def test_a_live_holder_whose_session_is_terminated_is_taken_over_then_registers_again(
    open_held: Callable[..., PostgresQueue], pg_dsn: str
) -> None:
    """pg_terminate_backend of a holder's presence session: its lease is taken over, its
    own ack then deletes nothing (one batch sent twice at most), and its next lease is
    under a new holder that nobody takes over while it lives."""
    holder, other = open_held(), open_held()
    dest = holder.destination("https://collector.test", WRITE_KEY)
    assert all(holder.append(dest, body(i)) for i in range(30))
    first = holder.lease(BATCH, 1 << 20)
    assert first is not None
    old_id, pid = holder._presence.id, holder._presence.pid()
    assert old_id is not None
    assert pid is not None
    assert other.reclaim_expired() == 0
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    assert until_taken_over(other) == 1
    again = other.lease(BATCH, 1 << 20)
    assert again is not None
    assert again.ids == first.ids  # the oldest, ready again
    assert holder.ack(first) == 0  # fenced: the taker's lease stands
    assert other.ack(again) == BATCH
    second = holder.lease(BATCH, 1 << 20)
    assert second is not None
    assert holder._presence.id not in (None, old_id)
    assert other.reclaim_expired() == 0
    assert holder.ack(second) == BATCH
    assert holder.pending() == 30 - 2 * BATCH


def test_with_fast_takeover_off_a_dead_holders_lease_waits_for_its_expiry(
    open_held: Callable[..., PostgresQueue], pg_dsn: str, pg_schema: str
) -> None:
    """?fast_takeover=off (behind a pooler in transaction mode): no holder is registered,
    and a killed holder's lease stays until it expires."""
    url = f"{pg_dsn}&fast_takeover=off"
    queue = open_held(url)
    dest = queue.destination("https://collector.test", WRITE_KEY)
    assert all(queue.append(dest, body(i)) for i in range(20))
    lease = queue.lease(BATCH, 1 << 20)
    assert lease is not None
    assert queue._presence.id is None
    with psycopg.connect(pg_dsn) as admin:
        row = admin.execute(
            f'SELECT count(*) FROM "{pg_schema}".messages WHERE lease_holder IS NOT NULL'
        ).fetchone()
    assert row == (0,)
    dead = open_held()
    dead_lease = dead.lease(BATCH, 1 << 20)
    assert dead_lease is not None
    dead.close()  # its presence ends: a holder with takeover on is gone
    assert queue.reclaim_expired() == 0  # this queue does not look for dead holders
    assert open_held().reclaim_expired() == 1  # one that does, does
    with pytest.raises(ConfigError):
        PostgresQueue(f"{pg_dsn}&fast_takeover=maybe", schema=pg_schema)


def test_a_version_1_schema_is_migrated_and_its_leases_keep_working(
    pg_dsn: str, pg_schema: str
) -> None:
    """Version 2 adds the lease holder: a queue made by version 1 is migrated on open."""
    from durable_analytics._store.postgres import _schema

    sql = _schema.Sql(pg_schema)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql("CREATE SCHEMA {s}").decode())
        conn.execute(sql("CREATE TABLE {s}.meta (key text PRIMARY KEY, value text)").decode())
        conn.execute(sql(_schema._MIGRATIONS[0]).decode())
        conn.execute(
            sql("INSERT INTO {s}.meta VALUES ('version', '1'), ('instance', 'abc')").decode()
        )
    queue = PostgresQueue(pg_dsn, schema=pg_schema)
    try:
        dest = queue.destination("https://collector.test", WRITE_KEY)
        assert queue.append(dest, body(0))
        lease = queue.lease(BATCH, 1 << 20)
        assert lease is not None
        assert queue.ack(lease) == 1
        with psycopg.connect(pg_dsn) as conn:
            version = conn.execute(
                sql("SELECT value FROM {s}.meta WHERE key = 'version'").decode()
            ).fetchone()
        assert version == (str(_schema.SCHEMA_VERSION),)
    finally:
        queue.close()
